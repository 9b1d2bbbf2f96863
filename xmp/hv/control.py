"""The control socket: how the ``xmp`` commands reach a running supervisor.

``<rundir>/control.sock`` (mode 0600 in a 0700 directory) takes one JSON
object per line and answers one per line::

    {"cmd": "list"}                        -> {"ok": true, "domains": [...]}
    {"cmd": "create", "config": {...}}     -> {"ok": true, "domid": 7}
    {"cmd": "destroy" | "pause" | "unpause", "dom": "web" | 7}
    {"cmd": "dmesg", "clear": false}       -> {"ok": true, "lines": [...]}
    {"cmd": "console", "dom": "web"}       -> {"ok": true, "socket": "<rundir>/console/7.sock", ...}
    failures                               -> {"ok": false, "error": "...", "errno": 3}

Clients are served from the supervisor's own loop, never blocking it: a
client's bytes are buffered until a full line arrives.
"""

from __future__ import annotations

import errno
import json
import os
import selectors
import socket
from pathlib import Path
from typing import Any

from xmp.errors import HypercallError, XmpError
from xmp.hypercall import from_a_domain

MAX_REQUEST = 1 << 20


class ControlServer:
    def __init__(self, path: Path, supervisor: Any):
        self.path = path
        self.sup = supervisor
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
        self.listener.listen(16)
        self.listener.setblocking(False)
        self.buffers: dict[socket.socket, bytearray] = {}
        self._conn: socket.socket | None = None  # the connection whose request is being handled

    def accept(self, sel: selectors.BaseSelector) -> None:
        try:
            conn, _ = self.listener.accept()
        except BlockingIOError:
            return
        if from_a_domain(conn, self.sup.zygote.pid):
            conn.close()  # guests run as our uid: the file mode alone cannot keep them out
            return
        conn.setblocking(False)
        self.buffers[conn] = bytearray()
        sel.register(conn, selectors.EVENT_READ, ("ctl", conn))

    def serve(self, sel: selectors.BaseSelector, conn: socket.socket) -> None:
        try:
            data = conn.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        buf = self.buffers[conn]
        buf += data
        if not data or len(buf) > MAX_REQUEST:
            self._drop(sel, conn)
            return
        while b"\n" in buf:
            line, _, rest = bytes(buf).partition(b"\n")
            buf[:] = rest
            self._conn = conn
            reply = self.handle(line)
            if reply is not None and not self.reply(sel, conn, reply):
                return

    def reply(self, sel: selectors.BaseSelector, conn: socket.socket, reply: dict[str, Any]) -> bool:
        """Answer one request (now, or later for a command that waits)."""
        if conn not in self.buffers:
            return False  # the client went away meanwhile
        try:
            conn.setblocking(True)
            conn.sendall((json.dumps(reply) + "\n").encode())
            conn.setblocking(False)
        except OSError:
            self._drop(sel, conn)
            return False
        return True

    def _drop(self, sel: selectors.BaseSelector, conn: socket.socket) -> None:
        sel.unregister(conn)
        del self.buffers[conn]
        conn.close()

    def handle(self, line: bytes) -> dict[str, Any] | None:
        try:
            req = json.loads(line)
            if not isinstance(req, dict) or not isinstance(req.get("cmd"), str):
                raise HypercallError(errno.EINVAL, "control", "a request is {\"cmd\": ...}")
            method = getattr(self, "cmd_" + req["cmd"].replace("-", "_"), None)
            if method is None:
                raise HypercallError(errno.ENOSYS, "control", f"no command {req['cmd']!r}")
            out = method(req)
            return None if out is None else {"ok": True, **out}  # None: it answers later
        except HypercallError as exc:
            return {"ok": False, "errno": exc.errno, "error": exc.detail or str(exc)}
        except XmpError as exc:
            return {"ok": False, "errno": errno.EINVAL, "error": str(exc)}
        except ValueError as exc:
            return {"ok": False, "errno": errno.EINVAL, "error": f"bad request: {exc}"}

    def _dom(self, req: dict[str, Any]):
        ref = req.get("dom")
        if not isinstance(ref, (str, int)) or isinstance(ref, bool):
            raise HypercallError(errno.EINVAL, "control", "name the domain by name or id")
        return self.sup.find(ref)

    def cmd_list(self, req):
        return {"domains": [self.sup.domain_info(d) for d in
                            sorted(self.sup.domains.values(), key=lambda d: d.domid)]}

    def cmd_info(self, req):
        return self.sup.host_info()

    def cmd_create(self, req):
        cfg = req.get("config")
        if not isinstance(cfg, dict):
            raise HypercallError(errno.EINVAL, "create", "config must be an object")
        dom = self.sup.create_domain(cfg)
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
        self.sup.request_shutdown(dom, reason)
        return {"domid": dom.domid}

    def cmd_resume(self, req):
        dom = self._dom(req)
        self.sup.resume_domain(dom)
        return {"domid": dom.domid}

    def cmd_dmesg(self, req):
        lines = list(self.sup.dmesg)
        if req.get("clear"):
            self.sup.dmesg.clear()
        return {"lines": lines}

    def cmd_device_attach(self, req):
        """{"cmd": "device-attach", "dom": guest, "backend": dom, "type": "vping", "devid": 0,
        "back_keys": {...}, "front_keys": {...}} -- the toolstack's generic device add."""
        front = self._dom(req)
        back = self.sup.find(req.get("backend", 0))
        devtype, devid = req.get("type"), req.get("devid", 0)
        keys = [req.get("back_keys", {}), req.get("front_keys", {})]
        if not isinstance(devtype, str) or not devtype.isidentifier() or not isinstance(devid, int) \
                or not all(isinstance(k, dict) and all(isinstance(v, str) for v in k.values()) for k in keys):
            raise HypercallError(errno.EINVAL, "device-attach", "type, devid and string keys please")
        self.sup.attach_device(front, back, devtype, devid, *keys)
        return {"domid": front.domid, "backend": back.domid}

    def cmd_block_attach(self, req):
        spec, cwd = req.get("spec"), req.get("cwd", "/")
        if not isinstance(spec, str) or not isinstance(cwd, str):
            raise HypercallError(errno.EINVAL, "block-attach", "spec and cwd are strings")
        dom = self._dom(req)
        conn, devs = self._conn, []

        def done(errors: list[str]) -> None:  # xenstored has answered every write
            if not devs:  # answered before block_attach returned: nothing went out
                devs.append(None)
                return
            dev = devs[0]
            reply = {"ok": False, "errno": errno.EIO, "error": "; ".join(errors)} if errors else \
                {"ok": True, "domid": dom.domid, "devid": dev.devid, "backend": dev.back_domid}
            self.reply(self.sup.sel, conn, reply)

        dev = self.sup.block_attach(dom, spec, Path(cwd), done)
        if devs:  # done ran already: xenstore is unavailable and nothing was written
            self.sup.devices.remove(dev)
            raise HypercallError(errno.EIO, "block-attach", "xenstore unavailable: the disk was not written")
        devs.append(dev)
        return None

    def cmd_block_detach(self, req):
        dom, vdev = self._dom(req), req.get("vdev")
        if not isinstance(vdev, str):
            raise HypercallError(errno.EINVAL, "block-detach", "vdev is a string")
        dev = self.sup.block_detach(dom, vdev, bool(req.get("force")))
        return {"domid": dom.domid, "devid": dev.devid, "backend": dev.back_domid}

    def cmd_console(self, req):
        dom = self._dom(req)
        return {"domid": dom.domid, "name": dom.name,
                "socket": str(self.sup.rundir / "console" / f"{dom.domid}.sock")}

    def close(self) -> None:
        for conn in list(self.buffers):
            conn.close()
        self.buffers.clear()
        self.listener.close()
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
