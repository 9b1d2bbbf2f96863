"""ring.h rings as a pure data structure over a bytearray.

The reference model below restates the macros of xen/include/public/io/ring.h
in plain Python; hypothesis drives the real ring and the model through the
same operations, from start indices anywhere in the u32 space (so across the
2**32 wrap), and they must agree on every index, notify decision and byte.
"""

from __future__ import annotations

import struct
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from xmp.errors import LocalError, RemoteProtocolError, RingFull
from xmp.sharedmem.ring import (
    HEADER_SIZE,
    REQ_EVENT,
    REQ_PROD,
    RSP_EVENT,
    RSP_PROD,
    BackRing,
    FrontRing,
    ring_bytes,
    ring_nr_ents,
)
from xmp.testing import ring_pair

M32 = 0xFFFFFFFF


def hdr(buf) -> tuple[int, int, int, int]:
    return struct.unpack_from("<4I", buf, 0)


def set_hdr(buf, req_prod, req_event, rsp_prod, rsp_event) -> None:
    struct.pack_into("<4I", buf, 0, req_prod, req_event, rsp_prod, rsp_event)


# -- layout ---------------------------------------------------------------


def test_header_offsets_match_ring_h():
    # struct sring { req_prod; req_event; rsp_prod; rsp_event; pvt[4]; __pad[44]; ring[] }
    assert (REQ_PROD, REQ_EVENT, RSP_PROD, RSP_EVENT) == (0, 4, 8, 12)
    assert HEADER_SIZE == 4 * 4 + 4 + 44


@pytest.mark.parametrize(
    ("nbytes", "slot", "expected"),
    [
        (4096, 112, 32),        # blkif, 64-bit ABI: 4032 // 112 = 36 -> 32
        (4096, 12, 256),        # netif tx: 336 -> 256
        (4096, 8, 256),         # netif rx: 504 -> 256
        (4096, 64, 32),         # 63 -> 32
        (4096 << 4, 64, 512),   # ring-page-order 4
        (4096 << 3, 112, 256),  # blkif, order 3: 32704 // 112 = 292 -> 256
    ],
)
def test_nr_ents_rounds_down_to_power_of_two(nbytes, slot, expected):
    assert ring_nr_ents(nbytes, slot) == expected


def test_shared_ring_init_sets_events_to_one():
    buf = bytearray(b"\xff" * 4096)
    FrontRing(buf, 64, 64)
    assert hdr(buf) == (0, 1, 0, 1)
    assert buf[16:64] == bytes(48)


def test_requests_land_in_slots_after_the_header():
    front, back, buf = ring_pair(112, 16)
    for i in range(3):
        front.put_request(bytes([i + 1]) * 112)
    assert hdr(buf)[0] == 0  # not published before the push
    front.push_requests_and_check_notify()
    assert hdr(buf)[0] == 3
    for i in range(3):
        off = HEADER_SIZE + i * 112
        assert buf[off:off + 112] == bytes([i + 1]) * 112


def test_short_message_is_padded_and_long_one_refused():
    front, back, _ = ring_pair(32, 32)
    front.put_request(b"abc")
    front.push_requests_and_check_notify()
    assert back.get_request() == b"abc" + bytes(29)
    with pytest.raises(LocalError, match="exceeds the 32-byte slot"):
        front.put_request(bytes(33))
    with pytest.raises(LocalError, match="whole number"):
        front.put_requests(bytes(40))


def test_ring_page_order_bounds():
    assert ring_bytes(0) == 4096 and ring_bytes(3) == 32768
    with pytest.raises(LocalError, match="ring-page-order 9"):
        ring_bytes(9)


# -- flow -----------------------------------------------------------------


def test_round_trip_and_free_counts():
    front, back, _ = ring_pair(64, 64)
    n = front.nr_ents
    assert front.free_requests() == n
    assert front.put_requests(b"".join(bytes([i]) * 64 for i in range(n + 5))) == n
    assert front.free_requests() == 0
    with pytest.raises(RingFull):
        front.put_request(b"x")
    front.push_requests_and_check_notify()
    assert back.unconsumed_requests() == n
    reqs = back.get_requests()
    assert reqs == b"".join(bytes([i]) * 64 for i in range(n))
    assert back.pending_responses() == n
    back.put_responses(reqs[::-1])
    back.push_responses_and_check_notify()
    assert front.get_responses() == reqs[::-1]
    assert front.free_requests() == n


def test_back_cannot_answer_more_than_it_consumed():
    front, back, _ = ring_pair(64, 64)
    front.put_requests(bytes(64 * 2))
    front.push_requests_and_check_notify()
    back.get_requests(1)
    assert back.put_responses(bytes(64 * 2)) == 1
    with pytest.raises(RingFull):
        back.put_response(bytes(64))


def test_consumer_copies_slots_before_use():
    # A hostile peer rewriting a slot after we consumed it changes nothing we hold.
    front, back, buf = ring_pair(64, 64)
    front.put_request(b"A" * 64)
    front.push_requests_and_check_notify()
    got = back.get_request()
    buf[HEADER_SIZE:HEADER_SIZE + 64] = b"B" * 64
    assert got == b"A" * 64


def test_unconsumed_requests_capped_by_response_space():
    # RING_UNCONSUMED_REQUESTS: min(req_prod - req_cons, size - (req_cons - rsp_prod_pvt))
    front, back, _ = ring_pair(64, 64)
    n = front.nr_ents
    front.put_requests(bytes(64 * n))
    front.push_requests_and_check_notify()
    back.get_requests(n // 2)
    # the front cannot produce more while nothing is answered
    assert back.unconsumed_requests() == n - n // 2


# -- notification suppression (push-and-check-notify, final check) ---------


def test_first_push_notifies_then_suppressed_until_consumer_rearms():
    front, back, _ = ring_pair(64, 64)
    front.put_request(b"1")
    assert front.push_requests_and_check_notify()  # req_event = 1 lies in (0, 1]
    front.put_request(b"2")
    assert not front.push_requests_and_check_notify()  # the back has not re-armed
    assert back.get_requests() and not back.final_check_for_requests()
    # final check armed req_event = req_cons + 1 = 3
    front.put_request(b"3")
    assert front.push_requests_and_check_notify()


def test_final_check_sees_message_published_before_it():
    # The race it closes: the front pushed after our last look but before we
    # armed the event -- push saw a stale event and did not notify; the
    # re-check after arming must see the message instead of sleeping.
    front, back, _ = ring_pair(64, 64)
    front.put_request(b"1")
    front.push_requests_and_check_notify()
    back.get_requests()
    front.put_request(b"2")
    assert not front.push_requests_and_check_notify()  # req_event still 1
    assert back.final_check_for_requests()  # not safe to sleep


def test_batching_with_a_custom_event_index():
    front, back, buf = ring_pair(64, 64)
    back.final_check_for_requests()
    back.set_req_event(back.req_cons + 4)  # wake me after 4 requests
    notified = []
    for i in range(6):
        front.put_request(bytes([i]))
        notified.append(front.push_requests_and_check_notify())
    assert notified == [False, False, False, True, False, False]
    # a push of several at once notifies iff the event lies inside the batch
    back.set_req_event(back.req_cons + 8)
    front.put_requests(bytes(64))
    assert not front.push_requests_and_check_notify()  # prod 7, event 8
    front.put_requests(bytes(64 * 3))
    assert front.push_requests_and_check_notify()  # (7, 10] contains 8


def test_responses_notify_symmetrically():
    front, back, _ = ring_pair(64, 64)
    front.put_requests(bytes(64 * 2))
    front.push_requests_and_check_notify()
    back.get_requests()
    back.put_response(b"a")
    assert back.push_responses_and_check_notify()  # rsp_event = 1
    back.put_response(b"b")
    assert not back.push_responses_and_check_notify()
    assert front.get_responses() and not front.final_check_for_responses()
    assert front.rsp_cons == 2


# -- hostile indices -------------------------------------------------------


def test_request_producer_overflow_is_a_remote_error():
    front, back, buf = ring_pair(64, 64)
    n = back.nr_ents
    req_prod, req_event, rsp_prod, rsp_event = hdr(buf)
    set_hdr(buf, n + 1, req_event, rsp_prod, rsp_event)  # RING_REQUEST_PROD_OVERFLOW
    with pytest.raises(RemoteProtocolError, match="bad frontend"):
        back.unconsumed_requests()
    with pytest.raises(RemoteProtocolError):
        back.get_requests()
    with pytest.raises(RemoteProtocolError):
        back.final_check_for_requests()
    assert back.req_cons == 0  # nothing consumed
    set_hdr(buf, n, req_event, rsp_prod, rsp_event)  # exactly a ring's worth is legal
    assert back.unconsumed_requests() == n


def test_response_producer_overflow_is_a_remote_error():
    front, back, buf = ring_pair(64, 64)
    set_hdr(buf, 0, 1, (-1) & M32, 1)  # rsp_prod "behind" rsp_cons: 2**32 - 1 in flight
    with pytest.raises(RemoteProtocolError, match="bad backend"):
        front.get_responses()


def test_resume_from_published_indices():
    front, back, buf = ring_pair(64, 64)
    front.put_requests(bytes(64 * 5))
    front.push_requests_and_check_notify()
    back.put_responses(back.get_requests())
    back.push_responses_and_check_notify()
    front.get_responses()
    front2 = FrontRing(buf, 64, 64, init=False)
    back2 = BackRing(buf, 64, 64, resume=True)
    assert (front2.req_prod_pvt, front2.rsp_cons) == (5, 5)
    assert (back2.rsp_prod_pvt, back2.req_cons) == (5, 5)


# -- model-based: every operation against a restatement of ring.h ----------


class RingModel(RuleBasedStateMachine):
    """Front and back driven in random order from a random start index."""

    SIZE = 64

    @initialize(start=st.integers(0, M32), order=st.sampled_from([0, 1]))
    def setup(self, start, order):
        self.buf = bytearray(ring_bytes(order))
        set_hdr(self.buf, start, (start + 1) & M32, start, (start + 1) & M32)
        self.front = FrontRing(self.buf, self.SIZE, self.SIZE, init=False)
        self.back = BackRing(self.buf, self.SIZE, self.SIZE, resume=True)
        self.n = self.front.nr_ents
        # model state
        self.req_prod_pvt = self.rsp_cons = self.rsp_prod_pvt = self.req_cons = start
        self.seq = 0
        self.in_flight: list[bytes] = []     # published or private requests, in order
        self.answered: list[bytes] = []      # responses not yet taken by the front
        self.taken: list[bytes] = []         # requests the back took, not yet answered

    def shared(self):
        return hdr(self.buf)

    @rule(k=st.integers(1, 40))
    def front_put(self, k):
        free = self.n - ((self.req_prod_pvt - self.rsp_cons) & M32)
        msgs = []
        for _ in range(k):
            self.seq += 1
            msgs.append(struct.pack("<Q", self.seq) * (self.SIZE // 8))
        placed = self.front.put_requests(b"".join(msgs))
        assert placed == min(k, free)
        self.in_flight += msgs[:placed]
        self.seq -= k - placed
        self.req_prod_pvt = (self.req_prod_pvt + placed) & M32

    @rule()
    def front_push(self):
        old, req_event, _, _ = self.shared()
        new = self.req_prod_pvt
        expect = ((new - req_event) & M32) < ((new - old) & M32)
        assert self.front.push_requests_and_check_notify() == expect
        assert self.shared()[0] == new

    @rule(k=st.integers(1, 40))
    def back_get(self, k):
        req_prod = self.shared()[0]
        avail = min((req_prod - self.req_cons) & M32,
                    self.n - ((self.req_cons - self.rsp_prod_pvt) & M32))
        got = self.back.get_requests(k)
        take = min(k, avail)
        assert len(got) == take * self.SIZE
        expect = self.in_flight[:take]
        del self.in_flight[:take]
        assert got == b"".join(expect)
        self.taken += expect
        self.req_cons = (self.req_cons + take) & M32

    @rule(k=st.integers(1, 40))
    def back_answer(self, k):
        k = min(k, len(self.taken))
        rsps = [bytes(b ^ 0xFF for b in m) for m in self.taken[:k]]
        del self.taken[:k]
        assert self.back.put_responses(b"".join(rsps)) == k
        self.answered += rsps
        self.rsp_prod_pvt = (self.rsp_prod_pvt + k) & M32

    @rule()
    def back_push(self):
        _, _, old, rsp_event = self.shared()
        new = self.rsp_prod_pvt
        expect = ((new - rsp_event) & M32) < ((new - old) & M32)
        assert self.back.push_responses_and_check_notify() == expect

    @rule(k=st.integers(1, 40))
    def front_get(self, k):
        rsp_prod = self.shared()[2]
        take = min(k, (rsp_prod - self.rsp_cons) & M32)
        got = self.front.get_responses(k)
        assert got == b"".join(self.answered[:take])
        del self.answered[:take]
        self.rsp_cons = (self.rsp_cons + take) & M32

    @rule()
    def back_final_check(self):
        req_prod = self.shared()[0]
        pending = req_prod != self.req_cons
        more = self.back.final_check_for_requests()
        if not pending:
            assert self.shared()[1] == (self.req_cons + 1) & M32
        assert more == pending

    @rule()
    def front_final_check(self):
        rsp_prod = self.shared()[2]
        pending = rsp_prod != self.rsp_cons
        more = self.front.final_check_for_responses()
        if not pending:
            assert self.shared()[3] == (self.rsp_cons + 1) & M32
        assert more == pending

    @invariant()
    def private_indices_agree(self):
        if not hasattr(self, "front"):
            return
        assert (self.front.req_prod_pvt, self.front.rsp_cons) == (self.req_prod_pvt, self.rsp_cons)
        assert (self.back.rsp_prod_pvt, self.back.req_cons) == (self.rsp_prod_pvt, self.req_cons)
        assert self.front.free_requests() == self.n - ((self.req_prod_pvt - self.rsp_cons) & M32)


RingModel.TestCase.settings = settings(max_examples=150, stateful_step_count=60, deadline=None)
test_ring_matches_ring_h_model = RingModel.TestCase


@given(start=st.integers(M32 - 300, M32), count=st.integers(1, 600))
@settings(max_examples=60, deadline=None)
def test_streaming_across_the_u32_wrap(start, count):
    buf = bytearray(4096)
    set_hdr(buf, start, (start + 1) & M32, start, (start + 1) & M32)
    front = FrontRing(buf, 64, 64, init=False)
    back = BackRing(buf, 64, 64, resume=True)
    sent = received = 0
    while received < count:
        batch = b"".join(struct.pack("<Q", i) * 8 for i in range(sent, min(count, sent + 20)))
        sent += front.put_requests(batch)
        front.push_requests_and_check_notify()
        reqs = back.get_requests()
        back.put_responses(reqs)
        back.push_responses_and_check_notify()
        rsps = front.get_responses()
        expect = b"".join(struct.pack("<Q", i) * 8 for i in range(received, received + len(rsps) // 64))
        assert rsps == expect
        received += len(rsps) // 64
    assert front.req_prod_pvt == (start + count) & M32


# -- the lost-wake-up race, with real concurrency (C releases the GIL) -----


@pytest.mark.timeout(60)
def test_no_lost_wakeup_between_threads():
    from xmp.sharedmem.evtchn import EVTCHN_OBJECT_SIZE, EventChannels, Wake

    front, back, _ = ring_pair(64, 64, ring_page_order=1)
    back_ev = EventChannels(bytearray(EVTCHN_OBJECT_SIZE), init_vcpus=1)
    front_ev = EventChannels(bytearray(EVTCHN_OBJECT_SIZE), init_vcpus=1)
    total = 100_000
    errors = []

    def backend():
        done = 0
        try:
            while done < total:
                reqs = back.get_requests()
                if reqs:
                    done += len(reqs) // 64
                    back.put_responses(reqs)
                    if back.push_responses_and_check_notify():
                        front_ev.send(1)
                    continue
                if back.final_check_for_requests():
                    continue
                # no timeout: a lost wake-up hangs here and the test times out
                if back_ev.wait(spin=0) == Wake.SHUTDOWN:
                    return
                back_ev.scan()
        except Exception as exc:  # surfaced below
            errors.append(exc)

    t = threading.Thread(target=backend)
    t.start()
    sent = got = 0
    while got < total:
        if sent < total:
            batch = b"".join(struct.pack("<Q", i) * 8 for i in range(sent, min(total, sent + 7)))
            k = front.put_requests(batch)
            sent += k
            if k and front.push_requests_and_check_notify():
                back_ev.send(1)
        rsps = front.get_responses()
        if rsps:
            first = struct.unpack_from("<Q", rsps)[0]
            assert first == got
            got += len(rsps) // 64
            continue
        if not front.final_check_for_responses() and (sent == total or front.free_requests() == 0):
            front_ev.wait(spin=0, timeout=5)
            front_ev.scan()
    back_ev.request_shutdown()
    t.join(10)
    assert not errors and not t.is_alive()
    assert got == total
