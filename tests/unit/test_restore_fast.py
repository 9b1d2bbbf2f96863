"""The restore fast path: an image fed whole as a read-only view is
decoded in place (its pages are views of it, never copied), reads back
exactly as the same image fed in small chunks, and fill's runs cover
every page with data once."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_save_image import MAX_PAGES, PS, image

from xmp.migration.image import ImageDecoder, decode_image
from xmp.migration.stream.framing import Input
from xmp.toolstack.save import IOV_MAX, _runs

pytestmark = pytest.mark.timeout(60)


def test_input_adopts_bytes_and_read_only_views_and_copies_what_may_change():
    inp = Input()
    src = bytes(range(256)) * 4
    inp.feed(src)
    view = inp.take_view(10)
    assert isinstance(view, memoryview) and view.obj is src and bytes(view) == src[:10]
    assert inp.take(6) == src[10:16] and inp.offset == 16
    inp.feed(b"tail")          # the adopted remainder and the new bytes, together now
    assert inp.available() == len(src) - 16 + 4
    assert inp.take(len(src) - 16 + 4) == src[16:] + b"tail"
    mutable = bytearray(b"abcdef")
    inp.feed(mutable)          # a bytearray the caller may change: copied
    mutable[:] = b"XXXXXX"
    assert bytes(inp.take_view(6)) == b"abcdef"
    ro = memoryview(bytearray(b"0123456789")).toreadonly()
    inp.feed(ro)
    assert inp.take_view(4).obj is ro.obj


@settings(max_examples=40, deadline=None)
@given(st.dictionaries(st.integers(1, MAX_PAGES - 1), st.sampled_from([bytes(PS), b"\1" * PS, b"\xab" * PS]),
                       max_size=40))
def test_a_whole_image_decoded_in_place_is_the_image_fed_in_chunks(pages):
    data = image(pages)
    one = decode_image(data[i:i + 997] for i in range(0, len(data), 997))   # adopted, then copied
    dec = ImageDecoder()
    dec.feed_nowait(memoryview(bytearray(data)).toreadonly())
    assert dec.decode_until(float("inf"))
    whole = dec.close()
    assert {p: None if v is None else bytes(v) for p, v in whole.pages.items()} == \
           {p: None if v is None else bytes(v) for p, v in one.pages.items()}
    assert whole.context == one.context and whole.start_info == one.start_info
    assert all(isinstance(v, memoryview) for v in whole.pages.values() if v is not None)


def test_decode_until_a_deadline_that_passed_decodes_nothing_yet():
    dec = ImageDecoder()
    dec.feed_nowait(image({5: b"\1" * PS}))
    assert dec.decode_until(0.0) is False
    assert dec.decode_until(float("inf")) is True and dec.close().pages[5] is not None


def test_fill_runs_are_consecutive_pfns_with_data_and_at_most_iov_max():
    class Img:
        pages = {0: b"s", 1: b"a", 2: b"b", 3: None, 4: b"c", 9: b"d", 10: b"e",
                 **{100 + i: b"f" for i in range(IOV_MAX + 3)}}
    runs = list(_runs(Img(), {0}))   # type: ignore[arg-type]
    assert runs[:3] == [(1, [b"a", b"b"]), (4, [b"c"]), (9, [b"d", b"e"])]
    assert [(p, len(r)) for p, r in runs[3:]] == [(100, IOV_MAX), (100 + IOV_MAX, 3)]
