"""The domain's memory map and its ``start_info`` page.

As in a Xen PV guest, the domain builder places special pages in the
guest's own RAM and tells the guest where, in ``start_info`` at pfn 0 --
so they travel with the memory on save and migration::

    pfn 0                       start_info
    pfn 1                       console ring (xencons_interface), grant ref 0
    pfn 2                       xenstore ring (xenstore_domain_interface), grant ref 1
    pfn 3 .. 3+max_grant_frames the domain's grant table (v1, 512 entries a frame)
    the rest                    the guest's own pages

``start_info`` mirrors the head of Xen's ``struct start_info``
(xen/include/public/xen.h, x86-64 layout); xmp's extra fields sit at 512.
``shared_info`` (event-channel bitmaps and the vCPUs' upcall records) is
*not* in RAM here: peers must reach its doorbells, and no domain may hold
another's RAM, so it is a separate two-page object (``sharedmem/evtchn``);
its field in start_info holds :data:`SHARED_INFO_SEPARATE`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from xmp.errors import LocalError

START_INFO_PFN = 0
CONSOLE_PFN = 1
XENSTORE_PFN = 2
GNTTAB_PFN = 3
MAGIC = b"xmp-1.0-x86_64"
SHARED_INFO_SEPARATE = 0xFFFFFFFFFFFFFFFF
SIF_PRIVILEGED = 1 << 0
SIF_INITDOMAIN = 1 << 1

_XEN = struct.Struct("<32sQQI4xQI4xQI")   # magic .. console.domU.evtchn
_XMP = struct.Struct("<IIQIIQ")            # domid, vcpus, gnttab_pfn, grant frames, max_vcpus, max_pages
_XMP_OFFSET = 512


def first_free_pfn(max_grant_frames: int) -> int:
    return GNTTAB_PFN + max_grant_frames


@dataclass(frozen=True)
class StartInfo:
    domid: int
    nr_pages: int
    max_pages: int
    flags: int
    store_evtchn: int
    console_evtchn: int
    vcpus: int
    max_vcpus: int
    nr_grant_frames: int
    store_mfn: int = XENSTORE_PFN
    console_mfn: int = CONSOLE_PFN
    gnttab_pfn: int = GNTTAB_PFN

    @property
    def privileged(self) -> bool:
        return bool(self.flags & SIF_PRIVILEGED)

    def pack_into(self, buf, offset: int = 0) -> None:
        _XEN.pack_into(buf, offset, MAGIC, self.nr_pages, SHARED_INFO_SEPARATE, self.flags,
                       self.store_mfn, self.store_evtchn, self.console_mfn, self.console_evtchn)
        _XMP.pack_into(buf, offset + _XMP_OFFSET, self.domid, self.vcpus, self.gnttab_pfn,
                       self.nr_grant_frames, self.max_vcpus, self.max_pages)

    @classmethod
    def unpack_from(cls, buf, offset: int = 0) -> StartInfo:
        magic, nr_pages, _shinfo, flags, store_mfn, store_evtchn, console_mfn, console_evtchn = \
            _XEN.unpack_from(buf, offset)
        if magic.rstrip(b"\0") != MAGIC:
            raise LocalError(f"start_info magic {magic.rstrip(bytes(1))!r} is not {MAGIC!r}")
        domid, vcpus, gnttab_pfn, frames, max_vcpus, max_pages = _XMP.unpack_from(buf, offset + _XMP_OFFSET)
        return cls(domid, nr_pages, max_pages, flags, store_evtchn, console_evtchn, vcpus,
                   max_vcpus, frames, store_mfn, console_mfn, gnttab_pfn)


# -- PVH: struct hvm_start_info (xen/include/public/arch-x86/hvm/start_info.h) --
#
# A PVH guest is entered with %ebx holding the physical address of this
# structure (no start_info: it finds xenstore and the console through the
# HVM params).  The builder puts it in the second half of pfn 0, its memory
# map and command line after it::
#
#     u32 magic 0x336ec578, u32 version, u32 flags, u32 nr_modules,
#     u64 modlist_paddr, u64 cmdline_paddr, u64 rsdp_paddr,
#     u64 memmap_paddr, u32 memmap_entries, u32 reserved      (version 1)
#     memmap entries: u64 addr, u64 size, u32 type, u32 reserved
#
# xmp keeps the PV ``start_info`` at offset 0 of the same page for every
# type: the migration stream reads and rewrites it there (its record of the
# domain's reservation and ports).  A PVH or HVM kernel never reads it.

HVM_START_MAGIC_VALUE = 0x336EC578
HVM_START_INFO_OFFSET = 2048          # in pfn START_INFO_PFN: what the PVH entry's %ebx holds
XEN_HVM_MEMMAP_TYPE_RAM = 1
XEN_HVM_MEMMAP_TYPE_RESERVED = 2
_HVM_START = struct.Struct("<IIIIQQQQII")
_MEMMAP_ENTRY = struct.Struct("<QQII")
MAX_MEMMAP_ENTRIES = 8
_CMDLINE_MAX = 256


@dataclass(frozen=True)
class HvmStartInfo:
    cmdline: str
    memmap: tuple[tuple[int, int, int], ...]   # (addr, size, type)
    version: int = 1
    flags: int = 0

    def ram_pages(self) -> int:
        """The highest pfn of RAM plus one: what the guest may treat as its own."""
        return max((a + s for a, s, t in self.memmap if t == XEN_HVM_MEMMAP_TYPE_RAM), default=0) // 4096

    def pack_into(self, buf, paddr: int) -> None:
        memmap_paddr = paddr + _HVM_START.size
        cmdline_paddr = memmap_paddr + MAX_MEMMAP_ENTRIES * _MEMMAP_ENTRY.size
        if len(self.memmap) > MAX_MEMMAP_ENTRIES:
            raise LocalError(f"at most {MAX_MEMMAP_ENTRIES} memory map entries")
        _HVM_START.pack_into(buf, paddr, HVM_START_MAGIC_VALUE, self.version, self.flags, 0, 0,
                             cmdline_paddr, 0, memmap_paddr, len(self.memmap), 0)
        for i, (addr, size, kind) in enumerate(self.memmap):
            _MEMMAP_ENTRY.pack_into(buf, memmap_paddr + i * _MEMMAP_ENTRY.size, addr, size, kind, 0)
        text = self.cmdline.encode()[:_CMDLINE_MAX - 1]
        buf[cmdline_paddr:cmdline_paddr + len(text) + 1] = text + b"\0"

    @classmethod
    def unpack_from(cls, buf, paddr: int) -> HvmStartInfo:
        """Read it as a PVH kernel does, checking what it follows (the
        addresses are the builder's, but the page is the guest's own)."""
        magic, version, flags, _nmods, _mods, cmdline_paddr, _rsdp, memmap_paddr, entries, _ = \
            _HVM_START.unpack_from(buf, paddr)
        if magic != HVM_START_MAGIC_VALUE:
            raise LocalError(f"hvm_start_info magic {magic:#x} is not {HVM_START_MAGIC_VALUE:#x}")
        if version < 1 or entries > MAX_MEMMAP_ENTRIES or not 0 <= memmap_paddr < len(buf) - 4096:
            raise LocalError(f"hvm_start_info version {version}, {entries} memmap entries: not usable")
        memmap = tuple(_MEMMAP_ENTRY.unpack_from(buf, memmap_paddr + i * _MEMMAP_ENTRY.size)[:3]
                       for i in range(entries))
        raw = bytes(buf[cmdline_paddr:cmdline_paddr + _CMDLINE_MAX]) if 0 < cmdline_paddr < len(buf) else b""
        return cls(raw.split(b"\0", 1)[0].decode(errors="replace"), memmap, version, flags)


def pvh_start_info(name: str, mem_pages: int, reserved_pages: int) -> HvmStartInfo:
    """The builder's hvm_start_info: the special pages reserved, the rest RAM."""
    return HvmStartInfo(cmdline=f"xmp name={name}",
                        memmap=((0, reserved_pages * 4096, XEN_HVM_MEMMAP_TYPE_RESERVED),
                                (reserved_pages * 4096, (mem_pages - reserved_pages) * 4096,
                                 XEN_HVM_MEMMAP_TYPE_RAM)))
