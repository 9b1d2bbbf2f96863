"""blkif backend ("vbd"): in dom0 (or a trusted driver domain), serving a
raw image file to the frontend's granted ring.

The toolstack writes ``params`` (the image's absolute path), ``mode``
("w" or "r") and ``device-type`` ("disk" or "cdrom") in the backend
directory.  Each request is copied out of the ring once and parsed by
:func:`protocol.parse_request`, which trusts nothing; a READ or WRITE maps
its segments' grants in one ``map_grant_ref`` (read-only for a WRITE: the
backend only reads the frontend's data), moves the bytes with
``preadv``/``pwritev`` and unmaps before answering -- a WRITE is answered
only once every byte reached the image.  FLUSH_DISKCACHE is ``fsync``;
DISCARD punches whole 4 KiB granules and zeroes the partial edges.  A bad
request gets its error answer and the loop goes on; a frontend whose
producer index overflows the ring has its device closed, alone.

Only grant mapping (trusted backends) is supported; indirect segments,
persistent grants and multi-queue are not advertised.
"""

from __future__ import annotations

import os
import traceback

from xmp.domain_proc.xen import GrantMapping
from xmp.drivers.blk import protocol
from xmp.drivers.blk.protocol import (
    SECTOR_SIZE,
    VDISK_CDROM,
    VDISK_READONLY,
    BadRequest,
    BlkifOp,
    BlkifStatus,
    DiscardRequest,
    Request,
    Response,
)
from xmp.drivers.xenbus.device import BackendDriver, XenbusDevice
from xmp.drivers.xenbus.state import XenbusState
from xmp.errors import GrantError, HypercallError, RemoteProtocolError, XmpError
from xmp.sharedmem._ffi import lib
from xmp.sharedmem.ring import BackRing

DISCARD_GRANULARITY = 4096
PROTOCOLS = (None, b"x86_64-abi", b"native")
_ZEROS = bytes(DISCARD_GRANULARITY)


# More than the frontend's pool ever needs (32 requests x 11 segments, as Linux's 1056).
MAX_PERSISTENT_GRANTS = 1056


class BlkBack(BackendDriver):
    devtype = "vbd"

    def __init__(self, kernel) -> None:
        self.k = kernel
        self.fd: int | None = None
        self.readonly = False
        self.sectors = 0
        self.mapping = None
        self.ring: BackRing | None = None
        self.port: int | None = None
        self.dev: XenbusDevice | None = None
        self.served = 0
        self.errors = 0
        self.persistent = False
        self.pgrants: dict[int, tuple[GrantMapping, int]] = {}  # gref -> (its mapping, page index)

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
                           "discard-granularity": DISCARD_GRANULARITY, "discard-alignment": 0,
                           "feature-barrier": 0, "feature-persistent": 1,
                           "feature-max-indirect-segments": 0}.items():
            dev.write(key, value)

    def connect(self, dev: XenbusDevice) -> None:
        raw_ref = dev.read_other("ring-ref") or b""
        raw_port = dev.read_other("event-channel") or b""
        proto = dev.read_other("protocol")
        if not raw_ref.isdigit() or not raw_port.isdigit():
            raise ValueError(f"vbd: bad ring-ref {raw_ref!r} or event-channel {raw_port!r}")
        if proto not in PROTOCOLS:
            raise ValueError(f"vbd: unsupported protocol {proto!r}")
        if self.fd is None:
            raise ValueError("vbd: no image open")
        self._drop_connection()  # a stale connection, if any
        self.dev = dev
        # feature-persistent: the frontend reuses a fixed pool of writable grants,
        # so each stays mapped after its first use (no map/unmap per request).
        self.persistent = dev.read_other("feature-persistent") == b"1"
        mapping = self.mapping = self.k.xen.map_grant_ref(dev.otherend_id, [int(raw_ref)])
        self.ring = BackRing(mapping.pages[0], protocol.REQUEST_SIZE, protocol.RESPONSE_SIZE)
        self.port = self.k.xen.bind_interdomain(dev.otherend_id, int(raw_port))
        self.k.loop.bind(self.port, self._event)
        self._event(self.port)  # requests queued before we bound

    def disconnect(self, dev: XenbusDevice) -> None:
        self._drop_connection()
        # publish_features (re)opens the image before any new connection
        self._close_image()

    def _drop_connection(self) -> None:
        if self.port is not None:
            self.k.close_port(self.port)
            self.port = None
        if self.ring is not None:
            self.ring.release()
            self.ring = None
        self._unmap_persistent()
        if self.mapping is not None:
            try:
                self.k.xen.unmap_grant_ref(self.mapping)
            except XmpError:
                pass
            self.mapping = None

    def _unmap_persistent(self) -> None:
        for mapping in {id(m): m for m, _ in self.pgrants.values()}.values():
            try:
                self.k.xen.unmap_grant_ref(mapping)
            except XmpError:
                pass
        self.pgrants.clear()

    def _persistent_pages(self, grefs: list[int]) -> list:
        missing = [g for g in dict.fromkeys(grefs) if g not in self.pgrants]
        if missing:
            if len(self.pgrants) + len(missing) > MAX_PERSISTENT_GRANTS:
                self._unmap_persistent()  # a frontend cycling through more grants than promised
                missing = list(dict.fromkeys(grefs))
            assert self.dev is not None
            mapping = self.k.xen.map_grant_ref(self.dev.otherend_id, missing)
            for i, gref in enumerate(missing):
                self.pgrants[gref] = (mapping, i)
        return [self.pgrants[g][0].pages[self.pgrants[g][1]] for g in grefs]

    def _close_image(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    # -- serving -----------------------------------------------------------------

    def _event(self, _port: int) -> None:
        try:
            self._serve()
        except RemoteProtocolError as exc:  # a broken frontend: close its device, serve the rest
            self._fail(str(exc))
        except Exception:  # never take the backend's process down
            text = traceback.format_exc()
            print(text, flush=True)
            self._fail("vbd backend failure: " + text.strip().splitlines()[-1])

    def _fail(self, message: str) -> None:
        dev = self.dev
        if dev is None:
            return
        try:
            dev.write("error", message[:200])
        except XmpError:
            pass
        self.disconnect(dev)
        dev.switch(XenbusState.CLOSING)

    def _serve(self) -> None:
        while True:
            ring = self.ring
            if ring is None:
                return
            reqs = ring.get_requests()
            if reqs:
                size = protocol.REQUEST_SIZE
                rsps = b"".join(self._handle(reqs[i:i + size]).pack() for i in range(0, len(reqs), size))
                ring.put_responses(rsps)
                if ring.push_responses_and_check_notify() and self.port is not None:
                    self.k.xen.notify(self.port)
                continue
            if not ring.final_check_for_requests():
                return

    def _handle(self, raw: bytes) -> Response:
        """One request (already a private copy) to its response; never raises."""
        self.served += 1
        try:
            req = protocol.parse_request(raw, max_indirect_segments=0)
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
            self._discard(fd, req.sector_number * SECTOR_SIZE, req.nr_sectors * SECTOR_SIZE)
            return BlkifStatus.OKAY
        if not isinstance(req, Request):  # indirect: parse_request refused it already
            return BlkifStatus.EOPNOTSUPP
        if req.operation == BlkifOp.FLUSH_DISKCACHE:
            os.fsync(fd)
            return BlkifStatus.OKAY
        if req.operation not in (BlkifOp.READ, BlkifOp.WRITE):
            return BlkifStatus.EOPNOTSUPP  # WRITE_BARRIER: feature-barrier is 0
        write = req.operation == BlkifOp.WRITE
        if write and self.readonly:
            return BlkifStatus.ERROR
        protocol.check_bounds(req.sector_number, protocol.sectors_of(req), self.sectors,
                              req_id=req.id, operation=req.operation)
        assert self.dev is not None
        grefs = [seg.gref for seg in req.segments]
        mapping = None
        if self.persistent:
            pages = self._persistent_pages(grefs)
        else:
            mapping = self.k.xen.map_grant_ref(self.dev.otherend_id, grefs, readonly=write)
            pages = mapping.pages
        try:
            views = [memoryview(page)[seg.first_sect * SECTOR_SIZE:(seg.last_sect + 1) * SECTOR_SIZE]
                     for page, seg in zip(pages, req.segments, strict=True)]
            try:
                _transfer(fd, views, req.sector_number * SECTOR_SIZE, write)
            finally:
                for v in views:
                    v.release()
        finally:
            if mapping is not None:
                self.k.xen.unmap_grant_ref(mapping)
        return BlkifStatus.OKAY

    @staticmethod
    def _discard(fd: int, start: int, length: int) -> None:
        end = start + length
        lo = -(-start // DISCARD_GRANULARITY) * DISCARD_GRANULARITY
        hi = end // DISCARD_GRANULARITY * DISCARD_GRANULARITY
        if lo < hi:
            if lib.xmp_punch_hole(fd, lo, hi - lo) != 0:
                _zero(fd, lo, hi - lo)  # no hole punching here: zeroes read back all the same
            _zero(fd, start, lo - start)
            _zero(fd, hi, end - hi)
        else:
            _zero(fd, start, length)


def _zero(fd: int, offset: int, length: int) -> None:
    while length > 0:
        n = os.pwrite(fd, _ZEROS[:min(length, len(_ZEROS))], offset)
        if n <= 0:
            raise OSError("short write while zeroing")
        offset += n
        length -= n


def _transfer(fd: int, views: list[memoryview], offset: int, write: bool) -> None:
    """All of ``views`` to (``write``) or from the image at ``offset``,
    retrying short transfers; a read past the end of the file reads zeros."""
    total = sum(len(v) for v in views)
    done = 0
    extra: list[memoryview] = []
    try:
        while done < total:
            rest: list[memoryview] = []
            skip = done
            for v in views:
                if skip >= len(v):
                    skip -= len(v)
                    continue
                part = v[skip:] if skip else v
                if skip:
                    extra.append(part)
                rest.append(part)
                skip = 0
            n = os.pwritev(fd, rest, offset + done) if write else os.preadv(fd, rest, offset + done)
            if n <= 0:
                if write:
                    raise OSError("short write to the image")
                for part in rest:  # the image shrank under us: past its end is zeros
                    part[:] = bytes(len(part))
                return
            done += n
    finally:
        for part in extra:
            part.release()
