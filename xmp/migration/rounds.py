"""Pre-copy rounds driven over a dirty log: the loop a migration source
runs before it suspends the guest (libxc's send_memory_live).  What a
round *sends* is the caller's (``send``: PAGE_DATA records into the
stream, once the stream writer lands); which pages and when to stop are
:mod:`xmp.migration.precopy`'s; the dirty set comes from ``clean`` (a
:class:`xmp.migration.dirty.DirtyLog`'s, or a tracker's)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence

from xmp.migration.precopy import Decision, Policy, PreCopy


def run_precopy(populated: Iterable[int], nr_pages: int, clean: Callable[[], Sequence[int]],
                send: Callable[[Sequence[int]], None], policy: Policy | None = None,
                clock: Callable[[], float] = time.monotonic,
                progress: Callable[[PreCopy], None] | None = None) -> tuple[Decision, PreCopy]:
    """Send round 0 and the live rounds; return the stop decision (its
    ``pfns`` are what the caller sends with the guest suspended) and the
    rounds' record.  Log-dirty mode must be on before round 0 starts, and
    ``clean`` is called once before it to start the log from here."""
    clean()
    pc = PreCopy(populated, nr_pages, policy or Policy())
    pfns: Sequence[int] = pc.first()
    while True:
        start = clock()
        send(pfns)
        dirty = clean()
        decision = pc.round_done(len(pfns), clock() - start, dirty)
        if progress is not None:
            progress(pc)
        if decision.stop:
            return decision, pc
        pfns = decision.pfns
