"""netif frontend ("vif"): ``kernel.net("eth0")`` in a guest.

Memory, taken at the first setup and kept across reconnections: per
queue, the tx and rx ring pages, and one buffer page per ring slot each
way (256 + 256).
Per connection every buffer is granted once (tx read-only, rx writable), so
a packet costs no grant-table writes.  A tx packet takes as many free
pages as it spans, its id is its first page's index; an rx request posts a
page, its id the page's index, and its response is found by slot (an
extra-info slot overwrites the id), as Linux's netfront does.

What is negotiated (:func:`configure`, like Linux's xen-netfront module
parameters): ``sg`` (frames over one page, ``feature-sg``), ``gso``
(``feature-gso-tcpv4``/``-tcpv6``: the backend may hand us frames larger
than the MTU), ``split`` (``feature-split-event-channels``: one port per
ring), ``queues`` (1..4, ``multi-queue-num-queues``, capped by the
backend's ``multi-queue-max-queues``; a frame goes out on the queue its
flow hashes to).  ``request-rx-copy`` and ``feature-rx-notify`` are always set.

A frame is at least an Ethernet header (14 bytes) and at most 65535 (a tx
size is 16 bits).  ``send`` blocks (or, ``block=False``, returns False)
while the ring or the pages are full; ``recv`` blocks (or returns None).
Frames not taken by the guest are kept up to :data:`RXQ_MAX`; beyond that
they are dropped and counted.  A backend that breaks the protocol closes
the device (its error node says why).  Packets in flight when the backend
goes away are lost, as on a real network (counted in ``tx_dropped``).
"""

from __future__ import annotations

import struct
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from xmp.drivers.net import protocol
from xmp.drivers.net.packets import flow_hash
from xmp.drivers.net.protocol import (
    ETH_HLEN,
    NET_RX_RING_SIZE,
    NET_TX_RING_SIZE,
    PAGE_SIZE,
    RX_SLOT_SIZE,
    TX_SLOT_SIZE,
    XEN_NETIF_EXTRA_FLAG_MORE,
    XEN_NETIF_GSO_TYPE_TCPV4,
    XEN_NETIF_MAX_TX_SIZE,
    GsoExtra,
    NetifStatus,
    NETRXF_extra_info,
    NETRXF_more_data,
    NETTXF_extra_info,
    NETTXF_more_data,
    parse_rx_response,
)
from xmp.drivers.xenbus.device import Bus, FrontendDriver, XenbusDevice, attach_frontend
from xmp.drivers.xenbus.state import XenbusState
from xmp.errors import LocalError, RemoteProtocolError, XmpError
from xmp.sharedmem.ring import FrontRing

NTX = NET_TX_RING_SIZE
NRX = NET_RX_RING_SIZE
RXQ_MAX = 1024
_TXREQ = struct.Struct("<IHHHH")
_TXRSP = struct.Struct("<Hh")
_RXREQ = struct.Struct("<H2xI")
_RXRSP_IN = struct.Struct("<HHHh")

DEFAULTS: dict[str, bool | int] = {"sg": True, "gso": True, "split": False, "queues": 1}
_RING_KEYS = {protocol.EVENT_CHANNEL, protocol.EVENT_CHANNEL_TX, protocol.EVENT_CHANNEL_RX,
              protocol.TX_RING_REF, protocol.RX_RING_REF, protocol.MULTI_QUEUE_NUM_QUEUES}
_options: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def configure(kernel, **options: bool | int) -> None:
    """This guest's netfront parameters for the vifs it attaches from now on."""
    unknown = set(options) - set(DEFAULTS)
    if unknown:
        raise LocalError(f"netfront: unknown option(s) {sorted(unknown)}; known: {sorted(DEFAULTS)}")
    for key, value in options.items():
        if key == "queues":
            if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 4:
                raise LocalError(f"netfront: queues = {value!r} is not an integer in 1..4")
        elif not isinstance(value, bool):
            raise LocalError(f"netfront: {key} = {value!r} is not a boolean")
    _options[kernel] = {**DEFAULTS, **_options.get(kernel, {}), **options}


PAGES_PER_QUEUE = 2 + NTX + NRX   # its two rings, then its tx and rx buffers


@dataclass(eq=False)
class _Queue:
    """One queue's rings, buffers and in-flight state."""

    index: int
    area: int                                   # first pfn: tx ring, rx ring, tx bufs, rx bufs
    tx_ring: FrontRing | None = None
    rx_ring: FrontRing | None = None
    ring_grefs: list[int] = field(default_factory=list)
    tx_grefs: list[int] = field(default_factory=list)
    rx_grefs: list[int] = field(default_factory=list)
    tx_port: int | None = None
    rx_port: int | None = None
    tx_free: list[int] = field(default_factory=list)
    tx_pending: dict[int, int] = field(default_factory=dict)   # first id -> bytes of its packet
    tx_busy: set[int] = field(default_factory=set)             # ids (pages) not answered yet
    rx_slot: list[int] = field(default_factory=lambda: [0] * NRX)  # ring slot -> the id posted
    parts: list[bytes] = field(default_factory=list)           # the frame being received
    bad: bool = False
    more: bool = False
    extra: bool = False
    sent: int = 0                               # packets put on this queue's tx ring

    @property
    def tx_pfn(self) -> int:
        return self.area + 2

    @property
    def rx_pfn(self) -> int:
        return self.area + 2 + NTX

    def grefs(self) -> list[int]:
        return self.ring_grefs + self.tx_grefs + self.rx_grefs


class NetFront(FrontendDriver):
    devtype = "vif"

    def __init__(self, kernel) -> None:
        self.k = kernel
        self.opts = dict(_options.get(kernel, DEFAULTS))
        self.area: int | None = None
        self.all_queues: list[_Queue] = []       # as many as configured, memory kept
        self.queues: list[_Queue] = []           # those of this connection
        self.rxq: deque[bytes] = deque()
        self.sink: Callable[[bytes], None] | None = None   # takes frames instead of rxq
        self.on_connect: list[Callable[[], None]] = []
        self.on_tx_room: Callable[[], None] | None = None   # called when tx slots came free
        self.stats = protocol.IfStats()
        self.mac = b""
        self.mtu = protocol.DEFAULT_MTU
        self.sg = self.gso = self.split = False
        self.dev: XenbusDevice | None = None
        self.bus: Bus | None = None
        self.is_connected = False
        self.connections = 0

    # queue 0, by the names a single-queue vif has (tests drive its rings by hand)
    tx_ring = property(lambda self: self.queues[0].tx_ring if self.queues else None)
    tx_port = property(lambda self: self.queues[0].tx_port if self.queues else None)
    tx_grefs = property(lambda self: self.queues[0].tx_grefs)
    tx_free = property(lambda self: self.queues[0].tx_free)
    tx_busy = property(lambda self: self.queues[0].tx_busy)
    _tx_pfn = property(lambda self: self.queues[0].tx_pfn)

    # -- memory --------------------------------------------------------------------

    def release(self) -> None:
        if self.area is None:
            return
        gt = self.k.grant_table
        gt.retry_deferred()
        ours = {g for q in self.all_queues for g in q.grefs()}
        if ours & gt.deferred_refs():
            return  # a dead backend may still hold some mapped: the pages stay
        self.k.free_pages(self.area, PAGES_PER_QUEUE * len(self.all_queues))
        self.area = None

    # -- xenbus ----------------------------------------------------------------------

    def setup(self, dev: XenbusDevice) -> None:
        self.dev = dev
        if self.area is None:
            n = int(self.opts["queues"])
            self.area = self.k.alloc_pages(PAGES_PER_QUEUE * n, driver=True)
            self.all_queues = [_Queue(i, self.area + i * PAGES_PER_QUEUE) for i in range(n)]
        gt = self.k.grant_table
        gt.retry_deferred()
        mac = (dev.xs.read_or(f"{dev.nodename}/{protocol.MAC}") or b"").decode()
        try:
            self.mac = bytes.fromhex(mac.replace(":", ""))
        except ValueError:
            self.mac = b""
        if len(self.mac) != 6:
            raise ValueError(f"vif: mac {mac!r} in the frontend directory is not a MAC")
        mtu = dev.xs.read_or(f"{dev.nodename}/{protocol.MTU}")
        self.mtu = int(mtu) if mtu is not None and mtu.isdigit() else protocol.DEFAULT_MTU
        self.sg = self.opts["sg"] and dev.read_other(protocol.FEATURE_SG) == b"1"
        self.gso = self.opts["gso"]
        self.split = self.opts["split"] and dev.read_other(protocol.FEATURE_SPLIT_EVENT_CHANNELS) == b"1"
        offered = dev.read_other(protocol.MULTI_QUEUE_MAX_QUEUES)
        nq = max(1, min(len(self.all_queues), int(offered) if offered and offered.isdigit() else 1))
        # what an earlier negotiation wrote must not mislead this backend
        for key in dev.xs.directory(dev.nodename):
            if key in _RING_KEYS or key.startswith("queue-"):
                dev.xs.rm(f"{dev.nodename}/{key}")
        self.queues = self.all_queues[:nq]
        for q in self.queues:
            self._setup_queue(dev, q, f"{protocol.queue_dir(q.index)}/" if nq > 1 else "")
        if nq > 1:
            dev.write(protocol.MULTI_QUEUE_NUM_QUEUES, nq)
        dev.write(protocol.REQUEST_RX_COPY, 1)
        dev.write(protocol.FEATURE_RX_NOTIFY, 1)
        dev.write(protocol.FEATURE_SG, int(self.opts["sg"]))
        dev.write(protocol.FEATURE_GSO_TCPV4, int(self.gso))
        dev.write(protocol.FEATURE_GSO_TCPV6, int(self.gso))
        for q in self.queues:
            self._post(q, range(NRX))

    def _setup_queue(self, dev: XenbusDevice, q: _Queue, pre: str) -> None:
        gt = self.k.grant_table
        other = dev.otherend_id
        tx_page, rx_page = self.k.page(q.area), self.k.page(q.area + 1)
        tx_page[:] = bytes(PAGE_SIZE)
        rx_page[:] = bytes(PAGE_SIZE)
        q.tx_ring = FrontRing(tx_page, TX_SLOT_SIZE, protocol.TX_RESPONSE_SIZE)
        q.rx_ring = FrontRing(rx_page, RX_SLOT_SIZE, RX_SLOT_SIZE)
        q.ring_grefs = [gt.grant_foreign_access(other, q.area + i) for i in range(2)]
        q.tx_grefs = [gt.grant_foreign_access(other, q.tx_pfn + i, True) for i in range(NTX)]
        q.rx_grefs = [gt.grant_foreign_access(other, q.rx_pfn + i) for i in range(NRX)]
        q.tx_free = list(range(NTX - 1, -1, -1))
        q.tx_busy.clear()
        q.tx_pending.clear()
        q.parts, q.bad, q.more, q.extra = [], False, False, False
        q.tx_port = q.rx_port = self.k.xen.alloc_unbound(other)
        if self.split:
            q.rx_port = self.k.xen.alloc_unbound(other)
            self.k.loop.bind(q.tx_port, lambda _p: self._guarded(self._tx_done, q))
            self.k.loop.bind(q.rx_port, lambda _p: self._guarded(self._rx_event, q))
            dev.write(pre + protocol.EVENT_CHANNEL_TX, q.tx_port)
            dev.write(pre + protocol.EVENT_CHANNEL_RX, q.rx_port)
        else:
            self.k.loop.bind(q.tx_port, lambda _p: self._guarded(self._event, q))
            dev.write(pre + protocol.EVENT_CHANNEL, q.tx_port)
        dev.write(pre + protocol.TX_RING_REF, q.ring_grefs[0])
        dev.write(pre + protocol.RX_RING_REF, q.ring_grefs[1])

    def connected(self, dev: XenbusDevice) -> None:
        self.is_connected = True
        self.connections += 1
        for fn in list(self.on_connect):
            fn()

    def disconnect(self, dev: XenbusDevice) -> None:
        self.is_connected = False
        gt = self.k.grant_table
        for q in self.queues:
            for port in {q.tx_port, q.rx_port} - {None}:
                assert port is not None
                self.k.close_port(port)
            q.tx_port = q.rx_port = None
            for ring in (q.tx_ring, q.rx_ring):
                if ring is not None:
                    ring.release()
            q.tx_ring = q.rx_ring = None
            for gref in q.grefs():
                gt.end_foreign_access_later(gref)
            self.stats.tx_dropped += len(q.tx_pending)   # lost with the backend
            q.tx_pending.clear()
            q.tx_busy.clear()
            q.tx_free = []

    # -- events ------------------------------------------------------------------------

    def _guarded(self, fn, *args) -> None:
        try:
            fn(*args)
        except RemoteProtocolError as exc:  # a broken backend: close the device
            dev = self.dev
            if dev is None:
                return
            try:
                dev.write("error", str(exc)[:200])
            except XmpError:
                pass
            self.disconnect(dev)
            dev.switch(XenbusState.CLOSING)

    def _event(self, q: _Queue) -> None:
        self._tx_done(q)
        self._rx_event(q)

    def _tx_done(self, q: _Queue) -> None:
        freed = len(q.tx_free)
        self._tx_collect(q)
        if self.on_tx_room is not None and len(q.tx_free) > freed:
            self.on_tx_room()

    def _tx_collect(self, q: _Queue) -> None:
        ring = q.tx_ring
        while ring is not None:
            rsps = ring.get_responses()
            st = self.stats
            for off in range(0, len(rsps), protocol.TX_RESPONSE_SIZE):
                rid, status = _TXRSP.unpack_from(rsps, off)
                if status == NetifStatus.NULL:
                    continue
                if rid not in q.tx_busy:
                    raise RemoteProtocolError(f"vif: tx response for id {rid}, which is not in flight")
                q.tx_busy.discard(rid)
                q.tx_free.append(rid)
                nbytes = q.tx_pending.pop(rid, None)
                if nbytes is None:
                    continue
                if status == NetifStatus.OKAY:
                    st.tx_packets += 1
                    st.tx_bytes += nbytes
                elif status == NetifStatus.DROPPED:
                    st.tx_dropped += 1
                else:
                    st.tx_errors += 1
            if not ring.final_check_for_responses():
                return

    def _rx_event(self, q: _Queue) -> None:
        ring = q.rx_ring
        if ring is None:
            return
        repost: list[int] = []
        while True:
            start = ring.rsp_cons
            rsps = ring.get_responses()
            for k in range(len(rsps) // RX_SLOT_SIZE):
                raw = rsps[k * RX_SLOT_SIZE:(k + 1) * RX_SLOT_SIZE]
                rid = q.rx_slot[(start + k) & (NRX - 1)]
                repost.append(rid)
                self._rx_slot(q, raw, rid)
            if not ring.final_check_for_responses():
                break
        if repost and q.rx_ring is not None:
            self._post(q, repost)

    def _rx_slot(self, q: _Queue, raw: bytes, rid: int) -> None:
        if q.extra:  # an extra-info slot overwrote the response
            q.extra = bool(raw[1] & XEN_NETIF_EXTRA_FLAG_MORE)
        else:
            _, offset, flags, status = _RXRSP_IN.unpack(raw)
            if status < 0 or offset + status > PAGE_SIZE:
                parse_rx_response(raw)  # raises for what breaks the protocol
                q.bad = True            # NETIF_RSP_ERROR / DROPPED
            elif status > 0:
                base = (q.rx_pfn + rid) * PAGE_SIZE + offset
                q.parts.append(bytes(self.k.memory[base:base + status]))
            q.more = bool(flags & NETRXF_more_data)
            q.extra = bool(flags & NETRXF_extra_info)
        if q.extra or q.more:
            return
        frame = b"".join(q.parts)
        bad = q.bad or len(frame) < ETH_HLEN
        q.parts, q.bad = [], False
        st = self.stats
        if bad:
            st.rx_errors += 1
            return
        st.rx_packets += 1
        st.rx_bytes += len(frame)
        if self.sink is not None:
            self.sink(frame)
        elif len(self.rxq) >= RXQ_MAX:
            st.rx_dropped += 1
        else:
            self.rxq.append(frame)

    def _post(self, q: _Queue, ids) -> None:
        ring = q.rx_ring
        assert ring is not None
        out = []
        prod = ring.req_prod_pvt
        for n, rid in enumerate(ids):
            q.rx_slot[(prod + n) & (NRX - 1)] = rid
            out.append(_RXREQ.pack(rid, q.rx_grefs[rid]))
        ring.put_requests(b"".join(out))
        if ring.push_requests_and_check_notify() and q.rx_port is not None:
            self.k.xen.notify(q.rx_port)

    # -- the device API ----------------------------------------------------------------

    @property
    def mac_address(self) -> str:
        return ":".join(f"{b:02x}" for b in self.mac)

    def wait_connected(self, timeout: float = 10.0) -> None:
        if not self.k.loop.run_until(lambda: self.is_connected, timeout):
            raise TimeoutError("vif: not connected")

    def _queue_for(self, frame: bytes) -> _Queue | None:
        queues = self.queues
        if not queues:
            return None
        return queues[flow_hash(frame) % len(queues)] if len(queues) > 1 else queues[0]

    @staticmethod
    def _room(q: _Queue | None, pages: int, slots: int) -> bool:
        ring = q.tx_ring if q is not None else None
        return ring is not None and len(q.tx_free) >= pages and ring.free_requests() >= slots  # type: ignore[union-attr]

    def send(self, frame: bytes | bytearray | memoryview, *, gso_mss: int = 0, block: bool = True,
             timeout: float | None = 10.0, push: bool = True) -> bool:
        """Put one Ethernet frame on the tx ring.  ``gso_mss`` marks a TCP
        frame larger than the MTU for segmentation (a GSO extra).  False
        when ``block`` is off and there is no room; TimeoutError when
        blocking ran out of time.  ``push=False`` leaves the frame for the
        next :meth:`push` (a burst costs the backend one event)."""
        data = bytes(frame)
        n = len(data)
        if not ETH_HLEN <= n <= XEN_NETIF_MAX_TX_SIZE:
            raise LocalError(f"vif: a frame is {ETH_HLEN}..{XEN_NETIF_MAX_TX_SIZE} bytes, not {n}")
        pages = -(-n // PAGE_SIZE)
        if pages > 1 and not self.sg:
            raise LocalError(f"vif: a {n}-byte frame needs feature-sg, which was not negotiated")
        slots = pages + (1 if gso_mss else 0)

        def room() -> bool:
            return self.is_connected and self._room(self._queue_for(data), pages, slots)

        if not room():
            if not block:
                q0 = self._queue_for(data)
                if q0 is not None:
                    self._tx_collect(q0)
                if not room():
                    return False
            elif not self.k.loop.run_until(room, timeout):
                raise TimeoutError(f"vif: no room on the tx ring within {timeout} s")
        q = self._queue_for(data)
        assert q is not None
        ring = q.tx_ring
        assert ring is not None and q.tx_port is not None
        ids = [q.tx_free.pop() for _ in range(pages)]
        mem = self.k.memory
        out = []
        for i, rid in enumerate(ids):
            chunk = data[i * PAGE_SIZE:(i + 1) * PAGE_SIZE]
            base = (q.tx_pfn + rid) * PAGE_SIZE
            mem[base:base + len(chunk)] = chunk
            more = NETTXF_more_data if i + 1 < pages else 0
            if i == 0:
                flags = more | (NETTXF_extra_info if gso_mss else 0)
                out.append(_TXREQ.pack(q.tx_grefs[rid], 0, flags, rid, n))
                if gso_mss:
                    out.append(GsoExtra(XEN_NETIF_GSO_TYPE_TCPV4, gso_mss).pack(TX_SLOT_SIZE))
            else:
                out.append(_TXREQ.pack(q.tx_grefs[rid], 0, more, rid, len(chunk)))
        q.tx_busy.update(ids)
        q.tx_pending[ids[0]] = n
        q.sent += 1
        ring.put_requests(b"".join(out))
        if push and ring.push_requests_and_check_notify():
            self.k.xen.notify(q.tx_port)
        return True

    def push(self) -> None:
        """Publish the frames sent with ``push=False`` (and notify if needed)."""
        for q in self.queues:
            ring = q.tx_ring
            if ring is not None and q.tx_port is not None and ring.push_requests_and_check_notify():
                self.k.xen.notify(q.tx_port)

    def recv(self, *, block: bool = True, timeout: float | None = None) -> bytes | None:
        """The next frame received; None when ``block`` is off (or the
        timeout ran out) and none is waiting."""
        if not self.rxq:
            if not block:
                for q in self.queues:
                    self._rx_event(q)
            else:
                self.k.loop.run_until(lambda: bool(self.rxq), timeout)
        return self.rxq.popleft() if self.rxq else None

    def counters(self) -> dict[str, int]:
        return self.stats.as_dict()


def attach(kernel, devid: int, timeout: float = 30.0) -> NetFront:
    """Start the vif frontend bus and return device ``devid``'s driver once
    the toolstack has created it and it is connected."""
    bus, front = attach_frontend(kernel, "vif", NetFront, devid, timeout)
    front.bus = bus
    return front


# The guest's network namespace hook registers with the jail when netfront is loaded.
from xmp.drivers.net import stack as _stack  # noqa: E402,F401


def devid_of(ref: str | int) -> int:
    """``eth1`` -> 1; a number is the devid itself."""
    if isinstance(ref, int):
        return ref
    if ref.isdigit():
        return int(ref)
    if ref.startswith("eth") and ref[3:].isdigit():
        return int(ref[3:])
    raise LocalError(f"vif: {ref!r} is neither ethN nor a devid")


def open(kernel, ref: str | int = "eth0", timeout: float = 30.0) -> NetFront:
    """``kernel.net("eth0")``: the guest's NIC named ethN (devid N)."""
    return attach(kernel, devid_of(ref), timeout)
