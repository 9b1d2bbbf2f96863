"""PV, PVH and HVM guests end to end: discovery, the device model and its
ioreqs, the emulated hardware, unplug."""

from __future__ import annotations

import errno

import pytest
from xmphost import HOST

pytestmark = pytest.mark.timeout(120)


def _guest(name: str, kind: str, kernel: str = "hvmkernels:discovery", **extra: str) -> str:
    more = "".join(f"{k} = {v}\n" for k, v in extra.items())
    return f'[[domain]]\nname = "{name}"\ntype = "{kind}"\nkernel = "{kernel}"\nmemory = 32\n{more}'


@pytest.mark.timeout(90)
def test_pv_and_pvh_discover_what_they_are(hosts):
    """PV finds Xen only through the forced-emulation CPUID and has no HVM
    params; PVH has no such prefix (#UD), finds its hvm_start_info through
    %ebx and its xenstore and console through the HVM params."""
    h = hosts(HOST + _guest("pv1", "pv") + _guest("pvh1", "pvh")).start()
    for name in ("pv1", "pvh1"):
        h.wait(lambda n=name: "discovery done" in h.console_log(n), 30, f"{name} to finish")
    pv, pvh = h.console_log("pv1").splitlines(), h.console_log("pvh1").splitlines()
    assert "detect=PV" in pv and "detect=PVH" in pvh
    # A PV guest's plain CPUID is not intercepted (no Xen leaves); the prefixed one is.
    assert f"cpuid0 eax=0x0 sig={bytes(12).decode()!r}" in pv and "forced sig ok=True" in pv
    assert "cpuid0 eax=0x40000005 sig='XenVMMXenVMM'" in pvh and f"forced errno={errno.EINVAL}" in pvh
    assert "version=4.19" in pv and "version=4.19" in pvh
    assert "leaf4 eax=0x0 domid=0" in pv and "leaf4 eax=0x18 domid=2" in pvh   # VCPU_ID | DOMID_PRESENT
    assert "hvm_start_info=none" in pv and f"hvm_start_info=xmp name=pvh1 ram_pages={32 * 256}" in pvh
    assert f"params errno={errno.EINVAL}" in pv
    assert any(ln.startswith("params store_evtchn=") and ln.endswith("match=True") for ln in pvh)
    assert "xenstore name=pv1" in pv and "xenstore name=pvh1" in pvh
    # No device model: nothing claims a port, so a read sees an open bus.
    assert "port 0x3f8 reads 0xff" in pv and "port 0x3f8 reads 0xff" in pvh
    assert h.wait_exit(30) == 0
    h.assert_clean()
