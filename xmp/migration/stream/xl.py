"""The xl save-file header (``tools/xl/xl.h``, ``tools/xl/xl_saverestore.c``),
which comes before the libxl stream in a save file and a migration::

    0   char magic[32]         "Xen saved domain, xl format\\n \\0 \\r", NUL-padded
    32  u32  byteorder         0x01020304 in the writer's order (04 03 02 01 here)
    36  u32  mandatory_flags   unknown bit => refuse: JSON 1<<0, STREAMv2 1<<1
    40  u32  optional_flags    none defined
    44  u32  optional_data_len
    48  optional data          u32 config_len, then config_len octets of config

The u32s are in the saving host's order; like xl on x86 we read only
little-endian headers.  Today's xl stores the domain's libxl configuration
as JSON, NUL-terminated (``config_len`` counts the NUL), and sets the JSON
flag; older xl stored the xl.cfg file's text as is, flag clear.  xmp stores
its topology's domain table the same way: JSON text with the flag, TOML
text without it (TOML is not JSON, and a Xen xl must not parse it as such).

:class:`SaveImageReader` reads a whole image -- this header, then the libxl
stream with the libxc stream inside -- from bytes fed in any chunking.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import NoReturn

from xmp.errors import LocalError

from .framing import Input, LayerReader, StreamError
from .libxl import LibxlParser

SAVEFILE_MAGIC = b"Xen saved domain, xl format\n \0 \r".ljust(32, b"\0")
SAVEFILE_BYTEORDER_VALUE = 0x01020304
XL_MANDATORY_FLAG_JSON = 1 << 0
XL_MANDATORY_FLAG_STREAMV2 = 1 << 1
XL_MANDATORY_FLAG_ALL = XL_MANDATORY_FLAG_JSON | XL_MANDATORY_FLAG_STREAMV2
# xl reads the optional data whole; a hostile length must not make us buffer
# without bound.  A domain's config is a few KiB.
OPTIONAL_DATA_MAX = 1 << 20

_HDR = struct.Struct("<32sIIII")
HEADER_SIZE = _HDR.size  # 48


@dataclass(frozen=True)
class XlHeader:
    """The xl header.  ``config`` is the domain's configuration text (None:
    the file carries none), JSON if ``config_is_json`` (the JSON flag);
    optional data beyond the config is kept as is (xl skips what it does
    not understand).  ``mandatory_flags`` does not hold the JSON bit: it
    follows from the config."""

    config: str | None
    config_is_json: bool = True
    mandatory_flags: int = XL_MANDATORY_FLAG_STREAMV2
    optional_flags: int = 0
    extra_optional_data: bytes = b""

    def encode(self) -> bytes:
        flags = self.mandatory_flags & ~XL_MANDATORY_FLAG_JSON
        blob = b""
        if self.config is not None:
            text = self.config.encode("utf-8")
            if b"\0" in text:
                raise LocalError("the config text contains a NUL")
            if self.config_is_json:
                blob = text + b"\0"   # libxl parses it as a C string
                flags |= XL_MANDATORY_FLAG_JSON
            else:
                blob = text
        optdata = struct.pack("<I", len(blob)) + blob + self.extra_optional_data
        return _HDR.pack(SAVEFILE_MAGIC, SAVEFILE_BYTEORDER_VALUE, flags, self.optional_flags,
                         len(optdata)) + optdata


def _parse(inp: Input) -> XlHeader | None:
    raw = inp.peek(HEADER_SIZE)
    if raw is None:
        return None
    offset = inp.offset

    def fail(msg: str) -> NoReturn:
        raise StreamError(offset, "xl header", msg)

    magic, byteorder, mflags, oflags, optlen = _HDR.unpack(raw)
    if magic != SAVEFILE_MAGIC:
        fail(f"magic {magic!r} is not xl's save-file magic")
    if byteorder != SAVEFILE_BYTEORDER_VALUE:
        if byteorder == 0x04030201:
            fail("byte order is big-endian; only little-endian images are read")
        fail(f"byteorder {byteorder:#010x}, expected {SAVEFILE_BYTEORDER_VALUE:#010x}")
    if mflags & ~XL_MANDATORY_FLAG_ALL:
        fail(f"unknown mandatory flags {mflags & ~XL_MANDATORY_FLAG_ALL:#x}")
    if not mflags & XL_MANDATORY_FLAG_STREAMV2:
        fail("not a migration v2 image (STREAMv2 flag clear): legacy images are not read")
    if optlen > OPTIONAL_DATA_MAX:
        fail(f"optional_data_len {optlen} exceeds {OPTIONAL_DATA_MAX}")
    whole = inp.peek(HEADER_SIZE + optlen)
    if whole is None:
        return None
    optdata = whole[HEADER_SIZE:]
    config: str | None = None
    rest = optdata
    if optlen:
        if optlen < 4:
            fail(f"optional_data_len {optlen} too short for the config length")
        (clen,) = struct.unpack_from("<I", optdata)
        if clen > optlen - 4:
            fail(f"config length {clen} exceeds the {optlen - 4} octets of optional data left")
        blob, rest = optdata[4 : 4 + clen], optdata[4 + clen :]
        is_json = bool(mflags & XL_MANDATORY_FLAG_JSON)
        if clen:
            if is_json:
                if not blob.endswith(b"\0") or b"\0" in blob[:-1]:
                    fail("the JSON config is not one NUL-terminated string")
                blob = blob[:-1]
            elif b"\0" in blob:
                fail("the config text contains a NUL")
            try:
                config = blob.decode("utf-8")
            except UnicodeDecodeError:
                fail("the config is not UTF-8 text")
    if config is None and mflags & XL_MANDATORY_FLAG_JSON:
        fail("the JSON flag is set but no config is present")
    inp.take(HEADER_SIZE + optlen)
    return XlHeader(config, bool(mflags & XL_MANDATORY_FLAG_JSON) or config is None,
                    mflags & ~XL_MANDATORY_FLAG_JSON, oflags, rest)


class SaveImageReader(LayerReader):
    """A whole save image or migration stream: the xl header, then the
    libxl stream with the libxc stream inside.  ``feed()`` any chunks, take
    validated events from ``next_event()`` / iteration (the XlHeader, the
    LibxlHeader, libxl records, the libxc headers and records); ``close()``
    at EOF raises :class:`StreamError` unless the image was complete."""

    def __init__(self, max_pfn: int | None = None, max_vcpus: int | None = None,
                 checkpointed: bool = False):
        self._inp = Input()
        self.header: XlHeader | None = None
        self._parser = LibxlParser(max_pfn, max_vcpus, checkpointed)

    def next_event(self) -> object | None:
        if self.header is None:
            self.header = _parse(self._inp)
            return self.header
        return self._parser.step(self._inp)

    @property
    def offset(self) -> int:
        """Octets of the stream consumed so far: where the next event starts."""
        return self._inp.offset

    def limit(self, max_pfn: int, max_vcpus: int) -> None:
        """The bounds of the domain the header describes, for every later
        record's checks (pfns beyond it, vCPUs it lacks)."""
        libxc = self._parser._libxc
        libxc.max_pfn, libxc.max_vcpus = max_pfn, max_vcpus

    def close(self) -> None:
        if self.header is None:
            self._inp.eof = True
            if self.next_event() is None:
                raise StreamError(self._inp.offset, "xl header",
                                  f"stream ends {self._inp.available()} bytes into the header")
            raise LocalError("close() with events not yet taken")
        super().close()


def parse_xl_header(data: bytes) -> tuple[XlHeader, int]:
    """The header at the start of ``data`` and its length in octets."""
    inp = Input()
    inp.feed(data)
    hdr = _parse(inp)
    if hdr is None:
        raise StreamError(0, "xl header", f"{len(data)} octets do not hold the whole header")
    return hdr, inp.offset


__all__ = [
    "HEADER_SIZE", "OPTIONAL_DATA_MAX", "SAVEFILE_BYTEORDER_VALUE", "SAVEFILE_MAGIC",
    "XL_MANDATORY_FLAG_ALL", "XL_MANDATORY_FLAG_JSON", "XL_MANDATORY_FLAG_STREAMV2",
    "SaveImageReader", "XlHeader", "parse_xl_header",
]
