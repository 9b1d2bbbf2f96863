"""vCPUs, the toolstack's half (libxl_set_vcpuonline, libxl_list_vcpu,
libxl_set_vcpuaffinity): ``xmp vcpu-set``, ``vcpu-list`` and ``vcpu-pin``.

vcpu-set writes ``cpu/N/availability`` for every N below maxvcpus, as
libxl's xenstore path does for a PV guest: the guest's hot-plug driver
brings the threads up or down (the highest go first).  vcpu-list and
vcpu-pin go through XEN_DOMCTL_getvcpuinfo / setvcpuaffinity
(:mod:`xmp.hv.vcpu`).  The cpu-list syntax is xl's (``parse_cpurange``):
``all``, ``3``, ``0-2``, ``^1`` (take away), comma-separated, applied left
to right.
"""

from __future__ import annotations

import errno
from typing import Any

from xmp.errors import HypercallError
from xmp.hv.domain import Domain, DomState
from xmp.hv.vcpu import host_cpus, vcpu_info


def parse_cpulist(text: str, ncpus: int) -> list[int]:
    """xl's cpu-list: ``all``, ``N``, ``N-M``, ``^N`` / ``^N-M``, comma-separated."""
    chosen: set[int] = set()
    for raw in text.split(","):
        item = raw.strip()
        neg = item.startswith("^")
        item = item[1:] if neg else item
        if item == "all":
            cpus = set(range(ncpus))
        else:
            lo, _, hi = item.partition("-")
            if not lo.isdigit() or (hi and not hi.isdigit()):
                raise HypercallError(errno.EINVAL, "vcpu-pin", f"invalid cpu range {raw!r} (all, N, N-M, ^N)")
            first, last = int(lo), int(hi or lo)
            if first > last or last >= ncpus:
                raise HypercallError(errno.EINVAL, "vcpu-pin",
                                     f"cpu range {raw!r} is outside this host's cpus 0-{ncpus - 1}")
            cpus = set(range(first, last + 1))
        chosen = chosen - cpus if neg else chosen | cpus
    if not chosen:
        raise HypercallError(errno.EINVAL, "vcpu-pin", f"cpu list {text!r} leaves no cpu")
    return sorted(chosen)


def set_vcpus(ts: Any, dom: Domain, n: int) -> dict[str, Any]:
    """``xmp vcpu-set DOM N``: vCPUs 0..N-1 online, the rest offline."""
    if dom.state == DomState.DYING:
        raise HypercallError(errno.ESRCH, "vcpu-set", f"dom{dom.domid} is dying")
    if not 1 <= n <= dom.cfg.maxvcpus:
        raise HypercallError(errno.EINVAL, "vcpu-set",
                             f"{dom.name} may have 1 to {dom.cfg.maxvcpus} vCPUs (maxvcpus), not {n}")
    for cpu in reversed(range(dom.cfg.maxvcpus)):   # the highest change first, as libxl
        ts.xs.write(f"/local/domain/{dom.domid}/cpu/{cpu}/availability",
                               "online" if cpu < n else "offline", f"vCPU {cpu} of dom{dom.domid}")
    ts.sup.log(f"dom{dom.domid} {dom.name!r}: {n} of {dom.cfg.maxvcpus} vCPUs online")
    return {"domid": dom.domid, "vcpus": n}


def list_vcpus(doms: list[Domain]) -> list[dict[str, Any]]:
    rows = []
    for dom in doms:
        if dom.state == DomState.DYING:
            continue
        for v in range(dom.cfg.maxvcpus):
            rows.append({"name": dom.name, "domid": dom.domid, **vcpu_info(dom, v)})
    return rows


def pin(sup: Any, dom: Domain, vcpu: str, hard: str, soft: str | None) -> list[dict[str, Any]]:
    """``xmp vcpu-pin DOM VCPU|all HARD [SOFT]`` (``-`` leaves one as it is)."""
    ncpus = max(host_cpus()) + 1
    args: dict[str, Any] = {"domid": dom.domid}
    if vcpu != "all":
        if not vcpu.isdigit():
            raise HypercallError(errno.EINVAL, "vcpu-pin", f"invalid vCPU {vcpu!r} (a number or all)")
        args["vcpu"] = int(vcpu)
    if hard != "-":
        args["cpumap"] = parse_cpulist(hard, ncpus)
    if soft is not None and soft != "-":
        args["soft"] = parse_cpulist(soft, ncpus)
    rows, _ = sup.hc_domctl_setvcpuaffinity(sup.domains[0], args)
    return rows
