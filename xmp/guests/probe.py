"""An isolation probe: a guest that tries what a guest must not do and
reports each outcome on its console as ``probe: {json}``, then idles.

It tries dom0-only hypercalls, a malformed hypercall, binding a port that
was not offered to it, mapping a grant (guests are not trusted backends),
opening anything of xmp in /dev/shm, and reading a sibling domain's memory
through /proc (every other ``xmp:`` process it can see)."""

import json
import os

from xmp.errors import XmpError


def _try(fn):
    try:
        return {"ok": True, "value": fn()}
    except XmpError as exc:
        return {"ok": False, "errno": getattr(exc, "errno", None), "error": str(exc)}
    except OSError as exc:
        return {"ok": False, "errno": exc.errno, "error": str(exc)}


def _shm_openable():
    opened = []
    for name in os.listdir("/dev/shm"):
        if "xmp" in name:
            try:
                os.close(os.open(os.path.join("/dev/shm", name), os.O_RDONLY))
                opened.append(name)
            except OSError:
                pass
    return opened


def _read_mem(pid):
    with open(f"/proc/{pid}/maps") as maps:
        line = maps.readline()
    if not line:  # it is exiting (other tests' processes come and go)
        raise ProcessLookupError(f"pid {pid} has no mappings left")
    first = line.split()[0].split("-")[0]
    with open(f"/proc/{pid}/mem", "rb") as mem:
        mem.seek(int(first, 16))
        return len(mem.read(16))


def _siblings():
    me = os.getpid()
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != me:
            try:
                with open(f"/proc/{entry}/comm") as f:
                    if f.read().startswith("xmp:"):
                        out.append(int(entry))
            except OSError:
                pass
    return out


def main(kernel) -> None:
    xen = kernel.xen
    results = {
        "getdomaininfo": _try(lambda: xen.domctl("getdomaininfo")),
        "createdomain": _try(lambda: xen.domctl("createdomain", config={"name": "evil"})),
        "destroydomain": _try(lambda: xen.domctl("destroydomain", domid=0)),
        "malformed": _try(lambda: xen.call("event_channel_op", "alloc_unbound", remote_dom="x")),
        "unknown_op": _try(lambda: xen.call("no_such_op")),
        "bind_not_offered": _try(lambda: xen.bind_interdomain(0, 1)),
        "map_grant": _try(lambda: xen.map_grant_ref(0, [8])),
        "alloc_in_dom0": _try(lambda: xen.alloc_unbound(kernel.domid, dom=0)),
        "shm_openable": _try(_shm_openable),
    }
    for pid in _siblings():
        results[f"sibling_mem_{pid}"] = _try(lambda pid=pid: _read_mem(pid))
    for name, outcome in results.items():
        kernel.print("probe: " + json.dumps({"test": name, **outcome}))
    kernel.print("probe: done")
    kernel.idle()
