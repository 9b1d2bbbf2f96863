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
