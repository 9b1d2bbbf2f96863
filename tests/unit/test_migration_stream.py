"""Xen's migration stream v2 (xmp.migration.stream): layouts as the specs'
tables give them, hypothesis round trips through readers fed in random
chunkings, and a corpus of corrupt streams generated here (so nothing
binary is committed), each of which must raise StreamError -- never hang,
never end in a partial success."""

from __future__ import annotations

import pickle
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xmp.errors import LocalError, RemoteProtocolError
from xmp.migration.stream import SaveImageReader, StreamError, XlHeader
from xmp.migration.stream.framing import REC_LENGTH_MAX, XMP_REC_TYPE_BASE
from xmp.migration.stream.libxc import (
    MAX_BATCH_SIZE,
    Checkpoint,
    CpuidLeaf,
    DomainHeader,
    DomainType,
    End,
    HvmContext,
    HvmParams,
    ImageHeader,
    LibxcReader,
    LibxcWriter,
    MsrEntry,
    OptionalRecord,
    PageData,
    PageType,
    RecType,
    SharedInfo,
    StaticDataEnd,
    X86CpuidPolicy,
    X86MsrPolicy,
    X86PvInfo,
    X86PvP2mFrames,
    X86PvVcpu,
    X86TscInfo,
    XmpGuestContext,
)
from xmp.migration.stream.libxl import (
    CheckpointEnd,
    CheckpointState,
    CheckpointStateId,
    EmulatorContext,
    EmulatorXenstoreData,
    LibxcContext,
    LibxlEnd,
    LibxlHeader,
    LibxlOptionalRecord,
    LibxlReader,
    LibxlRecType,
    LibxlWriter,
    XmpDeviceState,
)
from xmp.migration.stream.xl import SAVEFILE_MAGIC, parse_xl_header

pytestmark = pytest.mark.timeout(120)

PAGE = 4096


def page(fill: int) -> bytes:
    return bytes([fill & 0xFF]) * PAGE


def hvm_libxc(pages: int = 1, version: int = 3) -> tuple[bytes, list[object]]:
    """A small valid HVM libxc stream and the events it must read back as."""
    w = LibxcWriter(DomainType.X86_HVM, version=version)
    recs: list[object] = []
    if version >= 3:
        recs.append(StaticDataEnd())
    pfns = tuple(range(pages))
    recs += [PageData(pfns, (PageType.NOTAB,) * pages, tuple(page(i) for i in pfns)),
             X86TscInfo(1, 2_000_000, 123, 4), HvmParams(((1, 2), (3, 4))), HvmContext(b"hvm-ctx"), End()]
    data = w.header() + b"".join(w.record(r) for r in recs)
    return data, [w.image_header, w.domain_header, *recs]


def pv_libxc() -> tuple[bytes, list[object]]:
    w = LibxcWriter(DomainType.X86_PV)
    recs = [X86PvInfo(8, 4), X86CpuidPolicy((CpuidLeaf(0, 0, 0xD, 1, 2, 3),)),
            X86MsrPolicy((MsrEntry(0xCE, 0, 1 << 31),)), StaticDataEnd(),
            X86PvP2mFrames(0, 511, (7,)),
            PageData((0, 1, 2), (PageType.NOTAB, PageType.XTAB, PageType.L4TAB_PIN), (page(1), page(2))),
            X86TscInfo(), SharedInfo(page(9)), X86PvVcpu(RecType.X86_PV_VCPU_BASIC, 0, b"regs"), End()]
    data = w.header() + b"".join(w.record(r) for r in recs)
    return data, [w.image_header, w.domain_header, *recs]


def image(libxc: bytes, libxc_events: list[object], config: str | None = "name = 'g'",
          config_is_json: bool = True) -> tuple[bytes, list[object]]:
    """The whole save image around a libxc stream: xl header, libxl framing."""
    lw = LibxlWriter()
    xh = XlHeader(config, config_is_json or config is None)
    tail = [EmulatorXenstoreData(2, 0, (("physmap/1/start_addr", "f0000000"),)), LibxlEnd()]
    data = xh.encode() + lw.header() + lw.libxc_context() + libxc + b"".join(lw.record(r) for r in tail)
    return data, [xh, lw.header_record, LibxcContext(), *libxc_events, *tail]


def read_all(reader, data: bytes, chunks: list[int] | None = None) -> list[object]:
    events: list[object] = []
    pos, i = 0, 0
    while pos < len(data):
        n = chunks[i % len(chunks)] if chunks else len(data)
        reader.feed(data[pos : pos + n])
        pos += n
        i += 1
        events += list(reader)
    reader.close()
    return events


def fails(reader, data: bytes) -> StreamError:
    """Feed ``data`` whole and then close: it must raise StreamError."""
    with pytest.raises(StreamError) as info:
        reader.feed(data)
        list(reader)
        reader.close()
    return info.value


# ----- layouts, as the specs' tables give them -----

def test_record_type_numbers_are_the_specs():
    assert {t.name: t.value for t in RecType if t < XMP_REC_TYPE_BASE} == {
        "END": 0, "PAGE_DATA": 1, "X86_PV_INFO": 2, "X86_PV_P2M_FRAMES": 3, "X86_PV_VCPU_BASIC": 4,
        "X86_PV_VCPU_EXTENDED": 5, "X86_PV_VCPU_XSAVE": 6, "SHARED_INFO": 7, "X86_TSC_INFO": 8,
        "HVM_CONTEXT": 9, "HVM_PARAMS": 10, "TOOLSTACK": 11, "X86_PV_VCPU_MSRS": 12, "VERIFY": 13,
        "CHECKPOINT": 14, "CHECKPOINT_DIRTY_PFN_LIST": 15, "STATIC_DATA_END": 16,
        "X86_CPUID_POLICY": 17, "X86_MSR_POLICY": 18}
    assert {t.name: t.value for t in LibxlRecType if t < XMP_REC_TYPE_BASE} == {
        "END": 0, "LIBXC_CONTEXT": 1, "EMULATOR_XENSTORE_DATA": 2, "EMULATOR_CONTEXT": 3,
        "CHECKPOINT_END": 4, "CHECKPOINT_STATE": 5}
    assert {p.name: p.value for p in PageType} == {
        "NOTAB": 0, "L1TAB": 1, "L2TAB": 2, "L3TAB": 3, "L4TAB": 4, "L1TAB_PIN": 9, "L2TAB_PIN": 10,
        "L3TAB_PIN": 11, "L4TAB_PIN": 12, "BROKEN": 13, "XALLOC": 14, "XTAB": 15}
    # xmp's records are optional (bit 31) and far above anything Xen allocates.
    assert RecType.XMP_GUEST_CONTEXT & 0x8000_0000 and LibxlRecType.XMP_DEVICE_STATE & 0x8000_0000


def test_image_and_domain_header_layout():
    raw = ImageHeader().encode()
    assert len(raw) == 24
    assert raw[0:8] == b"\xff" * 8                  # marker
    assert raw[8:12] == b"XENF"                     # id, big-endian
    assert raw[12:16] == b"\x00\x00\x00\x03"        # version 3, big-endian
    assert raw[16:18] == b"\x00\x00"                # options: little-endian records
    assert raw[18:24] == bytes(6)                   # reserved
    raw = DomainHeader(DomainType.X86_HVM, 12, 4, 19).encode()
    assert raw == struct.pack("<IHHII", 2, 12, 0, 4, 19) and len(raw) == 16


def test_record_framing_pads_to_8_with_zeros():
    raw = XmpGuestContext(b"abc").encode()
    assert raw[:8] == struct.pack("<II", XMP_REC_TYPE_BASE, 3)
    assert raw[8:11] == b"abc" and raw[11:] == bytes(5) and len(raw) == 16
    assert End().encode() == bytes(8)
    assert len(XmpGuestContext(b"12345678").encode()) == 16   # already aligned: no padding


def test_page_data_layout():
    raw = PageData((0x1234, 0x10, 7), (PageType.L1TAB_PIN, PageType.XTAB, PageType.NOTAB),
                   (page(0xAA), page(0xBB))).encode()
    rtype, length, count, reserved = struct.unpack_from("<IIII", raw)
    assert (rtype, count, reserved) == (RecType.PAGE_DATA, 3, 0)
    assert length == 8 + 3 * 8 + 2 * PAGE                     # XTAB carries no data
    words = struct.unpack_from("<3Q", raw, 16)
    assert words == (0x9000_0000_0000_1234, 0xF000_0000_0000_0010, 7)
    assert raw[40 : 40 + PAGE] == page(0xAA) and raw[40 + PAGE :] == page(0xBB)


def test_small_record_layouts():
    assert X86PvInfo(4, 3).encode()[8:] == bytes([4, 3]) + bytes(6)
    assert X86TscInfo(1, 2, 3, 4).encode()[8:] == struct.pack("<IIQII", 1, 2, 3, 4, 0)
    assert HvmParams(((5, 6),)).encode()[8:] == struct.pack("<IIQQ", 1, 0, 5, 6)
    assert X86PvVcpu(RecType.X86_PV_VCPU_MSRS, 3, bytes(16)).encode()[:16] == \
        struct.pack("<IIII", RecType.X86_PV_VCPU_MSRS, 24, 3, 0)
    assert X86PvP2mFrames(0, 1023, (5, 6)).encode()[8:] == struct.pack("<IIQQ", 0, 1023, 5, 6)
    assert X86CpuidPolicy((CpuidLeaf(1, 2, 3, 4, 5, 6),)).encode()[4:8] == struct.pack("<I", 24)
    assert X86MsrPolicy((MsrEntry(1, 2, 3),)).encode()[8:] == struct.pack("<IIQ", 1, 2, 3)


def test_libxl_and_xl_header_layout():
    raw = LibxlHeader().encode()
    assert raw == b"LibxlFmt" + b"\x00\x00\x00\x02" + b"\x00\x00\x00\x00"
    raw = EmulatorXenstoreData(2, 1, (("a", "b"), ("c/d", ""))).encode()
    assert raw[8:] == struct.pack("<II", 2, 1) + b"a\0b\0c/d\0\0" + bytes(7)
    raw = XlHeader("x = 1").encode()
    assert raw[:32] == b"Xen saved domain, xl format\n \0 \r" == SAVEFILE_MAGIC   # 32 chars, no NUL
    assert raw[32:36] == b"\x04\x03\x02\x01"                  # 0x01020304, little-endian
    mflags, oflags, optlen, clen = struct.unpack_from("<IIII", raw, 36)
    assert mflags == 0b11 and oflags == 0                      # JSON | STREAMv2
    assert optlen == 4 + 6 and clen == 6 and raw[52:] == b"x = 1\0"
    assert parse_xl_header(raw + b"rest") == (XlHeader("x = 1"), len(raw))
    toml = '[[domain]]\nname = "g"\n'
    raw = XlHeader(toml, config_is_json=False).encode()      # TOML: stored as is, JSON flag clear
    assert struct.unpack_from("<IIII", raw, 36) == (0b10, 0, 4 + 22, 22) and raw[52:] == toml.encode()
    assert parse_xl_header(raw)[0] == XlHeader(toml, config_is_json=False)
    assert parse_xl_header(XlHeader(None).encode()) == (XlHeader(None), 52)


def test_every_padding_byte_of_a_stream_is_zero():
    data, _ = pv_libxc()
    pos = 24 + 16
    while pos < len(data):
        _, length = struct.unpack_from("<II", data, pos)
        end = pos + 8 + length
        pad = -length % 8
        assert data[end : end + pad] == bytes(pad)
        pos = end + pad
    assert pos == len(data)


# ----- round trips -----

def test_pv_and_hvm_images_read_back_one_byte_at_a_time():
    for libxc, events in (pv_libxc(), hvm_libxc(2)):
        data, expected = image(libxc, events)
        reader = SaveImageReader(max_pfn=15)
        assert read_all(reader, data, [1]) == expected
        assert reader.done


def test_writer_batches_page_data_1024_pages_a_record():
    w = LibxcWriter(DomainType.X86_HVM)
    start = w.header() + w.record(StaticDataEnd())
    pfns = list(range(2500))
    types = [PageType.XTAB if p % 7 == 0 else PageType.NOTAB for p in pfns]
    pages = [page(p) for p, t in zip(pfns, types, strict=True) if t == PageType.NOTAB]
    raw = w.page_data(pfns, types, pages)
    reader = LibxcReader(max_pfn=2499)
    reader.feed(start + raw)
    recs = [e for e in reader if isinstance(e, PageData)]
    assert [len(r.pfns) for r in recs] == [MAX_BATCH_SIZE, MAX_BATCH_SIZE, 452]
    assert [p for r in recs for p in r.pfns] == pfns
    assert [pg for r in recs for pg in r.pages] == pages


def test_zero_pages_are_sent_with_their_data():
    w = LibxcWriter(DomainType.X86_HVM)
    w.record(StaticDataEnd())
    raw = w.page_data([3], None, [bytes(PAGE)])
    assert struct.unpack_from("<Q", raw, 16)[0] >> 60 == PageType.NOTAB
    assert len(raw) == 8 + 8 + 8 + PAGE


def test_checkpointed_stream_switches_layers_at_each_checkpoint():
    w = LibxcWriter(DomainType.X86_HVM, checkpointed=True)
    lw = LibxlWriter()
    first = [StaticDataEnd(), PageData((1,), (0,), (page(1),)), HvmParams(((1, 1),)), HvmContext(b"a"),
             Checkpoint()]
    second = [PageData((1,), (0,), (page(2),)), HvmParams(((1, 2),)), HvmContext(b"b"), End()]
    emu = EmulatorContext(2, 0, b"qemu-state")
    data = (lw.header() + lw.libxc_context() + w.header() + b"".join(w.record(r) for r in first)
            + lw.record(emu) + lw.record(CheckpointEnd()) + b"".join(w.record(r) for r in second)
            + lw.end())
    expected = [lw.header_record, LibxcContext(), w.image_header, w.domain_header, *first, emu,
                CheckpointEnd(), *second, LibxlEnd()]
    assert read_all(LibxlReader(checkpointed=True), data, [4093]) == expected
    err = fails(LibxlReader(checkpointed=False), data)
    assert err.record == "CHECKPOINT" and err.message == "CHECKPOINT in a stream that is not checkpointed"


def test_bytes_after_end_are_left_for_the_caller():
    libxc, _ = hvm_libxc()
    reader = LibxcReader()
    reader.feed(libxc + b"next layer")
    list(reader)
    reader.close()
    assert reader.done and reader.unused_data == b"next layer"


def test_unknown_optional_records_pass_through_and_xmp_records_are_decoded():
    w = LibxcWriter(DomainType.X86_HVM)
    recs = [OptionalRecord(0x8000_0042, b"future"), StaticDataEnd(), XmpGuestContext(b"kernel ctx"),
            *hvm_libxc()[1][3:]]
    data = w.header() + b"".join(w.record(r) for r in recs)
    assert read_all(LibxcReader(), data)[2:] == recs
    lw = LibxlWriter()
    extra = [XmpDeviceState("vbd", 51712, b"shadow ring"), LibxlOptionalRecord(0x9000_0000, b"?")]
    data2 = lw.header() + b"".join(lw.record(r) for r in extra) + lw.libxc_context() + data + lw.end()
    assert read_all(LibxlReader(), data2)[1:3] == extra


def _libxc_strategy():
    """Valid PV or HVM libxc record sequences, with optional records mixed in."""
    pfn = st.integers(0, 63)
    ptype = st.sampled_from(list(PageType))
    fill = st.integers(0, 255)

    @st.composite
    def page_data(draw):
        n = draw(st.integers(1, 5))
        pfns = tuple(draw(st.lists(pfn, min_size=n, max_size=n)))
        types = tuple(draw(st.lists(ptype, min_size=n, max_size=n)))
        pages = tuple(page(draw(fill)) for t in types if t not in (0xD, 0xE, 0xF))
        return PageData(pfns, types, pages)

    optional = st.one_of(
        st.builds(XmpGuestContext, st.binary(max_size=40)),
        st.builds(OptionalRecord, st.integers(0x8000_0000, XMP_REC_TYPE_BASE - 1), st.binary(max_size=40)))
    policies = st.lists(st.one_of(
        st.builds(X86CpuidPolicy, st.lists(st.builds(CpuidLeaf, *[st.integers(0, 2**32 - 1)] * 6),
                                           max_size=3).map(tuple)),
        st.builds(X86MsrPolicy, st.lists(st.builds(MsrEntry, st.integers(0, 2**32 - 1),
                                                   st.integers(0, 2**32 - 1), st.integers(0, 2**64 - 1)),
                                         max_size=3).map(tuple))),
        max_size=2, unique_by=type)
    tsc = st.builds(X86TscInfo, st.integers(0, 3), st.integers(0, 2**32 - 1), st.integers(0, 2**64 - 1),
                    st.integers(0, 2**32 - 1))

    @st.composite
    def pv(draw):
        width = draw(st.sampled_from([4, 8]))
        statics = [X86PvInfo(width, 3 if width == 4 else 4), *draw(policies)]
        fpp = PAGE // width
        start = draw(st.integers(0, 3000))
        end = start + draw(st.integers(0, 3000))
        frames = tuple(draw(st.lists(pfn, min_size=end // fpp - start // fpp + 1,
                                     max_size=end // fpp - start // fpp + 1)))
        vcpus = [X86PvVcpu(RecType.X86_PV_VCPU_BASIC, 0, draw(st.binary(min_size=1, max_size=64)))]
        vcpus += draw(st.lists(st.builds(
            X86PvVcpu, st.just(RecType.X86_PV_VCPU_MSRS), st.integers(0, 3),
            st.integers(0, 3).map(lambda n: bytes(16 * n))), max_size=2))
        body = [*draw(st.permutations(statics)), StaticDataEnd(), X86PvP2mFrames(start, end, frames),
                *draw(st.lists(page_data(), max_size=3)), draw(tsc), SharedInfo(page(draw(fill))), *vcpus]
        return DomainType.X86_PV, body

    @st.composite
    def hvm(draw):
        params = tuple(draw(st.lists(st.tuples(st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1)),
                                     max_size=4)))
        body = [*draw(policies), StaticDataEnd(), *draw(st.lists(page_data(), max_size=3)), draw(tsc),
                HvmParams(params), HvmContext(draw(st.binary(max_size=64)))]
        return DomainType.X86_HVM, body

    @st.composite
    def stream(draw):
        dtype, body = draw(st.one_of(pv(), hvm()))
        for _ in range(draw(st.integers(0, 3))):
            body.insert(draw(st.integers(0, len(body))), draw(optional))
        return dtype, [*body, End()]

    return stream()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_libxc_strategy(), st.lists(st.integers(1, 5000), min_size=1, max_size=8),
       st.one_of(st.none(), st.text(st.characters(blacklist_characters="\0"), max_size=80)), st.booleans())
def test_hypothesis_image_round_trip_in_random_chunkings(stream, chunks, config, config_is_json):
    dtype, recs = stream
    w = LibxcWriter(dtype)
    libxc = w.header() + b"".join(w.record(r) for r in recs)
    if config == "" and not config_is_json:
        config = None    # an empty non-JSON config is no config: xl writes config_len 0
    data, expected = image(libxc, [w.image_header, w.domain_header, *recs], config, config_is_json)
    assert read_all(SaveImageReader(max_pfn=63, max_vcpus=4), data, chunks) == expected


# ----- the corrupt-stream corpus -----

def test_truncated_at_every_offset_raises_and_yields_only_whole_records():
    libxc, events = hvm_libxc(1)
    data, expected = image(libxc, events)
    for cut in range(len(data)):
        reader = SaveImageReader()
        reader.feed(data[:cut])
        got = list(reader)
        assert got == expected[: len(got)], cut          # nothing half-made
        assert not reader.done
        with pytest.raises(StreamError):
            reader.close()


def test_truncation_errors_name_offset_and_record():
    libxc, _ = hvm_libxc(1)
    # headers 40, STATIC_DATA_END 8, then PAGE_DATA: its header, count and pfn, 100 bytes of the page
    cut = 48 + 8 + 16 + 100
    err = fails(LibxcReader(), libxc[:cut])
    assert (err.offset, err.record) == (48, "PAGE_DATA")
    assert err.message == "stream ends 116 bytes into a body of 4112 (+0 padding)"
    assert str(err) == "PAGE_DATA at offset 48: stream ends 116 bytes into a body of 4112 (+0 padding)"
    err = fails(LibxcReader(), libxc[:30])
    assert (err.offset, err.record) == (24, "domain header")
    err = fails(LibxcReader(), libxc[: 24 + 16 + 8])
    assert (err.offset, err.record, err.message) == (48, "END", "stream ends without an END record")


def _with_header(dtype=DomainType.X86_HVM, version=3) -> bytes:
    return ImageHeader(version).encode() + DomainHeader(dtype).encode()


def _rec(rec_type: int, body: bytes) -> bytes:
    return struct.pack("<II", rec_type, len(body)) + body + bytes(-len(body) % 8)


@pytest.mark.parametrize("mangle,record,message", [
    (lambda d: b"\xfe" + d[1:], "image header",
     "marker 0xfeffffffffffffff, expected 0xffffffffffffffff (a legacy image?)"),
    (lambda d: d[:8] + b"XENG" + d[12:], "image header", "id 0x58454e47, expected 0x58454e46 ('XENF')"),
    (lambda d: d[:12] + b"\x00\x00\x00\x04" + d[16:], "image header", "version 4, expected 2 or 3"),
    (lambda d: d[:16] + b"\x00\x01" + d[18:], "image header", "big-endian streams are not supported"),
    (lambda d: d[:24] + struct.pack("<I", 4) + d[28:], "domain header",
     "domain type 4 (ARM) cannot be restored; x86 PV (1) or HVM (2) only"),
    (lambda d: d[:28] + struct.pack("<H", 16) + d[30:], "domain header",
     "page_shift 16, x86 pages are 4096 octets (12)"),
])
def test_bad_libxc_headers(mangle, record, message):
    libxc, _ = hvm_libxc()
    err = fails(LibxcReader(), mangle(libxc))
    assert (err.record, err.message) == (record, message)
    assert err.offset == (0 if record == "image header" else 24)


@pytest.mark.parametrize("mangle,record,message", [
    (lambda d: d[:1] + b"x" + d[2:], "xl header", "is not xl's save-file magic"),
    (lambda d: d[:32] + b"\x01\x02\x03\x04" + d[36:], "xl header",
     "byte order is big-endian; only little-endian images are read"),
    (lambda d: d[:36] + struct.pack("<I", 0b111) + d[40:], "xl header", "unknown mandatory flags 0x4"),
    (lambda d: d[:36] + struct.pack("<I", 0b01) + d[40:], "xl header",
     "not a migration v2 image (STREAMv2 flag clear): legacy images are not read"),
    (lambda d: d[:44] + struct.pack("<I", 1 << 30) + d[48:], "xl header",
     "optional_data_len 1073741824 exceeds 1048576"),
    (lambda d: d[:48] + struct.pack("<I", 99) + d[52:], "xl header",
     "config length 99 exceeds the 6 octets of optional data left"),
    (lambda d: d[:57] + b"\1" + d[58:], "xl header", "the JSON config is not one NUL-terminated string"),
    (lambda d: d[:58] + b"LibxlFmX" + d[66:], "libxl header",
     "ident 0x4c6962786c466d58, expected 0x4c6962786c466d74 ('LibxlFmt')"),
    (lambda d: d[:66] + b"\0\0\0\3" + d[70:], "libxl header", "version 3, expected 2"),
])
def test_bad_xl_and_libxl_headers(mangle, record, message):
    libxc, events = hvm_libxc()
    data, _ = image(libxc, events, config="x=123")
    err = fails(SaveImageReader(), mangle(data))
    assert err.record == record and message in err.message
    assert err.offset == (0 if record == "xl header" else 58)   # the xl header is 48 + 4 + 6 octets


def test_a_hostile_length_is_refused_before_its_body_is_buffered():
    data = _with_header() + struct.pack("<II", RecType.HVM_CONTEXT, REC_LENGTH_MAX + 1)
    reader = LibxcReader()
    reader.feed(data)      # no body follows: the header alone must be refused
    with pytest.raises(StreamError) as info:
        list(reader)
    assert (info.value.offset, info.value.record) == (40, "HVM_CONTEXT")
    assert info.value.message == f"body_length {REC_LENGTH_MAX + 1} exceeds REC_LENGTH_MAX ({REC_LENGTH_MAX})"


def test_bad_length_of_a_fixed_size_record():
    data = _with_header(DomainType.X86_PV) + _rec(RecType.X86_PV_INFO, bytes([8, 4]) + bytes(7))
    err = fails(LibxcReader(), data)
    assert (err.offset, err.record, err.message) == (40, "X86_PV_INFO", "body_length 9, expected 8")


def test_unknown_mandatory_record():
    data = _with_header() + _rec(StaticDataEnd.TYPE, b"") + _rec(0x13, b"what")
    err = fails(LibxcReader(), data)
    assert (err.offset, err.record, err.message) == (48, "mandatory record 0x00000013",
                                                     "unknown mandatory record")
    err = fails(LibxlReader(), LibxlHeader().encode() + _rec(0x6, b""))
    assert (err.offset, err.record, err.message) == (16, "mandatory record 0x00000006",
                                                     "unknown mandatory record")


def test_pfn_beyond_max_pfn():
    body = PageData((1, 0x40), (0, 0), (page(0), page(1))).body()
    data = _with_header() + _rec(StaticDataEnd.TYPE, b"") + _rec(RecType.PAGE_DATA, body)
    err = fails(LibxcReader(max_pfn=0x3F), data)
    assert (err.offset, err.record) == (48, "PAGE_DATA")
    assert err.message == "pfn 0x40 (index 1) beyond the domain's max_pfn 0x3f"


@pytest.mark.parametrize("body,message", [
    (struct.pack("<I4xQ", 1, 5) + page(0)[:-1], "body_length 4111 but 1 pfns with 1 pages of data need 4112"),
    (struct.pack("<I4xQ", 2, 5), "body_length 16 too short for 2 pfns"),
    (struct.pack("<I4xQQ", 2, 5, 0xF << 60 | 6) + page(0) + page(0),   # XTAB carries no data
     "body_length 8216 but 2 pfns with 1 pages of data need 4120"),
    (struct.pack("<I4x", 0), "count is 0 (must be > 0)"),
    (struct.pack("<I4xQ", 1, 0x5 << 60 | 5), "unknown page type 0x5 for pfn 0x5 (index 0)"),
])
def test_page_data_count_and_length_must_agree(body, message):
    data = _with_header() + _rec(StaticDataEnd.TYPE, b"") + _rec(RecType.PAGE_DATA, body)
    err = fails(LibxcReader(), data)
    assert (err.offset, err.record, err.message) == (48, "PAGE_DATA", message)


def _records(*recs) -> bytes:
    return b"".join(r.encode() for r in recs)


@pytest.mark.parametrize("dtype,recs,record,message", [
    (DomainType.X86_HVM, [PageData((1,), (0,), (page(1),))], "PAGE_DATA", "PAGE_DATA before STATIC_DATA_END"),
    (DomainType.X86_HVM, [StaticDataEnd(), StaticDataEnd()], "STATIC_DATA_END",
     "multiple STATIC_DATA_END records"),
    (DomainType.X86_HVM, [StaticDataEnd(), X86CpuidPolicy(())], "X86_CPUID_POLICY",
     "X86_CPUID_POLICY after STATIC_DATA_END"),
    (DomainType.X86_HVM, [X86MsrPolicy(()), X86MsrPolicy(())], "X86_MSR_POLICY",
     "multiple X86_MSR_POLICY records"),
    (DomainType.X86_HVM, [StaticDataEnd(), HvmContext(b"")], "HVM_CONTEXT", "HVM_CONTEXT before HVM_PARAMS"),
    (DomainType.X86_HVM, [StaticDataEnd(), End()], "END", "END before HVM_CONTEXT"),
    (DomainType.X86_HVM, [StaticDataEnd(), SharedInfo(page(0))], "SHARED_INFO",
     "SHARED_INFO is not valid in an X86_HVM stream"),
    (DomainType.X86_PV, [StaticDataEnd()], "STATIC_DATA_END", "STATIC_DATA_END before X86_PV_INFO"),
    (DomainType.X86_PV, [X86PvInfo(), StaticDataEnd(), PageData((1,), (0,), (page(1),))], "PAGE_DATA",
     "PAGE_DATA before X86_PV_P2M_FRAMES"),
    (DomainType.X86_PV, [X86PvInfo(), StaticDataEnd(), X86PvP2mFrames(0, 0, (1,)),
                         X86PvVcpu(RecType.X86_PV_VCPU_BASIC, 0, b"r"), PageData((1,), (0,), (page(1),))],
     "PAGE_DATA", "PAGE_DATA after X86_PV_VCPU_BASIC"),
    (DomainType.X86_PV, [X86PvInfo(), StaticDataEnd(), X86PvP2mFrames(0, 0, (1,)), End()], "END",
     "END before X86_PV_VCPU_BASIC of vcpu 0"),
    (DomainType.X86_PV, [X86PvInfo(), StaticDataEnd(), HvmParams(())], "HVM_PARAMS",
     "HVM_PARAMS is not valid in an X86_PV stream"),
    (DomainType.X86_PV, [X86PvInfo(), StaticDataEnd(), Checkpoint()], "CHECKPOINT",
     "CHECKPOINT in a stream that is not checkpointed"),
])
def test_records_out_of_order(dtype, recs, record, message):
    data = _with_header(dtype) + _records(*recs)
    err = fails(LibxcReader(), data)
    assert (err.record, err.message) == (record, message)
    assert err.offset == len(data) - len(recs[-1].encode())   # the offending record is the last
    with pytest.raises(LocalError, match=message):            # and the writer refuses to write it
        w = LibxcWriter(dtype)
        for r in recs:
            w.record(r)


def test_v2_streams_infer_static_data_end():
    w = LibxcWriter(DomainType.X86_HVM, version=2)
    libxc, events = hvm_libxc(1, version=2)
    assert read_all(LibxcReader(), libxc) == events
    err = fails(LibxcReader(), _with_header(version=2) + _records(StaticDataEnd()))
    assert err.message == "STATIC_DATA_END in a version 2 stream"
    assert w.image_header.version == 2


@pytest.mark.parametrize("recs,record,message", [
    ([LibxlEnd()], "END", "END before LIBXC_CONTEXT"),
    ([CheckpointEnd()], "CHECKPOINT_END", "CHECKPOINT_END outside a checkpoint"),
    ([EmulatorContext(7, 0, b"")], "EMULATOR_CONTEXT", "unknown emulator_id 7"),
])
def test_libxl_records_out_of_order_or_bad(recs, record, message):
    data = LibxlHeader().encode() + b"".join(r.encode() for r in recs)
    err = fails(LibxlReader(), data)
    assert (err.offset, err.record, err.message) == (16, record, message)


def test_second_libxc_context_and_bad_xenstore_data():
    libxc, _ = hvm_libxc()
    data = LibxlHeader().encode() + LibxcContext().encode() + libxc + LibxcContext().encode()
    err = fails(LibxlReader(), data)
    assert (err.offset, err.record, err.message) == (24 + len(libxc), "LIBXC_CONTEXT",
                                                     "a second LIBXC_CONTEXT record")
    body = struct.pack("<II", 2, 0) + b"bad key!\0v\0"
    err = fails(LibxlReader(), LibxlHeader().encode() + _rec(LibxlRecType.EMULATOR_XENSTORE_DATA, body))
    assert err.message == "xenstore key b'bad key!' has characters outside [A-Za-z0-9-/_@]"


def test_garbage_never_escapes_as_another_exception():
    """Every single-byte corruption of a valid image either reads back as a
    (different) valid image or raises StreamError: no IndexError, no
    struct.error, no hang."""
    libxc, events = pv_libxc()
    data, _ = image(libxc, events)
    # Every header and record header byte, and a sample of the page contents.
    positions = sorted(set(range(0, 400)) | set(range(len(data) - 400, len(data)))
                       | set(range(0, len(data), 61)))
    for pos in positions:
        for value in (0x00, 0xFF, data[pos] ^ 0x80):
            mangled = data[:pos] + bytes([value]) + data[pos + 1 :]
            reader = SaveImageReader(max_pfn=15)
            try:
                reader.feed(mangled)
                list(reader)
                reader.close()
            except StreamError:
                pass


def test_stream_error_is_a_remote_fault_and_pickles():
    err = StreamError(64, "PAGE_DATA", "count is 0 (must be > 0)")
    assert isinstance(err, RemoteProtocolError)
    back = pickle.loads(pickle.dumps(err))
    assert (back.offset, back.record, back.message, str(back)) == \
        (64, "PAGE_DATA", "count is 0 (must be > 0)", str(err))


def test_writer_refuses_misuse():
    w = LibxcWriter(DomainType.X86_HVM)
    w.record(StaticDataEnd())
    with pytest.raises(LocalError, match="page of 100 bytes, expected 4096"):
        w.page_data([1], None, [bytes(100)])
    with pytest.raises(LocalError, match="1 pages for 0 pfns whose type carries data"):
        w.page_data([1], [PageType.XTAB], [page(0)])
    with pytest.raises(LocalError, match="does not fit 52 bits"):
        w.record(PageData((1 << 52,), (0,), (page(0),)))
    with pytest.raises(LocalError, match="lacks bit 31"):
        w.record(OptionalRecord(0x13, b""))
    with pytest.raises(LocalError, match="contains a NUL"):
        XlHeader("a\0b").encode()


@settings(max_examples=40, deadline=None)
@given(st.lists(st.lists(st.integers(0, 63), min_size=1, max_size=4), min_size=1, max_size=4),
       st.lists(st.integers(1, 3000), min_size=1, max_size=6))
def test_hypothesis_checkpointed_stream_round_trip(epochs, chunks):
    """Remus/COLO: each checkpoint hands the stream from libxc to libxl and
    back; the reader follows in any chunking."""
    w = LibxcWriter(DomainType.X86_HVM, checkpointed=True)
    lw = LibxlWriter()
    data = lw.header() + lw.libxc_context() + w.header() + w.record(StaticDataEnd())
    expected: list[object] = [lw.header_record, LibxcContext(), w.image_header, w.domain_header,
                              StaticDataEnd()]
    for n, pfns in enumerate(epochs):
        last = n == len(epochs) - 1
        recs = [PageData(tuple(pfns), (0,) * len(pfns), tuple(page(p + n) for p in pfns)),
                HvmParams(((n, n),)), HvmContext(bytes([n]) * n), End() if last else Checkpoint()]
        data += b"".join(w.record(r) for r in recs)
        expected += recs
        if not last:
            libxl_recs = [EmulatorContext(2, 0, bytes(n)), CheckpointEnd()]
            data += b"".join(lw.record(r) for r in libxl_recs)
            expected += libxl_recs
    data += lw.end()
    expected.append(LibxlEnd())
    assert read_all(LibxlReader(max_pfn=63, checkpointed=True), data, chunks) == expected


_PV_START = [X86PvInfo(8, 4), StaticDataEnd(), X86PvP2mFrames(0, 0, (1,))]
_HVM_START = [StaticDataEnd()]


@pytest.mark.parametrize("dtype,start,rec_type,body,message", [
    (DomainType.X86_PV, [], RecType.X86_PV_INFO, bytes([8, 3]) + bytes(6),
     "invalid combination: guest_width 8, pt_levels 3"),
    (DomainType.X86_PV, _PV_START[:2], RecType.X86_PV_P2M_FRAMES, struct.pack("<IIQ", 9, 8, 1),
     "p2m_start_pfn 0x9 > p2m_end_pfn 0x8"),
    (DomainType.X86_PV, _PV_START[:2], RecType.X86_PV_P2M_FRAMES, struct.pack("<IIQ", 0, 512, 1),
     "body_length 16 but pfns 0x0..0x200 need 2 frames (24 octets)"),   # 512 entries a page at width 8
    (DomainType.X86_PV, _PV_START, RecType.X86_PV_VCPU_EXTENDED, struct.pack("<II", 0, 0) + bytes(129),
     "context of 129 octets, at most 128"),
    (DomainType.X86_PV, _PV_START, RecType.X86_PV_VCPU_XSAVE, struct.pack("<II", 0, 0) + bytes(15),
     "context of 15 octets, at least 16"),
    (DomainType.X86_PV, _PV_START, RecType.X86_PV_VCPU_MSRS, struct.pack("<II", 0, 0) + bytes(17),
     "context of 17 octets, not a multiple of 16"),
    (DomainType.X86_PV, _PV_START, RecType.X86_PV_VCPU_BASIC, struct.pack("<II", 4, 0) + b"regs",
     "vcpu_id 4 beyond the domain's 4 vcpus"),
    (DomainType.X86_PV, _PV_START, RecType.SHARED_INFO, bytes(4095),
     "body_length 4095, expected one page (4096)"),
    (DomainType.X86_PV, [], RecType.TOOLSTACK, b"", "the deprecated TOOLSTACK record is not supported"),
    (DomainType.X86_HVM, _HVM_START, RecType.X86_TSC_INFO, bytes(16), "body_length 16, expected 24"),
    (DomainType.X86_HVM, _HVM_START, RecType.HVM_PARAMS, struct.pack("<IIQ", 1, 0, 5),
     "body_length 16 but 1 params need 24"),
    (DomainType.X86_HVM, [], RecType.X86_CPUID_POLICY, bytes(25),
     "body_length 25, not a multiple of 24 (xen_cpuid_leaf_t)"),
    (DomainType.X86_HVM, [], RecType.X86_MSR_POLICY, bytes(24),
     "body_length 24, not a multiple of 16 (xen_msr_entry_t)"),
    (DomainType.X86_HVM, _HVM_START, RecType.VERIFY, b"x", "body_length 1, expected 0"),
])
def test_record_bodies_are_checked(dtype, start, rec_type, body, message):
    head = _with_header(dtype) + _records(*start)
    err = fails(LibxcReader(max_pfn=63, max_vcpus=4), head + _rec(rec_type, body))
    assert (err.offset, err.record, err.message) == (len(head), RecType(rec_type).name, message)


def test_dirty_pfn_list_is_checked_in_checkpointed_streams():
    head = _with_header() + _records(StaticDataEnd())
    err = fails(LibxcReader(max_pfn=63, checkpointed=True),
                head + _rec(RecType.CHECKPOINT_DIRTY_PFN_LIST, struct.pack("<QQ", 3, 64)))
    assert err.message == "pfn 0x40 (index 1) beyond the domain's max_pfn 0x3f"
    err = fails(LibxcReader(checkpointed=True), head + _rec(RecType.CHECKPOINT_DIRTY_PFN_LIST, bytes(12)))
    assert err.message == "body_length 12, not a multiple of 8"


@pytest.mark.parametrize("rec_type,body,message", [
    (LibxlRecType.EMULATOR_XENSTORE_DATA, struct.pack("<II", 2, 0) + b"key\0value",
     "key/value data does not end with a NUL"),
    (LibxlRecType.EMULATOR_XENSTORE_DATA, struct.pack("<II", 2, 0) + b"key\0",
     "key/value data holds 1 strings, not pairs"),
    (LibxlRecType.EMULATOR_CONTEXT, struct.pack("<I", 2),
     "body_length 4 too short for emulator_id and index"),
    (LibxlRecType.CHECKPOINT_STATE, struct.pack("<I", 2),
     "CHECKPOINT_STATE in a stream that is not checkpointed"),
    (LibxlRecType.XMP_DEVICE_STATE, struct.pack("<IH2x", 0, 9) + b"vbd", "device kind b'vbd' is not 9 "
     "alphanumeric ASCII octets"),
])
def test_libxl_record_bodies_are_checked(rec_type, body, message):
    err = fails(LibxlReader(), LibxlHeader().encode() + _rec(rec_type, body))
    assert (err.offset, err.record, err.message) == (16, LibxlRecType(rec_type).name, message)


def test_libxl_end_inside_a_checkpoint_and_big_endian_libxl():
    w = LibxcWriter(DomainType.X86_HVM, checkpointed=True)
    data = (LibxlHeader().encode() + LibxcContext().encode() + w.header()
            + w.record(StaticDataEnd()) + w.record(Checkpoint()) + LibxlEnd().encode())
    err = fails(LibxlReader(checkpointed=True), data)
    assert (err.record, err.message) == ("END", "END inside a checkpoint (before CHECKPOINT_END)")
    err = fails(LibxlReader(), LibxlHeader(options=1).encode())
    assert (err.offset, err.message) == (0, "big-endian streams are not supported")
    reader = LibxlReader()
    reader.feed(LibxlHeader(options=2).encode())
    (hdr,) = list(reader)
    assert hdr.legacy


def test_feed_after_close_is_a_local_error():
    libxc, _ = hvm_libxc()
    reader = LibxcReader()
    read_all(reader, libxc)
    with pytest.raises(LocalError, match="feed\\(\\) after close\\(\\)"):
        reader.feed(b"more")


def test_checkpoint_state_in_a_checkpointed_stream():
    reader = LibxlReader(checkpointed=True)
    reader.feed(LibxlHeader().encode() + CheckpointState(CheckpointStateId.SVM_READY).encode())
    assert list(reader)[1:] == [CheckpointState(2)]
    err = fails(LibxlReader(checkpointed=True),
                LibxlHeader().encode() + _rec(LibxlRecType.CHECKPOINT_STATE, struct.pack("<I", 9)))
    assert (err.offset, err.message) == (16, "unknown checkpoint state id 9")
