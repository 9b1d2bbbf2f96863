"""The copy-only back ring and data movers of driver domains.

A real C :class:`FrontRing` is the frontend; :class:`CopyBackRing` reaches
the same bytes only through a copier.  The oracle is a C :class:`BackRing`
on a mirror buffer driven by an identical front: both must see the same
requests, answer the same notify decisions and leave the same bytes.
:class:`GrantCopier` and the data helpers run against a fake kernel whose
``grant_copy`` executes the op dicts over two bytearrays (the records of
GNTTABOP_copy's fast form are decoded into those dicts).
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from xmp.domid import DOMID_SELF
from xmp.drivers.grantcopy import (
    COPY_LIST_PAGES,
    MAX_COPY_OPS,
    CopyBackRing,
    CopyList,
    GrantCopier,
    bounce_pages_for,
    bounce_views,
    copy_from_grants,
    copy_to_grants,
)
from xmp.errors import GrantError, LocalError, RemoteProtocolError, RingFull
from xmp.sharedmem.grant import GNTTAB_COPY, GNTTAB_COPY_STATUS, unpack_copy_records
from xmp.sharedmem.ring import REQ_EVENT, REQ_PROD, RSP_EVENT, BackRing, FrontRing, ring_bytes

M32 = 0xFFFFFFFF
PAGE = 4096


def hdr(buf) -> tuple[int, int, int, int]:
    return struct.unpack_from("<4I", buf, 0)


def set_hdr(buf, req_prod, req_event, rsp_prod, rsp_event) -> None:
    struct.pack_into("<4I", buf, 0, req_prod, req_event, rsp_prod, rsp_event)


class LocalCopier:
    """A copier over a local ring buffer that refuses page-crossing ops."""

    def __init__(self, buf):
        self.buf = buf
        self.calls: list[list] = []

    def __call__(self, ops):
        self.calls.append(list(ops))
        out = []
        for kind, off, arg in ops:
            n = arg if kind == "in" else len(arg)
            assert 0 <= off and off + n <= len(self.buf)
            assert n == 0 or off // PAGE == (off + n - 1) // PAGE, f"op {off}+{n} crosses a page"
            if kind == "in":
                out.append(bytes(self.buf[off:off + n]))
            else:
                self.buf[off:off + n] = arg
                out.append(None)
        return out


def msgs(seq: int, k: int, size: int) -> bytes:
    return b"".join(struct.pack("<I", seq + i).ljust(size, bytes([(seq + i) & 0xFF])) for i in range(k))


class Mirror:
    """Two identical rings: front + CopyBackRing on one, front + C BackRing
    (the oracle) on the other, started at ``start``."""

    def __init__(self, order: int = 0, req: int = 64, rsp: int = 64, start: int = 0):
        self.req, self.rsp = req, rsp
        self.bufs = [bytearray(ring_bytes(order)) for _ in range(2)]
        for b in self.bufs:
            set_hdr(b, start, (start + 1) & M32, start, (start + 1) & M32)
        self.fronts = [FrontRing(b, req, rsp, init=False) for b in self.bufs]
        self.copier = LocalCopier(self.bufs[0])
        self.back = CopyBackRing(self.copier, len(self.bufs[0]), req, rsp, resume=True)
        self.oracle = BackRing(self.bufs[1], req, rsp, resume=True)
        self.n = self.back.nr_ents
        self.seq = 0

    def front_put(self, k: int) -> int:
        data = msgs(self.seq, k, self.req)
        placed = {f.put_requests(data) for f in self.fronts}
        assert len(placed) == 1
        self.seq += k
        return placed.pop()

    def front_push(self) -> bool:
        notes = {f.push_requests_and_check_notify() for f in self.fronts}
        assert len(notes) == 1
        return notes.pop()

    def front_get(self) -> bytes:
        got = {f.get_responses() for f in self.fronts}
        assert len(got) == 1
        return got.pop()

    def get(self, k: int | None = None) -> bytes:
        before = len(self.copier.calls)
        got = self.back.get_requests(k)
        assert len(self.copier.calls) - before <= 2
        assert got == self.oracle.get_requests(k)
        return got

    def answer(self, k: int) -> int:
        data = msgs(0x7000 + self.seq, k, self.rsp)
        n = self.back.put_responses(data)
        assert n == self.oracle.put_responses(data)
        return n

    def push(self) -> bool:
        before = len(self.copier.calls)
        note = self.back.push_responses_and_check_notify()
        assert len(self.copier.calls) - before == 1
        assert note == self.oracle.push_responses_and_check_notify()
        assert self.bufs[0] == self.bufs[1]  # every byte, once nothing is unpushed
        return note

    def final_check(self) -> bool:
        before = len(self.copier.calls)
        more = self.back.final_check_for_requests()
        if len(self.copier.calls) > before:
            # it armed req_event before its one look: the oracle does the same
            self.oracle.set_req_event(self.oracle.req_cons + 1)
        assert more == self.oracle.final_check_for_requests()
        return more

    def check(self) -> None:
        b, o = self.back, self.oracle
        assert (b.req_cons, b.rsp_prod_pvt) == (o.req_cons, o.rsp_prod_pvt)
        assert self.back.pending_responses() == self.oracle.pending_responses()
        assert hdr(self.bufs[0]) == hdr(self.bufs[1])


# -- round trips against the C ring -----------------------------------------


@pytest.mark.parametrize("order", [0, 1, 2, 3])
@pytest.mark.parametrize("start", [0, M32 - 5, M32])
@pytest.mark.parametrize(("req", "rsp"), [(64, 64), (112, 16), (16, 112)])
def test_round_trip_matches_the_c_ring(order, start, req, rsp):
    m = Mirror(order, req, rsp, start)
    sent = []
    for k in (3, m.n, m.n // 2 + 1, m.n):  # partial, full, wrapping batches
        assert m.front_put(k) == k
        sent.append(msgs(m.seq - k, k, req))
        m.front_push()
        got = m.get()
        assert got == sent[-1]
        assert m.back.pending_responses() == k
        assert m.answer(k) == k
        m.push()
        assert m.front_get() == msgs(0x7000 + m.seq, k, rsp)
        assert not m.final_check()
        m.check()
    assert m.back.req_cons == (start + 3 + m.n + m.n // 2 + 1 + m.n) & M32


def test_copy_counts_and_shapes():
    m = Mirror(order=2, req=64, rsp=64)
    m.front_put(m.n)
    m.front_push()
    m.copier.calls.clear()
    m.get()
    first, second = m.copier.calls
    assert first == [("in", REQ_PROD, 4)]
    # the slots in one call: pieces tiling [64, 64 + n*64), cut at each page boundary
    assert all(kind == "in" for kind, _, _ in second)
    assert [off for _, off, _ in second] == [64, PAGE, 2 * PAGE]
    assert sum(n for _, _, n in second) == m.n * 64
    m.answer(m.n)
    m.copier.calls.clear()
    m.push()
    (ops,) = m.copier.calls
    assert ops[-2][:2] == ("out", 8) and ops[-1] == ("in", RSP_EVENT, 4)  # slots, rsp_prod, then rsp_event
    assert all(kind == "out" and off >= 64 for kind, off, _ in ops[:-2])


def test_get_with_nothing_waiting_is_one_copy():
    m = Mirror()
    m.copier.calls.clear()
    assert m.back.get_requests() == b"" and m.back.get_request() is None
    assert len(m.copier.calls) == 2


def test_responses_wait_for_the_push():
    m = Mirror()
    m.front_put(2)
    m.front_push()
    m.get()
    m.back.put_response(b"r")
    assert m.fronts[0].unconsumed_responses() == 0
    m.oracle.put_response(b"r")
    m.push()
    assert m.front_get() == b"r".ljust(64, b"\0")


def test_put_response_limits():
    m = Mirror(req=64, rsp=32)
    m.front_put(1)
    m.front_push()
    with pytest.raises(RingFull):
        m.back.put_response(b"x")  # nothing consumed yet
    m.get()
    with pytest.raises(LocalError, match="exceeds the 32-byte slot"):
        m.back.put_response(bytes(33))
    with pytest.raises(LocalError, match="whole number"):
        m.back.put_responses(bytes(40))
    assert m.back.put_responses(bytes(64)) == 1  # only one request to answer


# -- notification and the final check ---------------------------------------


def test_notify_decisions_match_the_c_ring():
    m = Mirror()
    m.front_put(4)
    assert m.front_push()
    m.get()
    notes = []
    for _ in range(4):
        m.answer(1)
        notes.append(m.push())
    assert notes == [True, False, False, False]  # rsp_event = start + 1
    assert m.front_get()
    assert not any(f.final_check_for_responses() for f in m.fronts)
    m.front_put(1)
    m.front_push()
    m.get()
    m.answer(1)
    assert m.push()  # the front re-armed rsp_event


def test_final_check_arms_req_event_then_looks():
    m = Mirror(start=100)
    m.copier.calls.clear()
    assert not m.final_check()
    (ops,) = m.copier.calls
    assert ops == [("out", REQ_EVENT, struct.pack("<I", 101)), ("in", REQ_PROD, 4)]
    assert hdr(m.bufs[0])[1] == 101
    m.front_put(1)
    assert m.front_push()  # req_event 101 lies in (100, 101]
    assert m.final_check()


def test_final_check_with_work_known_makes_no_copy():
    m = Mirror()
    m.front_put(3)
    m.front_push()
    m.get(1)  # saw req_prod = 3, consumed one
    m.copier.calls.clear()
    assert m.final_check()
    assert m.copier.calls == []


def test_final_check_sees_a_request_pushed_before_it():
    m = Mirror()
    m.front_put(1)
    m.front_push()
    m.get()
    m.front_put(1)
    assert not m.front_push()  # req_event still 1: no notify
    assert m.final_check()  # so the final check must see it
    m.check()


def test_set_req_event_batches():
    m = Mirror()
    m.final_check()
    m.back.set_req_event(m.back.req_cons + 3)
    m.oracle.set_req_event(m.oracle.req_cons + 3)
    assert [m.front_put(1) and m.front_push() for _ in range(4)] == [False, False, True, False]
    m.check()


# -- a hostile frontend -----------------------------------------------------


def test_req_prod_overflow_is_the_frontends_fault():
    m = Mirror()
    n = m.n
    for b in m.bufs:
        struct.pack_into("<I", b, REQ_PROD, n + 1)
    for call in (m.back.unconsumed_requests, m.back.get_requests, m.back.final_check_for_requests):
        with pytest.raises(RemoteProtocolError,
                           match=f"bad frontend: its producer index claims more than the ring's {n} slots"):
            call()
    assert m.back.req_cons == 0
    for b in m.bufs:
        struct.pack_into("<I", b, REQ_PROD, n)  # exactly a ring's worth is legal
    assert m.back.unconsumed_requests() == n == m.oracle.unconsumed_requests()


def test_requests_are_copied_once():
    m = Mirror()
    m.front_put(1)
    m.front_push()
    got = m.back.get_request()
    m.bufs[0][64:128] = b"B" * 64
    assert got == msgs(0, 1, 64)


def test_resume_from_published_indices():
    m = Mirror(start=M32 - 1)
    m.front_put(5)
    m.front_push()
    m.get()
    m.answer(5)
    m.push()
    back2 = CopyBackRing(LocalCopier(m.bufs[0]), len(m.bufs[0]), 64, 64, resume=True)
    assert (back2.req_cons, back2.rsp_prod_pvt) == (3, 3)
    back2.release()


# -- model-based: random interleavings against the oracle -------------------


class MirrorMachine(RuleBasedStateMachine):
    @initialize(start=st.integers(0, M32) | st.integers(M32 - 600, M32), order=st.sampled_from([0, 1, 2]),
                sizes=st.sampled_from([(64, 64), (112, 16), (24, 40)]))
    def setup(self, start, order, sizes):
        self.m = Mirror(order, *sizes, start=start)

    @rule(k=st.integers(1, 70))
    def front_put(self, k):
        self.m.front_put(k)

    @rule()
    def front_push(self):
        self.m.front_push()

    @rule(k=st.none() | st.integers(0, 70))
    def back_get(self, k):
        self.m.get(k)

    @rule(k=st.integers(1, 70))
    def back_answer(self, k):
        self.m.answer(k)

    @rule()
    def back_push(self):
        self.m.push()

    @rule()
    def back_unconsumed(self):
        assert self.m.back.unconsumed_requests() == self.m.oracle.unconsumed_requests()

    @rule()
    def back_final_check(self):
        self.m.final_check()

    @rule()
    def front_get(self):
        self.m.front_get()

    @rule()
    def front_final_check(self):
        assert len({f.final_check_for_responses() for f in self.m.fronts}) == 1

    @invariant()
    def agree(self):
        if hasattr(self, "m"):
            self.m.check()


MirrorMachine.TestCase.settings = settings(max_examples=120, stateful_step_count=50, deadline=None)
test_copy_ring_matches_c_ring = MirrorMachine.TestCase


# -- GrantCopier and the data helpers over a fake kernel ---------------------

GRANTER = 7


class FakeXen:
    """GNTTABOP_copy over two bytearrays, checking what Xen checks."""

    def __init__(self, kernel):
        self.k = kernel
        self.calls: list[list[dict]] = []
        self.fail: dict[int, int] = {}  # gref -> GNTST status

    def _side(self, side: dict, n: int):
        off = side["offset"]
        assert 0 <= off and off + n <= PAGE, f"segment side {side} of {n} bytes crosses a page"
        if "ref" in side:
            assert side["domid"] == GRANTER
            frame = self.k.gref_frames.get(side["ref"])
            if frame is None:
                return None, -3  # GNTST_bad_gntref
            if side["ref"] in self.fail:
                return None, self.fail[side["ref"]]
            return memoryview(self.k.foreign)[frame * PAGE + off:frame * PAGE + off + n], 0
        assert side["domid"] == DOMID_SELF and 0 <= side["frame"] < len(self.k.own) // PAGE
        return self.k.page(side["frame"])[off:off + n], 0

    def grant_copy_records(self, pfn: int, count: int) -> None:
        """The hypercall's fast form: records in our memory, statuses back into them."""
        assert 1 <= count <= MAX_COPY_OPS
        at = pfn * PAGE
        records = self.k.own[at:at + count * GNTTAB_COPY.size]
        for i, status in enumerate(self.grant_copy(unpack_copy_records(records))):
            struct.pack_into("<h", self.k.own, at + i * GNTTAB_COPY.size + GNTTAB_COPY_STATUS, status)

    def grant_copy(self, ops: list[dict]) -> list[int]:
        assert 1 <= len(ops) <= MAX_COPY_OPS
        self.calls.append(ops)
        statuses = []
        for op in ops:
            src, s1 = self._side(op["source"], op["len"])
            dst, s2 = self._side(op["dest"], op["len"])
            if s1 or s2:
                statuses.append(s1 or s2)
                continue
            dst[:] = bytes(src)
            statuses.append(0)
        return statuses


class FakeKernel:
    def __init__(self, foreign_pages: int, own_pages: int, gref_frames: dict[int, int]):
        self.foreign = bytearray(foreign_pages * PAGE)
        # own_pages for the test's bounce pages, then room for alloc_pages (a CopyList)
        self.own = self.memory = bytearray((own_pages + COPY_LIST_PAGES) * PAGE)
        self._free_pfn = own_pages
        self.gref_frames = gref_frames
        self.xen = FakeXen(self)
        self.ops = CopyList(self)

    def alloc_pages(self, n: int) -> int:
        pfn, self._free_pfn = self._free_pfn, self._free_pfn + n
        assert self._free_pfn * PAGE <= len(self.own)
        return pfn

    def free_pages(self, pfn: int, n: int) -> None:
        pass

    def page(self, pfn: int) -> memoryview:
        return memoryview(self.own)[pfn * PAGE:(pfn + 1) * PAGE]


def ring_kernel(order: int, *, first_frame: int = 2):
    """A frontend's ring at frames first_frame.. of the foreign memory,
    granted under scattered grefs."""
    pages = 1 << order
    grefs = [100 + 7 * i for i in range(pages)]
    k = FakeKernel(first_frame + pages + 1, 40, {g: first_frame + i for i, g in enumerate(grefs)})
    ring = memoryview(k.foreign)[first_frame * PAGE:(first_frame + pages) * PAGE]
    return k, grefs, ring


@pytest.mark.parametrize("bounce", [1, 2, None])
@pytest.mark.parametrize("order", [0, 2])
def test_grant_copier_serves_a_ring(order, bounce):
    k, grefs, ring = ring_kernel(order)
    nbytes = len(ring)
    bounce = bounce or bounce_pages_for(nbytes)
    front = FrontRing(ring, 64, 64)
    back = CopyBackRing(GrantCopier(k, GRANTER, grefs, 30, bounce, k.ops), nbytes, 64, 64)
    for rnd in range(3):
        data = msgs(rnd * 1000, back.nr_ents, 64)
        assert front.put_requests(data) == back.nr_ents
        front.push_requests_and_check_notify()
        k.xen.calls.clear()
        assert back.get_requests() == data
        if bounce >= bounce_pages_for(nbytes):
            assert len(k.xen.calls) == 2  # one grant_copy per copier call
        back.put_responses(data[::-1])
        back.push_responses_and_check_notify()
        assert front.get_responses() == data[::-1]
        assert not back.final_check_for_requests()
    assert all(0 <= op["dest"].get("frame", 30) - 30 < bounce for c in k.xen.calls for op in c)


def test_grant_copier_splits_at_512_segments_in_order():
    k, grefs, ring = ring_kernel(0)
    ring[:] = before = bytes(range(256)) * 16
    copier = GrantCopier(k, GRANTER, grefs, 30, 2, k.ops)
    ops = [("in", 7 * i, 3) for i in range(580)] + [("out", 0, b"XY"), ("in", 0, 4)]
    got = copier(ops)
    assert [len(c) for c in k.xen.calls] == [512, 70]
    assert got[:580] == [before[7 * i:7 * i + 3] for i in range(580)]  # read before the write
    assert got[580] is None and got[581] == b"XY" + before[2:4]  # and the last read after it


def test_grant_copier_never_lets_a_segment_cross_a_bounce_page():
    k, grefs, ring = ring_kernel(1)
    ring[:] = bytes(i % 251 for i in range(len(ring)))
    copier = GrantCopier(k, GRANTER, grefs, 30, 2, k.ops)
    ops = [("in", 1000, 3000), ("in", 4096, 4096), ("in", 100, 1500)]
    got = copier(ops)
    assert got == [bytes(ring[o:o + n]) for _, o, n in ops]
    # 8596 bytes through 8192 of bounce: two calls, and the FakeXen asserted each side
    assert len(k.xen.calls) == 2


def test_grant_copier_failure_is_the_frontends_fault():
    k, grefs, ring = ring_kernel(1)
    k.xen.fail[grefs[1]] = -8
    copier = GrantCopier(k, GRANTER, grefs, 30, 4, k.ops)
    assert copier([("in", 0, 4)]) == [bytes(4)]
    with pytest.raises(RemoteProtocolError,
                       match=r"bad frontend: grant copy of ring page 1 \(gref 107\) failed: status GNTST_perm"
                       r"ission_denied"):
        copier([("in", 0, 4), ("out", PAGE + 8, b"abcd")])


def test_grant_copier_refuses_ops_that_cross_pages():
    k, grefs, _ = ring_kernel(1)
    copier = GrantCopier(k, GRANTER, grefs, 30, 4, k.ops)
    for op in [("in", PAGE - 2, 4), ("out", 2 * PAGE, b"x"), ("in", -1, 1), ("sideways", 0, 1)]:
        with pytest.raises(LocalError):
            copier([("out", 0, b"ok")] * 600 + [op])  # checked before anything is issued
    assert k.xen.calls == []
    with pytest.raises(LocalError, match="at least one bounce page"):
        GrantCopier(k, GRANTER, grefs, 30, 0, k.ops)


def data_kernel(npages: int = 8):
    grefs = [500 + i for i in range(npages)]
    k = FakeKernel(npages, 80, {g: npages - 1 - i for i, g in enumerate(grefs)})
    k.foreign[:] = bytes((i * 7) % 253 for i in range(len(k.foreign)))
    return k, grefs


def foreign_bytes(k, gref, off, n) -> bytes:
    f = k.gref_frames[gref]
    return bytes(k.foreign[f * PAGE + off:f * PAGE + off + n])


def test_copy_from_grants_packs_segments_into_bounce_pages():
    k, grefs = data_kernel()
    segs = [(grefs[0], 512, 1024), (grefs[3], 0, PAGE), (grefs[5], 3584, 512), (grefs[5], 0, 3072)]
    views = copy_from_grants(k, GRANTER, segs, 10, 4, k.ops)
    assert [bytes(v) for v in views] == [foreign_bytes(k, *s) for s in segs]
    assert len(k.xen.calls) == 1
    ops = k.xen.calls[0]
    # packed in order: 0+1024 on page 10, a whole page 11, 512 then 3072 on page 12
    assert [(o["dest"]["frame"], o["dest"]["offset"]) for o in ops] == [(10, 0), (11, 0), (12, 0), (12, 512)]
    assert all(o["source"]["domid"] == GRANTER and o["dest"]["domid"] == DOMID_SELF for o in ops)


def test_copy_to_grants_writes_what_was_placed_in_the_bounce_views():
    k, grefs = data_kernel()
    before = bytes(k.foreign)
    segs = [(grefs[1], 0, 512), (grefs[2], 1024, 2048), (grefs[1], 2048, 2048)]
    for i, v in enumerate(bounce_views(k, segs, 10, 2)):
        v[:] = bytes([i + 1]) * len(v)
    copy_to_grants(k, GRANTER, segs, 10, 2, k.ops)
    for i, s in enumerate(segs):
        assert foreign_bytes(k, *s) == bytes([i + 1]) * s[2]
    f = k.gref_frames[grefs[1]] * PAGE
    assert k.foreign[f + 512:f + 2048] == before[f + 512:f + 2048]  # between the segments: untouched


def test_many_segments_take_several_hypercalls():
    k, grefs = data_kernel()
    segs = [(grefs[i % 8], (i // 8) % 8 * 512, 512) for i in range(600)]
    views = copy_from_grants(k, GRANTER, segs, 0, 75, k.ops)
    assert [len(c) for c in k.xen.calls] == [512, 88]
    assert [bytes(v) for v in views] == [foreign_bytes(k, *s) for s in segs]


def test_data_copy_failure_names_the_gref():
    k, grefs = data_kernel()
    k.xen.fail[grefs[2]] = -3
    segs = [(grefs[0], 0, 512), (grefs[2], 0, 512)]
    msg = r"grant_copy of gref 502 \(granted by dom7\): GNTST_bad_gntref"
    with pytest.raises(GrantError, match=msg) as exc:
        copy_to_grants(k, GRANTER, segs, 0, 1, k.ops)
    assert (exc.value.domid, exc.value.gref, exc.value.status) == (GRANTER, grefs[2], -3)
    with pytest.raises(GrantError):
        copy_from_grants(k, GRANTER, [(999, 0, 8)], 0, 1, k.ops)  # never granted


def test_data_layout_is_checked():
    k, grefs = data_kernel()
    with pytest.raises(LocalError, match="crosses a page"):
        copy_from_grants(k, GRANTER, [(grefs[0], 4000, 200)], 0, 4, k.ops)
    with pytest.raises(LocalError, match="bounce pages"):
        copy_from_grants(k, GRANTER, [(grefs[0], 0, PAGE)] * 3, 0, 2, k.ops)
    assert k.xen.calls == []
