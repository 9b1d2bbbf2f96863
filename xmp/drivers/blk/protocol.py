"""blkif's wire format, sans I/O, as in ``xen/include/public/io/blkif.h``
(x86-64 ABI: natural alignment, little-endian).

One ring slot holds a request or a response (``DEFINE_RING_TYPES(blkif,
struct blkif_request, struct blkif_response)``); the slot is the larger of
the two, 112 bytes, so a one-page ring has 32 slots.  Offsets::

    struct blkif_request                       (112 bytes)
      0  u8   operation        BLKIF_OP_*
      1  u8   nr_segments      1..11 for READ/WRITE
      2  u16  handle           the vdev (blkif_vdev_t)
      4  --   4 bytes padding  (id is 8-aligned)
      8  u64  id               the frontend's, echoed in the response
     16  u64  sector_number    in 512-byte units, whatever the disk's sector size
     24  seg[11]               8 bytes each:
           +0 u32 gref, +4 u8 first_sect, +5 u8 last_sect, +6 2 bytes padding

    struct blkif_request_discard               (32 bytes, rest of the slot zero)
      0  u8   operation (5)    1  u8 flag (BLKIF_DISCARD_SECURE)
      2  u16  handle           4  4 bytes padding
      8  u64  id              16  u64 sector_number   24  u64 nr_sectors

    struct blkif_request_indirect              (64 bytes, rest of the slot zero)
      0  u8   operation (6)    1  u8 indirect_op (READ or WRITE)
      2  u16  nr_segments      4  4 bytes padding
      8  u64  id              16  u64 sector_number
     24  u16  handle          26  2 bytes padding
     28  u32  indirect_grefs[8]                60  4 bytes tail padding

    struct blkif_response                      (16 bytes)
      0  u64  id               8  u8 operation   9  1 byte padding
     10  i16  status          12  4 bytes tail padding

An indirect request's segments live in up to 8 granted pages, each an
array of 512 ``blkif_request_segment``.

Theory of operation.  The backend copies a slot out of the shared ring
first (the ring does that), then hands the private ``bytes`` to
:func:`parse_request`, which trusts nothing: an unknown operation, a
segment count out of range, a segment that is not inside its page -- each
raises :class:`BadRequest`, which carries the request's id, operation and
the status to answer with, so the backend can reply to that one request
and go on serving (the front is hostile, not the backend's problem).
Every ``pack`` builds its bytes from zero, padding included: no byte
reaches the other domain that was not written on purpose (XSA-216 leaked
backend stack through the padding of blkif responses).
"""

from __future__ import annotations

import struct
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum

from xmp.errors import LocalError, RemoteProtocolError
from xmp.sharedmem.page import PAGE_SIZE

SECTOR_SIZE = 512
SECTORS_PER_PAGE = PAGE_SIZE // SECTOR_SIZE


class BlkifOp(IntEnum):
    """BLKIF_OP_* request codes."""

    READ = 0
    WRITE = 1
    WRITE_BARRIER = 2
    FLUSH_DISKCACHE = 3
    RESERVED_1 = 4
    DISCARD = 5
    INDIRECT = 6


class BlkifStatus(IntEnum):
    """BLKIF_RSP_* status codes."""

    OKAY = 0
    ERROR = -1
    EOPNOTSUPP = -2


BLKIF_MAX_SEGMENTS_PER_REQUEST = 11
BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST = 8
BLKIF_DISCARD_SECURE = 1 << 0

VDISK_CDROM = 0x1
VDISK_REMOVABLE = 0x2
VDISK_READONLY = 0x4

# Explicit "x" pads: struct writes them as zero bytes.
_SEGMENT = struct.Struct("<IBB2x")
_REQUEST_HEAD = struct.Struct("<BBH4xQQ")
_REQUEST = struct.Struct("<BBH4xQQ" + "IBB2x" * BLKIF_MAX_SEGMENTS_PER_REQUEST)
_DISCARD = struct.Struct("<BBH4xQQQ")
_INDIRECT = struct.Struct(f"<BBH4xQQH2x{BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST}I4x")
_RESPONSE = struct.Struct("<QBxh4x")

SEGMENT_SIZE = _SEGMENT.size                     # 8
REQUEST_SIZE = _REQUEST.size                     # 112
DISCARD_SIZE = _DISCARD.size                     # 32
INDIRECT_SIZE = _INDIRECT.size                   # 64
RESPONSE_SIZE = _RESPONSE.size                   # 16
SLOT_SIZE = max(REQUEST_SIZE, RESPONSE_SIZE)     # the ring's union
SEGS_PER_INDIRECT_FRAME = PAGE_SIZE // SEGMENT_SIZE
MAX_INDIRECT_SEGMENTS = BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST * SEGS_PER_INDIRECT_FRAME

_KNOWN_STATUS = frozenset(int(s) for s in BlkifStatus)


class BadRequest(RemoteProtocolError):
    """A frontend's request the backend must refuse: answer ``status`` to
    ``req_id`` (echoing ``operation``) and keep serving."""

    def __init__(self, message: str, req_id: int = 0, operation: int = 0,
                 status: int = BlkifStatus.ERROR):
        self.message = message
        self.req_id = req_id
        self.operation = operation
        self.status = int(status)
        super().__init__(message, req_id, operation, self.status)

    def __str__(self) -> str:
        return f"bad blkif request id {self.req_id:#x}: {self.message}"

    def response(self) -> Response:
        """The answer the backend owes the frontend for this request."""
        return Response(self.req_id, self.operation, self.status)


@dataclass(frozen=True)
class Segment:
    """One page of data: sectors ``first_sect..last_sect`` (inclusive) of
    the page granted as ``gref``."""

    gref: int
    first_sect: int
    last_sect: int

    @property
    def nr_sectors(self) -> int:
        return self.last_sect - self.first_sect + 1

    def pack(self) -> bytes:
        _check_segment_local(self)
        return _pack(_SEGMENT, self.gref, self.first_sect, self.last_sect)


@dataclass(frozen=True)
class Request:
    """READ, WRITE, WRITE_BARRIER or FLUSH_DISKCACHE with direct segments."""

    operation: BlkifOp
    handle: int
    id: int
    sector_number: int
    segments: tuple[Segment, ...] = ()

    def pack(self) -> bytes:
        if len(self.segments) > BLKIF_MAX_SEGMENTS_PER_REQUEST:
            raise LocalError(f"{len(self.segments)} segments: a direct request holds at most "
                             f"{BLKIF_MAX_SEGMENTS_PER_REQUEST}")
        fields: list[int] = []
        for seg in self.segments:
            _check_segment_local(seg)
            fields += (seg.gref, seg.first_sect, seg.last_sect)
        fields += [0] * (3 * (BLKIF_MAX_SEGMENTS_PER_REQUEST - len(self.segments)))
        return _pack(_REQUEST, int(self.operation), len(self.segments), self.handle, self.id,
                     self.sector_number, *fields)


@dataclass(frozen=True)
class DiscardRequest:
    """BLKIF_OP_DISCARD: ``nr_sectors`` from ``sector_number`` are no longer in use."""

    id: int
    sector_number: int
    nr_sectors: int
    flag: int = 0
    handle: int = 0

    @property
    def operation(self) -> BlkifOp:
        return BlkifOp.DISCARD

    def pack(self) -> bytes:
        head = _pack(_DISCARD, BlkifOp.DISCARD, self.flag, self.handle, self.id,
                     self.sector_number, self.nr_sectors)
        return head.ljust(REQUEST_SIZE, b"\0")


@dataclass(frozen=True)
class IndirectRequest:
    """BLKIF_OP_INDIRECT: ``nr_segments`` segments for a READ or WRITE live
    in the pages granted as ``indirect_grefs`` (one per 512 segments)."""

    indirect_op: BlkifOp
    nr_segments: int
    id: int
    sector_number: int
    handle: int
    indirect_grefs: tuple[int, ...]

    @property
    def operation(self) -> BlkifOp:
        return BlkifOp.INDIRECT

    def pack(self) -> bytes:
        n = len(self.indirect_grefs)
        if n > BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST:
            raise LocalError(f"{n} indirect pages: at most {BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST}")
        if n != indirect_pages(self.nr_segments):
            raise LocalError(f"{self.nr_segments} segments need {indirect_pages(self.nr_segments)} "
                             f"indirect pages, not {n}")
        grefs = list(self.indirect_grefs) + [0] * (BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST - n)
        head = _pack(_INDIRECT, BlkifOp.INDIRECT, int(self.indirect_op), self.nr_segments, self.id,
                     self.sector_number, self.handle, *grefs)
        return head.ljust(REQUEST_SIZE, b"\0")


@dataclass(frozen=True)
class Response:
    """struct blkif_response."""

    id: int
    operation: int
    status: int

    def pack(self) -> bytes:
        return _pack(_RESPONSE, self.id, int(self.operation), int(self.status))


AnyRequest = Request | DiscardRequest | IndirectRequest


def _pack(st: struct.Struct, *fields: int) -> bytes:
    try:
        return st.pack(*fields)
    except struct.error as e:
        raise LocalError(f"field out of range for blkif: {e}") from None


def _check_segment_local(seg: Segment) -> None:
    if not 0 <= seg.first_sect <= seg.last_sect < SECTORS_PER_PAGE:
        raise LocalError(f"segment sectors {seg.first_sect}..{seg.last_sect} not within one page")


def indirect_pages(nr_segments: int) -> int:
    """Pages needed to hold ``nr_segments`` indirect segment descriptors."""
    return -(-nr_segments // SEGS_PER_INDIRECT_FRAME)


# -- the backend's side: parse and validate what a frontend wrote --------


def _segments_from(buf: bytes, offset: int, count: int, req_id: int, operation: int) -> tuple[Segment, ...]:
    segs = []
    for i, (gref, first, last) in enumerate(_SEGMENT.iter_unpack(buf[offset:offset + count * SEGMENT_SIZE])):
        if first > last or last >= SECTORS_PER_PAGE:
            raise BadRequest(f"segment {i}: sectors {first}..{last} are not within one "
                             f"{PAGE_SIZE}-byte page", req_id, operation)
        segs.append(Segment(gref, first, last))
    return tuple(segs)


def parse_request(buf: bytes | bytearray | memoryview, *,
                  max_indirect_segments: int = 0) -> AnyRequest:
    """Decode and validate one request slot written by a (hostile) frontend.

    ``max_indirect_segments`` is what the backend advertised as
    ``feature-max-indirect-segments``; 0 (not advertised) answers
    BLKIF_OP_INDIRECT with EOPNOTSUPP.  Raises :class:`BadRequest`.
    """
    if len(buf) != REQUEST_SIZE:
        raise LocalError(f"a blkif request slot is {REQUEST_SIZE} bytes, not {len(buf)}")
    if not 0 <= max_indirect_segments <= MAX_INDIRECT_SEGMENTS:
        raise LocalError(f"max_indirect_segments {max_indirect_segments} outside 0..{MAX_INDIRECT_SEGMENTS}")
    # One private copy: the frontend may rewrite the slot while we look.
    data = bytes(buf)
    op, byte1, handle, req_id, sector = _REQUEST_HEAD.unpack_from(data)
    try:
        operation = BlkifOp(op)
    except ValueError:
        raise BadRequest(f"unknown operation {op}", req_id, op, BlkifStatus.EOPNOTSUPP) from None

    if operation == BlkifOp.DISCARD:
        _, flag, handle, req_id, sector, nr_sectors = _DISCARD.unpack_from(data)
        if flag & ~BLKIF_DISCARD_SECURE:
            raise BadRequest(f"unknown discard flags {flag:#x}", req_id, op)
        return DiscardRequest(req_id, sector, nr_sectors, flag, handle)

    if operation == BlkifOp.INDIRECT:
        _, indirect_op, nr_segs, req_id, sector, handle, *grefs = _INDIRECT.unpack_from(data)
        if max_indirect_segments == 0:
            raise BadRequest("indirect requests are not offered", req_id, op, BlkifStatus.EOPNOTSUPP)
        if indirect_op not in (BlkifOp.READ, BlkifOp.WRITE):
            raise BadRequest(f"indirect_op {indirect_op} is neither READ nor WRITE", req_id, op)
        if not 1 <= nr_segs <= max_indirect_segments:
            raise BadRequest(f"{nr_segs} indirect segments, outside 1..{max_indirect_segments}",
                             req_id, op)
        return IndirectRequest(BlkifOp(indirect_op), nr_segs, req_id, sector, handle,
                               tuple(grefs[:indirect_pages(nr_segs)]))

    if operation == BlkifOp.RESERVED_1:
        raise BadRequest("BLKIF_OP_RESERVED_1 is not supported", req_id, op, BlkifStatus.EOPNOTSUPP)

    nr_segs = byte1
    # Barriers and flushes may carry no data; reads and writes must.
    least = 1 if operation in (BlkifOp.READ, BlkifOp.WRITE) else 0
    if not least <= nr_segs <= BLKIF_MAX_SEGMENTS_PER_REQUEST:
        raise BadRequest(f"{nr_segs} segments, outside {least}..{BLKIF_MAX_SEGMENTS_PER_REQUEST}",
                         req_id, op)
    segs = _segments_from(data, _REQUEST_HEAD.size, nr_segs, req_id, op)
    return Request(operation, handle, req_id, sector, segs)


def parse_indirect_segments(pages: bytes | bytearray | memoryview, count: int, *,
                            req_id: int = 0) -> tuple[Segment, ...]:
    """Decode ``count`` segment descriptors from the (concatenated) indirect
    pages of one request; ``req_id`` goes into any :class:`BadRequest`."""
    if not 0 <= count <= MAX_INDIRECT_SEGMENTS:
        raise LocalError(f"{count} indirect segments outside 0..{MAX_INDIRECT_SEGMENTS}")
    if len(pages) < count * SEGMENT_SIZE:
        raise LocalError(f"{len(pages)} bytes of indirect pages cannot hold {count} segments")
    return _segments_from(bytes(pages[:count * SEGMENT_SIZE]), 0, count, req_id, BlkifOp.INDIRECT)


@dataclass(frozen=True)
class SegmentArray:
    """A request's segments in columns -- ``grefs``, ``first``/``last``
    sectors as bytes -- for a backend moving up to 4096 of them per request
    without an object each."""

    grefs: list[int]
    first: bytes
    last: bytes

    def __len__(self) -> int:
        return len(self.grefs)

    @property
    def nr_sectors(self) -> int:
        return sum(self.last) - sum(self.first) + len(self.grefs)

    def whole_pages(self) -> bool:
        """Every segment is a whole page (the usual case: one view per page)."""
        n = len(self.grefs)
        return self.first.count(0) == n and self.last.count(SECTORS_PER_PAGE - 1) == n

    @classmethod
    def of(cls, segments: Sequence[Segment]) -> SegmentArray:
        return cls([s.gref for s in segments], bytes(s.first_sect for s in segments),
                   bytes(s.last_sect for s in segments))


def parse_segment_array(raw: bytes | bytearray | memoryview, count: int, *,
                        req_id: int = 0, operation: int = BlkifOp.INDIRECT) -> SegmentArray:
    """As :func:`parse_indirect_segments`, into a :class:`SegmentArray`."""
    if not 0 <= count <= MAX_INDIRECT_SEGMENTS:
        raise LocalError(f"{count} indirect segments outside 0..{MAX_INDIRECT_SEGMENTS}")
    if len(raw) < count * SEGMENT_SIZE:
        raise LocalError(f"{len(raw)} bytes of indirect pages cannot hold {count} segments")
    data = bytes(raw[:count * SEGMENT_SIZE])  # one private copy
    first, last = data[4::SEGMENT_SIZE], data[5::SEGMENT_SIZE]
    if (count and max(last) >= SECTORS_PER_PAGE) or first.count(0) != count:
        for i, (f, la) in enumerate(zip(first, last, strict=True)):
            if f > la or la >= SECTORS_PER_PAGE:
                raise BadRequest(f"segment {i}: sectors {f}..{la} are not within one "
                                 f"{PAGE_SIZE}-byte page", req_id, operation)
    if sys.byteorder == "little":  # the wire's order: read the u32 grefs in place
        grefs = list(memoryview(data).cast("I")[::2])
    else:
        grefs = [g for g, _, _ in _SEGMENT.iter_unpack(data)]
    return SegmentArray(grefs, first, last)


def pack_indirect_segments(segments: Sequence[Segment]) -> bytes:
    """The indirect pages for ``segments``: whole 4 KiB pages, zero padded."""
    if not 1 <= len(segments) <= MAX_INDIRECT_SEGMENTS:
        raise LocalError(f"{len(segments)} indirect segments outside 1..{MAX_INDIRECT_SEGMENTS}")
    body = b"".join(seg.pack() for seg in segments)
    return body.ljust(indirect_pages(len(segments)) * PAGE_SIZE, b"\0")


# -- the frontend's side: a backend is not trusted either -----------------


def parse_response(buf: bytes | bytearray | memoryview) -> Response:
    """Decode one response slot written by the backend."""
    if len(buf) < RESPONSE_SIZE:
        raise LocalError(f"a blkif response is {RESPONSE_SIZE} bytes, not {len(buf)}")
    rsp_id, op, status = _RESPONSE.unpack_from(bytes(buf[:RESPONSE_SIZE]))
    if status not in _KNOWN_STATUS:
        raise RemoteProtocolError(f"blkif response id {rsp_id:#x}: unknown status {status}")
    return Response(rsp_id, op, status)


# -- sizes ----------------------------------------------------------------


def sectors_of(req: Request | DiscardRequest | Sequence[Segment]) -> int:
    """512-byte sectors a request covers (for an indirect request, pass the
    segments from :func:`parse_indirect_segments`)."""
    if isinstance(req, DiscardRequest):
        return req.nr_sectors
    if isinstance(req, IndirectRequest):
        raise LocalError("an indirect request's size is in its pages: pass its parsed segments")
    segs = req.segments if isinstance(req, Request) else req
    return sum(seg.last_sect - seg.first_sect + 1 for seg in segs)


def request_bytes(req: Request | DiscardRequest | Sequence[Segment]) -> int:
    """Bytes a request covers."""
    return sectors_of(req) * SECTOR_SIZE


def check_bounds(sector_number: int, nr_sectors: int, disk_sectors: int, *,
                 req_id: int = 0, operation: int = 0) -> None:
    """Refuse I/O that does not lie wholly inside a disk of ``disk_sectors``.

    Written to stay right where C would wrap: a ``sector_number`` near 2**64
    plus a few sectors must not come round to a small number.
    """
    if disk_sectors < 0:
        raise LocalError(f"disk of {disk_sectors} sectors")
    if sector_number < 0 or nr_sectors < 0:
        raise BadRequest(f"negative extent {sector_number}+{nr_sectors}", req_id, operation)
    # Compare without adding: sector_number <= disk_sectors - nr_sectors.
    if nr_sectors > disk_sectors or sector_number > disk_sectors - nr_sectors:
        raise BadRequest(f"sectors {sector_number}..+{nr_sectors} past the end of a "
                         f"{disk_sectors}-sector disk", req_id, operation)
