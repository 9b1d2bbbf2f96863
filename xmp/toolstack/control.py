"""The control socket: how the ``xmp`` commands (xl) reach the toolstack.

``<rundir>/control.sock`` (mode 0600 in a 0700 directory) takes one JSON
object per line and answers one per line, in order::

    {"cmd": "list"}                        -> {"ok": true, "domains": [...]}
    {"cmd": "info"}                        -> {"ok": true, "domains": 3, "capacity": 2032, "nofile": ...}
    {"cmd": "create", "config": {...}}     -> {"ok": true, "domid": 7}
    {"cmd": "destroy" | "pause" | "unpause", "dom": "web" | 7}
    {"cmd": "device-add", "class": "block", "dom": "web", "spec": "...", "cwd": "/"}
    {"cmd": "device-remove", "class": "block", "dom": "web", "name": "xvdb", "force": false}
    {"cmd": "device-list", "class": "block", "dom": "web"} -> {"ok": true, "header": "...", "rows": [...]}
    {"cmd": "device-move", "class": "block", "dom": "web", "name": "xvda", "backend": "dd2"}
    {"cmd": "class-op", "class": CMD, "op": OP, "arg": "..."}  (a class's xmp.devices.HostCommand)
    {"cmd": "mem-set", "dom": "web", "memkb": 65536, "timeout": 10} -> {"ok": true, "mem_kb": 65536, ...}
    {"cmd": "mem-max", "dom": "web", "memkb": 131072}
    {"cmd": "save", "dom": "web", "path": "/abs/file", "checkpoint": false, "paused": false, "timeout": 60}
    {"cmd": "restore", "path": "/abs/file", "paused": false} -> {"ok": true, "domid": 9, ...}
    {"cmd": "migrate", "dom": "web", "address": "10.0.0.2:8002", "live": true} -> {"ok": true, ...}
    {"cmd": "rename", "dom": "web", "name": "www"}
    {"cmd": "sysrq", "dom": "web", "key": "t"}
    {"cmd": "trigger", "dom": "web", "trigger": "nmi" | "reset" | "power" | ...}
    {"cmd": "dump-core", "dom": "web", "path": "/abs/file"}
    {"cmd": "uptime"}                      -> {"ok": true, "domains": [{"domid", "name", "start_time"}, ...]}
    {"cmd": "dmesg", "clear": false}       -> {"ok": true, "lines": [...]}
    {"cmd": "console", "dom": "web"}       -> {"ok": true, "socket": "<rundir>/console/7.sock", ...}
    failures                               -> {"ok": false, "error": "...", "errno": 3}

Clients are served from the supervisor's own loop and never block it: a
client's bytes are buffered until a full line arrives, answers are
buffered and written when its socket takes them (a client that stops
reading is cut off alone once its backlog passes a bound), and an answer
that waits for xenstore (a hot-plug, a detach) is sent when it settles.
"""

from __future__ import annotations

import errno
import functools
import json
import os
import selectors
import socket
import sys
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING, Any

from xmp import devices
from xmp.errors import HypercallError, XmpError
from xmp.hv.domain import DomState
from xmp.hypercall import from_a_domain
from xmp.sharedmem.shm import PAGE_SIZE
from xmp.toolstack import memory, vcpus
from xmp.toolstack.pending import Pending

if TYPE_CHECKING:
    from xmp.toolstack.domains import Toolstack

MAX_REQUEST = 1 << 20    # bytes of one request line
MAX_BACKLOG = 4 << 20    # bytes of answers a client may leave unread before it is cut off


class _Client:
    def __init__(self, conn: socket.socket):
        self.conn = conn
        self.inbuf = bytearray()
        self.out = bytearray()
        self.waiting: deque[list[bytes | None]] = deque()  # answers in request order; None: not settled


class ControlServer:
    def __init__(self, path: Path, ts: Toolstack):
        self.path = path
        self.ts = ts
        self.sup = ts.sup
        if path.exists():
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(str(path))
            except OSError:
                path.unlink()  # left by a supervisor that died
            else:
                probe.close()
                raise XmpError(f"a supervisor already runs in {path.parent}: "
                               "stop it (xmp destroy Domain-0) or use another --rundir")
            finally:
                probe.close()
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            self.listener.bind(str(path))
        finally:
            os.umask(old)
        self.listener.listen(64)
        self.listener.setblocking(False)
        self.clients: dict[socket.socket, _Client] = {}
        self.sup.watch(self.listener, selectors.EVENT_READ, lambda _mask: self.accept())

    def accept(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except (BlockingIOError, OSError):
            return
        if from_a_domain(conn, self.sup.zygote.pid):
            conn.close()  # guests run as our uid: the file mode alone cannot keep them out
            return
        conn.setblocking(False)
        client = self.clients[conn] = _Client(conn)
        self.sup.watch(conn, selectors.EVENT_READ, functools.partial(self._ready, client))

    def _ready(self, client: _Client, mask: int) -> None:
        if mask & selectors.EVENT_WRITE:
            self._flush(client)
        if mask & selectors.EVENT_READ and client.conn in self.clients:
            self._read(client)

    def _read(self, client: _Client) -> None:
        try:
            data = client.conn.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        client.inbuf += data
        if not data or len(client.inbuf) > MAX_REQUEST:
            self._drop(client)
            return
        while b"\n" in client.inbuf and client.conn in self.clients:
            line, _, rest = bytes(client.inbuf).partition(b"\n")
            client.inbuf[:] = rest
            slot: list[bytes | None] = [None]
            client.waiting.append(slot)
            answer = self.handle(line)
            if isinstance(answer, Pending):
                answer.then(functools.partial(self._settled, client, slot))
            else:
                slot[0] = _line(answer)
        self._flush(client)

    def _settled(self, client: _Client, slot: list[bytes | None], result, exc) -> None:
        slot[0] = _line(_failure(exc) if exc is not None else {"ok": True, **(result or {})})
        if client.conn in self.clients:
            self._flush(client)

    def _flush(self, client: _Client) -> None:
        """Move settled answers (in order) to the output and write what the
        socket takes now; the rest when the loop says it is writable."""
        while client.waiting and (ready := client.waiting[0][0]) is not None:
            client.out += ready
            client.waiting.popleft()
        if len(client.out) > MAX_BACKLOG:
            self.sup.log("control: a client left more than "
                         f"{MAX_BACKLOG >> 20} MiB of answers unread; disconnected")
            self._drop(client)
            return
        while client.out:
            try:
                n = client.conn.send(client.out)
            except BlockingIOError:
                break
            except OSError:
                self._drop(client)
                return
            del client.out[:n]
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if client.out else 0)
        self.sup.modify(client.conn, events, functools.partial(self._ready, client))

    def _drop(self, client: _Client) -> None:
        if self.clients.pop(client.conn, None) is not None:
            self.sup.unwatch(client.conn)
            client.conn.close()

    def handle(self, line: bytes) -> dict[str, Any] | Pending:
        try:
            req = json.loads(line)
            if not isinstance(req, dict) or not isinstance(req.get("cmd"), str):
                raise HypercallError(errno.EINVAL, "control", "a request is {\"cmd\": ...}")
            method = getattr(self, "cmd_" + req["cmd"].replace("-", "_"), None)
            if method is None:
                raise HypercallError(errno.ENOSYS, "control", f"no command {req['cmd']!r}")
            answer = method(req)
            return answer if isinstance(answer, Pending) else {"ok": True, **answer}
        except (HypercallError, XmpError, ValueError) as exc:
            return _failure(exc)

    def _dom(self, req: dict[str, Any]):
        ref = req.get("dom")
        if not isinstance(ref, (str, int)) or isinstance(ref, bool):
            raise HypercallError(errno.EINVAL, "control", "name the domain by name or id")
        return self.sup.find(ref)

    def _class(self, req: dict[str, Any]) -> devices.DeviceClass:
        name = req.get("class")
        try:
            return devices.by_command(str(name))
        except XmpError:
            raise HypercallError(errno.EINVAL, "control", f"no device class {name!r}") from None

    def cmd_list(self, req):
        return {"domains": [self.sup.domain_info(d) for d in
                            sorted(self.sup.domains.values(), key=lambda d: d.domid)]}

    def cmd_info(self, req):
        """The hypervisor's share of xl info (its pool, the command line it
        runs), and xmp's limits."""
        used = sum(d.tot_pages for d in self.sup.domains.values())
        return {**self.sup.host_info(), "pool_total_mib": (self.sup.pool_pages + used) * PAGE_SIZE >> 20,
                "commandline": " ".join(sys.orig_argv)}

    def cmd_create(self, req):
        cfg = req.get("config")
        if not isinstance(cfg, dict):
            raise HypercallError(errno.EINVAL, "create", "config must be an object")
        dom = self.ts.create_config(cfg)
        if req.get("paused"):
            self.sup.pause_domain(dom)
        return {"domid": dom.domid, "name": dom.name}

    def cmd_destroy(self, req):
        dom = self._dom(req)
        self.sup.destroy_domain(dom)
        return {"domid": dom.domid}

    def cmd_pause(self, req):
        dom = self._dom(req)
        self.sup.pause_domain(dom)
        return {"domid": dom.domid}

    def cmd_unpause(self, req):
        dom = self._dom(req)
        self.sup.unpause_domain(dom)
        return {"domid": dom.domid}

    def cmd_shutdown(self, req):
        dom = self._dom(req)
        reason = req.get("reason", "poweroff")
        if reason not in ("poweroff", "reboot", "suspend"):
            raise HypercallError(errno.EINVAL, "shutdown", f"reason {reason!r}")
        self.ts.request_shutdown(dom, reason)
        return {"domid": dom.domid}

    def cmd_resume(self, req):
        dom = self._dom(req)
        self.sup.resume_domain(dom)
        return {"domid": dom.domid}

    def cmd_mem_set(self, req):
        kb, timeout = req.get("memkb"), req.get("timeout", memory.TARGET_WAIT)
        if not _number(kb, int) or not _number(timeout, (int, float)):
            raise HypercallError(errno.EINVAL, "mem-set", "memkb is an integer, timeout a number")
        return memory.set_memory_target(self.ts, self._dom(req), kb, float(timeout))

    def cmd_mem_max(self, req):
        kb = req.get("memkb")
        if not _number(kb, int):
            raise HypercallError(errno.EINVAL, "mem-max", "memkb is an integer")
        return memory.set_max_memory(self.ts, self._dom(req), kb)
    def cmd_save(self, req):
        """{"cmd": "save", "dom": "web", "path": "/abs/web.save", "checkpoint": false, "paused": false}
        -> answered once the image is complete (xl save)."""
        path = req.get("path")
        if not isinstance(path, str) or not os.path.isabs(path):
            raise HypercallError(errno.EINVAL, "save", "path is an absolute file name")
        timeout = req.get("timeout", 60.0)
        if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or timeout <= 0:
            raise HypercallError(errno.EINVAL, "save", "timeout is a positive number of seconds")
        return self.ts.saves.save(self._dom(req), Path(path), bool(req.get("checkpoint")),
                                  bool(req.get("paused")), float(timeout))

    def cmd_restore(self, req):
        """{"cmd": "restore", "path": "/abs/web.save", "paused": false} -> {"domid": 9, "name": "web"}"""
        path = req.get("path")
        if not isinstance(path, str) or not os.path.isabs(path):
            raise HypercallError(errno.EINVAL, "restore", "path is an absolute file name")
        return self.ts.saves.restore(Path(path), bool(req.get("paused")))

    def cmd_migrate(self, req):
        """{"cmd": "migrate", "dom": "web", "address": "10.0.0.2:8002", "live": true, "paused": false,
        "shared": null} -> answered once the guest runs there, or runs on here (xl migrate)."""
        key = self.ts.migrate_key
        if key is None:
            raise HypercallError(errno.EINVAL, "migrate",
                                 "this host has no migration key ([host] migrate_key)")
        shared = req.get("shared")
        if shared is not None and (not isinstance(shared, str) or not shared.startswith("/")):
            raise HypercallError(errno.EINVAL, "migrate", "shared is an absolute directory name")
        return self.ts.migrations.migrate(self._dom(req), self._string(req, "address", "migrate"), key,
                                          live=bool(req.get("live")), paused=bool(req.get("paused")),
                                          shared=shared)

    def cmd_migrate_status(self, req):
        """{"cmd": "migrate-status", "dom": "web"} -> the rounds so far of its migration in progress."""
        status = self.ts.migrations.status.get(str(req.get("dom")))
        if status is None:
            raise HypercallError(errno.ESRCH, "migrate", f"no migration of {req.get('dom')!r} in progress")
        return {"phase": status["phase"], "rounds": list(status["rounds"]), "tot_pages": status["tot_pages"]}

    def _string(self, req: dict[str, Any], key: str, op: str) -> str:
        value = req.get(key)
        if not isinstance(value, str):
            raise HypercallError(errno.EINVAL, op, f"{key} is a string")
        return value

    def cmd_rename(self, req):
        dom, name = self._dom(req), self._string(req, "name", "rename")
        self.ts.rename(dom, name)
        return {"domid": dom.domid, "name": name}

    def cmd_sysrq(self, req):
        dom = self._dom(req)
        self.ts.sysrq(dom, self._string(req, "key", "sysrq"))
        return {"domid": dom.domid}

    def cmd_trigger(self, req):
        dom, vcpu = self._dom(req), req.get("vcpu", 0)
        # as XEN_DOMCTL_sendtrigger: the vCPU must exist (every trigger here acts on the whole domain)
        if not isinstance(vcpu, int) or isinstance(vcpu, bool) or not 0 <= vcpu < dom.cfg.maxvcpus:
            raise HypercallError(errno.EINVAL, "trigger", f"{dom.name} has no vCPU {vcpu!r}")
        self.ts.trigger(dom, self._string(req, "trigger", "trigger"))
        return {"domid": dom.domid}

    def cmd_sched_credit(self, req):
        """{"cmd": "sched-credit", "dom": "web", "weight": 512, "cap": 50} (either or
        neither); without "dom" every domain's."""
        weight, cap = req.get("weight"), req.get("cap")
        if any(v is not None and not _number(v, int) for v in (weight, cap)):
            raise HypercallError(errno.EINVAL, "sched-credit", "weight and cap are integers")
        if req.get("dom") is None:
            if weight is not None or cap is not None:
                raise HypercallError(errno.EINVAL, "sched-credit", "Must specify a domain.")
            doms = sorted(self.sup.domains.values(), key=lambda d: d.domid)
        else:
            doms = [self._dom(req)]
            if weight is not None or cap is not None:
                self.ts.credit.set(doms[0].domid, doms[0].pid, weight, cap)
        rows = []
        for d in doms:
            p = self.ts.credit.get(d.domid)
            rows.append({"name": d.name, "domid": d.domid, "weight": p.weight, "cap": p.cap})
        return {"domains": rows, "pool": "Pool-0", "tslice_ms": 30, "ratelimit_us": 1000,
                "migration_delay_us": 0}

    def cmd_vcpu_set(self, req):
        n = req.get("vcpus")
        if not _number(n, int):
            raise HypercallError(errno.EINVAL, "vcpu-set", "vcpus is an integer")
        return vcpus.set_vcpus(self.ts, self._dom(req), n)

    def cmd_vcpu_list(self, req):
        refs = req.get("doms") or []
        doms = [self.sup.find(r) for r in refs] if refs else \
            sorted(self.sup.domains.values(), key=lambda d: d.domid)
        return {"vcpus": vcpus.list_vcpus(doms)}

    def cmd_vcpu_pin(self, req):
        vcpu, hard, soft = req.get("vcpu"), req.get("hard"), req.get("soft")
        if not all(isinstance(v, str) for v in (vcpu, hard)) or not isinstance(soft, (str, type(None))):
            raise HypercallError(errno.EINVAL, "vcpu-pin", "vcpu, hard (and soft) are strings")
        return {"vcpus": vcpus.pin(self.sup, self._dom(req), vcpu, hard, soft)}

    def cmd_dump_core(self, req):
        dom, path = self._dom(req), Path(self._string(req, "path", "dump-core"))
        if not path.is_absolute():
            raise HypercallError(errno.EINVAL, "dump-core", "the path is absolute")
        return {"domid": dom.domid, "path": str(self.ts.coredump(dom, path))}

    def cmd_uptime(self, req):
        """libxl_vm_get_start_time for every domain the toolstack built."""
        recs = self.ts.records
        doms = sorted((d for d in self.sup.domains.values() if d.state != DomState.DYING and d.domid in recs),
                      key=lambda d: d.domid)
        return {"domains": [{"domid": d.domid, "name": d.name, "start_time": recs[d.domid].start_time}
                            for d in doms]}

    def cmd_dmesg(self, req):
        lines = list(self.sup.dmesg)
        if req.get("clear"):
            self.sup.dmesg.clear()
        return {"lines": lines}

    def cmd_device_attach(self, req):
        """{"cmd": "device-attach", "dom": guest, "backend": dom, "type": DEVTYPE, "devid": 0,
        "back_keys": {...}, "front_keys": {...}} -- a device with the keys given."""
        front = self._dom(req)
        back = self.sup.find(req.get("backend", 0))
        devtype, devid = req.get("type"), req.get("devid", 0)
        keys = [req.get("back_keys", {}), req.get("front_keys", {})]
        if not isinstance(devtype, str) or not isinstance(devid, int) or isinstance(devid, bool) \
                or not all(map(devices.are_keys, keys)):
            raise HypercallError(errno.EINVAL, "device-attach", "type, devid and string keys please")
        try:
            cls = devices.by_devtype(devtype)
        except XmpError:
            raise HypercallError(errno.EINVAL, "device-attach", f"no device class {devtype!r}") from None
        return self.ts.devices.attach_keys(front, back, cls, devid, *keys)

    def cmd_device_add(self, req):
        spec, cwd = req.get("spec"), req.get("cwd", "/")
        if not isinstance(spec, str) or not isinstance(cwd, str):
            raise HypercallError(errno.EINVAL, "device-add", "spec and cwd are strings")
        return self.ts.devices.attach(self._dom(req), self._class(req), spec, Path(cwd))

    def cmd_device_remove(self, req):
        name, timeout = req.get("name"), req.get("timeout", 10.0)
        if not isinstance(name, str) or not isinstance(timeout, (int, float)) or isinstance(timeout, bool):
            raise HypercallError(errno.EINVAL, "device-remove", "name is a string, timeout a number")
        return self.ts.devices.detach(self._dom(req), self._class(req), name, bool(req.get("force")),
                                      float(timeout))

    def cmd_device_move(self, req):
        """{"cmd": "device-move", "class": "block", "dom": "g", "name": "xvda", "backend": "dd2"}:
        the device's backend moves to another domain (what a migration does
        to every device); the frontend reconnects to it."""
        name = req.get("name")
        if not isinstance(name, str):
            raise HypercallError(errno.EINVAL, "device-move", "name is a string")
        front, back = self._dom(req), self.sup.find(req.get("backend", 0))
        dev = self.ts.devices.find(front, self._class(req), name)
        self.ts.devices.move(dev, back)
        return {"domid": front.domid, "devid": dev.devid, "backend": back.domid}

    def cmd_device_list(self, req):
        return self.ts.devices.list(self._dom(req), self._class(req))

    def cmd_class_op(self, req):
        """{"cmd": "class-op", "class": CMD, "op": OP, "arg": ...}: a device
        class's own host command (:class:`xmp.devices.HostCommand`), answered
        by ``control(ts, op, req)`` in its toolstack.py."""
        cls, op = self._class(req), req.get("op")
        control = getattr(cls.part("toolstack"), "control", None)
        if control is None or not isinstance(op, str):
            raise HypercallError(errno.ENOSYS, "class-op", f"{cls.command} has no operation {op!r}")
        return control(self.ts, op, req)

    def cmd_console(self, req):
        dom = self._dom(req)
        return {"domid": dom.domid, "name": dom.name,
                "socket": str(self.sup.rundir / "console" / f"{dom.domid}.sock")}

    def close(self) -> None:
        for client in list(self.clients.values()):
            self._drop(client)
        self.sup.unwatch(self.listener)
        self.listener.close()
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass


def _number(value: Any, kind) -> bool:
    return isinstance(value, kind) and not isinstance(value, bool) and value >= 0


def _line(answer: dict[str, Any]) -> bytes:
    return (json.dumps(answer) + "\n").encode()


def _failure(exc: Exception) -> dict[str, Any]:
    if isinstance(exc, HypercallError):
        return {"ok": False, "errno": exc.errno, "error": exc.detail or str(exc)}
    if isinstance(exc, XmpError):
        return {"ok": False, "errno": errno.EINVAL, "error": str(exc)}
    return {"ok": False, "errno": errno.EINVAL, "error": f"bad request: {exc}"}
