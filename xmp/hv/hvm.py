"""HVM in the hypervisor: ``hvm_op`` (params), ``dm_op`` (the ioreq server
a device model runs for its guest), the CPUID leaves a guest discovers Xen
by, and the target privilege.

Target privilege, as XEN_DOMCTL_set_target and XSM's ``dm`` rights give
QEMU in a stub domain: a domain whose ``target`` is T may use ``dm_op`` and
``hvm_op`` on T -- and on no other domain (EPERM).  dom0 may act on any.

The ioreq server of a guest is one shared object of three pages: the
shared iopage (one ``ioreq_t`` slot per vCPU), the buffered iopage, and
xmp's range page -- the I/O ranges the device model claims and which of
them take buffered writes, published for the guest's trap path (in Xen the
trap runs in the hypervisor, which keeps this table to itself; here the
trap code runs in the guest's process, so a guest that rewrites the table
only misroutes its own accesses).  Creating the server allocates, in the
guest, one unbound port per vCPU and one for the buffered page, each
offered to the device model, which binds them (``vp_eport``).
"""

from __future__ import annotations

import errno
import os
import signal
import struct
from dataclasses import dataclass, field
from typing import Any

from xmp.domid import DOMID_DOM0, DOMID_SELF
from xmp.errors import HypercallError
from xmp.hv.domain import Domain, DomState
from xmp.hvm.ioreq import IOREQ_SIZE
from xmp.hypercall import arg
from xmp.sharedmem.shm import PAGE_SIZE, ShmNamespace, ShmObject
from xmp.startinfo import CONSOLE_PFN, XENSTORE_PFN

Reply = tuple[Any, list[int]]

# xen/include/public/hvm/params.h
HVM_PARAM_CALLBACK_IRQ = 0
HVM_PARAM_STORE_PFN = 1
HVM_PARAM_STORE_EVTCHN = 2
HVM_PARAM_IOREQ_PFN = 5
HVM_PARAM_BUFIOREQ_PFN = 6
HVM_PARAM_DM_DOMAIN = 13
HVM_PARAM_CONSOLE_PFN = 17
HVM_PARAM_CONSOLE_EVTCHN = 18
HVM_PARAM_BUFIOREQ_EVTCHN = 26
HVM_NR_PARAMS = 39

# CPUID: the hypervisor leaves (xen/include/public/arch-x86/cpuid.h)
XEN_VERSION_MAJOR, XEN_VERSION_MINOR = 4, 19   # xen_version's (xmp.hv.hypercalls.XEN_VERSION)
XEN_CPUID_BASE = 0x40000000
XEN_CPUID_SIGNATURE = (0x566E6558, 0x65584D4D, 0x4D4D566E)   # "XenVMMXenVMM" in ebx, ecx, edx
XEN_CPUID_MAX_LEAF = XEN_CPUID_BASE + 5
XEN_CPUID_FEAT1_MMU_PT_UPDATE_PRESERVE_AD = 1 << 0   # leaf 2 ecx: PV's
XEN_HVM_CPUID_VCPU_ID_PRESENT = 1 << 3                # leaf 4 eax: HVM's
XEN_HVM_CPUID_DOMID_PRESENT = 1 << 4

# XEN_DMOP_IO_RANGE_*
XEN_DMOP_IO_RANGE_PORT = 0
XEN_DMOP_IO_RANGE_MEMORY = 1
IOREQ_PAGES = 3
RANGE_PAGE = 2
MAX_RANGES = 200
_RANGE = struct.Struct("<IIQQ")  # type, flags (1: buffered writes), start, end (inclusive)
RANGE_BUFFERED = 1


@dataclass
class IoreqServer:
    """One guest's ioreq server (Xen's allows several; a guest here has one)."""
    dm: int
    obj: ShmObject
    page: Any
    ports: list[int]
    bufioreq_port: int
    ranges: list[tuple[int, int, int, int]] = field(default_factory=list)
    enabled: bool = False

    def publish_ranges(self) -> None:
        base = RANGE_PAGE * PAGE_SIZE
        struct.pack_into("<I", self.page, base, len(self.ranges))
        for i, r in enumerate(self.ranges):
            _RANGE.pack_into(self.page, base + 8 + i * _RANGE.size, *r)

    def close(self) -> None:
        self.page.close()
        self.obj.close()


def read_ranges(page) -> list[tuple[int, int, int, int]]:
    """The range page as the guest's trap path reads it (bounded: a
    scribbled count cannot make it read past the page)."""
    base = RANGE_PAGE * PAGE_SIZE
    n = min(struct.unpack_from("<I", page, base)[0], MAX_RANGES)
    return [_RANGE.unpack_from(page, base + 8 + i * _RANGE.size) for i in range(n)]


@dataclass
class HvmState:
    server: IoreqServer | None = None
    awaiting_dm: bool = False   # built paused until its device model enables its server

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None


def cpuid_leaf(dom: Domain, leaf: int, subleaf: int, vcpu: int = 0) -> tuple[int, int, int, int]:
    """What ``cpuid`` returns this domain for a hypervisor leaf."""
    hvm = dom.cfg.type != "pv"
    if leaf == XEN_CPUID_BASE:
        return (XEN_CPUID_MAX_LEAF, *XEN_CPUID_SIGNATURE)
    if leaf == XEN_CPUID_BASE + 1:
        return (XEN_VERSION_MAJOR << 16 | XEN_VERSION_MINOR, 0, 0, 0)
    if leaf == XEN_CPUID_BASE + 2:   # hypercall pages, the MSR that installs them, features
        return (1, XEN_CPUID_BASE, 0 if hvm else XEN_CPUID_FEAT1_MMU_PT_UPDATE_PRESERVE_AD, 0)
    if leaf == XEN_CPUID_BASE + 4 and hvm:
        return (XEN_HVM_CPUID_VCPU_ID_PRESENT | XEN_HVM_CPUID_DOMID_PRESENT, vcpu, dom.domid, 0)
    return (0, 0, 0, 0)


class HvmOps:
    """Mixed into the hypercall handlers."""

    domains: dict[int, Domain]
    ns: ShmNamespace

    def lookup(self, domid: int, op: str) -> Domain:
        raise NotImplementedError
    def log(self, msg: str) -> None: ...
    def unpause_domain(self, dom: Domain) -> None: ...
    def console_line(self, dom: Domain, text: str, serial: bool = False) -> None: ...

    def _dm_target(self, caller: Domain, args: dict, op: str) -> Domain:
        """The guest ``domid`` names, if the caller may act on it: itself,
        the guest it is the device model of, or any (dom0)."""
        domid = arg(args, "domid", int, op, DOMID_SELF)
        if domid in (DOMID_SELF, caller.domid):
            return caller
        if caller.domid != DOMID_DOM0 and caller.target != domid:
            raise HypercallError(errno.EPERM, op,
                                 f"dom{caller.domid} has no device-model rights over dom{domid}")
        return self.lookup(domid, op)

    @staticmethod
    def _hvm_state(dom: Domain, op: str) -> HvmState:
        if dom.cfg.type != "hvm" or not isinstance(dom.hvm, HvmState):
            raise HypercallError(errno.EINVAL, op, f"dom{dom.domid} is not an HVM guest")
        return dom.hvm

    # -- hvm_op -------------------------------------------------------------

    def hc_hvm_op_get_param(self, caller: Domain, args: dict) -> Reply:
        op = "hvm_op/get_param"
        dom = self._dm_target(caller, args, op)
        index = arg(args, "index", int, op)
        if dom.cfg.type == "pv":
            raise HypercallError(errno.EINVAL, op, f"dom{dom.domid} is PV: it has no HVM params")
        if not 0 <= index < HVM_NR_PARAMS:
            raise HypercallError(errno.EINVAL, op, f"index {index}")
        server = dom.hvm.server if isinstance(dom.hvm, HvmState) else None
        value = {HVM_PARAM_STORE_PFN: XENSTORE_PFN, HVM_PARAM_STORE_EVTCHN: dom.store_port,
                 HVM_PARAM_CONSOLE_PFN: CONSOLE_PFN, HVM_PARAM_CONSOLE_EVTCHN: dom.console_port,
                 HVM_PARAM_DM_DOMAIN: server.dm if server else 0,
                 HVM_PARAM_BUFIOREQ_EVTCHN: server.bufioreq_port if server else 0}.get(index, 0)
        return value, []

    def hc_hvm_op_ioreq_page(self, caller: Domain, args: dict) -> Reply:
        """xmp's: the guest's own trap path maps its ioreq server's pages
        (what Xen's vCPU exit code reaches inside the hypervisor)."""
        st = self._hvm_state(caller, "hvm_op/ioreq_page")
        if st.server is None:
            raise HypercallError(errno.ENOENT, "hvm_op/ioreq_page", "no ioreq server: no device model")
        return {"vcpus": len(st.server.ports), "bufioreq_port": st.server.bufioreq_port}, [st.server.obj.fd]

    # -- cpuid: the instruction's trap (not a hypercall) ----------------------

    def hc_cpuid_(self, caller: Domain, args: dict) -> Reply:
        """``forced``: the PV forced-emulation prefix (ud2a; .ascii "xen";
        cpuid), which only a PV guest has; an HVM guest gets #UD (EINVAL).
        A plain cpuid of a PV guest is not intercepted: no Xen leaves."""
        leaf, sub = arg(args, "leaf", int, "cpuid"), arg(args, "subleaf", int, "cpuid", 0)
        forced = bool(arg(args, "forced", bool, "cpuid", False))
        pv = caller.cfg.type == "pv"
        if forced and not pv:
            raise HypercallError(errno.EINVAL, "cpuid", "#UD: the forced-emulation prefix is PV's")
        if pv and not forced:
            return [0, 0, 0, 0], []
        return list(cpuid_leaf(caller, leaf, sub, arg(args, "vcpu", int, "cpuid", 0))), []

    # -- dm_op --------------------------------------------------------------

    def hc_dm_op_create_ioreq_server(self, caller: Domain, args: dict) -> Reply:
        """XEN_DMOP_create_ioreq_server + acquire_resource of its pages: the
        caller (the guest's device model) gets the pages' descriptor and the
        guest's per-vCPU ports to bind."""
        op = "dm_op/create_ioreq_server"
        guest = self._dm_target(caller, args, op)
        st = self._hvm_state(guest, op)
        if st.server is not None:
            raise HypercallError(errno.EEXIST, op, f"dom{guest.domid} has an ioreq server")
        n = guest.cfg.maxvcpus
        obj = ShmObject.create(self.ns, f"ioreq{guest.domid}", IOREQ_PAGES * PAGE_SIZE)
        try:
            page = obj.map()
            ports = [guest.ports.alloc_unbound(caller.domid) for _ in range(n)]
            buf_port = guest.ports.alloc_unbound(caller.domid)
        except BaseException:
            obj.close()
            raise
        for vcpu, port in enumerate(ports):
            struct.pack_into("<I", page, vcpu * IOREQ_SIZE + 24, port)   # vp_eport
        st.server = IoreqServer(caller.domid, obj, page, ports, buf_port)
        self.log(f"dom{caller.domid}: ioreq server for dom{guest.domid} ({n} vcpu)")
        return {"id": 0, "ports": ports, "bufioreq_port": buf_port}, [obj.fd]

    def _server(self, caller: Domain, args: dict, op: str) -> tuple[Domain, IoreqServer]:
        guest = self._dm_target(caller, args, op)
        st = self._hvm_state(guest, op)
        if st.server is None or arg(args, "id", int, op, 0) != 0:
            raise HypercallError(errno.ENOENT, op, f"no such ioreq server of dom{guest.domid}")
        return guest, st.server

    def hc_dm_op_map_io_range_to_ioreq_server(self, caller: Domain, args: dict) -> Reply:
        op = "dm_op/map_io_range_to_ioreq_server"
        _guest, server = self._server(caller, args, op)
        kind, start, end = arg(args, "type", int, op), arg(args, "start", int, op), arg(args, "end", int, op)
        flags = RANGE_BUFFERED if arg(args, "buffered", bool, op, False) else 0
        if kind not in (XEN_DMOP_IO_RANGE_PORT, XEN_DMOP_IO_RANGE_MEMORY) or not 0 <= start <= end \
                or (kind == XEN_DMOP_IO_RANGE_PORT and end > 0xFFFF) or end >= 1 << 64:
            raise HypercallError(errno.EINVAL, op, f"range type {kind} {start:#x}-{end:#x}")
        if any(k == kind and s <= end and start <= e for k, _f, s, e in server.ranges):
            raise HypercallError(errno.EEXIST, op, f"{start:#x}-{end:#x} overlaps a mapped range")
        if len(server.ranges) >= MAX_RANGES:
            raise HypercallError(errno.ENOSPC, op, f"at most {MAX_RANGES} ranges")
        server.ranges.append((kind, flags, start, end))
        server.publish_ranges()
        return 0, []

    def hc_dm_op_set_ioreq_server_state(self, caller: Domain, args: dict) -> Reply:
        op = "dm_op/set_ioreq_server_state"
        guest, server = self._server(caller, args, op)
        server.enabled = bool(arg(args, "enabled", bool, op))
        st = guest.hvm
        if server.enabled and isinstance(st, HvmState) and st.awaiting_dm:
            st.awaiting_dm = False   # libxl starts the guest once its device model runs
            if guest.state == DomState.PAUSED:
                self.unpause_domain(guest)
        return 0, []

    def hc_dm_op_serial_output(self, caller: Domain, args: dict) -> Reply:
        """xmp's stand-in for QEMU's serial pty, which xenconsoled logs as the
        guest's console: the emulated UART's lines go to the guest's log."""
        op = "dm_op/serial_output"
        guest = self._dm_target(caller, args, op)
        self._hvm_state(guest, op)
        text = arg(args, "data", str, op)[:4096]
        self.console_line(guest, text, serial=True)
        return len(text), []

    # -- lifecycle ------------------------------------------------------------

    def hvm_destroyed(self, dom: Domain) -> None:
        """``dom`` is being destroyed.  A device model's guest cannot go on
        (it would wait for its next ioreq forever): it crashes, and on_crash
        applies.  A guest's device model has nothing left to serve."""
        if dom.target is not None:
            guest = self.domains.get(dom.target)
            if guest is not None and guest.state != DomState.DYING and guest.pid is not None:
                self.log(f"dom{guest.domid} {guest.name!r}: its device model dom{dom.domid} is gone: "
                         "crashing")
                try:
                    os.kill(guest.pid, signal.SIGKILL)   # its channel's EOF is the crash
                except ProcessLookupError:
                    pass
        if isinstance(dom.hvm, HvmState) and dom.hvm.server is not None:
            dm = self.domains.get(dom.hvm.server.dm)
            if dm is not None and dm.target == dom.domid and dm.state != DomState.DYING:
                self.destroy_domain(dm, f"destroyed (its guest dom{dom.domid} is gone)")

    def destroy_domain(self, dom: Domain, reason: str = "destroyed") -> None: ...

