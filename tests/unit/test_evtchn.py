"""2-level event channels (shared_info bitmaps, upcall) and port bookkeeping."""

from __future__ import annotations

import errno
import struct
import threading
import time

import pytest

from xmp.errors import HypercallError
from xmp.sharedmem.evtchn import (
    DEFAULT_MAX_EVTCHNS,
    SHINFO_MASK,
    SHINFO_PENDING,
    VIRQ_DOM_EXC,
    VIRQ_TIMER,
    EventChannels,
    PortState,
    PortTable,
    Wake,
    bind_interdomain,
    close_port,
)


@pytest.fixture
def ev():
    chan = EventChannels(bytearray(8192), init_vcpus=2)
    yield chan
    chan.destroy()


def sel(buf, vcpu=0):
    return struct.unpack_from("<Q", buf, vcpu * 64 + 8)[0]


def test_shared_info_offsets_follow_xen_h():
    # vcpu_info[32] of 64 bytes, then evtchn_pending[64] and evtchn_mask[64]
    assert (SHINFO_PENDING, SHINFO_MASK) == (32 * 64, 32 * 64 + 64 * 8)
    buf = bytearray(8192)
    chan = EventChannels(buf, init_vcpus=1)
    chan.send(70, vcpu=0)
    assert struct.unpack_from("<Q", buf, SHINFO_PENDING + 8)[0] == 1 << 6  # port 70 = word 1 bit 6
    assert buf[0] == 1 and sel(buf) == 1 << 1  # upcall_pending, selector bit for word 1
    chan.mask(3)
    assert struct.unpack_from("<Q", buf, SHINFO_MASK)[0] == 1 << 3
    chan.destroy()


def test_send_kicks_only_on_first_pending(ev):
    assert ev.send(5) is True
    assert ev.send(5) is False  # already pending: no second kick
    assert ev.wait(timeout=0) == Wake.EVENT
    assert ev.scan() == [5]
    assert not ev.is_pending(5) and not ev.upcall_pending()
    assert ev.send(5) is True


def test_scan_harvests_several_ports_in_order(ev):
    for port in (130, 2, 64, 3):
        ev.send(port)
    assert ev.scan() == [2, 3, 64, 130]
    assert ev.scan() == []


def test_masked_port_stays_pending_until_unmask(ev):
    ev.mask(9)
    assert ev.send(9) is False
    assert ev.is_pending(9) and not ev.upcall_pending()
    assert ev.wait(timeout=0.01) == Wake.TIMEOUT
    assert ev.scan() == []  # masked ports are not harvested
    assert ev.is_pending(9)
    assert ev.unmask(9) is True  # EVTCHNOP_unmask re-delivers
    assert ev.upcall_pending() and ev.scan() == [9]
    assert ev.unmask(9) is False  # nothing pending any more


def test_events_go_to_the_vcpu_named(ev):
    ev.send(4, vcpu=1)
    assert not ev.upcall_pending(0) and ev.upcall_pending(1)
    assert ev.wait(vcpu=0, timeout=0) == Wake.TIMEOUT
    assert ev.wait(vcpu=1, timeout=0) == Wake.EVENT
    assert ev.scan(vcpu=1) == [4]


def test_send_during_scan_is_not_lost(ev):
    # upcall_pending is cleared before the scan, so a send after it kicks again
    ev.send(1)
    assert ev.scan() == [1]
    ev.send(1)
    assert ev.upcall_pending() and ev.wait(timeout=0) == Wake.EVENT


def test_bad_ports_and_vcpus_are_einval(ev):
    for bad in (-1, 4096):
        with pytest.raises(HypercallError) as e:
            ev.send(bad)
        assert e.value.errno == errno.EINVAL
    with pytest.raises(HypercallError):
        ev.send(1, vcpu=32)


@pytest.mark.timeout(20)
def test_wait_returns_on_timeout_event_and_shutdown(ev):
    t0 = time.monotonic()
    assert ev.wait(timeout=0.1, spin=0) == Wake.TIMEOUT
    assert 0.09 < time.monotonic() - t0 < 2
    # a blocked waiter (no timeout) is woken by another thread's send
    results = []
    t = threading.Thread(target=lambda: results.append(ev.wait(spin=0)))
    t.start()
    time.sleep(0.05)
    ev.send(11)
    t.join(5)
    assert results == [Wake.EVENT] and ev.scan() == [11]
    # ... and by a shutdown request, which then sticks
    t = threading.Thread(target=lambda: results.append(ev.wait(spin=0)))
    t.start()
    time.sleep(0.05)
    ev.request_shutdown()
    t.join(5)
    assert results[-1] == Wake.SHUTDOWN and ev.wait(timeout=0) == Wake.SHUTDOWN


def test_spurious_post_is_absorbed(ev):
    ev.send(1)
    ev.scan()  # the post of that kick is still on the semaphore
    t0 = time.monotonic()
    assert ev.wait(timeout=0.05, spin=0) == Wake.TIMEOUT  # not a false EVENT
    assert time.monotonic() - t0 >= 0.04


# -- port bookkeeping -----------------------------------------------------


def test_ports_start_at_one_and_run_out_with_enospc():
    t = PortTable(domid=3, max_evtchns=5)
    assert [t.alloc_unbound(0) for _ in range(4)] == [1, 2, 3, 4]
    with pytest.raises(HypercallError) as e:
        t.alloc_unbound(0)
    assert e.value.errno == errno.ENOSPC and "dom3" in str(e.value)
    assert PortTable(1).max_evtchns == DEFAULT_MAX_EVTCHNS
    big = PortTable(1, max_evtchns=4096)
    assert [big.bind_ipi() for _ in range(4095)][-1] == 4095


def test_bind_interdomain_needs_a_port_offered_to_the_caller():
    dom0, guest, other = PortTable(0), PortTable(1), PortTable(2)
    offered = guest.alloc_unbound(remote_dom=0)
    with pytest.raises(HypercallError) as e:
        bind_interdomain(other, guest, offered)  # offered to dom0, not dom2
    assert e.value.errno == errno.EINVAL and "not offered to dom2" in str(e.value)
    assert other.bound() == {} and guest.get(offered).state == PortState.UNBOUND
    local = bind_interdomain(dom0, guest, offered)
    assert dom0.get(local).state == PortState.INTERDOMAIN
    assert (dom0.get(local).remote_dom, dom0.get(local).remote_port) == (1, offered)
    assert guest.get(offered).remote_port == local
    with pytest.raises(HypercallError):  # already bound
        bind_interdomain(dom0, guest, offered)


def test_close_reverts_the_peer_to_unbound():
    dom0, guest = PortTable(0), PortTable(1)
    gp = guest.alloc_unbound(remote_dom=0)
    dp = bind_interdomain(dom0, guest, gp)
    close_port(dom0, dp, {1: guest})
    assert dom0.get(dp).state == PortState.CLOSED
    assert guest.get(gp).state == PortState.UNBOUND and guest.get(gp).remote_dom == 0
    assert bind_interdomain(dom0, guest, gp) == dp  # the freed port is reused
    with pytest.raises(HypercallError):
        close_port(guest, 77, {})


def test_virq_binding_rules():
    t = PortTable(4)
    p = t.bind_virq(VIRQ_TIMER, vcpu=1)
    assert t.get(p).state == PortState.VIRQ and t.virq_port(VIRQ_TIMER, 1) == p
    with pytest.raises(HypercallError) as e:
        t.bind_virq(VIRQ_TIMER, vcpu=1)
    assert e.value.errno == errno.EEXIST
    with pytest.raises(HypercallError):
        t.bind_virq(VIRQ_DOM_EXC, vcpu=1)  # global virqs bind on vcpu 0
    close_port(t, p, {})
    assert t.virq_port(VIRQ_TIMER, 1) is None
