"""Guest kernels used only by the tests (the domain processes import them
through PYTHONPATH, which xmphost.Host sets)."""

from __future__ import annotations

from xmp.errors import GrantError
from xmp.sharedmem.grant import GTF_reading, GTF_writing

REF = 8  # the first ref that is not reserved


def granter(kernel) -> None:
    """Grant one page to ``args.to`` at ref 8, and report its flags as they
    change; once the grantee's mapping is gone, end access."""
    pfn = kernel.first_free_pfn
    page = kernel.page(pfn)
    page[:16] = b"granted-page-123"
    kernel.grant_table.grant_access(REF, int(kernel.args["to"]), pfn)
    kernel.print(f"granter: granted ref {REF}")
    last, was_mapped = None, False
    while True:
        flags = kernel.grant_table.entry(REF)[0]
        if flags != last:
            kernel.print(f"granter: flags={flags:#x} reply={bytes(page[16:32])!r}")
            last = flags
        if flags & (GTF_reading | GTF_writing):
            was_mapped = True
        elif was_mapped:
            kernel.grant_table.end_foreign_access(REF)
            kernel.print("granter: ended")
            kernel.idle()
        kernel.sleep(0.05)


def mapper(kernel) -> None:
    """A trusted backend: map the granter's ref 8, read it, answer in it, hold it.
    The granter runs concurrently: until it has granted, the map is refused."""
    for _ in range(200):
        try:
            m = kernel.xen.map_grant_ref(int(kernel.args["granter"]), [REF])
            break
        except GrantError:
            kernel.sleep(0.02)
    else:
        raise RuntimeError("the grant never came")
    page = m.pages[0]
    kernel.print(f"mapper: read {bytes(page[:16])!r}")
    page[16:32] = b"mapper-was-here!"
    kernel.print("mapper: holding")
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
    xen.sched_yield()
    kernel.print("memops: " + json.dumps(report))
    kernel.idle()
