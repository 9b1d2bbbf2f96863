"""The xenstore wire protocol (xen/include/public/io/xs_wire.h).

Every message, in either direction, is a 16-byte header followed by
``len`` bytes of payload::

    offset 0   u32 type     XsType
    offset 4   u32 req_id   echoed in the reply
    offset 8   u32 tx_id    transaction id, 0 outside a transaction
    offset 12  u32 len      payload length, at most XENSTORE_PAYLOAD_MAX
    offset 16  payload      usually NUL-terminated strings

All fields are little-endian (the native order of every Xen guest we run).
A peer that announces ``len > XENSTORE_PAYLOAD_MAX`` is broken or hostile:
C xenstored drops the connection (docs/misc/xenstore.txt), and so does the
caller of :class:`PacketParser` when it raises :class:`WireError`.

Errors travel as errno *names* ("ENOENT\\0"), the ones listed in
``xsd_errors``; success without data is "OK\\0".

This module is sans-I/O: bytes in, :class:`Packet` objects out.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from xmp.errors import RemoteProtocolError

__all__ = [
    "HEADER_SIZE",
    "XENSTORE_ABS_PATH_MAX",
    "XENSTORE_PAYLOAD_MAX",
    "XENSTORE_REL_PATH_MAX",
    "XSD_ERRORS",
    "Packet",
    "PacketParser",
    "WireError",
    "XsType",
    "decode_str",
    "encode_str",
    "error_packet",
    "ok_packet",
    "watch_event",
]


class XsType(enum.IntEnum):
    """enum xsd_sockmsg_type.  20 was XS_RESTRICT, since removed."""

    CONTROL = 0  # formerly XS_DEBUG
    DIRECTORY = 1
    READ = 2
    GET_PERMS = 3
    WATCH = 4
    UNWATCH = 5
    TRANSACTION_START = 6
    TRANSACTION_END = 7
    INTRODUCE = 8
    RELEASE = 9
    GET_DOMAIN_PATH = 10
    WRITE = 11
    MKDIR = 12
    RM = 13
    SET_PERMS = 14
    WATCH_EVENT = 15
    ERROR = 16
    IS_DOMAIN_INTRODUCED = 17
    RESUME = 18
    SET_TARGET = 19
    RESET_WATCHES = 21
    DIRECTORY_PART = 22
    GET_FEATURE = 23
    SET_FEATURE = 24
    GET_QUOTA = 25
    SET_QUOTA = 26


HEADER_SIZE = 16
XENSTORE_PAYLOAD_MAX = 4096
XENSTORE_ABS_PATH_MAX = 3072
XENSTORE_REL_PATH_MAX = 2048

# The errno names a reply may carry (xsd_errors in xs_wire.h).  C xenstored
# turns any other errno into EINVAL before it reaches the wire.
XSD_ERRORS = (
    "EINVAL", "EACCES", "EEXIST", "EISDIR", "ENOENT", "ENOMEM", "ENOSPC", "EIO",
    "ENOTEMPTY", "ENOSYS", "EROFS", "EBUSY", "EAGAIN", "EISCONN", "E2BIG",
)

_HEADER = struct.Struct("<IIII")


class WireError(RemoteProtocolError):
    """The peer broke the framing (e.g. an oversized length): close it."""


@dataclass(frozen=True)
class Packet:
    """One xsd_sockmsg header plus its payload."""

    type: int
    req_id: int
    tx_id: int
    payload: bytes

    def encode(self) -> bytes:
        return _HEADER.pack(self.type, self.req_id, self.tx_id, len(self.payload)) + self.payload


class PacketParser:
    """Incremental framing: feed any split of the byte stream, get packets.

    The length is checked as soon as the header is complete, before any
    payload is buffered, so a hostile peer cannot make us hold more than
    HEADER_SIZE + XENSTORE_PAYLOAD_MAX bytes of one message.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._header: tuple[int, int, int, int] | None = None

    def feed(self, data: bytes) -> list[Packet]:
        self._buf += data
        packets: list[Packet] = []
        while True:
            if self._header is None:
                if len(self._buf) < HEADER_SIZE:
                    break
                header = _HEADER.unpack_from(self._buf)
                if header[3] > XENSTORE_PAYLOAD_MAX:
                    raise WireError(f"xenstore payload length {header[3]} > {XENSTORE_PAYLOAD_MAX}")
                del self._buf[:HEADER_SIZE]
                self._header = header
            mtype, req_id, tx_id, length = self._header
            if len(self._buf) < length:
                break
            payload = bytes(self._buf[:length])
            del self._buf[:length]
            self._header = None
            packets.append(Packet(mtype, req_id, tx_id, payload))
        return packets

    @property
    def pending(self) -> int:
        """Bytes received but not yet part of a whole packet."""
        return len(self._buf) + (HEADER_SIZE if self._header is not None else 0)


def error_packet(req: Packet, errno_name: str) -> Packet:
    """An ERROR reply: only req_id and tx_id are copied from the request."""
    return Packet(XsType.ERROR, req.req_id, req.tx_id, errno_name.encode("ascii") + b"\0")


def ok_packet(req: Packet) -> Packet:
    return Packet(req.type, req.req_id, req.tx_id, b"OK\0")


def watch_event(path: str, token: str) -> Packet:
    """An unsolicited WATCH_EVENT: req_id and tx_id are both 0."""
    return Packet(XsType.WATCH_EVENT, 0, 0, encode_str(path) + b"\0" + encode_str(token) + b"\0")


def decode_str(raw: bytes) -> str:
    """Bytes of the wire to str, losslessly (tokens may be any non-NUL bytes)."""
    return raw.decode("utf-8", "surrogateescape")


def encode_str(text: str) -> bytes:
    """Inverse of :func:`decode_str`."""
    return text.encode("utf-8", "surrogateescape")
