"""Xen's ioreq mechanism as a pure core over buffers
(xen/include/public/hvm/ioreq.h).

Theory of operation.  An HVM guest's port or MMIO access traps; the trap
handler (here the guest kernel's access call, which stands for Xen's vCPU
exit path) writes an ``ioreq_t`` into the vCPU's slot of the shared ioreq
page and notifies the device model on the slot's event channel
(``vp_eport``); the device model emulates and answers in the same slot;
the vCPU resumes.  Each slot's ``state`` moves only along::

    STATE_IOREQ_NONE --send--> STATE_IOREQ_READY --take--> STATE_IOREQ_INPROCESS
          ^                                                       |
          +------finish------ STATE_IORESP_READY <----complete----+

``send`` and ``finish`` are the vCPU's (Xen's) side, ``take`` and
``complete`` the device model's.  Writes that need no answer may instead go
through the buffered ioreq page, a ring of 8-byte ``buf_ioreq_t`` the
device model drains before each synchronous request (so order is kept).

Layouts (little-endian, x86)::

    ioreq_t, 32 bytes:   u64 addr, u64 data, u32 count, u32 size, u32 vp_eport,
                         u16 pad, u8 {state:4, data_is_ptr:1, dir:1, df:1, pad:1}, u8 type
    buffered_iopage:     u32 read_pointer, u32 write_pointer, buf_ioreq_t[511]
    buf_ioreq_t, 8 bytes: u32 {type:8, pad:1, dir:1, size:2 (0:1 1:2 2:4 3:8), addr:20}, u32 data
                         (an 8-byte write takes two slots: the high half follows)
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from xmp.errors import LocalError, RemoteProtocolError

IOREQ_READ = 1
IOREQ_WRITE = 0
IOREQ_TYPE_PIO = 0
IOREQ_TYPE_COPY = 1          # MMIO
IOREQ_TYPE_PCI_CONFIG = 2
IOREQ_TYPE_TIMEOFFSET = 7
IOREQ_TYPE_INVALIDATE = 8
IOREQ_BUFFER_SLOT_NUM = 511
IOREQ_SIZE = 32
SIZES = (1, 2, 4, 8)


class IoreqState(enum.IntEnum):
    NONE = 0          # STATE_IOREQ_NONE
    READY = 1         # STATE_IOREQ_READY
    INPROCESS = 2     # STATE_IOREQ_INPROCESS
    IORESP_READY = 3  # STATE_IORESP_READY


# (operation, side) -> (state before, state after); nothing else moves a slot.
TRANSITIONS: dict[str, tuple[IoreqState, IoreqState]] = {
    "send": (IoreqState.NONE, IoreqState.READY),             # vCPU
    "take": (IoreqState.READY, IoreqState.INPROCESS),        # device model
    "complete": (IoreqState.INPROCESS, IoreqState.IORESP_READY),  # device model
    "finish": (IoreqState.IORESP_READY, IoreqState.NONE),    # vCPU
}

_IOREQ = struct.Struct("<QQIIIHBB")
_STATE_OFF = 30
_PTRS = struct.Struct("<II")
_BUF = struct.Struct("<II")


@dataclass(frozen=True)
class Ioreq:
    addr: int
    data: int
    count: int
    size: int
    vp_eport: int
    state: int
    data_is_ptr: bool
    dir: int
    df: bool
    type: int

    def valid(self) -> str | None:
        """Why a device model cannot serve this request as hardware would
        (None: it can).  The guest wrote it: anything is possible."""
        if self.size not in SIZES:
            return f"size {self.size}"
        if self.type not in (IOREQ_TYPE_PIO, IOREQ_TYPE_COPY):
            return f"type {self.type}"
        if self.data_is_ptr:
            return "data_is_ptr (the device model maps no guest memory)"
        if self.count != 1:
            return f"count {self.count}"
        if self.type == IOREQ_TYPE_PIO and self.addr > 0xFFFF:
            return f"port {self.addr:#x}"
        return None


def unpack_ioreq(buf, offset: int = 0) -> Ioreq:
    addr, data, count, size, eport, _pad, bits, kind = _IOREQ.unpack_from(buf, offset)
    return Ioreq(addr, data, count, size, eport, bits & 0xF, bool(bits & 0x10), (bits >> 5) & 1,
                 bool(bits & 0x40), kind)


def pack_ioreq(buf, offset: int, req: Ioreq) -> None:
    bits = (req.state & 0xF) | (int(req.data_is_ptr) << 4) | ((req.dir & 1) << 5) | (int(req.df) << 6)
    _IOREQ.pack_into(buf, offset, req.addr, req.data & (1 << 64) - 1, req.count, req.size, req.vp_eport,
                     0, bits, req.type)


def ones(size: int) -> int:
    """What a read nothing answers returns: all bits set, as an open bus."""
    return (1 << (8 * min(max(size, 1), 8))) - 1


class IoreqSlot:
    """One vCPU's slot of the shared ioreq page (``vcpu_ioreq[vcpu]``).
    Each side moves the state only as :data:`TRANSITIONS` allows; a move
    from any other state is the caller's misuse (LocalError) when it is our
    own state we lost track of, and never happens on a peer's say-so."""

    def __init__(self, page, vcpu: int):
        self.buf = page
        self.off = vcpu * IOREQ_SIZE

    @property
    def state(self) -> int:
        return self.buf[self.off + _STATE_OFF] & 0xF

    def _move(self, op: str) -> None:
        before, after = TRANSITIONS[op]
        st = self.state
        if st != before:
            raise LocalError(f"ioreq {op}: slot is in state {st}, not {before.name}")
        b = self.buf[self.off + _STATE_OFF]
        self.buf[self.off + _STATE_OFF] = (b & 0xF0) | after

    def read(self) -> Ioreq:
        return unpack_ioreq(self.buf, self.off)

    @property
    def vp_eport(self) -> int:
        return int.from_bytes(self.buf[self.off + 24:self.off + 28], "little")

    # -- the vCPU's side ----------------------------------------------------

    def send(self, addr: int, size: int, direction: int, data: int = 0,
             kind: int = IOREQ_TYPE_PIO) -> None:
        """Fill the slot and hand it over (READY is written last)."""
        if self.state != IoreqState.NONE:
            raise LocalError(f"ioreq send: slot is in state {self.state}, not NONE")
        pack_ioreq(self.buf, self.off, Ioreq(addr, data, 1, size, self.vp_eport, IoreqState.NONE,
                                             False, direction, False, kind))
        self._move("send")

    def finish(self) -> int:
        """Take the answer (the data of a read) and free the slot."""
        data = self.read().data
        self._move("finish")
        return data

    # -- the device model's side --------------------------------------------

    def take(self) -> Ioreq | None:
        """The request, if one is READY (then INPROCESS), else None."""
        if self.state != IoreqState.READY:
            return None
        req = self.read()
        self._move("take")
        return req

    def complete(self, data: int | None = None) -> None:
        """Answer: a read's data (write requests keep theirs), IORESP_READY."""
        if self.state != IoreqState.INPROCESS:
            raise LocalError(f"ioreq complete: slot is in state {self.state}, not INPROCESS")
        if data is not None:
            struct.pack_into("<Q", self.buf, self.off + 8, data & (1 << 64) - 1)
        self._move("complete")


# -- the buffered ioreq page --------------------------------------------------

_SIZE_CODE = {1: 0, 2: 1, 4: 2, 8: 3}


@dataclass(frozen=True)
class BufIoreq:
    type: int
    dir: int
    size: int
    addr: int
    data: int


class BufferedIoPage:
    """``buffered_iopage``: the producer is the vCPU's side (writes only),
    the consumer the device model."""

    def __init__(self, page):
        self.buf = page

    def _pointers(self) -> tuple[int, int]:
        return _PTRS.unpack_from(self.buf, 0)

    def push(self, addr: int, size: int, data: int, kind: int = IOREQ_TYPE_PIO) -> bool:
        """Queue a write; False when it does not fit (Xen then sends it
        synchronously) or cannot be buffered (addr past 20 bits)."""
        if size not in _SIZE_CODE or not 0 <= addr < 1 << 20:
            return False
        rd, wr = self._pointers()
        slots = 2 if size == 8 else 1
        pending = (wr - rd) % (1 << 32)
        if pending + slots > IOREQ_BUFFER_SLOT_NUM:
            return False
        # 2**32 is no multiple of the 511 slots: past the pointers' wrap the slot
        # index restarts at 0 and would land on writes still queued before it.
        # Xen canonicalises both pointers with a cmpxchg; here the write goes
        # synchronously instead (which drains this ring first) unless it is empty.
        if pending and rd + pending + slots > 1 << 32:
            return False
        word = (kind & 0xFF) | (IOREQ_WRITE << 9) | (_SIZE_CODE[size] << 10) | (addr << 12)
        _BUF.pack_into(self.buf, 8 + (wr % IOREQ_BUFFER_SLOT_NUM) * 8, word, data & 0xFFFFFFFF)
        if slots == 2:  # the slot the consumer reads next: of the wrapped pointer
            high = ((wr + 1) % (1 << 32)) % IOREQ_BUFFER_SLOT_NUM
            _BUF.pack_into(self.buf, 8 + high * 8, word, data >> 32)
        struct.pack_into("<I", self.buf, 4, (wr + slots) % (1 << 32))  # published last
        return True

    def pop_all(self) -> list[BufIoreq]:
        """Every queued write, in order.  Pointers the guest scribbled
        (more queued than the ring holds) are a remote fault: the queue is
        dropped and the error says so."""
        rd, wr = self._pointers()
        pending = (wr - rd) % (1 << 32)
        if pending > IOREQ_BUFFER_SLOT_NUM:
            struct.pack_into("<I", self.buf, 0, wr)
            raise RemoteProtocolError(f"buffered ioreq page: {pending} pending exceeds the "
                                      f"{IOREQ_BUFFER_SLOT_NUM} slots")
        out: list[BufIoreq] = []
        while rd != wr:
            word, data = _BUF.unpack_from(self.buf, 8 + (rd % IOREQ_BUFFER_SLOT_NUM) * 8)
            size = 1 << ((word >> 10) & 3)
            rd = (rd + 1) % (1 << 32)
            if size == 8:
                if rd == wr:
                    break  # the high half never came: dropped, as a torn write
                _w2, high = _BUF.unpack_from(self.buf, 8 + (rd % IOREQ_BUFFER_SLOT_NUM) * 8)
                data |= high << 32
                rd = (rd + 1) % (1 << 32)
            out.append(BufIoreq(word & 0xFF, (word >> 9) & 1, size, word >> 12, data))
        struct.pack_into("<I", self.buf, 0, rd)
        return out
