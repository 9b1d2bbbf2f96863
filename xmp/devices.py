"""The split-driver classes xmp has: the one place each is registered.

A device class is one folder, ``xmp/drivers/<kind>/``, always with the
same files, so that knowing one driver means knowing them all:

``protocol.py``
    its wire format (structs, opcodes, hostile-input checks); pure.
``frontend.py``
    the guest side.  ``open(kernel, ref)`` returns the device named
    ``ref`` (its devid, or the name the xl spec gives it) once connected;
    guests reach it as ``kernel.<opener>(ref)``.
``backend.py``
    the dom0 / driver-domain side.  ``backend(kernel)`` makes one
    :class:`~xmp.drivers.xenbus.device.BackendDriver`; every backend domain
    serves every class that has this file.
``toolstack.py``
    libxl's part, for classes with an xl spec: ``parse(text)`` (the spec
    parser; raises :class:`~xmp.errors.XmpError` with a message that names
    the key), ``device(spec, base)`` (what the toolstack writes: a
    :class:`DeviceSpec`; may create the device's file), ``devid_of(name)``,
    and ``LIST_HEADER`` / ``list_row(front_keys, back_keys)`` for
    ``xmp <command>-list``.
``state.py``
    what the driver keeps outside guest RAM, and how it is rebuilt when the
    guest moves to another host (save/restore and migration rely on it).

Nothing outside its folder names a kind: the toolstack, the topology
checker, the CLI, backend domains and the guest kernel all look classes up
here.  The driver modules are imported by name when first used, so this
table sits low in the layers (the topology checker reads it) without
importing the drivers above it.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass, field
from types import ModuleType

from xmp.errors import LocalError


@dataclass(frozen=True)
class HostCommand:
    """A host-level command of a class (xl's ``pci-assignable-add``): ``xmp
    <command>-<op> [ARG]``, answered by ``control(ts, op, req)`` in its
    toolstack.py (``req["arg"]`` the argument); a reply's ``rows`` are printed,
    its ``devices`` are the ``--json`` form."""

    op: str
    summary: str          # xl's one-line summary
    arg: str | None = None  # the one argument's metavar, if it takes one


@dataclass(frozen=True)
class DeviceClass:
    kind: str                      # its folder: xmp/drivers/<kind>/
    devtype: str                   # xenbus device type: device/<devtype>/<devid>
    config_key: str | None = None  # the xl.cfg (topology) key listing its specs: "disk"
    command: str | None = None     # xl's command stem: "block" -> block-attach / -detach / -list
    opener: str | None = None      # kernel.<opener>(ref) opens one in a guest
    summary: str = ""
    # the [host] key declaring the host's own devices of the class ([[host.pci]]): its
    # toolstack.py's host_table(value) checks it, host_problem(table, spec) checks a guest's spec
    # against it, and no two guests of a file may name the same one
    host_key: str | None = None
    host_commands: tuple[HostCommand, ...] = ()

    def part(self, name: str) -> ModuleType:
        """One of the folder's files, imported on first use."""
        return importlib.import_module(f"{self.package}.{name}")

    @property
    def package(self) -> str:
        return f"xmp.drivers.{self.kind}"

    def has(self, name: str) -> bool:
        return importlib.util.find_spec(f"{self.package}.{name}") is not None


@dataclass(frozen=True)
class MoveState:
    """A driver's ``state.py`` declares this: what each end keeps outside
    the guest's RAM (so it does not move with the guest) and how that is
    rebuilt on the host the guest lands on.  Save/restore and migration
    rely on it; a test per driver reconnects a frontend to a *new* backend
    domain after the old one is destroyed (a migration without the copy)."""

    frontend_outside_ram: tuple[str, ...]
    frontend_rebuild: str
    backend_outside_ram: tuple[str, ...]
    backend_rebuild: str


@dataclass(frozen=True)
class DeviceSpec:
    """What the toolstack writes for one device: its devid, the backend
    domain (``None``: dom0) and the keys of the two xenstore directories."""

    devid: int
    name: str                      # as the user names it ("xvda")
    backend: str | None
    back_keys: dict[str, str] = field(default_factory=dict)
    front_keys: dict[str, str] = field(default_factory=dict)


def are_keys(value: object) -> bool:
    """A directory's keys as the toolstack takes them: strings to strings."""
    return isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, str)
                                           for k, v in value.items())


# The registration: one line a class.
DEVICE_CLASSES: tuple[DeviceClass, ...] = (
    DeviceClass("vping", "vping", config_key="vping", command="vping", opener="vping",
                summary="the smallest split driver (echo over a ring)"),
    DeviceClass("blk", "vbd", config_key="disk", command="block", opener="block",
                summary="virtual block devices (blkfront / blkback over image files)"),
    DeviceClass("net", "vif", config_key="vif", command="network", opener="net",
                summary="virtual network interfaces (netfront / netback on a bridge or switch)"),
    DeviceClass("pci", "pci", config_key="pci", command="pci", opener="pci",
                summary="PCI pass-through (pcifront / pciback over io/pciif.h; the host's [[host.pci]])",
                host_key="pci",
                host_commands=(
                    HostCommand("assignable-add", "Make a device assignable for pci-passthru", "BDF"),
                    HostCommand("assignable-remove", "Remove a device from being assignable", "BDF"),
                    HostCommand("assignable-list", "List all the assignable pci devices"))),
)


def by_devtype(devtype: str) -> DeviceClass:
    return _find("devtype", devtype)


def by_command(command: str) -> DeviceClass:
    return _find("command", command)


def by_opener(opener: str) -> DeviceClass | None:
    return next((c for c in DEVICE_CLASSES if c.opener == opener), None)


def with_host_key() -> tuple[DeviceClass, ...]:
    return tuple(c for c in DEVICE_CLASSES if c.host_key)


def with_config_key() -> tuple[DeviceClass, ...]:
    return tuple(c for c in DEVICE_CLASSES if c.config_key)


def frontend_modules() -> tuple[str, ...]:
    """What the zygote preloads, so every guest opens devices at once."""
    return tuple(f"{c.package}.frontend" for c in DEVICE_CLASSES)


def _find(attr: str, value: str) -> DeviceClass:
    for cls in DEVICE_CLASSES:
        if getattr(cls, attr) == value:
            return cls
    raise LocalError(f"no device class has {attr} {value!r}")
