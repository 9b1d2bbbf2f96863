"""The libxc stream (the domain image): ordering, reader and writer around
the records of ``libxc_records`` (all re-exported here), after
``docs/specs/libxc-migration-stream.pandoc`` revision 3.

Theory of operation.  :class:`LibxcReader` is fed bytes in any chunking and
yields the two headers and then one validated record at a time; nothing is
yielded before every byte of it has arrived and passed its checks, so the
caller never sees half a record.  The checks are Xen's restore checks
(``xg_sr_restore*.c``) plus the ordering the spec's "Layout" section
demands (tables below); each failure is one :class:`StreamError` naming the
offset where the header or record begins.  :class:`LibxcWriter` is the other
end: records in, bytes out, and it runs the same ordering rules, so it
cannot produce a stream its reader refuses.

Ordering, per guest type:

* static data -- X86_PV_INFO (PV), X86_CPUID_POLICY, X86_MSR_POLICY -- at
  most once each, then STATIC_DATA_END (v3; a v2 stream's first other record
  ends its static data); every other mandatory record comes after it;
* PV: X86_PV_INFO before the end of static data, X86_PV_P2M_FRAMES before
  PAGE_DATA and the vCPU records, no PAGE_DATA after a vCPU record until the
  next CHECKPOINT; END only after vCPU 0's X86_PV_VCPU_BASIC;
* HVM: HVM_PARAMS before HVM_CONTEXT (in each checkpoint); END only after
  an HVM_CONTEXT;
* CHECKPOINT and CHECKPOINT_DIRTY_PFN_LIST only in a checkpointed stream;
  nothing after END; records of the other guest type are refused, as Xen's
  restore has no handler for them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NoReturn

from xmp.errors import LocalError

from .framing import REC_TYPE_OPTIONAL, Input, LayerReader, RecordFramer, StreamError, is_optional
from .libxc_records import (
    _DECODERS,
    _DHDR,
    _IHDR,
    _KNOWN_PAGE_TYPES,
    _NAMES,
    _VCPU_TYPES,
    DOMAIN_HEADER_SIZE,
    IHDR_ID,
    IHDR_MARKER,
    IHDR_OPT_BIG_ENDIAN,
    IHDR_VERSION,
    IMAGE_HEADER_SIZE,
    MAX_BATCH_SIZE,
    NO_DATA_PAGE_TYPES,
    PAGE_DATA_PFN_MASK,
    Checkpoint,
    CheckpointDirtyPfnList,
    CpuidLeaf,
    DomainHeader,
    DomainType,
    End,
    HvmContext,
    HvmParams,
    ImageHeader,
    MsrEntry,
    OptionalRecord,
    PageData,
    PageType,
    Record,
    RecType,
    SharedInfo,
    StaticDataEnd,
    Verify,
    X86CpuidPolicy,
    X86MsrPolicy,
    X86PvInfo,
    X86PvP2mFrames,
    X86PvVcpu,
    X86TscInfo,
    XmpGuestContext,
    _Bad,
    _Ctx,
    page_has_data,
    record_name,
)

# ----- ordering: the spec's "Layout" section and xg_sr_restore*.c, as tables -----

_COMMON = frozenset({RecType.END, RecType.PAGE_DATA, RecType.X86_TSC_INFO, RecType.VERIFY,
                     RecType.CHECKPOINT, RecType.CHECKPOINT_DIRTY_PFN_LIST, RecType.STATIC_DATA_END,
                     RecType.X86_CPUID_POLICY, RecType.X86_MSR_POLICY})
# Mandatory records valid per guest type: a PV restore has no handler for
# HVM_PARAMS and an HVM restore none for SHARED_INFO, so Xen refuses them.
VALID_RECORDS = {
    DomainType.X86_PV: _COMMON | {RecType.X86_PV_INFO, RecType.X86_PV_P2M_FRAMES, RecType.SHARED_INFO,
                                  *_VCPU_TYPES},
    DomainType.X86_HVM: _COMMON | {RecType.HVM_CONTEXT, RecType.HVM_PARAMS},
}
# Static data: at most once each, all before STATIC_DATA_END.
STATIC_RECORDS = frozenset({RecType.X86_PV_INFO, RecType.X86_CPUID_POLICY, RecType.X86_MSR_POLICY})
# (guest type, record): what must have come before it.  HVM_PARAMS must
# precede HVM_CONTEXT in each checkpoint ("certain parameters can affect the
# validity of architectural state in the context"); the rest once per stream.
REQUIRES: dict[tuple[DomainType, int], tuple[int, ...]] = {
    (DomainType.X86_PV, RecType.PAGE_DATA): (RecType.X86_PV_P2M_FRAMES,),
    **{(DomainType.X86_PV, k): (RecType.X86_PV_P2M_FRAMES,) for k in _VCPU_TYPES},
    (DomainType.X86_HVM, RecType.HVM_CONTEXT): (RecType.HVM_PARAMS,),
}
# Records the PV layout puts strictly after all PAGE_DATA of a checkpoint.
_AFTER_PAGES = {DomainType.X86_PV: frozenset(_VCPU_TYPES), DomainType.X86_HVM: frozenset()}


class _Order:
    """The ordering state of one stream.  ``fail(message)`` raises whoever's
    error fits (remote for the reader, local for the writer)."""

    def __init__(self, dtype: DomainType, version: int, checkpointed: bool):
        self.dtype = dtype
        self.version = version
        self.checkpointed = checkpointed
        self.seen: set[int] = set()
        self.epoch_seen: set[int] = set()   # since the last CHECKPOINT
        self.static_done = False
        self.vcpu0_basic = False
        self.ended = False

    def _static_end(self, fail: Callable[[str], NoReturn], what: str) -> None:
        if self.dtype == DomainType.X86_PV and RecType.X86_PV_INFO not in self.seen:
            fail(f"{what} before X86_PV_INFO")
        self.static_done = True

    def check(self, t: int, fail: Callable[[str], NoReturn]) -> None:
        """May a record of type ``t`` come now?  Called before its body is
        decoded: some bodies need what earlier records said (PV width)."""
        name = _NAMES.get(t, f"{t:#x}")
        if self.ended:
            fail("record after END")
        if is_optional(t):
            return
        if t not in VALID_RECORDS[self.dtype]:
            fail(f"{name} is not valid in an {self.dtype.name} stream")
        if t in (RecType.CHECKPOINT, RecType.CHECKPOINT_DIRTY_PFN_LIST) and not self.checkpointed:
            fail(f"{name} in a stream that is not checkpointed")
        if t == RecType.STATIC_DATA_END:
            if self.version < 3:
                fail("STATIC_DATA_END in a version 2 stream")
            if self.static_done:
                fail("multiple STATIC_DATA_END records")
            self._static_end(fail, "STATIC_DATA_END")
        elif t in STATIC_RECORDS:
            if self.static_done:
                fail(f"{name} after STATIC_DATA_END")
            if t in self.seen:
                fail(f"multiple {name} records")
        elif not self.static_done:
            if self.version >= 3:
                fail(f"{name} before STATIC_DATA_END")
            self._static_end(fail, f"{name} (which ends the static data of a v2 stream)")
        for need in REQUIRES.get((self.dtype, t), ()):
            if need not in (self.epoch_seen if t == RecType.HVM_CONTEXT else self.seen):
                fail(f"{name} before {_NAMES[need]}")
        if t == RecType.PAGE_DATA:
            late = self.epoch_seen & _AFTER_PAGES[self.dtype]
            if late:
                fail(f"PAGE_DATA after {_NAMES[min(late)]}")
        if t == RecType.END:
            if self.dtype == DomainType.X86_PV and not self.vcpu0_basic:
                fail("END before X86_PV_VCPU_BASIC of vcpu 0")
            if self.dtype == DomainType.X86_HVM and RecType.HVM_CONTEXT not in self.seen:
                fail("END before HVM_CONTEXT")
            self.ended = True
        self.seen.add(t)
        self.epoch_seen.add(t)
        if t == RecType.CHECKPOINT:
            self.epoch_seen = set()

    def saw(self, rec: Record) -> None:
        """Note what a record's body said that later checks need."""
        if isinstance(rec, X86PvVcpu) and rec.kind == RecType.X86_PV_VCPU_BASIC and rec.vcpu_id == 0 \
                and rec.context:
            self.vcpu0_basic = True


def _check_domain_header(dh: DomainHeader, fail: Callable[[str], NoReturn]) -> DomainType:
    if dh.type not in (DomainType.X86_PV, DomainType.X86_HVM):
        known = DomainType(dh.type).name if dh.type in DomainType._value2member_map_ else "reserved"
        fail(f"domain type {dh.type} ({known}) cannot be restored; x86 PV (1) or HVM (2) only")
    if dh.page_shift != 12:
        fail(f"page_shift {dh.page_shift}, x86 pages are 4096 octets (12)")
    return DomainType(dh.type)


class LibxcParser:
    """The libxc layer's state machine over a shared :class:`Input`.  Used as
    is by the libxl reader (which owns the input); :class:`LibxcReader` is
    the standalone face."""

    def __init__(self, max_pfn: int | None = None, max_vcpus: int | None = None,
                 checkpointed: bool = False):
        self.max_pfn = max_pfn
        self.max_vcpus = max_vcpus
        self.checkpointed = checkpointed
        self.image_header: ImageHeader | None = None
        self.domain_header: DomainHeader | None = None
        self._order: _Order | None = None
        self._framer = RecordFramer(_NAMES, views=frozenset({RecType.PAGE_DATA}))  # pages: no copy
        self._guest_width = 8

    @property
    def done(self) -> bool:
        return self._order is not None and self._order.ended

    def step(self, inp: Input) -> object | None:
        """The next event (a header or a record), or None until more bytes come."""
        if self.image_header is None:
            return self._image_header(inp)
        if self.domain_header is None:
            return self._domain_header(inp)
        if self.done:
            return None
        got = self._framer.next(inp)
        if got is None:
            return None
        offset, rec_type, body = got
        return self._record(offset, rec_type, body)

    def check_complete(self, inp: Input) -> None:
        """At EOF: the stream must have reached END."""
        if self.done:
            return
        if self.image_header is None:
            raise StreamError(inp.offset, "image header",
                              f"stream ends {inp.available()} bytes into the {IMAGE_HEADER_SIZE}-byte header")
        if self.domain_header is None:
            raise StreamError(inp.offset, "domain header",
                              f"stream ends {inp.available()} bytes into the {DOMAIN_HEADER_SIZE}-byte "
                              "header")
        if inp.available():
            raise self._framer.truncated(inp)
        raise StreamError(inp.offset, "END", "stream ends without an END record")

    def _image_header(self, inp: Input) -> ImageHeader | None:
        raw = inp.peek(IMAGE_HEADER_SIZE)
        if raw is None:
            return None
        offset = inp.offset
        marker, ident, version, options, _, _ = _IHDR.unpack(raw)

        def fail(msg: str) -> NoReturn:
            raise StreamError(offset, "image header", msg)

        if marker != IHDR_MARKER:
            fail(f"marker {marker:#018x}, expected {IHDR_MARKER:#018x} (a legacy image?)")
        if ident != IHDR_ID:
            fail(f"id {ident:#010x}, expected {IHDR_ID:#010x} ('XENF')")
        if version not in (2, 3):
            fail(f"version {version}, expected 2 or 3")
        if options & IHDR_OPT_BIG_ENDIAN:
            fail("big-endian streams are not supported")
        inp.take(IMAGE_HEADER_SIZE)
        self.image_header = ImageHeader(version, options)
        return self.image_header

    def _domain_header(self, inp: Input) -> DomainHeader | None:
        raw = inp.peek(DOMAIN_HEADER_SIZE)
        if raw is None:
            return None
        offset = inp.offset
        dtype, page_shift, _, major, minor = _DHDR.unpack(raw)
        dh = DomainHeader(dtype, page_shift, major, minor)

        def fail(msg: str) -> NoReturn:
            raise StreamError(offset, "domain header", msg)

        kind = _check_domain_header(dh, fail)
        inp.take(DOMAIN_HEADER_SIZE)
        assert self.image_header is not None
        self._order = _Order(kind, self.image_header.version, self.checkpointed)
        self.domain_header = dh
        return dh

    def _record(self, offset: int, rec_type: int, body: bytes) -> Record:
        name = self._framer.name(rec_type)

        def fail(msg: str) -> NoReturn:
            raise StreamError(offset, name, msg)

        assert self._order is not None and self.domain_header is not None
        decoder = _DECODERS.get(rec_type)
        if decoder is None and not is_optional(rec_type):
            if rec_type == RecType.TOOLSTACK:   # Xen 4.6's stopgap, long gone from Xen's restore
                fail("the deprecated TOOLSTACK record is not supported")
            fail("unknown mandatory record")
        self._order.check(rec_type, fail)
        if decoder is None:
            return OptionalRecord(rec_type, body)
        ctx = _Ctx(1 << self.domain_header.page_shift, self.max_pfn, self.max_vcpus, self._guest_width)
        try:
            rec = decoder(body, ctx)
        except _Bad as e:
            raise StreamError(offset, name, str(e)) from None
        if isinstance(rec, X86PvInfo):
            self._guest_width = rec.guest_width
        self._order.saw(rec)
        return rec


class LibxcReader(LayerReader):
    """A libxc stream on its own: ``feed()`` bytes, take events from
    ``next_event()`` (None = need more) or by iterating; ``close()`` at EOF
    raises if the stream stopped before END.  Bytes after END are the higher
    layer's: ``unused_data``."""

    def __init__(self, max_pfn: int | None = None, max_vcpus: int | None = None,
                 checkpointed: bool = False):
        self._inp = Input()
        self._parser = LibxcParser(max_pfn, max_vcpus, checkpointed)



class LibxcWriter:
    """Records in, bytes out.  The caller's misuse (a record out of order, a
    page of the wrong size) raises :class:`LocalError` before any byte of it
    is produced."""

    def __init__(self, domain_type: DomainType, xen_major: int = 4, xen_minor: int = 19,
                 version: int = IHDR_VERSION, checkpointed: bool = False):
        self.domain_header = DomainHeader(domain_type, 12, xen_major, xen_minor)
        self.image_header = ImageHeader(version, 0)
        _check_domain_header(self.domain_header, self._fail)
        if version not in (2, 3):
            raise LocalError(f"version {version}: 2 or 3 only")
        self._order = _Order(DomainType(domain_type), version, checkpointed)
        self.page_size = 4096

    @staticmethod
    def _fail(msg: str) -> NoReturn:
        raise LocalError(msg)

    def header(self) -> bytes:
        """Image header and domain header."""
        return self.image_header.encode() + self.domain_header.encode()

    def record(self, rec: Record) -> bytes:
        self._validate(rec)
        raw = rec.encode()
        self._order.check(rec.rec_type(), self._fail)
        self._order.saw(rec)
        return raw

    def page_data(self, pfns: Sequence[int], types: Sequence[int] | None,
                  pages: Sequence[bytes]) -> bytes:
        """PAGE_DATA records for ``pfns``, at most MAX_BATCH_SIZE pages each.
        ``types`` defaults to all NOTAB; ``pages`` holds one page per pfn
        whose type carries data, in order."""
        if types is None:
            types = [PageType.NOTAB] * len(pfns)
        if len(types) != len(pfns):
            raise LocalError(f"{len(pfns)} pfns but {len(types)} types")
        if sum(1 for t in types if page_has_data(t)) != len(pages):
            raise LocalError(f"{len(pages)} pages for {sum(1 for t in types if page_has_data(t))} "
                             "pfns whose type carries data")
        out = []
        k = 0
        for i in range(0, len(pfns), MAX_BATCH_SIZE):
            batch_t = tuple(int(t) for t in types[i : i + MAX_BATCH_SIZE])
            n = sum(1 for t in batch_t if page_has_data(t))
            out.append(self.record(PageData(tuple(pfns[i : i + MAX_BATCH_SIZE]), batch_t,
                                            tuple(pages[k : k + n]))))
            k += n
        return b"".join(out)

    def _validate(self, rec: Record) -> None:
        if isinstance(rec, PageData):
            if not rec.pfns:
                raise LocalError("PAGE_DATA needs at least one pfn")
            for p, t in zip(rec.pfns, rec.types, strict=True):
                if not 0 <= p <= PAGE_DATA_PFN_MASK:
                    raise LocalError(f"pfn {p:#x} does not fit 52 bits")
                if t not in _KNOWN_PAGE_TYPES:
                    raise LocalError(f"unknown page type {t:#x}")
            for page in rec.pages:
                if len(page) != self.page_size:
                    raise LocalError(f"page of {len(page)} bytes, expected {self.page_size}")
        elif isinstance(rec, SharedInfo) and len(rec.data) != self.page_size:
            raise LocalError(f"SHARED_INFO of {len(rec.data)} bytes, expected one page")
        elif isinstance(rec, OptionalRecord) and not is_optional(rec.type):
            raise LocalError(f"OptionalRecord type {rec.type:#x} lacks bit 31")


__all__ = [
    "DOMAIN_HEADER_SIZE", "IHDR_ID", "IHDR_MARKER", "IHDR_VERSION", "IMAGE_HEADER_SIZE",
    "IHDR_OPT_BIG_ENDIAN", "MAX_BATCH_SIZE", "NO_DATA_PAGE_TYPES", "PAGE_DATA_PFN_MASK",
    "REC_TYPE_OPTIONAL", "STATIC_RECORDS", "VALID_RECORDS",
    "Checkpoint", "CheckpointDirtyPfnList", "CpuidLeaf", "DomainHeader", "DomainType", "End",
    "HvmContext", "HvmParams", "ImageHeader", "LibxcParser", "LibxcReader", "LibxcWriter", "MsrEntry",
    "OptionalRecord", "PageData", "PageType", "RecType", "Record", "SharedInfo", "StaticDataEnd",
    "Verify", "X86CpuidPolicy", "X86MsrPolicy", "X86PvInfo", "X86PvP2mFrames", "X86PvVcpu",
    "X86TscInfo", "XmpGuestContext", "page_has_data", "record_name",
]
