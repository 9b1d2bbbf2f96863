"""The dependency order of STYLE.md, checked: lower layers never import
higher ones, and the sans-I/O cores import no process machinery."""

from __future__ import annotations

import ast
from pathlib import Path

import xmp

ROOT = Path(xmp.__file__).parent
# xenstore's protocol, store and client are pure and low; its daemon is one
# of dom0's services (dom0/xenstored.py), above the drivers whose backends dom0 runs.
ORDER = ["errors", "sharedmem", "xenstore", "diskspec", "limits", "topology", "startinfo", "hypercall",
         "domain_proc", "hv", "hypervisor", "drivers", "dom0", "guests", "migration", "testing", "cli"]


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


def test_ring_core_imports_no_process_machinery():
    for name in ("ring.py", "bytering.py", "grant.py", "evtchn.py"):
        mods = imports_of(ROOT / "sharedmem" / name)
        assert not mods & {"os", "multiprocessing", "subprocess", "socket", "signal"}, name
