"""Where netback's frames go: a software learning switch inside the
backend domain, or a real Linux TAP ``vif<domid>.<devid>`` on a real
bridge (what Xen's ``vif-bridge`` hotplug script sets up).

Each backend domain has one :class:`NetService` (per kernel): it owns the
switches by bridge name, the TAP ports, one IPI port on which helper
threads wake the domain's event loop, and a ticker that lets vifs publish
their counters a few times a second.  The event loop is single-threaded,
like a one-vCPU kernel; the only threads are the TAP poller (reading frames
the host's kernel hands us, into bounded per-port queues) and the ticker,
and both talk to the loop only by raising the IPI port.

Which one a vif gets is chosen by its ``script`` key:

* ``vif-bridge`` (xl's default): a TAP on the bridge when this process may
  make network devices (CAP_NET_ADMIN: xmp runs as root), else the
  learning switch of that name -- guests of this backend domain reach each
  other, the host does not reach them;
* ``vif-switch``: always the learning switch (tests that need
  guest-to-guest frames larger than any bridge's MTU use it).

A port's queue towards a guest is bounded by the vif (see backend.py): a
guest that never posts rx buffers loses frames, counted, and costs nothing.
"""

from __future__ import annotations

import errno
import os
import selectors
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable

from xmp.drivers.net import tap

TICK = 0.25                 # seconds between counter publications
TAP_QUEUE_MAX = 512         # frames read from a TAP and not yet taken by the loop
MAX_FRAME = 65535 + 14


class SwitchPort:
    """What a switch delivers to: a vif's rx side."""

    def deliver(self, frame: bytes, gso=None) -> None:
        """Queue ``frame`` (with the GSO extra its sender gave, if any)."""
        raise NotImplementedError


class LearningSwitch:
    """An Ethernet learning switch: each source MAC is learnt on the port it
    came from; unicast to a known MAC goes to its port, everything else
    floods to every other port."""

    MAX_FDB = 4096              # a guest inventing source MACs cannot grow it without bound

    def __init__(self, name: str):
        self.name = name
        self.ports: list[SwitchPort] = []
        self.fdb: dict[bytes, SwitchPort] = {}
        self.flooded = 0

    def join(self, port: SwitchPort) -> None:
        if port not in self.ports:
            self.ports.append(port)

    def leave(self, port: SwitchPort) -> None:
        if port in self.ports:
            self.ports.remove(port)
        for mac in [m for m, p in self.fdb.items() if p is port]:
            del self.fdb[mac]

    def forward(self, src: SwitchPort, frame: bytes, gso=None) -> None:
        dst, smac = frame[:6], frame[6:12]
        if not smac[0] & 1 and self.fdb.get(smac) is not src:
            if len(self.fdb) >= self.MAX_FDB:
                self.fdb.clear()
            self.fdb[smac] = src
        if not dst[0] & 1:
            port = self.fdb.get(dst)
            if port is not None:
                if port is not src:
                    port.deliver(frame, gso)
                return
        self.flooded += 1
        for port in self.ports:
            if port is not src:
                port.deliver(frame, gso)


class TapPort:
    """A vif's TAP device on a Linux bridge; frames from the host are read
    by the service's poller thread into :attr:`inbox`."""

    def __init__(self, service: NetService, name: str, bridge: str, mtu: int, vif: SwitchPort):
        self.service = service
        self.name = name
        self.bridge = bridge
        self.vif = vif
        self.inbox: deque[bytes] = deque()
        self.dropped = 0         # frames the host sent while the loop was behind
        self.write_errors = 0
        self.fd = tap.open_tap(name)
        try:
            if service.k.domid != 0:
                # a driver domain's bridges are its own, in its own namespace (they go with it);
                # the toolstack joins each to the host's by a veth pair
                tap.ensure_bridge(bridge)
            tap.attach(name, bridge, mtu)
        except BaseException:
            os.close(self.fd)
            raise

    def send(self, frame: bytes) -> bool:
        """A guest's frame to the host (non-blocking: a full queue drops it)."""
        try:
            os.write(self.fd, frame)
            return True
        except OSError:
            self.write_errors += 1
            return False

    def drain(self) -> None:
        while self.inbox:
            self.vif.deliver(self.inbox.popleft())

    def close(self) -> None:
        os.close(self.fd)  # the TAP goes with it


class NetService:
    """Per backend domain: switches, TAPs, the wake-up port and the ticker."""

    def __init__(self, kernel):
        self.k = kernel
        self.port = kernel.xen.bind_ipi()
        kernel.loop.bind(self.port, self._event)
        self.switches: dict[str, LearningSwitch] = {}
        self.taps: dict[int, TapPort] = {}
        self.tickers: list[Callable[[], None]] = []
        self.dirty: set = set()      # vifs with frames queued for their guest
        self._sel = selectors.DefaultSelector()
        self._lock = threading.Lock()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._sel.register(self._wake_r, selectors.EVENT_READ)
        self._poller: threading.Thread | None = None
        self._ticker: threading.Thread | None = None
        self._may_tap: bool | None = None

    # -- switches ------------------------------------------------------------

    def switch(self, name: str) -> LearningSwitch:
        sw = self.switches.get(name)
        if sw is None:
            sw = self.switches[name] = LearningSwitch(name)
        return sw

    def drop_switch(self, sw: LearningSwitch) -> None:
        if not sw.ports and self.switches.get(sw.name) is sw:
            del self.switches[sw.name]

    # -- TAPs ------------------------------------------------------------------

    def may_tap(self) -> bool:
        if self._may_tap is None:
            self._may_tap = tap.privileged()
        return self._may_tap

    def open_tap(self, name: str, bridge: str, mtu: int, vif: SwitchPort) -> TapPort:
        port = TapPort(self, name, bridge, mtu, vif)
        with self._lock:
            self.taps[port.fd] = port
            self._sel.register(port.fd, selectors.EVENT_READ, port)
        self._kick_poller()
        if self._poller is None:
            self._poller = threading.Thread(target=self._poll, name="netback-tap", daemon=True)
            self._poller.start()
        return port

    def close_tap(self, port: TapPort) -> None:
        with self._lock:
            if self.taps.pop(port.fd, None) is not None:
                self._sel.unregister(port.fd)
                port.close()
        self._kick_poller()

    def _kick_poller(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except BlockingIOError:
            pass

    def _poll(self) -> None:
        """The poller thread: frames from every TAP into their inboxes."""
        while True:
            ready = self._sel.select()
            woke = False
            with self._lock:
                for key, _ in ready:
                    if key.fd == self._wake_r:
                        try:
                            os.read(self._wake_r, 4096)
                        except BlockingIOError:
                            pass
                        continue
                    port: TapPort = key.data
                    if port.fd not in self.taps:
                        continue
                    for _ in range(64):
                        try:
                            frame = os.read(port.fd, MAX_FRAME)
                        except BlockingIOError:
                            break
                        except OSError as exc:
                            if exc.errno == errno.EBADF:
                                break
                            raise
                        if len(port.inbox) >= TAP_QUEUE_MAX:
                            port.dropped += 1
                        else:
                            port.inbox.append(frame)
                            woke = True
            if woke:
                self._raise()

    def _raise(self) -> None:
        try:
            self.k.xen.evt.send(self.port)
        except Exception:  # the domain is going away
            pass

    # -- the loop's side -----------------------------------------------------------

    def add_ticker(self, fn: Callable[[], None]) -> None:
        self.tickers.append(fn)
        if self._ticker is None:
            self._ticker = threading.Thread(target=self._tick, name="netback-tick", daemon=True)
            self._ticker.start()

    def remove_ticker(self, fn: Callable[[], None]) -> None:
        if fn in self.tickers:
            self.tickers.remove(fn)

    def _tick(self) -> None:
        while True:
            time.sleep(TICK)
            if self.tickers:
                self._raise()

    def flush(self) -> None:
        """Deliver what the last event queued for guests (their rx rings)."""
        while self.dirty:
            self.dirty.pop().rx_flush()

    def _event(self, _port: int) -> None:
        for port in list(self.taps.values()):
            port.drain()
        self.flush()
        for fn in list(self.tickers):
            fn()


_services: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def service(kernel) -> NetService:
    svc = _services.get(kernel)
    if svc is None:
        svc = _services[kernel] = NetService(kernel)
    return svc
