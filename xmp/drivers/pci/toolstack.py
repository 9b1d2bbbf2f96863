"""pci's part of the toolstack (libxl_pci.c): the host's assignable devices
and one pci device per xl spec.

xl keeps a device assignable by binding it to pciback
(``xl pci-assignable-add``); a guest may be given only an assignable
device, and one device goes to one guest at a time.  Here the host's
devices are the topology's ``[[host.pci]]``; which are assignable is the
toolstack's (per supervisor, :func:`host`), starting from their
``assignable`` keys; which guest holds one is read from the domain records
(one source of truth: a device leaves its guest's record when it is
detached or the guest is gone, and is assignable again at once).

Each spec becomes its own xenbus device ``device/pci/<devid>`` with
``num_devs = 1`` (Xen's libxl puts every device of a guest under devid 0 and
hot-plugs more through Reconfiguring; xmp's generic device layer adds one
directory per device instead -- pcifront and pciback read ``num_devs`` /
``dev-N`` either way).
"""

from __future__ import annotations

import errno
import weakref
from dataclasses import replace
from pathlib import Path
from typing import Any

from xmp.devices import DeviceSpec
from xmp.drivers.pci import spec as pcispec
from xmp.drivers.pci.protocol import Bdf, parse_bdf
from xmp.drivers.pci.spec import HostPci, PciSpec
from xmp.errors import HypercallError, XmpError

LIST_HEADER = f"{'Idx':<5}{'BE':>3}  {'state':<6}{'evt-ch':<7}BE-path"
LIST_KEYS = ("backend-id", "state", "event-channel", "backend")

parse = pcispec.parse


def name_of(spec: PciSpec) -> str:
    return str(spec.bdf)


def indexed(spec: PciSpec, index: int) -> PciSpec:
    """The devid is the spec's place in the list (or, hot-plugged, the next free one)."""
    return replace(spec, devid=index)


def devid_of(name: str) -> int:
    """A pci device is named by its BDF (``xmp pci-detach g 0000:00:04.0``),
    which the device layer then finds by name."""
    raise XmpError(f"{name!r}: name a pci device by its BDF, like 0000:00:04.0")


def device(spec: PciSpec, base: Path) -> DeviceSpec:
    """The keys without the host's word on the device: only :func:`host_device` is used."""
    raise XmpError("a pci device is made from the host's table (host_device)")


def host_table(value: Any) -> tuple[HostPci, ...]:
    """``[[host.pci]]``, checked (:func:`xmp.drivers.pci.spec.host_devices`)."""
    return pcispec.host_devices(value)


def host_problem(table: tuple[HostPci, ...], spec: PciSpec) -> str | None:
    """A guest's spec names one of the host's devices?"""
    if all(d.bdf != spec.bdf for d in table):
        return f"{spec.bdf} is not one of the host's PCI devices (declare it in [[host.pci]])"
    return None


def check_save(spec: DeviceSpec) -> None:
    """A guest holding a host device is not saved (nor, later, migrated), as
    libxl refuses: the device's state is the host's, not the guest's, and a
    save destroys the guest."""
    raise XmpError(f"PCI device {spec.name} is passed through: pci-detach it first")


def check_restored(spec: DeviceSpec) -> None:
    raise XmpError(f"pci {spec.name}: a domain with a passed-through PCI device cannot be restored "
                   "(xl refuses to save one: the device's state is not the guest's)")


# -- the host's devices ------------------------------------------------------

class PciHost:
    """One supervisor's PCI devices and which are assignable."""

    def __init__(self, devices: tuple[HostPci, ...]):
        self.devices: dict[Bdf, HostPci] = {d.bdf: d for d in devices}
        self.assignable: set[Bdf] = {d.bdf for d in devices if d.assignable}


_hosts: weakref.WeakKeyDictionary[Any, PciHost] = weakref.WeakKeyDictionary()


def host(ts: Any) -> PciHost:
    got = _hosts.get(ts)
    if got is None:
        got = _hosts[ts] = PciHost(ts.topology.host.host_devices.get("pci", ()))
    return got


def holder(ts: Any, bdf: Bdf) -> int | None:
    """The domid whose record holds ``bdf``, if any."""
    for domid, rec in ts.records.items():
        if any(d.cls.kind == "pci" and d.spec.name == str(bdf) for d in rec.devices):
            return domid
    return None


def _known(ts: Any, bdf: Bdf, op: str) -> HostPci:
    dev = host(ts).devices.get(bdf)
    if dev is None:
        raise HypercallError(errno.ENODEV, op, f"PCI device {bdf} does not exist on this host "
                             "(the topology's [[host.pci]] lists them)")
    return dev


def host_device(ts: Any, spec: PciSpec, op: str) -> DeviceSpec:
    """The device a guest is given: it must exist, be assignable and be
    nobody's yet (libxl's checks in libxl__device_pci_add)."""
    dev = _known(ts, spec.bdf, op)
    if spec.bdf not in host(ts).assignable:
        raise HypercallError(errno.EPERM, op, f"PCI device {spec.bdf} is not assignable: "
                             f"xmp pci-assignable-add {spec.bdf} first")
    held = holder(ts, spec.bdf)
    if held is not None:
        raise HypercallError(errno.EBUSY, op, f"PCI device {spec.bdf} is already assigned to dom{held}")
    model, bdf = dev.model, spec.bdf
    opts = f"msitranslate=0,power_mgmt=0,permissive={int(spec.permissive)}"
    back = {"num_devs": "1", "key-0": str(bdf), "dev-0": str(bdf), "vdevfn-0": f"0x{bdf.devfn:02x}",
            "opts-0": opts, "state-0": "1", **pcispec.model_keys(model, 0)}
    return DeviceSpec(spec.devid, str(bdf), None, back, {})


def control(ts: Any, op: str, req: dict[str, Any]) -> dict[str, Any]:
    """xl pci-assignable-add / -remove / -list (``{"cmd": "class-op",
    "class": "pci", "op": "assignable-add", "arg": "0000:00:04.0"}``);
    a refused request changes nothing."""
    pci = host(ts)
    if op == "assignable-list":
        found = [{"bdf": str(b), "domid": holder(ts, b)} for b in sorted(pci.assignable)]
        return {"rows": [d["bdf"] for d in found], "devices": found}
    if op not in ("assignable-add", "assignable-remove"):
        raise HypercallError(errno.ENOSYS, "pci", f"no pci operation {op!r}")
    name = f"pci-{op}"
    raw = req.get("arg")
    try:
        bdf = parse_bdf(raw) if isinstance(raw, str) else None
    except ValueError as exc:
        raise HypercallError(errno.EINVAL, name, str(exc)) from None
    if bdf is None:
        raise HypercallError(errno.EINVAL, name, "name the device: a BDF like 0000:00:04.0")
    _known(ts, bdf, name)
    if op == "assignable-add":
        if bdf in pci.assignable:
            raise HypercallError(errno.EEXIST, name, f"PCI device {bdf} is already assignable")
        pci.assignable.add(bdf)
    else:
        if bdf not in pci.assignable:
            raise HypercallError(errno.ENOENT, name, f"PCI device {bdf} is not assignable")
        held = holder(ts, bdf)
        if held is not None:
            raise HypercallError(errno.EBUSY, name, f"PCI device {bdf} is assigned to dom{held}: "
                                 "pci-detach it first")
        pci.assignable.discard(bdf)
    ts.sup.log(f"pci: {bdf} {'now' if op == 'assignable-add' else 'no longer'} assignable")
    return {"bdf": str(bdf)}


def list_row(devid: int, front: dict[str, str]) -> str:
    return (f"{devid:<5}{front.get('backend-id', '-'):>3}  {front.get('state', '-'):<6}"
            f"{front.get('event-channel', '-1'):<7}{front.get('backend', '-')}")
