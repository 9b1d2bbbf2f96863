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
