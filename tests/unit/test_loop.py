"""The domain event loop's per-port event budget (lateeoi-like throttling)."""

from __future__ import annotations

import time

import pytest

from xmp.domain_proc import loop as loopmod
from xmp.domain_proc.loop import EventLoop
from xmp.sharedmem.evtchn import DOORBELL_SIZE, EVTCHN_OBJECT_SIZE, EventChannels

STORMY, QUIET = 5, 6


@pytest.fixture
def setup(monkeypatch):
    monkeypatch.setattr(loopmod, "RATE_PERIOD", 60.0)  # one period for the whole test
    monkeypatch.setattr(loopmod, "RATE_BUDGET", 50)
    monkeypatch.setattr(loopmod, "BACKOFF_MIN", 0.05)
    ev = EventChannels(bytearray(EVTCHN_OBJECT_SIZE), init_vcpus=1)
    loop = EventLoop(ev)
    calls: list[int] = []
    loop.bind(STORMY, calls.append)
    loop.bind(QUIET, calls.append)
    yield ev, loop, calls
    ev.release()


def storm(ev, loop, n):
    for _ in range(n):
        ev.send(STORMY)
        loop.poll(0)


@pytest.mark.timeout(30)
def test_a_port_over_budget_is_masked_then_unmasked_with_its_events(setup):
    ev, loop, calls = setup
    storm(ev, loop, 50)
    assert calls == [STORMY] * 50 and not ev.is_masked(STORMY)  # within budget: all served
    storm(ev, loop, 1)  # the 51st: served, then throttled
    assert len(calls) == 51 and ev.is_masked(STORMY) and loop.throttles == 1
    ev.send(STORMY)
    ev.send(QUIET)
    assert loop.poll(0) and calls[-1] == QUIET  # others are served meanwhile; the storm waits
    assert calls.count(STORMY) == 51 and ev.is_pending(STORMY)
    t0 = time.monotonic()
    while calls.count(STORMY) == 51:
        loop.poll(5)  # the wait ends at the unmask time, not at the 5 s timeout
    assert 0.04 < time.monotonic() - t0 < 2
    assert not ev.is_masked(STORMY)  # unmasked, and what came while masked delivered once


@pytest.mark.timeout(30)
def test_the_back_off_grows_while_the_port_keeps_storming(setup):
    ev, loop, calls = setup
    lengths = []
    for _ in range(3):
        loop._counts.clear()
        storm(ev, loop, 51)
        assert ev.is_masked(STORMY)
        lengths.append(loop._throttled[STORMY] - time.perf_counter())
        while ev.is_masked(STORMY):
            loop.poll(5)
    assert lengths[1] > lengths[0] * 1.5 and lengths[2] > lengths[1] * 1.5, lengths


def test_a_port_its_owner_masked_is_left_alone(setup):
    ev, loop, calls = setup
    storm(ev, loop, 50)
    ev.mask(STORMY)
    loop._throttle(STORMY, time.perf_counter())
    assert loop.throttles == 0 and STORMY not in loop._throttled


@pytest.mark.timeout(30)
def test_a_quiet_loop_still_closes_a_dead_peers_doorbell(setup):
    # The close is two-phase (swapped out at one scan, closed at the next);
    # a domain no event wakes after the detach must come back for the
    # second phase by itself, or it holds the dead peer's page for ever.
    ev, loop, _calls = setup
    closed = []
    ev.attach_doorbell(9, bytearray(DOORBELL_SIZE), closer=lambda: closed.append(9))
    loop.poll(0)
    assert ev.detach_doorbell(9) is True
    deadline = time.monotonic() + 5
    while not closed and time.monotonic() < deadline:
        loop.poll(None)  # without the grace timeout the second poll sleeps for ever
    assert closed == [9] and not ev.closing
