"""The topology file: the host, dom0 and the domains ``xmp run`` starts.

A topology is TOML.  Domain keys follow xl.cfg(5) (``docs/man/xl.cfg.5.pod.in``)
with xl's names, units (MiB) and defaults where xl has them; a complete file::

    [host]                      # optional table
    name = "lab"                # default: socket.gethostname()
    memory = 4096               # MiB pool for all domains, dom0 included;
                                # default: the host's available memory
    rundir = "/tmp/xmp-lab"     # optional run directory (control socket, ...)
    guest_uids = "200000-265535"  # uids for jailed guests (as root), one per running guest
    bridges = { xenbr0 = "10.0.0.1/24" }  # optional: bridges made as root, with the
                                # host's address (removed when the host stops)
    migrate = "10.0.0.1:8002"   # optional: receive migrations on ADDR:PORT
                                # ("[v6addr]:PORT"; port 0: any free one)
    migrate_key = "lab.key"     # required with migrate: the key file both hosts
                                # hold (mode 0600; relative to this file)
    [[host.pci]]                # the host's own devices of a class that has them (PCI:
    bdf = "0000:00:04.0"        # bdf, vendor, device required; class, bars, pin,
    vendor = 0x1af4             # assignable -- see the class's toolstack.py)
    device = 0x10f0

    [dom0]                      # optional; dom0 always exists, named "Domain-0"
    memory = 256                # MiB, default 256
    maxmem = 256                # MiB, >= memory, default = memory
    vcpus = 1                   # 1..32, default 1
    kernel = "pkg.mod:func"     # optional workload; without one dom0 runs
                                # only its services (xenstored, backends)
    args = { }                  # optional table given to the kernel

    [[domain]]                  # zero or more guests and driver domains
    name = "web"                # required, unique, 1..64 of [A-Za-z0-9_.-]
    type = "pvh"                # "pv" | "pvh", default "pvh" ("hvm": refused, not yet)
    memory = 128                # MiB, >= 1, default 128
    maxmem = 256                # MiB, >= memory, default = memory
    vcpus = 1                   # 1..32, default 1
    maxvcpus = 2                # vcpus..32, default = vcpus
    kernel = "xmp.guests.hello:main"  # "module.path:function", required
                                # unless driver_domain = true
    args = { greeting = "hi" }  # optional table given to the kernel
    disk = ["format=raw, vdev=xvda, access=rw, target=a.img"]   # xl disk specs
    vif = ["mac=00:16:3e:00:00:01, bridge=xenbr0"]             # xl vif specs
    on_poweroff = "destroy"     # default destroy
    on_reboot = "restart"       # default restart
    on_crash = "destroy"        # default destroy
    driver_domain = false       # hosts backends; needs no kernel
    trusted_backend = false     # ignored, kept for old files: only dom0 maps grants
    max_event_channels = 1023   # 2..4096, default 1023 (dom0: 4096)
    max_grant_frames = 64       # 1..64, default 64
    xenstore_quota = { nodes = 2000 }   # xenstored limits for this domain (C xenstored's
                                # names: nodes, node-size, watches, transactions,
                                # outstanding, permissions, transaction-nodes)

Actions are xl's: destroy, restart, rename-restart, preserve,
coredump-destroy, coredump-restart.  ``disk`` and ``vif`` are lists of
strings, each checked by its device class's own parser.  ``kernel``
names a module that must be findable, but it is not imported: a topology is
checked before anything runs, and importing a guest's module would run it.

``xmp create FILE`` reads a file holding exactly one domain, written either
as one ``[[domain]]`` or as one ``[domain]`` table, with the same keys.

Checking follows xl: the whole file is checked before anything starts, and
the first problem is raised as one `TopologyError` naming the file, the line
and the key -- ``hello.toml:12: [[domain]] 'web': memory: 8192 MiB does not
fit ...``.  tomllib reports no lines for keys, so `_Locator` finds them in
the source text; a key that is absent (a missing ``name``) is reported at
its table's header.  The memory check adds dom0 and every domain's
``memory`` (not ``maxmem``: like xl, a domain starts with ``memory`` and
balloons up later, which is checked at runtime by `check_fits`).

`DomainConfig.to_dict` gives the file's keys back as JSON-safe data (sent
between processes, kept in save files); `DomainConfig.from_dict` checks
them again exactly as the file was checked, because restored state is
validated like fresh input.
"""

from __future__ import annotations

import difflib
import importlib.machinery
import importlib.util
import ipaddress
import os
import re
import socket
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from xmp import devices, limits
from xmp.errors import XmpError

MiB = 1 << 20
DOM0_NAME = "Domain-0"
DOMAIN_TYPES = ("pv", "pvh", "hvm")
ACTIONS = ("destroy", "restart", "rename-restart", "preserve", "coredump-destroy", "coredump-restart")
MAX_VCPUS = 32
NAME_MAX = 64
# xl renames a domain with these suffixes while it migrates (tools/xl/xl.h).
RESERVED_SUFFIXES = ("--incoming", "--migratedaway")
EVTCHN_RANGE = (2, 4096)
GRANT_FRAMES_RANGE = (1, 64)

# A device class handing out the host's own devices ([[host.pci]]) adds its key through xmp.devices.
HOST_DEVICE_KEYS = tuple(c.host_key for c in devices.with_host_key() if c.host_key)
HOST_KEYS = ("name", "memory", "rundir", "guest_uids", "bridges", "migrate", "migrate_key", *HOST_DEVICE_KEYS)
GUEST_UIDS = (200000, 265535)  # the default [host] guest_uids
DOM0_KEYS = ("memory", "maxmem", "vcpus", "kernel", "args")
# Each device class with an xl spec adds its key ("disk", …) through xmp.devices.
DEVICE_KEYS = tuple(c.config_key for c in devices.with_config_key() if c.config_key)
DOMAIN_KEYS = ("name", "type", "memory", "maxmem", "vcpus", "maxvcpus", "kernel", "args", *DEVICE_KEYS,
               "on_poweroff", "on_reboot", "on_crash", "driver_domain", "trusted_backend",
               "max_event_channels", "max_grant_frames", "xenstore_quota")
TABLES = {"host": "[host]", "dom0": "[dom0]", "domain": "[[domain]]"}

_NAME_RE = re.compile(rf"[A-Za-z0-9_.-]{{1,{NAME_MAX}}}")


class TopologyError(XmpError):
    """A topology or domain file (or a config restored from a dict) is wrong.

    ``path`` and ``line`` say where, ``table`` which table (``[[domain]]
    'web'``), ``key`` which key; ``message`` what is wrong and what to do.
    """

    def __init__(self, path: str, line: int | None, key: str | None, message: str,
                 table: str | None = None):
        self.path = path
        self.line = line
        self.key = key
        self.message = message
        self.table = table
        super().__init__(path, line, key, message, table)

    def __str__(self) -> str:
        where = self.path if self.line is None else f"{self.path}:{self.line}"
        return ": ".join(p for p in (where, self.table, self.key, self.message) if p)


@dataclass(frozen=True)
class HostConfig:
    name: str
    memory_mib: int
    rundir: str | None
    guest_uids: tuple[int, int] = GUEST_UIDS
    # bridges the host makes (as root), each with the host's own address on it
    bridges: dict[str, str] = field(default_factory=dict, hash=False)
    migrate: str | None = None      # "ADDR:PORT" the host receives migrations on
    migrate_key: str | None = None  # its key file, absolute
    # each class's host devices ([[host.pci]]), by its kind, as its toolstack's host_table made them
    host_devices: dict[str, tuple[Any, ...]] = field(default_factory=dict, hash=False)


@dataclass(frozen=True)
class DomainConfig:
    """One domain, as xl.cfg describes it; built only by this module's
    parsers and `from_dict`, so every instance has been checked."""

    name: str
    type: str
    memory_mib: int
    maxmem_mib: int
    vcpus: int
    maxvcpus: int
    kernel: str | None
    args: dict[str, Any] = field(hash=False)
    devices: dict[str, tuple[str, ...]] = field(hash=False)  # device class key ("disk") -> its xl specs
    on_poweroff: str
    on_reboot: str
    on_crash: str
    driver_domain: bool
    trusted_backend: bool
    max_event_channels: int
    max_grant_frames: int
    source: str | None = None
    xenstore_quota: dict[str, int] = field(default_factory=dict, hash=False)

    def to_dict(self) -> dict[str, Any]:
        """The file's keys (``memory``, not ``memory_mib``), JSON-safe.

        ``kernel`` and ``source`` are left out when unset rather than sent as
        null: TOML has no null, and `from_dict` accepts what a file can say.
        """
        out: dict[str, Any] = {
            "name": self.name, "type": self.type, "memory": self.memory_mib, "maxmem": self.maxmem_mib,
            "vcpus": self.vcpus, "maxvcpus": self.maxvcpus, "args": _copy_json(self.args),
            **{key: list(self.devices.get(key, ())) for key in DEVICE_KEYS},
            "on_poweroff": self.on_poweroff,
            "on_reboot": self.on_reboot, "on_crash": self.on_crash, "driver_domain": self.driver_domain,
            "trusted_backend": self.trusted_backend, "max_event_channels": self.max_event_channels,
            "max_grant_frames": self.max_grant_frames,
        }
        if self.xenstore_quota:
            out["xenstore_quota"] = dict(self.xenstore_quota)
        if self.kernel is not None:
            out["kernel"] = self.kernel
        if self.source is not None:
            out["source"] = self.source
        return out

    @classmethod
    def from_dict(cls, data: Any, path: str = "<domain config>") -> DomainConfig:
        """Check `data` as a ``[[domain]]`` table (plus ``source``) and build
        the config; dom0's dict (name ``Domain-0``) is checked as dom0."""
        t = _Table(path, None, "domain", 0, "domain")
        if not isinstance(data, dict):
            raise t.error(None, f"expected a table of domain keys, got {_describe(data)}")
        dom0 = data.get("name") == DOM0_NAME
        return _domain(t, data, (*DOMAIN_KEYS, "source"), dom0=dom0)


@dataclass(frozen=True)
class Topology:
    host: HostConfig
    dom0: DomainConfig
    domains: tuple[DomainConfig, ...]


# -- locating lines ---------------------------------------------------------

_ARRAY_HEADER = re.compile(r"\s*\[\[\s*([A-Za-z0-9_.\- ]+?)\s*\]\]")
_TABLE_HEADER = re.compile(r"\s*\[\s*([A-Za-z0-9_.\- ]+?)\s*\]")
_KEY_LINE = re.compile(r"\s*([A-Za-z0-9_-]+)\s*[=.]")


class _Locator:
    """Maps (table kind, index, key) to a line of the TOML source.

    Only bare keys at the start of a line and ``[t]`` / ``[[t]]`` headers are
    tracked, which is how topology files are written.  Lines inside
    multi-line strings and arrays are skipped so that a ``disk`` entry or a
    string holding ``x = 1`` is not taken for a key.  Top-level keys live in
    table kind "".
    """

    def __init__(self, text: str):
        self._headers: dict[tuple[str, int], int] = {}
        self._keys: dict[tuple[str, int, str], int] = {}
        counts: dict[str, int] = {}
        ctx: tuple[str, int] | None = ("", 0)
        open_string: str | None = None
        depth = 0
        for no, line in enumerate(text.splitlines(), 1):
            if open_string is None and depth == 0:
                m = _ARRAY_HEADER.match(line) or _TABLE_HEADER.match(line)
                if m:
                    parts = [p.strip() for p in m.group(1).split(".")]
                    kind = parts[0]
                    if len(parts) > 1:
                        # [domain.args] adds key "args" to the latest [[domain]].
                        idx = max(counts.get(kind, 1) - 1, 0)
                        self._keys.setdefault((kind, idx, parts[1]), no)
                        ctx = None
                    elif line.lstrip().startswith("[["):
                        idx = counts.get(kind, 0)
                        counts[kind] = idx + 1
                        self._headers.setdefault((kind, idx), no)
                        ctx = (kind, idx)
                    else:
                        self._headers.setdefault((kind, 0), no)
                        ctx = (kind, 0)
                    continue
                m = _KEY_LINE.match(line)
                if m and ctx is not None:
                    self._keys.setdefault((*ctx, m.group(1)), no)
            open_string, depth = _scan(line, open_string, depth)

    def line(self, kind: str, index: int, key: str | None = None) -> int | None:
        if key is not None and (kind, index, key) in self._keys:
            return self._keys[(kind, index, key)]
        if (kind, index) in self._headers:
            return self._headers[(kind, index)]
        # A table made by a dotted top-level key (host.memory = 1) has no header.
        return self._keys.get(("", 0, kind))


def _scan(line: str, open_string: str | None, depth: int) -> tuple[str | None, int]:
    """Carry multi-line string and bracket state across one line."""
    i, n = 0, len(line)
    while i < n:
        if open_string is not None:
            j = line.find(open_string, i)
            if j < 0:
                return open_string, depth
            i, open_string = j + 3, None
            continue
        c = line[i]
        if c == "#":
            break
        if line.startswith('"""', i) or line.startswith("'''", i):
            open_string, i = line[i:i + 3], i + 3
            continue
        if c == '"':
            i += 1
            while i < n and line[i] != '"':
                i += 2 if line[i] == "\\" else 1
        elif c == "'":
            j = line.find("'", i + 1)
            i = n if j < 0 else j
        elif c in "[{":
            depth += 1
        elif c in "]}":
            depth = max(depth - 1, 0)
        i += 1
    return open_string, depth


@dataclass
class _Table:
    """Where the values being checked came from, for error messages."""

    path: str
    loc: _Locator | None
    kind: str
    index: int
    label: str

    def line(self, key: str | None = None) -> int | None:
        return None if self.loc is None else self.loc.line(self.kind, self.index, key)

    def source(self) -> str | None:
        line = self.line()
        return None if line is None else f"{self.path}:{line}"

    def error(self, key: str | None, message: str) -> TopologyError:
        return TopologyError(self.path, self.line(key), key, message, self.label)


# -- value checks -----------------------------------------------------------

def _describe(value: Any) -> str:
    if isinstance(value, bool):
        return f"a boolean ({'true' if value else 'false'})"
    if isinstance(value, int):
        return f"an integer ({value})"
    if isinstance(value, float):
        return f"a float ({value})"
    if isinstance(value, str):
        shown = value if len(value) <= 40 else value[:37] + "..."
        return f'a string ("{shown}")'
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list | tuple):
        if value and all(isinstance(v, dict) for v in value):
            return "an array of tables"
        return "an array"
    if value is None:
        return "nothing (null)"
    return f"a {type(value).__name__} ({value})"


def _suggest(word: str, known: tuple[str, ...] | list[str]) -> str:
    close = difflib.get_close_matches(word, known, n=1)
    if close:
        return f"did you mean '{close[0]}'?"
    return "known keys: " + ", ".join(known)


def _int(t: _Table, raw: dict, key: str, default: int, lo: int, hi: int | None = None,
         unit: str = "") -> int:
    value = raw.get(key, default)
    # bool is an int subclass in Python, but "memory = true" is a mistake.
    if isinstance(value, bool) or not isinstance(value, int):
        raise t.error(key, f"expected an integer, got {_describe(value)}")
    if value < lo or (hi is not None and value > hi):
        bounds = f">= {lo}" if hi is None else f"{lo}..{hi}"
        raise t.error(key, f"{value}{unit} is out of range: must be {bounds}")
    return value


def _bool(t: _Table, raw: dict, key: str, default: bool) -> bool:
    value = raw.get(key, default)
    if not isinstance(value, bool):
        raise t.error(key, f"expected a boolean (true or false), got {_describe(value)}")
    return value


def _str(t: _Table, raw: dict, key: str) -> str:
    value = raw[key]
    if not isinstance(value, str):
        raise t.error(key, f"expected a string, got {_describe(value)}")
    if not value:
        raise t.error(key, "must not be empty")
    return value


def _choice(t: _Table, raw: dict, key: str, default: str, choices: tuple[str, ...]) -> str:
    value = raw.get(key, default)
    if not isinstance(value, str):
        raise t.error(key, f"expected a string, got {_describe(value)}")
    if value not in choices:
        raise t.error(key, f"'{value}' is not one of: " + ", ".join(choices))
    return value


def _str_list(t: _Table, raw: dict, key: str) -> tuple[str, ...]:
    value = raw.get(key, [])
    if not isinstance(value, list | tuple):
        raise t.error(key, f"expected an array of strings, got {_describe(value)}")
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise t.error(key, f"expected an array of strings, item {i} is {_describe(item)}")
    return tuple(value)


def _copy_json(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _copy_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_copy_json(v) for v in value]
    return value


def _json_problem(value: Any, where: str) -> str | None:
    """Why `value` would not survive JSON, or None: args travel to the
    domain's process and into save files as JSON."""
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                return f"{where}: keys must be strings"
            problem = _json_problem(v, f"{where}.{k}")
            if problem:
                return problem
        return None
    if isinstance(value, list | tuple):
        for i, v in enumerate(value):
            problem = _json_problem(v, f"{where}[{i}]")
            if problem:
                return problem
        return None
    if isinstance(value, str | int | float | bool):
        return None
    return f"{where} is {_describe(value)}; only strings, numbers, booleans, arrays and tables can be passed"


def _devices(t: _Table, raw: dict, base: str) -> dict[str, tuple[str, ...]]:
    """Each device class's xl specs: each must parse, by the class's own
    parser, name a different device, and be one that can be made (the
    class's ``problem(spec, base)``, if it has one; ``base`` is the folder
    relative paths are in)."""
    out: dict[str, tuple[str, ...]] = {}
    for cls in devices.with_config_key():
        key = cls.config_key or ""
        specs = _str_list(t, raw, key)
        part = cls.part("toolstack")
        names: set[str] = set()
        if hasattr(part, "pinned"):  # what the spec leaves random is chosen once, here (a vif's MAC)
            try:
                specs = tuple(part.pinned(spec) for spec in specs)
            except XmpError as exc:
                raise t.error(key, str(exc)) from None
        for spec in specs:
            try:
                parsed = part.parse(spec)
            except XmpError as exc:
                raise t.error(key, str(exc)) from None
            name = part.name_of(parsed)
            if name in names:
                raise t.error(key, f"{cls.devtype} '{name}' is used twice")
            names.add(name)
            problem = part.problem(parsed, Path(base)) if hasattr(part, "problem") else None
            if problem:
                raise t.error(key, problem)
        if specs:
            out[key] = specs
    return out


def device_backends(cfg: DomainConfig) -> list[tuple[str, str]]:
    """(config key, backend domain name) of each device that names one."""
    out = []
    for cls in devices.with_config_key():
        part = cls.part("toolstack")
        for spec in cfg.devices.get(cls.config_key or "", ()):
            backend = part.parse(spec).backend
            if backend not in (None, DOM0_NAME, "0"):
                out.append((cls.config_key or "", backend))
    return out


def source_folder(source: str | None) -> str:
    """The folder a domain's relative device paths are in: its file's."""
    if source is None:
        return os.getcwd()
    return os.path.dirname(os.path.abspath(source.rsplit(":", 1)[0]))


# xl.cfg xenstore_quota: this domain's limits in xenstored, by C xenstored's names.
XENSTORE_QUOTAS = ("nodes", "node-size", "watches", "transactions", "outstanding", "permissions",
                   "transaction-nodes")


def _quota(t: _Table, raw: dict) -> dict[str, int]:
    value = raw.get("xenstore_quota", {})
    if not isinstance(value, dict):
        raise t.error("xenstore_quota", f"expected a table like {{ nodes = 2000 }}, got {_describe(value)}")
    for name, limit in value.items():
        if name not in XENSTORE_QUOTAS:
            raise t.error("xenstore_quota", f"no quota named '{name}': {_suggest(name, XENSTORE_QUOTAS)}")
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise t.error("xenstore_quota", f"{name}: expected a positive integer, got {_describe(limit)}")
    return dict(value)


def _args(t: _Table, raw: dict) -> dict[str, Any]:
    value = raw.get("args", {})
    if not isinstance(value, dict):
        raise t.error("args", f"expected a table, got {_describe(value)}")
    problem = _json_problem(value, "args")
    if problem:
        raise t.error("args", problem)
    copied: dict[str, Any] = _copy_json(value)
    return copied


def _module_findable(module: str) -> bool:
    """Whether `module` can be imported, without importing it or, unlike
    importlib.util.find_spec, its parent packages (their __init__ would run)."""
    if module in sys.modules:
        return True
    parts = module.split(".")
    try:
        spec = importlib.util.find_spec(parts[0])
        for i in range(1, len(parts)):
            search = None if spec is None else spec.submodule_search_locations
            if search is None:
                return False  # the parent is not a package
            name = ".".join(parts[:i + 1])
            if ".".join(parts[:i]) in sys.modules:
                spec = importlib.util.find_spec(name)
            else:
                spec = importlib.machinery.PathFinder.find_spec(name, list(search))
    except (ImportError, ValueError):
        return False
    return spec is not None


def _kernel(t: _Table, raw: dict) -> str | None:
    if "kernel" not in raw:
        return None
    value = _str(t, raw, "kernel")
    module, sep, func = value.partition(":")
    if not sep or not func.isidentifier() or not all(p.isidentifier() for p in module.split(".")):
        raise t.error("kernel", f"'{value}' is not of the form \"module.path:function\"")
    if not _module_findable(module):
        raise t.error("kernel", f"module '{module}' not found (is it installed, or on PYTHONPATH?)")
    return value


def _check_keys(t: _Table, raw: dict, known: tuple[str, ...]) -> None:
    for key in raw:
        if key not in known:
            raise t.error(key, f"unknown key; {_suggest(key, known)}")


def name_problem(name: str) -> str | None:
    """Why ``name`` cannot name a guest, or None."""
    if not _NAME_RE.fullmatch(name):
        return f"'{name}' is not 1..{NAME_MAX} characters of A-Z a-z 0-9 _ . -"
    if name == DOM0_NAME:
        return f"'{DOM0_NAME}' is dom0's name; configure dom0 in [dom0]"
    for suffix in RESERVED_SUFFIXES:
        if name.endswith(suffix):
            return f"'{name}' ends in '{suffix}', which xl reserves for migration"
    return None


def check_name(name: str) -> None:
    problem = name_problem(name)
    if problem:
        raise XmpError(f"domain name {problem}")


def _name(t: _Table, raw: dict) -> str:
    if "name" not in raw:
        raise t.error("name", 'missing: every domain needs name = "..."')
    name = _str(t, raw, "name")
    problem = name_problem(name)
    if problem:
        raise t.error("name", problem)
    return name


def _domain(t: _Table, raw: dict, known: tuple[str, ...], *, dom0: bool) -> DomainConfig:
    """Check one domain's keys and fill in xl's defaults."""
    _check_keys(t, raw, known)
    if dom0:
        name = DOM0_NAME
    else:
        name = _name(t, raw)
        # From here on, messages name the domain instead of its position.
        t.label = f"{t.label.split(' #')[0]} '{name}'"
    memory = _int(t, raw, "memory", 256 if dom0 else 128, 1, unit=" MiB")
    maxmem = _int(t, raw, "maxmem", memory, 1, unit=" MiB")
    if maxmem < memory:
        raise t.error("maxmem", f"{maxmem} MiB is below memory ({memory} MiB); maxmem must be >= memory")
    vcpus = _int(t, raw, "vcpus", 1, 1, MAX_VCPUS)
    maxvcpus = _int(t, raw, "maxvcpus", vcpus, 1, MAX_VCPUS)
    if maxvcpus < vcpus:
        raise t.error("maxvcpus", f"{maxvcpus} is below vcpus ({vcpus}); maxvcpus must be >= vcpus")
    kernel = _kernel(t, raw)
    # dom0 hosts every backend and maps grants, as in Xen; that is why it
    # needs no kernel.  A guest of the file is plain unless it says so.
    driver_domain = _bool(t, raw, "driver_domain", dom0)
    if kernel is None and not driver_domain:
        raise t.error("kernel", 'missing: a guest needs kernel = "module.path:function" '
                                "(or driver_domain = true for a domain that only hosts backends)")
    # A file's domain remembers where it was written; a dict carries its own.
    source = raw["source"] if "source" in raw else t.source()
    if source is not None and not isinstance(source, str):
        raise t.error("source", f"expected a string, got {_describe(source)}")
    # dom0 is PV, as on classic x86 Xen.
    kind = _choice(t, raw, "type", "pv" if dom0 else "pvh", DOMAIN_TYPES)
    if kind == "hvm":  # xl's name, kept so the message can be precise; it must not silently mean PV
        raise t.error("type", "hvm guests are not supported yet; use pv or pvh")
    return DomainConfig(
        name=name,
        type=kind,
        memory_mib=memory,
        maxmem_mib=maxmem,
        vcpus=vcpus,
        maxvcpus=maxvcpus,
        kernel=kernel,
        args=_args(t, raw),
        devices=_devices(t, raw, source_folder(source)),
        on_poweroff=_choice(t, raw, "on_poweroff", "destroy", ACTIONS),
        on_reboot=_choice(t, raw, "on_reboot", "restart", ACTIONS),
        on_crash=_choice(t, raw, "on_crash", "destroy", ACTIONS),
        driver_domain=driver_domain,
        trusted_backend=_bool(t, raw, "trusted_backend", dom0),
        # dom0 serves every guest's console and xenstore ring, two ports each: it gets
        # all the 2-level ABI has (xl's 1023 is for guests; Xen does not cap dom0 so).
        max_event_channels=_int(t, raw, "max_event_channels", EVTCHN_RANGE[1] if dom0 else 1023,
                                *EVTCHN_RANGE),
        max_grant_frames=_int(t, raw, "max_grant_frames", 64, *GRANT_FRAMES_RANGE),
        source=source,
        xenstore_quota=_quota(t, raw),
    )


def _available_mib() -> int:
    return int(psutil.virtual_memory().available // MiB)


def _host(t: _Table, raw: dict) -> HostConfig:
    _check_keys(t, raw, HOST_KEYS)
    name = _str(t, raw, "name") if "name" in raw else socket.gethostname()
    memory = _int(t, raw, "memory", 0, 1, unit=" MiB") if "memory" in raw else _available_mib()
    rundir = _str(t, raw, "rundir") if "rundir" in raw else None
    uids = GUEST_UIDS
    if "guest_uids" in raw:
        lo, sep, hi = _str(t, raw, "guest_uids").partition("-")
        if not (sep and lo.isdigit() and hi.isdigit() and 0 < int(lo) <= int(hi) < 2**32 - 1):
            raise t.error("guest_uids", f"'{raw['guest_uids']}' is not a range of uids "
                                        "FIRST-LAST with 0 < FIRST <= LAST, like \"200000-265535\"")
        uids = (int(lo), int(hi))
    migrate, key = _migrate(t, raw)
    return HostConfig(name=name, memory_mib=memory, rundir=rundir, guest_uids=uids,
                      bridges=_bridges(t, raw), migrate=migrate, migrate_key=key,
                      host_devices=_host_devices(t, raw))


def _host_devices(t: _Table, raw: dict) -> dict[str, tuple[Any, ...]]:
    """The host's own devices of each class that has them, checked by the class."""
    out = {}
    for cls in devices.with_host_key():
        key = cls.host_key or ""
        if key in raw:
            try:
                out[cls.kind] = tuple(cls.part("toolstack").host_table(raw[key]))
            except XmpError as exc:
                raise t.error(key, str(exc)) from None
    return out


def _host_devices_given(t: _Table, host: HostConfig, cfg: DomainConfig,
                        given: dict[tuple[str, str], str]) -> None:
    """A domain's specs of such a class name host devices that exist and
    that no domain above was given: a host device goes to one guest."""
    for cls in devices.with_host_key():
        key = cls.config_key or ""
        part = cls.part("toolstack")
        for text in cfg.devices.get(key, ()):
            parsed = part.parse(text)
            problem = part.host_problem(host.host_devices.get(cls.kind, ()), parsed)
            if problem:
                raise t.error(key, problem)
            name = (cls.kind, part.name_of(parsed))
            if name in given:
                raise t.error(key, f"{name[1]} is already given to '{given[name]}': a host device goes to "
                                   "one guest")
            given[name] = cfg.name


def _bridges(t: _Table, raw: dict) -> dict[str, str]:
    """``bridges = { xenbr0 = "10.0.0.1/24" }``: interface names to an
    address with its prefix."""
    value = raw.get("bridges", {})
    if not isinstance(value, dict):
        raise t.error("bridges", f"expected a table of bridge = \"address/prefix\", got {_describe(value)}")
    for name, addr in value.items():
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,15}", name):
            raise t.error("bridges", f"{name!r} is not an interface name (1 to 15 letters, digits, _ . -)")
        try:
            ipaddress.ip_interface(addr)
        except (TypeError, ValueError):
            raise t.error("bridges", f"{name}: {addr!r} is not an address like 10.0.0.1/24") from None
        if "/" not in addr:
            raise t.error("bridges", f"{name}: {addr!r} needs its prefix (10.0.0.1/24)")
    return dict(value)


def _migrate(t: _Table, raw: dict) -> tuple[str | None, str | None]:
    if "migrate" not in raw:
        if "migrate_key" in raw:
            raise t.error("migrate_key", "a key without migrate = \"ADDR:PORT\" to listen on")
        return None, None
    address = _str(t, raw, "migrate")
    host, sep, port = address.rpartition(":")
    if not sep or not host.strip("[]") or not port.isdigit() or int(port) > 65535:
        raise t.error("migrate", f"'{address}' is not ADDR:PORT (an IPv6 address as [ADDR]:PORT)")
    if "migrate_key" not in raw:
        raise t.error("migrate", "needs migrate_key, the key file both hosts hold")
    # read (and its mode checked) when the host starts, before anything runs
    key = os.path.join(os.path.dirname(os.path.abspath(t.path)), _str(t, raw, "migrate_key"))
    return address, key


# -- memory -----------------------------------------------------------------

def _fit_problem(host_memory_mib: int, used_mib: int, memory_mib: int) -> str | None:
    free = host_memory_mib - used_mib
    if memory_mib <= free:
        return None
    return (f"{memory_mib} MiB does not fit: the host pool has {host_memory_mib} MiB, "
            f"{used_mib} MiB already given to other domains, {max(free, 0)} MiB free")


def check_fits(host_memory_mib: int, used_mib: int, cfg: DomainConfig) -> None:
    """Raise TopologyError unless `cfg`'s memory fits what is left of the
    host pool (``used_mib`` of ``host_memory_mib`` already given out)."""
    problem = _fit_problem(host_memory_mib, used_mib, cfg.memory_mib)
    if problem is None:
        return
    path, line = "<domain config>", None
    if cfg.source:
        head, _, tail = cfg.source.rpartition(":")
        if head and tail.isdigit():
            path, line = head, int(tail)
        else:
            path = cfg.source
    raise TopologyError(path, line, "memory", problem + "; lower memory or free memory on the host",
                        f"domain '{cfg.name}'")


# -- files ------------------------------------------------------------------

_AT_LINE = re.compile(r"\s*\(at line (\d+), column (\d+)\)$")
_AT_END = re.compile(r"\s*\(at end of document\)$")


def _parse_toml(text: str, path: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        msg = str(e)
        m = _AT_LINE.search(msg)
        if m:
            line: int | None = int(m.group(1))
            where = f"column {m.group(2)}"
            msg = msg[:m.start()]
        else:
            # tomllib reports some errors (a key given twice) only at the end.
            line = max(len(text.splitlines()), 1)
            where = "end of document"
            msg = _AT_END.sub("", msg)
        raise TopologyError(path, line, None, f"TOML syntax error at {where}: {msg}") from None


def _read(path: str | os.PathLike[str]) -> tuple[str, str]:
    name = os.fspath(path)
    try:
        with open(name, encoding="utf-8") as f:
            return f.read(), name
    except OSError as e:
        raise TopologyError(name, None, None, f"cannot read: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise TopologyError(name, None, None, f"not UTF-8 text ({e.reason} at byte {e.start})") from None


def _top_level(doc: dict, path: str, loc: _Locator, tables: dict[str, str]) -> None:
    """Refuse anything at the top level but the known tables."""
    for key, value in doc.items():
        if key in tables:
            continue
        line = loc.line(key, 0) or loc.line("", 0, key)
        if isinstance(value, dict | list):
            label = f"[[{key}]]" if isinstance(value, list) else f"[{key}]"
            close = difflib.get_close_matches(key, list(tables), n=1)
            hint = f"did you mean {tables[close[0]]}?" if close else "known: " + ", ".join(tables.values())
            raise TopologyError(path, line, None, f"unknown table; {hint}", label)
        raise TopologyError(path, line, key, "unknown top-level key; keys belong in a table such as "
                            + ", ".join(tables.values()))


def parse_topology(text: str, path: str = "<topology>") -> Topology:
    """Check a whole topology file and return it; the first problem raises."""
    doc = _parse_toml(text, path)
    loc = _Locator(text)
    _top_level(doc, path, loc, TABLES)

    for key, want in (("host", dict), ("dom0", dict), ("domain", list)):
        if key in doc and not isinstance(doc[key], want):
            form = TABLES[key]
            raise TopologyError(path, loc.line(key, 0), key,
                                f"expected {'an array of tables' if want is list else 'a table'} "
                                f"(write {form}), got {_describe(doc[key])}")

    host = _host(_Table(path, loc, "host", 0, "[host]"), doc.get("host", {}))
    dom0_t = _Table(path, loc, "dom0", 0, "[dom0]")
    dom0 = _domain(dom0_t, doc.get("dom0", {}), DOM0_KEYS, dom0=True)

    domains: list[DomainConfig] = []
    tables: list[_Table] = []
    first_line: dict[str, int | None] = {}
    held = limits.FDS_RESERVED + limits.domain_cost(0)  # dom0's own place
    given: dict[tuple[str, str], str] = {}  # (class, host device) -> the domain it went to
    for i, raw in enumerate(doc.get("domain", [])):
        t = _Table(path, loc, "domain", i, f"[[domain]] #{i + 1}")
        if not isinstance(raw, dict):
            raise t.error(None, f"expected a table, got {_describe(raw)}")
        cfg = _domain(t, raw, DOMAIN_KEYS, dom0=False)
        if cfg.name in first_line:
            where = first_line[cfg.name]
            at = f"line {where}" if where is not None else "an earlier [[domain]]"
            raise t.error("name", f"duplicate name '{cfg.name}': already used by the [[domain]] at {at}; "
                                  "names must be unique")
        for key, backend in device_backends(cfg):  # a backend domain must exist before its frontends
            if backend == cfg.name:
                raise t.error(key, f"backend '{backend}' is this domain itself; a device is served by "
                                   "another domain: Domain-0 (no backend=) or a driver domain above")
            if backend not in first_line:
                raise t.error(key, f"backend '{backend}' is not a [[domain]] defined above '{cfg.name}'; "
                                   "define the driver domain first")
            host_dom = next(d for d in domains if d.name == backend)
            if not host_dom.driver_domain:
                raise t.error(key, f"backend '{backend}' is not a driver domain (it runs no backends); "
                                   f"set driver_domain = true in '{backend}' or drop backend=")
        _host_devices_given(t, host, cfg, given)
        first_line[cfg.name] = t.line("name")
        domains.append(cfg)
        tables.append(t)
        held += limits.domain_cost(sum(len(v) for v in cfg.devices.values()))
        _check_count(t, 1 + len(domains), held)

    used = 0
    needed = dom0.memory_mib + sum(d.memory_mib for d in domains)
    for cfg, t in ((dom0, dom0_t), *zip(domains, tables, strict=True)):
        problem = _fit_problem(host.memory_mib, used, cfg.memory_mib)
        if problem:
            raise t.error("memory", f"{problem}; dom0 and all domains need {needed} MiB in total: "
                                    "lower memory or raise [host] memory")
        used += cfg.memory_mib
    return Topology(host=host, dom0=dom0, domains=tuple(domains))


def _check_count(t: _Table, count: int, held: int) -> None:
    """The file's first ``count`` domains, dom0 included, must fit dom0's
    event channels, Xen's domain ids and, needing ``held`` descriptors in
    dom0, the descriptors it will have (the soft RLIMIT_NOFILE, which the
    supervisor raises to the hard one): 5,000 idle guests were accepted and
    ~4,000 spawned before descriptors ran out."""
    ports = limits.PORTS_RESERVED + (count - 1) * limits.domain_ports()
    if ports > limits.DOM0_PORTS - 1:
        raise t.error(None, f"{limits.describe_capacity(limits.nofile_limits()[1])}, and this is domain "
                            f"number {count} (dom0 first); run fewer domains")
    if count - 1 > limits.MAX_DOMID:
        raise t.error(None, f"domain number {count - 1} is past Xen's last domain id ({limits.MAX_DOMID}); "
                            "split the topology over hosts")
    nofile = limits.nofile_limits()[1]
    if held > nofile:
        raise t.error(None, f"{limits.describe_capacity(nofile)}, and this is domain number {count} "
                            "(dom0 first); run fewer domains or raise the hard limit (ulimit -Hn) first")


def load_topology(path: str | os.PathLike[str]) -> Topology:
    text, name = _read(path)
    return parse_topology(text, name)


def parse_domain(text: str, path: str = "<domain>") -> DomainConfig:
    """Check a file holding exactly one domain (``xmp create FILE``)."""
    doc = _parse_toml(text, path)
    loc = _Locator(text)
    only = "a domain file holds exactly one [domain] or [[domain]] table"
    _top_level(doc, path, loc, {"domain": "[domain]"})
    raw = doc.get("domain")
    if raw is None:
        raise TopologyError(path, None, None, f"no domain: {only}")
    label = "[domain]"
    if isinstance(raw, list):
        label = "[[domain]]"
        if len(raw) != 1:
            line = loc.line("domain", 1) if len(raw) > 1 else loc.line("", 0, "domain")
            raise TopologyError(path, line, None, f"{len(raw)} domains: {only}", label)
        raw = raw[0]
    t = _Table(path, loc, "domain", 0, label)
    if not isinstance(raw, dict):
        raise t.error("domain", f"expected a table, got {_describe(raw)}")
    return _domain(t, raw, DOMAIN_KEYS, dom0=False)


def load_domain(path: str | os.PathLike[str]) -> DomainConfig:
    text, name = _read(path)
    return parse_domain(text, name)
