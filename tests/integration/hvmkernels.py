"""Guest kernels for tests/integration/test_hvm.py (importable by the
domains through PYTHONPATH, which xmphost.Host sets)."""

from __future__ import annotations

from xmp.errors import HypercallError
from xmp.hv.hvm import HVM_PARAM_CONSOLE_EVTCHN, HVM_PARAM_STORE_EVTCHN, XEN_CPUID_BASE


def discovery(kernel) -> None:
    """What discovery found, one fact a line, then power off."""
    k = kernel
    k.print(f"detect={k.detect()}")
    sig = k.cpuid(XEN_CPUID_BASE)
    text = b"".join(r.to_bytes(4, "little") for r in sig[1:]).decode("latin-1")
    k.print(f"cpuid0 eax={sig[0]:#x} sig={text!r}")
    try:
        forced = k.cpuid(XEN_CPUID_BASE, forced=True)
        k.print(f"forced sig ok={forced[1:] == sig[1:] or forced[1] != 0}")
    except HypercallError as exc:
        k.print(f"forced errno={exc.errno}")
    ver = k.cpuid(XEN_CPUID_BASE + 1, forced=k.detect() == "PV")[0]
    k.print(f"version={ver >> 16}.{ver & 0xFFFF}")
    leaf4 = k.cpuid(XEN_CPUID_BASE + 4)
    k.print(f"leaf4 eax={leaf4[0]:#x} domid={leaf4[2]}")
    hsi = k.hvm_start_info
    k.print(f"hvm_start_info={'none' if hsi is None else hsi.cmdline + ' ram_pages=' + str(hsi.ram_pages())}")
    try:
        store = k.xen.call("hvm_op", "get_param", index=HVM_PARAM_STORE_EVTCHN)
        con = k.xen.call("hvm_op", "get_param", index=HVM_PARAM_CONSOLE_EVTCHN)
        k.print(f"params store_evtchn={store} console_evtchn={con} "
                f"match={store == k.start_info.store_evtchn and con == k.start_info.console_evtchn}")
    except HypercallError as exc:
        k.print(f"params errno={exc.errno}")
    k.print(f"xenstore name={k.xenstore.read('name').decode()}")
    k.print(f"port 0x3f8 reads {k.inb(0x3fd):#x}")
    k.print("discovery done")
