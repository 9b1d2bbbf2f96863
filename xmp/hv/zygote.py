"""The zygote: a fork server that has already imported xmp.

Forked from the supervisor before it opens anything, the zygote sits in
its own session (so the terminal's Ctrl-C reaches only the supervisor),
dies with the supervisor (PR_SET_PDEATHSIG), and forks one domain per
request -- a few milliseconds instead of a fresh interpreter's fifty.  It
is the parent of every domain, so it reaps them and reports each exit.

Guests are jailed on the way (`xmp.hv.jail`: own uid, PID/mount/IPC/net
namespaces, a read-only root of Python only, seccomp), driver domains a PID
namespace, the seccomp filter and no capabilities, dom0 nothing of that.

Preloaded guest modules are not trusted to stay as they were: before each
spawn the zygote checks the source files of every module a preload brought
in (mtime and size, as importlib's bytecode cache does) and imports a
changed group afresh, so ``xmp create`` after an edit runs the new code.

Protocol (SOCK_SEQPACKET, JSON):
    supervisor -> zygote  {"cmd": "spawn", "domid", "title", "entry", "unprivileged", "jail", "config"}
                          + [hypercall socket, log fd]   (jail: "guest" | "driver" | null)
                          {"cmd": "preload", "modules": [...]}
    zygote -> supervisor  {"spawned": pid, "domid"} | {"error": "..."}
                          {"exited": pid, "status": code | -signal}   (any time)
"""

from __future__ import annotations

import errno
import importlib
import importlib.util
import json
import os
import select
import selectors
import signal
import socket
import sys
import time
import traceback

from xmp.errors import HypercallError
from xmp.hv.jail import Jailer, JailError
from xmp.sharedmem._ffi import lib
from xmp.sharedmem.logdirty import guest_uffd
from xmp.sharedmem.shm import recv_handles, send_handles
from xmp.topology import GUEST_UIDS


def start_zygote(guest_uids: tuple[int, int] = GUEST_UIDS) -> tuple[int, socket.socket]:
    """Fork the zygote; return (pid, the supervisor's end of its socket)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    supervisor = os.getpid()
    pid = os.fork()
    if pid == 0:  # the zygote
        try:
            ours.close()
            _zygote_main(theirs, supervisor, guest_uids)
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(0)
    theirs.close()
    return pid, ours


def _zygote_main(sock: socket.socket, supervisor: int, guest_uids: tuple[int, int]) -> None:
    lib.xmp_set_pdeathsig(signal.SIGKILL)
    if os.getppid() != supervisor:  # it died before we could ask to follow it
        os._exit(1)
    os.setsid()
    lib.xmp_set_comm(b"xmp:zygote")
    _set_title("xmp:zygote")
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)
    # Before the SIGCHLD handler: finding libseccomp may run ldconfig.
    jailer = Jailer(guest_uids)
    preloads = Preloads()
    # A domain in its own PID namespace sees no parent (getppid() is 0): it
    # learns that the zygote died before PR_SET_PDEATHSIG took hold by this
    # pipe hanging up (the zygote holds the only lasting write end; each
    # child closes its copy at once).
    lifeline = os.pipe()
    wake_r, wake_w = socket.socketpair()
    wake_r.setblocking(False)
    wake_w.setblocking(False)
    signal.set_wakeup_fd(wake_w.fileno())
    signal.signal(signal.SIGCHLD, lambda *_: None)
    sel = selectors.DefaultSelector()
    sel.register(sock, selectors.EVENT_READ, "req")
    sel.register(wake_r, selectors.EVENT_READ, "chld")
    children: dict[int, socket.socket | None] = {}  # pid -> what holds its uid
    while True:
        for key, _ in sel.select():
            if key.data == "chld":
                try:
                    wake_r.recv(4096)
                except BlockingIOError:
                    pass
                _reap(sock, children)
                continue
            try:
                data, fds = recv_handles(sock, 4, 65536)
            except ConnectionError:
                data, fds = b"", []
            if not data:  # the supervisor is done (or gone): no domain outlives it
                _kill_all(children)
                os._exit(0)
            req = json.loads(data)
            if req["cmd"] == "preload":
                for mod in req["modules"]:
                    preloads.load(mod)
                continue
            try:
                preloads.refresh()
                pid = _spawn(req, fds, jailer, lifeline, children)
                reply = {"spawned": pid, "domid": req["domid"]}
            except (OSError, JailError) as exc:
                reply = {"error": f"fork failed: {exc}", "domid": req["domid"]}
            finally:
                for fd in fds:
                    os.close(fd)
            sock.send(json.dumps(reply).encode())
        _reap(sock, children)


def _source_signature(name: str) -> tuple[str, int, int] | None:
    mod = sys.modules.get(name)
    path = getattr(mod, "__file__", None)
    if not isinstance(path, str) or not path.endswith(".py"):
        return None
    try:
        st = os.stat(path)
    except OSError:
        return (path, -1, -1)  # deleted: changed
    return (path, st.st_mtime_ns, st.st_size)


def _is_workload(name: str) -> bool:
    # xmp's own modules are the supervisor's code too: an edit there needs a
    # restart, and importing them twice would split their classes in two.
    return not (name == "xmp" or name.startswith("xmp.")) or name.startswith("xmp.guests.")


class Preloads:
    """The modules each preload brought in, with their sources' signatures."""

    def __init__(self) -> None:
        self.groups: dict[str, dict[str, tuple[str, int, int]]] = {}

    def load(self, module: str) -> None:
        before = set(sys.modules)
        try:
            importlib.import_module(module)
        except Exception:  # the domain will report it when it imports
            pass
        group = {}
        # (the module itself too, though the supervisor may have imported it)
        for name in (set(sys.modules) - before) | {module}:
            sig = _source_signature(name)
            if sig is not None and _is_workload(name):
                group[name] = sig
        self.groups[module] = group

    def stale(self) -> list[str]:
        return [module for module, group in self.groups.items()
                if any(_source_signature(name) != sig for name, sig in group.items())]

    def refresh(self) -> None:
        """Import every changed group afresh (stat only when nothing changed)."""
        for module in self.stale():
            for name, (path, _, _) in self.groups.pop(module).items():
                sys.modules.pop(name, None)
                # Its bytecode is stale too, yet an edit of the same size
                # within the same second would pass importlib's check.
                try:
                    os.unlink(importlib.util.cache_from_source(path))
                except (OSError, ValueError):
                    pass
            importlib.invalidate_caches()
            self.load(module)


def _reap(sock: socket.socket, children: dict[int, socket.socket | None]) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        uid_lock = children.pop(pid, None)
        if uid_lock is not None:  # its uid is free again
            uid_lock.close()
        code = os.waitstatus_to_exitcode(status)
        try:
            sock.send(json.dumps({"exited": pid, "status": code}).encode())
        except OSError:
            pass


def _kill_all(children: dict[int, socket.socket | None]) -> None:
    for pid in children:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for pid in children:
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass


def _spawn(req, fds, jailer: Jailer, lifeline: tuple[int, int],
           children: dict[int, socket.socket | None]) -> int:
    hc_fd, log_fd = fds
    kind = req.get("jail") if req.get("unprivileged") else None
    uid, uid_lock, pidns = jailer.prepare(kind, req["domid"])
    try:
        pid = os.fork()
    except OSError:
        jailer.after_fork(pidns)
        if uid_lock is not None:
            uid_lock.close()
        raise
    if pid:
        jailer.after_fork(pidns)
        children[pid] = uid_lock
        return pid
    # -- the domain process --------------------------------------------
    code = 1
    try:
        lib.xmp_set_pdeathsig(signal.SIGKILL)
        os.close(lifeline[1])
        _zygote_alive_or_exit(lifeline[0])
        lib.xmp_set_dumpable(0)
        title = req["title"]
        lib.xmp_set_comm(title.encode()[:15])
        _set_title(title)
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGCHLD, signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_DFL)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        sys.stdout = os.fdopen(1, "w", buffering=1)
        sys.stderr = os.fdopen(2, "w", buffering=1)
        # Log-dirty mode's userfaultfd (xmp.sharedmem.logdirty): made here,
        # still root and before the jail's seccomp denies the call, kept past
        # the close below; the supervisor takes a duplicate with pidfd_getfd.
        uffd = guest_uffd() if req["domid"] != 0 else -1
        kept: list[int] = []
        if req.get("unprivileged"):
            # Jailed with its log in place, so a failure is told there.
            line, kept = jailer.enter(kind, uid, pidns, req["domid"], req.get("config") or {})
            print(line, flush=True)
            # A change of uid clears PR_SET_PDEATHSIG and resets dumpable.
            lib.xmp_set_pdeathsig(signal.SIGKILL)
            _zygote_alive_or_exit(lifeline[0])
            lib.xmp_set_dumpable(0)
        keep = os.dup(hc_fd)
        _close_all_but(keep, *kept, *([uffd] if uffd >= 0 else []))
        if req.get("unprivileged"):
            rc = lib.xmp_drop_privileges_but(jailer.kept_caps(kind))
            if rc:
                raise OSError(-rc, "dropping privileges")
            jailer.seal()  # last: it denies what the steps above needed
        # The program every domain boots (the supervisor names it, as Xen is
        # handed a kernel image): looked up by name, never imported by the hypervisor.
        module, _, func = req["entry"].partition(":")
        code = getattr(importlib.import_module(module), func)(socket.socket(fileno=keep))
    except BaseException:
        traceback.print_exc()
    finally:
        os._exit(code)


def _close_all_but(*keep: int) -> None:
    low = 3
    for fd in sorted(set(keep)):
        os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, 65536)


def _zygote_alive_or_exit(lifeline: int) -> None:
    """Exit if the zygote died before PR_SET_PDEATHSIG was (re)armed: the
    lifeline hangs up once no zygote holds its write end."""
    if select.select([lifeline], [], [], 0)[0]:
        os._exit(1)


def _set_title(title: str) -> None:
    try:
        import setproctitle
    except ImportError:  # comm (15 chars) is still set
        return
    setproctitle.setproctitle(title)


class SpawnRefused(HypercallError, OSError):  # type: ignore[misc]  # (both keep errno as an int)
    """No domain process could be made (fork failed, no free guest uid).  An
    OSError too: the supervisor's domain build undoes itself on OSError, and
    the control socket answers a HypercallError instead of dying of it."""


class ZygoteClient:
    """The supervisor's side."""

    def __init__(self, guest_uids: tuple[int, int] = GUEST_UIDS):
        self.pid, self.sock = start_zygote(guest_uids)
        self.exits: list[tuple[int, int]] = []

    def preload(self, modules) -> None:
        self.sock.send(json.dumps({"cmd": "preload", "modules": sorted(set(modules))}).encode())

    def spawn(self, domid: int, title: str, hc_fd: int, log_fd: int, entry: str,
              unprivileged: bool = True, jail: str | None = "guest", config: dict | None = None) -> int:
        """Fork a domain that runs ``entry`` ("module:function", called with
        its hypercall channel).  ``jail``: "guest" (the whole jail),
        "driver" (own PID namespace, seccomp, no capabilities) or None; it applies only with
        ``unprivileged``.  ``config`` (the domain's, as a dict) is for the
        jail's network namespace hooks."""
        req = {"cmd": "spawn", "domid": domid, "title": title, "entry": entry, "unprivileged": unprivileged,
               "jail": jail, "config": config}
        send_handles(self.sock, json.dumps(req).encode(), [hc_fd, log_fd])
        while True:
            msg = self._recv()
            if "exited" in msg:
                self.exits.append((msg["exited"], msg["status"]))
            elif msg.get("domid") == domid:
                if "error" in msg:
                    raise SpawnRefused(errno.EAGAIN, "createdomain", msg["error"])
                return msg["spawned"]

    def _recv(self) -> dict:
        data = self.sock.recv(65536)
        if not data:
            raise OSError("the zygote died")
        return json.loads(data)

    def drain(self) -> list[tuple[int, int]]:
        """Exit reports that arrived (call when the socket is readable)."""
        self.sock.setblocking(False)
        try:
            while True:
                try:
                    msg = self._recv()
                except BlockingIOError:
                    break
                if "exited" in msg:
                    self.exits.append((msg["exited"], msg["status"]))
        finally:
            self.sock.setblocking(True)
        out, self.exits = self.exits, []
        return out

    def close(self) -> None:
        """Closing our end makes the zygote kill and reap every domain and
        exit; it gets two seconds before it is killed too."""
        self.sock.close()
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            try:
                if os.waitpid(self.pid, os.WNOHANG)[0]:
                    return
            except ChildProcessError:
                return
            time.sleep(0.005)
        os.kill(self.pid, signal.SIGKILL)
        os.waitpid(self.pid, 0)
