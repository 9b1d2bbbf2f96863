"""Guest kernels of the balloon tests (importable by the domains through
PYTHONPATH, as kernels.py)."""

from __future__ import annotations

import hashlib
import json

from xmp.domain_proc.pages import BALLOONED, FREE

KEEP = 64  # pages a filler keeps in use with known data while it balloons


def _pattern(pfn: int) -> bytes:
    return hashlib.sha256(pfn.to_bytes(8, "little")).digest() * 128  # 4096 bytes


def filler(kernel) -> None:
    """Write every free page (so the host really holds them), keep KEEP
    pages in use with known contents, give the rest back to the allocator;
    then report whenever the reservation changes, checking the kept pages."""
    pages = kernel.pages
    n = pages.count(FREE)
    first = kernel.alloc_pages(n)
    for pfn in range(first, first + n):
        kernel.page(pfn)[:] = _pattern(pfn)
    kernel.free_pages(first + KEEP, n - KEEP)
    kernel.print(f"filler: ready kept={KEEP} touched={n}")
    last = None
    while True:
        state = (kernel.xen.current_reservation(), pages.count(FREE), pages.count(BALLOONED))
        if state != last:
            intact = all(bytes(kernel.page(p)) == _pattern(p) for p in range(first, first + KEEP))
            kernel.print(f"filler: reservation={state[0]} free={state[1]} ballooned={state[2]} "
                         f"kept_intact={intact}")
            last = state
        kernel.sleep(0.05)


def deaf(kernel) -> None:
    """A guest without a working balloon driver: memory/target is ignored."""
    kernel.xenstore.on_watch("memory/target", lambda _path: None)
    kernel.print("deaf: ready")
    kernel.idle()


def careless(kernel) -> None:
    """A careless driver: it grants pages to dom0 and frees them to the
    allocator without ending the grants.  The balloon must still never give
    those pages away.  Reports ``careless: {json}`` at every change."""
    pages = kernel.pages
    granted = kernel.alloc_pages(8)
    for i in range(8):
        kernel.page(granted + i)[:16] = b"still-granted-%02d" % i
        kernel.grant_table.grant_access(8 + i, 0, granted + i)
    kernel.free_pages(granted, 8)
    last = None
    while True:
        state = {"reservation": kernel.xen.current_reservation(), "free": pages.count(FREE),
                 "granted_state": [pages.state[granted + i] for i in range(8)],
                 "granted_intact": all(bytes(kernel.page(granted + i)[:16]) == b"still-granted-%02d" % i
                                       for i in range(8))}
        if state != last:
            kernel.print("careless: " + json.dumps(state))
            last = state
        kernel.sleep(0.05)


def mapped(kernel) -> None:
    """Grant a page to dom0 (kernels.dom0mapper maps it) and, while dom0
    holds it mapped, try to give it back with decrease_reservation."""
    from xmp.sharedmem.grant import GTF_writing

    pfn = kernel.alloc_pages(3)
    page = kernel.page(pfn)
    page[:16] = b"granted-page-123"
    kernel.page(pfn + 1)[:16] = b"read-only-page!!"
    kernel.grant_table.grant_access(8, 0, pfn)
    kernel.grant_table.grant_access(9, 0, pfn + 1, readonly=True)
    while bytes(page[16:32]) != b"dom0-was-here!!!":
        kernel.sleep(0.02)
    report = {"mapped": bool(kernel.grant_table.entry(8)[0] & GTF_writing),
              "before": kernel.xen.current_reservation()}
    report["given"] = kernel.xen.decrease_reservation([pfn])
    report["after"] = kernel.xen.current_reservation()
    report["still_there"] = bytes(page[:32]).decode()
    page[32:48] = b"granter-saw-it!!"  # dom0 unmaps now
    kernel.print("mapped: " + json.dumps(report))
    kernel.idle()


def toucher(kernel) -> None:
    """Balloon out pages holding data (through the driver, as a target
    would), then touch them: reports ``toucher: {json}``."""
    pages = kernel.pages
    # the toolstack's target first (the watch fires once at once), so ours stands after it
    kernel.loop.run_until(lambda: kernel.balloon.target_pages is not None, 10)
    before = kernel.xen.current_reservation()
    kernel.balloon.target_pages = before - pages.count(FREE) // 2
    kernel.balloon.balance()
    gone = pages.ballooned(pages.count(BALLOONED))
    report = {"given": before - kernel.xen.current_reservation()}
    # every free page held a pattern before the balloon took half of them
    report["reads_zero"] = all(bytes(kernel.page(p)) == bytes(4096) for p in gone[:64])
    kernel.page(gone[0])[:8] = b"scribble"
    report["write_kept"] = bytes(kernel.page(gone[0])[:8]).decode()
    report["reservation_after_touch"] = before - kernel.xen.current_reservation()
    kernel.print("toucher: " + json.dumps(report))
    kernel.idle()


def prefilled_toucher(kernel) -> None:
    """Write every free page first, then be a toucher."""
    n = kernel.pages.count(FREE)
    first = kernel.alloc_pages(n)
    for pfn in range(first, first + n):
        kernel.page(pfn)[:] = _pattern(pfn)
    kernel.free_pages(first, n)
    toucher(kernel)
