"""blkif frontend ("vbd"): in a guest, over its own memory and event loop.

One ring page and a pool of data pages are taken from the guest's memory
once and kept across reconnections; at each setup they are granted
(writable) to the current backend.  The pool is one block of 11 pages per
ring slot, so every request in flight owns a block: data sits page-aligned
in it, each segment a whole page but the last.  ``read``/``write`` split
large I/O into 11-page requests and keep as many in flight as the ring
holds, waiting in the guest's event loop.

A request stays in ``inflight`` until its answer arrives.  When the
backend goes away, whatever is in flight is re-issued (with the new
grants) once the device is connected again: the guest sees neither an
error nor a lost write; a re-issued write writes the same bytes again.
"""

from __future__ import annotations

import struct
import time
import weakref
from collections import deque
from dataclasses import dataclass

from xmp.domain_proc.kernel import DEVICE_OPENERS
from xmp.drivers.blk import protocol
from xmp.drivers.blk.protocol import (
    BLKIF_MAX_SEGMENTS_PER_REQUEST,
    PAGE_SIZE,
    SECTOR_SIZE,
    VDISK_READONLY,
    BlkifOp,
    BlkifStatus,
    DiscardRequest,
    Request,
    Segment,
)
from xmp.drivers.xenbus.device import Bus, FrontendDriver, XenbusDevice, frontend_bus
from xmp.drivers.xenbus.state import XenbusState
from xmp.errors import LocalError, RemoteProtocolError, XmpError
from xmp.sharedmem.ring import FrontRing, ring_nr_ents

BLOCK_PAGES = BLKIF_MAX_SEGMENTS_PER_REQUEST           # one request's worth of pages
BLOCK_BYTES = BLOCK_PAGES * PAGE_SIZE
NR_SLOTS = ring_nr_ents(PAGE_SIZE, protocol.SLOT_SIZE)   # 32
_RSP = struct.Struct("<QBxh")


class BlockIOError(XmpError):
    """The backend answered a request with an error status."""

    def __init__(self, op: str, sector: int, status: int):
        self.op = op
        self.sector = sector
        self.status = status
        super().__init__(op, sector, status)

    def __str__(self) -> str:
        try:
            name = BlkifStatus(self.status).name
        except ValueError:
            name = str(self.status)
        return f"vbd {self.op} at sector {self.sector}: {name}"


@dataclass
class _Req:
    id: int
    op: BlkifOp
    sector: int
    nbytes: int = 0            # READ / WRITE: bytes in the block
    nr_sectors: int = 0        # DISCARD
    block: int | None = None   # READ / WRITE: the pool block holding the data
    status: int | None = None  # set when answered
    orphan: bool = False       # its caller gave up: free its block when answered


class BlkFront(FrontendDriver):
    devtype = "vbd"

    def __init__(self, kernel, nr_blocks: int = NR_SLOTS) -> None:
        self.k = kernel
        self.ring_pfn = kernel.alloc_pages(1)
        self.nr_blocks = nr_blocks
        self.pool_pfn = kernel.alloc_pages(nr_blocks * BLOCK_PAGES)
        self.free_blocks = list(range(nr_blocks))
        self.ring: FrontRing | None = None
        self.ring_gref: int | None = None
        self.pool_grefs: list[int] = []
        self.port: int | None = None
        self.dev: XenbusDevice | None = None
        self.bus: Bus | None = None
        self.is_connected = False
        self.connected_once = False
        self.inflight: dict[int, _Req] = {}
        self.next_id = 1
        self.handle = 0
        self.sectors = 0
        self.sector_size = SECTOR_SIZE
        self.size = 0
        self.info = 0
        self.readonly = False
        self.features: dict[str, int] = {}
        self.reissued = 0

    # -- xenbus ------------------------------------------------------------------

    def setup(self, dev: XenbusDevice) -> None:
        self.dev = dev
        self.k.grant_table.retry_deferred()
        vdev = dev.xs.read_or(f"{dev.nodename}/virtual-device")
        raw = vdev if vdev is not None and vdev.isdigit() else dev.nodename.rsplit("/", 1)[-1].encode()
        self.handle = int(raw) & 0xFFFF
        page = self.k.page(self.ring_pfn)
        page[:] = bytes(len(page))
        self.ring = FrontRing(page, protocol.REQUEST_SIZE, protocol.RESPONSE_SIZE)
        gt = self.k.grant_table
        self.ring_gref = gt.grant_foreign_access(dev.otherend_id, self.ring_pfn)
        self.pool_grefs = [gt.grant_foreign_access(dev.otherend_id, self.pool_pfn + i)
                           for i in range(self.nr_blocks * BLOCK_PAGES)]
        self.port = self.k.xen.alloc_unbound(dev.otherend_id)
        self.k.loop.bind(self.port, self._event)
        dev.write("ring-ref", self.ring_gref)
        dev.write("event-channel", self.port)
        dev.write("protocol", "x86_64-abi")
        dev.write("feature-persistent", 1)  # our data grants are a fixed pool, reused

    def connected(self, dev: XenbusDevice) -> None:
        def num(key: str, default: int | None = None) -> int:
            raw = dev.read_other(key)
            if raw is None:
                if default is None:
                    raise ValueError(f"vbd: the backend gave no {key}")
                return default
            if not raw.isdigit():
                raise ValueError(f"vbd: the backend's {key} is {raw!r}")
            return int(raw)

        self.sectors = num("sectors")
        self.sector_size = num("sector-size", SECTOR_SIZE)
        if self.sector_size != SECTOR_SIZE:
            raise ValueError(f"vbd: sector-size {self.sector_size} is not supported")
        self.info = num("info", 0)
        self.readonly = bool(self.info & VDISK_READONLY)
        self.size = self.sectors * self.sector_size
        self.features = {k: num(k, 0) for k in ("feature-flush-cache", "feature-discard",
                                                 "feature-barrier", "feature-persistent",
                                                 "feature-max-indirect-segments")}
        self.is_connected = self.connected_once = True
        if self.inflight:  # the backend went away under them: send them again
            waiting = [r for _, r in sorted(self.inflight.items()) if r.status is None]
            self.reissued += len(waiting)
            for r in waiting:
                self._put(r)
            self._push()

    def disconnect(self, dev: XenbusDevice) -> None:
        self.is_connected = False
        if self.port is not None:
            self.k.close_port(self.port)
            self.port = None
        if self.ring is not None:
            self.ring.release()
            self.ring = None
        for gref in [g for g in (self.ring_gref, *self.pool_grefs) if g is not None]:
            self.k.grant_table.end_foreign_access_later(gref)
        self.ring_gref = None
        self.pool_grefs = []

    # -- the ring ----------------------------------------------------------------

    def _event(self, _port: int) -> None:
        ring = self.ring
        if ring is None:
            return
        try:
            while True:
                rsps = ring.get_responses()
                for i in range(0, len(rsps), protocol.RESPONSE_SIZE):
                    rsp_id, _op, status = _RSP.unpack_from(rsps, i)
                    r = self.inflight.get(rsp_id)
                    if r is None or r.status is not None:
                        continue  # a late duplicate, or a backend's invention: dropped
                    r.status = status if status in (0, -1, -2) else int(BlkifStatus.ERROR)
                    del self.inflight[rsp_id]
                    if r.orphan:
                        self._release(r)
                if not ring.final_check_for_responses():
                    return
        except RemoteProtocolError as exc:  # a broken backend: close the device
            dev = self.dev
            if dev is not None:
                try:
                    dev.write("error", str(exc)[:200])
                except XmpError:
                    pass
                self.disconnect(dev)
                dev.switch(XenbusState.CLOSING)

    def _put(self, r: _Req) -> None:
        assert self.ring is not None
        if r.op == BlkifOp.DISCARD:
            msg = DiscardRequest(r.id, r.sector, r.nr_sectors, handle=self.handle).pack()
        else:
            segs: list[Segment] = []
            if r.block is not None:
                first = r.block * BLOCK_PAGES
                left = r.nbytes
                for i in range(-(-r.nbytes // PAGE_SIZE)):
                    n = min(left, PAGE_SIZE)
                    segs.append(Segment(self.pool_grefs[first + i], 0, n // SECTOR_SIZE - 1))
                    left -= n
            msg = Request(r.op, self.handle, r.id, r.sector, tuple(segs)).pack()
        self.ring.put_request(msg)

    def _push(self) -> None:
        if self.ring is not None and self.port is not None and self.ring.push_requests_and_check_notify():
            self.k.xen.notify(self.port)

    def _can_issue(self, needs_block: bool) -> bool:
        return (self.is_connected and self.ring is not None and len(self.inflight) < NR_SLOTS
                and self.ring.free_requests() > 0 and (not needs_block or bool(self.free_blocks)))

    def _block_view(self, block: int, nbytes: int) -> memoryview:
        start = (self.pool_pfn + block * BLOCK_PAGES) * PAGE_SIZE
        return memoryview(self.k.memory)[start:start + nbytes]

    def _release(self, r: _Req) -> None:
        if r.block is not None:
            self.free_blocks.append(r.block)
            r.block = None

    # -- I/O -----------------------------------------------------------------------

    def _run(self, work: list[tuple[BlkifOp, int, int, int, bytes | memoryview | None]],
             out: bytearray | None, timeout: float) -> None:
        """Issue ``work`` -- (op, sector, nbytes or nr_sectors, offset in
        data/out, data) -- keeping the ring full; wait for every answer;
        raise the first error once nothing of ours is in flight."""
        queue = deque(work)
        mine: list[_Req] = []
        offsets: dict[int, int] = {}
        error: BlockIOError | None = None
        deadline = time.monotonic() + timeout

        def ready() -> bool:  # one of ours answered, or room for the next
            return any(r.status is not None for r in mine) or (
                bool(queue) and error is None
                and self._can_issue(queue[0][0] in (BlkifOp.READ, BlkifOp.WRITE)))

        try:
            while queue or mine:
                issued = False
                while queue and error is None:
                    op, sector, amount, offset, data = queue[0]
                    data_op = op in (BlkifOp.READ, BlkifOp.WRITE)
                    if not self._can_issue(data_op):
                        break
                    queue.popleft()
                    r = _Req(self.next_id, op, sector)
                    self.next_id += 1
                    if data_op:
                        r.nbytes = amount
                        r.block = self.free_blocks.pop()
                        if data is not None:
                            self._block_view(r.block, amount)[:] = data
                    else:
                        r.nr_sectors = amount
                    offsets[r.id] = offset
                    self.inflight[r.id] = r
                    self._put(r)
                    mine.append(r)
                    issued = True
                if issued:
                    self._push()
                if error is not None:
                    queue.clear()
                if not mine and not queue:
                    break

                left = deadline - time.monotonic()
                if left <= 0 or not self.k.loop.run_until(ready, left):
                    raise TimeoutError(f"vbd: no answer within {timeout} s "
                                       f"({len(mine)} requests in flight)")
                for r in [r for r in mine if r.status is not None]:
                    mine.remove(r)
                    if r.status == BlkifStatus.OKAY and r.op == BlkifOp.READ and out is not None \
                            and r.block is not None:
                        off = offsets[r.id]
                        out[off:off + r.nbytes] = self._block_view(r.block, r.nbytes)
                    self._release(r)
                    if r.status != BlkifStatus.OKAY and error is None:
                        assert r.status is not None
                        error = BlockIOError(r.op.name.lower(), r.sector, r.status)
        finally:
            for r in mine:  # given up on (timeout): their blocks come back when answered
                r.orphan = True
        if error is not None:
            raise error

    def _check(self, sector: int, nbytes: int) -> None:
        if nbytes % SECTOR_SIZE:
            raise LocalError(f"vbd: {nbytes} bytes is not a whole number of {SECTOR_SIZE}-byte sectors")
        if sector < 0:
            raise LocalError(f"vbd: negative sector {sector}")

    def _chunks(self, op: BlkifOp, sector: int, nbytes: int, data: bytes | memoryview | None):
        work = []
        for off in range(0, nbytes, BLOCK_BYTES):
            n = min(BLOCK_BYTES, nbytes - off)
            work.append((op, sector + off // SECTOR_SIZE, n, off,
                         None if data is None else data[off:off + n]))
        return work

    def wait_connected(self, timeout: float = 10.0) -> None:
        if not self.k.loop.run_until(lambda: self.is_connected, timeout):
            raise TimeoutError("vbd: not connected")

    def read(self, sector: int, count: int, timeout: float = 30.0) -> bytes:
        """``count`` sectors from ``sector``."""
        nbytes = count * SECTOR_SIZE
        self._check(sector, nbytes)
        out = bytearray(nbytes)
        self._run(self._chunks(BlkifOp.READ, sector, nbytes, None), out, timeout)
        return bytes(out)

    def write(self, sector: int, data: bytes | bytearray | memoryview, timeout: float = 30.0) -> None:
        """``data`` (whole sectors) to the disk from ``sector``; returns once
        the backend has written every byte (durable after :meth:`flush`)."""
        view = memoryview(data).cast("B")
        self._check(sector, len(view))
        self._run(self._chunks(BlkifOp.WRITE, sector, len(view), view), None, timeout)

    def flush(self, timeout: float = 30.0) -> None:
        """BLKIF_OP_FLUSH_DISKCACHE: everything answered so far is durable."""
        self._run([(BlkifOp.FLUSH_DISKCACHE, 0, 0, 0, None)], None, timeout)

    def discard(self, sector: int, count: int, timeout: float = 30.0) -> None:
        """BLKIF_OP_DISCARD: the sectors read as zeros afterwards."""
        self._check(sector, count * SECTOR_SIZE)
        self._run([(BlkifOp.DISCARD, sector, count, 0, None)], None, timeout)


_buses: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def attach(kernel, devid: int, timeout: float = 30.0) -> BlkFront:
    """Start the vbd frontend bus and return device ``devid``'s driver once
    the toolstack has created it and it is connected."""
    bus = _buses.get(kernel)
    if bus is None:  # one bus per guest, whatever number of disks it attaches
        bus = _buses[kernel] = frontend_bus(kernel.xenstore, "vbd", lambda: BlkFront(kernel))
    node = f"device/vbd/{devid}"

    def ready() -> bool:
        dev = bus.devices.get(node)
        return dev is not None and isinstance(dev.driver, BlkFront) and dev.driver.is_connected

    if not kernel.loop.run_until(ready, timeout):
        raise TimeoutError(f"vbd {devid}: no connected device/vbd/{devid}")
    front = bus.devices[node].driver
    assert isinstance(front, BlkFront)
    front.bus = bus
    return front


DEVICE_OPENERS["vbd"] = attach  # kernel.block(vdev) opens a disk through attach
