"""blkif's wire format: struct layouts byte by byte against the offsets of
xen/include/public/io/blkif.h (x86-64), round trips, zeroed padding, and
a hostile frontend's requests refused with the right id and status."""

from __future__ import annotations

import pickle
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from xmp.drivers.blk.protocol import (
    BLKIF_DISCARD_SECURE,
    BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST,
    BLKIF_MAX_SEGMENTS_PER_REQUEST,
    DISCARD_SIZE,
    INDIRECT_SIZE,
    REQUEST_SIZE,
    RESPONSE_SIZE,
    SECTOR_SIZE,
    SEGS_PER_INDIRECT_FRAME,
    SLOT_SIZE,
    VDISK_CDROM,
    VDISK_READONLY,
    VDISK_REMOVABLE,
    BadRequest,
    BlkifOp,
    BlkifStatus,
    DiscardRequest,
    IndirectRequest,
    Request,
    Response,
    Segment,
    check_bounds,
    indirect_pages,
    pack_indirect_segments,
    parse_indirect_segments,
    parse_request,
    parse_response,
    request_bytes,
    sectors_of,
)
from xmp.errors import LocalError, RemoteProtocolError
from xmp.sharedmem.ring import ring_nr_ents

ID = 0x1122334455667788


def u8(b: bytes, off: int) -> int:
    return b[off]


def u16(b: bytes, off: int) -> int:
    return struct.unpack_from("<H", b, off)[0]


def i16(b: bytes, off: int) -> int:
    return struct.unpack_from("<h", b, off)[0]


def u32(b: bytes, off: int) -> int:
    return struct.unpack_from("<I", b, off)[0]


def u64(b: bytes, off: int) -> int:
    return struct.unpack_from("<Q", b, off)[0]


def raw_request(op: int, byte1: int = 0, handle: int = 0, req_id: int = ID, sector: int = 0,
                segs: list[tuple[int, int, int]] | None = None) -> bytearray:
    """A slot built by hand from blkif.h's offsets, not by the module."""
    b = bytearray(REQUEST_SIZE)
    b[0], b[1] = op, byte1
    struct.pack_into("<H", b, 2, handle)
    struct.pack_into("<Q", b, 8, req_id)
    struct.pack_into("<Q", b, 16, sector)
    for i, (gref, first, last) in enumerate(segs or []):
        struct.pack_into("<IBB", b, 24 + 8 * i, gref, first, last)
    return b


# -- constants and sizes -----------------------------------------------------


def test_constants_are_blkif_h():
    assert [int(op) for op in BlkifOp] == [0, 1, 2, 3, 4, 5, 6]
    assert BlkifOp.FLUSH_DISKCACHE == 3 and BlkifOp.DISCARD == 5 and BlkifOp.INDIRECT == 6
    assert (BlkifStatus.OKAY, BlkifStatus.ERROR, BlkifStatus.EOPNOTSUPP) == (0, -1, -2)
    assert BLKIF_MAX_SEGMENTS_PER_REQUEST == 11
    assert BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST == 8
    assert SEGS_PER_INDIRECT_FRAME == 512
    assert BLKIF_DISCARD_SECURE == 1
    assert (VDISK_CDROM, VDISK_REMOVABLE, VDISK_READONLY) == (1, 2, 4)
    assert SECTOR_SIZE == 512


def test_struct_sizes_with_padding():
    # request: 1+1+2, 4 pad, 8 id, 8 sector, 11 * (4+1+1+2 pad) = 112
    assert REQUEST_SIZE == 112
    # response: 8 id, 1 op, 1 pad, 2 status, 4 tail pad (8-aligned) = 16
    assert RESPONSE_SIZE == 16
    assert DISCARD_SIZE == 32
    # indirect: ... 24 handle, 2 pad, 28 grefs[8] -> 60, tail pad to 64
    assert INDIRECT_SIZE == 64
    assert SLOT_SIZE == 112


def test_one_page_ring_has_32_slots():
    assert ring_nr_ents(4096, SLOT_SIZE) == 32


# -- layouts, byte by byte ------------------------------------------------------


def test_request_layout():
    segs = tuple(Segment(0xA0000000 + i, i % 8, 7) for i in range(BLKIF_MAX_SEGMENTS_PER_REQUEST))
    b = Request(BlkifOp.WRITE, 51712, ID, 0x0102030405060708, segs).pack()
    assert len(b) == REQUEST_SIZE
    assert u8(b, 0) == 1 and u8(b, 1) == 11 and u16(b, 2) == 51712
    assert b[4:8] == bytes(4)
    assert u64(b, 8) == ID and u64(b, 16) == 0x0102030405060708
    for i in range(11):
        off = 24 + 8 * i
        assert u32(b, off) == 0xA0000000 + i
        assert u8(b, off + 4) == i % 8 and u8(b, off + 5) == 7
        assert b[off + 6:off + 8] == bytes(2)


def test_request_unused_segments_are_zero():
    b = Request(BlkifOp.READ, 1, 2, 3, (Segment(9, 0, 7),)).pack()
    assert b[32:] == bytes(REQUEST_SIZE - 32)
    assert b == bytes(raw_request(0, 1, 1, 2, 3, [(9, 0, 7)]))


def test_discard_layout():
    b = DiscardRequest(ID, 100, 2048, BLKIF_DISCARD_SECURE, 768).pack()
    assert len(b) == REQUEST_SIZE
    assert u8(b, 0) == 5 and u8(b, 1) == 1 and u16(b, 2) == 768 and b[4:8] == bytes(4)
    assert u64(b, 8) == ID and u64(b, 16) == 100 and u64(b, 24) == 2048
    assert b[32:] == bytes(REQUEST_SIZE - 32)


def test_indirect_layout():
    req = IndirectRequest(BlkifOp.READ, 1000, ID, 77, 51728, (0x11, 0x22))
    b = req.pack()
    assert len(b) == REQUEST_SIZE
    assert u8(b, 0) == 6 and u8(b, 1) == 0 and u16(b, 2) == 1000 and b[4:8] == bytes(4)
    assert u64(b, 8) == ID and u64(b, 16) == 77
    assert u16(b, 24) == 51728 and b[26:28] == bytes(2)
    assert [u32(b, 28 + 4 * i) for i in range(8)] == [0x11, 0x22, 0, 0, 0, 0, 0, 0]
    assert b[60:] == bytes(REQUEST_SIZE - 60)


def test_response_layout():
    b = Response(ID, BlkifOp.FLUSH_DISKCACHE, BlkifStatus.EOPNOTSUPP).pack()
    assert len(b) == RESPONSE_SIZE
    assert u64(b, 0) == ID and u8(b, 8) == 3 and i16(b, 10) == -2
    assert b[9] == 0 and b[12:16] == bytes(4)


# -- round trips ----------------------------------------------------------------


def test_parse_hand_built_request():
    req = parse_request(raw_request(1, 2, 51712, ID, 8, [(5, 0, 7), (6, 1, 3)]))
    assert req == Request(BlkifOp.WRITE, 51712, ID, 8, (Segment(5, 0, 7), Segment(6, 1, 3)))


def test_parse_ignores_padding_garbage():
    b = raw_request(0, 1, 0, ID, 0, [(5, 0, 7)])
    b[4:8] = b"\xff" * 4
    b[30:32] = b"\xff\xff"
    b[40:] = b"\xee" * (REQUEST_SIZE - 40)   # beyond nr_segments
    assert parse_request(b) == Request(BlkifOp.READ, 0, ID, 0, (Segment(5, 0, 7),))


@pytest.mark.parametrize("req", [
    Request(BlkifOp.READ, 51712, 1, 0, (Segment(1, 0, 7),)),
    Request(BlkifOp.WRITE_BARRIER, 51712, 2, 9, ()),
    Request(BlkifOp.FLUSH_DISKCACHE, 0, 3, 0, ()),
    DiscardRequest(4, 10, 20),
    DiscardRequest(5, 10, 20, BLKIF_DISCARD_SECURE, 7),
    IndirectRequest(BlkifOp.WRITE, 4096, 6, 0, 1, tuple(range(8))),
])
def test_round_trip(req):
    assert parse_request(req.pack(), max_indirect_segments=4096) == req


def test_response_round_trip_and_hostile_status():
    rsp = Response(ID, BlkifOp.READ, BlkifStatus.OKAY)
    assert parse_response(rsp.pack()) == rsp
    bad = bytearray(rsp.pack())
    struct.pack_into("<h", bad, 10, 5)
    with pytest.raises(RemoteProtocolError, match="unknown status 5"):
        parse_response(bad)


segment = st.builds(lambda g, a, n: Segment(g, a, a + n),
                    st.integers(0, 2**32 - 1), st.integers(0, 7), st.integers(0, 7)
                    ).filter(lambda s: s.last_sect <= 7)
u64s = st.integers(0, 2**64 - 1)


@given(op=st.sampled_from([BlkifOp.READ, BlkifOp.WRITE]), handle=st.integers(0, 0xFFFF), req_id=u64s,
       sector=u64s, segs=st.lists(segment, min_size=1, max_size=11))
def test_hypothesis_rw_round_trip(op, handle, req_id, sector, segs):
    req = Request(op, handle, req_id, sector, tuple(segs))
    b = req.pack()
    assert len(b) == REQUEST_SIZE and b[4:8] == bytes(4)
    assert all(b[24 + 8 * i + 6:24 + 8 * i + 8] == bytes(2) for i in range(11))
    assert b[24 + 8 * len(segs):] == bytes(8 * (11 - len(segs)))
    assert parse_request(b) == req


@given(req_id=u64s, sector=u64s, nr=u64s, flag=st.sampled_from([0, 1]), handle=st.integers(0, 0xFFFF))
def test_hypothesis_discard_round_trip(req_id, sector, nr, flag, handle):
    req = DiscardRequest(req_id, sector, nr, flag, handle)
    assert parse_request(req.pack()) == req


@given(op=st.sampled_from([BlkifOp.READ, BlkifOp.WRITE]), nr=st.integers(1, 4096), req_id=u64s,
       sector=u64s, handle=st.integers(0, 0xFFFF), data=st.data())
def test_hypothesis_indirect_round_trip(op, nr, req_id, sector, handle, data):
    grefs = tuple(data.draw(st.lists(st.integers(0, 2**32 - 1), min_size=indirect_pages(nr),
                                     max_size=indirect_pages(nr))))
    req = IndirectRequest(op, nr, req_id, sector, handle, grefs)
    assert parse_request(req.pack(), max_indirect_segments=4096) == req


@given(st.binary(min_size=REQUEST_SIZE, max_size=REQUEST_SIZE), st.integers(0, 4096))
def test_hypothesis_random_slots_parse_or_raise_bad_request(blob, max_ind):
    try:
        req = parse_request(blob, max_indirect_segments=max_ind)
    except BadRequest as e:
        assert e.req_id == u64(blob, 8)
        assert e.status in (BlkifStatus.ERROR, BlkifStatus.EOPNOTSUPP)
    else:
        assert req.id == u64(blob, 8)


# -- a hostile frontend ---------------------------------------------------------


HOSTILE = [
    ("unknown op", raw_request(7), BlkifStatus.EOPNOTSUPP, 7),
    ("op 255", raw_request(255), BlkifStatus.EOPNOTSUPP, 255),
    ("reserved op", raw_request(4), BlkifStatus.EOPNOTSUPP, 4),
    ("read, 0 segments", raw_request(0, 0), BlkifStatus.ERROR, 0),
    ("write, 12 segments", raw_request(1, 12, segs=[(1, 0, 7)] * 11), BlkifStatus.ERROR, 1),
    ("write, 255 segments", raw_request(1, 255), BlkifStatus.ERROR, 1),
    ("flush, 12 segments", raw_request(3, 12), BlkifStatus.ERROR, 3),
    ("first > last", raw_request(0, 1, segs=[(1, 5, 4)]), BlkifStatus.ERROR, 0),
    ("last > 7", raw_request(0, 2, segs=[(1, 0, 7), (2, 0, 8)]), BlkifStatus.ERROR, 0),
    ("both 255", raw_request(1, 1, segs=[(1, 255, 255)]), BlkifStatus.ERROR, 1),
    ("discard flag", raw_request(5, 2), BlkifStatus.ERROR, 5),
]


@pytest.mark.parametrize("name,slot,status,op", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_requests_raise_bad_request_with_id(name, slot, status, op):
    with pytest.raises(BadRequest) as info:
        parse_request(slot, max_indirect_segments=256)
    e = info.value
    assert isinstance(e, RemoteProtocolError)
    assert e.req_id == ID and e.status == status and e.operation == op
    assert e.response() == Response(ID, op, status)
    assert parse_response(e.response().pack()) == Response(ID, op, status)


def indirect_slot(indirect_op: int, nr: int) -> bytearray:
    b = raw_request(6, indirect_op)
    struct.pack_into("<H", b, 2, nr)
    return b


@pytest.mark.parametrize("indirect_op,nr,maximum,status", [
    (0, 0, 256, BlkifStatus.ERROR),          # no segments
    (0, 257, 256, BlkifStatus.ERROR),        # more than advertised
    (1, 0xFFFF, 4096, BlkifStatus.ERROR),
    (2, 10, 256, BlkifStatus.ERROR),         # barrier is no indirect_op
    (6, 10, 256, BlkifStatus.ERROR),         # nor is indirect itself
    (0, 10, 0, BlkifStatus.EOPNOTSUPP),      # indirect not offered
])
def test_hostile_indirect(indirect_op, nr, maximum, status):
    with pytest.raises(BadRequest) as info:
        parse_request(indirect_slot(indirect_op, nr), max_indirect_segments=maximum)
    assert info.value.req_id == ID and info.value.status == status and info.value.operation == 6


def test_indirect_keeps_only_the_grefs_it_needs():
    b = indirect_slot(0, 513)
    struct.pack_into("<8I", b, 28, *range(1, 9))
    req = parse_request(b, max_indirect_segments=1024)
    assert isinstance(req, IndirectRequest) and req.indirect_grefs == (1, 2)


def test_parse_takes_a_private_copy():
    slot = raw_request(0, 1, segs=[(1, 0, 7)])
    req = parse_request(memoryview(slot))
    slot[24:32] = b"\xff" * 8
    assert req == Request(BlkifOp.READ, 0, ID, 0, (Segment(1, 0, 7),))


def test_bad_request_pickles():
    e = BadRequest("x", ID, 3, BlkifStatus.EOPNOTSUPP)
    e2 = pickle.loads(pickle.dumps(e))
    assert (e2.req_id, e2.operation, e2.status, str(e2)) == (ID, 3, -2, str(e))


def test_local_misuse_is_local_error():
    with pytest.raises(LocalError):
        parse_request(bytes(REQUEST_SIZE - 1))
    with pytest.raises(LocalError):
        Request(BlkifOp.READ, 0, 0, 0, (Segment(1, 0, 7),) * 12).pack()
    with pytest.raises(LocalError):
        Request(BlkifOp.READ, 0, 0, 0, (Segment(1, 3, 2),)).pack()
    with pytest.raises(LocalError):
        Request(BlkifOp.READ, 0x10000, 0, 0, ()).pack()
    with pytest.raises(LocalError):
        IndirectRequest(BlkifOp.READ, 513, 0, 0, 0, (1,)).pack()
    with pytest.raises(LocalError):
        parse_request(bytes(REQUEST_SIZE), max_indirect_segments=4097)


# -- indirect pages ---------------------------------------------------------------


def test_indirect_pages_pack_and_parse():
    segs = tuple(Segment(1000 + i, i % 8, 7) for i in range(600))
    pages = pack_indirect_segments(segs)
    assert len(pages) == 2 * 4096
    assert u32(pages, 0) == 1000 and pages[4] == 0 and pages[5] == 7 and pages[6:8] == bytes(2)
    assert u32(pages, 512 * 8) == 1512           # segment 512 opens page 2
    assert pages[600 * 8:] == bytes(2 * 4096 - 600 * 8)
    assert parse_indirect_segments(pages, 600, req_id=ID) == segs
    assert indirect_pages(512) == 1 and indirect_pages(513) == 2 and indirect_pages(4096) == 8


def test_hostile_indirect_segment():
    pages = bytearray(pack_indirect_segments([Segment(1, 0, 7)] * 3))
    pages[2 * 8 + 4] = 6
    pages[2 * 8 + 5] = 2
    with pytest.raises(BadRequest, match="segment 2") as info:
        parse_indirect_segments(pages, 3, req_id=ID)
    assert info.value.req_id == ID and info.value.operation == BlkifOp.INDIRECT
    # Segments past ``count`` are not looked at.
    assert len(parse_indirect_segments(pages, 2)) == 2


def test_indirect_segments_misuse():
    with pytest.raises(LocalError):
        parse_indirect_segments(bytes(4096), 513)
    with pytest.raises(LocalError):
        pack_indirect_segments([])


# -- sizes and bounds -----------------------------------------------------------------


def test_request_bytes_and_sectors():
    req = Request(BlkifOp.READ, 0, 0, 0, (Segment(1, 0, 7), Segment(2, 2, 2)))
    assert sectors_of(req) == 9 and request_bytes(req) == 9 * 512
    assert sectors_of(DiscardRequest(0, 0, 33)) == 33 and request_bytes(DiscardRequest(0, 0, 33)) == 33 * 512
    assert request_bytes([Segment(1, 0, 7)] * 3) == 3 * 4096
    with pytest.raises(LocalError):
        sectors_of(IndirectRequest(BlkifOp.READ, 1, 0, 0, 0, (1,)))


@pytest.mark.parametrize("sector,nr", [(0, 0), (0, 100), (99, 1), (100, 0), (50, 50)])
def test_in_bounds(sector, nr):
    check_bounds(sector, nr, 100)


@pytest.mark.parametrize("sector,nr", [
    (100, 1), (0, 101), (99, 2), (2**64 - 1, 1), (2**64 - 1, 2), (2**63, 2**63), (1, 2**64 - 1),
    (-1, 1), (0, -1),
])
def test_out_of_bounds(sector, nr):
    with pytest.raises(BadRequest) as info:
        check_bounds(sector, nr, 100, req_id=ID, operation=BlkifOp.WRITE)
    assert info.value.req_id == ID and info.value.operation == 1
    assert info.value.status == BlkifStatus.ERROR
