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
    DOORBELL_KICK,
    DOORBELL_PENDING,
    DOORBELL_SIZE,
    EVTCHN_OBJECT_SIZE,
    EVTCHN_WAKE_SIZE,
    SHINFO_MASK,
    SHINFO_PENDING,
    VIRQ_DOM_EXC,
    VIRQ_TIMER,
    Doorbell,
    EventChannels,
    PortState,
    PortTable,
    Wake,
    bind_interdomain,
    close_port,
)
from xmp.sharedmem.wakepage import create_wake_page, reopen_readonly, seal_wake_page, wake_page_sealed


@pytest.fixture
def ev():
    chan = EventChannels(bytearray(EVTCHN_OBJECT_SIZE), init_vcpus=2)
    yield chan
    chan.destroy()


def sel(buf, vcpu=0):
    return struct.unpack_from("<Q", buf, vcpu * 64 + 8)[0]


def test_shared_info_offsets_follow_xen_h():
    # vcpu_info[32] of 64 bytes, then evtchn_pending[64] and evtchn_mask[64]
    assert (SHINFO_PENDING, SHINFO_MASK) == (32 * 64, 32 * 64 + 64 * 8)
    buf = bytearray(EVTCHN_OBJECT_SIZE)
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


def test_events_go_to_the_ports_vcpu(ev):
    """As Xen's notify_vcpu_id: the port's binding decides, not the sender."""
    ev.set_vcpu(4, 1)
    ev.send(4, vcpu=0)
    assert not ev.upcall_pending(0) and ev.upcall_pending(1)
    assert ev.wait(vcpu=0, timeout=0) == Wake.TIMEOUT
    assert ev.wait(vcpu=1, timeout=0) == Wake.EVENT
    assert ev.scan(vcpu=1) == [4]
    assert ev.notify_vcpu(4) == 1


def test_a_vcpu_scans_only_its_own_ports(ev):
    ev.set_vcpu(5, 1)
    ev.send(4)        # vCPU 0's, in the same selector word as port 5
    ev.send(5)
    assert ev.scan(vcpu=0) == [4]   # port 5 stays pending for vCPU 1
    assert ev.is_pending(5)
    assert ev.scan(vcpu=1) == [5]


def test_bind_vcpu_tells_the_new_vcpu_what_is_pending(ev):
    ev.send(6)
    ev.set_vcpu(6, 1)
    assert ev.scan(vcpu=0) == []
    assert ev.wait(vcpu=1, timeout=0) == Wake.EVENT and ev.scan(vcpu=1) == [6]
    ev.mask(7)
    ev.send(7)
    ev.set_vcpu(7, 1)
    ev.unmask(7)      # re-delivered to the vCPU it is bound to now
    assert ev.scan(vcpu=0) == [] and ev.scan(vcpu=1) == [7]


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


# -- doorbells: what a peer may write -----------------------------------------

HOSTILE, FRIEND = 7, 8


class Receiver:
    """A receiver's private object and wake page, and a doorbell per sender
    (the supervisor's part done by hand: owners set, doorbells attached)."""

    def __init__(self, nr_vcpus: int = 1):
        self.priv = bytearray(EVTCHN_OBJECT_SIZE)
        self.wake = bytearray(EVTCHN_WAKE_SIZE)
        self.ev = EventChannels(self.priv, self.wake, init_vcpus=nr_vcpus)
        self.pages: dict[int, bytearray] = {}

    def doorbell(self, sender: int, ports) -> Doorbell:
        page = self.pages.setdefault(sender, bytearray(DOORBELL_SIZE))
        for port in ports:
            self.ev.set_owner(port, sender)
        self.ev.attach_doorbell(sender, page)
        assert self.ev.upcall_pending()  # attaching makes the scanning thread look ...
        assert self.ev.scan() == []      # ... at nothing yet
        return Doorbell(page, self.wake)


@pytest.fixture
def rx():
    r = Receiver(nr_vcpus=2)
    yield r
    r.ev.release()


def test_doorbell_send_scan_and_summary_word(rx):
    db = rx.doorbell(FRIEND, [5, 70])
    page = rx.pages[FRIEND]
    assert db.send(70) is True
    assert struct.unpack_from("<Q", page, DOORBELL_PENDING + 8)[0] == 1 << 6  # word 1 bit 6
    assert struct.unpack_from("<Q", page, 0)[0] == 1 << 1  # vcpu 0's summary: word 1 has news
    assert db.send(70) is False  # already pending: the receiver is not told twice
    assert db.send(5) is True    # a new word: told again
    assert not rx.ev.upcall_pending()  # nothing private was touched
    assert rx.ev.wait(timeout=0) == Wake.EVENT
    assert rx.ev.scan() == [5, 70]
    taken = bytes(page[:DOORBELL_KICK]) + bytes(page[DOORBELL_PENDING:DOORBELL_PENDING + 512])
    assert taken == bytes(DOORBELL_KICK + 512)  # summary and pending bits all clear
    assert struct.unpack_from("<I", page, DOORBELL_KICK)[0] == 2  # vcpu 0's kick word: bumped on each telling
    assert rx.ev.wait(timeout=0) == Wake.TIMEOUT
    # a port bound to vCPU 1: the doorbell is vCPU 0's (the sender cannot see
    # the binding, whatever vCPU it names); vCPU 0's scan hands it over
    rx.ev.set_vcpu(70, 1)
    assert rx.ev.scan(vcpu=0) == [] and rx.ev.scan(vcpu=1) == []  # the attach's own kicks
    db.send(70, vcpu=1)
    assert rx.ev.wait(vcpu=1, timeout=0) == Wake.TIMEOUT
    assert rx.ev.wait(vcpu=0, timeout=0) == Wake.EVENT and rx.ev.scan(vcpu=0) == []
    assert rx.ev.wait(vcpu=1, timeout=0) == Wake.EVENT and rx.ev.scan(vcpu=1) == [70]
    assert rx.ev.scan(vcpu=0) == [] and not rx.ev.is_pending(70)


def test_doorbell_masked_port_stays_pending_and_unmask_delivers(rx):
    db = rx.doorbell(FRIEND, [9])
    rx.ev.mask(9)
    assert db.send(9) is True  # the sender cannot see the mask: told once
    assert rx.ev.scan() == []  # masked: not taken ...
    assert rx.ev.is_pending(9)  # ... and still pending, in the doorbell
    assert db.send(9) is False  # so the sender stops telling
    assert rx.ev.wait(timeout=0.01, spin=0) == Wake.TIMEOUT
    assert rx.ev.unmask(9) is True  # EVTCHNOP_unmask re-delivers
    assert rx.ev.wait(timeout=0) == Wake.EVENT and rx.ev.scan() == [9]
    assert not rx.ev.is_pending(9) and rx.ev.unmask(9) is False


def test_private_and_doorbell_events_are_both_delivered(rx):
    db = rx.doorbell(FRIEND, [4])
    rx.ev.send(3)  # the supervisor's (a VIRQ)
    db.send(4)
    assert rx.ev.scan() == [3, 4]


def test_a_hostile_sender_scribbling_its_doorbell_disturbs_only_its_own_ports(rx):
    evil = rx.doorbell(HOSTILE, [5])
    good = rx.doorbell(FRIEND, [6])
    rx.ev.mask(12)
    private_before = bytes(rx.priv)
    rx.pages[HOSTILE][:] = b"\xff" * DOORBELL_SIZE  # every summary and pending bit
    assert rx.ev.wait(timeout=0) == Wake.EVENT
    # its own port fires (spuriously: allowed); the friend's port 6, the
    # masked 12 and unbound ports do not
    assert rx.ev.scan() == [5]
    assert bytes(rx.priv) == private_before  # mask, pending, vcpu_info untouched
    assert rx.ev.is_masked(12) and not rx.ev.is_pending(6)
    # the friend's events still arrive while the hostile page stays garbage
    rx.pages[HOSTILE][:] = b"\xff" * DOORBELL_SIZE
    assert good.send(6) is True
    assert sorted(rx.ev.scan()) == [5, 6]
    # zeroing its page (clearing "pending" bits) loses nothing of the friend's
    good.send(6)
    rx.pages[HOSTILE][:] = bytes(DOORBELL_SIZE)
    assert rx.ev.scan() == [6]
    evil.send(5)
    assert rx.ev.scan() == [5]


def test_detached_doorbell_is_not_scanned(rx):
    db = rx.doorbell(FRIEND, [6])
    db.send(6)
    assert rx.ev.detach_doorbell(FRIEND) is True
    assert rx.ev.scan() == []  # the sender has gone: its doorbell is no longer read
    assert rx.ev.doorbell_senders() == []


def test_detached_doorbell_is_closed_one_sync_later(rx):
    closed = []
    rx.ev.attach_doorbell(FRIEND, bytearray(DOORBELL_SIZE), closer=lambda: closed.append(FRIEND))
    rx.ev.scan()
    rx.ev.detach_doorbell(FRIEND)
    rx.ev.scan()  # swapped out of the array a waiter reads ...
    assert closed == []
    rx.ev.scan()  # ... and closed only once no C call can still be on it
    assert closed == [FRIEND]
    rx.ev.attach_doorbell(HOSTILE, bytearray(DOORBELL_SIZE), closer=lambda: closed.append(HOSTILE))
    rx.ev.detach_doorbell(HOSTILE)
    rx.ev.sync(drain=True)  # the supervisor: single-threaded, at once
    assert closed == [FRIEND, HOSTILE]


def test_generation_bump_calls_refresh_before_the_scan(rx):
    calls = []
    page = bytearray(DOORBELL_SIZE)

    def refresh():
        calls.append(1)
        rx.ev.set_owner(6, FRIEND)
        rx.ev.attach_doorbell(FRIEND, page)

    rx.ev.refresh = refresh
    Doorbell(page, rx.wake).send(6)  # a sender that got its doorbell first
    rx.ev.bump_generation()          # the supervisor: the set changed
    assert rx.ev.wait(timeout=0) == Wake.EVENT
    assert rx.ev.scan() == [6] and calls == [1]
    assert rx.ev.scan() == [] and calls == [1]


@pytest.mark.timeout(60)
def test_sends_during_scans_are_never_lost():
    """Three senders (two doorbells, one private) each raise their port and
    wait until the receiver has seen that send, all at once, while the
    receiver sleeps without spinning: a send that lands while the receiver
    scans or goes to sleep must still wake it (a lost one stalls a sender
    until its deadline)."""
    r = Receiver()
    dbs = {1: r.doorbell(HOSTILE, [1]), 2: r.doorbell(FRIEND, [2]), 3: r.ev}
    rounds = 3000
    sent = dict.fromkeys(dbs, 0)
    seen = dict.fromkeys(dbs, 0)
    errors: list[str] = []
    stop = threading.Event()

    def sender(port):
        for _ in range(rounds):
            sent[port] += 1
            dbs[port].send(port)
            deadline = time.monotonic() + 10
            while seen[port] < sent[port]:
                if time.monotonic() > deadline:
                    errors.append(f"port {port}: send {sent[port]} never delivered")
                    stop.set()
                    return
                time.sleep(0)

    def receiver():
        while not stop.is_set():
            if r.ev.wait(timeout=0.5, spin=0) == Wake.TIMEOUT:
                continue
            for port in r.ev.scan():
                seen[port] = sent[port]

    rt = threading.Thread(target=receiver)
    rt.start()
    senders = [threading.Thread(target=sender, args=(p,)) for p in dbs]
    for t in senders:
        t.start()
    for t in senders:
        t.join(50)
    stop.set()
    rt.join(5)
    assert errors == []
    assert seen == dict.fromkeys(dbs, rounds)
    r.ev.release()


def test_the_wake_page_is_read_only_for_senders_once_sealed():
    import mmap
    import os

    fd = create_wake_page()
    try:
        mine = mmap.mmap(fd, EVTCHN_WAKE_SIZE)  # the receiver maps it first ...
        assert not wake_page_sealed(fd)
        seal_wake_page(fd)                      # ... then seals it
        assert wake_page_sealed(fd)
        mine[0] = 1                             # its own mapping stays writable
        ro = reopen_readonly(fd)
        try:
            for attempt in (lambda: mmap.mmap(fd, EVTCHN_WAKE_SIZE),
                            lambda: os.write(fd, b"\0"),
                            lambda: os.ftruncate(fd, 0),
                            # a same-uid peer reopening its read-only fd read-write
                            lambda: mmap.mmap(os.open(f"/proc/self/fd/{ro}", os.O_RDWR), EVTCHN_WAKE_SIZE)):
                with pytest.raises(PermissionError):
                    attempt()
            view = mmap.mmap(ro, EVTCHN_WAKE_SIZE, prot=mmap.PROT_READ)
            assert view[0] == 1
            view.close()
        finally:
            os.close(ro)
        mine.close()
    finally:
        os.close(fd)


def test_a_doorbell_whose_news_keeps_holding_nothing_is_muted(rx):
    """A sender scribbling its summary word (no port of its own pending)
    would keep the receiver awake for nothing: after 64 such scans its
    doorbell is ignored for a while -- not looked at, not waited on -- while
    the other senders are served; what it really sent arrives afterwards."""
    evil = rx.doorbell(HOSTILE, [5])
    good = rx.doorbell(FRIEND, [6])
    page = rx.pages[HOSTILE]
    # Eight mutes in a row: each lasts twice the last, so the eighth (256 ms)
    # outlives any pause a loaded machine puts between the steps below.
    for _ in range(8):
        deadline = time.monotonic() + 5
        while rx.ev.doorbell_muted(HOSTILE):
            assert time.monotonic() < deadline
            time.sleep(0.001)
        for _ in range(64):
            page[:8] = b"\xff" * 8  # vcpu 0's summary: "news everywhere", and none
            assert rx.ev.wait(timeout=0) == Wake.EVENT
            assert rx.ev.scan() == []
    assert rx.ev.doorbell_muted(HOSTILE) and not rx.ev.doorbell_muted(FRIEND)
    page[:8] = b"\xff" * 8
    assert rx.ev.wait(timeout=0.001, spin=0) == Wake.TIMEOUT  # its news no longer wakes us
    good.send(6)
    assert rx.ev.scan() == [6]  # the friend is served meanwhile
    evil.send(5)  # something real, during the mute: it waits
    assert rx.ev.scan() == []
    t0 = time.monotonic()
    assert rx.ev.wait(timeout=5, spin=0) == Wake.EVENT  # the mute ends by itself (256 ms) ...
    assert time.monotonic() - t0 < 1
    assert rx.ev.scan() == [5]  # ... and its real event is delivered, late, not lost
    assert not rx.ev.doorbell_muted(HOSTILE)


@pytest.mark.timeout(30)
def test_a_sleeper_with_more_doorbells_than_futex_waitv_takes_still_wakes():
    """futex_waitv takes 128 words (the private one + 127 doorbells): a
    send on a doorbell past those still reaches a sleeping receiver (it
    looks again every millisecond while such doorbells exist)."""
    r = Receiver()
    dbs = [r.doorbell(100 + i, [100 + i]) for i in range(200)]
    results = []
    t = threading.Thread(target=lambda: results.append(r.ev.wait(timeout=10, spin=0)))
    t.start()
    deadline = time.monotonic() + 5
    while struct.unpack_from("<I", r.wake, 0)[0] != 1:  # it sleeps
        assert time.monotonic() < deadline
        time.sleep(0.001)
    t0 = time.monotonic()
    assert dbs[-1].send(299) is True
    t.join(10)
    assert results == [Wake.EVENT] and time.monotonic() - t0 < 2
    assert r.ev.scan() == [299]
    r.ev.release()
