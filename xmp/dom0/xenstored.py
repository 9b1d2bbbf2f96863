"""xenstored, as one of dom0's services: the pure store (``xmp.xenstore``)
behind its two real ways in.

* ``<rundir>/xenstored.sock``: the wire protocol on a Unix stream socket,
  for dom0's tools and the toolstack; standard clients work against it with
  ``XENSTORED_PATH`` pointing there.  Domain processes are refused (they
  run as our uid, so the file mode alone cannot keep them out).
* For every other domain, its xenstore page (``xenstore_domain_interface``,
  grant ref 1 pre-filled by the domain builder) and its store event channel,
  attached when the toolstack sends INTRODUCE and dropped on RELEASE (or
  when VIRQ_DOM_EXC shows the domain gone).

Theory of operation.  One lock guards the store and every transport write.
The socket side runs in its own thread (a selectors loop); ring events run
in dom0's event loop.  After each request the connections the store marked
dirty are flushed: sockets get what they take without blocking (the rest
waits in a bounded buffer for the socket to be writable), rings as much
as fits in ``rsp`` (the rest waits for the guest to consume and kick us).
A socket client's requests wait unhandled while much of its output is
unread, so only watch events it never reads can push it past the bound,
which costs it its connection -- nobody else waits for it.  A ring
connection stops being read while it has too many unread replies (the
outstanding-requests quota), so a guest that never reads cannot grow our
memory (XSA-326).  A peer that breaks the protocol (oversized packet,
impossible ring indices) loses its connection; everyone else is served.
"""

from __future__ import annotations

import collections
import functools
import os
import selectors
import socket
import struct
import threading
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from xmp.domain_proc.kernel import Kernel
from xmp.domain_proc.service import guarded, report
from xmp.domain_proc.xen import GrantMapping
from xmp.errors import DomainGone, HypercallError, RemoteProtocolError, XmpError
from xmp.hypercall import from_a_domain
from xmp.sharedmem.bytering import XS_ERROR, XS_SERVER_FEATURES, ByteRing, xenstore_rings
from xmp.sharedmem.grant import GNTTAB_RESERVED_XENSTORE
from xmp.xenstore.client import XsClient
from xmp.xenstore.server import Close, Connection, Introduce, Release, XenStore
from xmp.xenstore.wire import Packet, PacketParser

# xs_wire.h: xenstore_domain_interface's server_features and error fields
XENSTORE_SERVER_FEATURE_ERROR = 2
XENSTORE_ERROR_COMM, XENSTORE_ERROR_RINGIDX, XENSTORE_ERROR_PROTO = 1, 2, 3


class LocalTransport:
    """An XsClient transport into the daemon's own store (same process)."""

    def __init__(self, daemon: XenStored, conn: Connection):
        self.d = daemon
        self.conn = conn
        self.parser = PacketParser()

    def send(self, data: bytes, timeout: float | None = None) -> None:  # handled at once
        with self.d.lock:
            for pkt in self.parser.feed(data):
                self.d._apply(self.d.store.handle(self.conn, pkt))
            self.d._flush()

    def recv(self, timeout: float | None, ready=lambda: False) -> bytes:
        with self.d.lock:
            data = self.conn.take(1 << 30)
        if data or ready() or timeout == 0:
            return data
        self.d.k.loop.run_until(lambda: bool(self.conn.out) or ready(), timeout)
        with self.d.lock:
            return self.conn.take(1 << 30)


@dataclass
class RingConn:
    domid: int
    conn: Connection
    mapping: GrantMapping
    req: ByteRing
    rsp: ByteRing
    port: int
    parser: PacketParser = field(default_factory=PacketParser)
    dead: bool = False


@dataclass(eq=False)
class SockConn:
    sock: socket.socket
    conn: Connection
    parser: PacketParser = field(default_factory=PacketParser)
    out: bytearray = field(default_factory=bytearray)  # replies and events the socket has not taken
    backlog: collections.deque[Packet] = field(default_factory=collections.deque)  # requests not yet handled
    events: int = 0  # what the selector watches for it now
    dead: bool = False


SOCK_OUT_MAX = 1 << 20     # queued output of a socket client; past it, it is disconnected
SOCK_READ_STOP = 256 << 10  # queued output past which its requests wait (back-pressure); only
                            # watch events it does not read can then push it past SOCK_OUT_MAX
READ, WRITE = selectors.EVENT_READ, selectors.EVENT_WRITE


class XenStored:
    def __init__(self, kernel: Kernel, rundir: Path, store: XenStore | None = None):
        self.k = kernel
        self.xen = kernel.xen
        self.store = store or XenStore()
        self.store.domain_exists = self._domain_exists
        self.lock = threading.RLock()
        self.rings: dict[int, RingConn] = {}
        self.locals: dict[int, XsClient] = {}  # by Connection.id
        self._ipi: int | None = None
        self.socks: dict[int, SockConn] = {}   # by Connection.id
        self._closing: list[SockConn] = []     # dropped: for the socket thread to close
        self.path = rundir / "xenstored.sock"
        self.path.unlink(missing_ok=True)
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            self.listener.bind(str(self.path))
        finally:
            os.umask(old)
        self.listener.listen(64)
        self.listener.setblocking(False)
        self.sel = selectors.DefaultSelector()
        self.sel.register(self.listener, READ, None)
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_w.setblocking(False)
        self.sel.register(self._wake_r, READ, "wake")
        self._regs_dirty = False
        self._thread = threading.Thread(target=self._serve_sockets, name="xenstored-sockets", daemon=True)
        self._thread.start()

    # -- the socket side -------------------------------------------------------

    def _serve_sockets(self) -> None:
        while True:
            for key, mask in self.sel.select():
                peer = key.data
                try:
                    if peer is None:
                        self._accept()
                    elif peer == "wake":
                        self._wake_r.recv(4096)
                    else:
                        if mask & WRITE:
                            self._sock_writable(peer)
                        if mask & READ and not peer.dead:
                            self._sock_readable(peer)
                except DomainGone:
                    raise
                except Exception:  # reported; only that client is cut off
                    report(self.xen, "xenstored: a socket client", "failed:\n" + traceback.format_exc())
                    if isinstance(peer, SockConn):
                        self._drop_sock(peer)
            if self._regs_dirty:
                guarded(self.xen, "xenstored: socket thread", self._housekeeping)()

    def _housekeeping(self) -> None:
        """Close dropped clients; registrations follow what each one waits for."""
        with self.lock:
            self._regs_dirty = False
            for sc in self._closing:
                if sc.events:
                    self.sel.unregister(sc.sock)
                sc.sock.close()
            self._closing.clear()
            for sc in self.socks.values():
                want = _wanted(sc)
                if want == sc.events:
                    continue
                if not want:
                    self.sel.unregister(sc.sock)
                elif not sc.events:
                    self.sel.register(sc.sock, want, sc)
                else:
                    self.sel.modify(sc.sock, want, sc)
                sc.events = want

    def _wake(self) -> None:
        """The socket thread must look at registrations and closings."""
        self._regs_dirty = True
        if threading.current_thread() is self._thread:
            return  # it will, once this event is handled
        try:
            self._wake_w.send(b"\0")
        except BlockingIOError:
            pass  # one is pending already

    def _accept(self) -> None:
        try:
            sock, _ = self.listener.accept()
        except OSError:
            return
        if from_a_domain(sock, os.getppid()):  # our parent is the zygote: a sibling domain
            sock.close()
            return
        sock.setblocking(False)
        with self.lock:
            sc = SockConn(sock, self.store.connect(self.k.domid, privileged=True))
            self.socks[sc.conn.id] = sc
        self._wake()  # registered by the housekeeping that follows

    def _sock_readable(self, sc: SockConn) -> None:
        try:
            data = sc.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._drop_sock(sc)
            return
        with self.lock:
            if sc.dead:
                return
            try:
                packets = sc.parser.feed(data)
            except RemoteProtocolError as exc:
                self._drop_sock(sc, f"a socket client broke the protocol ({exc}): disconnected")
                return
            sc.backlog.extend(packets)
            self._serve_backlog(sc)

    def _serve_backlog(self, sc: SockConn) -> None:
        """Handle a client's requests while its unread output is small
        (lock held): one that pipelines more than it reads waits, its
        requests unread (back-pressure), instead of being cut off."""
        while True:
            while sc.backlog and not sc.dead and len(sc.out) + sc.conn.out_bytes < SOCK_READ_STOP:
                self._apply(self.store.handle(sc.conn, sc.backlog.popleft()))
            self._flush()
            # The flush may have sent it all: then go on, for a client with a
            # backlog and nothing unsent waits for neither READ nor WRITE and
            # would never be served again (seen: a pipelining client stalled).
            if not sc.backlog or sc.dead or len(sc.out) >= SOCK_READ_STOP:
                break

    def _sock_writable(self, sc: SockConn) -> None:
        with self.lock:
            self._send_sock(sc)
            self._serve_backlog(sc)

    def _send_sock(self, sc: SockConn) -> None:
        """Write what the socket takes now (lock held); the rest waits for
        it to be writable.  Never blocks: one client that does not read
        must not stall the others."""
        if sc.dead:
            return
        sc.out += sc.conn.take(1 << 30)
        if sc.out:
            try:
                del sc.out[:sc.sock.send(sc.out)]
            except BlockingIOError:
                pass
            except OSError:
                self._drop_sock(sc)
                return
        if len(sc.out) > SOCK_OUT_MAX:
            self._drop_sock(sc, f"a socket client does not read its replies ({len(sc.out)} bytes queued): "
                                "disconnected")
        elif _wanted(sc) != sc.events:
            self._wake()  # its registration must change

    def _drop_sock(self, sc: SockConn, why: str = "") -> None:
        with self.lock:
            if self.socks.pop(sc.conn.id, None) is None:
                return
            sc.dead = True
            self._closing.append(sc)
            self.store.disconnect(sc.conn)
            self._flush()
        self._wake()
        if why:
            report(self.xen, "xenstored", why)

    # -- the ring side -----------------------------------------------------------

    def introduce(self, domid: int, mfn: int, port: int) -> None:
        """Attach a domain's xenstore page and store port (INTRODUCE)."""
        if domid in self.rings:
            return
        mapping = self.xen.map_grant_ref(domid, [GNTTAB_RESERVED_XENSTORE])
        req, rsp = xenstore_rings(mapping.pages[0])
        # We report a broken ring in ``error`` (docs/misc/xenstore-ring.txt).
        page = mapping.pages[0]
        features = struct.unpack_from("<I", page, XS_SERVER_FEATURES)[0]
        struct.pack_into("<I", page, XS_SERVER_FEATURES, features | XENSTORE_SERVER_FEATURE_ERROR)
        local = self.xen.bind_interdomain(domid, port)
        rc = RingConn(domid, self.store.connect(domid), mapping, req, rsp, local)
        self.rings[domid] = rc
        self.k.loop.bind(local, guarded(self.xen, f"xenstored: serving dom{domid}",
                                        functools.partial(self._ring_event, rc),
                                        functools.partial(self._kill_ring, rc, "serving it failed")))
        # The guest may have queued requests already (it runs at once), and
        # its notifications then reached nobody.  The bind left our port
        # pending for that (as Xen's), but INTRODUCE comes through the socket
        # thread: the main loop may have taken that event before the handler
        # above existed.  Raise it again now that it does.
        self.xen.evt.send(local)

    def _ring_event(self, rc: RingConn, _port: int) -> None:
        with self.lock:
            if rc.dead:
                return
            self._flush_ring(rc)  # the guest may have made room for replies still queued
            try:
                while rc.conn.wants_requests():
                    try:
                        data, writer_waits = rc.req.read_and_check_room()
                    except RemoteProtocolError as exc:
                        self._kill_ring(rc, str(exc), XENSTORE_ERROR_RINGIDX)
                        break
                    if not data:
                        break
                    if writer_waits:  # the guest may be waiting for room in req
                        self.xen.notify(rc.port)
                    for pkt in rc.parser.feed(data):
                        self._apply(self.store.handle(rc.conn, pkt))
            except RemoteProtocolError as exc:
                self._kill_ring(rc, str(exc), XENSTORE_ERROR_PROTO)
            self._flush()
            if not rc.dead and rc.conn.out:
                self._flush_ring(rc)

    def _kill_ring(self, rc: RingConn, why: str = "", error: int = XENSTORE_ERROR_COMM) -> None:
        """A domain that broke the ring protocol: stop serving it (as C
        xenstored ignores a bad connection) and say why in the page's
        ``error`` field (XENSTORE_ERROR_*); everyone else goes on."""
        with self.lock:
            if rc.dead:
                return
            rc.dead = True
            self.store.disconnect(rc.conn)
            struct.pack_into("<I", rc.mapping.pages[0], XS_ERROR, error)
        report(self.xen, "xenstored",
               f"dom{rc.domid} broke the ring protocol ({why or 'closed'}); its connection is closed")

    def _domain_exists(self, domid: int) -> bool:
        """Before INTRODUCE: does the hypervisor know ``domid``?"""
        try:
            self.xen.domctl("getdomaininfo", domid=domid)
        except HypercallError:
            return False
        return True

    def release(self, domid: int) -> None:
        rc = self.rings.pop(domid, None)
        if rc is None:
            return
        rc.dead = True
        self.k.loop.unbind(rc.port)
        rc.req.release()  # the rings let go of the page before it is unmapped
        rc.rsp.release()
        for action in (lambda: self.xen.close(rc.port), lambda: self.xen.unmap_grant_ref(rc.mapping)):
            try:
                action()
            except XmpError:
                pass
        self.xen.forget_domain(domid)

    # -- dom0's own services (in-process) ---------------------------------------------

    def local_client(self) -> XsClient:
        """A privileged client for dom0's own services (the backends), with
        no socket: requests go straight into the store.  Watch events that
        other threads queue for it wake dom0's event loop through an IPI."""
        if self._ipi is None:
            self._ipi = self.xen.bind_ipi(0)
            self.k.loop.bind(self._ipi, guarded(self.xen, "xenstored: dom0's own clients", self._local_event))
        with self.lock:
            conn = self.store.connect(self.k.domid, privileged=True)
        client = XsClient(LocalTransport(self, conn))
        client.events_pending = functools.partial(self.xen.evt.send, self._ipi)
        self.locals[conn.id] = client
        return client

    def _local_event(self, _port: int) -> None:
        for client in list(self.locals.values()):
            client.pump_nowait()
            client.dispatch()

    # -- both ----------------------------------------------------------------------

    def _apply(self, actions) -> None:
        for action in actions:
            if isinstance(action, Introduce):
                try:
                    self.introduce(action.domid, action.mfn, action.port)
                except XmpError as exc:
                    print(f"xenstored: introducing dom{action.domid}: {exc}", flush=True)
            elif isinstance(action, Release):
                self.release(action.domid)
            elif isinstance(action, Close):
                sc = self.socks.get(action.conn.id)
                if sc is not None:
                    self._drop_sock(sc)
                for rc in self.rings.values():
                    if rc.conn is action.conn:
                        self._kill_ring(rc)

    def _flush(self) -> None:
        for conn in self.store.dirty():
            if conn.id in self.locals:  # its transport takes the output; wake its loop
                if self._ipi is not None:
                    self.xen.evt.send(self._ipi)
                continue
            sc = self.socks.get(conn.id)
            if sc is not None:
                self._send_sock(sc)
                continue
            rc = self._ring_of(conn)
            if rc is None or rc.dead:
                continue
            self._flush_ring(rc)

    def _flush_ring(self, rc: RingConn) -> None:
        try:
            room = rc.rsp.space()
            if room:
                data = rc.conn.take(room)
                if data:
                    rc.rsp.write(data)
                    self.xen.notify(rc.port)
        except RemoteProtocolError as exc:
            self._kill_ring(rc, str(exc), XENSTORE_ERROR_RINGIDX)

    def _ring_of(self, conn: Connection) -> RingConn | None:
        rc = self.rings.get(conn.domid)
        return rc if rc is not None and rc.conn is conn else None

    def domains_changed(self, infos: dict[int, dict]) -> None:
        """VIRQ_DOM_EXC: forget domains that are gone even if nobody said RELEASE."""
        with self.lock:
            for domid in [d for d in self.rings if gone(infos, d)]:
                self.store.release_domain(domid)
                self.release(domid)
            self._flush()


def _wanted(sc: SockConn) -> int:
    """What a socket client waits for: its requests unless too much output
    is queued for it, and room for that output."""
    return (READ if not sc.backlog and len(sc.out) < SOCK_READ_STOP else 0) | (WRITE if sc.out else 0)


def gone(infos: dict[int, dict], domid: int) -> bool:
    """Is ``domid`` dying or gone by this getdomaininfo snapshot?  A domain
    absent from it but newer than all it lists was created after it was
    taken (ids only grow): that one is new, not gone."""
    if domid in infos:
        return infos[domid]["state"] == "dying"
    return domid <= max(infos, default=-1)
