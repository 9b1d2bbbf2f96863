"""Guest kernels used only by the tests (the domain processes import them
through PYTHONPATH, which xmphost.Host sets)."""

from __future__ import annotations

from xmp.sharedmem.grant import GTF_reading, GTF_writing

REF = 8  # the first ref that is not reserved


def granter(kernel) -> None:
    """Grant ``args.to`` ref 8 (writable) and ref 9 (read-only) over two
    pages and keep a third page never granted; report as they change ref 8's
    flags and reply, and the first 32 bytes of the read-only and the ungranted
    page.  A reply in ref 8 is acknowledged in the same page (bytes 32-48), so
    its mapper knows it was seen while mapped.  With ``args.end`` (default),
    once ref 8's mapping is gone, end access."""
    pfn = kernel.alloc_pages(3)
    page, ro, secret = (kernel.page(pfn + i) for i in range(3))
    page[:16] = b"granted-page-123"
    ro[:16] = b"read-only-page!!"
    secret[:16] = b"never-granted!!!"
    to = int(kernel.args["to"])
    kernel.grant_table.grant_access(REF, to, pfn)
    kernel.grant_table.grant_access(REF + 1, to, pfn + 1, readonly=True)
    kernel.print(f"granter: granted ref {REF} pfn {pfn}")
    last, was_mapped = None, False
    while True:
        flags = kernel.grant_table.entry(REF)[0]
        seen = (flags, bytes(page[16:32]), bytes(ro[:32]), bytes(secret[:32]))  # flags first: the mapper
        if seen != last:                                                         # writes once mapped
            kernel.print(f"granter: flags={flags:#x} reply={seen[1]!r} ro={seen[2]!r} secret={seen[3]!r}")
            last = seen
        if any(seen[1]) and not any(page[32:48]):
            page[32:48] = b"granter-saw-it!!"
        if flags & (GTF_reading | GTF_writing):
            was_mapped = True
        elif was_mapped and kernel.args.get("end", True):
            kernel.grant_table.end_foreign_access(REF)
            kernel.grant_table.end_foreign_access(REF + 1)
            kernel.print("granter: ended")
            kernel.idle()
        kernel.sleep(0.05)


def _ram_fds(domid: int) -> dict[int, str]:
    """fd -> access mode of every descriptor this process holds of dom``domid``'s RAM."""
    import os
    import re

    held = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
            if re.search(rf"/xmp\.\d+\.[0-9a-f]+\.ram{domid}\.", target):
                info = open(f"/proc/self/fdinfo/{fd}").read()
                flags = int(re.search(r"flags:\s+([0-7]+)", info).group(1), 8)
                held[int(fd)] = {os.O_RDONLY: "O_RDONLY", os.O_RDWR: "O_RDWR"}.get(flags & os.O_ACCMODE,
                                                                                   "other")
        except FileNotFoundError:  # the listing's own descriptor
            pass
    return held


def dom0mapper(kernel) -> None:
    """dom0's workload: map ``args.granter``'s read-only ref 9, try to write
    it, to make the mapping writable, and to map writable what it came
    through; then map the writable ref 8, answer in it, wait for the granter
    to see the answer and unmap both.  Reports ``dom0mapper: {json}``."""
    import ctypes
    import errno
    import json
    import mmap

    from xmp.errors import XmpError
    from xmp.sharedmem._ffi import ffi

    granter = int(kernel.args.get("granter", 1))
    report: dict = {}
    for _ in range(400):
        before = _ram_fds(granter)  # dom0's services hold some already (console, xenstore rings)
        try:  # the granter starts after dom0: until it has granted, the map is refused
            ro_map = kernel.xen.map_grant_ref(granter, [REF + 1], readonly=True)
            break
        except XmpError:
            kernel.sleep(0.02)
    else:
        raise RuntimeError("the grant never came")
    new = {fd: mode for fd, mode in _ram_fds(granter).items() if fd not in before}
    ro = ro_map.pages[0]
    report["ro_read"] = bytes(ro[:16]).decode()
    try:
        ro[16:32] = b"dom0-wrote-here!"
        report["ro_write"] = "written"
    except TypeError:
        report["ro_write"] = "TypeError"
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    addr = int(ffi.cast("uintptr_t", ffi.from_buffer(ro)))
    if libc.mprotect(addr, 4096, mmap.PROT_READ | mmap.PROT_WRITE) == 0:
        report["ro_mprotect_writable"] = "allowed"
        libc.mprotect(addr, 4096, mmap.PROT_READ)
    else:
        report["ro_mprotect_writable"] = errno.errorcode[ctypes.get_errno()]
    report["fds_for_ro"] = sorted(new.values())
    report["fds_for_ro_mapped_writable"] = []
    for fd in new:
        try:
            mmap.mmap(fd, 4096, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE).close()
            report["fds_for_ro_mapped_writable"].append("mapped")
        except OSError as exc:
            report["fds_for_ro_mapped_writable"].append(errno.errorcode[exc.errno or 0])
    rw_map = kernel.xen.map_grant_ref(granter, [REF])
    page = rw_map.pages[0]
    report["rw_read"] = bytes(page[:16]).decode()
    page[16:32] = b"dom0-was-here!!!"
    for _ in range(400):
        if bytes(page[32:48]) == b"granter-saw-it!!":
            break
        kernel.sleep(0.02)
    else:
        raise RuntimeError("the granter never saw the answer")
    kernel.xen.unmap_grant_ref(rw_map)
    kernel.xen.unmap_grant_ref(ro_map)
    kernel.xen.console_io("dom0mapper: " + json.dumps(report))  # dom0's console is the hypervisor's


def ddmapper(kernel) -> None:
    """A driver domain reaching ``args.granter``'s pages (the granter's refs
    8 and 9, and its pages by frame): it asks to map, then uses grant copy.
    Reports ``ddmapper: {json}`` and holds still, to be inspected."""
    import errno
    import json

    from xmp.errors import HypercallError

    granter = int(kernel.args["granter"])
    bounce = kernel.alloc_pages(1)
    mine = kernel.page(bounce)

    def copy(src: dict, dst: dict, n: int = 16) -> int:
        return kernel.xen.grant_copy([{"source": src, "dest": dst, "len": n}])[0]

    def theirs(ref: int, offset: int = 0) -> dict:
        return {"domid": granter, "ref": ref, "offset": offset}

    def me(offset: int) -> dict:
        return {"domid": 0x7FF0, "frame": bounce, "offset": offset}

    report: dict = {}
    for _ in range(400):  # the granter runs concurrently: wait until ref 8 is there
        if copy(theirs(REF), me(0)) == 0:
            break
        kernel.sleep(0.02)
    else:
        raise RuntimeError("the grant never came")
    report["read"] = bytes(mine[:16]).decode()
    try:
        m = kernel.xen.map_grant_ref(granter, [REF])
        report["map"] = "mapped"
        kernel.xen.unmap_grant_ref(m)
    except HypercallError as exc:
        report["map"] = errno.errorcode[exc.errno]
    mine[16:32] = b"copier-was-here!"
    report["reply"] = copy(me(16), theirs(REF, 16))
    report["ro_read"] = copy(theirs(REF + 1), me(32))
    report["ro_read_bytes"] = bytes(mine[32:48]).decode()
    report["ro_write"] = copy(me(16), theirs(REF + 1, 16))
    report["ungranted_ref"] = copy(theirs(REF + 2), me(48))
    # its pages by frame, the ungranted one among them: the granter's layout is ours
    report["frames"] = [copy({"domid": granter, "frame": kernel.first_free_pfn + i}, me(64))
                        for i in range(3)]
    kernel.print("ddmapper: " + json.dumps(report))
    kernel.idle()


def flood(kernel) -> None:
    """Print many lines as fast as possible: none may be lost."""
    n = int(kernel.args.get("n", 20000))
    for i in range(n):
        kernel.print(f"line {i:06d} " + "x" * 40)
    kernel.print("flood: done")


def xsprobe(kernel) -> None:
    """A hostile xenstore guest: reports each attempt as ``xsprobe: {json}``."""
    import json

    from xmp.errors import XenStoreError

    xs = kernel.xenstore
    other = int(kernel.args.get("other", 2))

    def attempt(name, fn):
        try:
            value = fn()
            result = {"ok": True, "value": value.decode() if isinstance(value, bytes) else value}
        except XenStoreError as exc:
            result = {"ok": False, "errno": exc.errno}
        kernel.print("xsprobe: " + json.dumps({"test": name, **result}))

    attempt("read_own_name", lambda: xs.read("name"))
    attempt("read_other", lambda: xs.read(f"/local/domain/{other}/name"))
    attempt("write_other", lambda: xs.write(f"/local/domain/{other}/data/x", "evil"))
    attempt("chmod_other", lambda: xs.set_perms(f"/local/domain/{other}/data", [f"b{kernel.domid}"]))
    attempt("write_own_name", lambda: xs.write("name", "renamed"))
    attempt("write_own_data", lambda: xs.write("data/mine", "ok"))
    attempt("rm_other", lambda: xs.rm(f"/local/domain/{other}"))
    attempt("introduce", lambda: xs.introduce(other, 2, 2))

    def flood():
        for i in range(2000):
            xs.write(f"data/n{i}", "x")
        return "all 2000 written"
    attempt("node_quota", flood)
    attempt("big_node", lambda: xs.write("data/big", "y" * 4000))
    xs.watch(f"/local/domain/{other}/data", "spy")
    kernel.print("xsprobe: done")
    seen = []
    xs.on_watch("spy", seen.append)
    while True:
        kernel.sleep(0.1)
        if len(seen) > 1:  # the first event is the registration's
            kernel.print("xsprobe: spied " + seen[-1])
            seen.clear()


def xsgarbage(kernel) -> None:
    """Sends garbage on its xenstore ring: an oversized header."""
    import struct

    t = kernel.xenstore.t
    kernel.print("xsgarbage: sending")
    t.send(struct.pack("<IIII", 2, 1, 0, 100000))
    kernel.print("xsgarbage: sent")
    kernel.idle()


def memops(kernel) -> None:
    """memory_op and grant_table_op from a guest; reports ``memops: {json}``."""
    import json

    from xmp.domid import DOMID_SELF
    from xmp.errors import HypercallError

    xen = kernel.xen
    first = kernel.alloc_pages(256)
    pfns = list(range(first, first + 256))
    for pfn in pfns:
        kernel.page(pfn)[:8] = b"written!"
    report = {"max": xen.maximum_reservation(), "before": xen.current_reservation()}
    report["released"] = xen.decrease_reservation(pfns)
    report["after_release"] = xen.current_reservation()
    report["punched_reads_zero"] = all(bytes(kernel.page(p)[:8]) == bytes(8) for p in pfns)
    report["special_released"] = xen.decrease_reservation([0])  # start_info is never given back
    report["populated"] = xen.populate_physmap(pfns)
    report["after_populate"] = xen.current_reservation()
    try:
        xen.populate_physmap([first])  # already there
        report["double_populate"] = "accepted"
    except HypercallError as exc:
        report["double_populate"] = exc.errno
    report["grant_frames"] = xen.query_size()
    report["setup_table"] = xen.setup_table(2)
    # GNTTABOP_copy from a guest: its own frames, its own grant, and garbage
    a, b = first, first + 1
    kernel.page(a)[:16] = b"copied by xen ok"
    own = kernel.grant_table.grant_foreign_access(kernel.domid, b)
    me = {"domid": DOMID_SELF}

    def frame(pfn, offset=0):
        return {**me, "frame": pfn, "offset": offset}

    segs = {
        "frame_to_frame": {"source": frame(a), "dest": frame(b, 100), "len": 16},
        "frame_to_own_grant": {"source": frame(a), "dest": {**me, "ref": own, "offset": 200}, "len": 16},
        "not_a_dict": 7,
        "len_too_long": {"source": frame(a), "dest": frame(b), "len": 4097},
        "len_negative": {"source": frame(a), "dest": frame(b), "len": -1},
        "len_bool": {"source": frame(a), "dest": frame(b), "len": True},
        "crosses_page": {"source": frame(a, 4000), "dest": frame(b), "len": 200},
        "offset_4096": {"source": frame(a, 4096), "dest": frame(b), "len": 1},
        "ref_string": {"source": {**me, "ref": "8"}, "dest": frame(b), "len": 1},
        "ref_huge": {"source": {**me, "ref": 1 << 40}, "dest": frame(b), "len": 1},
        "frame_outside": {"source": frame(1 << 30), "dest": frame(b), "len": 1},
        "dom0_frame": {"source": {"domid": 0, "frame": 1}, "dest": frame(b), "len": 1},
        "no_such_domain": {"source": {"domid": 4000, "ref": 8}, "dest": frame(b), "len": 1},
        "dom0_ungranted_ref": {"source": {"domid": 0, "ref": 100}, "dest": frame(b), "len": 1},
        "dom0_ref_beyond_table": {"source": {"domid": 0, "ref": 64 * 512}, "dest": frame(b), "len": 1},
    }
    statuses = xen.grant_copy(list(segs.values()))
    report["copy"] = dict(zip(segs, statuses, strict=True))
    report["copy_data"] = [bytes(kernel.page(b)[100:116]).decode(), bytes(kernel.page(b)[200:216]).decode()]
    try:
        xen.grant_copy([segs["frame_to_frame"]] * 513)
        report["copy_513"] = "accepted"
    except HypercallError as exc:
        report["copy_513"] = exc.errno
    # the same through GNTTABOP_copy's record form: struct gnttab_copy in our memory
    from xmp.sharedmem.grant import GNTTAB_COPY, GNTTAB_COPY_STATUS, GNTCOPY_dest_gref, GNTCOPY_source_gref

    rec = kernel.alloc_pages(1)
    kernel.page(b)[:4096] = bytes(4096)
    recs = [(a, 0x7FF0, 0, b, 0x7FF0, 300, 16, 0),                       # frame to frame
            (a, 0x7FF0, 0, own, 0x7FF0, 400, 16, GNTCOPY_dest_gref),     # frame to its own grant
            (1, 0, 0, b, 0x7FF0, 0, 1, 0),                              # a frame of dom0's
            (5000, 0, 0, b, 0x7FF0, 0, 1, GNTCOPY_source_gref),         # dom0's ungranted ref
            (8, 4000, 0, b, 0x7FF0, 0, 1, GNTCOPY_source_gref)]         # no such domain
    for i, r in enumerate(recs):
        GNTTAB_COPY.pack_into(kernel.page(rec), i * GNTTAB_COPY.size, *r, 99)
    xen.grant_copy_records(rec, len(recs))
    report["records"] = [int.from_bytes(kernel.page(rec)[i * 40 + GNTTAB_COPY_STATUS:i * 40 + 38], "little",
                                        signed=True) for i in range(len(recs))]
    report["records_data"] = [bytes(kernel.page(b)[at:at + 16]).decode() for at in (300, 400)]
    for name, pfn, count in (("records_513", rec, 513), ("records_0", rec, 0),
                             ("records_outside", len(kernel.memory) // 4096 - 1, 103)):
        try:
            xen.grant_copy_records(pfn, count)
            report[name] = "accepted"
        except HypercallError as exc:
            report[name] = exc.errno
    xen.sched_yield()
    kernel.print("memops: " + json.dumps(report))
    kernel.idle()


# -- vbd (blkif) ----------------------------------------------------------------

VBD = 51712  # xvda


def blk_pattern(sector: int, size: int) -> bytes:
    """The bytes the vbd tests write at ``sector`` (the test recomputes them)."""
    import random

    return random.Random(f"{sector}/{size}").randbytes(size)


BLK_CASES = [(1, 512), (9, 4096), (100, 44 * 1024), (1001, 1024 * 1024), (5000, 11 * 4096 + 1536)]


def _blkreport(kernel, test: str, **fields) -> None:
    import json

    kernel.print("blktest: " + json.dumps({"test": test, **fields}))


def _wait_go(kernel, key: str) -> None:
    """Wait until the test writes data/<key> in our xenstore directory."""
    while kernel.xenstore.read_or(f"data/{key}") is None:
        kernel.sleep(0.05)


def blkcheck(kernel) -> None:
    """The vbd end to end: integrity, bounds, throughput, flush, discard."""
    import time

    from xmp.drivers.blk.frontend import BlockIOError, attach

    dev = attach(kernel, int(kernel.args.get("devid", VBD)))
    _blkreport(kernel, "info", sectors=dev.sectors, size=dev.size, sector_size=dev.sector_size,
               readonly=dev.readonly, features=dev.features)
    for sector, size in BLK_CASES:
        dev.write(sector, blk_pattern(sector, size))
    bad = [[s, n] for s, n in BLK_CASES if dev.read(s, n // 512) != blk_pattern(s, n)]
    dev.flush()
    _blkreport(kernel, "integrity", ok=not bad, bad=bad)

    results = {}
    for name, fn in {"read_past_end": lambda: dev.read(dev.sectors - 1, 2),
                     "write_past_end": lambda: dev.write(dev.sectors, bytes(512)),
                     "discard_past_end": lambda: dev.discard(dev.sectors - 8, 16)}.items():
        try:
            fn()
            results[name] = "accepted"
        except BlockIOError as exc:
            results[name] = exc.status
    results["after"] = dev.read(BLK_CASES[0][0], 1) == blk_pattern(*BLK_CASES[0])
    _blkreport(kernel, "bounds", **results)

    mib = 1024 * 1024
    data = blk_pattern(0, mib)
    base, n = 20480, int(kernel.args.get("rounds", 32))
    t0 = time.monotonic()
    for i in range(n):
        dev.write(base + (i % 4) * 2048, data)
    t1 = time.monotonic()
    ok = True
    for i in range(n):
        ok = dev.read(base + (i % 4) * 2048, 2048) == data and ok
    t2 = time.monotonic()
    _blkreport(kernel, "throughput", ok=ok, write_mbs=round(n / (t1 - t0), 1),
               read_mbs=round(n / (t2 - t1), 1))

    # discard: 1 MiB written and flushed, then all but its first and last sector discarded
    d = 16384
    dev.write(d, blk_pattern(d, mib))
    dev.flush()
    _blkreport(kernel, "discard_ready")
    _wait_go(kernel, "discard")
    dev.discard(d + 1, 2046)
    dev.flush()
    back = dev.read(d, 2048)
    _blkreport(kernel, "discard", zeros=back[512:-512] == bytes(mib - 1024),
               edges=back[:512] == blk_pattern(d, mib)[:512] and back[-512:] == blk_pattern(d, mib)[-512:])
    kernel.idle()


# sizes in sectors: 1 sector .. 12 MiB, page-aligned and not, around the 11- and 256-segment limits
BLK_MATRIX_SIZES = [1, 7, 8, 9, 88, 89, 95, 2047, 2048, 2049, 4096 + 3, 8192, 24576 + 1]


def blkmatrix(kernel) -> None:
    """blkfront with the settings in ``args.front`` (see blkfront.configure):
    every size of BLK_MATRIX_SIZES written and read back, at aligned and odd
    sectors; then 256 random 4 KiB writes and reads kept 32 in flight; every
    byte compared.  Reports what was negotiated and the verdict, and leaves
    the data for the test to compare with the image after its flush."""
    import random

    from xmp.drivers.blk import frontend

    frontend.configure(kernel, **kernel.args.get("front", {}))
    dev = frontend.attach(kernel, VBD)
    _blkreport(kernel, "negotiated", persistent=dev.persistent, max_segments=dev.max_segments,
               ring_page_order=dev.ring_page_order, queues=len(dev.active))
    bad = []
    at = 0
    for n in BLK_MATRIX_SIZES:
        for sector in (at, at + 3):  # page-aligned, then not
            dev.write(sector, blk_pattern(sector, n * 512))
            if dev.read(sector, n) != blk_pattern(sector, n * 512):
                bad.append([sector, n])
        at += 2 * n + 8
    # asynchronous: 32 in flight, writes then reads of distinct 4 KiB blocks
    rng = random.Random(5)
    base = at + 8 - at % 8
    blocks = rng.sample(range(2048), 256)
    ios = [dev.submit_write(base + b * 8, blk_pattern(base + b * 8, 4096)) for b in blocks[:32]]
    queue = list(blocks[32:])
    while ios:
        for io in dev.wait_any(ios):
            ios.remove(io)
            io.result()
            if queue:
                b = queue.pop()
                ios.append(dev.submit_write(base + b * 8, blk_pattern(base + b * 8, 4096)))
    reads = {b: dev.submit_read(base + b * 8, 8) for b in blocks}
    dev.wait(list(reads.values()))
    bad += [[base + b * 8, 8] for b, io in reads.items() if io.result() != blk_pattern(base + b * 8, 4096)]
    dev.flush()
    _blkreport(kernel, "matrix", ok=not bad, bad=bad[:5], async_base=base, blocks=blocks,
               reissued=dev.reissued)
    kernel.idle()


def blkro(kernel) -> None:
    """A read-only vbd: writes and discards fail, reads work."""
    from xmp.drivers.blk.frontend import BlockIOError, attach

    dev = attach(kernel, VBD)
    results: dict = {"readonly": dev.readonly, "read": dev.read(0, 8)[:16].hex()}
    for name, fn in {"write": lambda: dev.write(0, bytes(512)), "discard": lambda: dev.discard(0, 8)}.items():
        try:
            fn()
            results[name] = "accepted"
        except BlockIOError as exc:
            results[name] = exc.status
    results["read_after"] = dev.read(0, 8)[:16].hex()
    _blkreport(kernel, "readonly", **results)
    kernel.idle()


def blkloop(kernel) -> None:
    """Write, read back and check, forever; ``blkloop: N verified`` every 20."""
    from xmp.drivers.blk.frontend import attach

    dev = attach(kernel, VBD)
    i = 0
    while True:
        sector = (i % 64) * 24
        data = blk_pattern(i, 12 * 1024)
        dev.write(sector, data)
        if dev.read(sector, 24) != data:
            raise AssertionError(f"blkloop: round {i} read back wrong")
        i += 1
        if i % 20 == 0:
            kernel.print(f"blkloop: {i} verified, {dev.reissued} re-issued")
        interval = float(kernel.args.get("interval", 0.005))
        if interval:
            kernel.sleep(interval)


def blkhostile(kernel) -> None:
    """A hostile vbd frontend: its own ring, raw garbage requests; reports
    each answer, then pushes a producer index far past the ring."""
    import struct

    from xmp.drivers.blk import protocol
    from xmp.drivers.xenbus.device import FrontendDriver, frontend_bus
    from xmp.sharedmem.ring import FrontRing

    class Hostile(FrontendDriver):
        devtype = "vbd"

        def __init__(self):
            self.ring_pfn = kernel.alloc_pages(1)
            self.data_pfn = kernel.alloc_pages(1)
            self.ind_pfn = kernel.alloc_pages(2)  # indirect pages: a bad one, a good one
            self.ring = None
            self.port = None
            self.up = False

        def setup(self, dev):
            self.ring = FrontRing(kernel.page(self.ring_pfn), protocol.REQUEST_SIZE, protocol.RESPONSE_SIZE)
            ref = kernel.grant_table.grant_foreign_access(dev.otherend_id, self.ring_pfn)
            self.data_gref = kernel.grant_table.grant_foreign_access(dev.otherend_id, self.data_pfn)
            self.ind_grefs = [kernel.grant_table.grant_foreign_access(dev.otherend_id, self.ind_pfn + i)
                              for i in range(2)]
            self.port = kernel.xen.alloc_unbound(dev.otherend_id)
            dev.write("ring-ref", ref)
            dev.write("event-channel", self.port)
            dev.write("protocol", "x86_64-abi")
            self.dev = dev

        def connected(self, dev):
            self.sectors = int(dev.read_other("sectors"))
            self.up = True

    drv: list[Hostile] = []
    bus = frontend_bus(kernel.xenstore, "vbd", lambda: drv.append(Hostile()) or drv[-1])
    kernel.loop.run_until(lambda: bool(drv) and drv[0].up, 30)
    h = drv[0]
    ring = h.ring
    head = struct.Struct("<BBH4xQQ")
    seg = struct.Struct("<IBB2x")

    def rw(op, nr, req_id, sector, segs):
        body = head.pack(op, nr, VBD, req_id, sector) + b"".join(seg.pack(*s) for s in segs)
        return body.ljust(112, b"\0")

    good = (h.data_gref, 0, 7)
    kernel.page(h.ind_pfn)[:16] = seg.pack(h.data_gref, 0, 7) + seg.pack(h.data_gref, 3, 9)
    kernel.page(h.ind_pfn + 1)[:8] = seg.pack(*good)

    def indirect(req_id, indirect_op, nr, gref):
        return struct.pack("<BBH4xQQH2x8I4x", 6, indirect_op, nr, req_id, 0, VBD, gref,
                           *[0] * 7).ljust(112, b"\0")

    requests = {
        "unknown_op": rw(9, 1, 101, 0, [good]),
        "twelve_segments": rw(0, 12, 102, 0, [good] * 11),
        "last_sect_9": rw(0, 1, 103, 0, [(h.data_gref, 0, 9)]),
        "first_after_last": rw(1, 1, 104, 0, [(h.data_gref, 5, 2)]),
        "bad_gref": rw(0, 1, 105, 0, [(4000, 0, 7)]),
        "past_end": rw(0, 1, 106, h.sectors, [good]),
        "wrapping_sector": rw(1, 1, 107, 2**64 - 4, [good]),
        "zero_segments": rw(0, 0, 108, 0, []),
        "indirect_bad_segment": indirect(109, 0, 2, h.ind_grefs[0]),
        "discard_past_end": struct.pack("<BBH4xQQQ", 5, 0, VBD, 110, h.sectors - 1, 2).ljust(112, b"\0"),
        "barrier": rw(2, 0, 111, 0, []),
        "valid_read": rw(0, 1, 112, 0, [good]),
        "indirect_257_segments": indirect(113, 0, 257, h.ind_grefs[1]),
        "indirect_op_discard": indirect(114, 5, 1, h.ind_grefs[1]),
        "indirect_bad_gref": indirect(115, 1, 1, 4000),
        "indirect_valid_write": indirect(116, 1, 1, h.ind_grefs[1]),
    }
    for raw in requests.values():
        ring.put_request(raw)
    if ring.push_requests_and_check_notify():
        kernel.xen.notify(h.port)
    got: dict[int, tuple[int, int]] = {}

    padding: set[bytes] = set()  # every answer's padding bytes (XSA-216: never stale memory)

    def answered():
        rsps = ring.get_responses()
        for i in range(0, len(rsps), 16):
            rid, op, status = struct.unpack_from("<QBxh", rsps, i)
            got[rid] = (op, status)
            padding.add(rsps[i + 9:i + 10] + rsps[i + 12:i + 16])
        return len(got) >= len(requests)

    kernel.loop.run_until(answered, 20)
    for i, name in enumerate(requests):
        op, status = got.get(101 + i, (None, None))
        _blkreport(kernel, "hostile", name=name, id=101 + i, op=op, sent_op=requests[name][0], status=status)
    # XSA-155: a request rewritten while the backend reads it -- its sector and
    # segment flipping between a valid READ and a wrapping sector with last_sect 9 --
    # is read once: OKAY or ERROR, nothing else.  Only bytes 16.. flip: the answer
    # lands in the same slot, over bytes 0..15.
    ring_page = kernel.page(h.ring_pfn)
    flips = {0: 0, -1: 0}
    for n in range(100):
        rid = 300 + n
        slot = 64 + (ring.req_prod_pvt % 32) * 112 + 16
        versions = [v[16:] for v in (rw(0, 1, rid, 0, [good]),
                                     rw(0, 1, rid, 2**64 - 4, [(h.data_gref, 0, 9)]))]
        ring.put_request(rw(0, 1, rid, 0, [good]))
        ring.push_requests_and_check_notify()
        kernel.xen.notify(h.port)
        flip = 0
        while not ring.unconsumed_responses():
            flip ^= 1
            ring_page[slot:slot + 96] = versions[flip]
        got.clear()
        answered()
        status = got.get(rid, (None, None))[1]
        flips[status] = flips.get(status, 0) + 1
    _blkreport(kernel, "flipped", statuses={str(k): v for k, v in flips.items()},
               padding=sorted(p.hex() for p in padding))
    _wait_go(kernel, "overflow")
    struct.pack_into("<I", kernel.page(h.ring_pfn), 0, (ring.req_prod_pvt + 100000) & 0xFFFFFFFF)
    kernel.xen.notify(h.port)
    _blkreport(kernel, "overflowed")
    kernel.vbd_bus = bus
    # closed by the backend; starting over (Initialising) brings a working device back
    _wait_go(kernel, "reconnect")
    from xmp.drivers.xenbus.state import XenbusState

    h.up = False
    h.dev.switch(XenbusState.INITIALISING)
    kernel.loop.run_until(lambda: h.up, 30)
    ring = h.ring
    ring.put_request(rw(0, 1, 200, 0, [(h.data_gref, 0, 7)]))
    if ring.push_requests_and_check_notify():
        kernel.xen.notify(h.port)
    got.clear()
    kernel.loop.run_until(lambda: answered() or 200 in got, 20)
    _blkreport(kernel, "reconnected", up=h.up, status=got.get(200, (None, None))[1])
    kernel.idle()


def blkuser(kernel) -> None:
    """Waits for a hot-plugged xvdb, uses it, then idles."""
    disk = kernel.block("xvdb")
    disk.write(0, b"hot" * 512)
    assert disk.read(0, 3) == b"hot" * 512
    kernel.print(f"blkuser: xvdb has {disk.sectors} sectors")
    kernel.idle()


def blktwo(kernel) -> None:
    """Two disks at once (xvda from dom0, xvdb from a driver domain): 64
    writes of 64 KiB to each, interleaved and in flight together, then read
    back from both; reports the verdict."""
    a, b = kernel.block("xvda"), kernel.block("xvdb")
    ios = []
    for i in range(64):
        ios.append(a.submit_write(i * 128, blk_pattern(i * 128, 65536)))
        ios.append(b.submit_write(i * 128, blk_pattern(i * 128 + 1, 65536)))
    a.wait([io for io in ios[::2]])
    b.wait([io for io in ios[1::2]])
    for io in ios:
        io.result()
    a.flush()
    b.flush()
    ok = all(a.read(i * 128, 128) == blk_pattern(i * 128, 65536)
             and b.read(i * 128, 128) == blk_pattern(i * 128 + 1, 65536) for i in range(64))
    _blkreport(kernel, "two", ok=ok, sizes=[a.size, b.size])
    kernel.idle()


def blkcycle(kernel) -> None:
    """xvdb hot-plugged and unplugged again and again: each time it comes,
    write and check a block, say so, and wait for it to go."""

    i = 0
    while True:
        disk = kernel.block("xvdb")
        disk.write(0, blk_pattern(i, 4096))
        ok = disk.read(0, 8) == blk_pattern(i, 4096)
        kernel.print(f"blkcycle: {i} {'ok' if ok else 'BAD'}")
        kernel.loop.run_until(lambda bus=disk.bus: "device/vbd/51728" not in bus.devices)
        i += 1


def blkstress(kernel) -> None:
    """Random reads and writes for ``args.seconds``, ``args.depth`` in flight:
    each op takes one 64 KiB chunk of the disk to itself (nothing in flight
    overlaps) and a random sector range in it; every sector's latest
    generation is remembered and every read checked against it.  Prints
    ``blkstress: OK <ops> ops`` or ``blkstress: FAILED <why>``."""
    import random
    import struct
    import time
    from array import array

    disk = kernel.block("xvda")
    rng = random.Random(kernel.domid)
    chunk = 128  # sectors
    nchunks = disk.sectors // chunk
    gen = array("I", bytes(4 * disk.sectors))  # 0: never written (reads zeros)

    def pattern(first: int, count: int, g: int) -> bytes:
        return b"".join(struct.pack("<QQ", s, g) * 32 if g else bytes(512)
                        for s in range(first, first + count))

    busy: set[int] = set()
    inflight: dict = {}
    ops = 0
    end = time.monotonic() + float(kernel.args.get("seconds", 2))
    depth = int(kernel.args.get("depth", 8))
    while time.monotonic() < end or inflight:
        while time.monotonic() < end and len(inflight) < depth:
            c = rng.randrange(nchunks)
            if c in busy:
                continue
            first = c * chunk + rng.randrange(chunk)
            count = rng.randint(1, c * chunk + chunk - first)
            if rng.random() < 0.5:
                g = ops + 1
                io = disk.submit_write(first, b"".join(struct.pack("<QQ", s, g) * 32
                                                       for s in range(first, first + count)))
                inflight[io] = (c, first, count, g)
            else:
                inflight[io := disk.submit_read(first, count)] = (c, first, count, None)
            busy.add(c)
            ops += 1
        for io in disk.wait_any(list(inflight)):
            c, first, count, g = inflight.pop(io)
            busy.discard(c)
            data = io.result()
            if g is not None:
                gen[first:first + count] = array("I", [g] * count)
                continue
            for i in range(count):
                if data[i * 512:(i + 1) * 512] != pattern(first + i, 1, gen[first + i]):
                    kernel.print(f"blkstress: FAILED sector {first + i} is not generation {gen[first + i]}")
                    return
    kernel.print(f"blkstress: OK {ops} ops")


def xsfirst(kernel) -> None:
    """Its first act is a xenstore request that waits for its answer."""
    kernel.print("xsfirst: my name is " + kernel.xenstore.read("name").decode())


def evthostile(kernel) -> None:
    """A guest that goes for dom0's event state with every descriptor it
    was handed (found in /proc/self/fd, not through xmp's bookkeeping):
    reports each attempt as ``evthostile: {json}``, then keeps scribbling
    over every page of another domain it can write."""
    import json
    import mmap
    import os
    import re

    kernel.xenstore.read("name")  # a notify to dom0: its route is learned
    me = kernel.domid
    held = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            held[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            pass

    def read_only(fd):
        with open(f"/proc/self/fdinfo/{fd}") as f:
            flags = next(int(line.split()[1], 8) for line in f if line.startswith("flags:"))
        return flags & os.O_ACCMODE == os.O_RDONLY

    # the wake pages of its peers (its own, a dup that Python's mmap keeps, is read-write)
    wakes = [fd for fd, target in held.items() if target.startswith("/memfd:xmp-wake") and read_only(fd)]

    def attempt(name, fn):
        try:
            result = {"ok": True, "value": fn()}
        except OSError as exc:
            result = {"ok": False, "errno": exc.errno}
        except IndexError:  # it was handed no wake page at all
            result = {"ok": False, "errno": None}
        kernel.print("evthostile: " + json.dumps({"test": name, **result}))

    def reopened_rw():
        fd = os.open(f"/proc/self/fd/{wakes[0]}", os.O_RDWR)
        try:
            mmap.mmap(fd, 4096)[0] = 0
        finally:
            os.close(fd)

    writable = {}  # label -> a writable mapping of it
    for fd, target in held.items():
        m = re.search(r"^/dev/shm/xmp\.\d+\.[0-9a-f]+\.([a-z0-9-]+)\.", target)
        if m:
            try:
                writable.setdefault(m.group(1), mmap.mmap(fd, min(os.fstat(fd).st_size, 16384)))
            except OSError:
                pass
        elif target.startswith("/memfd:"):
            try:
                writable.setdefault(target, mmap.mmap(fd, 4096))
            except OSError:
                pass

    attempt("wake_mmap_rw", lambda: mmap.mmap(wakes[0], 4096).close())
    attempt("wake_write", lambda: os.pwrite(wakes[0], b"\0\0\0\0", 0))
    attempt("wake_reopen_rw", reopened_rw)
    attempt("wake_reopen_ro", lambda: os.close(os.open(f"/proc/self/fd/{wakes[0]}", os.O_RDONLY)))
    attempt("wake_truncate", lambda: os.ftruncate(wakes[0], 0))
    attempt("writable_shared", lambda: sorted(writable))
    # everything of another domain it can write (what is its own -- its RAM,
    # event object, the doorbells it receives on -- it may spoil for itself)
    targets = [m for label, m in writable.items()
               if label not in (f"ram{me}", f"evt{me}") and not label.startswith(f"db{me}-")]
    kernel.print("evthostile: done")
    n = 0
    while True:  # keep it garbage (and sometimes zero: "clearing" what it could)
        for m in targets:
            m[:] = (b"\xff" if n % 2 == 0 else b"\0") * len(m)
        n += 1
        kernel.sleep(0.01)


def xspinger(kernel) -> None:
    """xenstore round trips, forever: ``xspinger: N`` every 20."""
    xs = kernel.xenstore
    n = 0
    while True:
        xs.write("data/ping", str(n))
        assert xs.read("data/ping") == str(n).encode()
        n += 1
        if n % 20 == 0:
            kernel.print(f"xspinger: {n}")
        kernel.sleep(0.005)


def evtstorm(kernel) -> None:
    """Notifies dom0 on its store port as fast as it can, forever."""
    port = kernel.start_info.store_evtchn
    kernel.xenstore.read("name")  # the route to dom0 is learned
    kernel.print("evtstorm: storming")
    notify = kernel.xen.notify
    while True:
        for _ in range(10000):
            notify(port)
        kernel.loop.poll(0)  # keep its own devices (console, control) served


def blkdirty(kernel) -> None:
    """A guest's whole life with a disk, for the lifecycle tests: dirty
    ``args.mib`` MiB of its own RAM, write and read back xvda, say "ready",
    then power off (``args.poweroff``) or idle until it is killed."""
    disk = kernel.block("xvda")
    pages = int(kernel.args.get("mib", 0)) * 256
    if pages:
        pfn = kernel.alloc_pages(pages)
        memoryview(kernel.memory)[pfn * 4096:(pfn + pages) * 4096] = b"\xa5" * (pages * 4096)
    data = blk_pattern(kernel.domid, 65536)
    disk.write(0, data)
    disk.flush()
    ok = disk.read(0, 128) == data
    kernel.print(f"blkdirty: {'ready' if ok else 'BAD'}")
    if kernel.args.get("poweroff"):
        kernel.poweroff()
    kernel.idle()


def conshostile(kernel) -> None:
    """Breaks its own console ring: once its greeting is drained, it sets
    ``out_prod`` 0x7FFFFFF0 past ``out_cons`` and kicks xenconsoled; then it
    lives on, saying so in xenstore (its console is gone)."""
    import struct

    from xmp.sharedmem.bytering import CONSOLE_OUT

    kernel.print("conshostile: breaking my console ring")
    out = kernel.console.out
    kernel.loop.run_until(lambda: out.available() == 0, 10)
    page = kernel.page(kernel.start_info.console_mfn)
    cons = struct.unpack_from("<I", page, CONSOLE_OUT.cons)[0]
    struct.pack_into("<I", page, CONSOLE_OUT.prod, (cons + 0x7FFFFFF0) & 0xFFFFFFFF)
    kernel.xen.notify(kernel.start_info.console_evtchn)
    n = 0
    while True:
        n += 1
        kernel.xenstore.write("data/alive", str(n))
        kernel.sleep(0.1)


def consflood(kernel) -> None:
    """Writes its console as fast as it can, forever (a flood of ``args.line``-byte lines)."""
    size = int(kernel.args.get("line", 1000))
    n = 0
    while True:
        n += 1
        kernel.print(f"flood {n:09d} " + "y" * (size - 17))


def conssink(kernel) -> None:
    """Reads nothing for ``args.delay`` seconds, then ``args.n`` bytes of
    console input, and reports their length and sha256."""
    import hashlib

    kernel.print("conssink: ready")
    kernel.sleep(float(kernel.args.get("delay", 3)))
    want, got = int(kernel.args["n"]), bytearray()
    while len(got) < want:
        data = kernel.console.read()
        if not data:
            kernel.loop.run_until(lambda: kernel.console.inp.available() > 0, 1.0)
        got += data
    kernel.print(f"conssink: got {len(got)} bytes sha256 {hashlib.sha256(got).hexdigest()}")
    kernel.idle()


def xstimeout(kernel) -> None:
    """Writes ``data/tick`` in a loop with a short xenstore timeout
    (``args.timeout``); reports each ETIMEDOUT, and after the first, that a
    value it writes reads back as itself (no late reply taken for another)."""
    import time

    from xmp.errors import XenStoreError

    xs = kernel.xenstore
    xs.timeout = float(kernel.args.get("timeout", 2))
    n, timed_out = 0, False
    while True:
        n += 1
        start = time.monotonic()
        try:
            xs.write("data/tick", str(n))
            if timed_out:
                xs.write("data/check", f"after-{n}")
                got = xs.read("data/check").decode()
                kernel.print(f"xstimeout: read back {got} for after-{n}")
                timed_out = False
        except XenStoreError as exc:
            kernel.print(f"xstimeout: {exc.errno} after {time.monotonic() - start:.1f} s")
            timed_out = True
        kernel.sleep(0.1)


def xsbadring(kernel) -> None:
    """Breaks its xenstore ring (``args.mode``: "idx", a req_prod 5000 past
    req_cons; "proto", a header claiming a 100000-byte payload), then
    reports the page's ``error`` and ``server_features`` fields once
    xenstored has set the error (or after 10 s)."""
    import struct

    from xmp.sharedmem.bytering import XENSTORE_REQ, XS_ERROR, XS_SERVER_FEATURES

    xs = kernel.xenstore
    xs.read("name")  # connected and served first
    si = kernel.start_info
    page = kernel.page(si.store_mfn)
    if kernel.args.get("mode", "idx") == "idx":
        cons = struct.unpack_from("<I", page, XENSTORE_REQ.cons)[0]
        struct.pack_into("<I", page, XENSTORE_REQ.prod, (cons + 5000) & 0xFFFFFFFF)
        kernel.xen.notify(si.store_evtchn)
    else:
        xs.t.send(struct.pack("<IIII", 2, 99, 0, 100000))
    for _ in range(200):
        if struct.unpack_from("<I", page, XS_ERROR)[0]:
            break
        kernel.sleep(0.05)
    error = struct.unpack_from("<I", page, XS_ERROR)[0]
    features = struct.unpack_from("<I", page, XS_SERVER_FEATURES)[0]
    kernel.print(f"xsbadring: error={error} server_features={features}")
    kernel.idle()


def scribbler(kernel) -> None:
    """Write a counter into each of ``args.pages`` pages of its own, pass
    after pass, and never anywhere else; grant dom0 one more page (ref 8)
    that it never writes itself; says which pfns first."""
    n = int(kernel.args.get("pages", 16))
    pfn = kernel.alloc_pages(n + 1)
    pages = [kernel.page(pfn + i) for i in range(n)]
    kernel.grant_table.grant_access(REF, 0, pfn + n)
    kernel.print(f"scribbler: pfns {pfn} {n} granted {pfn + n}")
    count = 0
    while True:
        count += 1
        word = count.to_bytes(8, "little")
        for i, page in enumerate(pages):
            off = (count * 8 + i * 64) % 4096
            page[off:off + 8] = word
        kernel.sleep(0.002)


def logdirty(kernel) -> None:
    """dom0's workload: put dom``args.guest`` in log-dirty mode
    (``args.tracker``), CLEAN ``args.rounds`` rounds 50 ms apart, write its
    granted page through a grant mapping and CLEAN, grant-copy into it (both
    forms) and CLEAN after each, PEEK once, turn it off,
    and report each round's dirty pfns (the reserved ones only as whether
    all were there): ``logdirty: {json}``."""
    import base64
    import json

    from xmp.errors import HypercallError
    from xmp.sharedmem.logdirty import bitmap_pfns
    from xmp.startinfo import first_free_pfn

    guest = int(kernel.args.get("guest", 1))
    reserved = set(range(first_free_pfn(64)))  # the guest's rings and grant table
    report: dict = {"rounds": [], "reserved_dirty": []}

    def pfns(r) -> list[int]:
        """The round's dirty pfns but the reserved ones (noting whether those were all in)."""
        got = bitmap_pfns(base64.b64decode(r["bitmap"]), r["first"])
        report["reserved_dirty"].append(reserved <= set(got))
        return [p for p in got if p not in reserved]

    for _ in range(400):
        try:
            report["tracker"] = kernel.xen.call("domctl", "shadow_op", domid=guest, sop=2,
                                                tracker=kernel.args.get("tracker", "userfaultfd"))["tracker"]
            break
        except HypercallError:  # ESRCH until the guest exists
            kernel.sleep(0.02)
    try:
        kernel.xen.call("domctl", "shadow_op", domid=guest, sop=2)
    except HypercallError as exc:
        report["enable_twice"] = exc.errno
    for _ in range(int(kernel.args.get("rounds", 10))):
        kernel.sleep(0.05)
        r = kernel.xen.call("domctl", "shadow_op", domid=guest, sop=11)
        report["rounds"].append(pfns(r))
        report["broken"] = r["broken"]
    m = kernel.xen.map_grant_ref(guest, [REF])  # written only through dom0's mapping
    m.pages[0][:8] = b"dom0-was"
    kernel.xen.unmap_grant_ref(m)
    r = kernel.xen.call("domctl", "shadow_op", domid=guest, sop=11)
    report["after_unmap"] = pfns(r)
    # grant copies into the page (the hypervisor writes it), in both of GNTTABOP_copy's forms
    from xmp.sharedmem.grant import GNTTAB_COPY, GNTCOPY_dest_gref

    bounce = kernel.alloc_pages(2)
    kernel.page(bounce)[:8] = b"copied!!"
    seg = {"source": {"domid": 0x7FF0, "frame": bounce, "offset": 0},
           "dest": {"domid": guest, "ref": REF, "offset": 8}, "len": 8}
    report["copy_status"] = kernel.xen.grant_copy([seg])
    r = kernel.xen.call("domctl", "shadow_op", domid=guest, sop=11)
    report["after_copy"] = pfns(r)
    GNTTAB_COPY.pack_into(kernel.page(bounce + 1), 0, bounce, 0x7FF0, 0, REF, guest, 16, 8,
                          GNTCOPY_dest_gref, 1)
    kernel.xen.grant_copy_records(bounce + 1, 1)
    report["records_status"] = GNTTAB_COPY.unpack_from(kernel.page(bounce + 1))[-1]
    r = kernel.xen.call("domctl", "shadow_op", domid=guest, sop=11)
    report["after_records"] = pfns(r)
    r = kernel.xen.call("domctl", "shadow_op", domid=guest, sop=12, first=8, pages=8)
    report["peek_window"] = [r["first"], r["pages"], bitmap_pfns(base64.b64decode(r["bitmap"]), r["first"])]
    report["refusals"] = {}
    for name, kw in (("unknown_op", {"domid": guest, "sop": 99}),
                     ("no_pages", {"domid": guest, "sop": 11, "pages": 0}),
                     ("no_domain", {"domid": 999, "sop": 11}), ("dom0", {"domid": 0, "sop": 2}),
                     ("not_int", {"domid": guest, "sop": "11"})):
        try:
            kernel.xen.call("domctl", "shadow_op", **kw)
            report["refusals"][name] = 0
        except HypercallError as exc:
            report["refusals"][name] = exc.errno
    kernel.xen.call("domctl", "shadow_op", domid=guest, sop=0)
    try:
        kernel.xen.call("domctl", "shadow_op", domid=guest, sop=11)
    except HypercallError as exc:
        report["clean_when_off"] = exc.errno
    kernel.xen.console_io("logdirty: " + json.dumps(report))
