"""A domain's save image: what ``xmp save`` writes and ``xmp restore``
reads, laid out with the stream layers of :mod:`xmp.migration.stream`.
Pure: RAM and records in, byte chunks out; byte chunks in, a checked
:class:`DomainImage` out.  The toolstack (``xmp.toolstack.save``) does the
I/O.

What goes where::

    xl header            the domain's record as JSON (config + devices, hot-plugged
                         ones included: DomainRecord.save(); and its uuid), the JSON flag set
    libxl header, LIBXC_CONTEXT, then the libxc stream:
      image + domain header   x86 PV (xmp's memory map is PV's: start_info at pfn 0)
      X86_PV_INFO (64-bit, 4 levels), STATIC_DATA_END, X86_PV_P2M_FRAMES
      PAGE_DATA …             every populated pfn, 1024 a record; a page of zeros is
                              XALLOC ("allocate, no data"): the restoring side's fresh
                              page is zero, as a page Xen hands out is scrubbed
      X86_TSC_INFO, SHARED_INFO (the restored guest re-binds its ports: zeros),
      X86_PV_VCPU_BASIC per online vCPU (a zeroed vcpu_guest_context, VGCF_online)
      XMP_GUEST_CONTEXT       optional: the guest kernel's suspend context
      END
    libxl END

As for a Xen PV guest, no HVM_PARAMS: the store and console pfns and ports
are in start_info (pfn 0), which the restoring side reads and rewrites with
the ports of the new domain.  Xen's tools skip the optional record.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Generator, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn

from xmp.errors import XmpError
from xmp.startinfo import CONSOLE_PFN, GNTTAB_PFN, START_INFO_PFN, XENSTORE_PFN, StartInfo
from xmp.topology import DomainConfig

from .stream import LibxcWriter, LibxlWriter, SaveImageReader, StreamError, XlHeader
from .stream.libxc import (
    MAX_BATCH_SIZE,
    DomainType,
    End,
    PageData,
    PageType,
    RecType,
    SharedInfo,
    StaticDataEnd,
    X86PvInfo,
    X86PvP2mFrames,
    X86PvVcpu,
    X86TscInfo,
    XmpGuestContext,
)
from .stream.libxl import LibxlEnd

PAGE_SIZE = 4096
ZERO_PAGE = bytes(PAGE_SIZE)
# sizeof(struct vcpu_guest_context) for a 64-bit PV guest, which Xen's
# restore checks X86_PV_VCPU_BASIC against; flags (its first u64) VGCF_online.
VCPU_CONTEXT_SIZE = 5168
VGCF_ONLINE = 1 << 5
MIB = 1 << 20

Progress = Callable[[int, int], None]   # (pages written or read, of how many)


@dataclass
class DomainImage:
    """A save image, read back and checked."""

    record: dict[str, Any]          # DomainRecord.save(): config and devices
    config: DomainConfig
    pages: dict[int, bytes | None] = field(default_factory=dict)  # pfn -> contents (None: zeros)
    start_info: StartInfo | None = None
    context: bytes = b""            # the guest kernel's suspend context
    size: int = 0                   # octets of the image

    @property
    def tot_pages(self) -> int:
        return len(self.pages)


def _vcpu_context() -> bytes:
    return VGCF_ONLINE.to_bytes(8, "little") + bytes(VCPU_CONTEXT_SIZE - 8)


def encode_image(record: dict[str, Any], ram: memoryview, pfns: Sequence[int], context: bytes,
                 vcpus: int, zero: Callable[[int], bool] | None = None,
                 progress: Progress | None = None) -> Generator[bytes, None, None]:
    """The image of a suspended domain, in chunks of at most one PAGE_DATA
    record.  ``pfns``: the populated pages, ascending; ``zero(pfn)`` may say
    a page is known to be zero without reading it (a hole in the RAM object)."""
    enc = ImageEncoder(record, len(ram) // PAGE_SIZE - 1)
    yield enc.head()
    yield from enc.pages(ram, pfns, zero, progress)
    yield enc.tail(context, vcpus)


class ImageEncoder:
    """The image in three parts, for a live migration's stream: the head,
    then any number of page batches (a pre-copy round each: a page sent
    again overrides the earlier copy, as Xen's restore writes each
    PAGE_DATA where it says), then the tail with the guest's context.
    ``gone``: pfns sent earlier that are no longer populated (ballooned out
    meanwhile), sent as XTAB so the restoring side drops them."""

    def __init__(self, record: dict[str, Any], max_pfn: int):
        self.record, self.max_pfn = record, max_pfn
        self.xc, self.xl = LibxcWriter(DomainType.X86_PV), LibxlWriter()

    def head(self) -> bytes:
        xc, xl, max_pfn = self.xc, self.xl, self.max_pfn
        return (XlHeader(json.dumps(self.record, sort_keys=True), config_is_json=True).encode()
                + xl.header() + xl.libxc_context() + xc.header()
                + xc.record(X86PvInfo(8, 4)) + xc.record(StaticDataEnd())
                + xc.record(X86PvP2mFrames(0, max_pfn, (0,) * (max_pfn // (PAGE_SIZE // 8) + 1))))

    def pages(self, ram: memoryview, pfns: Sequence[int], zero: Callable[[int], bool] | None = None,
              progress: Progress | None = None) -> Generator[bytes, None, None]:
        """PAGE_DATA records of ``pfns`` (ascending), 1024 pages a record."""
        xc = self.xc
        done = 0
        for i in range(0, len(pfns), MAX_BATCH_SIZE):
            batch = pfns[i:i + MAX_BATCH_SIZE]
            types: list[int] = []
            pages: list[bytes] = []
            for pfn in batch:
                if zero is not None and zero(pfn):
                    types.append(PageType.XALLOC)
                    continue
                # a copy, then memcmp: comparing a memoryview to bytes goes element by element
                page = bytes(ram[pfn * PAGE_SIZE:(pfn + 1) * PAGE_SIZE])
                if page == ZERO_PAGE:
                    types.append(PageType.XALLOC)
                else:
                    types.append(PageType.NOTAB)
                    pages.append(page)
            yield xc.record(PageData(tuple(batch), tuple(types), tuple(pages)))
            done += len(batch)
            if progress is not None:
                progress(done, len(pfns))

    def tail(self, context: bytes, vcpus: int, gone: Sequence[int] = ()) -> bytes:
        xc = self.xc
        out = [xc.record(PageData(tuple(gone[i:i + MAX_BATCH_SIZE]),
                                  (PageType.XTAB,) * len(gone[i:i + MAX_BATCH_SIZE]), ()))
               for i in range(0, len(gone), MAX_BATCH_SIZE)]
        out += [xc.record(X86TscInfo()), xc.record(SharedInfo(ZERO_PAGE))]
        out += [xc.record(X86PvVcpu(RecType.X86_PV_VCPU_BASIC, v, _vcpu_context())) for v in range(vcpus)]
        out += [xc.record(XmpGuestContext(context)), xc.record(End()), self.xl.record(LibxlEnd())]
        return b"".join(out)


class ImageDecoder:
    """Reads an image fed in any chunking and checks it, as fresh input from
    a stranger: every fault is one :class:`StreamError` naming the offset
    and the record.  :meth:`close` at EOF gives the :class:`DomainImage`."""

    def __init__(self, progress: Progress | None = None):
        self.reader = SaveImageReader()
        self.progress = progress
        self.image: DomainImage | None = None
        self.context: bytes | None = None
        self.offset = 0
        self._start_info_at = 0

    @staticmethod
    def _fail(at: int, what: str, msg: str) -> NoReturn:
        raise StreamError(at, what, msg)

    def feed(self, chunk: bytes) -> None:
        self.reader.feed(chunk)
        self._take()

    def close(self) -> DomainImage:
        self.reader.close()
        self._take()
        assert self.image is not None and self.context is not None
        self.image.context = self.context
        self.image.size = self.offset
        return self.image

    def _take(self) -> None:
        while True:
            at = self.offset
            event = self.reader.next_event()
            if event is None:
                return
            self.offset = self.reader.offset
            image = self.image
            if isinstance(event, XlHeader):
                self.image = image = _header(event, self._fail)
                self.reader.limit(image.config.maxmem_mib * MIB // PAGE_SIZE - 1, image.config.maxvcpus)
            elif isinstance(event, PageData):
                assert image is not None
                self._pages(image, event, at)
            elif isinstance(event, XmpGuestContext):
                if self.context is not None:
                    self._fail(at, "XMP_GUEST_CONTEXT", "a second guest context")
                self.context = event.context
            elif isinstance(event, End) and image is not None:
                if self.context is None:
                    self._fail(at, "END", "no XMP_GUEST_CONTEXT before END: not an image of a domain "
                                          "xmp can resume")
                image.start_info = _start_info(image, self._start_info_at, self._fail)

    def _pages(self, image: DomainImage, rec: PageData, at: int) -> None:
        if START_INFO_PFN in rec.pfns:
            self._start_info_at = at
        if len(rec.pages) == len(rec.pfns):   # every page with data (xmp's own batches of touched pages)
            image.pages.update(zip(rec.pfns, rec.pages, strict=True))
            self._progress(image)
            return
        k = 0
        for pfn, ptype in zip(rec.pfns, rec.types, strict=True):
            if ptype in (PageType.XTAB, PageType.BROKEN):
                image.pages.pop(pfn, None)
                continue
            if ptype == PageType.XALLOC:
                image.pages[pfn] = None
                continue
            image.pages[pfn] = rec.pages[k]   # a zero page sent with its data is written as sent
            k += 1
        self._progress(image)

    def _progress(self, image: DomainImage) -> None:
        if self.progress is not None:
            self.progress(len(image.pages), image.config.memory_mib * MIB // PAGE_SIZE)


def decode_image(chunks: Iterable[bytes], progress: Progress | None = None) -> DomainImage:
    """:class:`ImageDecoder` over ``chunks``, in one go."""
    dec = ImageDecoder(progress)
    for chunk in chunks:
        dec.feed(chunk)
    return dec.close()


def _header(hdr: XlHeader, fail: Callable[[int, str, str], NoReturn]) -> DomainImage:
    if hdr.config is None or not hdr.config_is_json:
        fail(0, "xl header", "the image carries no JSON domain configuration")
    try:
        record = json.loads(hdr.config)
        if not isinstance(record, dict) or not isinstance(record.get("devices"), list):
            raise ValueError("not a domain record (config and devices)")
        cfg = DomainConfig.from_dict(record["config"], "<saved domain>")
    except (ValueError, KeyError, XmpError) as exc:
        fail(0, "xl header", f"the domain configuration is not valid: {exc}")
    return DomainImage(record, cfg)


def _start_info(image: DomainImage, at: int, fail: Callable[[int, str, str], NoReturn]) -> StartInfo:
    """start_info from the image: where the console and xenstore pages are
    (xmp's fixed pfns) and the size the domain was; the ports are the old
    host's, rewritten on restore."""
    page = image.pages.get(START_INFO_PFN)
    if page is None:
        fail(at, "PAGE_DATA", "the image holds no start_info page (pfn 0)")
    try:
        si = StartInfo.unpack_from(page)
    except XmpError as exc:
        fail(at, "PAGE_DATA", f"pfn 0 is not a start_info page: {exc}")
    cfg = image.config
    if (si.console_mfn, si.store_mfn, si.gnttab_pfn) != (CONSOLE_PFN, XENSTORE_PFN, GNTTAB_PFN) \
            or si.max_pages != cfg.maxmem_mib * MIB // PAGE_SIZE \
            or si.nr_grant_frames != cfg.max_grant_frames:
        fail(at, "PAGE_DATA", "start_info (pfn 0) does not match the domain's configuration")
    return si


__all__ = ["PAGE_SIZE", "DomainImage", "ImageDecoder", "ImageEncoder", "decode_image", "encode_image"]
