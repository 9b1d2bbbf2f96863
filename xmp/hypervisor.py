"""The supervisor: xmp's hypervisor.

Theory of operation.  One process, one thread, one ``selectors`` loop over:
every domain's hypercall channel, the zygote's socket (domain exits), a
signal wake-up socket, and whatever else its users register with
:meth:`Supervisor.watch` (the toolstack's xenstore connection and control
socket); timers (``set_timer_op``, :meth:`Supervisor.call_later`) set the
loop's timeout.  The supervisor owns every resource -- domids, the host
memory pool, the shared-memory objects, port and grant bookkeeping -- and
is the only one that creates or destroys a domain.  It never trusts a
domain: a malformed hypercall gets EINVAL, a forbidden one EPERM, and a
domain that dies (by any means, SIGKILL included) is noticed at once
through its channel's EOF and has everything it held given back.

It knows nothing of xenstore, devices or config files: the toolstack
(``xmp.toolstack``, libxl's job) builds domains through the domain API
below and is told of their ends through :class:`DomainEvents`, as libxl
learns of them through VIRQ_DOM_EXC.

No domain outlives the supervisor: the zygote follows it with
PR_SET_PDEATHSIG and every domain follows the zygote the same way; all
shared memory is already unlinked, so the kernel frees it with the last
process.
"""

from __future__ import annotations

import errno
import functools
import heapq
import itertools
import os
import selectors
import signal
import socket
import sys
import time
import traceback
import uuid
from collections import deque
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Protocol

from xmp.domid import DOMID_DOM0, MAX_DOMID
from xmp.errors import GrantError, HypercallError, XmpError
from xmp.hv import state
from xmp.hv.domain import (
    MIB,
    Domain,
    DomState,
    Mapping,
    build_domain,
    entry_registers,
    process_cpu_seconds,
    process_running,
)
from xmp.hv.hvm import HvmState
from xmp.hv.hypercalls import DEFERRED, HypercallHandlers
from xmp.hv.zygote import ZygoteClient
from xmp.hypercall import DOM0_ONLY, MAX_FDS, MAX_MESSAGE, MessageTooBig, decode_request, encode
from xmp.limits import (
    FDS_RESERVED,
    PORTS_RESERVED,
    SUPERVISOR_FDS_PER_DOMAIN,
    capacity,
    describe_capacity,
    domain_cost,
    domain_ports,
    raise_nofile,
)
from xmp.sharedmem._ffi import lib
from xmp.sharedmem.evtchn import VIRQ_TIMER
from xmp.sharedmem.shm import PAGE_SIZE, ShmNamespace, recv_handles, remove_stale, send_handles
from xmp.topology import GUEST_UIDS, DomainConfig, check_fits

DYING_GRACE = 5.0           # seconds a dying domain waits for its mappers to let go
DOM0_NOTICE = 60.0          # ... and at most for dom0 to list it dying (it is behind)
DOMAIN_BOOT = "xmp.domain_proc.main:domain_main"  # what every domain process runs first

Handler = Callable[[int], object]  # called with the selector's event mask


class DomainEvents(Protocol):
    """What the supervisor tells the toolstack (libxl's death watch)."""

    def domain_ended(self, dom: Domain, reason: str) -> None:
        """``dom``'s process is gone; it is SHUTDOWN with ``reason``
        ("poweroff", "reboot", "crash", …) and holds everything still."""

    def domain_destroyed(self, dom: Domain) -> None:
        """``dom`` was destroyed: it is dying and holds nothing any more."""

    def createdomain(self, config: dict) -> Domain:
        """XEN_DOMCTL_createdomain from dom0, with a whole domain config."""
        ...


class Alone:
    """The supervisor without a toolstack: an ended domain is destroyed."""

    def __init__(self, sup: Supervisor):
        self.sup = sup

    def domain_ended(self, dom: Domain, reason: str) -> None:
        self.sup.destroy_domain(dom, f"destroyed ({reason})")

    def domain_destroyed(self, dom: Domain) -> None:
        pass

    def createdomain(self, config: dict) -> Domain:
        raise HypercallError(errno.ENOSYS, "createdomain", "no toolstack runs")


class Supervisor(HypercallHandlers):
    def __init__(self, rundir: Path, pool_mib: int, *, echo: bool = True, preload: Iterable[str] = (),
                 guest_uids: tuple[int, int] = GUEST_UIDS):
        # Nobody may read the supervisor's memory (it maps every domain's RAM)
        # or its descriptors through /proc; the zygote and domains inherit this.
        lib.xmp_set_dumpable(0)
        # Before the zygote: dom0 and every domain inherit this limit.
        self.nofile = raise_nofile()
        # The zygote is forked first, while we hold nothing it should inherit.
        self.zygote = ZygoteClient(guest_uids)  # (the uids its jailed guests run as)
        self.rundir = Path(rundir)
        self.ns = ShmNamespace()
        self.domains: dict[int, Domain] = {}
        self.pids: dict[int, tuple[int, str]] = {}  # domain process -> (domid, name), until its exit is told
        self.next_domid = 1
        self.pool_pages = pool_mib * MIB // PAGE_SIZE
        self.timers: list[tuple[int, int, int, int]] = []
        self.timer_gen: dict[tuple[int, int], int] = {}
        self.later: list[tuple[float, int, Callable[[], None]]] = []
        self._later_seq = itertools.count()
        self.dmesg: deque[str] = deque(maxlen=10000)
        self.exit_code = 0
        self.stopping = False
        self.stop_reason = ""
        self.events: DomainEvents = Alone(self)
        self.echo_fd = os.dup(sys.stdout.fileno()) if echo else None
        for sub in ("console", "logs", "dumps"):
            (self.rundir / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(self.rundir, 0o700)
        self.hvlog = open(self.rundir / "logs" / "hypervisor.log", "a", buffering=1)
        for name in remove_stale():
            self.log(f"removed stale shared-memory object {name}")
        self.sel = selectors.DefaultSelector()
        self.watch(self.zygote.sock, selectors.EVENT_READ, lambda _mask: self._exits())
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self.watch(self._wake_r, selectors.EVENT_READ, lambda _mask: self._wake_r.recv(64))
        self.zygote.preload({DOMAIN_BOOT.partition(":")[0], *preload})

    # -- logging -----------------------------------------------------------

    def log(self, msg: str) -> None:
        line = f"(XEN) [{time.strftime('%H:%M:%S')}] {msg}"
        self.dmesg.append(line)
        self.hvlog.write(line + "\n")

    def console_line(self, dom: Domain, text: str, serial: bool = False) -> None:
        """A domain's console_io line (dmesg; dom0's console log too), or with
        ``serial`` an HVM guest's emulated UART, which goes to its console log."""
        if not serial:
            for line in text.splitlines() or [""]:
                self.dmesg.append(f"(d{dom.domid}) {line}")
                self.hvlog.write(f"(d{dom.domid}) {line}\n")
        if dom.domid == DOMID_DOM0 or serial:
            with open(self.rundir / "console" / f"{dom.name}.log", "a") as f:
                f.write(text if text.endswith("\n") else text + "\n")
            if self.echo_fd is not None:
                os.write(self.echo_fd, "".join(f"{dom.name} | {ln}\n" for ln in text.splitlines()).encode())

    # -- host memory pool --------------------------------------------------

    def pool_take(self, pages: int, op: str) -> None:
        if pages > self.pool_pages:
            raise HypercallError(errno.ENOMEM, op, f"the host pool has {self.pool_pages * PAGE_SIZE // MIB} "
                                 f"MiB free, {pages * PAGE_SIZE // MIB} MiB asked")
        self.pool_pages -= pages

    def pool_give(self, pages: int) -> None:
        self.pool_pages += pages

    # -- the domain API (the toolstack's, and the hypercalls') --------------

    def lookup(self, domid: int, op: str) -> Domain:
        dom = self.domains.get(domid)
        if dom is None:
            raise HypercallError(errno.ESRCH, op, f"no domain {domid}")
        return dom

    def find(self, ref: str | int) -> Domain:
        """A domain by name or id, as the xl commands take it."""
        for dom in sorted(self.domains.values(), key=lambda d: d.state == DomState.DYING):
            if str(dom.domid) == str(ref) or dom.name == ref:
                return dom
        raise HypercallError(errno.ESRCH, "lookup", f"domain {str(ref)!r} does not exist")

    def create_domain(self, cfg_dict: dict) -> Domain:
        """XEN_DOMCTL_createdomain: the toolstack builds it."""
        return self.events.createdomain(cfg_dict)

    def _alloc_domid(self) -> int:
        # Ids are not reused within a supervisor's life, as in Xen: nothing
        # keyed by an old id can reach the new domain.
        domid = self.next_domid
        if domid > MAX_DOMID:
            raise HypercallError(errno.ENOSPC, "createdomain", "out of domain ids")
        self.next_domid += 1
        return domid

    def check_build(self, cfg: DomainConfig, name: str | None = None, *, dom0: bool = False) -> None:
        """Refuse, before anything of it exists, a domain this host cannot
        hold now: while stopping (teardown serves the loop, and `xmp create`
        still reached it), a name in use, memory the pool lacks, descriptors
        dom0 or the supervisor could not keep open (EMFILE half-way through a
        build crashed the supervisor and left dom0 without xenstore or
        consoles for later guests), or dom0's event channels (later guests
        had no console).  :meth:`build` checks this too; the toolstack asks
        first, before it makes a device's files."""
        name = name or cfg.name
        if self.stopping and not dom0:
            raise HypercallError(errno.ESHUTDOWN, "createdomain",
                                 f"the supervisor is stopping ({self.stop_reason}): no new domains")
        if any(d.name == name and d.state != DomState.DYING for d in self.domains.values()):
            raise HypercallError(errno.EEXIST, "createdomain", f"a domain named {name!r} already exists")
        used = sum(d.tot_pages for d in self.domains.values()) * PAGE_SIZE // MIB
        try:
            check_fits(self.pool_pages * PAGE_SIZE // MIB + used, used, cfg)
        except XmpError as exc:
            raise HypercallError(errno.ENOMEM, "createdomain", str(exc)) from None
        held = FDS_RESERVED + sum(domain_cost(_devices(d.cfg)) for d in self.domains.values())
        # Our own count as well, when near: the model is per domain, this is exact for us.
        own = len(os.listdir("/proc/self/fd")) if held * 2 > self.nofile else 0
        if held + domain_cost(_devices(cfg)) > self.nofile \
                or own + SUPERVISOR_FDS_PER_DOMAIN + FDS_RESERVED // 2 > self.nofile:
            raise HypercallError(errno.EMFILE, "createdomain",
                                 f"{describe_capacity(self.nofile)}: {len(self.domains)} exist, so "
                                 f"{name!r} is refused; destroy a domain or raise the hard limit "
                                 "(ulimit -Hn) before `xmp run`")
        dom0_dom = self.domains.get(DOMID_DOM0)
        if dom0_dom is not None:  # xenconsoled and xenstored bind a port to every guest, blkback one a queue
            free = dom0_dom.ports.max_evtchns - 1 - len(dom0_dom.ports.bound())
            need = domain_ports(_devices(cfg))
            if need > free - PORTS_RESERVED // 4:
                raise HypercallError(errno.ENOSPC, "createdomain",
                                     f"{describe_capacity(self.nofile)}: dom0 has {free} of its "
                                     f"{dom0_dom.ports.max_evtchns - 1} event channels free and {name!r} "
                                     f"needs {need}; destroy a domain first")

    def host_info(self) -> dict[str, int]:
        """What `xmp info` says of a running supervisor."""
        return {"nofile": self.nofile, "capacity": capacity(self.nofile), "domains": len(self.domains),
                "max_domid": MAX_DOMID, "pool_free_mib": self.pool_pages * PAGE_SIZE // MIB}

    def build(self, cfg: DomainConfig, kernel: str, *, domid: int | None = None, name: str | None = None,
              boot: dict[str, Any] | None = None, extra_fds: Iterable[int] = (),
              prepare: Callable[[Domain], None] | None = None, paused: bool = False,
              paused_for_dm: bool = False) -> Domain:
        """Build a domain and start its process, running ``kernel``: memory
        from the pool, RAM and event objects, special pages, a domid (or
        ``domid``, for dom0).  ``boot`` adds to the boot message.
        ``prepare(dom)`` runs before the process exists (a restore fills the
        RAM there); if it raises, nothing is left of the domain.  ``paused``:
        stopped before its kernel runs a single instruction (xl's -p).  Whatever
        the host cannot hold is refused first (:meth:`check_build`); running
        out of descriptors meanwhile is the same named refusal."""
        name = name or cfg.name
        self.check_build(cfg, name, dom0=domid == DOMID_DOM0)
        if domid is None:
            domid = self._alloc_domid()
        try:  # a config too big for the channel is refused before anything is built
            boot_msg = encode({"domid": domid, "name": name, "config": cfg.to_dict(), "kernel": kernel,
                               "entry": entry_registers(cfg.type), **(boot or {})})
        except MessageTooBig as exc:
            raise HypercallError(errno.E2BIG, "createdomain", f"{name}: config too big ({exc})") from None
        mem_pages = cfg.memory_mib * MIB // PAGE_SIZE
        self.pool_take(mem_pages, "createdomain")
        try:
            dom = build_domain(self.ns, domid, cfg, name)
            if cfg.type == "hvm":
                dom.hvm = HvmState(awaiting_dm=paused_for_dm and not paused)
        except BaseException as exc:
            self.pool_give(mem_pages)
            _out_of_descriptors(exc, self.nofile)
            raise
        if prepare is not None:
            try:
                prepare(dom)
                # prepare may set the populated pages (a restored balloon): the pool follows
                if dom.tot_pages > mem_pages:
                    self.pool_take(dom.tot_pages - mem_pages, "createdomain")
            except BaseException:
                dom.release()
                self.pool_give(mem_pages)
                raise
            if dom.tot_pages < mem_pages:
                self.pool_give(mem_pages - dom.tot_pages)
            mem_pages = dom.tot_pages
        dom.uuid = dom.uuid or str(uuid.uuid4())   # a restore keeps the one it had (prepare set it)
        try:
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        except OSError as exc:
            dom.release()
            self.pool_give(mem_pages)
            _out_of_descriptors(exc, self.nofile)
            raise
        jail = None if domid == DOMID_DOM0 else "driver" if cfg.driver_domain else "guest"
        try:
            log_fd = os.open(self.rundir / "logs" / f"{name}.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND,
                             0o600)
            try:
                dom.pid = self.zygote.spawn(domid, f"xmp:{domid}:{name}", theirs.fileno(), log_fd,
                                            DOMAIN_BOOT, unprivileged=domid != DOMID_DOM0, jail=jail,
                                            config=cfg.to_dict())
            finally:
                os.close(log_fd)
            dom.vcpu_table.get(0).tid = dom.pid  # vCPU 0 is the process's main thread
        except OSError as exc:
            ours.close()
            dom.release()
            self.pool_give(mem_pages)
            _out_of_descriptors(exc, self.nofile)
            raise
        finally:
            theirs.close()
        dom.sock = ours
        self.domains[domid] = dom
        self.pids[dom.pid] = (domid, name)
        # stopped while it waits for its boot message: it runs nothing until unpaused (an HVM
        # guest: until its device model has enabled its ioreq server, or until asked, with -p)
        if paused or paused_for_dm and cfg.type == "hvm":
            os.kill(dom.pid, signal.SIGSTOP)
            dom.state = DomState.PAUSED
        send_handles(ours, boot_msg, [dom.ram.fd, dom.evt_obj.fd, dom.wake_fd, *extra_fds])
        self.watch(ours, selectors.EVENT_READ, functools.partial(self._on_channel, dom))
        self.log(f"created dom{domid} {name!r} ({cfg.memory_mib} MiB, {cfg.vcpus} vcpu, pid {dom.pid})")
        self.raise_dom_exc()
        return dom

    def rename(self, dom: Domain, name: str) -> None:
        dom.name = name
        self.log(f"dom{dom.domid} renamed to {name!r}")

    def destroy_domain(self, dom: Domain, reason: str = "destroyed", failed: bool = False) -> None:
        """Pull the plug: the process is killed and everything it *holds* is
        given back at once.  Like Xen, the domain then stays *dying* while
        others still map its pages (dom0's xenconsoled draining its last
        console output), and is freed when they let go or after
        :data:`DYING_GRACE`.  ``failed``: the end was not asked for (a
        crash), which for dom0 fails the run."""
        if dom.domid not in self.domains or dom.state == DomState.DYING:
            return
        dom.state = DomState.DYING
        dom.dying_since = time.monotonic()
        if dom.pid is not None:
            dom.cpu_time_final = process_cpu_seconds(dom.pid)
            try:
                os.kill(dom.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self._close_channel(dom)
        # Grants it mapped from others: unpinned, in-use bits cleared.
        for m in dom.maptrack.values():
            granter = self.domains.get(m.granter)
            if granter is not None:
                self.grant_unmapped(granter, m)
        dom.maptrack.clear()
        self.logdirty_disable(dom)
        # Its ports: interdomain peers revert to unbound and are poked.
        for port in list(dom.ports.bound()):
            self.close_port(dom, port)
        self.drop_doorbells(dom)
        self.hvm_destroyed(dom)
        for key in [k for k in self.timer_gen if k[0] == dom.domid]:
            del self.timer_gen[key]
        self.log(f"dom{dom.domid} {dom.name!r} {reason}")
        if dom.domid == DOMID_DOM0:
            self.events.domain_destroyed(dom)
            self.host_down(f"dom0 {reason}", failed=failed)
            return
        self.events.domain_destroyed(dom)
        self.raise_dom_exc()
        self.reap_dying()

    def mapped_by(self, dom: Domain) -> list[int]:
        """Domains that still map pages of ``dom``."""
        return [d.domid for d in self.domains.values()
                if any(m.granter == dom.domid for m in d.maptrack.values())]

    def reap_dying(self, force: bool = False) -> None:
        """Free dying domains that nobody maps any more and whose last
        console output dom0 has drained (or that waited long enough)."""
        now = time.monotonic()
        dying = [d for d in self.domains.values() if d.state == DomState.DYING]
        if not dying:
            return
        # Who maps whom, in one pass: asking mapped_by() for each dying domain
        # made destroying 1,000 guests cubic (the supervisor missed SIGTERM's 30 s).
        mappers: dict[int, list[int]] = {}
        for d in self.domains.values():
            for granter in {m.granter for m in d.maptrack.values()}:
                mappers.setdefault(granter, []).append(d.domid)
        for dom in dying:
            holders = mappers.get(dom.domid, [])
            waiting = holders or (dom.console_undrained() and DOMID_DOM0 in self.domains)
            if waiting and not force and now - dom.dying_since < DYING_GRACE:
                continue
            # dom0 lets go of a domain once its domain list shows it dying.  Freed
            # before dom0 looked, it left the list unseen: 1,000 destroyed at once
            # left dom0 holding ~570 guests' consoles and rings (absent and newer
            # than any listed domain reads as "not yet seen", not "gone").
            if DOMID_DOM0 in holders and not dom.seen_dying and not force \
                    and now - dom.dying_since < DOM0_NOTICE:
                continue
            if holders:
                self.log(f"dom{dom.domid} freed while still mapped by {holders}")
            self.pool_give(dom.tot_pages)
            del self.domains[dom.domid]
            dom.release()
            self.raise_dom_exc()

    def resume_domain(self, dom: Domain) -> None:
        """xl resume: a suspended guest goes on in place; its suspend
        hypercall returns 1 (cancelled), as SCHEDOP_shutdown(suspend) does."""
        if dom.state != DomState.SHUTDOWN or dom.shutdown_reason != "suspend" or dom.sock is None:
            raise HypercallError(errno.EINVAL, "resume", f"{dom.name} is not suspended")
        dom.state, dom.shutdown_reason = DomState.RUNNING, None
        send_handles(dom.sock, encode({"ret": 1}), [])
        self.log(f"dom{dom.domid} {dom.name!r} resumed")

    def host_down(self, reason: str, failed: bool) -> None:
        """dom0 is gone: nobody is left to drain or serve; take every domain
        down and free everything now."""
        if failed:
            self.exit_code = 1
        self.stop(reason)
        for dom in list(self.domains.values()):
            self.destroy_domain(dom, "destroyed (host going down)")
        self.reap_dying(force=True)

    def pause_domain(self, dom: Domain) -> None:
        if dom.domid == DOMID_DOM0:
            raise HypercallError(errno.EINVAL, "pausedomain", "dom0 cannot be paused")
        if dom.state == DomState.RUNNING and dom.pid is not None:
            os.kill(dom.pid, signal.SIGSTOP)
            dom.state = DomState.PAUSED
            self.log(f"dom{dom.domid} paused")

    def unpause_domain(self, dom: Domain) -> None:
        if dom.state == DomState.PAUSED and dom.pid is not None:
            os.kill(dom.pid, signal.SIGCONT)
            dom.state = DomState.RUNNING
            self.log(f"dom{dom.domid} unpaused")

    def remote_shutdown(self, dom: Domain, reason: str) -> None:
        """SCHEDOP_remote_shutdown: the domain is shut down with ``reason``
        now, without its cooperation (its process is killed); the end then
        takes the usual path, so on_<reason> applies."""
        if dom.domid == DOMID_DOM0:
            raise HypercallError(errno.EINVAL, "remote_shutdown",
                                 "dom0 is stopped with `xmp destroy Domain-0`")
        if dom.pid is None or dom.state == DomState.DYING:
            raise HypercallError(errno.EINVAL, "remote_shutdown", f"{dom.name} is not running")
        self.log(f"dom{dom.domid} {dom.name!r}: remote shutdown ({reason})")
        self.shutdown_requested(dom, reason)
        try:
            os.kill(dom.pid, signal.SIGKILL)  # a stopped (paused) process dies of it too
        except ProcessLookupError:
            pass

    def shutdown_requested(self, dom: Domain, reason: str) -> None:
        dom.state = DomState.SHUTDOWN
        dom.shutdown_reason = reason
        self.log(f"dom{dom.domid} {dom.name!r} shut down: {reason}")

    def domain_info(self, dom: Domain) -> dict:
        cpu = dom.cpu_time_final if dom.state == DomState.SHUTDOWN and dom.pid is None \
            else process_cpu_seconds(dom.pid)
        return {"domid": dom.domid, "name": dom.name, "uuid": dom.uuid,
                "state": dom.state.value, "state_letters": dom.state_letters(process_running(dom.pid)),
                "shutdown_reason": dom.shutdown_reason, "mem_kb": dom.tot_pages * PAGE_SIZE // 1024,
                "maxmem_kb": dom.max_pages * PAGE_SIZE // 1024,
                "vcpus": len(dom.vcpu_table.online()) if dom.vcpu_table.started else dom.cfg.vcpus,
                "maxvcpus": dom.cfg.maxvcpus,
                "cpu_time": round(cpu, 3), "console_port": dom.console_port, "console_gref": 0,
                "store_port": dom.store_port, "driver_domain": dom.cfg.driver_domain, "exit": dom.exit}

    def save_domain(self, dom: Domain) -> dict[str, Any]:
        """What the hypervisor holds for ``dom`` outside its RAM, written
        down (:mod:`xmp.hv.state`); timers as time remaining."""
        now = time.monotonic_ns()
        timers = {vcpu: deadline - now for deadline, gen, domid, vcpu in self.timers
                  if domid == dom.domid and self.timer_gen.get((domid, vcpu)) == gen}
        return state.save_domain(dom, timers)

    def restore_domain(self, dom: Domain, data: dict[str, Any]) -> None:
        """Apply saved state to a freshly built ``dom``; its mappings are
        pinned again in their granters (checked as a fresh map is)."""
        def pin(m: Mapping) -> None:
            m.frames = self.lookup(m.granter, "restore").grants.map_grant_ref(m.refs, dom.domid, m.readonly)
        now = time.monotonic_ns()
        for vcpu, remaining in state.restore_domain(dom, data, pin).items():
            self.set_timer(dom, vcpu, now + remaining)

    def domain_memory(self, dom: Domain) -> memoryview:
        """The domain's whole RAM (for a core dump)."""
        return memoryview(dom.ram_map)

    # -- a domain's end ----------------------------------------------------

    def _close_channel(self, dom: Domain) -> None:
        if dom.sock is not None:
            self.unwatch(dom.sock)
            dom.sock.close()
            dom.sock = None

    def _exits(self) -> None:
        """The zygote's reports of domain processes that ended: how each
        ended goes to dmesg and onto the domain's record (`xmp list --json`
        ``exit``) -- its channel's EOF only says that it did."""
        for pid, status in self.zygote.drain():
            domid, name = self.pids.pop(pid, (None, "?"))
            how = f"exited with status {status}" if status >= 0 else f"killed by {_signame(-status)}"
            self.log(f"dom{domid} {name!r}: process {pid} {how}")
            dom = self.domains.get(domid) if domid is not None else None
            if dom is not None and dom.pid in (pid, None):
                dom.exit = how

    def _gone(self, dom: Domain) -> None:
        """The domain's process has ended (its channel hit EOF)."""
        if dom.domid not in self.domains or dom.state == DomState.DYING:
            return
        dom.cpu_time_final = process_cpu_seconds(dom.pid)
        self._close_channel(dom)
        reason = dom.shutdown_reason if dom.state == DomState.SHUTDOWN else "crash"
        if reason == "crash":
            dom.state, dom.shutdown_reason = DomState.SHUTDOWN, "crash"
            self.log(f"dom{dom.domid} {dom.name!r} crashed")
        dom.pid = None
        for st in dom.vcpu_table.vcpus.values():
            st.tid = None
        self.raise_dom_exc()
        if dom.domid == DOMID_DOM0:  # dom0 ending by itself takes the host down, as a failure
            self.destroy_domain(dom, "crashed" if reason == "crash" else f"shut down ({reason})", failed=True)
            return
        self.events.domain_ended(dom, reason or "poweroff")

    # -- timers ------------------------------------------------------------

    def set_timer(self, dom: Domain, vcpu: int, deadline_ns: int) -> None:
        key = (dom.domid, vcpu)
        gen = self.timer_gen.get(key, 0) + 1
        self.timer_gen[key] = gen
        if deadline_ns:
            heapq.heappush(self.timers, (deadline_ns, gen, dom.domid, vcpu))

    def call_later(self, delay: float, fn: Callable[[], None]) -> None:
        """Run ``fn`` from the loop after ``delay`` seconds."""
        heapq.heappush(self.later, (time.monotonic() + delay, next(self._later_seq), fn))

    def _fire_timers(self) -> float | None:
        now = time.monotonic_ns()
        while self.timers and self.timers[0][0] <= now:
            _, gen, domid, vcpu = heapq.heappop(self.timers)
            if self.timer_gen.get((domid, vcpu)) != gen:
                continue
            dom = self.domains.get(domid)
            port = dom.ports.virq_port(VIRQ_TIMER, vcpu) if dom else None
            if dom is not None and port is not None:
                dom.evt.send(port, vcpu)
        mono = time.monotonic()
        while self.later and self.later[0][0] <= mono:
            fn = heapq.heappop(self.later)[2]
            try:
                fn()
            except Exception:  # a toolstack bug must not end the hypervisor
                self.log(f"internal error in a timer: {traceback.format_exc()}")
        waits = [(self.timers[0][0] - now) / 1e9] if self.timers else []
        if self.later:
            waits.append(self.later[0][0] - mono)
        return min(waits) if waits else None

    # -- the loop ----------------------------------------------------------

    def watch(self, fileobj, events: int, handler: Handler) -> None:
        self.sel.register(fileobj, events, handler)

    def modify(self, fileobj, events: int, handler: Handler) -> None:
        self.sel.modify(fileobj, events, handler)

    def unwatch(self, fileobj) -> None:
        try:
            self.sel.unregister(fileobj)
        except (KeyError, ValueError, RuntimeError):  # not watched, or the loop has ended
            pass

    def watching(self, fileobj) -> bool:
        try:
            self.sel.get_key(fileobj)
        except (KeyError, ValueError):
            return False
        return True

    def stop(self, reason: str) -> None:
        if not self.stopping:
            self.stopping = True
            self.stop_reason = reason
            self.log(f"stopping: {reason}")

    def _on_signal(self, signum, _frame) -> None:
        self.stop(f"signal {signal.Signals(signum).name}")
        try:
            self._wake_w.send(b"\0")
        except OSError:
            pass

    def run(self, boot: Callable[[], None], shutdown: Callable[[], None], ready=None) -> int:
        """Serve until stopped: ``boot`` (the toolstack's start) runs first,
        ``shutdown`` (its orderly stop of the guests) before the teardown."""
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            try:
                boot()
                if ready is not None and not self.stopping:
                    ready()
                while not self.stopping:
                    self.iterate(0.5)
            finally:
                shutdown()
        except BaseException:
            # Into logs/hypervisor.log too: a detached supervisor has no terminal.
            self.exit_code = 1
            self.stop("supervisor failed")
            self.log(f"supervisor failed:\n{traceback.format_exc().rstrip()}")
            raise
        finally:
            self.teardown()
            for s, h in old.items():
                signal.signal(s, h)
        return self.exit_code

    def iterate(self, timeout: float) -> None:
        """One turn of the loop: timers, ready descriptors, dying domains."""
        due = self._fire_timers()
        for key, mask in self.sel.select(timeout if due is None else min(max(due, 0), timeout)):
            key.data(mask)
        self._fire_timers()
        self.reap_dying()
        if self.zygote.exits:  # reports that came while a spawn waited for its answer
            self._exits()

    def _on_channel(self, dom: Domain, _mask: int) -> None:
        self._hypercall(dom)

    def _hypercall(self, dom: Domain) -> None:
        if dom.sock is None:
            return
        try:
            data, fds = recv_handles(dom.sock, MAX_FDS, MAX_MESSAGE)
        except (ConnectionError, OSError):
            data, fds = b"", []
        for fd in fds:  # domains hand us nothing
            os.close(fd)
        if not data:
            self._gone(dom)
            return
        reply_fds: list[int] = []
        op, cmd = "hypercall", ""
        try:
            op, cmd, args = decode_request(data, self.HYPERCALLS)
            if op in DOM0_ONLY and not dom.privileged:
                raise HypercallError(errno.EPERM, f"{op}/{cmd}", f"dom{dom.domid} is not privileged")
            ret, reply_fds = self.HYPERCALLS[op][cmd](self, dom, args)
            if ret is DEFERRED:
                return  # answered later (a suspend, by resume)
            reply: dict[str, Any] = {"ret": ret}
        except HypercallError as exc:
            reply = {"errno": exc.errno, "detail": exc.detail}
        except GrantError as exc:
            reply = {"errno": errno.EINVAL, "gntst": exc.status, "gref": exc.gref, "domid": exc.domid}
        except Exception:  # a bug here must not take every domain down; it is logged, not dropped
            self.log(f"internal error serving dom{dom.domid}: {traceback.format_exc()}")
            reply = {"errno": errno.EINVAL, "detail": "internal error (see xmp dmesg)"}
        if dom.sock is None:
            return  # the call destroyed the caller
        try:
            data = encode(reply)
        except MessageTooBig as exc:  # a reply that outgrew the channel is the caller's error, not ours
            self.log(f"dom{dom.domid}: reply to {op}/{cmd} too big: {exc}")
            data, reply_fds = encode({"errno": errno.E2BIG, "detail": str(exc)}), []
        try:
            send_handles(dom.sock, data, reply_fds)
        except OSError:
            self._gone(dom)

    def teardown(self) -> None:
        """Destroy whatever still runs (the toolstack has asked the guests to
        go already), dom0 last so it drains what they wrote."""
        for dom in sorted(self.domains.values(), key=lambda d: -d.domid):
            if dom.domid != DOMID_DOM0:
                self.destroy_domain(dom, "destroyed (supervisor stopping)")
        deadline = time.monotonic() + 2
        while [d for d in self.domains.values() if d.state == DomState.DYING] \
                and time.monotonic() < deadline and DOMID_DOM0 in self.domains:
            self.iterate(0.05)
        dom0 = self.domains.get(DOMID_DOM0)
        if dom0 is not None:
            self.destroy_domain(dom0, "destroyed (supervisor stopping)")
        self.reap_dying(force=True)
        self.zygote.close()
        self.sel.close()
        self._wake_r.close()
        self._wake_w.close()
        if self.echo_fd is not None:
            os.close(self.echo_fd)
            self.echo_fd = None
        self.log(f"stopped ({self.stop_reason or 'done'}), exit status {self.exit_code}")
        self.hvlog.close()


def _devices(cfg: DomainConfig) -> int:
    """How many split devices a config lists (each costs its backend)."""
    return sum(len(specs) for specs in cfg.devices.values())


def _out_of_descriptors(exc: BaseException, nofile: int) -> None:
    """EMFILE/ENFILE while building is the named limit, not a crash."""
    if isinstance(exc, OSError) and exc.errno in (errno.EMFILE, errno.ENFILE):
        raise HypercallError(errno.EMFILE, "createdomain", f"{describe_capacity(nofile)}: {exc}") from None


def _signame(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"
