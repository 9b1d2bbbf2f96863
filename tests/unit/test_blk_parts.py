"""Pieces of blkfront and blkback that need no process: the pool's run
allocator, segment columns, the backend's checks of a frontend's keys and
blkfront's settings."""

from __future__ import annotations

import os
import random
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from xmp.drivers.blk import backend, frontend, protocol, requests
from xmp.drivers.blk.protocol import BadRequest, Segment, SegmentArray, parse_segment_array
from xmp.errors import LocalError

# -- the pool's extents ------------------------------------------------------------


def test_extents_first_fit_and_merge():
    ex = requests.Extents(16)
    a, b, c = ex.alloc(4), ex.alloc(4), ex.alloc(8)
    assert (a, b, c) == (0, 4, 8) and ex.alloc(1) is None
    ex.release(4, 4)
    assert ex.alloc(5) is None  # only 4 free, in one run
    ex.release(0, 4)
    assert ex.free == [(0, 8)]  # merged with its right-hand neighbour
    ex.release(8, 8)
    assert ex.free == [(0, 16)]  # and with its left-hand one


@given(st.lists(st.integers(1, 40), min_size=1, max_size=60), st.randoms())
def test_extents_never_overlap_and_give_everything_back(sizes, rng):
    ex = requests.Extents(128)
    held: list[tuple[int, int]] = []
    for n in sizes:
        start = ex.alloc(n)
        if start is None:
            if held:
                held.sort(key=lambda _: rng.random())
                ex.release(*held.pop())
            continue
        assert 0 <= start and start + n <= 128
        assert all(start + n <= s or s + m <= start for s, m in held), "overlap"
        held.append((start, n))
    for run in held:
        ex.release(*run)
    assert ex.free == [(0, 128)]


# -- segment columns -----------------------------------------------------------------


def test_segment_array_whole_pages_and_sectors():
    segs = [Segment(10 + i, 0, 7) for i in range(256)]
    raw = b"".join(s.pack() for s in segs)
    arr = parse_segment_array(raw, 256, req_id=9)
    assert arr.grefs == list(range(10, 266)) and arr.whole_pages() and arr.nr_sectors == 256 * 8
    mixed = [Segment(1, 0, 7), Segment(2, 3, 5), Segment(3, 0, 0)]
    arr = parse_segment_array(b"".join(s.pack() for s in mixed), 3)
    assert arr == SegmentArray.of(mixed) and not arr.whole_pages() and arr.nr_sectors == 8 + 3 + 1


@given(st.lists(st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 255), st.integers(0, 255)),
                min_size=1, max_size=300))
def test_segment_array_agrees_with_the_segment_parser(segs):
    raw = b"".join(struct.pack("<IBB2x", *s) for s in segs)
    try:
        want = protocol.parse_indirect_segments(raw, len(segs), req_id=5)
    except BadRequest as bad:
        with pytest.raises(BadRequest) as got:
            parse_segment_array(raw, len(segs), req_id=5)
        assert got.value.req_id == 5 and str(got.value) == str(bad)
        return
    assert parse_segment_array(raw, len(segs), req_id=5) == SegmentArray.of(want)


def test_segment_array_takes_a_private_copy():
    buf = bytearray(Segment(7, 0, 7).pack())
    arr = parse_segment_array(buf, 1)
    buf[:] = struct.pack("<IBB2x", 99, 0, 9)  # the frontend rewrites the page afterwards
    assert arr.grefs == [7] and arr.last == b"\x07"


# -- the backend's reading of a frontend's keys ---------------------------------------


class FakeDev:
    otherend_id = 3

    def __init__(self, keys: dict[str, str]):
        self.keys = keys

    def read_other(self, key: str):
        v = self.keys.get(key)
        return None if v is None else v.encode()


@pytest.mark.parametrize("keys, message", [
    ({"protocol": "x86_32-abi"}, "unsupported protocol"),
    ({"multi-queue-num-queues": "99"}, "multi-queue-num-queues is b'99', not a number in 1..4"),
    ({"multi-queue-num-queues": "0"}, "not a number in 1..4"),
    ({"ring-page-order": "5"}, "ring-page-order is b'5', not a number in 0..4"),
    ({"ring-page-order": "-1"}, "not a number in 0..4"),
    ({"ring-ref": "x"}, "ring-ref is b'x'"),
    ({"ring-ref": None}, "the frontend gave no ring-ref"),
    ({"event-channel": "99999999999"}, "event-channel"),
    ({"ring-page-order": "1", "ring-ref0": "8"}, "the frontend gave no ring-ref1"),
    ({"multi-queue-num-queues": "2"}, "the frontend gave no queue-0/ring-ref"),
])
def test_backend_refuses_bad_frontend_keys_before_touching_anything(keys, message):
    base = {"protocol": "x86_64-abi", "ring-ref": "8", "event-channel": "5"}
    dev = FakeDev({k: v for k, v in {**base, **keys}.items() if v is not None})
    back = backend.BlkBack(kernel=None)  # any use of the kernel would fail: none happens
    back.fd = -1
    with pytest.raises(ValueError, match="vbd: ") as exc:
        back.connect(dev)  # type: ignore[arg-type]
    assert message in str(exc.value)
    assert back.queues == [] and back.dev is None


# -- blkfront's settings --------------------------------------------------------------


class K:
    """A kernel stand-in: settings are kept per kernel object."""


def test_configure_checks_and_keeps_settings_per_kernel():
    k1, k2 = K(), K()
    frontend.configure(k1, persistent=False, num_queues=2)
    frontend.configure(k1, ring_page_order=3)  # merges with what was set
    assert frontend._options[k1] == {**frontend.DEFAULTS, "persistent": False, "num_queues": 2,
                                     "ring_page_order": 3}
    assert k2 not in frontend._options
    with pytest.raises(LocalError, match="unknown option"):
        frontend.configure(k2, queues=2)
    with pytest.raises(LocalError, match=r"num_queues = 9 is not an integer in 1..4"):
        frontend.configure(k2, num_queues=9)
    with pytest.raises(LocalError, match=r"max_indirect_segments = 300"):
        frontend.configure(k2, max_indirect_segments=300)
    assert k2 not in frontend._options  # a refused setting changes nothing


def test_blkio_result_joins_parts_in_order():
    io = requests.BlkIO(protocol.BlkifOp.READ, 0, 12, None)
    parts = {8: b"cccc", 0: b"aaaa", 4: b"bbbb"}
    io.chunks.update(random.Random(1).sample(sorted(parts.items()), 3))
    assert io.result() == b"aaaabbbbcccc"
    io.left = 1
    with pytest.raises(LocalError, match="still in flight"):
        io.result()


# -- the image file's side -------------------------------------------------------------


def test_transfer_reads_zeros_past_the_end_and_writes_everything(tmp_path):
    from xmp.drivers.blk import image

    path = tmp_path / "img"
    path.write_bytes(b"a" * 6000)
    fd = os.open(path, os.O_RDWR)
    try:
        bufs = [bytearray(b"x" * 4096), bytearray(b"x" * 4096)]
        views = [memoryview(b) for b in bufs]
        image.transfer(fd, views, 0, False, 8192)  # the file ends inside the second view
        assert bytes(bufs[0]) == b"a" * 4096 and bytes(bufs[1]) == b"a" * 1904 + bytes(2192)
        image.transfer(fd, [memoryview(b"b" * 512), memoryview(b"c" * 4096)], 10000, True, 4608)
        assert path.read_bytes()[10000:] == b"b" * 512 + b"c" * 4096
    finally:
        os.close(fd)


def test_discard_punches_whole_granules_and_zeroes_the_edges(tmp_path):
    from xmp.drivers.blk import image

    path = tmp_path / "img"
    path.write_bytes(os.urandom(64 * 1024))
    fd = os.open(path, os.O_RDWR)
    try:
        os.fsync(fd)
        before = os.fstat(fd).st_blocks
        image.discard(fd, 1000, 40000)  # granules 4096..40960 punched, edges written
        data = path.read_bytes()
        assert data[1000:41000] == bytes(40000)
        assert os.fstat(fd).st_blocks < before  # the space went back
    finally:
        os.close(fd)
