"""blkif backend ("vbd"): in dom0 or a driver domain, serving a raw image
file to a frontend's granted rings.

The toolstack writes ``params`` (the image's absolute path), ``mode``
("w" or "r") and ``device-type`` ("disk" or "cdrom") in the backend
directory.  The backend offers ``feature-max-indirect-segments`` (256),
``max-ring-page-order`` (4), ``multi-queue-max-queues`` (4),
``feature-persistent``, ``feature-flush-cache`` and ``feature-discard``;
the frontend picks what it uses.  All queues are served by the domain's
one event loop (a thread per queue, as Linux's blkback has, was measured
slower here: the work is Python between system calls, and the GIL and the
hand-offs cost more than two rings gain).

Each request is copied out of its ring once and parsed by
:func:`protocol.parse_request`, which trusts nothing; an indirect
request's segment pages are copied once too, then parsed.  A READ or
WRITE reaches the frontend's pages in one of two ways:

* dom0 maps them: with ``feature-persistent`` each grant stays mapped
  after its first use (the frontend reuses a fixed pool), without it the
  request's grants are mapped (read-only for a WRITE) and unmapped before
  the answer;
* a driver domain may not map (the hypervisor says EPERM: only dom0 may
  hold a descriptor of a guest's RAM), so its rings and data move through
  grant copies into its own bounce pages (:mod:`xmp.drivers.grantcopy`).

The bytes go to or from the image with ``preadv``/``pwritev``; a WRITE is
answered only once every byte reached the image.  FLUSH_DISKCACHE is
``fsync``; DISCARD punches whole 4 KiB granules and zeroes the partial
edges.  A bad request gets its error answer and the loop goes on; a
frontend whose producer index overflows a ring has its device closed,
alone.
"""

from __future__ import annotations

import errno
import os
import traceback
from dataclasses import dataclass

from xmp.domain_proc.xen import GrantMapping
from xmp.drivers import grantcopy
from xmp.drivers.blk import image, protocol
from xmp.drivers.blk.protocol import (
    PAGE_SIZE,
    SECTOR_SIZE,
    VDISK_CDROM,
    VDISK_READONLY,
    BadRequest,
    BlkifOp,
    BlkifStatus,
    DiscardRequest,
    IndirectRequest,
    Request,
    Response,
)
from xmp.drivers.xenbus.device import BackendDriver, XenbusDevice
from xmp.errors import GrantError, HypercallError, RemoteProtocolError, XmpError
from xmp.sharedmem.ring import BackRing, ring_bytes

PROTOCOLS = (None, b"x86_64-abi", b"native")

MAX_INDIRECT_SEGMENTS = 256   # as Linux's and Mirage's blkback: 1 MiB per request
MAX_RING_PAGE_ORDER = 4       # 16 pages, 512 slots
MAX_QUEUES = 4
# Answers are pushed once a batch has moved this much: small requests share
# one notification, large ones are answered while the next is served.
PUSH_BYTES = 128 * 1024
# Ring-fulls served per event before the others get their turn.
BATCHES_PER_EVENT = 4
# Persistent grants kept mapped before the cache is dropped and refilled
# (Linux's blkback keeps 1056 by default; our frontend's pool is 1024 pages
# plus its indirect pages).
MAX_PERSISTENT_GRANTS = 4096
MAX_SEGCACHE = 1024


@dataclass
class _Queue:
    """One ring of the device and its event channel."""

    index: int
    ring: BackRing | grantcopy.CopyBackRing
    port: int
    mapping: GrantMapping | None = None   # the ring pages, when mapped


class BlkBack(BackendDriver):
    devtype = "vbd"

    def __init__(self, kernel) -> None:
        self.k = kernel
        self.fd: int | None = None
        self.readonly = False
        self.sectors = 0
        self.queues: list[_Queue] = []
        self.dev: XenbusDevice | None = None
        self.served = 0
        self.errors = 0
        self.moved = 0                              # bytes read or written for the frontend
        self.persistent = False
        self.copying = False                        # a driver domain: grant copy, never map
        self.pgrants: dict[int, tuple] = {}         # gref -> (its run's mmap, page in it, page view)
        # an indirect request's segment bytes -> (sectors, views): a frontend reuses its
        # pool, so the same descriptors come again and again (persistent grants only)
        self.segcache: dict[bytes, tuple[int, list[memoryview]]] = {}
        self.pmappings: list[GrantMapping] = []
        # without persistent grants: the current batch's pages, mapped together
        self._premapped: dict[tuple[int, bool], memoryview] = {}   # (gref, readonly) -> page
        self._batch_maps: list[GrantMapping] = []
        self.bounce: int | None = None               # first pfn of our bounce pages (copying)
        self.copies: grantcopy.CopyList | None = None  # our GNTTABOP_copy records (copying)

    # -- xenbus ----------------------------------------------------------------

    def publish_features(self, dev: XenbusDevice) -> None:
        self._close_image()
        params = dev.read("params").decode()
        mode = dev.read("mode").decode()
        devtype = (dev.xs.read_or(f"{dev.nodename}/device-type") or b"disk").decode()
        if not os.path.isabs(params):
            raise ValueError(f"vbd: params {params!r} is not an absolute path")
        if mode not in ("w", "r"):
            raise ValueError(f"vbd: mode {mode!r} is neither 'w' nor 'r'")
        if devtype not in ("disk", "cdrom"):
            raise ValueError(f"vbd: device-type {devtype!r} is neither 'disk' nor 'cdrom'")
        self.readonly = mode == "r"
        try:
            fd = os.open(params, os.O_RDONLY if self.readonly else os.O_RDWR)
        except OSError as exc:
            raise ValueError(f"vbd: cannot open {params}: {exc.strerror}") from None
        try:
            size = os.fstat(fd).st_size
        except OSError as exc:
            os.close(fd)
            raise ValueError(f"vbd: cannot stat {params}: {exc.strerror}") from None
        self.fd = fd
        self.sectors = size // SECTOR_SIZE
        info = (VDISK_READONLY if self.readonly else 0) | (VDISK_CDROM if devtype == "cdrom" else 0)
        for key, value in {"sectors": self.sectors, "sector-size": SECTOR_SIZE,
                           "physical-sector-size": SECTOR_SIZE, "info": info,
                           "feature-flush-cache": 1, "feature-discard": 1,
                           "discard-granularity": image.DISCARD_GRANULARITY, "discard-alignment": 0,
                           "feature-barrier": 0, "feature-persistent": 1,
                           "feature-max-indirect-segments": MAX_INDIRECT_SEGMENTS,
                           "max-ring-page-order": MAX_RING_PAGE_ORDER,
                           "multi-queue-max-queues": MAX_QUEUES}.items():
            dev.write(key, value)

    def connect(self, dev: XenbusDevice) -> None:
        if self.fd is None:
            raise ValueError("vbd: no image open")
        proto = dev.read_other("protocol")
        if proto not in PROTOCOLS:
            raise ValueError(f"vbd: unsupported protocol {proto!r}")
        nr_queues = _number(dev, "multi-queue-num-queues", 1, 1, MAX_QUEUES)
        order = _number(dev, "ring-page-order", 0, 0, MAX_RING_PAGE_ORDER)
        rings = []  # every key checked before anything is dropped or mapped
        for q in range(nr_queues):
            prefix = f"queue-{q}/" if nr_queues > 1 else ""
            keys = ([f"{prefix}ring-ref"] if order == 0
                    else [f"{prefix}ring-ref{i}" for i in range(1 << order)])
            rings.append(([_number(dev, key, None, 0, 0xFFFFFFFF) for key in keys],
                          _number(dev, f"{prefix}event-channel", None, 1, 0xFFFFFFFF)))
        self._drop_connection()  # a stale connection, if any
        self.dev = dev
        self.persistent = dev.read_other("feature-persistent") == b"1"
        try:
            for q, (refs, port) in enumerate(rings):
                self._connect_queue(dev, q, refs, port, order)
        except BaseException:
            self._drop_connection()
            raise
        for queue in self.queues:
            self._event(queue)  # requests queued before we bound

    def _connect_queue(self, dev: XenbusDevice, index: int, refs: list[int], port: int, order: int) -> None:
        mapping = None
        ring: BackRing | grantcopy.CopyBackRing
        if not self.copying:
            try:
                mapping = self.k.xen.map_grant_ref(dev.otherend_id, refs)
            except HypercallError as exc:
                if exc.errno != errno.EPERM:
                    raise
                self.copying = True  # a driver domain: grant copy from now on
        if mapping is not None:
            buf = mapping.contiguous()
            if buf is None:
                self.k.xen.unmap_grant_ref(mapping)
                raise ValueError("vbd: the ring pages are not one run of the frontend's memory")
            ring = BackRing(buf, protocol.REQUEST_SIZE, protocol.RESPONSE_SIZE)
        else:
            copier = grantcopy.GrantCopier(self.k, dev.otherend_id, refs, self._bounce(),
                                           BOUNCE_PAGES, self._copies())
            ring = grantcopy.CopyBackRing(copier, ring_bytes(order), protocol.REQUEST_SIZE,
                                          protocol.RESPONSE_SIZE)
        try:
            evtchn = self.k.xen.bind_interdomain(dev.otherend_id, port)
        except BaseException:
            ring.release()
            if mapping is not None:
                self.k.xen.unmap_grant_ref(mapping)
            raise
        q = _Queue(index, ring, evtchn, mapping)
        self.queues.append(q)
        self.k.loop.bind(evtchn, lambda _port: self._event(q))

    def disconnect(self, dev: XenbusDevice) -> None:
        self._drop_connection()
        # publish_features (re)opens the image before any new connection
        self._close_image()

    def _drop_connection(self) -> None:
        for q in self.queues:
            self.k.close_port(q.port)
            q.ring.release()
            if q.mapping is not None:
                _unmap_quietly(self.k, q.mapping)
        self.queues = []
        self._unpremap()
        self._unmap_persistent()

    def _unmap_persistent(self) -> None:
        self._drop_segcache()
        for _, _, view in self.pgrants.values():
            view.release()
        self.pgrants.clear()
        for mapping in self.pmappings:
            _unmap_quietly(self.k, mapping)
        self.pmappings = []

    def _close_image(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def _bounce(self) -> int:
        if self.bounce is None:
            self.bounce = self.k.alloc_pages(BOUNCE_PAGES)
        return self.bounce

    def _copies(self) -> grantcopy.CopyList:
        if self.copies is None:  # one for the device: its queues are served one at a time
            self.copies = grantcopy.CopyList(self.k)
        return self.copies

    def release(self) -> None:
        if self.bounce is not None:  # copies are synchronous: none is in flight now
            self.k.free_pages(self.bounce, BOUNCE_PAGES)
            self.bounce = None
        if self.copies is not None:
            self.copies.release()
            self.copies = None

    # -- serving -----------------------------------------------------------------

    def _event(self, q: _Queue) -> None:
        try:
            self._serve(q)
        except RemoteProtocolError as exc:  # a broken frontend: close its device, serve the rest
            self._fail(str(exc))
        except Exception:  # never take the backend's process down
            text = traceback.format_exc()
            print(text, flush=True)
            self._fail("vbd backend failure: " + text.strip().splitlines()[-1])

    def _fail(self, message: str) -> None:
        if self.dev is not None:
            self.dev.fatal(message)  # disconnects us (or removes the device, if its frontend has gone)

    def _serve(self, q: _Queue) -> None:
        ring = q.ring
        size = protocol.REQUEST_SIZE
        for _ in range(BATCHES_PER_EVENT):
            if q not in self.queues:
                return
            reqs = ring.get_requests()
            if reqs:
                slots = [reqs[i:i + size] for i in range(0, len(reqs), size)]
                batched = not self.persistent and not self.copying and self._premap(slots)
                rsps: list[bytes] = []
                mark = self.moved
                try:
                    for i, raw in enumerate(slots):
                        rsps.append(self._handle(raw).pack())
                        if not batched and self.moved - mark >= PUSH_BYTES and i + 1 < len(slots):
                            # a large answer goes at once: the frontend copies it out while we do the next
                            self._push(q, rsps)
                            rsps, mark = [], self.moved
                finally:
                    if batched:
                        self._unpremap()  # before any answer: the frontend ends its grants then
                self._push(q, rsps)
                continue
            if not ring.final_check_for_requests():
                return
        # Still busy: raise our own port again and let the loop serve the
        # other rings and xenstore first (a frontend that never lets its ring
        # empty must not starve everyone else).
        if q in self.queues:
            self.k.xen.evt.send(q.port)

    def _premap(self, slots: list[bytes]) -> bool:
        """Without persistent grants, map the pages of a batch's direct READs
        and WRITEs in one map_grant_ref each way (two hypercalls for the batch
        instead of two per request).  False when there is nothing to map; a
        group that fails to map (a bad gref among them) is left to the
        requests themselves, so only the bad one gets its error."""
        groups: dict[bool, dict[int, None]] = {True: {}, False: {}}  # readonly -> grefs
        for raw in slots:
            try:
                req = protocol.parse_request(raw, max_indirect_segments=MAX_INDIRECT_SEGMENTS)
            except BadRequest:
                continue
            if isinstance(req, Request) and req.operation in (BlkifOp.READ, BlkifOp.WRITE):
                groups[req.operation == BlkifOp.WRITE].update(dict.fromkeys(s.gref for s in req.segments))
        assert self.dev is not None
        for readonly, grefs in groups.items():
            if len(grefs) < 2:
                continue  # one page: no gain
            try:
                mapping = self.k.xen.map_grant_ref(self.dev.otherend_id, list(grefs), readonly=readonly)
            except (GrantError, HypercallError):
                continue
            self._batch_maps.append(mapping)
            for gref, page in zip(grefs, mapping.pages, strict=True):
                self._premapped[(gref, readonly)] = memoryview(page)
        return bool(self._batch_maps)

    def _unpremap(self) -> None:
        for view in self._premapped.values():
            view.release()
        self._premapped.clear()
        for mapping in self._batch_maps:
            _unmap_quietly(self.k, mapping)
        self._batch_maps = []

    def _push(self, q: _Queue, rsps: list[bytes]) -> None:
        if q in self.queues and rsps:
            q.ring.put_responses(b"".join(rsps))
            if q.ring.push_responses_and_check_notify():
                self.k.xen.notify(q.port)

    def _handle(self, raw: bytes) -> Response:
        """One request (already a private copy) to its response; never raises."""
        self.served += 1
        try:
            req = protocol.parse_request(raw, max_indirect_segments=MAX_INDIRECT_SEGMENTS)
        except BadRequest as bad:
            self.errors += 1
            return bad.response()
        try:
            status = self._do(req)
        except BadRequest as bad:
            status = bad.status
        except (GrantError, HypercallError, OSError, XmpError):
            status = BlkifStatus.ERROR
        except Exception:  # a bug here must not cost the other requests
            print(traceback.format_exc(), flush=True)
            status = BlkifStatus.ERROR
        if status != BlkifStatus.OKAY:
            self.errors += 1
        return Response(req.id, int(req.operation), int(status))

    def _do(self, req) -> int:
        fd = self.fd
        if fd is None:
            return BlkifStatus.ERROR
        if isinstance(req, DiscardRequest):
            if self.readonly:
                return BlkifStatus.ERROR
            protocol.check_bounds(req.sector_number, req.nr_sectors, self.sectors,
                                  req_id=req.id, operation=req.operation)
            image.discard(fd, req.sector_number * SECTOR_SIZE, req.nr_sectors * SECTOR_SIZE)
            return BlkifStatus.OKAY
        if isinstance(req, IndirectRequest):
            op = req.indirect_op
            raw = self._indirect_raw(req)
            cached = self.segcache.get(raw) if self.persistent and not self.copying else None
            segs = None if cached else protocol.parse_segment_array(raw, req.nr_segments, req_id=req.id)
        else:
            assert isinstance(req, Request)
            op, cached, segs = req.operation, None, protocol.SegmentArray.of(req.segments)
        if op == BlkifOp.FLUSH_DISKCACHE:
            os.fsync(fd)
            return BlkifStatus.OKAY
        if op not in (BlkifOp.READ, BlkifOp.WRITE):
            return BlkifStatus.EOPNOTSUPP  # WRITE_BARRIER: feature-barrier is 0
        write = op == BlkifOp.WRITE
        if write and self.readonly:
            return BlkifStatus.ERROR
        nr_sectors = cached[0] if cached else segs.nr_sectors if segs is not None else 0
        protocol.check_bounds(req.sector_number, nr_sectors, self.sectors,
                              req_id=req.id, operation=req.operation)
        offset = req.sector_number * SECTOR_SIZE
        self.moved += nr_sectors * SECTOR_SIZE
        if cached:
            image.transfer(fd, cached[1], offset, write, nr_sectors * SECTOR_SIZE)
        elif segs is not None and self.copying:
            self._copy_rw(fd, segs, offset, write)
        elif segs is not None:
            self._map_rw(fd, segs, offset, write, raw if isinstance(req, IndirectRequest) else None)
        return BlkifStatus.OKAY

    def _indirect_raw(self, req: IndirectRequest) -> bytes:
        """The request's segment descriptors, copied out of its indirect pages once."""
        assert self.dev is not None
        n = req.nr_segments * protocol.SEGMENT_SIZE
        if self.copying:
            parts = [(gref, 0, min(PAGE_SIZE, n - i * PAGE_SIZE))
                     for i, gref in enumerate(req.indirect_grefs)]
            return b"".join(bytes(v) for v in grantcopy.copy_from_grants(
                self.k, self.dev.otherend_id, parts, self._bounce(), BOUNCE_PAGES, self._copies()))
        if self.persistent:
            pages = self._persistent_pages(list(req.indirect_grefs))
            return b"".join(bytes(p[2]) for p in pages)[:n]
        mapping = self.k.xen.map_grant_ref(self.dev.otherend_id, list(req.indirect_grefs), readonly=True)
        try:
            return b"".join(bytes(p) for p in mapping.pages)[:n]
        finally:
            self.k.xen.unmap_grant_ref(mapping)

    def _map_rw(self, fd: int, segs: protocol.SegmentArray, offset: int, write: bool,
                key: bytes | None) -> None:
        assert self.dev is not None
        total = segs.nr_sectors * SECTOR_SIZE
        if self.persistent:
            views = self._persistent_views(segs)
            if key is not None:  # the same descriptors will come again: keep the views
                if len(self.segcache) >= MAX_SEGCACHE:
                    self._drop_segcache()
                self.segcache[key] = (segs.nr_sectors, views)
                image.transfer(fd, views, offset, write, total)
                return
            _transfer_and_release(fd, views, offset, write, total)
            return
        pm = self._premapped
        if pm and all((g, write) in pm for g in segs.grefs):  # mapped with its batch
            pages = [pm[(g, write)] for g in segs.grefs]
            if segs.whole_pages():
                image.transfer(fd, pages, offset, write, total)
                return
            _transfer_and_release(fd, _segment_views(pages, segs), offset, write, total)
            return
        mapping = self.k.xen.map_grant_ref(self.dev.otherend_id, segs.grefs, readonly=write)
        pages = [memoryview(p) for p in mapping.pages]
        views = pages if segs.whole_pages() else _segment_views(pages, segs)
        try:
            image.transfer(fd, views, offset, write, total)
        finally:
            for v in views:
                v.release()
            for p in pages:
                p.release()
            self.k.xen.unmap_grant_ref(mapping)

    def _drop_segcache(self) -> None:
        for _, views in self.segcache.values():
            for v in views:
                v.release()
        self.segcache.clear()

    def _persistent_views(self, segs: protocol.SegmentArray) -> list[memoryview]:
        """Views of the segments' bytes in their kept mappings; whole pages that
        lie side by side in one mapping become one view (one iovec)."""
        entries = self._persistent_pages(segs.grefs)
        if not segs.whole_pages():
            return _segment_views([e[2] for e in entries], segs)
        views = []
        i, n = 0, len(entries)
        while i < n:
            m, k, _ = entries[i]
            j = i + 1
            while j < n and entries[j][0] is m and entries[j][1] == k + j - i:
                j += 1
            views.append(memoryview(m)[k * PAGE_SIZE:(k + j - i) * PAGE_SIZE])
            i = j
        return views

    def _copy_rw(self, fd: int, segs: protocol.SegmentArray, offset: int, write: bool) -> None:
        assert self.dev is not None
        parts = [(g, f * SECTOR_SIZE, (la - f + 1) * SECTOR_SIZE)
                 for g, f, la in zip(segs.grefs, segs.first, segs.last, strict=True)]
        bounce = self._bounce()
        total = segs.nr_sectors * SECTOR_SIZE
        if write:
            views = grantcopy.copy_from_grants(self.k, self.dev.otherend_id, parts, bounce, BOUNCE_PAGES,
                                               self._copies())
            image.transfer(fd, views, offset, True, total)
        else:
            views = grantcopy.bounce_views(self.k, parts, bounce, BOUNCE_PAGES)
            image.transfer(fd, views, offset, False, total)
            grantcopy.copy_to_grants(self.k, self.dev.otherend_id, parts, bounce, BOUNCE_PAGES,
                                     self._copies())

    def _persistent_pages(self, grefs: list[int]) -> list[tuple]:
        """(run mmap, page in it, page view) of each gref, mapped at its first use and kept."""
        pg = self.pgrants
        try:
            return [pg[g] for g in grefs]
        except KeyError:
            pass  # a first use: map what is missing
        missing = [g for g in dict.fromkeys(grefs) if g not in pg]
        if len(pg) + len(missing) > MAX_PERSISTENT_GRANTS:
            self._unmap_persistent()  # a frontend cycling through more grants than promised
            missing = list(dict.fromkeys(grefs))
        assert self.dev is not None
        mapping = self.k.xen.map_grant_ref(self.dev.otherend_id, missing)
        self.pmappings.append(mapping)
        for gref, page, (run, k) in zip(missing, mapping.pages, mapping.where, strict=True):
            pg[gref] = (mapping.maps[run], k, memoryview(page))
        return [pg[g] for g in grefs]



# A driver domain's bounce pages, per device: a whole request (256
# segments) or the biggest ring (16 pages) plus one.
BOUNCE_PAGES = max(MAX_INDIRECT_SEGMENTS, grantcopy.bounce_pages_for(ring_bytes(MAX_RING_PAGE_ORDER)))


def _number(dev: XenbusDevice, key: str, default: int | None, lo: int, hi: int) -> int:
    """A frontend's numeric key, checked: one clear ValueError otherwise."""
    raw = dev.read_other(key)
    if raw is None:
        if default is None:
            raise ValueError(f"vbd: the frontend gave no {key}")
        return default
    if not raw.isdigit() or not lo <= int(raw) <= hi:
        raise ValueError(f"vbd: the frontend's {key} is {raw[:32]!r}, not a number in {lo}..{hi}")
    return int(raw)


def _unmap_quietly(kernel, mapping: GrantMapping) -> None:
    try:
        kernel.xen.unmap_grant_ref(mapping)
    except XmpError:
        pass


def _transfer_and_release(fd: int, views: list[memoryview], offset: int, write: bool, total: int) -> None:
    """image.transfer through views made for this request alone, then let them go."""
    try:
        image.transfer(fd, views, offset, write, total)
    finally:
        for v in views:
            v.release()


def _segment_views(pages: list[memoryview], segs: protocol.SegmentArray) -> list[memoryview]:
    return [page[f * SECTOR_SIZE:(la + 1) * SECTOR_SIZE]
            for page, f, la in zip(pages, segs.first, segs.last, strict=True)]


def backend(kernel) -> BlkBack:
    """One backend driver for a device of this class (the registry's factory)."""
    return BlkBack(kernel)
