"""The toolstack: libxl's job, driving the hypervisor through its domain API.

It builds domains from their configs (memory, kernel, the xenstore tree
libxl writes, every device of any class the config lists), adds and
removes devices, applies ``on_poweroff`` / ``on_reboot`` / ``on_crash``
with a restart rate limit, writes core dumps, asks guests to shut down,
and stops the host in order.  What it made is recorded once, in its
:class:`DomainRecord` per domain -- the record save and migration carry.

It runs in the supervisor's process and loop (as libxl runs in xl's), is
told of domain ends by the hypervisor (:class:`~xmp.hypervisor.DomainEvents`),
and reaches xenstore over dom0's xenstored socket, asynchronously: an
INTRODUCE needs hypercalls the loop serves, so nothing here may wait
inline for a reply.
"""

from __future__ import annotations

import dataclasses
import errno
import selectors
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xmp import devices
from xmp.domid import DOMID_DOM0
from xmp.errors import HypercallError, XmpError
from xmp.hv.domain import Domain, DomState
from xmp.hypervisor import Supervisor
from xmp.reaper import REAPER
from xmp.toolstack import sched
from xmp.toolstack.devices import Device, DeviceManager, Planned
from xmp.toolstack.xs import XsConnection, _z, dom0_tree, domain_tree, teardown_tree
from xmp.topology import DomainConfig, Topology, check_name
from xmp.xenstore.wire import XsType

DOM0_KERNEL = "xmp.dom0:main"
DRIVER_DOMAIN_KERNEL = "xmp.drivers.backends:main"  # a driver domain without a kernel of its own
RESTART_LIMIT = (10, 10.0)  # at most 10 restarts of one name in 10 s
XENSTORED_START = 15.0      # seconds dom0 gets to bring xenstored up
SHUTDOWN_GRACE = 5.0        # seconds guests get to power off when the host stops


@dataclass
class DomainRecord:
    """What the toolstack knows of a domain it built: its config and the
    devices it has now (hot-plugged ones included)."""

    domid: int
    cfg: DomainConfig
    devices: list[Device] = field(default_factory=list)
    start_time: float = field(default_factory=time.time)  # wall clock, as libxl's /vm/<uuid>/start_time
    target_kb: int = 0  # the balloon target last written (memory/target; xmp mem-set)

    def save(self, domain_name: Callable[[int], str]) -> dict[str, Any]:
        """JSON-safe; backends by name (ids differ from host to host)."""
        return {"config": self.cfg.to_dict(), "target_kb": self.target_kb,
                "devices": [{"class": d.cls.kind, "devid": d.devid, "name": d.spec.name,
                             "backend": domain_name(d.back_domid), "back_keys": dict(d.spec.back_keys),
                             "front_keys": dict(d.spec.front_keys)} for d in self.devices]}

    @classmethod
    def restore(cls, data: dict[str, Any], domid: int, backend_domid: Callable[[str], int]) -> DomainRecord:
        """The record of the domain restored as ``domid``; the config is
        checked as a fresh one, every device's class and backend must exist
        here (else XmpError, and nothing is made)."""
        try:
            cfg = DomainConfig.from_dict(data["config"], "<saved domain>")
            rec = cls(domid, cfg)
            for d in data["devices"]:
                kind = next((c for c in devices.DEVICE_CLASSES if c.kind == d["class"]), None)
                if kind is None:
                    raise XmpError(f"a saved device is of class {d['class']!r}, which this host lacks")
                keys = [d["back_keys"], d["front_keys"]]
                if not all(map(devices.are_keys, keys)) or not isinstance(d["devid"], int) \
                        or not isinstance(d["name"], str):
                    raise XmpError(f"a saved {kind.devtype} device is malformed")
                spec = devices.DeviceSpec(d["devid"], d["name"], d["backend"], *keys)
                rec.devices.append(Device(domid, backend_domid(d["backend"]), kind, spec))
        except (KeyError, TypeError) as exc:
            raise XmpError(f"a saved domain record is malformed: {exc!r}") from None
        return rec


def preload_modules(topology: Topology) -> set[str]:
    """What the zygote imports once for every domain it forks."""
    return ({d.kernel.split(":")[0] for d in topology.domains if d.kernel}
            | {DOM0_KERNEL.split(":")[0], DRIVER_DOMAIN_KERNEL.split(":")[0], *devices.frontend_modules()})


class Toolstack:
    def __init__(self, sup: Supervisor, topology: Topology, *, stop_when_guests_gone: bool = True):
        self.sup = sup
        self.topology = topology
        self.stop_when_guests_gone = stop_when_guests_gone
        self.records: dict[int, DomainRecord] = {}
        self.restarts: dict[str, deque[float]] = {}
        self.xs = XsConnection(sup.rundir / "xenstored.sock", sup.log, self._xs_wants_write, sup.unwatch)
        for group in sched.remove_stale():
            sup.log(f"removed the cgroup {group} of a supervisor that is gone")
        self.credit = sched.CreditScheduler()   # sched-credit's cgroups: removed by close()
        self.devices = DeviceManager(self)
        self.devices.open_host(topology.host)
        from xmp.toolstack.save import SaveRestore  # here: it imports this module (DomainRecord)
        self.saves = SaveRestore(self)
        from xmp.toolstack.migrate import Migrations  # here: it imports this module too
        self.migrations = Migrations(self)
        self.migrate_key: bytes | None = None   # the host's migration key, when it has one
        sup.events = self
        # No supervisor runs here (the control socket proved it): sockets left
        # by one that was killed are stale.
        for sock in [*(sup.rundir / "console").glob("*.sock"), sup.rundir / "xenstored.sock"]:
            sock.unlink(missing_ok=True)

    # -- the host's start and stop ----------------------------------------

    def boot(self) -> None:
        """dom0, its xenstored, then every domain of the topology in order;
        a stop asked meanwhile (Ctrl-C, SIGTERM) is honoured at once."""
        self.create(self.topology.dom0, domid=DOMID_DOM0)
        deadline = time.monotonic() + XENSTORED_START
        while not self.xs.connect():
            if self.sup.stopping:
                return
            if time.monotonic() > deadline or DOMID_DOM0 not in self.sup.domains:
                raise XmpError(f"dom0's xenstored did not start within {XENSTORED_START:.0f} s "
                               f"(see {self.sup.rundir / 'logs' / 'Domain-0.log'})")
            self.sup.iterate(0.01)
        assert self.xs.sock is not None
        self.sup.watch(self.xs.sock, selectors.EVENT_READ, self._xs_ready)
        self.xs.send(dom0_tree(), "dom0")
        for cfg in self.topology.domains:
            if self.sup.stopping:
                self.sup.log(f"start-up interrupted: {len(self.records) - 1} of "
                             f"{len(self.topology.domains)} domains created")
                return
            self.create(cfg)

    def shutdown(self) -> None:
        """The host stops: guests are asked to power off; those that do not
        within :data:`SHUTDOWN_GRACE` are destroyed by the supervisor."""
        asked = [d for d in self.sup.domains.values()
                 if d.domid != DOMID_DOM0 and d.state == DomState.RUNNING and self.xs.sock is not None]
        for dom in asked:
            self.request_shutdown(dom, "poweroff")
        deadline = time.monotonic() + (SHUTDOWN_GRACE if asked else 0)
        while time.monotonic() < deadline and any(d.domid in self.sup.domains and d.state != DomState.DYING
                                                  for d in asked):
            self.sup.iterate(0.05)

    def close(self) -> None:
        self.credit.close()
        self.migrations.close()
        self.devices.close()
        self.xs.close()
        REAPER.close()   # what is still listed (nothing, after a clean stop) goes now
        (self.sup.rundir / "xenstored.sock").unlink(missing_ok=True)
        for sock in (self.sup.rundir / "console").glob("*.sock"):  # dom0's, if it could not
            sock.unlink(missing_ok=True)

    def _xs_ready(self, mask: int) -> None:
        if mask & selectors.EVENT_WRITE:
            self.xs.flush()
        if mask & selectors.EVENT_READ and self.xs.sock is not None:
            self.xs.readable()

    def _xs_wants_write(self, on: bool) -> None:
        sock = self.xs.sock
        if sock is not None and self.sup.watching(sock):
            self.sup.modify(sock, selectors.EVENT_READ | (selectors.EVENT_WRITE if on else 0), self._xs_ready)

    # -- building domains ---------------------------------------------------

    def create_config(self, cfg_dict: dict) -> Domain:
        try:
            cfg = DomainConfig.from_dict(cfg_dict)
        except XmpError as exc:
            raise HypercallError(errno.EINVAL, "createdomain", str(exc)) from None
        return self.create(cfg)

    createdomain = create_config  # XEN_DOMCTL_createdomain from dom0 (DomainEvents)

    def create(self, cfg: DomainConfig, domid: int | None = None, name: str | None = None, *,
               planned: list[Planned] | None = None, restore: dict[str, Any] | None = None,
               prepare: Callable[[Domain], None] | None = None, paused: bool = False,
               target_kb: int | None = None) -> Domain:
        """libxl_domain_create_new: check every device first (nothing is
        built if one is wrong), build the domain, write its tree, add its
        devices.  A restore (libxl_domain_create_restore) brings its own
        ``planned`` devices, ``restore`` for the boot message and
        ``prepare`` to fill the RAM before the domain runs; ``paused``: it
        runs nothing until unpaused; ``target_kb``: its balloon target, when
        not the config's memory (a restored guest keeps the one it had)."""
        self.sup.check_build(cfg, name, dom0=domid == DOMID_DOM0)  # before a device's files are made
        if planned is None:
            planned = [] if domid == DOMID_DOM0 else self.devices.plan(cfg)
        kernel = cfg.kernel or (DOM0_KERNEL if domid == DOMID_DOM0 else
                                DRIVER_DOMAIN_KERNEL if cfg.driver_domain else None)
        boot: dict[str, Any] = dict(restore or {})
        fds: list[int] = []
        if domid == DOMID_DOM0:
            boot = {"rundir": str(self.sup.rundir), "dom0_kernel": DOM0_KERNEL}
            if self.sup.echo_fd is not None:
                fds.append(self.sup.echo_fd)
        dom = self.sup.build(cfg, kernel or "", domid=domid, name=name, boot=boot, extra_fds=fds,
                             prepare=prepare, paused=paused)
        target = cfg.memory_mib * 1024 if target_kb is None else target_kb
        rec = self.records[dom.domid] = DomainRecord(dom.domid, cfg, target_kb=target)
        if dom.domid != DOMID_DOM0:
            tree = domain_tree(dom.domid, dom.name, dom.uuid, target, cfg.maxmem_mib * 1024,
                               cfg.vcpus, cfg.maxvcpus, dom.console_port, dom.store_port, cfg.xenstore_quota)
            # libxl's format: seconds and hundredths (what `xl uptime` reads back)
            start = f"{int(rec.start_time)}.{int(rec.start_time * 100) % 100:02d}"
            tree.append((XsType.WRITE, _z(f"/vm/{dom.uuid}/start_time") + start.encode()))
            self.xs.send(tree, f"building dom{dom.domid}")
            for plan in planned:
                self.devices.add(dom, plan)
        return dom

    def record(self, dom: Domain) -> DomainRecord:
        rec = self.records.get(dom.domid)
        if rec is None:
            raise HypercallError(errno.ESRCH, "toolstack", f"dom{dom.domid} was not built by the toolstack")
        return rec

    # -- shutdown, and what follows a domain's end ---------------------------

    def request_shutdown(self, dom: Domain, reason: str) -> None:
        """xl shutdown/reboot: ask the guest through control/shutdown."""
        if dom.domid == DOMID_DOM0:
            raise HypercallError(errno.EINVAL, "shutdown", "dom0 is stopped with `xmp destroy Domain-0`")
        if dom.state != DomState.RUNNING:
            raise HypercallError(errno.EINVAL, "shutdown", f"{dom.name} is {dom.state.value}")
        self.xs.write(f"/local/domain/{dom.domid}/control/shutdown", reason,
                      f"{reason} request to dom{dom.domid}")
        self.sup.log(f"asked dom{dom.domid} {dom.name!r} to {reason}")

    def rename(self, dom: Domain, name: str) -> None:
        """libxl_domain_rename: the hypervisor's name, xenstore's
        (``/local/domain/N/name``, ``/vm/<uuid>/name``) and the record's
        config, so a restart keeps the new name."""
        if dom.domid == DOMID_DOM0:
            raise HypercallError(errno.EINVAL, "rename", "Domain-0 keeps its name")
        if dom.state == DomState.DYING:
            raise HypercallError(errno.EINVAL, "rename", f"{dom.name} is dying")
        try:
            check_name(name)
        except XmpError as exc:
            raise HypercallError(errno.EINVAL, "rename", str(exc)) from None
        if any(d.name == name and d is not dom and d.state != DomState.DYING
               for d in self.sup.domains.values()):
            raise HypercallError(errno.EEXIST, "rename", f"a domain named {name!r} already exists")
        rec = self.record(dom)
        self.sup.rename(dom, name)
        rec.cfg = dataclasses.replace(rec.cfg, name=name)
        dom.cfg = rec.cfg
        self.xs.send([(XsType.WRITE, _z(f"/local/domain/{dom.domid}/name") + name.encode()),
                      (XsType.WRITE, _z(f"/vm/{dom.uuid}/name") + name.encode())], f"renaming dom{dom.domid}")

    def sysrq(self, dom: Domain, key: str) -> None:
        """libxl_send_sysrq: the key goes to the guest's ``control/sysrq``,
        where its control driver takes it (and clears it), as Linux's does."""
        if len(key) != 1 or not key.isprintable():
            raise HypercallError(errno.EINVAL, "sysrq", f"a sysrq is one letter, not {key!r}")
        if dom.domid == DOMID_DOM0:
            raise HypercallError(errno.EINVAL, "sysrq", "Domain-0 takes no sysrq (it runs no control driver)")
        if dom.state == DomState.DYING:
            raise HypercallError(errno.EINVAL, "sysrq", f"{dom.name} is dying")
        self.xs.write(f"/local/domain/{dom.domid}/control/sysrq", key, f"sysrq {key!r} to dom{dom.domid}")
        self.sup.log(f"sysrq {key!r} sent to dom{dom.domid} {dom.name!r}")

    def trigger(self, dom: Domain, what: str) -> None:
        """libxl_send_trigger, for what an xmp domain has:

        * ``nmi``: the guest panics, as a Linux guest booted with
          ``unknown_nmi_panic`` does (what admins send a hung guest for a
          dump): a crash, so ``on_crash`` applies -- even to a guest that
          does not answer anything;
        * ``reset``: the reset line: the domain ends at once as if it
          rebooted, so ``on_reboot`` applies;
        * ``power``: the ACPI power button; an xmp guest has no ACPI, so it
          gets what the button makes Linux do, an orderly poweroff, through
          ``control/shutdown``.

        ``init`` (an INIT IPI), ``sleep`` and ``s3resume`` (ACPI S3) are
        refused: xmp's vCPUs have no local APIC and its guests no S3 state
        (``xmp suspend`` is Xen's checkpoint suspend, a different thing)."""
        if what == "nmi":
            self.sup.remote_shutdown(dom, "crash")
        elif what == "reset":
            self.sup.remote_shutdown(dom, "reboot")
        elif what == "power":
            self.request_shutdown(dom, "poweroff")
        elif what == "init":
            raise HypercallError(errno.ENOSYS, "trigger",
                                 "init: xmp's vCPUs have no local APIC to send an INIT to")
        elif what in ("sleep", "s3resume"):
            raise HypercallError(errno.ENOSYS, "trigger", f"{what}: xmp guests have no ACPI S3 sleep state")
        else:
            raise HypercallError(errno.EINVAL, "trigger",
                                 f"Invalid trigger \"{what}\" (nmi, reset, init, power, sleep or s3resume)")
        self.sup.log(f"trigger {what} sent to dom{dom.domid} {dom.name!r}")

    def domain_ended(self, dom: Domain, reason: str) -> None:
        """on_poweroff / on_reboot / on_crash, as libxl's domain death handling."""
        cfg = dom.cfg
        action = {"poweroff": cfg.on_poweroff, "reboot": cfg.on_reboot, "crash": cfg.on_crash,
                  "watchdog": "destroy", "soft_reset": "restart"}.get(reason, "preserve")
        if reason == "crash" and action not in ("restart", "rename-restart", "coredump-restart"):
            self.sup.exit_code = 1
        configured = action
        if action.startswith("coredump-"):
            try:
                self.coredump(dom)
            except HypercallError as exc:  # the action goes on without its dump
                self.sup.log(f"dom{dom.domid}: no core dump: {exc.detail}")
            action = action.removeprefix("coredump-")
        if action == "preserve":
            return
        if action == "rename-restart":
            self.sup.rename(dom, f"{dom.name}-{dom.domid}")
        else:
            self.sup.destroy_domain(dom, f"destroyed ({reason}: on_{reason} = {configured})")
        if action in ("restart", "rename-restart") and not self.sup.stopping:
            if self._restart_allowed(cfg.name):
                try:
                    new = self.create(cfg)
                except HypercallError as exc:  # a limit reached meanwhile: it stays down, the rest run
                    self.sup.exit_code = 1
                    self.sup.log(f"{cfg.name!r} not restarted: {exc}")
                    return
                self.devices.rehome(dom.domid, new)
            else:
                self.sup.exit_code = 1
                self.sup.log(f"{cfg.name!r} restarted {RESTART_LIMIT[0]} times in {RESTART_LIMIT[1]:.0f} s: "
                             "not restarting it again")

    def domain_destroyed(self, dom: Domain) -> None:
        """The hypervisor freed it: its tree goes, and so do the backend
        directories of its devices (a driver domain that is gone, or
        hostile, would leave them)."""
        rec = self.records.pop(dom.domid, None)
        self.credit.forget(dom.domid)
        if dom.domid == DOMID_DOM0:
            self.close()
            return
        self.xs.send(teardown_tree(dom.domid, dom.uuid), f"releasing dom{dom.domid}")
        if rec is not None:
            self.devices.forget(rec)
        if self.stop_when_guests_gone and self.topology.domains:
            self.sup.call_later(0, self._stop_if_guests_gone)  # after a restart this turn may make

    def _stop_if_guests_gone(self) -> None:
        if not [d for d in self.sup.domains.values()
                if d.domid != DOMID_DOM0 and not d.cfg.driver_domain and d.state != DomState.DYING]:
            self.sup.stop("every guest has gone")

    def _restart_allowed(self, name: str) -> bool:
        now = time.monotonic()
        times = self.restarts.setdefault(name, deque(maxlen=RESTART_LIMIT[0]))
        if len(times) == times.maxlen and now - times[0] < RESTART_LIMIT[1]:
            return False
        times.append(now)
        return True

    def coredump(self, dom: Domain, path: Path | None = None) -> Path:
        """The domain's RAM to ``path`` (default: the run directory's dumps/),
        as on_crash = coredump-* and xl dump-core do."""
        path = path or self.sup.rundir / "dumps" / f"{dom.name}-{dom.domid}.core"
        if dom.state == DomState.DYING:
            raise HypercallError(errno.EINVAL, "dump-core", f"{dom.name} is dying")
        try:
            with open(path, "wb") as f:
                f.write(self.sup.domain_memory(dom))
        except OSError as exc:
            raise HypercallError(exc.errno or errno.EIO, "dump-core",
                                 f"cannot write {path}: {exc.strerror}") from None
        self.sup.log(f"dom{dom.domid} memory written to {path}")
        return path
