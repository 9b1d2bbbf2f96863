"""The guest's side of an emulated access: what Xen's vCPU exit path does
when an HVM guest's ``in``/``out`` or MMIO access traps.

The access is routed by the ranges the device model claimed (the ioreq
server's range page): unclaimed, it completes at once as on Xen when no
ioreq server takes it -- a read gets all ones, a write is dropped.  A
write to a range the device model takes buffered goes on the buffered
iopage (no wait); anything else fills this vCPU's ``ioreq_t`` slot, rings
its ``vp_eport`` and waits, serving events, until the device model has
answered (STATE_IORESP_READY).  A guest whose device model dies waits
here until the hypervisor crashes it, as a Xen vCPU blocked on an ioreq.
"""

from __future__ import annotations

from typing import Any

from xmp.errors import HypercallError, LocalError
from xmp.hv.hvm import RANGE_BUFFERED, XEN_DMOP_IO_RANGE_MEMORY, XEN_DMOP_IO_RANGE_PORT, read_ranges
from xmp.hvm.ioreq import (
    IOREQ_READ,
    IOREQ_TYPE_COPY,
    IOREQ_TYPE_PIO,
    IOREQ_WRITE,
    SIZES,
    BufferedIoPage,
    IoreqSlot,
    IoreqState,
    ones,
)
from xmp.sharedmem.shm import PAGE_SIZE, ShmObject


class IoTrap:
    def __init__(self, kernel: Any):
        self.k = kernel
        self.attached = False
        self.absent = False   # no ioreq server (PV, PVH, or an HVM guest without one)
        self.ranges: list[tuple[int, int, int, int]] = []
        self.round_trips = 0
        self.buffered = 0

    def _attach(self) -> None:
        self.attached = True
        try:
            info, fds = self.k.xen.ch.call_with_fds("hvm_op", "ioreq_page")
        except HypercallError:
            self.absent = True
            return
        self.obj = ShmObject.from_fd(fds[0])
        self.map = self.obj.map()
        self.slot = IoreqSlot(self.map, self.k.loop.vcpu)
        self.port = self.slot.vp_eport
        self.buf_port = info["bufioreq_port"]
        self.bufpage = BufferedIoPage(memoryview(self.map)[PAGE_SIZE:2 * PAGE_SIZE])
        self.k.loop.bind(self.port, _ignore)
        self.ranges = read_ranges(self.map)

    def _claim(self, kind: int, addr: int) -> tuple[int, int, int, int] | None:
        rtype = XEN_DMOP_IO_RANGE_PORT if kind == IOREQ_TYPE_PIO else XEN_DMOP_IO_RANGE_MEMORY
        for _ in range(2):
            for r in self.ranges:
                if r[0] == rtype and r[2] <= addr <= r[3]:
                    return r
            self.ranges = read_ranges(self.map)  # claimed since we last looked?
        return None

    def access(self, kind: int, addr: int, size: int, direction: int, data: int = 0) -> int:
        if size not in SIZES:
            raise LocalError(f"an access of {size} bytes: x86 has 1, 2, 4 and 8")
        if not self.attached:
            self._attach()
        claim = None if self.absent else self._claim(kind, addr)
        if claim is None:
            return ones(size) if direction == IOREQ_READ else 0
        if direction == IOREQ_WRITE and claim[1] & RANGE_BUFFERED \
                and self.bufpage.push(addr, size, data, kind):
            self.buffered += 1
            self.k.xen.notify(self.buf_port)
            return 0
        slot = self.slot
        slot.send(addr, size, direction, data, kind)
        self.k.xen.notify(self.port)
        self.k.loop.run_until(lambda: slot.state == IoreqState.IORESP_READY)
        self.round_trips += 1
        value = slot.finish()
        return value & ones(size) if direction == IOREQ_READ else 0

    def pio(self, port: int, size: int, value: int | None = None) -> int:
        if value is None:
            return self.access(IOREQ_TYPE_PIO, port, size, IOREQ_READ)
        return self.access(IOREQ_TYPE_PIO, port, size, IOREQ_WRITE, value)

    def mmio(self, addr: int, size: int, value: int | None = None) -> int:
        if value is None:
            return self.access(IOREQ_TYPE_COPY, addr, size, IOREQ_READ)
        return self.access(IOREQ_TYPE_COPY, addr, size, IOREQ_WRITE, value)


def _ignore(_port: int) -> None:
    """The answer is read from the slot; the event only wakes the vCPU."""
