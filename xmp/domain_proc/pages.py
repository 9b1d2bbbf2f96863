"""The guest's page allocator: which of its pfns are free, in use, or
ballooned out (given back to the hypervisor).

One allocator per guest, shared by everything that takes pages -- the
drivers' rings and buffers (``kernel.alloc_pages``) and the balloon
driver -- so the balloon can only ever give back a page nobody uses, as
Linux's balloon takes its pages from the page allocator.  Pure
bookkeeping: no hypercall here (the balloon driver makes them).

One state byte a pfn, so runs are found by ``bytearray.find`` in C::

    pfn 0 .. first-1        reserved (start_info, rings, grant table): USED, forever
    first .. nr_pages-1     FREE at boot
    nr_pages .. max_pages-1 BALLOONED at boot (maxmem > memory: "pre-ballooned")

``alloc`` takes the lowest free run (the old bump allocator's order, so
pages freed are used again first); the balloon gives back the highest
free pages first, keeping low memory in long runs for ``alloc``.
"""

from __future__ import annotations

from collections.abc import Iterable

from xmp.errors import LocalError

FREE, USED, BALLOONED = 0, 1, 2


class PageAllocator:
    def __init__(self, first_pfn: int, nr_pages: int, max_pages: int):
        if not 0 <= first_pfn <= nr_pages <= max_pages:
            raise LocalError(f"a memory map of {first_pfn} <= {nr_pages} <= {max_pages} pages")
        self.first = first_pfn
        self.state = bytearray(max_pages)
        self.state[:first_pfn] = bytes([USED]) * first_pfn
        self.state[nr_pages:] = bytes([BALLOONED]) * (max_pages - nr_pages)

    @property
    def max_pages(self) -> int:
        return len(self.state)

    def count(self, state: int) -> int:
        return self.state.count(state)

    def alloc(self, n: int) -> int:
        """The first pfn of a run of ``n`` free pages, now in use."""
        if n <= 0:
            raise LocalError(f"cannot allocate {n} pages")
        at = self.state.find(bytes(n), self.first)
        if at < 0:
            raise MemoryError(f"no run of {n} free pages ({self.count(FREE)} free, "
                              f"{self.count(BALLOONED)} ballooned out)")
        self.state[at:at + n] = bytes([USED]) * n
        return at

    def free(self, pfn: int, n: int) -> None:
        """Give back a run from :meth:`alloc`."""
        if n <= 0 or pfn < self.first or pfn + n > len(self.state) \
                or self.state.find(bytes([FREE]), pfn, pfn + n) >= 0 \
                or self.state.find(bytes([BALLOONED]), pfn, pfn + n) >= 0:
            raise LocalError(f"pages {pfn}..{pfn + n} were not taken with alloc_pages")
        self.state[pfn:pfn + n] = bytes(n)

    def take_free(self, n: int, keep: set[int] | frozenset[int] = frozenset()) -> list[int]:
        """Up to ``n`` free pages, highest first, never one in ``keep``
        (pages some grant still names), now BALLOONED: the balloon gives
        them back, or returns those it could not with :meth:`put_free`."""
        pfns: list[int] = []
        end = len(self.state)
        free = bytes([FREE])
        while len(pfns) < n:
            at = self.state.rfind(free, self.first, end)
            if at < 0:
                break
            end = at
            if at not in keep:
                pfns.append(at)
        for pfn in pfns:
            self.state[pfn] = BALLOONED
        return pfns

    def ballooned(self, n: int) -> list[int]:
        """Up to ``n`` ballooned-out pages, lowest first (state unchanged)."""
        pfns: list[int] = []
        at = self.first
        mark = bytes([BALLOONED])
        while len(pfns) < n:
            at = self.state.find(mark, at)
            if at < 0:
                break
            pfns.append(at)
            at += 1
        return pfns

    def put_free(self, pfns: Iterable[int]) -> None:
        """Ballooned-out pages that are the guest's again (populated, or
        never given back after all)."""
        for pfn in pfns:
            if self.state[pfn] != BALLOONED:
                raise LocalError(f"pfn {pfn} is not ballooned out")
            self.state[pfn] = FREE

    def runs(self, free: Iterable[tuple[int, int]] = ()) -> list[tuple[int, int, int]]:
        """The allocator as ``(pfn, pages, state)`` runs of the pages past
        the reserved ones that are not free -- what a suspend context
        carries; the runs in ``free`` (a driver's pages) count as free."""
        state = bytearray(self.state)
        for pfn, n in free:
            state[pfn:pfn + n] = bytes(n)
        out: list[tuple[int, int, int]] = []
        at, end = self.first, len(state)
        while at < end:
            kind = state[at]
            stop = at + 1
            while stop < end and state[stop] == kind:
                stop += 1
            if kind != FREE:
                out.append((at, stop - at, kind))
            at = stop
        return out

    def restore_runs(self, runs: Iterable[tuple[int, int, int]]) -> None:
        """The allocator :meth:`runs` described, on this domain's map;
        checked as fresh input (it came from another host)."""
        state = bytearray(self.state[:self.first]) + bytes(len(self.state) - self.first)
        for pfn, n, kind in runs:
            if kind not in (USED, BALLOONED) or n <= 0 or pfn < self.first or pfn + n > len(state):
                raise LocalError(f"run {pfn}+{n} ({kind}) does not fit pfns {self.first}..{len(state)}")
            state[pfn:pfn + n] = bytes([kind]) * n
        self.state = state
