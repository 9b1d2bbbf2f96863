"""xenconsoled, one of dom0's services.

xenconsoled, as Xen's ``tools/console/daemon``: for every domain it maps
the console page (grant ref 0, GNTTAB_RESERVED_CONSOLE, pre-filled by the
domain builder) and binds the domain's console port, then drains the
``out`` ring into ``<rundir>/console/<name>.log`` -- and, under ``xmp
run``, to the terminal as ``name | line`` -- and kicks the guest so a
writer waiting for room goes on.  ``xmp console`` attaches through
``<rundir>/console/<domid>.sock``: input goes into the guest's ``in``
ring, output is copied to every attached client.

It learns of domains coming and going through VIRQ_DOM_EXC and
``getdomaininfo``.  (With xenstore it will read ``console/ring-ref`` and
``console/port`` instead.)
"""

from __future__ import annotations

import functools
import os
import selectors
import socket
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from xmp.dom0.xenstored import gone
from xmp.domain_proc.kernel import Kernel
from xmp.domain_proc.xen import GrantMapping
from xmp.errors import XmpError
from xmp.hypercall import from_a_domain
from xmp.sharedmem.bytering import ByteRing, console_rings


@dataclass
class GuestConsole:
    domid: int
    name: str
    mapping: GrantMapping
    inp: ByteRing
    out: ByteRing
    port: int
    log: BinaryIO
    sock_path: Path
    listener: socket.socket
    clients: list[socket.socket] = field(default_factory=list)
    partial: bytes = b""


class XenConsoled:
    def __init__(self, kernel: Kernel, rundir: Path, echo_fd: int | None):
        self.k = kernel
        self.xen = kernel.xen
        self.rundir = rundir
        self.echo_fd = echo_fd
        self.consoles: dict[int, GuestConsole] = {}
        self.drained: set[int] = set()  # domains whose last output we took (ids are never reused)
        self.lock = threading.Lock()
        self.sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self.sel.register(self._wake_r, selectors.EVENT_READ, None)
        threading.Thread(target=self._serve_clients, name="xenconsoled-clients", daemon=True).start()

    # -- domains coming and going -------------------------------------------

    def scan(self, infos: dict[int, dict]) -> None:
        """Attach to new domains, drain and detach from dying or gone ones."""
        for domid, info in infos.items():
            if domid not in self.consoles and info["state"] in ("running", "paused"):
                try:
                    self.attach(info)
                except XmpError as exc:
                    print(f"xenconsoled: dom{domid}: {exc}", flush=True)
            elif domid not in self.consoles and info["state"] == "dying" and domid not in self.drained:
                self.last_words(info)
        for domid in [d for d in self.consoles if gone(infos, d)]:
            self.detach(domid)
        for domid, info in infos.items():  # renamed (rename-restart)
            if domid in self.consoles and self.consoles[domid].name != info["name"]:
                self.consoles[domid].name = info["name"]

    def last_words(self, info: dict) -> None:
        """A domain that died before we attached: drain what it wrote, once."""
        self.drained.add(info["domid"])
        try:
            mapping = self.xen.map_grant_ref(info["domid"], [info["console_gref"]])
        except XmpError:
            return
        try:
            _inp, out = console_rings(mapping.pages[0])
            data = b""
            while chunk := out.read():
                data += chunk
            if data:
                with open(self.rundir / "console" / f"{info['name']}.log", "ab") as log:
                    log.write(data)
                if self.echo_fd is not None:
                    prefix = info["name"].encode() + b" | "
                    lines = data.rstrip(b"\n").split(b"\n")
                    os.write(self.echo_fd, b"".join(prefix + ln + b"\n" for ln in lines))
            _inp.release()
            out.release()
        finally:
            self.xen.unmap_grant_ref(mapping)
            self.xen.forget_domain(info["domid"])

    def attach(self, info: dict) -> None:
        domid = info["domid"]
        mapping = self.xen.map_grant_ref(domid, [info["console_gref"]])
        inp, out = console_rings(mapping.pages[0])
        port = self.xen.bind_interdomain(domid, info["console_port"])
        log = open(self.rundir / "console" / f"{info['name']}.log", "ab", buffering=0)
        sock_path = self.rundir / "console" / f"{domid}.sock"
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        if sock_path.exists():
            sock_path.unlink()
        old = os.umask(0o177)
        try:
            listener.bind(str(sock_path))
        finally:
            os.umask(old)
        listener.listen(4)
        con = GuestConsole(domid, info["name"], mapping, inp, out, port, log, sock_path, listener)
        with self.lock:
            self.consoles[domid] = con
        self.sel.register(listener, selectors.EVENT_READ, ("listen", con))
        self._wake_w.send(b"\0")
        self.k.loop.bind(port, functools.partial(self._drain_port, con))
        self.drain(con)

    def detach(self, domid: int) -> None:
        con = self.consoles[domid]
        self.drained.add(domid)
        self.drain(con)  # whatever it wrote before it went
        if con.partial:
            self._emit(con, con.partial + b"\n")
            con.partial = b""
        self.k.loop.unbind(con.port)
        with self.lock:
            del self.consoles[domid]
            for c in con.clients:
                c.close()
        try:
            self.xen.close(con.port)
        except XmpError:
            pass
        con.inp.release()
        con.out.release()
        try:
            self.xen.unmap_grant_ref(con.mapping)
        except XmpError:
            pass
        self.xen.forget_domain(domid)
        try:
            self.sel.unregister(con.listener)
        except (KeyError, ValueError):
            pass
        con.listener.close()
        con.sock_path.unlink(missing_ok=True)
        con.log.close()

    # -- output ---------------------------------------------------------------

    def _drain_port(self, con: GuestConsole, _port: int) -> None:
        self.drain(con)

    def drain(self, con: GuestConsole) -> None:
        got = False
        while True:
            data = con.out.read()
            if not data:
                break
            got = True
            self._emit(con, data)
        if got:
            self.xen.notify(con.port)  # room again for a writer that waits

    def _emit(self, con: GuestConsole, data: bytes) -> None:
        con.log.write(data)
        with self.lock:
            for c in list(con.clients):
                try:
                    c.sendall(data)
                except OSError:
                    con.clients.remove(c)
        if self.echo_fd is None:
            return
        text = con.partial + data
        lines = text.split(b"\n")
        con.partial = lines.pop()
        if lines:
            prefix = con.name.encode() + b" | "
            os.write(self.echo_fd, b"".join(prefix + ln + b"\n" for ln in lines))

    # -- attached clients (xmp console) ------------------------------------------

    def _serve_clients(self) -> None:
        while True:
            for key, _ in self.sel.select():
                if key.data is None:
                    self._wake_r.recv(64)
                    continue
                kind, con = key.data
                if kind == "listen":
                    try:
                        client, _ = con.listener.accept()
                    except OSError:
                        continue
                    if from_a_domain(client, os.getppid()):  # our parent is the zygote
                        client.close()
                        continue
                    with self.lock:
                        con.clients.append(client)
                    self.sel.register(client, selectors.EVENT_READ, ("client", (con, client)))
                else:
                    con, client = con
                    try:
                        data = client.recv(4096)
                    except OSError:
                        data = b""
                    if not data:
                        self.sel.unregister(client)
                        with self.lock:
                            if client in con.clients:
                                con.clients.remove(client)
                        client.close()
                        continue
                    self._input(con, data)

    def _input(self, con: GuestConsole, data: bytes) -> None:
        view = memoryview(data)
        for _ in range(200):  # the guest reads its input; give up on one that never does
            if con.domid not in self.consoles:
                return
            try:
                n = con.inp.write(view)
            except XmpError:
                return
            view = view[n:]
            self.xen.notify(con.port)
            if not view:
                return
            threading.Event().wait(0.01)
