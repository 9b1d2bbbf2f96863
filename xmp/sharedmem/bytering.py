"""Byte-stream rings: the console page and the xenstore page.

``io/console.h`` (struct xencons_interface)::

    0     char in[1024]        console -> guest (keyboard)
    1024  char out[2048]       guest -> console daemon
    3072  u32 in_cons, in_prod
    3080  u32 out_cons, out_prod

``io/xs_wire.h`` (struct xenstore_domain_interface)::

    0     char req[1024]       guest -> xenstored
    1024  char rsp[1024]       xenstored -> guest
    2048  u32 req_cons, req_prod
    2056  u32 rsp_cons, rsp_prod
    2064  u32 server_features, connection, error, evtchn_port

Indices are free-running u32; a position is ``idx & (size - 1)``.  Each
direction has one writer (owns prod) and one reader (owns cons); both are
moved in C with acquire/release ordering.  Indices that claim more than
the ring's size in flight are a hostile peer: RemoteProtocolError.
"""

from __future__ import annotations

from dataclasses import dataclass

from xmp.errors import RemoteProtocolError
from xmp.sharedmem._ffi import ffi, lib

XENCONS_IN_SIZE = 1024
XENCONS_OUT_SIZE = 2048
XENSTORE_RING_SIZE = 1024


@dataclass(frozen=True)
class ByteRingLayout:
    data: int
    size: int
    cons: int
    prod: int


CONSOLE_IN = ByteRingLayout(0, XENCONS_IN_SIZE, 3072, 3076)
CONSOLE_OUT = ByteRingLayout(1024, XENCONS_OUT_SIZE, 3080, 3084)
XENSTORE_REQ = ByteRingLayout(0, XENSTORE_RING_SIZE, 2048, 2052)
XENSTORE_RSP = ByteRingLayout(1024, XENSTORE_RING_SIZE, 2056, 2060)
# Further xenstore_domain_interface fields.
XS_SERVER_FEATURES, XS_CONNECTION, XS_ERROR, XS_EVTCHN_PORT = 2064, 2068, 2072, 2076
XENSTORE_CONNECTED, XENSTORE_RECONNECT = 0, 1


class ByteRing:
    """One direction of a byte ring in a shared page."""

    def __init__(self, page, layout: ByteRingLayout, name: str = "byte ring"):
        self._mem = ffi.from_buffer("uint8_t[]", page, require_writable=True)
        self.layout = layout
        self.name = name
        self._data = self._mem + layout.data
        self._cons = ffi.cast("uint32_t *", self._mem + layout.cons)
        self._prod = ffi.cast("uint32_t *", self._mem + layout.prod)

    @property
    def size(self) -> int:
        return self.layout.size

    def write(self, data) -> int:
        """Write as much of ``data`` as fits; return the bytes written."""
        n = lib.xmp_bytering_write(self._data, self.size, self._cons, self._prod,
                                   ffi.from_buffer(data), len(data))
        if n < 0:
            raise self._hostile()
        return n

    def read(self, max_bytes: int | None = None) -> bytes:
        """Read and consume up to ``max_bytes`` (default: all waiting)."""
        want = self.size if max_bytes is None else min(max_bytes, self.size)
        buf = bytearray(want)
        n = lib.xmp_bytering_read(self._data, self.size, self._cons, self._prod,
                                  ffi.from_buffer(buf), want)
        if n < 0:
            raise self._hostile()
        return bytes(buf[:n])

    def available(self) -> int:
        """Bytes waiting to be read."""
        n = (lib.xmp_load32(self._prod) - lib.xmp_load32(self._cons)) & 0xFFFFFFFF
        if n > self.size:
            raise self._hostile()
        return n

    def space(self) -> int:
        return self.size - self.available()

    def read_and_check_room(self, max_bytes: int | None = None) -> tuple[bytes, bool]:
        """Read, and say whether the writer may be waiting for room: the ring
        was full relative to where we started, measured *after* consuming
        (as Linux's xb_read), so a writer that filled it while we read is
        not missed."""
        old_cons = lib.xmp_load32(self._cons)
        data = self.read(max_bytes)
        was_full = ((lib.xmp_load32(self._prod) - old_cons) & 0xFFFFFFFF) >= self.size
        return data, bool(data) and was_full

    def _hostile(self) -> RemoteProtocolError:
        return RemoteProtocolError(f"{self.name}: indices claim more than {self.size} bytes in flight")

    def release(self) -> None:
        ffi.release(self._mem)


def console_rings(page) -> tuple[ByteRing, ByteRing]:
    """(in, out) of a xencons_interface page."""
    return ByteRing(page, CONSOLE_IN, "console in"), ByteRing(page, CONSOLE_OUT, "console out")


def xenstore_rings(page) -> tuple[ByteRing, ByteRing]:
    """(req, rsp) of a xenstore_domain_interface page."""
    return ByteRing(page, XENSTORE_REQ, "xenstore req"), ByteRing(page, XENSTORE_RSP, "xenstore rsp")
