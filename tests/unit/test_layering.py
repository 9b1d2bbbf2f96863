"""The dependency order of STYLE.md, checked: lower layers never import
higher ones, and the sans-I/O cores import no process machinery."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import xmp

ROOT = Path(xmp.__file__).parent
# STYLE.md's order: sharedmem -> hypervisor -> xenstore -> xenbus -> drivers -> toolstack -> cli.
# ``devices`` is the drivers' registration table, read by layers below the drivers (it imports
# driver modules by name only when used); ``domain_proc`` is a domain's own kernel, which the
# drivers run on; dom0's services (xenstored's daemon among them) run the drivers' backends.
# ``migration`` is libxc's share of save, restore and live migration -- the stream's format, the
# save image (pure: records in, bytes out), the authenticated channel, log-dirty rounds and the
# pre-copy policy -- and sits below the toolstack, as libxc sits below libxl, which drives it
# (``xl migrate`` and its receiver are the toolstack's); within it the stream is lowest.
# ``libs`` (Xen's tools/libs) stands on a domain's kernel alone: guests use it as Linux
# userland uses libxenvchan.
ORDER = ["errors", "domid", "limits", "reaper", "sharedmem", "devices", "topology", "startinfo", "hypercall",
         "hv", "hypervisor", "xenstore", "domain_proc", "drivers", "dom0", "libs", "guests",
         "migration.stream", "migration.image", "migration", "toolstack", "testing", "clitable", "cli"]


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def layer(module: str) -> int | None:
    parts = module.split(".")
    if parts[0] != "xmp" or len(parts) < 2:
        return None
    sub = ".".join(parts[1:3])
    if sub in ORDER:
        return ORDER.index(sub)
    return ORDER.index(parts[1]) if parts[1] in ORDER else None


def test_lower_layers_do_not_import_higher_ones():
    bad = []
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT).with_suffix("")
        own = layer("xmp." + ".".join(rel.parts))
        if own is None:
            continue
        for mod in imports_of(path):
            other = layer(mod)
            if other is not None and other > own:
                bad.append(f"{rel} imports {mod}")
    assert not bad


PROCESS_MACHINERY = {"os", "multiprocessing", "subprocess", "socket", "signal", "selectors", "posix_ipc",
                     "psutil"}
PURE_CORES = ("xmp.sharedmem.ring", "xmp.sharedmem.bytering", "xmp.sharedmem.grant", "xmp.sharedmem.evtchn",
              "xmp.sharedmem.page", "xmp.xenstore.wire", "xmp.xenstore.store", "xmp.drivers.xenbus.state",
              "xmp.migration.auth", "xmp.migration.precopy",
              "xmp.drivers.blk.protocol", "xmp.migration.stream")


def module_path(module: str) -> Path | None:
    rel = Path(*module.split(".")[1:])
    for candidate in (ROOT / rel.with_suffix(".py"), ROOT / rel / "__init__.py"):
        if candidate.exists():
            return candidate
    return None  # the compiled fast path, or not ours


def xmp_closure(module: str) -> set[str]:
    """Every xmp module that importing ``module`` imports, at any depth
    (function-level imports included: they run sooner or later)."""
    seen, todo = set(), [module]
    while todo:
        mod = todo.pop()
        path = module_path(mod)
        if mod in seen or path is None:
            continue
        seen.add(mod)
        for dep in imports_of(path):
            if dep.startswith("xmp."):
                parts = dep.split(".")
                todo += [".".join(parts[:i]) for i in range(2, len(parts) + 1)]  # packages run first
    return seen


@pytest.mark.parametrize("core", PURE_CORES)
def test_pure_cores_pull_in_no_process_machinery(core):
    """Not directly, and not through anything they import (ring.py once got
    PAGE_SIZE from shm.py, and with it os, socket and posix_ipc)."""
    bad = {mod: sorted(imports_of(module_path(mod)) & PROCESS_MACHINERY)  # type: ignore[arg-type]
           for mod in xmp_closure(core)}
    assert not {mod: names for mod, names in bad.items() if names}
