"""Split devices of any class, as libxl's ``libxl_device.c`` handles them.

A device is added by writing its two xenstore directories (frontend under
the guest, backend under its backend domain) and recorded in the guest's
:class:`~xmp.toolstack.domains.DomainRecord`; it is removed as xl does --
the backend is told to close (``online = 0``, Closing), and once it is
Closed (or at once with force) both directories go.  The toolstack waits
for that itself, from the loop, so a detach finishes even if the ``xmp``
command that asked has gone.  What is class-specific -- the xl spec, the
keys, the list columns -- is the class's ``toolstack.py``
(:mod:`xmp.devices`).
"""

from __future__ import annotations

import errno
import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from xmp import devices
from xmp.devices import DeviceClass, DeviceSpec
from xmp.domid import DOMID_DOM0
from xmp.drivers.xenbus.state import XenbusState
from xmp.errors import HypercallError, LocalError, XmpError
from xmp.hv.domain import Domain
from xmp.toolstack.pending import Pending
from xmp.toolstack.xs import _z, device_tree, move_backend_tree
from xmp.topology import DomainConfig, HostConfig, source_folder
from xmp.xenstore.wire import Packet, XsType

if TYPE_CHECKING:
    from xmp.toolstack.domains import DomainRecord, Toolstack

DETACH_TIMEOUT = 10.0  # seconds a guest gets to close a device being detached (xl's default)


@dataclass
class Device:
    """A split device the toolstack made."""

    front: int
    back_domid: int
    cls: DeviceClass
    spec: DeviceSpec

    @property
    def devid(self) -> int:
        return self.spec.devid

    @property
    def front_path(self) -> str:
        return f"/local/domain/{self.front}/device/{self.cls.devtype}/{self.devid}"

    @property
    def back_path(self) -> str:
        return f"/local/domain/{self.back_domid}/backend/{self.cls.devtype}/{self.front}/{self.devid}"


@dataclass(frozen=True)
class Planned:
    cls: DeviceClass
    spec: DeviceSpec
    back: Domain


class DeviceManager:
    def __init__(self, ts: Toolstack):
        self.ts = ts
        self._tokens = itertools.count(1)

    def open_host(self, host: HostConfig) -> None:
        """Each class readies the host (``host_open`` in its toolstack.py:
        the network's bridges); what they say goes to the hypervisor's log."""
        for cls in devices.DEVICE_CLASSES:
            opener = getattr(cls.part("toolstack"), "host_open", None) if cls.has("toolstack") else None
            if opener is not None:
                for line in opener(host):
                    self.ts.sup.log(line)

    # -- adding ----------------------------------------------------------------

    def plan(self, cfg: DomainConfig) -> list[Planned]:
        """Every device a config lists, checked (and its files made) before
        the domain is built: a relative path is relative to the config's file."""
        base = Path(source_folder(cfg.source))
        out = []
        for cls in devices.with_config_key():
            for i, text in enumerate(cfg.devices.get(cls.config_key or "", ())):
                out.append(self._planned(cls, text, base, "createdomain", i))
        return out

    def _planned(self, cls: DeviceClass, text: str, base: Path, op: str, index: int = 0) -> Planned:
        part = cls.part("toolstack")
        try:
            parsed = part.parse(text)
            if hasattr(part, "indexed"):  # a class whose devid defaults to the spec's place (vif)
                parsed = part.indexed(parsed, index)
            if hasattr(part, "host_device"):  # a class handing out the host's own devices (pci)
                spec = part.host_device(self.ts, parsed, op)
            else:
                spec = part.device(parsed, base)
        except HypercallError as exc:  # the class's own errno (a path it cannot create), under our op
            raise HypercallError(exc.errno, op, exc.detail or str(exc)) from None
        except XmpError as exc:
            raise HypercallError(errno.EINVAL, op, str(exc)) from None
        return Planned(cls, spec, self._backend(spec, op))

    def _backend(self, spec: DeviceSpec, op: str) -> Domain:
        sup = self.ts.sup
        if spec.backend in (None, "Domain-0", "0"):
            back = sup.domains.get(DOMID_DOM0)
            if back is None:
                raise HypercallError(errno.ESRCH, op, f"{spec.name}: no backend domain (dom0 is gone)")
            return back
        try:
            return sup.find(spec.backend)
        except HypercallError:
            raise HypercallError(errno.ESRCH, op, f"{spec.name}: backend domain {spec.backend!r} "
                                 "does not exist") from None

    def add(self, front: Domain, plan: Planned, done: Pending | None = None) -> Device:
        """Write a device's two directories (libxl__device_generic_add) and
        record it; ``done`` settles once xenstore has taken every write."""
        rec = self.ts.record(front)
        if any(d.cls == plan.cls and d.devid == plan.spec.devid for d in rec.devices):
            raise HypercallError(errno.EEXIST, "device-add",
                                 f"{front.name} already has {plan.cls.devtype} {plan.spec.name}")
        dev = Device(front.domid, plan.back.domid, plan.cls, plan.spec)
        self._join(plan.back, plan.cls, plan.spec, "device-add")
        try:
            self.ts.xs.send(device_tree(front.domid, dev.back_domid, plan.cls.devtype, dev.devid,
                                        plan.spec.back_keys, plan.spec.front_keys),
                            f"adding {plan.cls.devtype} {dev.devid} to dom{front.domid}",
                            None if done is None else _settle(done, self._result(dev)))
        except LocalError as exc:  # more than xenstored takes: nothing was sent
            raise HypercallError(errno.E2BIG, "device-add", str(exc)) from None
        rec.devices.append(dev)
        return dev

    def attach(self, front: Domain, cls: DeviceClass, text: str, base: Path) -> Pending:
        """xl <class>-attach: hot-plug one device from its xl spec."""
        self._can_hotplug(f"{cls.command}-attach")
        done = Pending()
        taken = [d.devid for d in self.ts.record(front).devices if d.cls == cls]
        nextid = max(taken, default=-1) + 1  # libxl__device_nextid
        plan = self._planned(cls, text, base, f"{cls.command}-attach", nextid)
        hotplug = getattr(cls.part("toolstack"), "hotplug", None)  # the guest's side of it (a vif's TAP)
        if hotplug is not None:
            try:
                hotplug(front, plan.spec)
            except XmpError as exc:
                raise HypercallError(errno.EIO, f"{cls.command}-attach", str(exc)) from None
        self.add(front, plan, done)
        return done

    def attach_keys(self, front: Domain, back: Domain, cls: DeviceClass, devid: int,
                    back_keys: dict[str, str], front_keys: dict[str, str]) -> Pending:
        """The generic device add, with the keys given (tests and tools)."""
        self._can_hotplug("device-attach")
        done = Pending()
        self.add(front, Planned(cls, DeviceSpec(devid, str(devid), back.name, back_keys, front_keys), back),
                 done)
        return done

    def _can_hotplug(self, op: str) -> None:
        """Refuse a hot-plug that could not be written: while stopping
        (teardown serves the loop, so one still reaches us), or with no
        xenstore (the device would be recorded but never written)."""
        sup = self.ts.sup
        if sup.stopping:
            raise HypercallError(errno.ESHUTDOWN, op, f"the supervisor is stopping ({sup.stop_reason}): "
                                 "no new devices")
        if self.ts.xs.sock is None:
            raise HypercallError(errno.EIO, op, "xenstore unavailable: the device was not written")

    # -- removing ----------------------------------------------------------------

    def find(self, front: Domain, cls: DeviceClass, name: str) -> Device:
        mine = [d for d in self.ts.record(front).devices if d.cls == cls]
        try:
            devid = cls.part("toolstack").devid_of(name)
        except XmpError as exc:
            by_name = [d for d in mine if d.spec.name.lower() == name.lower()]  # a vif's MAC
            if not by_name:
                raise HypercallError(errno.EINVAL, f"{cls.command}-detach", str(exc)) from None
            devid = by_name[0].devid
        dev = next((d for d in mine if d.devid == devid), None)
        if dev is None:
            raise HypercallError(errno.ENOENT, f"{cls.command}-detach",
                                 f"{front.name} has no {cls.config_key or cls.devtype} {name}")
        return dev

    def detach(self, front: Domain, cls: DeviceClass, name: str, force: bool,
               timeout: float = DETACH_TIMEOUT) -> Pending:
        """xl <class>-detach: the backend is told to close (online 0,
        Closing); once it is Closed -- or at once with ``force`` -- both
        directories go.  A guest that does not let go within ``timeout``
        keeps the device, and the caller hears so."""
        dev = self.find(front, cls, name)
        done = Pending()
        if force:
            self._remove(dev, done)
            return done
        closing = str(int(XenbusState.CLOSING)).encode()
        self.ts.xs.send([(XsType.WRITE, _z(f"{dev.back_path}/online") + b"0"),
                         (XsType.WRITE, _z(f"{dev.back_path}/state") + closing)],
                        f"closing {cls.devtype} {dev.devid} of dom{front.domid}")
        token = f"detach-{next(self._tokens)}"
        state = f"{dev.back_path}/state"

        def check(_path: str) -> None:
            self.ts.xs.send([(XsType.READ, _z(state))], f"reading {state}", closed)

        def closed(replies: list[Packet]) -> None:
            value = replies[0].payload if replies and replies[0].type == XsType.READ else None
            if not done.done and (value is None or value == str(int(XenbusState.CLOSED)).encode()):
                self.ts.xs.unwatch(state, token)
                self._remove(dev, done)

        def expired() -> None:
            if not done.done:
                self.ts.xs.unwatch(state, token)
                done.fail(HypercallError(errno.ETIMEDOUT, f"{cls.command}-detach",
                                         f"{name} of {front.name} did not close within {timeout:g} s "
                                         "(the guest may still use it; --force removes it anyway)"))

        self.ts.xs.watch(state, token, check)
        self.ts.sup.call_later(timeout, expired)
        return done

    def _remove(self, dev: Device, done: Pending | None = None) -> None:
        rec = self.ts.records.get(dev.front)
        if rec is not None and dev in rec.devices:
            rec.devices.remove(dev)
        unplug = getattr(dev.cls.part("toolstack"), "unplug", None) if dev.cls.has("toolstack") else None
        front = self.ts.sup.domains.get(dev.front)
        if unplug is not None and front is not None:
            unplug(front, dev.spec)  # the guest's side of it (a vif's TAP in its namespace)
        self.ts.xs.send([(XsType.RM, _z(dev.front_path)), (XsType.RM, _z(dev.back_path))],
                        f"removing {dev.cls.devtype} {dev.devid} of dom{dev.front}",
                        None if done is None else _settle(done, self._result(dev), gone_is_fine=True))

    def forget(self, rec: DomainRecord) -> None:
        """The frontend's domain is gone (RELEASEd already, so its backends
        have seen it go): ``backend/<type>/<frontid>`` goes in every backend
        domain it had devices in, as libxl removes it itself rather than
        trust a driver domain to -- a dead or hostile one would keep the
        nodes and fill its quota.  Its own tree is removed with it."""
        for path in dict.fromkeys(dev.back_path.rsplit("/", 1)[0] for dev in rec.devices):
            self.ts.xs.send([(XsType.RM, _z(path))], f"removing {path} of dom{rec.domid}")
        rec.devices.clear()

    # -- listing and moving --------------------------------------------------------

    def list(self, front: Domain, cls: DeviceClass) -> Pending:
        """xl <class>-list: the class's columns, read from xenstore."""
        part = cls.part("toolstack")
        devs = sorted((d for d in self.ts.record(front).devices if d.cls == cls), key=lambda d: d.devid)
        reads = [(XsType.READ, _z(f"{d.front_path}/{key}")) for d in devs for key in part.LIST_KEYS]
        done = Pending()

        def rows(replies: list[Packet]) -> None:
            values = iter(r.payload.decode(errors="replace") if r.type == XsType.READ else None
                          for r in replies)
            out, found = [], []
            for dev in devs:
                keys = {k: v for k in part.LIST_KEYS if (v := next(values)) is not None}
                out.append(part.list_row(dev.devid, keys))
                found.append({"devid": dev.devid, "name": dev.spec.name, **keys})
            done.resolve({"domid": front.domid, "header": part.LIST_HEADER, "rows": out, "devices": found})

        self.ts.xs.send(reads, f"listing dom{front.domid}'s {cls.devtype}", rows)
        return done

    def move(self, dev: Device, back: Domain) -> None:
        """Point a device at another backend domain; the frontend follows
        (it starts over with the new backend, as after a migration)."""
        dev.back_domid = back.domid
        try:
            self._join(back, dev.cls, dev.spec, "device-move")
        except HypercallError as exc:  # the device still moves: its backend says why it fails
            self.ts.sup.log(str(exc))
        self.ts.xs.send(move_backend_tree(dev.front, back.domid, dev.cls.devtype, dev.devid,
                                          dev.spec.back_keys),
                        f"moving {dev.cls.devtype} {dev.devid} of dom{dev.front} to dom{back.domid}")
        self.ts.sup.log(f"{dev.cls.devtype} {dev.devid} of dom{dev.front}: backend now dom{back.domid}")

    def rehome(self, old: int, new: Domain) -> None:
        """A backend domain came back (restart) with a new id: its devices
        move to it -- the frontends reconnect, as after a backend restart."""
        for rec in self.ts.records.values():
            for dev in rec.devices:
                if dev.back_domid == old and dev.front in self.ts.sup.domains:
                    self.move(dev, new)

    def close(self) -> None:
        """The host is going: each class gives back what it made on it
        (``host_close`` in its toolstack.py: the network's bridges)."""
        for cls in devices.DEVICE_CLASSES:
            if cls.has("toolstack"):
                close = getattr(cls.part("toolstack"), "host_close", None)
                if close is not None:
                    try:
                        close()
                    except Exception as exc:  # the others still get theirs
                        self.ts.sup.log(f"{cls.kind}: cleanup failed: {exc}")

    @staticmethod
    def _join(back: Domain, cls: DeviceClass, spec: DeviceSpec, op: str) -> None:
        """The class joins its backend domain to the host (``join_backend``
        in its toolstack.py: a network driver domain's bridge to the host's)."""
        join = getattr(cls.part("toolstack"), "join_backend", None) if cls.has("toolstack") else None
        if join is not None:
            try:
                join(back, spec)
            except XmpError as exc:
                raise HypercallError(errno.EIO, op, str(exc)) from None

    @staticmethod
    def _result(dev: Device) -> dict[str, Any]:
        return {"domid": dev.front, "devid": dev.devid, "backend": dev.back_domid}


def _settle(done: Pending, result: dict[str, Any], gone_is_fine: bool = False):
    """A send()'s ``done`` that resolves ``done`` -- or fails it with the
    first error xenstore answered (ENOENT is no error when removing: a
    backend may have removed its directory itself)."""
    def finish(replies: list[Packet]) -> None:
        err = next((r for r in replies if r.type == XsType.ERROR
                    and not (gone_is_fine and r.payload.rstrip(b"\0") == b"ENOENT")), None)
        if err is None:
            done.resolve(result)
        else:
            name = err.payload.rstrip(b"\0").decode(errors="replace")
            done.fail(HypercallError(getattr(errno, name, errno.EIO), "xenstore",
                                     f"xenstore refused the device's directories: {name}"))
    return finish
