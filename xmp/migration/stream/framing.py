"""What the libxl and libxc layers share: the record framing, the error,
and an input buffer that knows the absolute offset of every byte.

Both ``docs/specs/libxl-migration-stream.pandoc`` and
``docs/specs/libxc-migration-stream.pandoc`` frame a record the same way::

    offset 0  u32 type          bit 31 set = optional record
    offset 4  u32 body_length   the body, without its padding
    offset 8  body              body_length octets
              padding           0..7 zero octets, so the record ends 8-aligned

The fields are in the stream's byte order (its header says which); like
Xen's own restore code we read and write only little-endian streams, the
order of every x86 and Arm host.  Padding is written as zeros and, as the
spec says, ignored on restore.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import Any, cast

from xmp.errors import LocalError, RemoteProtocolError

__all__ = [
    "REC_ALIGN",
    "REC_HEADER_SIZE",
    "REC_LENGTH_MAX",
    "REC_TYPE_OPTIONAL",
    "XMP_REC_TYPE_BASE",
    "Input",
    "RecordFramer",
    "StreamError",
    "encode_record",
    "is_optional",
    "padding",
]

REC_ALIGN = 8
REC_HEADER_SIZE = 8
# xg_sr_stream_format.h's REC_LENGTH_MAX: no record body may be longer, so a
# hostile length cannot make the reader buffer more than this.
REC_LENGTH_MAX = 128 << 20
REC_TYPE_OPTIONAL = 0x8000_0000

# xmp's own optional records, in both layers.  Xen reserves the whole of
# 0x80000000-0xFFFFFFFF for *its* future optional records and allocates
# upwards from the bottom (as it does for mandatory ones); xmp takes a block
# of 256 at the very top, spelling "xm" (0x78 0x6d), where Xen will not reach.
# Being optional, a Xen restore skips them.
XMP_REC_TYPE_BASE = 0xFF78_6D00

_REC_HEADER = struct.Struct("<II")


class StreamError(RemoteProtocolError):
    """The stream is not a valid migration stream: the sender is broken or
    hostile.  ``offset`` is the absolute byte offset in the stream where the
    faulty item (header or record) begins; ``record`` names it ("image
    header", "PAGE_DATA", …)."""

    def __init__(self, offset: int, record: str, message: str):
        self.offset = offset
        self.record = record
        self.message = message
        super().__init__(offset, record, message)

    def __str__(self) -> str:
        return f"{self.record} at offset {self.offset}: {self.message}"


def is_optional(rec_type: int) -> bool:
    return bool(rec_type & REC_TYPE_OPTIONAL)


def padding(length: int) -> int:
    """Zero octets after a body of ``length`` octets."""
    return -length % REC_ALIGN


def encode_record(rec_type: int, *parts: bytes) -> bytes:
    """One framed record: header, the body (the concatenation of ``parts``,
    joined once, so a PAGE_DATA's pages are copied once), zero padding."""
    length = sum(len(p) for p in parts)
    if length > REC_LENGTH_MAX:
        raise LocalError(f"record body of {length} bytes exceeds REC_LENGTH_MAX ({REC_LENGTH_MAX})")
    return b"".join((_REC_HEADER.pack(rec_type, length), *parts, bytes(padding(length))))


class Input:
    """Bytes fed so far and not yet consumed, with the absolute offset of the
    first of them.  The layers of a nested stream share one ``Input``: the
    libxl reader hands it to the libxc reader in the middle of the stream
    and takes it back after, without copying."""

    def __init__(self) -> None:
        self._buf: bytearray | bytes | memoryview = bytearray()
        self._pos = 0          # index of the first unconsumed byte in _buf
        self.offset = 0        # absolute stream offset of _buf[_pos]
        self.eof = False
        self._adopted = False  # _buf is the caller's immutable buffer, not ours

    def feed(self, data: bytes | memoryview) -> None:
        """More bytes.  ``bytes``, or a read-only memoryview whose bytes the
        caller leaves alone, fed when nothing is buffered is adopted, not
        copied (a restore feeds a whole image read in place), and
        :meth:`take_view` hands out views of it."""
        if self.eof:
            raise LocalError("feed() after close()")
        fixed = type(data) is bytes or (isinstance(data, memoryview) and data.readonly)
        if self._adopted:
            rest = memoryview(self._buf)[self._pos:]
            self._buf, self._pos, self._adopted = bytearray(rest), 0, False
        if fixed and self.available() == 0:
            self._buf, self._pos, self._adopted = data, 0, True
            return
        assert isinstance(self._buf, bytearray)
        if self._pos > 1 << 16 and self._pos * 2 > len(self._buf):
            del self._buf[: self._pos]   # compact, amortised O(1) per byte
            self._pos = 0
        self._buf += data

    def available(self) -> int:
        return len(self._buf) - self._pos

    def peek(self, n: int) -> bytes | None:
        """The next ``n`` bytes without consuming them, or None if not all here."""
        if self.available() < n:
            return None
        return bytes(self._buf[self._pos : self._pos + n])

    def take(self, n: int) -> bytes:
        with memoryview(self._buf) as view:   # one copy (a bytearray slice would be a second)
            data = bytes(view[self._pos : self._pos + n])
        assert len(data) == n
        self._pos += n
        self.offset += n
        return data

    def take_view(self, n: int) -> bytes | memoryview:
        """:meth:`take`, without the copy when the bytes are an adopted
        buffer's (they never change, so a view of them is as good)."""
        if not self._adopted:
            return self.take(n)
        data = memoryview(self._buf)[self._pos : self._pos + n]
        assert len(data) == n
        self._pos += n
        self.offset += n
        return data

    def skip(self, n: int) -> None:
        assert self.available() >= n
        self._pos += n
        self.offset += n

    def rest(self) -> bytes:
        """Everything fed and not consumed (the bytes after a layer's end)."""
        return bytes(self._buf[self._pos :])


class RecordFramer:
    """Reads framed records off an ``Input``: the header is checked as soon as
    it is complete, before any body is buffered; a record is returned only
    once its body and padding are all here."""

    def __init__(self, names: dict[int, str], views: frozenset[int] = frozenset()):
        self._names = names
        self._views = views   # record types whose decoders take a memoryview body (no copy)

    def name(self, rec_type: int) -> str:
        if rec_type in self._names:
            return self._names[rec_type]
        kind = "optional" if is_optional(rec_type) else "mandatory"
        return f"{kind} record {rec_type:#010x}"

    def next(self, inp: Input) -> tuple[int, int, bytes] | None:
        """(offset, type, body) of the next whole record, or None."""
        head = inp.peek(REC_HEADER_SIZE)
        if head is None:
            return None
        rec_type, length = _REC_HEADER.unpack(head)
        if length > REC_LENGTH_MAX:
            raise StreamError(inp.offset, self.name(rec_type),
                              f"body_length {length} exceeds REC_LENGTH_MAX ({REC_LENGTH_MAX})")
        total = REC_HEADER_SIZE + length + padding(length)
        if inp.available() < total:
            return None
        offset = inp.offset
        inp.skip(REC_HEADER_SIZE)
        # one copy of the body (none for the types in _views, of an adopted buffer), none of the padding
        # (a view is read as bytes are: struct, len, slices -- what the decoders of _views do)
        body = cast(bytes, inp.take_view(length)) if rec_type in self._views else inp.take(length)
        inp.skip(padding(length))
        return offset, rec_type, body

    def truncated(self, inp: Input) -> StreamError:
        """The error for a stream that ended inside (or instead of) a record."""
        head = inp.peek(REC_HEADER_SIZE)
        if head is None:
            return StreamError(inp.offset, "record header",
                               f"stream ends {inp.available()} bytes into a record header")
        rec_type, length = _REC_HEADER.unpack(head)
        return StreamError(inp.offset, self.name(rec_type),
                           f"stream ends {inp.available() - REC_HEADER_SIZE} bytes into a body of "
                           f"{length} (+{padding(length)} padding)")


class LayerReader:
    """What the libxc and libxl readers share: bytes in through ``feed()``,
    validated records out of ``next_event()`` (None = need more) or by
    iterating; ``close()`` at EOF raises if the stream stopped short.
    Subclasses set ``_inp`` (an :class:`Input`) and ``_parser``."""

    _inp: Input
    _parser: Any

    def feed(self, data: bytes | memoryview) -> None:
        self._inp.feed(data)

    def next_event(self) -> object | None:
        return self._parser.step(self._inp)

    def __iter__(self) -> Iterator[object]:
        while (event := self.next_event()) is not None:
            yield event

    @property
    def done(self) -> bool:
        return self._parser.done

    @property
    def unused_data(self) -> bytes:
        return self._inp.rest() if self.done else b""

    def close(self) -> None:
        self._inp.eof = True
        if self.next_event() is not None:
            raise LocalError("close() with events not yet taken")
        self._parser.check_complete(self._inp)
