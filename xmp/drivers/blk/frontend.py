"""blkif frontend ("vbd"): in a guest, over its own memory and event loop.

What the frontend uses is negotiated with the backend's keys, capped by
the guest's own settings (:func:`configure`, Linux's blkfront module
parameters): ``num_queues`` rings (``multi-queue-num-queues``), each of
``2**ring_page_order`` pages (``ring-page-order``), requests of up to
``max_indirect_segments`` pages through indirect pages
(``feature-max-indirect-segments``; otherwise 11 segments, 44 KiB), and
``persistent`` grants (``feature-persistent``).

Data goes through a pool of ``pool_pages`` pages taken from the guest's
memory once and kept across reconnections; each request owns a run of
consecutive pool pages (first fit), its data page-aligned in it.  With
persistent grants the pool (and the indirect pages) is granted once per
connection and the backend keeps it mapped; without, each request grants
its pages (read-only for a WRITE) and ends the grants when answered.

I/O is asynchronous underneath: :meth:`BlkFront.submit_read` and friends
split an operation into ring requests and return a :class:`BlkIO` at once;
requests wait in ``pending`` (FIFO) until a ring slot, pool pages and, if
needed, an indirect page are free, so a caller may keep as many in flight
as the rings hold.  ``read``/``write``/``flush``/``discard`` submit and
wait.  A request stays in ``inflight`` until its answer arrives; when the
backend goes away, whatever is in flight is re-issued (with the new
grants, split again if the new backend takes smaller requests) once the
device is connected again: the guest sees neither an error nor a lost
write, and a re-issued write writes the same bytes again.  A FLUSH covers
the writes answered before it was issued, as Xen's.

Moved (save / restore, migration), the frontend is opened afresh on the new
host, but what was on its rings is not lost: at the suspend it hands the
kernel its shadow -- each write, discard and flush in flight, a write's
data where it lies in the pool, in the guest's RAM -- and the restored
frontend issues those again before anything new (Linux's blkif_recover).
"""

from __future__ import annotations

import json
import struct
import weakref
from collections import deque
from dataclasses import dataclass, field

from xmp.drivers.blk import protocol
from xmp.drivers.blk.protocol import (
    BLKIF_MAX_SEGMENTS_PER_REQUEST,
    PAGE_SIZE,
    SECTOR_SIZE,
    SECTORS_PER_PAGE,
    VDISK_READONLY,
    BlkifOp,
    BlkifStatus,
    DiscardRequest,
    IndirectRequest,
)
from xmp.drivers.blk.requests import BlkIO, BlockIOError, Extents, Part
from xmp.drivers.blk.spec import vdev_devid
from xmp.drivers.xenbus.device import Bus, FrontendDriver, XenbusDevice, attach_frontend
from xmp.drivers.xenbus.state import XenbusState
from xmp.errors import LocalError, RemoteProtocolError, XmpError
from xmp.sharedmem.ring import FrontRing

_RSP = struct.Struct("<QBxh")
_RING_KEYS = {"event-channel", "multi-queue-num-queues", "ring-page-order"}
_HEAD = struct.Struct("<BBH4xQQ")
_SEG = struct.Struct("<IBB2x")

DEFAULTS = {"persistent": True, "max_indirect_segments": 256, "num_queues": 1,
            "ring_page_order": 0, "pool_pages": 1024}
_options: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def configure(kernel, **options: int | bool) -> None:
    """Set this guest's blkfront parameters for the disks it attaches from
    now on (as Linux's xen_blkfront module parameters): ``persistent``,
    ``max_indirect_segments`` (0 or 12..256: larger requests),
    ``num_queues`` (1..4), ``ring_page_order`` (0..4), ``pool_pages``."""
    unknown = set(options) - set(DEFAULTS)
    if unknown:
        raise LocalError(f"blkfront: unknown option(s) {sorted(unknown)}; known: {sorted(DEFAULTS)}")
    merged = {**DEFAULTS, **_options.get(kernel, {}), **options}
    limits = {"max_indirect_segments": (0, 256), "num_queues": (1, 4), "ring_page_order": (0, 4),
              "pool_pages": (BLKIF_MAX_SEGMENTS_PER_REQUEST, 1 << 20)}
    for key, (lo, hi) in limits.items():
        value = merged[key]
        if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
            raise LocalError(f"blkfront: {key} = {value!r} is not an integer in {lo}..{hi}")
    _options[kernel] = merged


@dataclass(eq=False)
class _FrontQueue:
    index: int
    ring_pfn: int
    ring: FrontRing | None = None
    grefs: list[int] = field(default_factory=list)
    port: int | None = None


class BlkFront(FrontendDriver):
    devtype = "vbd"

    def __init__(self, kernel) -> None:
        self.k = kernel
        self.opts = dict(_options.get(kernel, DEFAULTS))
        self.pool_pages = int(self.opts["pool_pages"])
        self._extents = Extents(self.pool_pages)
        # one indirect page per request that can be in flight at once
        self.nr_indirect = max(1, self.pool_pages // (BLKIF_MAX_SEGMENTS_PER_REQUEST + 1))
        self._free_indirect = list(range(self.nr_indirect))
        # Our memory -- pool, indirect pages, rings -- is taken at the first
        # setup (a device the bus never gets to costs nothing) and kept
        # across reconnections; release() gives it back.
        self.area: int | None = None
        self.area_pages = 0
        self.pool_pfn = self.indirect_pfn = 0
        self._pool = memoryview(b"")
        self._ended: set[int] = set()   # grants we ended: their pages go back only once unmapped
        self.queues: list[_FrontQueue] = []
        self.active: list[_FrontQueue] = []
        self.ring_page_order = 0
        self.persistent = False
        self.pool_grefs: list[int] = []
        self.indirect_grefs: list[int] = []
        self._desc = b""               # persistent: each pool page's whole-page segment, packed
        self.max_segments = BLKIF_MAX_SEGMENTS_PER_REQUEST
        self.dev: XenbusDevice | None = None
        self.bus: Bus | None = None
        self.is_connected = False
        self.connected_once = False
        self.pending: deque[Part] = deque()
        self.inflight: dict[int, Part] = {}
        self.next_id = 1
        self._rr = 0
        self.handle = 0
        self.sectors = 0
        self.sector_size = SECTOR_SIZE
        self.size = 0
        self.info = 0
        self.readonly = False
        self.features: dict[str, int] = {}
        self.reissued = 0

    # -- xenbus ------------------------------------------------------------------

    def _allocate(self) -> None:
        ring_pages = 1 << int(self.opts["ring_page_order"])
        nq = int(self.opts["num_queues"])
        self.area_pages = self.pool_pages + self.nr_indirect + nq * ring_pages
        self.area = self.pool_pfn = self.k.alloc_pages(self.area_pages, driver=True)
        self.indirect_pfn = self.pool_pfn + self.pool_pages
        first_ring = self.indirect_pfn + self.nr_indirect
        self.queues = [_FrontQueue(i, first_ring + i * ring_pages) for i in range(nq)]
        start = self.pool_pfn * PAGE_SIZE
        self._pool = memoryview(self.k.memory)[start:start + self.pool_pages * PAGE_SIZE]

    def release(self) -> None:
        """The device is gone: our pages go back to the guest once no grant
        of them is left (a dead backend may hold some mapped: they stay)."""
        if self.area is None:
            return
        gt = self.k.grant_table
        gt.retry_deferred()
        if self._ended & gt.deferred_refs():
            return
        self._pool.release()
        self.k.free_pages(self.area, self.area_pages)
        self.area = None

    def setup(self, dev: XenbusDevice) -> None:
        self.dev = dev
        if self.area is None:
            key = f"vbd/{dev.nodename.rsplit('/', 1)[-1]}"
            saved = self.k.driver_restored(key)
            if saved is not None:
                self._carry(saved)   # before our pages are taken: the data is in the old pool's
            self.k.on_suspend_driver(key, self._suspend_state)
            self._allocate()
        gt = self.k.grant_table
        gt.retry_deferred()
        vdev = dev.xs.read_or(f"{dev.nodename}/virtual-device")
        raw = vdev if vdev is not None and vdev.isdigit() else dev.nodename.rsplit("/", 1)[-1].encode()
        self.handle = int(raw) & 0xFFFF
        other = dev.otherend_id
        self.ring_page_order = min(int(self.opts["ring_page_order"]), _other_num(dev, "max-ring-page-order"))
        nr_queues = max(1, min(len(self.queues), _other_num(dev, "multi-queue-max-queues")))
        self.persistent = bool(self.opts["persistent"]) and _other_num(dev, "feature-persistent") == 1
        self.active = self.queues[:nr_queues]
        npages = 1 << self.ring_page_order
        # what an earlier negotiation wrote must not mislead this backend
        for key in dev.xs.directory(dev.nodename):
            if key in _RING_KEYS or key.startswith(("queue-", "ring-ref")):
                dev.xs.rm(f"{dev.nodename}/{key}")
        for q in self.active:
            mem = memoryview(self.k.memory)[q.ring_pfn * PAGE_SIZE:(q.ring_pfn + npages) * PAGE_SIZE]
            mem[:] = bytes(len(mem))
            q.ring = FrontRing(mem, protocol.REQUEST_SIZE, protocol.RESPONSE_SIZE)
            q.grefs = [gt.grant_foreign_access(other, q.ring_pfn + i) for i in range(npages)]
            q.port = self.k.xen.alloc_unbound(other)
            self.k.loop.bind(q.port, lambda _port, q=q: self._event(q))
            prefix = f"queue-{q.index}/" if nr_queues > 1 else ""
            if npages == 1:
                dev.write(f"{prefix}ring-ref", q.grefs[0])
            else:
                for i, gref in enumerate(q.grefs):
                    dev.write(f"{prefix}ring-ref{i}", gref)
            dev.write(f"{prefix}event-channel", q.port)
        if nr_queues > 1:
            dev.write("multi-queue-num-queues", nr_queues)
        if npages > 1:
            dev.write("ring-page-order", self.ring_page_order)
        dev.write("protocol", "x86_64-abi")
        dev.write("feature-persistent", int(bool(self.opts["persistent"])))
        if self.persistent:  # the pool and the indirect pages, granted once for this backend
            self.pool_grefs = [gt.grant_foreign_access(other, self.pool_pfn + i)
                               for i in range(self.pool_pages)]
            # writable, as Linux's: a persistent backend maps every grant of the pool one way
            self.indirect_grefs = [gt.grant_foreign_access(other, self.indirect_pfn + i)
                                   for i in range(self.nr_indirect)]
            self._desc = b"".join(_SEG.pack(g, 0, SECTORS_PER_PAGE - 1) for g in self.pool_grefs)

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
                                                 "feature-max-indirect-segments",
                                                 "max-ring-page-order", "multi-queue-max-queues")}
        indirect = min(int(self.opts["max_indirect_segments"]), self.pool_pages,
                       self.features["feature-max-indirect-segments"])
        self.max_segments = max(indirect, BLKIF_MAX_SEGMENTS_PER_REQUEST)
        self.is_connected = self.connected_once = True
        if self.inflight:  # the backend went away under them: send them again
            again = [p for _, p in sorted(self.inflight.items())]
            self.inflight.clear()
            self.reissued += len(again)
            for p in reversed(again):
                self._unissue(p)
                for piece in reversed(self._split(p)):
                    self.pending.appendleft(piece)
        self._kick()

    def disconnect(self, dev: XenbusDevice) -> None:
        self.is_connected = False
        for q in self.active:
            if q.port is not None:
                self.k.close_port(q.port)
                q.port = None
            if q.ring is not None:
                q.ring.release()
                q.ring = None
            self._end(q.grefs)
            q.grefs = []
        self._end(self.pool_grefs + self.indirect_grefs)
        self.pool_grefs, self.indirect_grefs, self._desc = [], [], b""
        for p in self.inflight.values():  # their grants die with the connection
            self._end(p.grefs)
            p.grefs = []

    # -- moving: the shadow of requests in flight, in RAM --------------------------

    def _suspend_state(self) -> bytes:
        """The writes, discards and flushes on the rings at the suspend, as
        ``[op, sector, amount, RAM offset of the data]``: their data is in our
        pool, in the guest's RAM, so it moves with the memory."""
        shadow = []
        for _, p in sorted(self.inflight.items()):
            if p.op == BlkifOp.READ or p.io.cancelled:
                continue   # a read's waiter does not move: nobody would take its data
            at = (self.pool_pfn + p.extent) * PAGE_SIZE if p.extent is not None else 0
            shadow.append([int(p.op), p.sector, p.amount, at])
        return json.dumps(shadow).encode()

    def _carry(self, raw: bytes) -> None:
        """Re-issue what was in flight before the move, ahead of anything the
        guest asks now (the pending queue is FIFO): an unacknowledged write
        lands, and the guest's own redo of it writes the same bytes again.
        Checked as fresh input: a bad shadow is ignored, reported."""
        try:
            shadow = json.loads(raw)
            limit = self.k.start_info.nr_pages * PAGE_SIZE
            todo: list[tuple[BlkifOp, int, int, bytes | None]] = []
            for op, sector, amount, at in shadow:
                op = BlkifOp(op)
                if op == BlkifOp.WRITE:
                    if amount <= 0 or amount % SECTOR_SIZE or not 0 < at <= limit - amount:
                        raise ValueError(f"a write of {amount} bytes at {at}")
                    todo.append((op, sector, amount, bytes(self.k.memory[at:at + amount])))
                elif op == BlkifOp.DISCARD:
                    todo.append((op, sector, amount * SECTOR_SIZE, None))
                elif op == BlkifOp.FLUSH_DISKCACHE:
                    todo.append((op, 0, 0, None))
                else:
                    raise ValueError(f"op {op.name}")
        except (TypeError, ValueError) as exc:
            self.k.print(f"vbd: the shadow of requests before the move is malformed ({exc}); ignored")
            return
        for op, sector, nbytes, data in todo:
            self._submit(op, sector, nbytes, data)
        self.reissued += len(todo)
        if todo:
            self.k.print(f"vbd: re-issuing {len(todo)} request(s) in flight at the suspend")

    def _end(self, grefs: list[int]) -> None:
        gt = self.k.grant_table
        for gref in grefs:
            gt.end_foreign_access_later(gref)
        self._ended.update(grefs)

    # -- issuing -------------------------------------------------------------------

    def _split(self, p: Part) -> list[Part]:
        """``p`` as requests the current backend takes (its pool pages split along)."""
        limit = self.max_segments * PAGE_SIZE
        if p.op not in (BlkifOp.READ, BlkifOp.WRITE) or p.amount <= limit:
            return [p]
        pieces = []
        for off in range(0, p.amount, limit):
            piece = Part(p.io, p.op, p.sector + off // SECTOR_SIZE, min(limit, p.amount - off),
                          p.offset + off)
            if p.extent is not None:
                piece.extent = p.extent + off // PAGE_SIZE
            pieces.append(piece)
        p.io.left += len(pieces) - 1
        return pieces

    def _unissue(self, p: Part) -> None:
        """Back to waiting: its indirect page is free again (its data stays in the pool)."""
        if p.indirect is not None:
            self._free_indirect.append(p.indirect)
            p.indirect = None
        p.queue = None

    def _queue_with_room(self) -> _FrontQueue | None:
        n = len(self.active)
        for i in range(n):
            q = self.active[(self._rr + i) % n]
            if q.ring is not None and q.ring.free_requests() > 0:
                self._rr = (self._rr + i + 1) % n
                return q
        return None

    def _kick(self) -> None:
        """Issue waiting requests while there is room; push and notify once per ring."""
        if not self.is_connected:
            return
        touched: list[_FrontQueue] = []
        pending = self.pending
        while pending:
            p = pending[0]
            if p.io.cancelled:
                pending.popleft()
                self._finish(p, None)
                continue
            npages = p.pages
            if npages and p.extent is None:
                extent = self._extents.alloc(npages)
                if extent is None:
                    break  # wait for pool pages (FIFO: nobody overtakes)
                p.extent = extent
                if p.op == BlkifOp.WRITE:
                    at = extent * PAGE_SIZE
                    with memoryview(p.io.data) as data:
                        self._pool[at:at + p.amount] = data[p.offset:p.offset + p.amount]
            if npages > BLKIF_MAX_SEGMENTS_PER_REQUEST and not self._free_indirect:
                break
            q = self._queue_with_room()
            if q is None:
                break
            pending.popleft()
            self._issue(p, q)
            if q not in touched:
                touched.append(q)
        for q in touched:
            if q.ring is not None and q.port is not None and q.ring.push_requests_and_check_notify():
                self.k.xen.notify(q.port)

    def _issue(self, p: Part, q: _FrontQueue) -> None:
        assert q.ring is not None and self.dev is not None
        p.id = self.next_id
        self.next_id += 1
        p.queue = q
        self.inflight[p.id] = p
        if p.op == BlkifOp.DISCARD:
            q.ring.put_request(DiscardRequest(p.id, p.sector, p.amount, handle=self.handle).pack())
            return
        npages = p.pages
        if not npages:  # FLUSH_DISKCACHE
            q.ring.put_request(_HEAD.pack(p.op, 0, self.handle, p.id, p.sector))
            return
        assert p.extent is not None
        if self.persistent:
            segs = bytearray(self._desc[p.extent * 8:(p.extent + npages) * 8])
        else:
            readonly = p.op == BlkifOp.WRITE
            gt = self.k.grant_table
            p.grefs = [gt.grant_foreign_access(self.dev.otherend_id, self.pool_pfn + p.extent + i, readonly)
                       for i in range(npages)]
            segs = bytearray(b"".join(_SEG.pack(g, 0, SECTORS_PER_PAGE - 1) for g in p.grefs))
        tail = p.amount % PAGE_SIZE
        if tail:
            segs[-3] = tail // SECTOR_SIZE - 1  # last_sect of the last segment
        if npages <= BLKIF_MAX_SEGMENTS_PER_REQUEST:
            q.ring.put_request(_HEAD.pack(p.op, npages, self.handle, p.id, p.sector) + segs)
            return
        p.indirect = self._free_indirect.pop()
        page = self.k.page(self.indirect_pfn + p.indirect)
        page[:len(segs)] = segs
        nind = protocol.indirect_pages(npages)  # one: 256 segments fit in a page
        if self.persistent:
            ind_grefs = [self.indirect_grefs[p.indirect]]
        else:
            ind_gref = self.k.grant_table.grant_foreign_access(self.dev.otherend_id,
                                                               self.indirect_pfn + p.indirect, True)
            p.grefs.append(ind_gref)
            ind_grefs = [ind_gref]
        assert nind == 1
        req = IndirectRequest(p.op, npages, p.id, p.sector, self.handle, tuple(ind_grefs))
        q.ring.put_request(req.pack())

    # -- answers -------------------------------------------------------------------

    def _event(self, q: _FrontQueue) -> None:
        ring = q.ring
        if ring is None:
            return
        try:
            while True:
                rsps = ring.get_responses()
                for i in range(0, len(rsps), protocol.RESPONSE_SIZE):
                    rsp_id, _op, status = _RSP.unpack_from(rsps, i)
                    p = self.inflight.get(rsp_id)
                    if p is None or p.queue is not q:
                        continue  # a late duplicate, or a backend's invention: dropped
                    del self.inflight[rsp_id]
                    self._finish(p, status if status in (0, -1, -2) else int(BlkifStatus.ERROR))
                if not ring.final_check_for_responses():
                    break
                if rsps:
                    # More came meanwhile: raise our own port again and return, so
                    # whoever waits on what we finished refills the ring first.
                    self.k.xen.evt.send(q.port)
                    break
        except RemoteProtocolError as exc:  # a broken backend: close the device
            dev = self.dev
            if dev is not None:
                try:
                    dev.write("error", str(exc)[:200])
                except XmpError:
                    pass
                self.disconnect(dev)
                dev.switch(XenbusState.CLOSING)
            return
        self._kick()

    def _finish(self, p: Part, status: int | None) -> None:
        """``p`` answered with ``status`` (None: cancelled before it was issued)."""
        io = p.io
        if p.extent is not None:
            if status == BlkifStatus.OKAY and p.op == BlkifOp.READ:
                at = p.extent * PAGE_SIZE
                io.chunks[p.offset] = bytes(self._pool[at:at + p.amount])
            self._extents.release(p.extent, p.pages)
            p.extent = None
        self._unissue(p)
        if p.grefs:
            self._end(p.grefs)
            p.grefs = []
        if status not in (None, BlkifStatus.OKAY) and io.error is None:
            io.error = BlockIOError(p.op.name.lower(), p.sector, status)
        io.left -= 1

    # -- the block device API ------------------------------------------------------

    def _submit(self, op: BlkifOp, sector: int, nbytes: int, data) -> BlkIO:
        if nbytes % SECTOR_SIZE:
            raise LocalError(f"vbd: {nbytes} bytes is not a whole number of {SECTOR_SIZE}-byte sectors")
        if sector < 0:
            raise LocalError(f"vbd: negative sector {sector}")
        io = BlkIO(op, sector, nbytes, data)
        if op in (BlkifOp.READ, BlkifOp.WRITE):
            # requests as large as any backend takes; _split cuts them down for this one
            limit = self.max_segments * PAGE_SIZE
            parts = [Part(io, op, sector + off // SECTOR_SIZE, min(limit, nbytes - off), off)
                     for off in range(0, nbytes, limit)]
        else:
            parts = [Part(io, op, sector, nbytes // SECTOR_SIZE)]
        io.left = len(parts)
        self.pending.extend(parts)
        self._kick()
        return io

    def submit_read(self, sector: int, count: int) -> BlkIO:
        """Start reading ``count`` sectors from ``sector``; ``result()`` gives the bytes."""
        return self._submit(BlkifOp.READ, sector, count * SECTOR_SIZE, None)

    def submit_write(self, sector: int, data: bytes | bytearray | memoryview) -> BlkIO:
        """Start writing ``data`` (whole sectors) from ``sector``."""
        if not isinstance(data, bytes):
            data = bytes(memoryview(data).cast("B"))  # the caller may reuse its buffer at once
        return self._submit(BlkifOp.WRITE, sector, len(data), data)

    def submit_flush(self) -> BlkIO:
        """Start a BLKIF_OP_FLUSH_DISKCACHE: the writes answered so far become durable."""
        return self._submit(BlkifOp.FLUSH_DISKCACHE, 0, 0, None)

    def submit_discard(self, sector: int, count: int) -> BlkIO:
        """Start a BLKIF_OP_DISCARD: the sectors read as zeros afterwards."""
        return self._submit(BlkifOp.DISCARD, sector, count * SECTOR_SIZE, None)

    def wait(self, ios: BlkIO | list[BlkIO], timeout: float = 30.0) -> None:
        """Until every one of ``ios`` is done; on timeout their requests not
        yet issued are dropped and TimeoutError says how many are in flight."""
        todo = [ios] if isinstance(ios, BlkIO) else list(ios)
        if not self.k.loop.run_until(lambda: all(io.done for io in todo), timeout):
            for io in todo:
                io.cancelled = True
            self._kick()
            raise TimeoutError(f"vbd: no answer within {timeout} s "
                               f"({sum(io.left for io in todo)} requests outstanding)")

    def wait_any(self, ios: list[BlkIO], timeout: float = 30.0) -> list[BlkIO]:
        """Until at least one of ``ios`` is done; returns those done."""
        if not self.k.loop.run_until(lambda: any(io.done for io in ios), timeout):
            raise TimeoutError(f"vbd: none of {len(ios)} operations answered within {timeout} s")
        return [io for io in ios if io.done]

    def _sync(self, io: BlkIO, timeout: float) -> bytes | None:
        self.wait(io, timeout)
        return io.result()

    def wait_connected(self, timeout: float = 10.0) -> None:
        if not self.k.loop.run_until(lambda: self.is_connected, timeout):
            raise TimeoutError("vbd: not connected")

    def read(self, sector: int, count: int, timeout: float = 30.0) -> bytes:
        """``count`` sectors from ``sector``."""
        data = self._sync(self.submit_read(sector, count), timeout)
        assert data is not None
        return data

    def write(self, sector: int, data: bytes | bytearray | memoryview, timeout: float = 30.0) -> None:
        """``data`` (whole sectors) to the disk from ``sector``; returns once
        the backend has written every byte (durable after :meth:`flush`)."""
        self._sync(self.submit_write(sector, data), timeout)

    def flush(self, timeout: float = 30.0) -> None:
        """BLKIF_OP_FLUSH_DISKCACHE: everything answered so far is durable."""
        self._sync(self.submit_flush(), timeout)

    def discard(self, sector: int, count: int, timeout: float = 30.0) -> None:
        """BLKIF_OP_DISCARD: the sectors read as zeros afterwards."""
        self._sync(self.submit_discard(sector, count), timeout)


def _other_num(dev: XenbusDevice, key: str) -> int:
    """A backend's optional numeric feature key; 0 when absent or not a number."""
    raw = dev.read_other(key)
    return int(raw) if raw is not None and raw.isdigit() and len(raw) < 12 else 0


def attach(kernel, devid: int, timeout: float = 30.0) -> BlkFront:
    """Start the vbd frontend bus and return device ``devid``'s driver once
    the toolstack has created it and it is connected."""
    bus, front = attach_frontend(kernel, "vbd", BlkFront, devid, timeout)
    front.bus = bus
    return front


def open(kernel, ref: str | int, timeout: float = 30.0) -> BlkFront:
    """``kernel.block(ref)``: the disk named by its vdev ("xvda") or devid."""
    return attach(kernel, ref if isinstance(ref, int) else vdev_devid(ref), timeout)
