"""The libxc stream's headers and records, byte for byte, as
``docs/specs/libxc-migration-stream.pandoc`` revision 3 lays them out (and
``tools/libs/guest/xg_sr_stream_format.h`` declares them)::

    image header (24 octets, big-endian whatever the endianness bit says)
      0  u64 marker   0xFFFFFFFFFFFFFFFF (a legacy image has a zero bit here)
      8  u32 id       0x58454E46, "XENF"
     12  u32 version  3 (2 is still read: it lacks STATIC_DATA_END)
     16  u16 options  bit 0: endianness of everything after, 1 = big
     18  u16, u32     reserved
    domain header (16 octets)
      0  u32 type        1 x86 PV, 2 x86 HVM (3 PVH, 4 ARM: not restorable)
      4  u16 page_shift  12 on x86
      6  u16 reserved
      8  u32 xen_major   0 = converted from a legacy image
     12  u32 xen_minor
    records, framed as in ``framing``, until END.

Each record class encodes its body and decodes it with the checks Xen's
restore applies (``xg_sr_restore*.c``); ``libxc`` holds the stream around
them (ordering, reader, writer).

PAGE_DATA.  Each pfn word carries the page type in bits 60-63 and the pfn in
bits 0-51 (52-59 reserved: written zero, ignored on restore).  Only BROKEN,
XALLOC and XTAB carry no page contents.  XALLOC means "allocate only": the
spec promises nothing about such a page's contents, but a page Xen
allocates is scrubbed, and a page of xmp's fresh RAM object is zero, so
xmp's save image (``xmp.migration.image``) sends a zero page as XALLOC.
"""


from __future__ import annotations

import enum
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

from .framing import (
    XMP_REC_TYPE_BASE,
    RecordFramer,
    encode_record,
)

IHDR_MARKER = 0xFFFF_FFFF_FFFF_FFFF
IHDR_ID = 0x58454E46  # "XENF"
IHDR_VERSION = 3
IHDR_OPT_BIG_ENDIAN = 1 << 0
MAX_BATCH_SIZE = 1024  # pages per PAGE_DATA record, as xc_sr_save.c batches them
PAGE_DATA_PFN_MASK = (1 << 52) - 1
PAGE_DATA_TYPE_SHIFT = 60

_IHDR = struct.Struct(">QIIHHI")
_DHDR = struct.Struct("<IHHII")
IMAGE_HEADER_SIZE = _IHDR.size    # 24
DOMAIN_HEADER_SIZE = _DHDR.size   # 16


class RecType(enum.IntEnum):
    """REC_TYPE_* of the libxc stream (spec revision 3)."""

    END = 0x00
    PAGE_DATA = 0x01
    X86_PV_INFO = 0x02
    X86_PV_P2M_FRAMES = 0x03
    X86_PV_VCPU_BASIC = 0x04
    X86_PV_VCPU_EXTENDED = 0x05
    X86_PV_VCPU_XSAVE = 0x06
    SHARED_INFO = 0x07
    X86_TSC_INFO = 0x08
    HVM_CONTEXT = 0x09
    HVM_PARAMS = 0x0A
    TOOLSTACK = 0x0B  # deprecated; Xen's restore no longer accepts it
    X86_PV_VCPU_MSRS = 0x0C
    VERIFY = 0x0D
    CHECKPOINT = 0x0E
    CHECKPOINT_DIRTY_PFN_LIST = 0x0F
    STATIC_DATA_END = 0x10
    X86_CPUID_POLICY = 0x11
    X86_MSR_POLICY = 0x12
    # xmp's own, optional (see framing.XMP_REC_TYPE_BASE)
    XMP_GUEST_CONTEXT = XMP_REC_TYPE_BASE + 0x00


class DomainType(enum.IntEnum):
    X86_PV = 1
    X86_HVM = 2
    X86_PVH = 3
    ARM = 4


class PageType(enum.IntEnum):
    """XEN_DOMCTL_PFINFO_* >> 28, as PAGE_DATA stores them (bits 60-63)."""

    NOTAB = 0x0
    L1TAB = 0x1
    L2TAB = 0x2
    L3TAB = 0x3
    L4TAB = 0x4
    L1TAB_PIN = 0x9
    L2TAB_PIN = 0xA
    L3TAB_PIN = 0xB
    L4TAB_PIN = 0xC
    BROKEN = 0xD
    XALLOC = 0xE
    XTAB = 0xF


NO_DATA_PAGE_TYPES = frozenset({PageType.BROKEN, PageType.XALLOC, PageType.XTAB})
_KNOWN_PAGE_TYPES = frozenset(int(t) for t in PageType)


def page_has_data(ptype: int) -> bool:
    """page_type_has_stream_data(): every known type but BROKEN/XALLOC/XTAB."""
    return ptype not in NO_DATA_PAGE_TYPES


class _Bad(Exception):
    """A decoder's complaint; the reader turns it into a StreamError at the
    record's offset."""


@dataclass(frozen=True)
class ImageHeader:
    version: int = IHDR_VERSION
    options: int = 0

    def encode(self) -> bytes:
        return _IHDR.pack(IHDR_MARKER, IHDR_ID, self.version, self.options, 0, 0)


@dataclass(frozen=True)
class DomainHeader:
    type: int
    page_shift: int = 12
    xen_major: int = 4
    xen_minor: int = 19

    def encode(self) -> bytes:
        return _DHDR.pack(self.type, self.page_shift, 0, self.xen_major, self.xen_minor)


@dataclass(frozen=True)
class _Ctx:
    """What decoding a record body needs to know about the stream."""

    page_size: int
    max_pfn: int | None
    max_vcpus: int | None
    guest_width: int


class Record:
    TYPE: ClassVar[int]

    def rec_type(self) -> int:
        return self.TYPE

    def body(self) -> bytes:
        return b""

    def encode(self) -> bytes:
        return encode_record(self.rec_type(), self.body())

    @classmethod
    def decode(cls, body: bytes, ctx: _Ctx) -> Record:
        """The record from its body; this default is for empty bodies."""
        if body:
            raise _Bad(f"body_length {len(body)}, expected 0")
        return cls()


@dataclass(frozen=True)
class End(Record):
    """END: the last record of the libxc stream; empty body."""

    TYPE = RecType.END


@dataclass(frozen=True)
class Verify(Record):
    """VERIFY: all memory is sent; what follows is resent to be compared."""

    TYPE = RecType.VERIFY


@dataclass(frozen=True)
class Checkpoint(Record):
    """CHECKPOINT: the records so far are a consistent state; the stream goes
    back to the higher layer (libxl), which hands it back after its
    CHECKPOINT_END."""

    TYPE = RecType.CHECKPOINT


@dataclass(frozen=True)
class StaticDataEnd(Record):
    """STATIC_DATA_END (v3): the state that does not change during the
    migration (PV info, CPUID and MSR policies) is complete."""

    TYPE = RecType.STATIC_DATA_END


@dataclass(frozen=True)
class PageData(Record):
    """PAGE_DATA: ``u32 count, u32 reserved, u64 pfn[count], page_data[N]``.
    ``pages`` holds one page per pfn whose type carries data, in pfn order."""

    TYPE = RecType.PAGE_DATA
    pfns: tuple[int, ...]
    types: tuple[int, ...]
    pages: tuple[bytes, ...] = field(repr=False)  # 4 KiB each: unreadable in a repr

    def _head(self) -> bytes:
        words = [(t << PAGE_DATA_TYPE_SHIFT) | p for p, t in zip(self.pfns, self.types, strict=True)]
        return struct.pack(f"<I4x{len(words)}Q", len(words), *words)

    def body(self) -> bytes:
        return self._head() + b"".join(self.pages)

    def encode(self) -> bytes:
        return encode_record(self.TYPE, self._head(), *self.pages)

    @classmethod
    def decode(cls, body: bytes, ctx: _Ctx) -> PageData:
        if len(body) < 8:
            raise _Bad(f"body_length {len(body)} too short for the count")
        (count,) = struct.unpack_from("<I", body)
        if count == 0:
            raise _Bad("count is 0 (must be > 0)")
        if len(body) < 8 + 8 * count:
            raise _Bad(f"body_length {len(body)} too short for {count} pfns")
        words = struct.unpack_from(f"<{count}Q", body, 8)
        # whole-batch checks first (a restore reads a million of these); the
        # loop that names the culprit runs only when one fails
        pfns = [w & PAGE_DATA_PFN_MASK for w in words]
        types = [w >> PAGE_DATA_TYPE_SHIFT for w in words]
        if (ctx.max_pfn is not None and max(pfns) > ctx.max_pfn) or not _KNOWN_PAGE_TYPES.issuperset(types):
            for i, (pfn, ptype) in enumerate(zip(pfns, types, strict=True)):
                if ctx.max_pfn is not None and pfn > ctx.max_pfn:
                    raise _Bad(f"pfn {pfn:#x} (index {i}) beyond the domain's max_pfn {ctx.max_pfn:#x}")
                if ptype not in _KNOWN_PAGE_TYPES:
                    raise _Bad(f"unknown page type {ptype:#x} for pfn {pfn:#x} (index {i})")
        with_data = count - sum(map(NO_DATA_PAGE_TYPES.__contains__, types))
        expected = 8 + 8 * count + ctx.page_size * with_data
        if len(body) != expected:
            raise _Bad(f"body_length {len(body)} but {count} pfns with {with_data} pages of data "
                       f"need {expected}")
        ps, start = ctx.page_size, 8 + 8 * count
        pages = tuple(body[start + k * ps : start + (k + 1) * ps] for k in range(with_data))
        return cls(tuple(pfns), tuple(types), pages)


@dataclass(frozen=True)
class X86PvInfo(Record):
    """X86_PV_INFO: ``u8 guest_width, u8 pt_levels, 6 reserved``; the only
    valid pairs are (4, 3) and (8, 4)."""

    TYPE = RecType.X86_PV_INFO
    guest_width: int = 8
    pt_levels: int = 4

    def body(self) -> bytes:
        return struct.pack("<BB6x", self.guest_width, self.pt_levels)

    @classmethod
    def decode(cls, body: bytes, ctx: _Ctx) -> X86PvInfo:
        if len(body) != 8:
            raise _Bad(f"body_length {len(body)}, expected 8")
        width, levels = struct.unpack_from("<BB", body)
        if (width, levels) not in ((4, 3), (8, 4)):
            raise _Bad(f"invalid combination: guest_width {width}, pt_levels {levels}")
        return cls(width, levels)


@dataclass(frozen=True)
class X86PvP2mFrames(Record):
    """X86_PV_P2M_FRAMES: ``u32 p2m_start_pfn, u32 p2m_end_pfn, u64
    p2m_pfn[]`` -- one frame per page of the p2m covering start..end
    (inclusive); a p2m page holds 4096 / guest_width entries."""

    TYPE = RecType.X86_PV_P2M_FRAMES
    start_pfn: int
    end_pfn: int
    p2m_pfns: tuple[int, ...]

    def body(self) -> bytes:
        return struct.pack(f"<II{len(self.p2m_pfns)}Q", self.start_pfn, self.end_pfn, *self.p2m_pfns)

    @classmethod
    def decode(cls, body: bytes, ctx: _Ctx) -> X86PvP2mFrames:
        if len(body) < 8:
            raise _Bad(f"body_length {len(body)} too short for start and end pfn")
        start, end = struct.unpack_from("<II", body)
        if start > end:
            raise _Bad(f"p2m_start_pfn {start:#x} > p2m_end_pfn {end:#x}")
        fpp = ctx.page_size // ctx.guest_width
        frames = end // fpp - start // fpp + 1
        if len(body) != 8 + 8 * frames:
            raise _Bad(f"body_length {len(body)} but pfns {start:#x}..{end:#x} need {frames} frames "
                       f"({8 + 8 * frames} octets)")
        return cls(start, end, struct.unpack_from(f"<{frames}Q", body, 8))


_VCPU_TYPES = (RecType.X86_PV_VCPU_BASIC, RecType.X86_PV_VCPU_EXTENDED, RecType.X86_PV_VCPU_XSAVE,
               RecType.X86_PV_VCPU_MSRS)


@dataclass(frozen=True)
class X86PvVcpu(Record):
    """X86_PV_VCPU_{BASIC,EXTENDED,XSAVE,MSRS}: ``u32 vcpu_id, u32 reserved,
    context[]``, one layout for the four (``kind`` says which).  Size rules
    from xg_sr_restore_x86_pv.c: EXTENDED at most 128 octets, XSAVE at least
    16, MSRS a multiple of 16 (xen_domctl_vcpu_msr_t); an empty context is
    tolerated, as Xen does (old senders wrote them)."""

    kind: RecType
    vcpu_id: int
    context: bytes

    def rec_type(self) -> int:
        return self.kind

    def body(self) -> bytes:
        return struct.pack("<I4x", self.vcpu_id) + self.context

    @classmethod
    def decode_kind(cls, kind: RecType, body: bytes, ctx: _Ctx) -> X86PvVcpu:
        if len(body) < 8:
            raise _Bad(f"body_length {len(body)} too short for the vcpu header")
        (vcpu_id,) = struct.unpack_from("<I", body)
        context = body[8:]
        if ctx.max_vcpus is not None and vcpu_id >= ctx.max_vcpus:
            raise _Bad(f"vcpu_id {vcpu_id} beyond the domain's {ctx.max_vcpus} vcpus")
        n = len(context)
        if n and kind == RecType.X86_PV_VCPU_EXTENDED and n > 128:
            raise _Bad(f"context of {n} octets, at most 128")
        if n and kind == RecType.X86_PV_VCPU_XSAVE and n < 16:
            raise _Bad(f"context of {n} octets, at least 16")
        if kind == RecType.X86_PV_VCPU_MSRS and n % 16:
            raise _Bad(f"context of {n} octets, not a multiple of 16")
        return cls(kind, vcpu_id, context)


@dataclass(frozen=True)
class SharedInfo(Record):
    """SHARED_INFO: the shared info page, exactly one page."""

    TYPE = RecType.SHARED_INFO
    data: bytes

    def body(self) -> bytes:
        return self.data

    @classmethod
    def decode(cls, body: bytes, ctx: _Ctx) -> SharedInfo:
        if len(body) != ctx.page_size:
            raise _Bad(f"body_length {len(body)}, expected one page ({ctx.page_size})")
        return cls(body)


@dataclass(frozen=True)
class X86TscInfo(Record):
    """X86_TSC_INFO: ``u32 mode, u32 khz, u64 nsec, u32 incarnation, u32 reserved``."""

    TYPE = RecType.X86_TSC_INFO
    mode: int = 0
    khz: int = 0
    nsec: int = 0
    incarnation: int = 0

    def body(self) -> bytes:
        return struct.pack("<IIQI4x", self.mode, self.khz, self.nsec, self.incarnation)

    @classmethod
    def decode(cls, body: bytes, ctx: _Ctx) -> X86TscInfo:
        if len(body) != 24:
            raise _Bad(f"body_length {len(body)}, expected 24")
        return cls(*struct.unpack_from("<IIQI", body))


@dataclass(frozen=True)
class HvmContext(Record):
    """HVM_CONTEXT: the XEN_DOMCTL_gethvmcontext blob, opaque here."""

    TYPE = RecType.HVM_CONTEXT
    data: bytes

    def body(self) -> bytes:
        return self.data

    @classmethod
    def decode(cls, body: bytes, ctx: _Ctx) -> HvmContext:
        return cls(body)


@dataclass(frozen=True)
class HvmParams(Record):
    """HVM_PARAMS: ``u32 count, u32 reserved, {u64 index, u64 value}[count]``."""

    TYPE = RecType.HVM_PARAMS
    params: tuple[tuple[int, int], ...]

    def body(self) -> bytes:
        flat = [v for pair in self.params for v in pair]
        return struct.pack(f"<I4x{len(flat)}Q", len(self.params), *flat)

    @classmethod
    def decode(cls, body: bytes, ctx: _Ctx) -> HvmParams:
        if len(body) < 8:
            raise _Bad(f"body_length {len(body)} too short for the count")
        (count,) = struct.unpack_from("<I", body)
        if len(body) != 8 + 16 * count:
            raise _Bad(f"body_length {len(body)} but {count} params need {8 + 16 * count}")
        flat = struct.unpack_from(f"<{2 * count}Q", body, 8)
        return cls(tuple(zip(flat[0::2], flat[1::2], strict=True)))


@dataclass(frozen=True)
class CheckpointDirtyPfnList(Record):
    """CHECKPOINT_DIRTY_PFN_LIST (COLO, secondary to primary): ``u64 pfn[]``."""

    TYPE = RecType.CHECKPOINT_DIRTY_PFN_LIST
    pfns: tuple[int, ...]

    def body(self) -> bytes:
        return struct.pack(f"<{len(self.pfns)}Q", *self.pfns)

    @classmethod
    def decode(cls, body: bytes, ctx: _Ctx) -> CheckpointDirtyPfnList:
        if len(body) % 8:
            raise _Bad(f"body_length {len(body)}, not a multiple of 8")
        pfns = struct.unpack(f"<{len(body) // 8}Q", body)
        for i, pfn in enumerate(pfns):
            if ctx.max_pfn is not None and pfn > ctx.max_pfn:
                raise _Bad(f"pfn {pfn:#x} (index {i}) beyond the domain's max_pfn {ctx.max_pfn:#x}")
        return cls(pfns)


@dataclass(frozen=True)
class CpuidLeaf:
    """xen_cpuid_leaf_t: ``u32 leaf, subleaf, a, b, c, d`` (24 octets)."""

    leaf: int
    subleaf: int
    a: int
    b: int
    c: int
    d: int


@dataclass(frozen=True)
class MsrEntry:
    """xen_msr_entry_t: ``u32 idx, u32 flags, u64 val`` (16 octets)."""

    idx: int
    flags: int
    val: int


@dataclass(frozen=True)
class X86CpuidPolicy(Record):
    """X86_CPUID_POLICY (v3, static data): an array of xen_cpuid_leaf_t."""

    TYPE = RecType.X86_CPUID_POLICY
    leaves: tuple[CpuidLeaf, ...]

    def body(self) -> bytes:
        return b"".join(struct.pack("<6I", lf.leaf, lf.subleaf, lf.a, lf.b, lf.c, lf.d)
                        for lf in self.leaves)

    @classmethod
    def decode(cls, body: bytes, ctx: _Ctx) -> X86CpuidPolicy:
        if len(body) % 24:
            raise _Bad(f"body_length {len(body)}, not a multiple of 24 (xen_cpuid_leaf_t)")
        return cls(tuple(CpuidLeaf(*f) for f in struct.iter_unpack("<6I", body)))


@dataclass(frozen=True)
class X86MsrPolicy(Record):
    """X86_MSR_POLICY (v3, static data): an array of xen_msr_entry_t."""

    TYPE = RecType.X86_MSR_POLICY
    msrs: tuple[MsrEntry, ...]

    def body(self) -> bytes:
        return b"".join(struct.pack("<IIQ", m.idx, m.flags, m.val) for m in self.msrs)

    @classmethod
    def decode(cls, body: bytes, ctx: _Ctx) -> X86MsrPolicy:
        if len(body) % 16:
            raise _Bad(f"body_length {len(body)}, not a multiple of 16 (xen_msr_entry_t)")
        return cls(tuple(MsrEntry(*f) for f in struct.iter_unpack("<IIQ", body)))


@dataclass(frozen=True)
class XmpGuestContext(Record):
    """xmp's optional record: the guest kernel's suspend context (what its
    suspend hook returned), opaque here.  Xen has no record for it; a Xen
    restore skips it, being optional."""

    TYPE = RecType.XMP_GUEST_CONTEXT
    context: bytes

    def body(self) -> bytes:
        return self.context

    @classmethod
    def decode(cls, body: bytes, ctx: _Ctx) -> XmpGuestContext:
        return cls(body)


@dataclass(frozen=True)
class OptionalRecord(Record):
    """An optional record (bit 31) this reader does not know: passed up
    as is, for the caller to ignore (the spec allows ignoring it)."""

    type: int
    data: bytes

    def rec_type(self) -> int:
        return self.type

    def body(self) -> bytes:
        return self.data


_DECODERS: dict[int, Callable[[bytes, _Ctx], Record]] = {
    cls.TYPE: cls.decode
    for cls in (End, Verify, Checkpoint, StaticDataEnd, PageData, X86PvInfo, X86PvP2mFrames, SharedInfo,
                X86TscInfo, HvmContext, HvmParams, CheckpointDirtyPfnList, X86CpuidPolicy, X86MsrPolicy,
                XmpGuestContext)
}


def _vcpu_decoder(kind: RecType) -> Callable[[bytes, _Ctx], Record]:
    return lambda body, ctx: X86PvVcpu.decode_kind(kind, body, ctx)


_DECODERS.update({kind: _vcpu_decoder(kind) for kind in _VCPU_TYPES})

_NAMES = {int(t): t.name for t in RecType}


def record_name(rec_type: int) -> str:
    return RecordFramer(_NAMES).name(rec_type)
