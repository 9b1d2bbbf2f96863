"""Xen's ``io/ring.h`` request/response rings over any writable buffer.

Layout (``xen/include/public/io/ring.h``, DEFINE_RING_TYPES)::

    0   u32 req_prod     written by the front, read by the back
    4   u32 req_event    written by the back: "notify me when req_prod passes this"
    8   u32 rsp_prod     written by the back
    12  u32 rsp_event    written by the front
    16  u8  pvt[4]       per-protocol private union (netif smartpoll_active)
    20  u8  pad[44]
    64  slot[nr_ents]    union { request; response }, slot_size bytes each

``nr_ents`` is the number of slots that fit, rounded down to a power of two
(``__RD32``); a ring of ``ring-page-order`` k spans ``4096 << k`` bytes.
Indices are free-running u32 and wrap modulo 2**32.  Each side keeps
private indices -- front ``req_prod_pvt``/``rsp_cons``, back
``rsp_prod_pvt``/``req_cons`` -- and publishes with push-and-check-notify,
which tells the caller whether to kick the event channel: the ring never
notifies anyone itself (the event channel is the caller's business).

Theory of operation.  Every shared index, barrier and slot copy happens in
``fast.c`` (GIL released): Python could neither fence nor be sure to load a
32-bit word in one access.  A consumer copies each slot once into private
memory before anything looks at it, so a hostile peer rewriting a slot
cannot make us see two different values; and a producer index claiming more
than a ring's worth raises :class:`RemoteProtocolError` instead of looping.
The back ring is the front ring with input and output swapped.
"""

from __future__ import annotations

from xmp.errors import LocalError, RemoteProtocolError, RingFull
from xmp.sharedmem._ffi import ffi, lib
from xmp.sharedmem.page import PAGE_SIZE

HEADER_SIZE = 64
# Header field offsets, as in struct <name>_sring.
REQ_PROD, REQ_EVENT, RSP_PROD, RSP_EVENT, PVT = 0, 4, 8, 12, 16


def ring_nr_ents(nbytes: int, slot_size: int) -> int:
    """__RING_SIZE: slots that fit after the header, rounded down to 2**k."""
    if slot_size <= 0:
        raise LocalError(f"slot size {slot_size} must be positive")
    fit = (nbytes - HEADER_SIZE) // slot_size
    if fit < 1:
        raise LocalError(f"a {nbytes}-byte ring has no room for one {slot_size}-byte slot")
    return 1 << (fit.bit_length() - 1)


def ring_bytes(ring_page_order: int = 0) -> int:
    """Bytes of a ring of ``ring-page-order`` k."""
    if not 0 <= ring_page_order <= 8:
        raise LocalError(f"ring-page-order {ring_page_order} outside 0..8")
    return PAGE_SIZE << ring_page_order


class _Ring:
    _back = 0

    def __init__(self, buf, out_size: int, in_size: int):
        self._mem = ffi.from_buffer("uint8_t[]", buf, require_writable=True)
        if int(ffi.cast("uintptr_t", self._mem)) % 8:
            raise LocalError("ring memory must be 8-byte aligned")
        self.out_size = out_size
        self.in_size = in_size
        slot = max(out_size, in_size)
        self.nr_ents = ring_nr_ents(len(self._mem), slot)
        self._r = ffi.new("xmp_ring_t *", {
            "sring": self._mem, "nr_ents": self.nr_ents, "slot_size": slot, "back": self._back,
        })
        self._scratch = ffi.new("uint8_t[]", self.nr_ents * in_size)

    # -- the generic operations, named per side by the subclasses --------

    def _put(self, data) -> int:
        n, rem = divmod(len(data), self.out_size)
        if rem:
            raise LocalError(f"{len(data)} bytes is not a whole number of {self.out_size}-byte messages")
        return lib.xmp_ring_put(self._r, ffi.from_buffer(data), n, self.out_size)

    def _put_one(self, msg) -> None:
        if len(msg) > self.out_size:
            raise LocalError(f"message of {len(msg)} bytes exceeds the {self.out_size}-byte slot")
        if len(msg) < self.out_size:
            msg = bytes(msg).ljust(self.out_size, b"\0")
        if lib.xmp_ring_put(self._r, ffi.from_buffer(msg), 1, self.out_size) != 1:
            raise RingFull(f"ring full ({self.nr_ents} slots)")

    def _unconsumed(self) -> int:
        n = lib.xmp_ring_unconsumed(self._r)
        if n < 0:
            raise self._overflow()
        return n

    def _get(self, max_msgs: int | None) -> bytes:
        limit = self.nr_ents if max_msgs is None else min(max_msgs, self.nr_ents)
        n = lib.xmp_ring_get(self._r, self._scratch, limit, self.in_size)
        if n < 0:
            raise self._overflow()
        return ffi.buffer(self._scratch, n * self.in_size)[:]

    def _get_into(self, dst, max_msgs: int | None) -> int:
        cap = len(dst) // self.in_size
        limit = cap if max_msgs is None else min(max_msgs, cap)
        n = lib.xmp_ring_get(self._r, ffi.from_buffer(dst, require_writable=True), limit, self.in_size)
        if n < 0:
            raise self._overflow()
        return n

    def _final_check(self) -> bool:
        n = lib.xmp_ring_final_check(self._r)
        if n < 0:
            raise self._overflow()
        return n > 0

    def _overflow(self) -> RemoteProtocolError:
        side = "frontend" if self._back else "backend"
        return RemoteProtocolError(
            f"bad {side}: its producer index claims more than the ring's {self.nr_ents} slots")

    def shared_index(self, offset: int) -> int:
        """Read one shared header index (REQ_PROD, …) in a single atomic load."""
        return lib.xmp_load32(ffi.cast("uint32_t *", self._mem + offset))

    def release(self) -> None:
        """Let go of the buffer (so an mmap under it can be closed)."""
        ffi.release(self._mem)


class FrontRing(_Ring):
    """The frontend's view: produces requests, consumes responses.

    ``init=True`` (SHARED_RING_INIT + FRONT_RING_INIT) resets the shared
    header; a front re-attaching to a live ring passes ``init=False`` and
    resumes from the published indices.
    """

    _back = 0

    def __init__(self, buf, req_size: int, rsp_size: int, *, init: bool = True):
        super().__init__(buf, req_size, rsp_size)
        if init:
            lib.xmp_ring_init_shared(self._mem)
        else:
            self._r.prod_pvt = self.shared_index(REQ_PROD)
            self._r.cons = self.shared_index(RSP_PROD)

    @property
    def req_prod_pvt(self) -> int:
        return self._r.prod_pvt

    @property
    def rsp_cons(self) -> int:
        return self._r.cons

    def free_requests(self) -> int:
        return lib.xmp_ring_free(self._r)

    def put_request(self, msg) -> None:
        """Queue one request (padded to the request size); RingFull if none free."""
        self._put_one(msg)

    def put_requests(self, data) -> int:
        """Queue as many whole requests from ``data`` as fit; return that count."""
        return self._put(data)

    def push_requests_and_check_notify(self) -> bool:
        return bool(lib.xmp_ring_push(self._r))

    def unconsumed_responses(self) -> int:
        return self._unconsumed()

    def get_responses(self, max_msgs: int | None = None) -> bytes:
        """Copy out and consume up to ``max_msgs`` responses, packed."""
        return self._get(max_msgs)

    def get_responses_into(self, dst, max_msgs: int | None = None) -> int:
        return self._get_into(dst, max_msgs)

    def get_response(self) -> bytes | None:
        data = self._get(1)
        return data or None

    def final_check_for_responses(self) -> bool:
        """True if responses are waiting; otherwise arms rsp_event so the
        next response notifies us."""
        return self._final_check()

    def set_rsp_event(self, value: int) -> None:
        lib.xmp_ring_set_event(self._r, value & 0xFFFFFFFF)


class BackRing(_Ring):
    """The backend's view: consumes requests, produces responses.  Never
    initialises the shared header (only the front does)."""

    _back = 1

    def __init__(self, buf, req_size: int, rsp_size: int, *, resume: bool = False):
        super().__init__(buf, rsp_size, req_size)
        if resume:
            # A backend taking over a live ring: responses already published
            # mark both where requests were consumed and where we answer.
            self._r.prod_pvt = self._r.cons = self.shared_index(RSP_PROD)

    @property
    def rsp_prod_pvt(self) -> int:
        return self._r.prod_pvt

    @property
    def req_cons(self) -> int:
        return self._r.cons

    def unconsumed_requests(self) -> int:
        return self._unconsumed()

    def get_requests(self, max_msgs: int | None = None) -> bytes:
        """Copy out and consume up to ``max_msgs`` requests, packed."""
        return self._get(max_msgs)

    def get_requests_into(self, dst, max_msgs: int | None = None) -> int:
        return self._get_into(dst, max_msgs)

    def get_request(self) -> bytes | None:
        data = self._get(1)
        return data or None

    def pending_responses(self) -> int:
        """Requests consumed but not yet answered (room for responses)."""
        return lib.xmp_ring_free(self._r)

    def put_response(self, msg) -> None:
        self._put_one(msg)

    def put_responses(self, data) -> int:
        return self._put(data)

    def push_responses_and_check_notify(self) -> bool:
        return bool(lib.xmp_ring_push(self._r))

    def final_check_for_requests(self) -> bool:
        return self._final_check()

    def set_req_event(self, value: int) -> None:
        lib.xmp_ring_set_event(self._r, value & 0xFFFFFFFF)
