"""The libxl stream, as ``docs/specs/libxl-migration-stream.pandoc`` specifies
it (and ``tools/libs/light/libxl_sr_stream_format.h`` lays it out).

Layout::

    header (16 octets, big-endian whatever the endianness bit says)
      0  u64 ident    0x4c6962786c466d74, "LibxlFmt"
      8  u32 version  2
     12  u32 options  bit 0: endianness (1 = big), bit 1: converted from legacy
    records, framed as in ``framing``, until END.

A LIBXC_CONTEXT record has an empty body: the libxc stream follows it
inline, up to the libxc END (its length cannot be known in advance).  In a
checkpointed stream (Remus, COLO) the libxc stream stops at each CHECKPOINT
record; libxl records follow (emulator context, …) up to a CHECKPOINT_END,
and then the libxc stream carries on.

:class:`LibxlReader` follows all of that over one input: it yields the libxl
header, libxl records and, between a LIBXC_CONTEXT and the libxc END, the
libxc layer's events, each validated, with offsets counted from the start
of the libxl stream.  The order rules are those of ``libxl_stream_read.c``:
one LIBXC_CONTEXT, CHECKPOINT_END only inside a checkpoint, END last.
"""

from __future__ import annotations

import enum
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, NoReturn

from xmp.errors import LocalError

from .framing import (
    XMP_REC_TYPE_BASE,
    Input,
    LayerReader,
    RecordFramer,
    StreamError,
    encode_record,
    is_optional,
)
from .libxc import Checkpoint, End, LibxcParser

LIBXL_IDENT = 0x4C6962786C466D74  # "LibxlFmt"
LIBXL_VERSION = 2
LIBXL_OPT_BIG_ENDIAN = 1 << 0
LIBXL_OPT_LEGACY = 1 << 1

_HDR = struct.Struct(">QII")
HEADER_SIZE = _HDR.size  # 16


class LibxlRecType(enum.IntEnum):
    """REC_TYPE_* of the libxl stream."""

    END = 0x00
    LIBXC_CONTEXT = 0x01
    EMULATOR_XENSTORE_DATA = 0x02
    EMULATOR_CONTEXT = 0x03
    CHECKPOINT_END = 0x04
    CHECKPOINT_STATE = 0x05
    # xmp's own, optional (see framing.XMP_REC_TYPE_BASE)
    XMP_DEVICE_STATE = XMP_REC_TYPE_BASE + 0x00


class EmulatorId(enum.IntEnum):
    UNKNOWN = 0            # a legacy stream
    QEMU_TRADITIONAL = 1
    QEMU_UPSTREAM = 2


class CheckpointStateId(enum.IntEnum):
    """CHECKPOINT_STATE's id (COLO's back channel)."""

    NEW = 0
    SVM_SUSPENDED = 1
    SVM_READY = 2
    SVM_RESUMED = 3


class _Bad(Exception):
    pass


@dataclass(frozen=True)
class LibxlHeader:
    version: int = LIBXL_VERSION
    options: int = 0

    @property
    def legacy(self) -> bool:
        return bool(self.options & LIBXL_OPT_LEGACY)

    def encode(self) -> bytes:
        return _HDR.pack(LIBXL_IDENT, self.version, self.options)


class LibxlRecord:
    TYPE: ClassVar[int]

    def rec_type(self) -> int:
        return self.TYPE

    def body(self) -> bytes:
        return b""

    def encode(self) -> bytes:
        return encode_record(self.rec_type(), self.body())

    @classmethod
    def decode(cls, body: bytes) -> LibxlRecord:
        """The record from its body; this default is for empty bodies."""
        if body:
            raise _Bad(f"body_length {len(body)}, expected 0")
        return cls()


@dataclass(frozen=True)
class LibxlEnd(LibxlRecord):
    """END: the last record of the libxl stream (and of the image)."""

    TYPE = LibxlRecType.END


@dataclass(frozen=True)
class LibxcContext(LibxlRecord):
    """LIBXC_CONTEXT: the libxc stream follows, inline."""

    TYPE = LibxlRecType.LIBXC_CONTEXT


@dataclass(frozen=True)
class CheckpointEnd(LibxlRecord):
    """CHECKPOINT_END: the libxl part of a checkpoint is complete."""

    TYPE = LibxlRecType.CHECKPOINT_END


def _emulator_head(body: bytes) -> tuple[int, int]:
    if len(body) < 8:
        raise _Bad(f"body_length {len(body)} too short for emulator_id and index")
    emulator_id, index = struct.unpack_from("<II", body)
    if emulator_id not in EmulatorId._value2member_map_:
        raise _Bad(f"unknown emulator_id {emulator_id}")
    return emulator_id, index


# docs/misc/xenstore.txt: path characters are alphanumerics and -/_@.
_KEY = re.compile(rb"[A-Za-z0-9\-/_@]+")


@dataclass(frozen=True)
class EmulatorXenstoreData(LibxlRecord):
    """EMULATOR_XENSTORE_DATA: ``u32 emulator_id, u32 index``, then packed
    NUL-terminated (key, value) pairs, keys relative to the device model's
    xenstore directory."""

    TYPE = LibxlRecType.EMULATOR_XENSTORE_DATA
    emulator_id: int
    index: int
    pairs: tuple[tuple[str, str], ...]

    def body(self) -> bytes:
        data = b"".join(k.encode("ascii") + b"\0" + v.encode("utf-8") + b"\0" for k, v in self.pairs)
        return struct.pack("<II", self.emulator_id, self.index) + data

    @classmethod
    def decode(cls, body: bytes) -> EmulatorXenstoreData:
        emulator_id, index = _emulator_head(body)
        data = body[8:]
        if data and not data.endswith(b"\0"):
            raise _Bad("key/value data does not end with a NUL")
        parts = data[:-1].split(b"\0") if data else []
        if len(parts) % 2:
            raise _Bad(f"key/value data holds {len(parts)} strings, not pairs")
        pairs = []
        for k, v in zip(parts[0::2], parts[1::2], strict=True):
            if not _KEY.fullmatch(k):
                raise _Bad(f"xenstore key {k!r} has characters outside [A-Za-z0-9-/_@]")
            try:
                pairs.append((k.decode("ascii"), v.decode("utf-8")))
            except UnicodeDecodeError:
                raise _Bad(f"value of {k.decode('ascii')!r} is not UTF-8") from None
        return cls(emulator_id, index, tuple(pairs))


@dataclass(frozen=True)
class EmulatorContext(LibxlRecord):
    """EMULATOR_CONTEXT: ``u32 emulator_id, u32 index``, then the emulator's
    opaque blob."""

    TYPE = LibxlRecType.EMULATOR_CONTEXT
    emulator_id: int
    index: int
    context: bytes

    def body(self) -> bytes:
        return struct.pack("<II", self.emulator_id, self.index) + self.context

    @classmethod
    def decode(cls, body: bytes) -> EmulatorContext:
        emulator_id, index = _emulator_head(body)
        return cls(emulator_id, index, body[8:])


@dataclass(frozen=True)
class CheckpointState(LibxlRecord):
    """CHECKPOINT_STATE (COLO): ``u32 id``, a CheckpointStateId."""

    TYPE = LibxlRecType.CHECKPOINT_STATE
    id: int

    def body(self) -> bytes:
        return struct.pack("<I", self.id)

    @classmethod
    def decode(cls, body: bytes) -> CheckpointState:
        if len(body) != 4:
            raise _Bad(f"body_length {len(body)}, expected 4")
        (state,) = struct.unpack("<I", body)
        if state not in CheckpointStateId._value2member_map_:
            raise _Bad(f"unknown checkpoint state id {state}")
        return cls(state)


@dataclass(frozen=True)
class XmpDeviceState(LibxlRecord):
    """xmp's optional record: one device's saved state, which its driver
    writes and reads (Xen has no record for it).  ``u32 devid, u16
    kind_length, u16 reserved, kind (ASCII), state``."""

    TYPE = LibxlRecType.XMP_DEVICE_STATE
    kind: str
    devid: int
    state: bytes

    def body(self) -> bytes:
        kind = self.kind.encode("ascii")
        return struct.pack("<IH2x", self.devid, len(kind)) + kind + self.state

    @classmethod
    def decode(cls, body: bytes) -> XmpDeviceState:
        if len(body) < 8:
            raise _Bad(f"body_length {len(body)} too short for devid and kind length")
        devid, klen = struct.unpack_from("<IH", body)
        kind = body[8 : 8 + klen]
        if len(kind) != klen or not kind.isascii() or not kind.isalnum():
            raise _Bad(f"device kind {kind!r} is not {klen} alphanumeric ASCII octets")
        return cls(kind.decode("ascii"), devid, body[8 + klen :])


@dataclass(frozen=True)
class LibxlOptionalRecord(LibxlRecord):
    """An optional libxl record this reader does not know, passed up as is."""

    type: int
    data: bytes

    def rec_type(self) -> int:
        return self.type

    def body(self) -> bytes:
        return self.data


_DECODERS: dict[int, Callable[[bytes], LibxlRecord]] = {cls.TYPE: cls.decode for cls in (
    LibxlEnd, LibxcContext, CheckpointEnd, EmulatorXenstoreData, EmulatorContext, CheckpointState,
    XmpDeviceState)}
_NAMES = {int(t): t.name for t in LibxlRecType}


class _Phase(enum.Enum):
    HEADER = "header"
    RECORDS = "records"        # libxl records
    LIBXC = "libxc"            # inside the libxc stream
    CHECKPOINT = "checkpoint"  # libxl records between libxc CHECKPOINT and CHECKPOINT_END
    DONE = "done"


class LibxlParser:
    """The libxl layer's state machine over a shared :class:`Input`; it drives
    a :class:`LibxcParser` for the nested libxc stream."""

    def __init__(self, max_pfn: int | None = None, max_vcpus: int | None = None,
                 checkpointed: bool = False):
        self.checkpointed = checkpointed
        self.header: LibxlHeader | None = None
        self._libxc = LibxcParser(max_pfn, max_vcpus, checkpointed)
        self._libxc_started = False
        self._phase = _Phase.HEADER
        self._framer = RecordFramer(_NAMES)

    @property
    def done(self) -> bool:
        return self._phase is _Phase.DONE

    def step(self, inp: Input) -> object | None:
        if self._phase is _Phase.HEADER:
            return self._header(inp)
        if self._phase is _Phase.DONE:
            return None
        if self._phase is _Phase.LIBXC:
            event = self._libxc.step(inp)
            if isinstance(event, End):
                self._phase = _Phase.RECORDS
            elif isinstance(event, Checkpoint):
                self._phase = _Phase.CHECKPOINT
            return event
        got = self._framer.next(inp)
        if got is None:
            return None
        return self._record(*got)

    def check_complete(self, inp: Input) -> None:
        if self._phase is _Phase.DONE:
            return
        if self._phase is _Phase.HEADER:
            raise StreamError(inp.offset, "libxl header",
                              f"stream ends {inp.available()} bytes into the {HEADER_SIZE}-byte header")
        if self._phase is _Phase.LIBXC:
            self._libxc.check_complete(inp)
        if inp.available():
            raise self._framer.truncated(inp)
        raise StreamError(inp.offset, "END", "stream ends without a libxl END record")

    def _header(self, inp: Input) -> LibxlHeader | None:
        raw = inp.peek(HEADER_SIZE)
        if raw is None:
            return None
        ident, version, options = _HDR.unpack(raw)

        def fail(msg: str) -> NoReturn:
            raise StreamError(inp.offset, "libxl header", msg)

        if ident != LIBXL_IDENT:
            fail(f"ident {ident:#018x}, expected {LIBXL_IDENT:#018x} ('LibxlFmt')")
        if version != LIBXL_VERSION:
            fail(f"version {version}, expected {LIBXL_VERSION}")
        if options & LIBXL_OPT_BIG_ENDIAN:
            fail("big-endian streams are not supported")
        inp.take(HEADER_SIZE)
        self.header = LibxlHeader(version, options)
        self._phase = _Phase.RECORDS
        return self.header

    def _record(self, offset: int, rec_type: int, body: bytes) -> LibxlRecord:
        name = self._framer.name(rec_type)

        def fail(msg: str) -> NoReturn:
            raise StreamError(offset, name, msg)

        decoder = _DECODERS.get(rec_type)
        if decoder is None:
            if not is_optional(rec_type):
                fail("unknown mandatory record")
            return LibxlOptionalRecord(rec_type, body)
        in_checkpoint = self._phase is _Phase.CHECKPOINT
        if rec_type == LibxlRecType.LIBXC_CONTEXT:
            if self._libxc_started:
                fail("a second LIBXC_CONTEXT record")
            self._libxc_started = True
        elif rec_type == LibxlRecType.CHECKPOINT_END and not in_checkpoint:
            fail("CHECKPOINT_END outside a checkpoint")
        elif rec_type == LibxlRecType.CHECKPOINT_STATE and not self.checkpointed:
            fail("CHECKPOINT_STATE in a stream that is not checkpointed")
        elif rec_type == LibxlRecType.END:
            if in_checkpoint:
                fail("END inside a checkpoint (before CHECKPOINT_END)")
            if not self._libxc_started:
                fail("END before LIBXC_CONTEXT")
        try:
            rec = decoder(body)
        except _Bad as e:
            raise StreamError(offset, name, str(e)) from None
        if rec_type == LibxlRecType.LIBXC_CONTEXT or rec_type == LibxlRecType.CHECKPOINT_END:
            self._phase = _Phase.LIBXC
        elif rec_type == LibxlRecType.END:
            self._phase = _Phase.DONE
        return rec


class LibxlReader(LayerReader):
    """A libxl stream (with its libxc stream inside): ``feed()``, then
    ``next_event()`` / iterate; ``close()`` at EOF raises if incomplete.
    Bytes after the libxl END are not part of the image: ``unused_data``."""

    def __init__(self, max_pfn: int | None = None, max_vcpus: int | None = None,
                 checkpointed: bool = False):
        self._inp = Input()
        self._parser = LibxlParser(max_pfn, max_vcpus, checkpointed)



class LibxlWriter:
    """Records in, bytes out, for the libxl layer.  The libxc stream's bytes
    (from a :class:`LibxcWriter`) go right after :meth:`libxc_context`."""

    def __init__(self, options: int = 0):
        if options & LIBXL_OPT_BIG_ENDIAN:
            raise LocalError("big-endian streams are not supported")
        self.header_record = LibxlHeader(LIBXL_VERSION, options)

    def header(self) -> bytes:
        return self.header_record.encode()

    def record(self, rec: LibxlRecord) -> bytes:
        if isinstance(rec, EmulatorXenstoreData):
            for k, v in rec.pairs:
                if not _KEY.fullmatch(k.encode("ascii", "replace")) or "\0" in v:
                    raise LocalError(f"xenstore pair {k!r}={v!r} cannot be encoded")
        if isinstance(rec, LibxlOptionalRecord) and not is_optional(rec.type):
            raise LocalError(f"LibxlOptionalRecord type {rec.type:#x} lacks bit 31")
        return rec.encode()

    def libxc_context(self) -> bytes:
        return LibxcContext().encode()

    def end(self) -> bytes:
        return LibxlEnd().encode()


__all__ = [
    "HEADER_SIZE", "LIBXL_IDENT", "LIBXL_OPT_BIG_ENDIAN", "LIBXL_OPT_LEGACY", "LIBXL_VERSION",
    "CheckpointEnd", "CheckpointState", "CheckpointStateId", "EmulatorContext", "EmulatorId",
    "EmulatorXenstoreData", "LibxcContext", "LibxlEnd", "LibxlHeader", "LibxlOptionalRecord",
    "LibxlParser", "LibxlReader", "LibxlRecType", "LibxlRecord", "LibxlWriter", "XmpDeviceState",
]
