"""An isolation probe: a guest that tries what a guest must not do and
reports each outcome on its console as ``probe: {json}``, then idles.

It tries dom0-only hypercalls, a malformed hypercall, binding a port that
was not offered to it, mapping a grant (guests are not trusted backends),
opening anything of xmp in /dev/shm, and reading a sibling domain's memory
through /proc (every other ``xmp:`` process it can see).  With ``args``
from the test it also tries to SIGKILL the pids of ``kill``, to signal
(signal 0: the permission check alone) the pids of ``signal``, and to
append to the files of ``append``; it tries to make a user namespace, and
reports its uid.

An outcome is ``ok: true`` (it worked: an escape), ``ok: false`` (refused,
with the errno), or ``ok: null`` when the attempt proved nothing: a process
that was gone by the time the probe got to it, or a pid that names nothing
(ESRCH outside a PID namespace of the probe's own) -- not a refusal."""

import errno
import json
import os
import signal

from xmp.errors import XmpError


class _Moot(Exception):
    """The attempt could neither succeed nor be refused."""


def _try(fn):
    try:
        return {"ok": True, "value": fn()}
    except _Moot as exc:
        return {"ok": None, "error": str(exc)}
    except XmpError as exc:
        return {"ok": False, "errno": getattr(exc, "errno", None), "error": str(exc)}
    except OSError as exc:
        return {"ok": False, "errno": exc.errno, "error": str(exc)}


def _signal(pid: int, sig: int) -> str:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        if os.getpid() != 1:  # an ordinary namespace: the pid names nothing
            raise _Moot(f"pid {pid}: no such process") from None
        # init of its own PID namespace: every pid outside is hidden from it
        raise OSError(errno.ESRCH, f"pid {pid} is not in this PID namespace") from None
    return f"sent {sig} to {pid}"


def _unshare_user() -> str:
    # An unprivileged user may make a user namespace and hold every
    # capability inside it: the door to the kernel's namespaced attack surface.
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(0x10000000):  # CLONE_NEWUSER
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return "a new user namespace"


def _append(path: str) -> int:
    with open(path, "ab") as f:
        return f.write(b"probe was here\n")


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
    try:
        with open(f"/proc/{pid}/maps") as maps:
            line = maps.readline()
    except FileNotFoundError:
        if not os.path.exists(f"/proc/{pid}"):
            raise _Moot(f"pid {pid} has gone") from None
        raise
    if not line:  # it is exiting (other tests' processes come and go)
        raise _Moot(f"pid {pid} has no mappings left")
    first = line.split()[0].split("-")[0]
    try:
        with open(f"/proc/{pid}/mem", "rb") as mem:
            mem.seek(int(first, 16))
            return len(mem.read(16))
    except ProcessLookupError:
        raise _Moot(f"pid {pid} has gone") from None


def _siblings():
    me = os.getpid()
    out = []
    try:
        entries = os.listdir("/proc")
    except OSError:  # no /proc here (a jail): no sibling to be seen
        return out
    for entry in entries:
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
        "proc_visible": _try(lambda: sorted(int(e) for e in os.listdir("/proc") if e.isdigit())),
        "uid": _try(os.getuid),
        "unshare_user": _try(_unshare_user),
    }
    args = kernel.args
    for pid in args.get("kill", []):
        results[f"kill_{pid}"] = _try(lambda pid=pid: _signal(pid, signal.SIGKILL))
    for pid in args.get("signal", []):
        results[f"signal_{pid}"] = _try(lambda pid=pid: _signal(pid, 0))
    for i, path in enumerate(args.get("append", [])):
        results[f"append_{i}"] = _try(lambda path=path: _append(path))
    for pid in _siblings():
        results[f"sibling_mem_{pid}"] = _try(lambda pid=pid: _read_mem(pid))
    for name, outcome in results.items():
        kernel.print("probe: " + json.dumps({"test": name, **outcome}))
    kernel.print("probe: done")
    kernel.idle()
