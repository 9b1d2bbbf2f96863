"""The supervisor: xmp's hypervisor.

Theory of operation.  One process, one thread, one ``selectors`` loop over:
every domain's hypercall channel, the zygote's socket (domain exits), the
control socket (the ``xmp`` commands), and a signal wake-up socket; timers
(``set_timer_op``) set the loop's timeout.  The supervisor owns every
resource -- domids, the host memory pool, the shared-memory objects, port
and grant bookkeeping -- and is the only one that creates or destroys a
domain.  It never trusts a domain: a malformed hypercall gets EINVAL, a
forbidden one EPERM, and a domain that dies (by any means, SIGKILL
included) is noticed at once through its channel's EOF, treated as a crash
unless it had asked to shut down, and has everything it held given back.

No domain outlives the supervisor: the zygote follows it with
PR_SET_PDEATHSIG and every domain follows the zygote the same way; all
shared memory is already unlinked, so the kernel frees it with the last
process.
"""

from __future__ import annotations

import errno
import heapq
import os
import selectors
import signal
import socket
import sys
import time
import traceback
import uuid
from collections import deque
from pathlib import Path
from typing import Any

from xmp.diskspec import DiskSpec, parse_diskspec, vdev_devid
from xmp.errors import GrantError, HypercallError, XmpError
from xmp.hv.control import ControlServer
from xmp.hv.domain import (
    DOMID_DOM0,
    MIB,
    Domain,
    DomState,
    build_domain,
    process_cpu_seconds,
    process_running,
)
from xmp.hv.hypercalls import DEFERRED, HypercallHandlers
from xmp.hv.toolstack import (
    Device,
    Toolstack,
    device_tree,
    dom0_tree,
    domain_tree,
    move_backend_tree,
    teardown_tree,
)
from xmp.hv.zygote import ZygoteClient
from xmp.hypercall import DOM0_ONLY, MAX_FDS, MAX_MESSAGE, decode_request, encode
from xmp.sharedmem._ffi import lib
from xmp.sharedmem.evtchn import VIRQ_TIMER
from xmp.sharedmem.shm import PAGE_SIZE, ShmNamespace, recv_handles, remove_stale, send_handles
from xmp.topology import DomainConfig, Topology, check_fits
from xmp.xenstore.wire import XsType

DOM0_KERNEL = "xmp.dom0:main"
DRIVER_DOMAIN_KERNEL = "xmp.drivers.backends:main"  # a driver domain without a kernel of its own
# Frontends every guest may open with kernel.block(…) etc.: loaded once in the zygote.
PRELOAD = ("xmp.drivers.blk.frontend",)
MAX_DOMID = 0x7FEF
RESTART_LIMIT = (10, 10.0)  # at most 10 restarts of one name in 10 s
DYING_GRACE = 5.0           # seconds a dying domain waits for its mappers to let go
XENSTORED_START = 15.0      # seconds dom0 gets to bring xenstored up
SHUTDOWN_GRACE = 5.0        # seconds guests get to power off when the supervisor stops


class Supervisor(HypercallHandlers):
    def __init__(self, topology: Topology, rundir: Path, *, echo: bool = True,
                 stop_when_guests_gone: bool = True):
        # Nobody may read the supervisor's memory (it maps every domain's RAM)
        # or its descriptors through /proc; the zygote and domains inherit this.
        lib.xmp_set_dumpable(0)
        # The zygote is forked first, while we hold nothing it should inherit.
        self.zygote = ZygoteClient(topology.host.guest_uids)
        self.topology = topology
        self.rundir = Path(rundir)
        self.ns = ShmNamespace()
        self.domains: dict[int, Domain] = {}
        self.next_domid = 1
        self.pool_pages = topology.host.memory_mib * MIB // PAGE_SIZE
        self.timers: list[tuple[int, int, int, int]] = []
        self.timer_gen: dict[tuple[int, int], int] = {}
        self.dmesg: deque[str] = deque(maxlen=10000)
        self.exit_code = 0
        self.stopping = False
        self.stop_reason = ""
        self.stop_when_guests_gone = stop_when_guests_gone
        self.restarts: dict[str, deque[float]] = {}
        self.devices: list[Device] = []  # split devices the toolstack made, to re-home on restarts
        self.echo_fd = os.dup(sys.stdout.fileno()) if echo else None
        for sub in ("console", "logs", "dumps"):
            (self.rundir / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(self.rundir, 0o700)
        self.hvlog = open(self.rundir / "logs" / "hypervisor.log", "a", buffering=1)
        for name in remove_stale():
            self.log(f"removed stale shared-memory object {name}")
        self.sel = selectors.DefaultSelector()
        self.toolstack = Toolstack(self.rundir / "xenstored.sock", self.log, self._toolstack_wants_write)
        self.control = ControlServer(self.rundir / "control.sock", self)
        # No supervisor runs here (the control socket proved it): sockets left
        # by one that was killed are stale.
        for sock in [*(self.rundir / "console").glob("*.sock"), self.rundir / "xenstored.sock"]:
            sock.unlink(missing_ok=True)
        self.sel.register(self.control.listener, selectors.EVENT_READ, ("listen", None))
        self.sel.register(self.zygote.sock, selectors.EVENT_READ, ("zygote", None))
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self.sel.register(self._wake_r, selectors.EVENT_READ, ("signal", None))
        self.zygote.preload({d.kernel.split(":")[0] for d in topology.domains if d.kernel}
                            | {DOM0_KERNEL.split(":")[0], DRIVER_DOMAIN_KERNEL.split(":")[0], *PRELOAD})

    # -- logging -----------------------------------------------------------

    def log(self, msg: str) -> None:
        line = f"(XEN) [{time.strftime('%H:%M:%S')}] {msg}"
        self.dmesg.append(line)
        self.hvlog.write(line + "\n")

    def console_line(self, dom: Domain, text: str) -> None:
        for line in text.splitlines() or [""]:
            self.dmesg.append(f"(d{dom.domid}) {line}")
            self.hvlog.write(f"(d{dom.domid}) {line}\n")
        if dom.domid == DOMID_DOM0:
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

    # -- domains -----------------------------------------------------------

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
        raise HypercallError(errno.ESRCH, "lookup", f"no domain named or numbered {ref!r}")

    def start(self) -> None:
        """Build dom0, wait for its xenstored, then every domain of the
        topology, in order."""
        self._create(self.topology.dom0, domid=DOMID_DOM0)
        deadline = time.monotonic() + XENSTORED_START
        while not self.toolstack.connect():
            if time.monotonic() > deadline or DOMID_DOM0 not in self.domains:
                raise XmpError(f"dom0's xenstored did not start within {XENSTORED_START:.0f} s "
                               f"(see {self.rundir / 'logs' / 'Domain-0.log'})")
            self._iterate(0.01)
        assert self.toolstack.sock is not None
        self.sel.register(self.toolstack.sock, selectors.EVENT_READ, ("xs", None))
        self.toolstack.send(dom0_tree(), "dom0")
        for cfg in self.topology.domains:
            self._create(cfg)

    def create_domain(self, cfg_dict: dict) -> Domain:
        try:
            cfg = DomainConfig.from_dict(cfg_dict)
        except XmpError as exc:
            raise HypercallError(errno.EINVAL, "createdomain", str(exc)) from None
        return self._create(cfg)

    def _prepare_disks(self, cfg: DomainConfig) -> list[tuple[DiskSpec, Path, Domain]]:
        """Each disk's backend domain and image file, before the domain is built:
        a relative target is relative to the file the domain came from."""
        base = Path(cfg.source.rsplit(":", 1)[0]).parent if cfg.source else Path.cwd()
        return [self._prepare_disk(parse_diskspec(text), base) for text in cfg.disk]

    def _prepare_disk(self, spec: DiskSpec, base: Path) -> tuple[DiskSpec, Path, Domain]:
        """A missing image with ``size=`` is created sparse (never a present one)."""
        back = self.domains.get(DOMID_DOM0) if spec.backend in (None, "Domain-0", "0") \
            else self.find(spec.backend)
        if back is None:
            raise HypercallError(errno.ESRCH, "createdomain", f"disk {spec.vdev}: no backend domain")
        if spec.target is None:
            raise HypercallError(errno.EINVAL, "createdomain", f"disk {spec.vdev}: no target")
        image = Path(spec.target) if Path(spec.target).is_absolute() else base / spec.target
        if not image.exists():
            if spec.size_bytes is None:
                raise HypercallError(errno.ENOENT, "createdomain", f"disk {spec.vdev}: {image} "
                                     "does not exist (give size=… to create it)")
            image.parent.mkdir(parents=True, exist_ok=True)
            with open(image, "xb") as f:
                f.truncate(spec.size_bytes)
            self.log(f"created image {image} ({spec.size_bytes} bytes, sparse)")
        return spec, image.resolve(), back

    def _alloc_domid(self) -> int:
        # Ids are not reused within a supervisor's life, as in Xen: nothing
        # keyed by an old id can reach the new domain.
        domid = self.next_domid
        if domid > MAX_DOMID:
            raise HypercallError(errno.ENOSPC, "createdomain", "out of domain ids")
        self.next_domid += 1
        return domid

    def _create(self, cfg: DomainConfig, domid: int | None = None, name: str | None = None) -> Domain:
        name = name or cfg.name
        if any(d.name == name and d.state != DomState.DYING for d in self.domains.values()):
            raise HypercallError(errno.EEXIST, "createdomain", f"a domain named {name!r} already exists")
        used = sum(d.tot_pages for d in self.domains.values()) * PAGE_SIZE // MIB
        try:
            check_fits(self.pool_pages * PAGE_SIZE // MIB + used, used, cfg)
        except XmpError as exc:
            raise HypercallError(errno.ENOMEM, "createdomain", str(exc)) from None
        disks = self._prepare_disks(cfg) if domid != DOMID_DOM0 else []  # may refuse: nothing built yet
        if domid is None:
            domid = self._alloc_domid()
        mem_pages = cfg.memory_mib * MIB // PAGE_SIZE
        self.pool_take(mem_pages, "createdomain")
        try:
            dom = build_domain(self.ns, domid, cfg, name)
        except BaseException:
            self.pool_give(mem_pages)
            raise
        dom.uuid = str(uuid.uuid4())
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        log_fd = os.open(self.rundir / "logs" / f"{name}.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            dom.pid = self.zygote.spawn(domid, f"xmp:{domid}:{name}", theirs.fileno(), log_fd,
                                        unprivileged=domid != DOMID_DOM0,
                                        jail="driver" if cfg.driver_domain else "guest")
        except OSError:
            ours.close()
            dom.release()
            self.pool_give(mem_pages)
            raise
        finally:
            theirs.close()
            os.close(log_fd)
        dom.sock = ours
        self.domains[domid] = dom
        default_kernel = DOM0_KERNEL if domid == DOMID_DOM0 else DRIVER_DOMAIN_KERNEL if cfg.driver_domain \
            else None
        boot: dict[str, Any] = {"domid": domid, "name": name, "config": cfg.to_dict(),
                                "kernel": cfg.kernel or default_kernel}
        fds = [dom.ram.fd, dom.evt_obj.fd]
        if domid == DOMID_DOM0:
            boot["rundir"] = str(self.rundir)
            boot["dom0_kernel"] = DOM0_KERNEL
            if self.echo_fd is not None:
                fds.append(self.echo_fd)
        send_handles(ours, encode(boot), fds)
        self.sel.register(ours, selectors.EVENT_READ, ("hc", dom))
        if domid != DOMID_DOM0:
            tree = domain_tree(domid, name, dom.uuid, cfg.memory_mib * 1024, cfg.maxmem_mib * 1024,
                               cfg.vcpus, cfg.maxvcpus, dom.console_port, dom.store_port, cfg.xenstore_quota)
            self.toolstack.send(tree, f"building dom{domid}")
            for spec, image, back in disks:
                self.attach_disk(dom, spec, image, back)
        self.log(f"created dom{domid} {name!r} ({cfg.memory_mib} MiB, {cfg.vcpus} vcpu, pid {dom.pid})")
        self.raise_dom_exc()
        return dom

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
        if dom.sock is not None:
            self.sel.unregister(dom.sock)
            dom.sock.close()
            dom.sock = None
        # Grants it mapped from others: unpinned, in-use bits cleared.
        for m in dom.maptrack.values():
            granter = self.domains.get(m.granter)
            if granter is not None:
                granter.grants.unmap_grant_ref(m.refs, m.readonly)
        dom.maptrack.clear()
        # Its ports: interdomain peers revert to unbound and are poked.
        for port in list(dom.ports.bound()):
            self.close_port(dom, port)
        for key in [k for k in self.timer_gen if k[0] == dom.domid]:
            del self.timer_gen[key]
        self.log(f"dom{dom.domid} {dom.name!r} {reason}")
        if dom.domid == DOMID_DOM0:
            self._drop_toolstack()
            self.host_down(f"dom0 {reason}", failed=failed)
            return
        self.toolstack.send(teardown_tree(dom.domid, dom.uuid), f"releasing dom{dom.domid}")
        self.devices = [d for d in self.devices if d.front != dom.domid]
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
        for dom in [d for d in self.domains.values() if d.state == DomState.DYING]:
            holders = self.mapped_by(dom)
            waiting = holders or (dom.console_undrained() and DOMID_DOM0 in self.domains)
            if waiting and not force and now - dom.dying_since < DYING_GRACE:
                continue
            if holders:
                self.log(f"dom{dom.domid} freed while still mapped by {holders}")
            self.pool_give(dom.tot_pages)
            del self.domains[dom.domid]
            dom.release()
            self.raise_dom_exc()

    def _toolstack_wants_write(self, on: bool) -> None:
        sock = self.toolstack.sock
        if sock is not None and sock.fileno() in self._registered():
            events = selectors.EVENT_READ | (selectors.EVENT_WRITE if on else 0)
            self.sel.modify(sock, events, ("xs", None))

    def _registered(self) -> set[int]:
        return {key.fd for key in self.sel.get_map().values()}

    def _drop_toolstack(self) -> None:
        if self.toolstack.sock is not None:
            self.sel.unregister(self.toolstack.sock)
            self.toolstack.close()

    def attach_device(self, front: Domain, back: Domain, devtype: str, devid: int,
                      back_keys: dict[str, str], front_keys: dict[str, str]) -> Device:
        """Write a split device's two directories (libxl__device_generic_add)."""
        if any(d.front == front.domid and d.devtype == devtype and d.devid == devid for d in self.devices):
            raise HypercallError(errno.EEXIST, "device-attach", f"{front.name} already has {devtype} {devid}")
        dev = Device(front.domid, back.name, back.domid, devtype, devid, back_keys, front_keys)
        self.devices.append(dev)
        self.toolstack.send(device_tree(dev.front, dev.back_domid, devtype, devid, back_keys, front_keys),
                            f"adding {devtype} {devid} to dom{front.domid}")
        return dev

    def attach_disk(self, dom: Domain, spec: DiskSpec, image: Path, back: Domain) -> Device:
        return self.attach_device(dom, back, "vbd", spec.devid,
                                  {"params": str(image), "mode": "r" if spec.readonly else "w",
                                   "device-type": spec.devtype, "type": "file"},
                                  {"virtual-device": str(spec.devid), "device-type": spec.devtype})

    def block_attach(self, dom: Domain, text: str, base: Path) -> Device:
        """xl block-attach: hot-plug a disk into a running guest."""
        try:
            spec = parse_diskspec(text)
        except XmpError as exc:
            raise HypercallError(errno.EINVAL, "block-attach", str(exc)) from None
        return self.attach_disk(dom, *self._prepare_disk(spec, base))

    def block_detach(self, dom: Domain, vdev: str, force: bool) -> Device:
        """xl block-detach: the backend is told to close (online 0, Closing);
        ``force`` (or once it is Closed) removes both directories."""
        try:
            devid = vdev_devid(vdev) if not vdev.isdigit() else int(vdev)
        except XmpError as exc:
            raise HypercallError(errno.EINVAL, "block-detach", str(exc)) from None
        dev = next((d for d in self.devices
                    if d.front == dom.domid and d.devtype == "vbd" and d.devid == devid), None)
        if dev is None:
            raise HypercallError(errno.ENOENT, "block-detach", f"{dom.name} has no disk {vdev}")
        bpath = f"/local/domain/{dev.back_domid}/backend/vbd/{dom.domid}/{devid}"
        fpath = f"/local/domain/{dom.domid}/device/vbd/{devid}"
        if force:
            self.devices.remove(dev)
            self.toolstack.send([(XsType.RM, f"{fpath}\0".encode()), (XsType.RM, f"{bpath}\0".encode())],
                                f"removing vbd {devid} of dom{dom.domid}")
        else:
            self.toolstack.send([(XsType.WRITE, f"{bpath}/online\0".encode() + b"0"),
                                 (XsType.WRITE, f"{bpath}/state\0".encode() + b"5")],
                                f"closing vbd {devid} of dom{dom.domid}")
        return dev

    def _rehome_devices(self, old: int, new: Domain) -> None:
        """A backend domain came back (restart) with a new id: point its
        devices at it -- the frontends reconnect, as after a backend restart."""
        for dev in self.devices:
            if dev.back_domid != old or dev.front not in self.domains:
                continue
            dev.back_domid = new.domid
            reqs = move_backend_tree(dev.front, new.domid, dev.devtype, dev.devid, dev.back_keys)
            self.toolstack.send(reqs, f"moving {dev.devtype} {dev.devid} of dom{dev.front} to dom{new.domid}")
            self.log(f"{dev.devtype} {dev.devid} of dom{dev.front}: backend now dom{new.domid}")

    def request_shutdown(self, dom: Domain, reason: str) -> None:
        """xl shutdown/reboot: ask the guest through control/shutdown."""
        if dom.domid == DOMID_DOM0:
            raise HypercallError(errno.EINVAL, "shutdown", "dom0 is stopped with `xmp destroy Domain-0`")
        if dom.state != DomState.RUNNING:
            raise HypercallError(errno.EINVAL, "shutdown", f"{dom.name} is {dom.state.value}")
        self.toolstack.write(f"/local/domain/{dom.domid}/control/shutdown", reason,
                             f"{reason} request to dom{dom.domid}")
        self.log(f"asked dom{dom.domid} {dom.name!r} to {reason}")

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
                "maxmem_kb": len(dom.populated) * PAGE_SIZE // 1024, "vcpus": dom.cfg.vcpus,
                "cpu_time": round(cpu, 3), "console_port": dom.console_port, "console_gref": 0,
                "store_port": dom.store_port, "driver_domain": dom.cfg.driver_domain}

    # -- a domain's end ----------------------------------------------------

    def _gone(self, dom: Domain) -> None:
        """The domain's process has ended (its channel hit EOF)."""
        if dom.domid not in self.domains or dom.state == DomState.DYING:
            return
        dom.cpu_time_final = process_cpu_seconds(dom.pid)
        if dom.sock is not None:
            self.sel.unregister(dom.sock)
            dom.sock.close()
            dom.sock = None
        reason = dom.shutdown_reason if dom.state == DomState.SHUTDOWN else "crash"
        if reason == "crash":
            dom.state, dom.shutdown_reason = DomState.SHUTDOWN, "crash"
            self.log(f"dom{dom.domid} {dom.name!r} crashed")
        dom.pid = None
        self.apply_action(dom, reason or "poweroff")

    def apply_action(self, dom: Domain, reason: str) -> None:
        cfg = dom.cfg
        if dom.domid == DOMID_DOM0:  # dom0 ending by itself takes the host down, as a failure
            self.destroy_domain(dom, "crashed" if reason == "crash" else f"shut down ({reason})",
                                failed=True)
            return
        action = {"poweroff": cfg.on_poweroff, "reboot": cfg.on_reboot, "crash": cfg.on_crash,
                  "watchdog": "destroy", "soft_reset": "restart"}.get(reason, "preserve")
        self.raise_dom_exc()
        if reason == "crash" and action not in ("restart", "rename-restart", "coredump-restart"):
            self.exit_code = 1
        configured = action
        if action.startswith("coredump-"):
            self.coredump(dom)
            action = action.removeprefix("coredump-")
        if action == "preserve":
            return
        if action == "rename-restart":
            dom.name = f"{dom.name}-{dom.domid}"
            self.log(f"dom{dom.domid} renamed to {dom.name!r} and preserved")
        else:
            self.destroy_domain(dom, f"destroyed ({reason}: on_{_on(reason)} = {configured})")
        if action in ("restart", "rename-restart") and not self.stopping:
            if self._restart_allowed(cfg.name):
                self._rehome_devices(dom.domid, self._create(cfg))
            else:
                self.exit_code = 1
                self.log(f"{cfg.name!r} restarted {RESTART_LIMIT[0]} times in {RESTART_LIMIT[1]:.0f} s: "
                         "not restarting it again")

    def _restart_allowed(self, name: str) -> bool:
        now = time.monotonic()
        times = self.restarts.setdefault(name, deque(maxlen=RESTART_LIMIT[0]))
        if len(times) == times.maxlen and now - times[0] < RESTART_LIMIT[1]:
            return False
        times.append(now)
        return True

    def coredump(self, dom: Domain) -> Path:
        path = self.rundir / "dumps" / f"{dom.name}-{dom.domid}.core"
        with open(path, "wb") as f:
            f.write(dom.ram_map)
        self.log(f"dom{dom.domid} memory written to {path}")
        return path

    # -- timers ------------------------------------------------------------

    def set_timer(self, dom: Domain, vcpu: int, deadline_ns: int) -> None:
        key = (dom.domid, vcpu)
        gen = self.timer_gen.get(key, 0) + 1
        self.timer_gen[key] = gen
        if deadline_ns:
            heapq.heappush(self.timers, (deadline_ns, gen, dom.domid, vcpu))

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
        return (self.timers[0][0] - now) / 1e9 if self.timers else None

    # -- the loop ----------------------------------------------------------

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

    def run(self, ready=None) -> int:
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            self.start()
            if ready is not None:
                ready()
            while not self.stopping:
                timeout = self._fire_timers()
                self._iterate(0.5 if timeout is None else min(max(timeout, 0), 0.5))
                self._fire_timers()
                self.reap_dying()
                if self.stop_when_guests_gone and self.topology.domains and not [
                        d for d in self.domains.values()
                        if d.domid != DOMID_DOM0 and not d.cfg.driver_domain]:
                    self.stop("every guest has gone")
        finally:
            self.teardown()
            for s, h in old.items():
                signal.signal(s, h)
        return self.exit_code

    def _iterate(self, timeout: float) -> None:
        for key, mask in self.sel.select(timeout):
            kind, obj = key.data
            if kind == "hc":
                self._hypercall(obj)
            elif kind == "zygote":
                self.zygote.drain()
            elif kind == "listen":
                self.control.accept(self.sel)
            elif kind == "ctl":
                self.control.serve(self.sel, obj)
            elif kind == "signal":
                self._wake_r.recv(64)
            elif kind == "xs":
                if mask & selectors.EVENT_WRITE:
                    self.toolstack.flush()
                if mask & selectors.EVENT_READ and self.toolstack.sock is not None:
                    self.toolstack.readable()
                # (unless dom0's end, earlier in this batch, already dropped it)
                if self.toolstack.sock is None and self.sel.get_map().get(key.fd) is key:
                    self.sel.unregister(key.fileobj)

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
        try:
            op, cmd, args = decode_request(data)
            if op in DOM0_ONLY and not dom.privileged:
                raise HypercallError(errno.EPERM, f"{op}/{cmd}", f"dom{dom.domid} is not privileged")
            ret, reply_fds = getattr(self, f"hc_{op}_{cmd}")(dom, args)
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
            send_handles(dom.sock, encode(reply), reply_fds)
        except OSError:
            self._gone(dom)

    def teardown(self) -> None:
        # Guests are asked to power off; only those that do not are destroyed.
        asked = [d for d in self.domains.values()
                 if d.domid != DOMID_DOM0 and d.state == DomState.RUNNING and self.toolstack.sock is not None]
        for dom in asked:
            self.request_shutdown(dom, "poweroff")
        deadline = time.monotonic() + (SHUTDOWN_GRACE if asked else 0)
        while time.monotonic() < deadline and any(d.domid in self.domains and d.state != DomState.DYING
                                                  for d in asked):
            self._iterate(0.05)
            self._fire_timers()
            self.reap_dying()
        for dom in sorted(self.domains.values(), key=lambda d: -d.domid):
            if dom.domid != DOMID_DOM0:
                self.destroy_domain(dom, "destroyed (supervisor stopping)")
        # dom0 still runs: give it a moment to drain what the guests wrote.
        deadline = time.monotonic() + 2
        while [d for d in self.domains.values() if d.state == DomState.DYING] \
                and time.monotonic() < deadline and DOMID_DOM0 in self.domains:
            self._iterate(0.05)
            self.reap_dying()
        dom0 = self.domains.get(DOMID_DOM0)
        if dom0 is not None:
            self.destroy_domain(dom0, "destroyed (supervisor stopping)")
        self.reap_dying(force=True)
        self._drop_toolstack()
        self.control.close()
        (self.rundir / "xenstored.sock").unlink(missing_ok=True)
        for sock in (self.rundir / "console").glob("*.sock"):  # dom0's, if it could not
            sock.unlink(missing_ok=True)
        self.zygote.close()
        self.sel.close()
        self._wake_r.close()
        self._wake_w.close()
        if self.echo_fd is not None:
            os.close(self.echo_fd)
            self.echo_fd = None
        self.log(f"stopped ({self.stop_reason or 'done'}), exit status {self.exit_code}")
        self.hvlog.close()


def _on(reason: str) -> str:
    return {"poweroff": "poweroff", "reboot": "reboot", "crash": "crash"}.get(reason, reason)
