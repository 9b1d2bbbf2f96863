"""The zygote: a fork server that has already imported xmp.

Forked from the supervisor before it opens anything, the zygote sits in
its own session (so the terminal's Ctrl-C reaches only the supervisor),
dies with the supervisor (PR_SET_PDEATHSIG), and forks one domain per
request -- a few milliseconds instead of a fresh interpreter's fifty.  It
is the parent of every domain, so it reaps them and reports each exit.

Protocol (SOCK_SEQPACKET, JSON):
    supervisor -> zygote  {"cmd": "spawn", "domid", "title"} + [hypercall socket, log fd]
                          {"cmd": "preload", "modules": [...]}
    zygote -> supervisor  {"spawned": pid, "domid"} | {"error": "..."}
                          {"exited": pid, "status": code | -signal}   (any time)
"""

from __future__ import annotations

import importlib
import json
import os
import selectors
import signal
import socket
import sys
import time
import traceback

from xmp.sharedmem._ffi import lib
from xmp.sharedmem.shm import recv_handles, send_handles


def start_zygote() -> tuple[int, socket.socket]:
    """Fork the zygote; return (pid, the supervisor's end of its socket)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    supervisor = os.getpid()
    pid = os.fork()
    if pid == 0:  # the zygote
        try:
            ours.close()
            _zygote_main(theirs, supervisor)
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(0)
    theirs.close()
    return pid, ours


def _zygote_main(sock: socket.socket, supervisor: int) -> None:
    lib.xmp_set_pdeathsig(signal.SIGKILL)
    if os.getppid() != supervisor:  # it died before we could ask to follow it
        os._exit(1)
    os.setsid()
    lib.xmp_set_comm(b"xmp:zygote")
    _set_title("xmp:zygote")
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)
    wake_r, wake_w = socket.socketpair()
    wake_r.setblocking(False)
    wake_w.setblocking(False)
    signal.set_wakeup_fd(wake_w.fileno())
    signal.signal(signal.SIGCHLD, lambda *_: None)
    sel = selectors.DefaultSelector()
    sel.register(sock, selectors.EVENT_READ, "req")
    sel.register(wake_r, selectors.EVENT_READ, "chld")
    children: set[int] = set()
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
                    try:
                        importlib.import_module(mod)
                    except Exception:  # the domain will report it when it imports
                        pass
                continue
            try:
                pid = _spawn(req, fds)
                children.add(pid)
                reply = {"spawned": pid, "domid": req["domid"]}
            except OSError as exc:
                reply = {"error": f"fork failed: {exc}", "domid": req["domid"]}
            finally:
                for fd in fds:
                    os.close(fd)
            sock.send(json.dumps(reply).encode())
        _reap(sock, children)


def _reap(sock: socket.socket, children: set[int]) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        children.discard(pid)
        code = os.waitstatus_to_exitcode(status)
        try:
            sock.send(json.dumps({"exited": pid, "status": code}).encode())
        except OSError:
            pass


def _kill_all(children: set[int]) -> None:
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


def _spawn(req, fds) -> int:
    hc_fd, log_fd = fds
    zygote = os.getpid()
    pid = os.fork()
    if pid:
        return pid
    # -- the domain process --------------------------------------------
    code = 1
    try:
        lib.xmp_set_pdeathsig(signal.SIGKILL)
        if os.getppid() != zygote:
            os._exit(1)
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
        keep = os.dup(hc_fd)
        os.closerange(3, keep)
        os.closerange(keep + 1, 65536)
        sys.stdout = os.fdopen(1, "w", buffering=1)
        sys.stderr = os.fdopen(2, "w", buffering=1)
        # What the domain's devices need set up while it still may (its
        # network namespace and TAPs), then no OS privilege is left.
        for step in req.get("pre_drop", ()):
            mod, _, fn = step["entry"].partition(":")
            getattr(importlib.import_module(mod), fn)(step["specs"])
        if req.get("unprivileged"):
            rc = lib.xmp_drop_privileges()
            if rc:
                raise OSError(-rc, "dropping privileges")
        # The program every domain boots (the supervisor names it, as Xen is
        # handed a kernel image): looked up by name, never imported by the hypervisor.
        module, _, func = req["entry"].partition(":")
        code = getattr(importlib.import_module(module), func)(socket.socket(fileno=keep))
    except BaseException:
        traceback.print_exc()
    finally:
        os._exit(code)


def _set_title(title: str) -> None:
    try:
        import setproctitle
    except ImportError:  # comm (15 chars) is still set
        return
    setproctitle.setproctitle(title)


class ZygoteClient:
    """The supervisor's side."""

    def __init__(self):
        self.pid, self.sock = start_zygote()
        self.exits: list[tuple[int, int]] = []

    def preload(self, modules) -> None:
        self.sock.send(json.dumps({"cmd": "preload", "modules": sorted(set(modules))}).encode())

    def spawn(self, domid: int, title: str, hc_fd: int, log_fd: int, entry: str,
              unprivileged: bool = True, pre_drop: list[dict] | None = None) -> int:
        """Fork a domain that runs ``entry`` ("module:function", called with
        its hypercall channel); ``pre_drop`` steps run before it drops its
        privileges (xmp.devices.pre_drop_steps)."""
        req = {"cmd": "spawn", "domid": domid, "title": title, "entry": entry, "unprivileged": unprivileged,
               "pre_drop": pre_drop or []}
        send_handles(self.sock, json.dumps(req).encode(), [hc_fd, log_fd])
        while True:
            msg = self._recv()
            if "exited" in msg:
                self.exits.append((msg["exited"], msg["status"]))
            elif msg.get("domid") == domid:
                if "error" in msg:
                    raise OSError(msg["error"])
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
