"""The pre-copy policy against synthetic guests: a simulated link of known
bandwidth and a guest dirtying pages of its working set at a known rate."""

from __future__ import annotations

import random

import pytest

from xmp.errors import LocalError
from xmp.migration.precopy import PAGE_SIZE, Policy, PreCopy

pytestmark = pytest.mark.timeout(10)
MIB = 1 << 20
PAGES = 256 * MIB // PAGE_SIZE  # a 256 MiB guest


def simulate(rate_pages_s: float, wws: int, bandwidth: float = 1000 * MIB, policy: Policy | None = None,
             seed: int = 1):
    """Run the rounds: a round of n pages takes n*4096/bandwidth seconds,
    during which the guest dirties rate*t distinct pages of its ``wws``-page
    working set (random ones: the set a real log would report)."""
    rnd = random.Random(seed)
    pc = PreCopy(range(PAGES), PAGES, policy or Policy())
    send = pc.first()
    for _ in range(100):
        t = len(send) * PAGE_SIZE / bandwidth
        n = min(wws, int(rate_pages_s * t))
        dirty = rnd.sample(range(wws), n)
        decision = pc.round_done(len(send), t, dirty)
        assert set(decision.pfns) == set(dirty)  # every dirtied page goes in the next send
        if decision.stop:
            return pc, decision
        send = decision.pfns
    raise AssertionError("the policy never stopped")


def test_round_0_is_every_populated_page_once():
    pc = PreCopy([5, 3, 3, 9], 16)
    assert pc.first() == (3, 5, 9)


def test_an_idle_guest_stops_after_round_0_with_nothing_left():
    pc, d = simulate(0, 1)
    assert d.stop and d.pfns == () and len(pc.rounds) == 1 and d.expected_downtime == 0.0
    assert "0 dirty pages" in d.reason


def test_a_slow_writer_converges_and_stops_inside_the_downtime_target():
    # 10 MiB/s of writes over a 1 GB/s link: each round a hundredth of the last
    pc, d = simulate(10 * MIB / PAGE_SIZE, PAGES)
    assert d.stop and d.expected_downtime <= 0.3
    assert [r.dirty for r in pc.rounds] == sorted((r.dirty for r in pc.rounds), reverse=True)
    assert pc.total_sent < 1.05 * PAGES


def test_a_tight_downtime_target_takes_more_rounds_and_the_last_set_is_small():
    _, loose = simulate(50 * MIB / PAGE_SIZE, PAGES, policy=Policy(downtime_target=0.3))
    pc, tight = simulate(50 * MIB / PAGE_SIZE, PAGES, policy=Policy(downtime_target=0.0001, max_rounds=30))
    assert tight.stop and len(tight.pfns) <= 50 and len(pc.rounds) > 1
    assert "downtime target" in loose.reason


def test_a_hot_working_set_stops_when_it_no_longer_shrinks():
    # 400 MiB/s into a 64 MiB working set over a 100 MiB/s link: it never shrinks below the set
    pc, d = simulate(400 * MIB / PAGE_SIZE, 64 * MIB // PAGE_SIZE, bandwidth=100 * MIB,
                     policy=Policy(max_rounds=30))
    assert d.stop and "stopped shrinking" in d.reason
    assert len(pc.rounds) <= 5  # round 0, the first repeat, two stalls


def test_a_writer_faster_than_the_link_is_cut_off_by_the_round_or_traffic_limits():
    pc, d = simulate(2000 * MIB / PAGE_SIZE, PAGES, bandwidth=100 * MIB,
                     policy=Policy(max_stalls=100, min_shrink=0.0))
    assert d.stop and ("round limit" in d.reason or "3x" in d.reason)
    assert len(pc.rounds) <= 5 and pc.total_sent <= 3 * PAGES


def test_the_round_limit_is_xens():
    pc, d = simulate(200 * MIB / PAGE_SIZE, PAGES // 2, bandwidth=400 * MIB,
                     policy=Policy(downtime_target=0.0, min_shrink=0.0, max_stalls=100, max_factor=100))
    assert d.reason == "round limit (5)" and len(pc.rounds) == 5


def test_the_stats_of_each_round():
    pc = PreCopy(range(100), 100)
    pc.round_done(100, 0.5, range(60))
    r = pc.rounds[0]
    assert (r.round, r.pages_sent, r.dirty) == (0, 100, 60)
    assert r.bandwidth == 100 * PAGE_SIZE / 0.5 and r.dirty_rate == 120


def test_misuse_is_a_local_error():
    pc = PreCopy(range(10), 10)
    pc.round_done(10, 0.1, [])
    with pytest.raises(LocalError, match="already stopped"):
        pc.round_done(0, 0.1, [])
    with pytest.raises(LocalError):
        Policy(max_rounds=0)
    with pytest.raises(LocalError):
        PreCopy([], 0)
