"""The save image (xmp.migration.image): a domain's RAM and records through
Xen's stream layers and back, and every kind of corrupt file refused with
one error naming the offset and the record."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xmp.migration.image import ZERO_PAGE, decode_image, encode_image
from xmp.migration.stream import REC_TYPE_OPTIONAL, StreamError
from xmp.migration.stream.libxc import PAGE_DATA_PFN_MASK, PageType, RecType
from xmp.startinfo import StartInfo
from xmp.topology import DomainConfig

PS = 4096
MAXMEM = 4   # MiB
MAX_PAGES = MAXMEM * 256


def record() -> dict:
    cfg = DomainConfig.from_dict({"name": "g", "kernel": "xmp.guests.idle:main", "memory": 2,
                                  "maxmem": MAXMEM, "vcpus": 2, "maxvcpus": 2})
    return {"config": cfg.to_dict(), "devices": []}


def ram_with(pages: dict[int, bytes]) -> bytearray:
    ram = bytearray(MAX_PAGES * PS)
    StartInfo(domid=7, nr_pages=512, max_pages=MAX_PAGES, flags=0, store_evtchn=2, console_evtchn=1,
              vcpus=2, max_vcpus=2, nr_grant_frames=64).pack_into(ram, 0)
    for pfn, data in pages.items():
        ram[pfn * PS:(pfn + 1) * PS] = data
    return ram


def image(pages: dict[int, bytes], populated: list[int] | None = None, context: bytes = b"ctx") -> bytes:
    ram = ram_with(pages)
    pfns = sorted({0, *pages} if populated is None else populated)
    return b"".join(encode_image(record(), memoryview(ram), pfns, context, 2))


def libxc_records(data: bytes) -> list[tuple[int, int, int]]:
    """(offset, type, body_length) of each libxc record, walked by hand."""
    (optlen,) = struct.unpack_from("<I", data, 44)
    off = 48 + optlen + 16 + 8 + 24 + 16   # xl header, libxl header, LIBXC_CONTEXT, image + domain header
    out = []
    while True:
        rtype, length = struct.unpack_from("<II", data, off)
        out.append((off, rtype, length))
        off += 8 + length + (-length % 8)
        if rtype == RecType.END:
            return out


def find(data: bytes, rtype: int) -> tuple[int, int, int]:
    return next(r for r in libxc_records(data) if r[1] == rtype)


def test_round_trip_keeps_every_page_and_the_context():
    pages = {5: b"\x11" * PS, 6: ZERO_PAGE, 700: bytes(range(256)) * 16}
    img = decode_image([image(pages, context=b"\x00guest\xff")])
    assert img.context == b"\x00guest\xff"
    assert set(img.pages) == {0, 5, 6, 700}
    assert img.pages[5] == pages[5] and img.pages[700] == pages[700] and img.pages[6] is None
    assert img.start_info is not None and img.start_info.max_pages == MAX_PAGES
    assert img.config.name == "g" and img.record["devices"] == []


def test_zero_pages_are_marked_not_copied_and_unpopulated_ones_not_sent():
    data = image({5: b"\x11" * PS, 6: ZERO_PAGE, 7: ZERO_PAGE}, populated=[0, 5, 6, 7])
    off, _, length = find(data, RecType.PAGE_DATA)
    (count,) = struct.unpack_from("<I", data, off + 8)
    words = struct.unpack_from(f"<{count}Q", data, off + 16)
    assert [w & PAGE_DATA_PFN_MASK for w in words] == [0, 5, 6, 7]
    assert [w >> 60 for w in words] == [PageType.NOTAB, PageType.NOTAB, PageType.XALLOC, PageType.XALLOC]
    assert length == 8 + 8 * 4 + 2 * PS       # two pages of data: start_info and pfn 5


def test_xmp_records_are_optional_and_the_layout_is_xens_pv_one():
    data = image({5: b"\x11" * PS})
    types = [t for _, t, _ in libxc_records(data)]
    assert types[:3] == [RecType.X86_PV_INFO, RecType.STATIC_DATA_END, RecType.X86_PV_P2M_FRAMES]
    assert types[-7:] == [RecType.PAGE_DATA, RecType.X86_TSC_INFO, RecType.SHARED_INFO,
                          RecType.X86_PV_VCPU_BASIC, RecType.X86_PV_VCPU_BASIC, RecType.XMP_GUEST_CONTEXT,
                          RecType.END]
    assert RecType.XMP_GUEST_CONTEXT & REC_TYPE_OPTIONAL
    assert data.endswith(struct.pack("<II", 0, 0))   # the libxl END


@settings(max_examples=30, deadline=None)
@given(st.dictionaries(st.integers(1, MAX_PAGES - 1), st.binary(min_size=1, max_size=64), max_size=40),
       st.binary(max_size=200))
def test_any_ram_round_trips(contents, context):
    pages = {pfn: (b * (PS // len(b) + 1))[:PS] for pfn, b in contents.items()}
    img = decode_image([image(pages, context=context)])
    assert img.context == context
    assert set(img.pages) == {0, *pages}
    for pfn, page in pages.items():
        assert (img.pages[pfn] or ZERO_PAGE) == page


def test_fed_in_any_chunking():
    data = image({5: b"\x11" * PS, 9: b"\x22" * PS})
    img = decode_image(data[i:i + 777] for i in range(0, len(data), 777))
    assert img.pages[9] == b"\x22" * PS


def _mangle(data: bytes, at: int, new: bytes) -> bytes:
    return data[:at] + new + data[at + len(new):]


def _corrupt(kind: str, data: bytes) -> bytes:
    recs = libxc_records(data)
    page = find(data, RecType.PAGE_DATA)
    vcpu = find(data, RecType.X86_PV_VCPU_BASIC)
    end = find(data, RecType.END)
    ihdr = recs[0][0] - 40
    if kind == "magic":
        return _mangle(data, 0, b"Xen saved domain, xm")
    if kind == "version":
        return _mangle(data, ihdr + 12, struct.pack(">I", 9))
    if kind == "truncated":
        return data[:page[0] + 100]
    if kind == "length":
        return _mangle(data, page[0] + 4, struct.pack("<I", page[2] - 8))
    if kind == "unknown":
        return data[:end[0]] + struct.pack("<II", 0x77, 0) + data[end[0]:]
    if kind == "order":
        whole = data[page[0]:page[0] + 8 + page[2]]
        return data[:vcpu[0]] + data[vcpu[0]:end[0]] + whole + data[end[0]:]
    if kind == "pfn":
        return _mangle(data, page[0] + 16 + 8, struct.pack("<Q", MAX_PAGES))
    if kind == "context":
        ctx = find(data, RecType.XMP_GUEST_CONTEXT)
        return data[:ctx[0]] + data[ctx[0] + 8 + ctx[2] + (-ctx[2] % 8):]
    raise AssertionError(kind)


@pytest.mark.parametrize("kind, record, message", [
    ("magic", "xl header", "not xl's save-file magic"),
    ("version", "image header", "version 9"),
    ("truncated", "PAGE_DATA", "stream ends"),
    ("length", "PAGE_DATA", "body_length"),
    ("unknown", "mandatory record 0x00000077", "unknown mandatory record"),
    ("order", "PAGE_DATA", "PAGE_DATA after X86_PV_VCPU_BASIC"),
    ("pfn", "PAGE_DATA", "beyond the domain's max_pfn"),
    ("context", "END", "no XMP_GUEST_CONTEXT"),
])
def test_a_corrupt_image_is_one_error_naming_offset_and_record(kind, record, message):
    data = image({5: b"\x11" * PS, 6: b"\x22" * PS})
    bad = _corrupt(kind, data)
    with pytest.raises(StreamError) as info:
        decode_image([bad])
    err = info.value
    assert err.record == record and message in err.message, str(err)
    page, end = find(data, RecType.PAGE_DATA)[0], find(data, RecType.END)[0]
    expected = {"magic": 0, "version": libxc_records(data)[0][0] - 40, "pfn": page, "length": page,
                "truncated": page, "unknown": end, "context": find(bad, RecType.END)[0] if kind == "context"
                else None}.get(kind)
    if expected is not None:   # "order": the moved record's offset
        assert err.offset == expected
    assert f"at offset {err.offset}" in str(err)


def test_an_image_whose_start_info_does_not_fit_its_config_is_refused():
    data = bytearray(image({5: b"\x11" * PS}))
    page = find(bytes(data), RecType.PAGE_DATA)
    start_info = page[0] + 16 + 8 * 2   # after two pfn words: pfn 0's page
    data[start_info:start_info + 4] = b"XXXX"
    with pytest.raises(StreamError, match="pfn 0 is not a start_info page") as info:
        decode_image([bytes(data)])
    assert info.value.offset == page[0]


def test_holes_of_a_ram_object_are_known_zero_without_reading_them():
    from xmp.sharedmem.shm import ShmNamespace, ShmObject
    from xmp.toolstack.save import data_pages

    ram = ShmObject.create(ShmNamespace(), "holes", 64 * PS)   # what a domain's RAM is
    try:
        view = ram.map()
        for pfn in (0, 1, 40):
            view[pfn * PS:(pfn + 1) * PS] = b"\x01" * PS
        data = data_pages(ram.fd, 64)
        view.close()
    finally:
        ram.close()
    assert len(data) == 64 and data[0] and data[1] and data[40]
    assert not any(data[2:40]) and not any(data[41:])
