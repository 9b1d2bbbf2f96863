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

Theory of operation.  Rings are drained in dom0's event loop; attached
clients are served by one selectors thread, which never blocks on one:

* A guest's output is taken at most ``RATE_BYTES`` per ``RATE_PERIOD``
  (xenconsoled's rate limit, which counts events; bytes are what costs
  here).  Over its budget a ring is left alone until the next period: the
  guest's writer waits on its full ring -- back-pressure, nothing lost.
* ``<name>.log`` is capped at ``LOG_MAX`` bytes and then rotated to
  ``<name>.log.1`` (one old file kept), so a flood cannot fill the disk.
* Each client has an output buffer written when its socket is writable; a
  client that lets more than ``CLIENT_OUT_MAX`` pile up is disconnected,
  alone.  Input waits in a per-console buffer until the guest makes room
  in ``in``; past ``INPUT_MAX`` its clients are not read (their sockets
  fill: back-pressure on them, not on anyone else).
* A ring whose indices are impossible is a hostile guest: its console is
  ignored from then on (logged to its console log and dmesg); every other
  console goes on.
"""

from __future__ import annotations

import functools
import os
import selectors
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from xmp.dom0.xenstored import gone
from xmp.domain_proc.kernel import Kernel
from xmp.domain_proc.service import guarded, report
from xmp.domain_proc.xen import GrantMapping
from xmp.errors import RemoteProtocolError, XmpError
from xmp.hypercall import from_a_domain
from xmp.sharedmem.bytering import ByteRing, console_rings

LOG_MAX = 4 << 20           # bytes of console/<name>.log before it is rotated to <name>.log.1
RATE_BYTES = 256 << 10      # a guest's output taken per period (2.5 MiB/s) ...
RATE_PERIOD = 0.1           # ... of this many seconds
CLIENT_OUT_MAX = 1 << 20    # output queued for an attached client; past it, it is disconnected
INPUT_MAX = 64 << 10        # input queued for a guest; past it, its clients are not read

READ, WRITE = selectors.EVENT_READ, selectors.EVENT_WRITE


class ConsoleLog:
    """``console/<name>.log``, capped at ``cap`` bytes: past it the file is
    rotated to ``<name>.log.1`` (replacing the older one)."""

    def __init__(self, path: Path, cap: int = LOG_MAX):
        self.path = path
        self.cap = cap
        self.f = open(path, "ab", buffering=0)
        self.size = os.fstat(self.f.fileno()).st_size

    def write(self, data: bytes) -> None:
        if self.size and self.size + len(data) > self.cap:
            self.f.close()
            os.replace(self.path, self.path.with_name(self.path.name + ".1"))
            self.f = open(self.path, "ab", buffering=0)
            self.size = 0
        self.f.write(data)
        self.size += len(data)

    def close(self) -> None:
        self.f.close()


@dataclass(eq=False)
class Client:
    sock: socket.socket
    out: bytearray = field(default_factory=bytearray)
    events: int = 0  # what the selector watches for it now (0: not registered)
    dead: bool = False


@dataclass(eq=False)
class GuestConsole:
    domid: int
    name: str
    mapping: GrantMapping
    inp: ByteRing
    out: ByteRing
    port: int
    log: ConsoleLog
    sock_path: Path
    listener: socket.socket
    clients: list[Client] = field(default_factory=list)
    partial: bytes = b""
    pending_in: bytearray = field(default_factory=bytearray)
    hostile: bool = False
    budget: int = RATE_BYTES
    period_end: float = 0.0
    throttled: bool = False


class XenConsoled:
    def __init__(self, kernel: Kernel, rundir: Path, echo_fd: int | None):
        self.k = kernel
        self.xen = kernel.xen
        self.rundir = rundir
        self.echo_fd = echo_fd
        self.consoles: dict[int, GuestConsole] = {}
        self.drained: set[int] = set()  # domains whose last output we took (ids are never reused)
        self.lock = threading.RLock()  # consoles, clients, pending input, the in rings
        self.sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_w.setblocking(False)
        self._listen: list[GuestConsole] = []       # listeners for the thread to take on
        self._closing: list[socket.socket] = []     # sockets for the thread to close
        self.sel.register(self._wake_r, READ, None)
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
            inp, out = console_rings(mapping.pages[0])
            data = b""
            try:
                while chunk := out.read():
                    data += chunk
            except RemoteProtocolError:
                pass  # it lied about its ring as it went: keep what was sound
            if data:
                log = ConsoleLog(self.rundir / "console" / f"{info['name']}.log")
                log.write(data)
                log.close()
                if self.echo_fd is not None:
                    prefix = info["name"].encode() + b" | "
                    lines = data.rstrip(b"\n").split(b"\n")
                    os.write(self.echo_fd, b"".join(prefix + ln + b"\n" for ln in lines))
            inp.release()
            out.release()
        finally:
            self.xen.unmap_grant_ref(mapping)
            self.xen.forget_domain(info["domid"])

    def attach(self, info: dict) -> None:
        domid = info["domid"]
        mapping = self.xen.map_grant_ref(domid, [info["console_gref"]])
        inp, out = console_rings(mapping.pages[0])
        port = self.xen.bind_interdomain(domid, info["console_port"])
        log = ConsoleLog(self.rundir / "console" / f"{info['name']}.log")
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
        listener.setblocking(False)
        con = GuestConsole(domid, info["name"], mapping, inp, out, port, log, sock_path, listener)
        with self.lock:
            self.consoles[domid] = con
            self._listen.append(con)
        self._wake()
        self.k.loop.bind(port, guarded(self.xen, f"xenconsoled: dom{domid}",
                                       functools.partial(self._drain_port, con),
                                       functools.partial(self._hostile, con, "its console failed")))
        self.drain(con)

    def detach(self, domid: int) -> None:
        con = self.consoles[domid]
        self.drained.add(domid)
        self.drain(con, budget=False)  # whatever it wrote before it went
        if con.partial:
            self._emit(con, con.partial + b"\n")
            con.partial = b""
        self.k.loop.unbind(con.port)
        with self.lock:
            del self.consoles[domid]
            for c in con.clients:
                c.dead = True
            self._closing += [c.sock for c in con.clients] + [con.listener]
            con.clients.clear()
        self._wake()
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
        con.sock_path.unlink(missing_ok=True)
        con.log.close()

    # -- output ---------------------------------------------------------------

    def _drain_port(self, con: GuestConsole, _port: int) -> None:
        self.drain(con)

    def drain(self, con: GuestConsole, budget: bool = True) -> None:
        """Take what the guest wrote (within its budget) and give it room."""
        if con.hostile:
            return
        now = time.monotonic()
        if now >= con.period_end:
            con.period_end, con.budget = now + RATE_PERIOD, RATE_BYTES
        got = False
        try:
            with self.lock:
                self._push_input(con)  # it kicked us: maybe it made room for input
            while not budget or con.budget > 0:
                data = con.out.read(con.budget if budget else None)
                if not data:
                    break
                got = True
                con.budget -= len(data)
                self._emit(con, data)
        except RemoteProtocolError as exc:
            self._hostile(con, str(exc))
            return
        if budget and con.budget <= 0 and not con.throttled:
            con.throttled = True  # the client thread raises our port when the period ends
            self._wake()
        if got:
            self.xen.notify(con.port)  # room again for a writer that waits

    def _hostile(self, con: GuestConsole, why: str) -> None:
        if con.hostile:
            return
        con.hostile = True
        msg = f"dom{con.domid} ({con.name}) broke the console ring protocol ({why}); its console is ignored"
        try:
            with self.lock:
                con.log.write(f"\n[xenconsoled: {msg}]\n".encode())
        except (OSError, ValueError):
            pass
        report(self.xen, "xenconsoled", msg)

    def _emit(self, con: GuestConsole, data: bytes) -> None:
        with self.lock:
            con.log.write(data)
            for c in list(con.clients):
                self._queue(con, c, data)
        if self.echo_fd is None:
            return
        text = con.partial + data
        lines = text.split(b"\n")
        con.partial = lines.pop()
        if lines:
            prefix = con.name.encode() + b" | "
            os.write(self.echo_fd, b"".join(prefix + ln + b"\n" for ln in lines))

    def _queue(self, con: GuestConsole, c: Client, data: bytes) -> None:
        """Send to one client what its socket takes now; buffer the rest (lock held)."""
        if not c.out:
            try:
                data = data[c.sock.send(data):]
            except BlockingIOError:
                pass
            except OSError:
                self._drop(con, c)
                return
        if data:
            c.out += data
            if len(c.out) > CLIENT_OUT_MAX:
                self._drop(con, c, f"an attached client of dom{con.domid} does not read its output "
                                   f"({len(c.out)} bytes queued): disconnected")
            elif not c.events & WRITE:
                self._wake()

    def _drop(self, con: GuestConsole, c: Client, why: str = "") -> None:
        """Cut one client off (lock held); the client thread closes it."""
        if c.dead:
            return
        c.dead = True
        if c in con.clients:
            con.clients.remove(c)
        self._closing.append(c.sock)
        self._wake()
        if why:
            report(self.xen, "xenconsoled", why)

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except BlockingIOError:
            pass  # a wake-up is pending already

    # -- attached clients (xmp console) ------------------------------------------

    def _serve_clients(self) -> None:
        while True:
            for key, mask in self.sel.select(self._timeout()):
                if key.data is None:
                    self._wake_r.recv(4096)
                    continue
                kind, con, c = key.data
                what = f"xenconsoled: a console client of dom{con.domid}"
                if kind == "listen":
                    guarded(self.xen, what, self._accept)(con)
                    continue
                cut = functools.partial(self._locked_drop, con, c)
                if mask & WRITE:
                    guarded(self.xen, what, self._writable, cut)(con, c)
                if mask & READ and not c.dead:
                    guarded(self.xen, what, self._readable, cut)(con, c)
            guarded(self.xen, "xenconsoled: client thread", self._housekeeping)()

    def _timeout(self) -> float | None:
        ends = [con.period_end for con in list(self.consoles.values()) if con.throttled]
        return max(0.0, min(ends) - time.monotonic()) if ends else None

    def _housekeeping(self) -> None:
        """Registrations follow what each socket waits for; throttled rings
        whose period is over are drained again (their port raised)."""
        with self.lock:
            for sock in self._closing:
                try:
                    self.sel.unregister(sock)
                except (KeyError, ValueError):
                    pass
                sock.close()
            self._closing.clear()
            for con in self._listen:
                if con.domid in self.consoles:
                    self.sel.register(con.listener, READ, ("listen", con, None))
            self._listen.clear()
            now = time.monotonic()
            for con in list(self.consoles.values()):
                if con.throttled and now >= con.period_end:
                    con.throttled = False
                    self.xen.evt.send(con.port)
                want_read = READ if len(con.pending_in) < INPUT_MAX else 0
                for c in con.clients:
                    self._interest(con, c, want_read | (WRITE if c.out else 0))

    def _interest(self, con: GuestConsole, c: Client, events: int) -> None:
        if events == c.events:
            return
        if not events:
            self.sel.unregister(c.sock)
        elif not c.events:
            self.sel.register(c.sock, events, ("client", con, c))
        else:
            self.sel.modify(c.sock, events, ("client", con, c))
        c.events = events

    def _accept(self, con: GuestConsole) -> None:
        try:
            sock, _ = con.listener.accept()
        except OSError:
            return
        if from_a_domain(sock, os.getppid()):  # our parent is the zygote
            sock.close()
            return
        sock.setblocking(False)
        with self.lock:
            if con.domid not in self.consoles:
                sock.close()
                return
            c = Client(sock)
            con.clients.append(c)
            self._interest(con, c, READ)

    def _locked_drop(self, con: GuestConsole, c: Client) -> None:
        with self.lock:
            self._drop(con, c)

    def _writable(self, con: GuestConsole, c: Client) -> None:
        with self.lock:
            if c.dead:
                return
            try:
                del c.out[:c.sock.send(c.out)]
            except BlockingIOError:
                pass
            except OSError:
                self._drop(con, c)

    def _readable(self, con: GuestConsole, c: Client) -> None:
        try:
            data = c.sock.recv(4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        with self.lock:
            if not data:
                self._drop(con, c)
                return
            con.pending_in += data
            self._push_input(con)

    def _push_input(self, con: GuestConsole) -> None:
        """Put waiting input into the guest's ``in`` ring (lock held); the
        rest waits for the guest to read and kick us."""
        if con.hostile or not con.pending_in or con.domid not in self.consoles:
            return
        try:
            n = con.inp.write(con.pending_in)
        except RemoteProtocolError as exc:
            self._hostile(con, str(exc))
            return
        if n:
            del con.pending_in[:n]
            self.xen.notify(con.port)
            if len(con.pending_in) + n >= INPUT_MAX:
                self._wake()  # its clients may be read again
