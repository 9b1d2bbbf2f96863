"""The pre-copy policy: which pages each round sends and when to stop and
copy.  Pure: the caller sends pages, cleans the dirty log and reports;
this module decides.  No clock, no socket.

Theory of operation (Clark et al., "Live Migration of Virtual Machines",
NSDI 2005, §3-4): round 0 sends every populated page while the guest runs;
each next round sends the pages dirtied during the previous one.  A guest
has a writable working set that pre-copy cannot shrink below, so rounds
are bounded; the last dirty set goes across with the guest suspended, and
its size over the link's bandwidth is the downtime.  After each round the
policy stops, in this order, when

1. the dirty set is at most ``min_dirty_pages`` -- Xen's
   ``simple_precopy_policy`` (tools/libs/guest/xg_sr_save.c) stops below
   SPP_TARGET_DIRTY_COUNT = 50 pages;
2. sending it at the bandwidth measured over the last round fits
   ``downtime_target`` -- QEMU's completion test (migration.c: pending
   bytes below bandwidth x downtime-limit, default 300 ms);
3. ``max_rounds`` rounds are done -- Xen's SPP_MAX_ITERATIONS = 5;
4. another round would take the total sent past ``max_factor`` times the
   domain's pages -- the old xc_domain_save's max_factor = 3;
5. the dirty set stopped shrinking: ``max_stalls`` rounds in a row each
   removed less than ``min_shrink`` of it (Clark et al.'s writable working
   set: more rounds only resend it).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from xmp.errors import LocalError

PAGE_SIZE = 4096


@dataclass(frozen=True)
class Policy:
    downtime_target: float = 0.3    # seconds (QEMU's downtime-limit default)
    min_dirty_pages: int = 50       # Xen's SPP_TARGET_DIRTY_COUNT
    max_rounds: int = 5             # Xen's SPP_MAX_ITERATIONS (rounds after round 0 included)
    max_factor: float = 3.0         # old xc_domain_save: at most 3x the domain's pages sent live
    min_shrink: float = 0.1         # a round shrinking the dirty set by less is a stall
    max_stalls: int = 2

    def __post_init__(self) -> None:
        if self.downtime_target < 0 or self.min_dirty_pages < 0 or self.max_rounds < 1 \
                or self.max_factor < 1 or not 0 <= self.min_shrink < 1 or self.max_stalls < 1:
            raise LocalError(f"a pre-copy policy out of range: {self}")


@dataclass(frozen=True)
class RoundStats:
    round: int
    pages_sent: int
    seconds: float
    dirty: int               # pages dirtied while it was sent
    bandwidth: float         # bytes per second over the round (0: too fast to measure)
    dirty_rate: float        # pages per second dirtied during it


@dataclass(frozen=True)
class Decision:
    """What to send next: ``pfns``, either as another live round or, with
    ``stop`` set, as the last one with the guest suspended (``reason`` says
    which rule fired, ``expected_downtime`` what the last send should take)."""

    pfns: tuple[int, ...]
    stop: bool
    reason: str = ""
    expected_downtime: float = 0.0


@dataclass
class PreCopy:
    """One migration's rounds.  ``populated``: the pfns round 0 sends;
    ``nr_pages``: the domain's size, for the max_factor bound."""

    populated: Iterable[int]
    nr_pages: int
    policy: Policy = field(default_factory=Policy)
    rounds: list[RoundStats] = field(default_factory=list)
    total_sent: int = 0
    _next: tuple[int, ...] = ()
    _stalls: int = 0
    _done: bool = False

    def __post_init__(self) -> None:
        self._next = tuple(sorted(set(self.populated)))
        if self.nr_pages <= 0:
            raise LocalError("a domain of no pages")

    def first(self) -> tuple[int, ...]:
        """Round 0: every populated page."""
        return self._next

    def round_done(self, pages_sent: int, seconds: float, dirty: Iterable[int]) -> Decision:
        """The round just sent ``pages_sent`` pages in ``seconds``, and the
        dirty log's clean after it found ``dirty``: what comes next."""
        if self._done:
            raise LocalError("the pre-copy has already stopped")
        if pages_sent < 0 or seconds < 0:
            raise LocalError(f"a round of {pages_sent} pages in {seconds} s")
        d = tuple(sorted(set(dirty)))
        bandwidth = pages_sent * PAGE_SIZE / seconds if seconds > 0 else 0.0
        stats = RoundStats(len(self.rounds), pages_sent, seconds, len(d), bandwidth,
                           len(d) / seconds if seconds > 0 else 0.0)
        previous = self.rounds[-1].dirty if self.rounds else None
        self.rounds.append(stats)
        self.total_sent += pages_sent
        downtime = len(d) * PAGE_SIZE / bandwidth if bandwidth else float("inf")
        if previous is not None and len(d) > previous * (1 - self.policy.min_shrink):
            self._stalls += 1
        else:
            self._stalls = 0
        reason = self._stop_reason(d, downtime)
        self._next = d
        if reason:
            self._done = True
            return Decision(d, True, reason, 0.0 if not d else downtime)
        return Decision(d, False, "", downtime)

    def _stop_reason(self, d: tuple[int, ...], downtime: float) -> str:
        p = self.policy
        if len(d) <= p.min_dirty_pages:
            return f"{len(d)} dirty pages, at most {p.min_dirty_pages}"
        if downtime <= p.downtime_target:
            return f"{len(d)} dirty pages fit the {p.downtime_target * 1000:g} ms downtime target " \
                   f"({downtime * 1000:.1f} ms at the measured bandwidth)"
        if len(self.rounds) >= p.max_rounds:
            return f"round limit ({p.max_rounds})"
        if self.total_sent + len(d) > p.max_factor * self.nr_pages:
            return f"another round would send more than {p.max_factor:g}x the domain's pages"
        if self._stalls >= p.max_stalls:
            return f"the dirty set stopped shrinking ({self._stalls} rounds under {p.min_shrink:.0%})"
        return ""
