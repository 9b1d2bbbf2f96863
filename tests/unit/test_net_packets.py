"""The netif tx packet assembler and rx response builder: packets fed one
slot at a time and in batches, every hostile case xen-netback refuses with
the decision it takes (ERROR, or fatal: disable the vif), and rx frames of
14 B .. 64 KiB laid into posted pages and read back as netfront would."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xmp.drivers.net import protocol as p
from xmp.drivers.net.packets import (
    FATAL_TX_SLOTS,
    RxBuilder,
    RxDrop,
    RxPlan,
    TxAssembler,
    TxMcast,
    TxPacket,
    TxPiece,
    TxReject,
    pack_tx_responses,
    rx_slots_needed,
)
from xmp.drivers.net.protocol import (
    GsoExtra,
    HashExtra,
    McastExtra,
    NetifStatus,
    NETTXF_csum_blank,
    NETTXF_data_validated,
    NETTXF_extra_info,
    NETTXF_more_data,
    RxRequest,
    RxResponse,
    TxResponse,
    parse_extra,
    parse_rx_request,
    parse_rx_response,
    parse_tx_response,
)
from xmp.errors import LocalError
from xmp.testing import ring_pair

pytestmark = pytest.mark.timeout(60)

MORE, EXTRA = NETTXF_more_data, NETTXF_extra_info
TCPV4, TCPV6 = p.XEN_NETIF_GSO_TYPE_TCPV4, p.XEN_NETIF_GSO_TYPE_TCPV6
BOTH = frozenset({TCPV4, TCPV6})


# Slots built by hand from netif.h's offsets, not by the module.
def tx(gref: int, offset: int, flags: int, req_id: int, size: int) -> bytes:
    return struct.pack("<IHHHH", gref, offset, flags, req_id, size)


def gso(gso_type: int = TCPV4, size: int = 1448, more: bool = False) -> bytes:
    return struct.pack("<BBHBxH", 1, int(more), size, gso_type, 0) + bytes(4)


def hash_extra(htype: int, value: int, more: bool = False) -> bytes:
    return struct.pack("<BBBBI", 4, int(more), htype, 1, value) + bytes(4)


def mcast(add: bool, addr: bytes, more: bool = False) -> bytes:
    return struct.pack("<BB6s", 2 if add else 3, int(more), addr) + bytes(4)


def raw_extra(etype: int, more: bool = False) -> bytes:
    return bytes([etype, int(more)]) + bytes(10)


def chain(sizes: list[int], first_id: int = 1, flags: int = 0, extras: bytes = b"") -> bytes:
    """A packet of len(sizes) slots: sizes[0] is the first slot's own share."""
    total = sum(sizes)
    out = [tx(100, 0, flags | (MORE if len(sizes) > 1 else 0) | (EXTRA if extras else 0), first_id, total)]
    out.append(extras)
    for i, size in enumerate(sizes[1:], 1):
        out.append(tx(100 + i, 0, MORE if i < len(sizes) - 1 else 0, first_id + i, size))
    return b"".join(out)


def feed_all(asm: TxAssembler, data: bytes, step: int | None = None):
    if step is None:
        return asm.feed(data)
    out = []
    for i in range(0, len(data), step):
        out += asm.feed(data[i:i + step])
    return out


# -- good packets --------------------------------------------------------------------------


@pytest.mark.parametrize("step", [None, 12, 24, 36])
def test_one_slot_packet(step):
    asm = TxAssembler()
    out = feed_all(asm, tx(7, 96, NETTXF_data_validated, 5, 60), step)
    assert out == [TxPacket((5,), 0, (TxPiece(7, 96, 60),), NETTXF_data_validated)]
    assert out[0].size == 60 and out[0].data_validated and not out[0].csum_blank
    assert out[0].responses() == [TxResponse(5, NetifStatus.OKAY)]
    assert asm.pending == 0


@pytest.mark.parametrize("step", [None, 12])
def test_multi_slot_packet_first_share_is_what_the_others_leave(step):
    data = (tx(11, 96, MORE | NETTXF_csum_blank, 1, 5000) + tx(12, 0, MORE, 2, 2000)
            + tx(13, 0, 0, 3, 1000))
    [pkt] = feed_all(TxAssembler(), data, step)
    assert pkt == TxPacket((1, 2, 3), 0, (TxPiece(11, 96, 2000), TxPiece(12, 0, 2000),
                                          TxPiece(13, 0, 1000)), MORE | NETTXF_csum_blank)
    assert pkt.size == 5000 and pkt.csum_blank and pkt.slots == 3
    assert pkt.responses() == [TxResponse(i, 0) for i in (1, 2, 3)]


def test_gso_packet_with_extra_answers_null_for_the_extra():
    data = tx(11, 0, MORE | EXTRA | NETTXF_csum_blank, 1, 6000) + gso(TCPV6, 1440) + tx(12, 0, 0, 2, 2000)
    asm = TxAssembler(gso_types=BOTH)
    [pkt] = asm.feed(data)
    assert pkt.gso == GsoExtra(TCPV6, 1440) and pkt.hash is None
    assert pkt.pieces == (TxPiece(11, 0, 4000), TxPiece(12, 0, 2000))
    assert pkt.slots == 3
    assert pkt.responses() == [TxResponse(1, 0), TxResponse(0, NetifStatus.NULL), TxResponse(2, 0)]
    rsp = pack_tx_responses(pkt.responses())
    assert rsp == pkt.pack_responses() and pkt.pack_responses(NetifStatus.ERROR) == \
        pack_tx_responses(pkt.responses(NetifStatus.ERROR))
    assert len(rsp) == 3 * p.TX_SLOT_SIZE
    assert [parse_tx_response(rsp[i:i + 12]) for i in range(0, 36, 12)] == pkt.responses()


def test_two_extras_and_hash():
    extras = gso(TCPV4, 1448, more=True) + hash_extra(p._XEN_NETIF_CTRL_HASH_TYPE_IPV4_TCP, 0xDEADBEEF)
    [pkt] = TxAssembler(gso_types=BOTH).feed(chain([1000, 500], extras=extras))
    assert pkt.gso == GsoExtra(TCPV4, 1448, 0, 1)
    assert pkt.hash == HashExtra(1, 1, 0xDEADBEEF)
    assert pkt.extra_count == 2 and pkt.ids == (1, 2)
    assert [r.status for r in pkt.responses()] == [0, 1, 1, 0]


def test_hash_of_unknown_type_is_ignored_as_netback_does():
    [pkt] = TxAssembler().feed(chain([100], extras=hash_extra(9, 1)))
    assert isinstance(pkt, TxPacket) and pkt.hash is None and pkt.extra_count == 1


def test_a_later_extra_of_the_same_type_replaces_the_first():
    extras = gso(TCPV4, 1000, more=True) + gso(TCPV4, 1200)
    [pkt] = TxAssembler(gso_types=BOTH).feed(chain([3000], extras=extras))
    assert pkt.gso == GsoExtra(TCPV4, 1200) and pkt.extra_count == 2


def test_one_plus_18_slots_is_taken():
    sizes = [100] + [10] * p.XEN_NETIF_NR_SLOTS_MIN
    [pkt] = TxAssembler().feed(chain(sizes))
    assert isinstance(pkt, TxPacket) and len(pkt.pieces) == 19 and pkt.size == 280


def test_xsa_432_short_head_over_many_tiny_slots():
    """A head of 14 bytes and 18 one-byte slots (less than netback's 128-byte
    copy length in all): a valid packet, described slot by slot."""
    sizes = [14] + [1] * 18
    [pkt] = TxAssembler().feed(chain(sizes))
    assert isinstance(pkt, TxPacket)
    assert pkt.pieces == (TxPiece(100, 0, 14), *(TxPiece(100 + i, 0, 1) for i in range(1, 19)))
    assert pkt.size == 32


def test_zero_length_slot_after_the_first_is_allowed():
    [pkt] = TxAssembler().feed(chain([60, 0, 40]))
    assert isinstance(pkt, TxPacket) and [x.length for x in pkt.pieces] == [60, 0, 40]


def test_largest_packet():
    sizes = [4096] * 15 + [4095]
    assert sum(sizes) == p.XEN_NETIF_MAX_TX_SIZE
    [pkt] = TxAssembler().feed(chain(sizes))
    assert isinstance(pkt, TxPacket) and pkt.size == 0xFFFF


def test_multicast_dummy():
    addr = bytes.fromhex("01005e0000fb")
    asm = TxAssembler()
    [op] = asm.feed(tx(0, 0, EXTRA, 9, 0) + mcast(True, addr))
    assert op == TxMcast(McastExtra(True, addr), 9, 1)
    assert op.responses(NetifStatus.ERROR) == [TxResponse(9, -1), TxResponse(0, 1)]
    [op] = asm.feed(tx(0, 0, EXTRA, 10, 0) + mcast(False, addr))
    assert op.extra.type == p.XEN_NETIF_EXTRA_TYPE_MCAST_DEL


def test_multicast_dummy_ignores_more_data_as_netback_does():
    addr = bytes.fromhex("3333000000fb")
    out = TxAssembler().feed(tx(0, 0, EXTRA | MORE, 9, 0) + mcast(True, addr) + tx(5, 0, 0, 10, 60))
    assert out == [TxMcast(McastExtra(True, addr), 9, 1), TxPacket((10,), 0, (TxPiece(5, 0, 60),), 0)]


def test_add_wins_over_del_in_one_dummy():
    a, b = bytes.fromhex("01005e000001"), bytes.fromhex("01005e000002")
    [op] = TxAssembler().feed(tx(0, 0, EXTRA, 1, 0) + mcast(False, b, more=True) + mcast(True, a))
    assert op == TxMcast(McastExtra(True, a), 1, 2)


# -- a stream: one slot at a time or all at once, the same decisions ----------------------

STREAM = [
    chain([60], 1),
    chain([1000, 500, 500], 10, extras=gso(TCPV4, 1448)),
    chain([10], 20),                                       # runt: ERROR
    tx(0, 0, EXTRA, 30, 0) + mcast(True, bytes.fromhex("01005e000001")),
    chain([100] + [1] * 19, 40),                           # 19 after the first: ERROR
    chain([14] + [1] * 18, 70),
]


@pytest.mark.parametrize("step", [12, 24, 60, 1200])
def test_stream_fed_in_pieces_decides_as_fed_whole(step):
    data = b"".join(STREAM)
    whole = TxAssembler(gso_types=BOTH).feed(data)
    assert [type(d).__name__ for d in whole] == ["TxPacket", "TxPacket", "TxReject", "TxMcast",
                                                "TxReject", "TxPacket"]
    assert sum(d.slots for d in whole) == len(data) // 12
    asm = TxAssembler(gso_types=BOTH)
    assert feed_all(asm, data, step) == whole
    assert asm.end_of_batch() is None


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(1, 40), max_size=30))
def test_stream_split_anywhere(cuts):
    data = b"".join(STREAM)
    whole = TxAssembler(gso_types=BOTH).feed(data)
    asm, out, pos = TxAssembler(gso_types=BOTH), [], 0
    for c in cuts:
        end = min(len(data), pos + 12 * c)
        out += asm.feed(data[pos:end])
        pos = end
    out += asm.feed(data[pos:])
    assert out == whole


def test_pending_counts_held_slots():
    asm = TxAssembler(gso_types=BOTH)
    data = chain([1000, 500, 500], 10, extras=gso())
    for i in range(3):
        assert asm.feed(data[12 * i:12 * i + 12]) == []
        assert asm.pending == i + 1
    assert len(asm.feed(data[36:])) == 1 and asm.pending == 0


# -- a hostile frontend ----------------------------------------------------------------------

HOSTILE = [
    # (name, slots, decision: reason fragment, ids, extra_count, fatal)
    ("19 slots after the first", chain([100] + [1] * 19), "more than 18 slots after the first",
     tuple(range(1, 21)), 0, False),
    ("20 slots after the first", chain([100] + [1] * 20), "more than 18 slots after the first",
     tuple(range(1, 22)), 0, False),
    ("21 slots after the first", chain([100] + [1] * 21), "more than 20 slots after the first",
     tuple(range(1, 22)), 0, True),
    ("slot bigger than what is left",
     tx(1, 0, MORE, 1, 3000) + tx(2, 0, MORE, 2, 2000) + tx(3, 0, 0, 3, 1001),
     "slot id 3: size 1001 exceeds the 1000 bytes", (1, 2, 3), 0, False),
    ("first size wrapped past 64 KiB (buggy frontends)",
     tx(1, 0, MORE, 1, 70000 & 0xFFFF) + b"".join(tx(2 + i, 0, MORE if i < 16 else 0, 2 + i, 4096)
                                                 for i in range(17)),
     "exceeds", tuple(range(1, 19)), 0, False),
    ("first slot shorter than an Ethernet header", chain([13]), "carries 13 bytes, less than an "
     "Ethernet header (14)", (1,), 0, False),
    ("empty packet", tx(1, 0, 0, 1, 0), "carries 0 bytes", (1,), 0, False),
    ("first share short after the others", chain([10, 4000]), "carries 10 bytes", (1, 2), 0, False),
    ("runt with extras answers them too", chain([5], extras=gso()), "carries 5 bytes", (1,), 1, False),
    ("slot crosses its page", tx(1, 0, MORE, 1, 300) + tx(2, 4000, 0, 2, 200),
     "slot id 2: 200 bytes at offset 4000 cross the 4096-byte page", (1, 2), 0, True),
    ("first slot crosses its page", tx(1, 4000, 0, 1, 200),
     "first slot id 1: 200 bytes at offset 4000 cross the 4096-byte page", (1,), 0, True),
    ("crossing is fatal even in a packet being dropped",
     chain([100] + [1] * 19)[:-12] + tx(99, 4095, 0, 99, 2),
     "cross the 4096-byte page", tuple(range(1, 20)) + (99,), 0, True),
    ("extra type 0", tx(1, 0, EXTRA, 1, 60) + raw_extra(0), "invalid extra info type 0", (1,), 1, True),
    ("extra type 5", tx(1, 0, EXTRA, 1, 60) + raw_extra(5), "invalid extra info type 5", (1,), 1, True),
    ("extra type 255 after a good one", tx(1, 0, EXTRA, 1, 60) + gso(more=True) + raw_extra(255),
     "invalid extra info type 255", (1,), 2, True),
    ("GSO size 0", chain([60], extras=gso(TCPV4, 0)), "GSO extra with size 0", (1,), 1, True),
    ("GSO type 3", chain([60], extras=gso(3, 1448)), "bad GSO type 3", (1,), 1, True),
    ("GSO type 0", chain([60], extras=gso(0, 1448)), "bad GSO type 0", (1,), 1, True),
    ("GSO tcpv6 not offered", chain([60], extras=gso(TCPV6)),
     "GSO type 2 used, but the backend did not offer feature-gso-tcpv6", (1,), 1, True),
]


@pytest.mark.parametrize("name,data,reason,ids,extra_count,fatal", HOSTILE, ids=[h[0] for h in HOSTILE])
@pytest.mark.parametrize("step", [None, 12])
def test_hostile_packets(name, data, reason, ids, extra_count, fatal, step):
    asm = TxAssembler(gso_types=frozenset({TCPV4}))
    out = feed_all(asm, data, step)
    assert len(out) == 1
    [d] = out
    assert isinstance(d, TxReject)
    assert reason in d.reason
    assert (d.ids, d.extra_count, d.fatal, d.status) == (ids, extra_count, fatal, NetifStatus.ERROR)
    assert d.responses() == ([TxResponse(ids[0], -1)] + [TxResponse(0, 1)] * extra_count
                             + [TxResponse(i, -1) for i in ids[1:]])
    assert asm.disabled == fatal
    if not fatal:  # the vif goes on: the next packet is judged afresh
        assert isinstance(asm.feed(chain([60], 500))[0], TxPacket)


def test_gso_with_nothing_offered_is_fatal():
    [d] = TxAssembler().feed(chain([60], extras=gso(TCPV4)))
    assert isinstance(d, TxReject) and d.fatal and "feature-gso-tcpv4" in d.reason


def test_fatal_stops_the_batch_and_the_assembler():
    asm = TxAssembler()
    good, bad = chain([60], 1), tx(2, 4090, 0, 2, 60)
    out = asm.feed(good + bad + chain([60], 3))
    assert [type(d) for d in out] == [TxPacket, TxReject] and out[1].fatal
    with pytest.raises(LocalError, match="disabled"):
        asm.feed(good)
    assert asm.end_of_batch() is None
    asm.reset()
    assert asm.feed(good) == [TxPacket((1,), 0, (TxPiece(100, 0, 60),), 0)]


@pytest.mark.parametrize("data,missing", [
    (tx(1, 0, EXTRA, 1, 60), "missing extra info"),
    (tx(1, 0, EXTRA, 1, 60) + gso(more=True), "missing extra info"),
    (tx(1, 0, MORE, 1, 60), "missing slots"),
    (chain([100, 50, 50])[:-12], "missing slots"),
])
def test_incomplete_packet_at_end_of_batch_is_fatal(data, missing):
    asm = TxAssembler(gso_types=BOTH)
    assert asm.feed(data) == []
    d = asm.end_of_batch()
    assert isinstance(d, TxReject) and d.fatal and missing in d.reason
    assert d.slots == len(data) // 12
    assert asm.disabled


def test_misuse_is_local_error():
    with pytest.raises(LocalError, match="whole number"):
        TxAssembler().feed(bytes(13))
    with pytest.raises(LocalError):
        TxAssembler(max_tx_slots=21)
    with pytest.raises(LocalError):
        TxAssembler(gso_types=frozenset({3}))
    assert FATAL_TX_SLOTS == 20


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(min_size=12, max_size=12), max_size=64))
def test_random_slots_never_raise(slots):
    asm = TxAssembler(gso_types=BOTH)
    out = asm.feed(b"".join(slots))
    for d in out:
        assert len(d.responses()) == d.slots
        assert d.pack_responses() == pack_tx_responses(d.responses())
        assert isinstance(d, TxPacket | TxMcast | TxReject)
        if isinstance(d, TxPacket):
            assert all(x.offset + x.length <= 4096 for x in d.pieces)
            assert d.pieces[0].length >= 14
    if any(isinstance(d, TxReject) and d.fatal for d in out):
        assert asm.disabled
    else:
        held = asm.pending
        assert sum(d.slots for d in out) + held == len(slots)
        tail = asm.end_of_batch()
        assert (tail is None) == (held == 0)
        if tail is not None:
            assert tail.fatal and tail.slots == held and asm.disabled


# -- rx -------------------------------------------------------------------------------------

SIZES = [14, 60, 1514, 4095, 4096, 4097, 9000, 8192, 65535, 65536]


def posted(n: int, base: int = 0) -> list[RxRequest]:
    return [RxRequest(base + i, 1000 + base + i) for i in range(n)]


def frontend_reads(plan: RxPlan, frame: bytes, reqs: list[RxRequest]):
    """Do the plan's copies into pages, then read the packed responses back
    as netfront does: slot by slot, extras after the first, more_data."""
    pages = {r.gref: bytearray(4096) for r in reqs}
    for c in plan.copies:
        pages[c.gref][c.offset:c.offset + c.length] = frame[c.frame_offset:c.frame_offset + c.length]
    raw = plan.pack_responses()
    assert len(raw) == 8 * plan.consumed
    slots = [raw[i:i + 8] for i in range(0, len(raw), 8)]
    first = parse_rx_response(slots[0])
    i, extras = 1, []
    if first.flags & p.NETRXF_extra_info:
        while True:
            e = parse_extra(slots[i])
            extras.append(e)
            i += 1
            if not e.flags & p.XEN_NETIF_EXTRA_FLAG_MORE:
                break
    data, rsp, slot_of = bytearray(), first, 0
    while True:
        assert rsp.id == reqs[slot_of].id     # the response sits in its request's slot
        page = pages[reqs[slot_of].gref]
        data += page[rsp.offset:rsp.offset + rsp.status]
        if not rsp.flags & p.NETRXF_more_data:
            break
        rsp, slot_of = parse_rx_response(slots[i]), i
        i += 1
    assert i == plan.consumed
    return bytes(data), first, extras


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("use_gso", [False, True])
def test_rx_frames_with_sg(size, use_gso):
    frame = bytes((i * 7 + 3) & 0xFF for i in range(size))
    reqs = posted(20)
    b = RxBuilder(sg=True, gso_types=BOTH)
    extra = GsoExtra(TCPV4, 1448) if use_gso else None
    plan = b.build(size, reqs, gso=extra, csum_blank=use_gso)
    assert isinstance(plan, RxPlan)
    assert plan.consumed == rx_slots_needed(size, gso=use_gso) == -(-size // 4096) + use_gso
    data, first, extras = frontend_reads(plan, frame, reqs)
    assert data == frame
    assert extras == ([GsoExtra(TCPV4, 1448)] if use_gso else [])
    assert first.status == min(size, 4096) and first.offset == 0
    want = (p.NETRXF_extra_info | p.NETRXF_csum_blank | p.NETRXF_data_validated if use_gso else 0)
    assert first.flags & ~p.NETRXF_more_data == want
    assert bool(first.flags & p.NETRXF_more_data) == (size > 4096)
    assert (b.delivered, b.dropped) == (1, 0)


@pytest.mark.parametrize("size", SIZES)
def test_rx_frames_without_sg(size):
    b = RxBuilder()
    out = b.build(size, posted(20))
    if size <= 4096:
        assert isinstance(out, RxPlan) and out.consumed == 1
        assert out.responses == (RxResponse(0, 0, 0, size),)
        assert out.copies[0].gref == 1000 and out.copies[0].length == size
    else:
        assert out == RxDrop(f"frame of {size} bytes needs {-(-size // 4096)} slots and the frontend "
                             "has no feature-sg")
        assert out.status == NetifStatus.DROPPED and b.dropped == 1


def test_rx_gso_and_hash_extras_follow_the_first_slot():
    frame = bytes(range(256)) * 40   # 10240 bytes: 3 data slots
    reqs = posted(8, base=50)
    plan = RxBuilder(sg=True, gso_types=BOTH).build(
        len(frame), reqs, gso=GsoExtra(TCPV6, 1400), hash=HashExtra(3, 1, 0x12345678), data_validated=True)
    assert isinstance(plan, RxPlan) and plan.consumed == 5
    r = plan.responses
    assert isinstance(r[0], RxResponse) and r[0].flags == (p.NETRXF_extra_info | p.NETRXF_more_data
                                                           | p.NETRXF_data_validated)
    assert r[1] == GsoExtra(TCPV6, 1400, 0, p.XEN_NETIF_EXTRA_FLAG_MORE)
    assert r[2] == HashExtra(3, 1, 0x12345678, 0)
    assert [x.id for x in r if isinstance(x, RxResponse)] == [50, 53, 54]
    data, _, extras = frontend_reads(plan, frame, reqs)
    assert data == frame and len(extras) == 2


def test_rx_one_slot_gso_frame():
    plan = RxBuilder(sg=True, gso_types=BOTH).build(3000, posted(2), gso=GsoExtra(TCPV4, 1448))
    assert isinstance(plan, RxPlan)
    assert plan.responses == (RxResponse(0, 0, p.NETRXF_extra_info, 3000), GsoExtra(TCPV4, 1448))


@pytest.mark.parametrize("size,use_gso,n", [(60, False, 0), (4097, False, 1), (9000, True, 3),
                                             (65536, False, 15), (65536, True, 16)])
def test_rx_too_few_posted_slots_drops_and_counts(size, use_gso, n):
    b = RxBuilder(sg=True, gso_types=BOTH)
    out = b.build(size, posted(n), gso=GsoExtra(TCPV4, 1448) if use_gso else None)
    assert out == RxDrop(f"frame needs {n + 1} rx slots, the frontend posted {n}")
    assert (b.delivered, b.dropped) == (0, 1)
    assert isinstance(b.build(size, posted(n + 1), gso=GsoExtra(TCPV4, 1448) if use_gso else None), RxPlan)
    assert (b.delivered, b.dropped) == (1, 1)


@pytest.mark.parametrize("size,gso_extra,reason", [
    (13, None, "frame of 13 bytes is shorter than an Ethernet header"),
    (0, None, "frame of 0 bytes is shorter"),
    (18 * 4096 + 1, None, "needs 19 slots; frontends take 18"),
    (9000, GsoExtra(TCPV6, 1448), "the frontend did not ask for feature-gso-tcpv6"),
    (9000, GsoExtra(7, 1448), "did not ask for GSO type 7"),
])
def test_rx_undeliverable_frames(size, gso_extra, reason):
    b = RxBuilder(sg=True, gso_types=frozenset({TCPV4}))
    out = b.build(size, posted(30), gso=gso_extra)
    assert isinstance(out, RxDrop) and reason in out.reason and b.dropped == 1


def test_rx_largest_deliverable_frame():
    plan = RxBuilder(sg=True).build(18 * 4096, posted(18))
    assert isinstance(plan, RxPlan) and plan.consumed == 18


def test_rx_misuse():
    with pytest.raises(LocalError):
        RxBuilder(sg=True, gso_types=BOTH).build(9000, posted(4), gso=GsoExtra(TCPV4, 0))
    with pytest.raises(LocalError):
        RxBuilder(gso_types=frozenset({5}))


# -- over a real ring.h ring (xmp.testing.ring_pair: one private bytearray) -------------


def test_tx_batch_over_a_ring_pair():
    front, back, buf = ring_pair(p.TX_SLOT_SIZE, p.TX_SLOT_SIZE)
    assert front.nr_ents == p.NET_TX_RING_SIZE
    stream = b"".join(STREAM)
    assert front.put_requests(stream) == len(stream) // 12
    front.push_requests_and_check_notify()
    asm = TxAssembler(gso_types=BOTH)
    decisions = asm.feed(back.get_requests())
    assert asm.end_of_batch() is None
    rsp = b"".join(d.pack_responses() for d in decisions)
    assert rsp == pack_tx_responses([r for d in decisions for r in d.responses()])
    assert back.put_responses(rsp) == len(stream) // 12
    back.push_responses_and_check_notify()
    got = front.get_responses()
    answers = [parse_tx_response(got[i:i + 12]) for i in range(0, len(got), 12)]
    # Every slot answered once; the extras NULL; refused packets' ids ERROR.
    assert len(answers) == len(stream) // 12
    assert [a.id for a in answers if a.status != NetifStatus.NULL] == \
        [i for d in decisions for i in (d.ids if not isinstance(d, TxMcast) else (d.id,))]
    assert {a.id: a.status for a in answers}[20] == NetifStatus.ERROR
    # A response leaves nothing of the request behind in its slot.
    assert all(buf[64 + 12 * i + 4:64 + 12 * (i + 1)] == bytes(8) for i in range(len(answers)))


def test_rx_frame_over_a_ring_pair():
    front, back, _ = ring_pair(p.RX_SLOT_SIZE, p.RX_SLOT_SIZE)
    assert front.nr_ents == p.NET_RX_RING_SIZE
    reqs = [RxRequest(i, 500 + i) for i in range(6)]
    front.put_requests(b"".join(r.pack() for r in reqs))
    front.push_requests_and_check_notify()
    raw = back.get_requests()
    seen = [parse_rx_request(raw[i:i + 8]) for i in range(0, len(raw), 8)]
    assert seen == reqs
    frame = bytes(range(256)) * 36     # 9216 bytes: 3 data slots + GSO
    plan = RxBuilder(sg=True, gso_types=BOTH).build(len(frame), seen, gso=GsoExtra(TCPV4, 1448))
    assert isinstance(plan, RxPlan)
    back.put_responses(plan.pack_responses())
    back.push_responses_and_check_notify()
    got = front.get_responses()
    assert len(got) == 8 * plan.consumed == 32
    data, first, extras = frontend_reads(RxPlan(plan.consumed, plan.copies, plan.responses), frame, reqs)
    assert data == frame and extras == [GsoExtra(TCPV4, 1448)]
    assert got == plan.pack_responses()


def test_rx_failed_copies_answer_error_in_their_slots():
    plan = RxBuilder(sg=True, gso_types=BOTH).build(9000, posted(5), gso=GsoExtra(TCPV4, 1448))
    assert isinstance(plan, RxPlan)
    bad = plan.with_errors([1])
    assert [getattr(r, "status", None) for r in bad.responses] == [4096, None, -1, 808]
    assert bad.responses[2] == RxResponse(2, 0, p.NETRXF_more_data, NetifStatus.ERROR)
    assert bad.copies == plan.copies and bad.consumed == plan.consumed
    with pytest.raises(LocalError):
        plan.with_errors([3])
