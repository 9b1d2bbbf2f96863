"""The supervisor's record of one domain, and the domain builder.

Everything a domain holds is here, so that destroying it can give every
piece back: its RAM, its private event object and wake page, the doorbells
its peers ring it through, its ports, the grants it has mapped
from others (maptrack), the descriptors of other domains it was handed,
its reservation from the host pool.
"""

from __future__ import annotations

import enum
import mmap
import os
import socket
import time
from dataclasses import dataclass, field

import psutil

from xmp.domid import DOMID_DOM0
from xmp.errors import RemoteProtocolError
from xmp.hypercall import SHUTDOWN_REASONS
from xmp.sharedmem.bytering import ByteRing, console_rings
from xmp.sharedmem.evtchn import (
    EVTCHN_OBJECT_SIZE,
    EVTCHN_WAKE_SIZE,
    EventChannels,
    PortTable,
)
from xmp.sharedmem.grant import (
    GNTTAB_RESERVED_CONSOLE,
    GNTTAB_RESERVED_XENSTORE,
    ActiveGrants,
    GrantTable,
)
from xmp.sharedmem.logdirty import Tracker
from xmp.sharedmem.shm import PAGE_SIZE, ShmNamespace, ShmObject
from xmp.sharedmem.wakepage import create_wake_page
from xmp.startinfo import (
    CONSOLE_PFN,
    GNTTAB_PFN,
    HVM_START_INFO_OFFSET,
    SIF_INITDOMAIN,
    SIF_PRIVILEGED,
    START_INFO_PFN,
    XENSTORE_PFN,
    StartInfo,
    first_free_pfn,
    pvh_start_info,
)
from xmp.topology import DomainConfig

MIB = 1 << 20


class DomState(enum.Enum):
    RUNNING = "running"
    PAUSED = "paused"
    SHUTDOWN = "shutdown"   # reason in Domain.shutdown_reason; "crash" for a crash
    DYING = "dying"


@dataclass
class Mapping:
    granter: int
    refs: list[int]
    readonly: bool
    frames: list[int] = field(default_factory=list)  # the granter's pfns as mapped (log-dirty marks them)


@dataclass
class VcpuState:
    """The supervisor's record of one vCPU."""

    tid: int | None = None          # its thread while it is up
    hard: list[int] | None = None   # vcpu-pin's hard affinity (None: all pCPUs)
    soft: list[int] | None = None   # soft affinity: recorded and shown, as Xen's credit1 prefers it
    final_time: float = 0.0         # CPU time of its threads that went down


@dataclass
class VcpuTable:
    """A domain's vCPUs as the supervisor knows them (xmp.hv.vcpu)."""

    vcpus: dict[int, VcpuState] = field(default_factory=dict)
    started: bool = False   # the guest has brought a vCPU up or down: count what it did

    def get(self, vcpu: int) -> VcpuState:
        return self.vcpus.setdefault(vcpu, VcpuState())

    def online(self) -> list[int]:
        return sorted(v for v, s in self.vcpus.items() if s.tid is not None)


@dataclass
class Domain:
    domid: int
    cfg: DomainConfig
    name: str
    ram: ShmObject
    ram_map: mmap.mmap
    evt_obj: ShmObject
    evt: EventChannels
    ports: PortTable
    grants: ActiveGrants
    own_table: GrantTable
    console_port: int
    store_port: int
    sock: socket.socket | None = None
    pid: int | None = None
    state: DomState = DomState.RUNNING
    shutdown_reason: str | None = None
    suspend_context: bytes = b""     # the guest kernel's, from its last suspend (save carries it)
    tot_pages: int = 0
    max_pages: int = 0
    populated: bytearray = field(default_factory=bytearray)
    nr_grant_frames: int = 1
    maptrack: dict[int, Mapping] = field(default_factory=dict)
    next_handle: int = 1
    created: float = field(default_factory=time.monotonic)
    cpu_time_final: float = 0.0
    dying_since: float = 0.0
    seen_dying: bool = False  # dom0 fetched a domain list that showed it dying
    exit: str | None = None  # how its process ended, once the zygote said ("exited with status 1")
    uuid: str = ""
    console_out: ByteRing | None = None
    views: list[memoryview] = field(default_factory=list)
    wake_fd: int = -1                # its wake page (a memfd the domain seals at boot)
    wake_map: mmap.mmap | None = None
    wake_ro_fd: int = -1             # what senders get: read-only, once sealed
    # sender domid -> the doorbell that sender rings this domain through
    doorbells: dict[int, ShmObject] = field(default_factory=dict)
    logdirty: Tracker | None = None  # XEN_DOMCTL_SHADOW_OP_ENABLE_LOGDIRTY's, while enabled
    vcpu_table: VcpuTable = field(default_factory=VcpuTable)
    target: int | None = None        # XEN_DOMCTL_set_target: the one guest this (device model) serves
    hvm: object | None = None        # an HVM guest's ioreq server and emulation state (xmp.hv.hvm)

    @property
    def privileged(self) -> bool:
        return self.domid == DOMID_DOM0

    def console_undrained(self) -> bool:
        """Output the guest wrote that xenconsoled has not read yet."""
        try:
            return self.console_out is not None and self.console_out.available() > 0
        except RemoteProtocolError:  # indices it scribbled: nothing worth waiting for
            return False

    @property
    def reserved_pfns(self) -> int:
        """start_info, console, xenstore and grant-table pages: never ballooned."""
        return first_free_pfn(self.cfg.max_grant_frames)

    def state_letters(self, running: bool) -> str:
        """xl's six state characters: r b p s <reason> d.  dom0 is the
        domain the toolstack runs in, so -- as under xl -- it is running
        whenever it is asked."""
        s = ["-"] * 6
        running = running or self.domid == DOMID_DOM0
        if self.state == DomState.RUNNING:
            s[0 if running else 1] = "r" if running else "b"
        elif self.state == DomState.PAUSED:
            s[2] = "p"
        elif self.state == DomState.SHUTDOWN:
            s[3] = "s"
            code = SHUTDOWN_REASONS.get(self.shutdown_reason or "", 0)
            s[4] = "-rscwS"[code]
        elif self.state == DomState.DYING:
            s[5] = "d"
        return "".join(s)

    def release(self) -> None:
        """Drop the supervisor's hold on every object of this domain."""
        if self.hvm is not None:
            self.hvm.close()  # type: ignore[attr-defined]
            self.hvm = None
        if self.logdirty is not None:  # it holds a view of the RAM
            self.logdirty.close()
            self.logdirty = None
        for thing in (self.grants, self.own_table, self.evt, self.console_out):
            if thing is not None:
                thing.release()
        for view in self.views:
            view.release()
        for obj in self.doorbells.values():
            obj.close()
        self.doorbells.clear()
        self.evt_obj.close()
        if self.wake_map is not None:
            self.wake_map.close()
            self.wake_map = None
        for fd in (self.wake_fd, self.wake_ro_fd):
            if fd >= 0:
                os.close(fd)
        self.wake_fd = self.wake_ro_fd = -1
        self.ram.close()
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def entry_registers(kind: str) -> dict[str, int]:
    """The registers a domain is entered with, by its type's boot ABI:
    PV's %rsi = start_info, PVH's %ebx = hvm_start_info, HVM none (it
    starts in firmware and finds Xen by CPUID)."""
    if kind == "pv":
        return {"rsi": START_INFO_PFN * PAGE_SIZE}
    if kind == "pvh":
        return {"ebx": START_INFO_PFN * PAGE_SIZE + HVM_START_INFO_OFFSET}
    return {}


def build_domain(ns: ShmNamespace, domid: int, cfg: DomainConfig, name: str | None = None) -> Domain:
    """Allocate a domain's memory and event object and lay out its special
    pages, as Xen's domain builder does.  No process yet."""
    max_pages = cfg.maxmem_mib * MIB // PAGE_SIZE
    mem_pages = cfg.memory_mib * MIB // PAGE_SIZE
    ram = ShmObject.create(ns, f"ram{domid}", max_pages * PAGE_SIZE)
    evt_obj = ShmObject.create(ns, f"evt{domid}", EVTCHN_OBJECT_SIZE)
    wake_fd = create_wake_page()
    wake_map = None
    try:
        ram_map = ram.map()
        # mapped writable before the domain seals it: this mapping stays writable
        wake_map = mmap.mmap(wake_fd, EVTCHN_WAKE_SIZE)
        evt = EventChannels(evt_obj.map(), wake_map, init_vcpus=cfg.maxvcpus)
        ports = PortTable(domid, cfg.max_event_channels)
        # Ports the guest offers dom0 for the console and xenstore (console/port, store evtchn).
        console_port = ports.alloc_unbound(DOMID_DOM0)
        store_port = ports.alloc_unbound(DOMID_DOM0)
        whole = memoryview(ram_map)
        gnttab = whole[GNTTAB_PFN * PAGE_SIZE:(GNTTAB_PFN + cfg.max_grant_frames) * PAGE_SIZE]
        own_table = GrantTable(gnttab, domid)
        # The builder pre-fills the reserved refs: 0 console, 1 xenstore, both for dom0.
        own_table.grant_access(GNTTAB_RESERVED_CONSOLE, DOMID_DOM0, CONSOLE_PFN)
        own_table.grant_access(GNTTAB_RESERVED_XENSTORE, DOMID_DOM0, XENSTORE_PFN)
        grants = ActiveGrants(gnttab, domid, ram_map)
        console = whole[CONSOLE_PFN * PAGE_SIZE:(CONSOLE_PFN + 1) * PAGE_SIZE]
        console_out = console_rings(console)[1]
        flags = SIF_PRIVILEGED | SIF_INITDOMAIN if domid == DOMID_DOM0 else 0
        StartInfo(domid=domid, nr_pages=mem_pages, max_pages=max_pages, flags=flags,
                  store_evtchn=store_port, console_evtchn=console_port, vcpus=cfg.vcpus,
                  max_vcpus=cfg.maxvcpus, nr_grant_frames=cfg.max_grant_frames,
                  ).pack_into(ram_map, START_INFO_PFN * PAGE_SIZE)
        if cfg.type == "pvh":  # what the PVH entry's %ebx points at
            pvh_start_info(name or cfg.name, mem_pages, first_free_pfn(cfg.max_grant_frames)).pack_into(
                ram_map, START_INFO_PFN * PAGE_SIZE + HVM_START_INFO_OFFSET)
        populated = bytearray(max_pages)
        populated[:mem_pages] = b"\1" * mem_pages  # above `memory`: pre-ballooned
        return Domain(domid=domid, cfg=cfg, name=name or cfg.name, ram=ram, ram_map=ram_map,
                      evt_obj=evt_obj, evt=evt, ports=ports, grants=grants, own_table=own_table,
                      console_port=console_port, store_port=store_port, tot_pages=mem_pages,
                      max_pages=max_pages, populated=populated, views=[gnttab, console, whole],
                      console_out=console_out, wake_fd=wake_fd, wake_map=wake_map)
    except BaseException:
        if wake_map is not None:
            wake_map.close()
        os.close(wake_fd)
        evt_obj.close()
        ram.close()
        raise


def process_cpu_seconds(pid: int | None) -> float:
    """A domain's CPU time, as xl list's Time(s): its process's user + system."""
    if pid is None:
        return 0.0
    try:
        times = psutil.Process(pid).cpu_times()
    except psutil.Error:
        return 0.0
    return times.user + times.system


def process_running(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "R"
    except (OSError, IndexError):
        return False
