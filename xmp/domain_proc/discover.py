"""How a domain's kernel finds out where it is, by its boot ABI.

* PV: entered with %rsi = start_info, which says it all.
* PVH: entered with %ebx = hvm_start_info (command line, memory map); the
  xenstore and console rings and ports come from the HVM params
  (HVMOP_get_param), as Linux's ``xen_pvh`` boot reads them.
* HVM: entered with nothing (firmware); CPUID's hypervisor leaves say Xen
  is there and which domain this is, then the same HVM params.

What comes out is the kernel's one record of its special pages and ports
(:class:`StartInfo`'s fields); only PV's is read from a start_info page.
"""

from __future__ import annotations

from typing import Any

from xmp.hv.hvm import (
    HVM_PARAM_CONSOLE_EVTCHN,
    HVM_PARAM_CONSOLE_PFN,
    HVM_PARAM_STORE_EVTCHN,
    HVM_PARAM_STORE_PFN,
    XEN_CPUID_BASE,
    XEN_CPUID_SIGNATURE,
    XEN_HVM_CPUID_DOMID_PRESENT,
)
from xmp.startinfo import GNTTAB_PFN, HvmStartInfo, StartInfo


def discover(xen: Any, ram, boot: dict[str, Any]) -> tuple[StartInfo, HvmStartInfo | None]:
    entry = boot.get("entry") or {}
    if "rsi" in entry:
        return StartInfo.unpack_from(ram, entry["rsi"]), None
    pvh = HvmStartInfo.unpack_from(ram, entry["ebx"]) if "ebx" in entry else None
    sig = xen.call("cpuid", leaf=XEN_CPUID_BASE)
    if tuple(sig[1:]) != XEN_CPUID_SIGNATURE:
        raise RuntimeError("no Xen signature in CPUID: not running on Xen")
    eax, _ebx, ecx, _edx = xen.call("cpuid", leaf=XEN_CPUID_BASE + 4)
    domid = ecx if eax & XEN_HVM_CPUID_DOMID_PRESENT else boot["domid"]

    def param(index: int) -> int:
        return int(xen.call("hvm_op", "get_param", index=index))

    nr_pages = pvh.ram_pages() if pvh is not None else int(xen.call("memory_op", "current_reservation"))
    size = xen.call("grant_table_op", "query_size")
    cfg = boot["config"]
    info = StartInfo(domid=domid, nr_pages=nr_pages,
                     max_pages=int(xen.call("memory_op", "maximum_reservation")), flags=0,
                     store_evtchn=param(HVM_PARAM_STORE_EVTCHN),
                     console_evtchn=param(HVM_PARAM_CONSOLE_EVTCHN),
                     vcpus=int(cfg.get("vcpus", 1)), max_vcpus=int(cfg.get("maxvcpus", cfg.get("vcpus", 1))),
                     nr_grant_frames=int(size["max_nr_frames"]), store_mfn=param(HVM_PARAM_STORE_PFN),
                     console_mfn=param(HVM_PARAM_CONSOLE_PFN), gnttab_pfn=GNTTAB_PFN)
    return info, pvh
