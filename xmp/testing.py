"""Test doubles and harnesses that device authors need too.

* :func:`ring_pair` -- a front and a back ring over one bytearray, no
  processes: the sans-I/O ring as a pure data structure.
* :class:`NotifyLog` -- a stand-in event channel that records notifies.
* :class:`SharedLink` / :func:`spawn_peer` -- the real thing in miniature:
  one shared-memory object holding a ring, an event object for each end, a
  grant table and some granter RAM, handed to a second OS process by
  descriptor over a Unix socket.  The benchmarks and the multi-process tests
  run on it until the hypervisor owns these objects.
"""

from __future__ import annotations

import multiprocessing
import socket
import struct
from dataclasses import dataclass, field
from typing import Any

from xmp.sharedmem.evtchn import EVTCHN_OBJECT_SIZE, EVTCHN_WAKE_SIZE, EventChannels
from xmp.sharedmem.grant import ActiveGrants, GrantTable
from xmp.sharedmem.ring import BackRing, FrontRing, ring_bytes
from xmp.sharedmem.shm import PAGE_SIZE, ShmNamespace, ShmObject, recv_handles, send_handles

_EV_PAGES = (EVTCHN_OBJECT_SIZE + EVTCHN_WAKE_SIZE) // PAGE_SIZE  # event object + its wake page


def ring_pair(req_size: int, rsp_size: int, ring_page_order: int = 0):
    """(front, back, buf): both ends of one ring over a private bytearray."""
    buf = bytearray(ring_bytes(ring_page_order))
    front = FrontRing(buf, req_size, rsp_size)
    back = BackRing(buf, req_size, rsp_size)
    return front, back, buf


@dataclass
class NotifyLog:
    """Stand-in for an event channel: counts the notifies it is given."""

    sent: int = 0
    ports: list[int] = field(default_factory=list)

    def notify(self, port: int = 0) -> None:
        self.sent += 1
        self.ports.append(port)


FRONT_DOMID, BACK_DOMID = 1, 0
LINK_PORT = 1  # the one event-channel port each end uses


@dataclass(frozen=True)
class LinkLayout:
    """Page layout of a :class:`SharedLink` object."""

    ring_page_order: int = 0
    data_pages: int = 0
    gnttab_pages: int = 1

    @property
    def ring_pages(self) -> int:
        return 1 << self.ring_page_order

    @property
    def front_ev(self) -> int:
        return self.ring_pages

    @property
    def back_ev(self) -> int:
        return self.front_ev + _EV_PAGES

    @property
    def gnttab(self) -> int:
        return self.back_ev + _EV_PAGES

    @property
    def ram(self) -> int:
        return self.gnttab + self.gnttab_pages

    @property
    def total_pages(self) -> int:
        return self.ram + self.data_pages

    def pack(self) -> bytes:
        return struct.pack("<III", self.ring_page_order, self.data_pages, self.gnttab_pages)

    @classmethod
    def unpack(cls, data: bytes) -> LinkLayout:
        return cls(*struct.unpack("<III", data[:12]))


def _split_ev(m) -> tuple[memoryview, memoryview]:
    view = memoryview(m)
    return view[:EVTCHN_OBJECT_SIZE], view[EVTCHN_OBJECT_SIZE:]


class SharedLink:
    """One end's view of the link object.

    The frontend (domid 1) owns the grant table and the RAM pages; the
    backend (domid 0, "dom0") checks grants with :attr:`active` the way the
    hypervisor will.  Each end waits on its own event object and kicks the
    other's: ``front_ev`` is where the front is woken, ``back_ev`` the back.
    """

    def __init__(self, obj: ShmObject, layout: LinkLayout, *, create: bool):
        self.obj = obj
        self.layout = layout
        lay = layout
        self._maps = {
            "ring": obj.map(0, lay.ring_pages),
            "front_ev": obj.map(lay.front_ev, _EV_PAGES),
            "back_ev": obj.map(lay.back_ev, _EV_PAGES),
            "gnttab": obj.map(lay.gnttab, lay.gnttab_pages),
        }
        self.ram = obj.map(lay.ram, lay.data_pages) if lay.data_pages else None
        vcpus = 1 if create else 0
        # Both ends hold both objects writable: a test harness, not isolation
        self.front_ev = EventChannels(*_split_ev(self._maps["front_ev"]), init_vcpus=vcpus)
        self.back_ev = EventChannels(*_split_ev(self._maps["back_ev"]), init_vcpus=vcpus)
        self.created = create
        self._held: list = [self.front_ev, self.back_ev]

    @classmethod
    def create(cls, ns: ShmNamespace, layout: LinkLayout) -> SharedLink:
        obj = ShmObject.create(ns, "link", layout.total_pages * PAGE_SIZE)
        return cls(obj, layout, create=True)

    @property
    def ring_buf(self):
        return self._maps["ring"]

    def front_ring(self, req_size: int, rsp_size: int, init: bool = True) -> FrontRing:
        return self._hold(FrontRing(self.ring_buf, req_size, rsp_size, init=init))

    def back_ring(self, req_size: int, rsp_size: int, resume: bool = False) -> BackRing:
        return self._hold(BackRing(self.ring_buf, req_size, rsp_size, resume=resume))

    def grant_table(self) -> GrantTable:
        return self._hold(GrantTable(self._maps["gnttab"], FRONT_DOMID))

    def active_grants(self) -> ActiveGrants:
        return self._hold(ActiveGrants(self._maps["gnttab"], FRONT_DOMID, self.ram))

    def _hold(self, thing):
        self._held.append(thing)
        return thing

    def close(self) -> None:
        """Release every view, destroy the semaphores if we made them, unmap."""
        if self.created:
            self.front_ev.destroy()
            self.back_ev.destroy()
        for thing in self._held:
            thing.release()
        self._held.clear()
        self.obj.close()


def _peer_main(sock: socket.socket, target, args) -> None:
    payload, fds = recv_handles(sock, 1)
    link = SharedLink(ShmObject.from_fd(fds[0]), LinkLayout.unpack(payload), create=False)
    try:
        target(link, *args)
    finally:
        link.close()
        sock.close()


def spawn_peer(link: SharedLink, target, *args, start_method: str = "spawn"):
    """Start ``target(link, *args)`` in a new OS process that receives the
    link's descriptor over a Unix socket (SCM_RIGHTS).  Returns the started
    ``multiprocessing.Process``; the caller joins it."""
    ctx: Any = multiprocessing.get_context(start_method)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    proc = ctx.Process(target=_peer_main, args=(theirs, target, args), daemon=True)
    proc.start()
    theirs.close()
    try:
        send_handles(ours, link.layout.pack(), [link.obj.fd])
    finally:
        ours.close()
    return proc


def reap(proc, timeout: float = 10.0) -> None:
    """Join a peer process, killing it if it does not end by itself: no
    child may outlive the test that started it."""
    proc.join(timeout)
    if proc.exitcode is None:
        proc.kill()
        proc.join(10)
    assert proc.exitcode is not None, f"process {proc.pid} could not be reaped"


class StoreTransport:
    """An XsClient transport straight into an in-memory :class:`XenStore`:
    the store, the client and the xenbus runner with no process at all."""

    def __init__(self, store, conn):
        from xmp.xenstore.wire import PacketParser

        self.store = store
        self.conn = conn
        self.parser = PacketParser()

    def send(self, data: bytes, timeout: float | None = None) -> None:  # answered at once: never times out
        for pkt in self.parser.feed(data):
            self.store.handle(self.conn, pkt)

    def recv(self, timeout, ready=lambda: False) -> bytes:
        return self.conn.take(1 << 30)


def store_client(store, domid: int, privileged: bool = False):
    """An XsClient connected to ``store`` as ``domid`` (a socket client of
    dom0 when ``privileged``)."""
    from xmp.xenstore.client import XsClient

    return XsClient(StoreTransport(store, store.connect(domid, privileged=privileged)))


def settle(*clients, rounds: int = 100) -> None:
    """Deliver queued watch events to their callbacks until nothing moves."""
    for _ in range(rounds):
        moved = False
        for xs in clients:
            xs.pump_nowait()
            if xs.events:
                moved = True
                xs.dispatch()
        if not moved:
            return
    raise AssertionError("watch events keep coming: the ends never settle")
