"""vCPUs, the hypervisor's half: VCPUOP_up / down / is_up, EVTCHNOP_bind_vcpu,
XEN_DOMCTL_getvcpuinfo and a per-vCPU XEN_DOMCTL_setvcpuaffinity.

A vCPU is a thread of its domain's process (vCPU 0 the main thread, the
others started by the guest kernel: :mod:`xmp.domain_proc.vcpus`).  A
thread says which it is with VCPUOP_up, naming its Linux thread id; the
supervisor checks the id is a thread of that domain's own process (a
guest cannot have another process pinned or measured), then applies the
vCPU's hard affinity.  What Xen's scheduler reports of a vCPU -- running
or blocked, the pCPU it ran on last, its CPU time -- is read from that
thread in ``/proc/<pid>/task/<tid>/stat``; pinning is the thread's real
``sched_setaffinity``.

Errors are Xen's: a vCPU id past ``maxvcpus`` is ENOENT for VCPUOP_* and
EVTCHNOP_bind_vcpu (``domain_vcpu()`` returns NULL), EINVAL for the
domctls (``vcpuaff->vcpu >= d->max_vcpus``).
"""

from __future__ import annotations

import errno
import os
from typing import Any

from xmp.errors import HypercallError
from xmp.hv.domain import Domain
from xmp.hypercall import arg, int_list
from xmp.sharedmem.evtchn import PER_VCPU_VIRQS, PortState

CLK_TCK = os.sysconf("SC_CLK_TCK")


def host_cpus() -> list[int]:
    return sorted(os.sched_getaffinity(0))


def host_tid(pid: int, tid: int) -> int | None:
    """The host's id of thread ``tid`` of process ``pid`` as that process
    sees it (a jailed guest lives in its own pid namespace: NSpid's last)."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/status") as f:
                nspid = next((ln.split()[1:] for ln in f if ln.startswith("NSpid:")), [task])
        except OSError:
            continue
        if nspid and nspid[-1] == str(tid):
            return int(task)
    return None


def thread_stat(pid: int, tid: int) -> tuple[str, int, float] | None:
    """(state letter, last CPU, user + system seconds) of one thread."""
    try:
        with open(f"/proc/{pid}/task/{tid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    # after the comm: state is field 3 of stat(5), utime 14, stime 15, processor 39
    return fields[0], int(fields[36]), (int(fields[11]) + int(fields[12])) / CLK_TCK


def thread_affinity(tid: int) -> list[int]:
    try:
        return sorted(os.sched_getaffinity(tid))
    except OSError:
        return []


class VcpuOps:
    """Mixed into the supervisor with the other hypercall handlers."""

    def lookup(self, domid: int, op: str) -> Domain:
        raise NotImplementedError

    def set_timer(self, dom: Domain, vcpu: int, deadline_ns: int) -> None: ...

    def log(self, msg: str) -> None: ...

    @staticmethod
    def _vcpu_id(dom: Domain, args: dict, op: str, err: int = errno.ENOENT) -> int:
        vcpu = arg(args, "vcpu", int, op)
        if not 0 <= vcpu < dom.cfg.maxvcpus:
            raise HypercallError(err, op, f"dom{dom.domid} has no vCPU {vcpu} "
                                          f"(maxvcpus = {dom.cfg.maxvcpus}: vCPUs 0..{dom.cfg.maxvcpus - 1})")
        return vcpu

    # -- the guest's --------------------------------------------------------

    def hc_vcpu_op_up(self, caller: Domain, args: dict) -> tuple[Any, list[int]]:
        """VCPUOP_up, from the vCPU's own thread: ``tid`` is its thread id."""
        vcpu = self._vcpu_id(caller, args, "vcpu_up")
        seen = arg(args, "tid", int, "vcpu_up")
        tid = host_tid(caller.pid, seen) if caller.pid is not None else None
        if tid is None:
            raise HypercallError(errno.EINVAL, "vcpu_up", f"thread {seen} is not one of dom{caller.domid}'s")
        st = caller.vcpu_table.get(vcpu)
        if st.tid is not None and st.tid != tid:
            raise HypercallError(errno.EEXIST, "vcpu_up", f"vCPU {vcpu} is up already (thread {st.tid})")
        st.tid = tid
        caller.vcpu_table.started = True
        if st.hard is not None:
            _setaffinity(tid, st.hard, "vcpu_up")
        return 0, []

    def hc_vcpu_op_down(self, caller: Domain, args: dict) -> tuple[Any, list[int]]:
        """VCPUOP_down: the vCPU's thread is ending; its timer is cancelled."""
        vcpu = self._vcpu_id(caller, args, "vcpu_down")
        if vcpu == 0:
            raise HypercallError(errno.EINVAL, "vcpu_down", "vCPU 0 stays up: it is the main thread")
        st = caller.vcpu_table.get(vcpu)
        if st.tid is not None and caller.pid is not None:
            stat = thread_stat(caller.pid, st.tid)
            st.final_time += stat[2] if stat else 0.0
        st.tid = None
        caller.vcpu_table.started = True
        self.set_timer(caller, vcpu, 0)
        return 0, []

    def hc_vcpu_op_is_up(self, caller: Domain, args: dict) -> tuple[Any, list[int]]:
        vcpu = self._vcpu_id(caller, args, "vcpu_is_up")
        return int(caller.vcpu_table.get(vcpu).tid is not None), []

    def hc_event_channel_op_bind_vcpu(self, caller: Domain, args: dict) -> tuple[Any, list[int]]:
        """EVTCHNOP_bind_vcpu: deliver ``port`` to ``vcpu`` from now on.  As
        Xen: interdomain and unbound ports and global VIRQs move; a per-vCPU
        VIRQ and an IPI belong to the vCPU they were bound on (EINVAL)."""
        vcpu = self._vcpu_id(caller, args, "bind_vcpu")
        port = arg(args, "port", int, "bind_vcpu")
        p = caller.ports.get(port, "bind_vcpu")
        movable = p.state in (PortState.INTERDOMAIN, PortState.UNBOUND) or \
            (p.state == PortState.VIRQ and p.virq not in PER_VCPU_VIRQS)
        if not movable:
            raise HypercallError(errno.EINVAL, "bind_vcpu",
                                 f"port {port} ({p.state.name.lower()}) stays on the vCPU it was bound on")
        p.vcpu = vcpu
        caller.evt.set_vcpu(port, vcpu)
        return 0, []

    # -- the toolstack's ----------------------------------------------------

    def hc_domctl_getvcpuinfo(self, caller: Domain, args: dict) -> tuple[Any, list[int]]:
        """XEN_DOMCTL_getvcpuinfo plus both affinities, for every vCPU of the
        domain (``vcpu``: just that one)."""
        dom = self.lookup(arg(args, "domid", int, "getvcpuinfo"), "getvcpuinfo")
        which = [self._vcpu_id(dom, args, "getvcpuinfo", errno.EINVAL)] if "vcpu" in args \
            else list(range(dom.cfg.maxvcpus))
        return [vcpu_info(dom, v) for v in which], []

    def hc_domctl_setvcpuaffinity(self, caller: Domain, args: dict) -> tuple[Any, list[int]]:
        """XEN_DOMCTL_setvcpuaffinity for one vCPU (``vcpu``; without it every
        vCPU): the thread's real affinity; ``soft`` is recorded.  An offline
        vCPU keeps it for when it comes up."""
        dom = self.lookup(arg(args, "domid", int, "setvcpuaffinity"), "setvcpuaffinity")
        which = [self._vcpu_id(dom, args, "setvcpuaffinity", errno.EINVAL)] if "vcpu" in args \
            else list(range(dom.cfg.maxvcpus))
        hard = _cpumap(args, "cpumap")
        soft = _cpumap(args, "soft") if "soft" in args else None
        if hard is None and soft is None:
            raise HypercallError(errno.EINVAL, "setvcpuaffinity", "give a hard or a soft cpumap")
        if hard is not None and not set(hard) & set(host_cpus()):
            raise HypercallError(errno.EINVAL, "setvcpuaffinity",
                                 f"cpus {hard} are none of this host's ({_ranges(host_cpus())})")
        for v in which:
            st = dom.vcpu_table.get(v)
            if hard is not None:
                if st.tid is not None:
                    _setaffinity(st.tid, hard, "setvcpuaffinity")
                st.hard = hard
            if soft is not None:
                st.soft = soft
        shown = [_ranges(m) if m is not None else "-" for m in (hard, soft)]
        self.log(f"dom{dom.domid} {dom.name!r}: vCPU {','.join(map(str, which))} affinity "
                 f"{shown[0]} / {shown[1]}")
        return [vcpu_info(dom, v) for v in which], []


def vcpu_info(dom: Domain, vcpu: int) -> dict[str, Any]:
    st = dom.vcpu_table.get(vcpu)
    stat = thread_stat(dom.pid, st.tid) if dom.pid is not None and st.tid is not None else None
    online = stat is not None
    cpus = host_cpus()
    hard = thread_affinity(st.tid) if online and st.tid is not None else (st.hard or cpus)
    return {"vcpu": vcpu, "online": online, "running": bool(stat and stat[0] == "R"),
            "blocked": bool(stat and stat[0] != "R"), "cpu": stat[1] if stat else -1,
            "cpu_time": round(st.final_time + (stat[2] if stat else 0.0), 3),
            "hard": hard, "soft": st.soft or cpus, "all_cpus": cpus, "tid": st.tid if online else None}


def _cpumap(args: dict, key: str) -> list[int] | None:
    if args.get(key) is None:
        return None
    cpus = sorted(set(int_list(args, key, "setvcpuaffinity", limit=1024)))
    if not cpus or cpus[0] < 0:
        raise HypercallError(errno.EINVAL, "setvcpuaffinity", f"an empty or negative {key}")
    return cpus


def _setaffinity(tid: int, cpus: list[int], op: str) -> None:
    try:
        os.sched_setaffinity(tid, cpus)
    except OSError as exc:
        raise HypercallError(exc.errno or errno.EINVAL, op, f"thread {tid}: {exc.strerror}") from None


def _ranges(cpus: list[int] | None) -> str:
    """xl's cpumap text: ``0-3,6``."""
    if not cpus:
        return "none"
    out, start, prev = [], cpus[0], cpus[0]
    for c in cpus[1:] + [-2]:
        if c != prev + 1:
            out.append(str(start) if start == prev else f"{start}-{prev}")
            start = c
        prev = c
    return ",".join(out)
