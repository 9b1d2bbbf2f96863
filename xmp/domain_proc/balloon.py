"""The guest's balloon driver (Linux's drivers/xen/balloon.c and
xen-balloon.c): it watches ``memory/target`` (KiB, written by the
toolstack: ``xmp mem-set``) and moves the domain's reservation to it --
giving pages back with ``decrease_reservation`` or taking them again with
``populate_physmap``.

The pages it gives back come from the guest's one page allocator
(:mod:`xmp.domain_proc.pages`), so they are pages nobody in the guest
uses; and it never gives back a page any entry of the guest's own grant
table names (a driver that freed a page before ending its grant would
otherwise hand its peer a hole), nor one the hypervisor refused (a page
another domain still maps).  Short of free pages, it gives what it can
and tries again whenever pages are freed; the toolstack sees the domain
fall short of its target and says so.

A ballooned-out page is punched out of the RAM object.  A guest that
touches it again -- reading or writing -- makes the kernel fill the hole
with a fresh zeroed page of the guest's *own* object (shared memory
allocates on any fault; xmp cannot take a mapping away from a process, as
Xen takes a page out of a PV guest's page tables).  So it sees zeros, never
another domain's data nor what the page held, and can at most cost the host
its own maxmem, uncounted by ``xmp list`` and the pool.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from xmp.domain_proc.pages import PageAllocator
from xmp.errors import HypercallError, XenStoreError
from xmp.sharedmem.grant import GrantTable
from xmp.sharedmem.shm import PAGE_SIZE
from xmp.xenstore.client import XsClient
from xmp.xenstore.wire import XsType

TOKEN = "memory/target"
KIB_PER_PAGE = PAGE_SIZE // 1024
BATCH = 512  # pages a hypercall, as Linux's frame_list (one page of longs)
GTF_GRANTED = 0x1 | 0x2 | 0x8 | 0x10  # permit_access, accept_transfer, reading, writing
_ENTRY = struct.Struct("<HHI")  # grant_entry_v1: flags, domid, frame


def granted_frames(table, entries: int | None = None) -> set[int]:
    """The frames any of the first ``entries`` entries of a grant table (v1)
    names or has mapped.  Reading only those matters: a page of shared
    memory never written is a hole, and reading it makes the host allocate it."""
    view = memoryview(table)[:None if entries is None else entries * _ENTRY.size]
    return {frame for flags, _domid, frame in _ENTRY.iter_unpack(view) if flags & GTF_GRANTED}


class BalloonDriver:
    def __init__(self, xs: XsClient, xen, pages: PageAllocator, grant_table: GrantTable, table_mem,
                 log: Callable[[str], None] = print):
        self.xs = xs
        self.xen = xen
        self.pages = pages
        self.grant_table = grant_table
        self.table_mem = table_mem  # its memory
        self.log = log
        self.target_pages: int | None = None
        self.refused: set[int] = set()   # pfns the hypervisor would not take (mapped by a peer)
        self.short = False               # behind the target for lack of free pages
        prev = xs.on_posted_error

        def posted_failed(exc: XenStoreError) -> None:
            if exc.op == "WATCH" and exc.path == TOKEN:
                self.log(f"xen:balloon: Failed to set memory/target watcher ({exc.errno}): "
                         "xmp mem-set will not be seen")
            elif prev is not None:
                prev(exc)
        xs.on_posted_error = posted_failed
        xs.on_watch(TOKEN, self._changed)
        xs.post(XsType.WATCH, f"{TOKEN}\0{TOKEN}\0".encode())

    def _changed(self, _path: str) -> None:
        raw = self.xs.read_or(TOKEN)
        if raw is None:
            return
        try:
            kb = int(raw)
            if kb < 0:
                raise ValueError
        except ValueError:
            self.log(f"xen:balloon: memory/target {raw[:32]!r} is not a size in KiB: ignored")
            return
        self.target_pages = kb // KIB_PER_PAGE
        self.balance()

    def pages_freed(self) -> None:
        """The allocator has free pages again: a balloon that fell short tries again."""
        if self.short:
            self.balance()

    def balance(self) -> None:
        """Move the reservation to the target, as far as it can go now."""
        if self.target_pages is None:
            return
        current = self.xen.current_reservation()
        if self.target_pages < current:
            self._decrease(current - self.target_pages)
        elif self.target_pages > current:
            self.short = False
            self._increase(self.target_pages - current)
        else:
            self.short = False

    def _decrease(self, n: int) -> None:
        granted = granted_frames(self.table_mem, self.grant_table.high_water)
        given = 0
        while given < n:
            pfns = self.pages.take_free(n - given, granted | self.refused)
            if not pfns:
                break
            refused = False
            for at in range(0, len(pfns), BATCH):
                batch = pfns[at:at + BATCH]
                try:
                    done = self.xen.decrease_reservation(batch)
                except HypercallError as exc:
                    self.log(f"xen:balloon: decrease_reservation failed: {exc}")
                    self.pages.put_free(pfns[at:])
                    n = given  # give up for now: a later target or freed page tries again
                    break
                given += done
                if done < len(batch):
                    # Xen stops at the first page it will not take (one a peer maps):
                    # keep that one and go on with others
                    self.refused.add(batch[done])
                    self.pages.put_free(pfns[at + done:])
                    refused = True
                    break
            if not refused:
                break
        was_short = self.short
        self.short = given < n
        if self.short and not was_short:
            self.log(f"xen:balloon: {n - given} of {n} pages could not be given back "
                     "(not free, or granted): will retry as pages are freed")

    def _increase(self, n: int) -> None:
        pfns = self.pages.ballooned(n)
        for at in range(0, len(pfns), BATCH):
            batch = pfns[at:at + BATCH]
            try:
                self.xen.populate_physmap(batch)
            except HypercallError as exc:
                self.log(f"xen:balloon: populate_physmap of {len(batch)} pages failed: {exc}")
                return
            self.pages.put_free(batch)
