"""netif frontend ("vif"): ``kernel.net("eth0")`` in a guest.

Memory, taken at the first setup and kept across reconnections: the tx and
rx ring pages, and one buffer page per ring slot each way (256 + 256).
Per connection every buffer is granted once (tx read-only, rx writable), so
a packet costs no grant-table writes.  A tx packet takes as many free
pages as it spans, its id is its first page's index; an rx request posts a
page, its id the page's index, and its response is found by slot (an
extra-info slot overwrites the id), as Linux's netfront does.

What is negotiated (:func:`configure`, like Linux's xen-netfront module
parameters): ``sg`` (frames over one page, ``feature-sg``), ``gso``
(``feature-gso-tcpv4``/``-tcpv6``: the backend may hand us frames larger
than the MTU), ``split`` (``feature-split-event-channels``: one port per
ring).  ``request-rx-copy`` and ``feature-rx-notify`` are always set.

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
from dataclasses import asdict, dataclass

from xmp.drivers.net import protocol
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
from xmp.drivers.xenbus.device import Bus, FrontendDriver, XenbusDevice, frontend_bus
from xmp.drivers.xenbus.state import XenbusState
from xmp.errors import LocalError, RemoteProtocolError, XmpError
from xmp.sharedmem.ring import FrontRing

NTX = NET_TX_RING_SIZE
NRX = NET_RX_RING_SIZE
RXQ_MAX = 1024
_TXREQ = struct.Struct("<IHHHH")
_TXRSP = struct.Struct("<Hh")
_RXREQ = struct.Struct("<H2xI")

DEFAULTS = {"sg": True, "gso": True, "split": False}
_options: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def configure(kernel, **options: bool) -> None:
    """This guest's netfront parameters for the vifs it attaches from now on."""
    unknown = set(options) - set(DEFAULTS)
    if unknown:
        raise LocalError(f"netfront: unknown option(s) {sorted(unknown)}; known: {sorted(DEFAULTS)}")
    for key, value in options.items():
        if not isinstance(value, bool):
            raise LocalError(f"netfront: {key} = {value!r} is not a boolean")
    _options[kernel] = {**DEFAULTS, **_options.get(kernel, {}), **options}


@dataclass
class NetStats:
    """The guest's own counters (what ``ip -s link`` shows for eth0)."""

    tx_packets: int = 0
    tx_bytes: int = 0
    tx_errors: int = 0
    tx_dropped: int = 0
    rx_packets: int = 0
    rx_bytes: int = 0
    rx_errors: int = 0
    rx_dropped: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


class NetFront(FrontendDriver):
    devtype = "vif"

    def __init__(self, kernel) -> None:
        self.k = kernel
        self.opts = dict(_options.get(kernel, DEFAULTS))
        self.area: int | None = None
        self.tx_ring: FrontRing | None = None
        self.rx_ring: FrontRing | None = None
        self.ring_grefs: list[int] = []
        self.tx_grefs: list[int] = []
        self.rx_grefs: list[int] = []
        self.tx_port: int | None = None
        self.rx_port: int | None = None
        self.tx_free: list[int] = []
        self.tx_pending: dict[int, int] = {}      # first id -> bytes of its packet
        self.tx_busy: set[int] = set()            # ids (pages) not answered yet
        self.rx_slot: list[int] = [0] * NRX       # ring slot -> the id posted in it
        self.rxq: deque[bytes] = deque()
        self.sink: Callable[[bytes], None] | None = None   # takes frames instead of rxq
        self.on_connect: list[Callable[[], None]] = []
        self.on_tx_room: Callable[[], None] | None = None   # called when tx slots came free
        self._parts: list[bytes] = []
        self._bad = False
        self._more = False
        self._extra = False
        self.stats = NetStats()
        self.mac = b""
        self.mtu = protocol.DEFAULT_MTU
        self.sg = self.gso = self.split = False
        self.dev: XenbusDevice | None = None
        self.bus: Bus | None = None
        self.is_connected = False
        self.connections = 0

    # -- memory --------------------------------------------------------------------

    @property
    def _tx_pfn(self) -> int:
        assert self.area is not None
        return self.area + 2

    @property
    def _rx_pfn(self) -> int:
        return self._tx_pfn + NTX

    def release(self) -> None:
        if self.area is None:
            return
        gt = self.k.grant_table
        gt.retry_deferred()
        ours = set(self.ring_grefs + self.tx_grefs + self.rx_grefs)
        if ours & gt.deferred_refs():
            return  # a dead backend may still hold some mapped: the pages stay
        self.k.free_pages(self.area, 2 + NTX + NRX)
        self.area = None

    # -- xenbus ----------------------------------------------------------------------

    def setup(self, dev: XenbusDevice) -> None:
        self.dev = dev
        if self.area is None:
            self.area = self.k.alloc_pages(2 + NTX + NRX)
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
        other = dev.otherend_id
        self.sg = self.opts["sg"] and dev.read_other(protocol.FEATURE_SG) == b"1"
        self.gso = self.opts["gso"]
        self.split = self.opts["split"] and dev.read_other(protocol.FEATURE_SPLIT_EVENT_CHANNELS) == b"1"
        for key in (protocol.EVENT_CHANNEL, protocol.EVENT_CHANNEL_TX, protocol.EVENT_CHANNEL_RX):
            if dev.xs.read_or(f"{dev.nodename}/{key}") is not None:  # an earlier negotiation's
                dev.xs.rm(f"{dev.nodename}/{key}")
        tx_page, rx_page = self.k.page(self.area), self.k.page(self.area + 1)
        tx_page[:] = bytes(PAGE_SIZE)
        rx_page[:] = bytes(PAGE_SIZE)
        self.tx_ring = FrontRing(tx_page, TX_SLOT_SIZE, protocol.TX_RESPONSE_SIZE)
        self.rx_ring = FrontRing(rx_page, RX_SLOT_SIZE, RX_SLOT_SIZE)
        self.ring_grefs = [gt.grant_foreign_access(other, self.area + i) for i in range(2)]
        self.tx_grefs = [gt.grant_foreign_access(other, self._tx_pfn + i, True) for i in range(NTX)]
        self.rx_grefs = [gt.grant_foreign_access(other, self._rx_pfn + i) for i in range(NRX)]
        self.tx_free = list(range(NTX - 1, -1, -1))
        self.tx_busy.clear()
        self.tx_pending.clear()
        self._parts, self._bad, self._more, self._extra = [], False, False, False
        self.tx_port = self.k.xen.alloc_unbound(other)
        if self.split:
            self.rx_port = self.k.xen.alloc_unbound(other)
            self.k.loop.bind(self.tx_port, lambda _p: self._guarded(self._tx_done))
            self.k.loop.bind(self.rx_port, lambda _p: self._guarded(self._rx_event))
            dev.write(protocol.EVENT_CHANNEL_TX, self.tx_port)
            dev.write(protocol.EVENT_CHANNEL_RX, self.rx_port)
        else:
            self.rx_port = self.tx_port
            self.k.loop.bind(self.tx_port, lambda _p: self._guarded(self._event))
            dev.write(protocol.EVENT_CHANNEL, self.tx_port)
        dev.write(protocol.TX_RING_REF, self.ring_grefs[0])
        dev.write(protocol.RX_RING_REF, self.ring_grefs[1])
        dev.write(protocol.REQUEST_RX_COPY, 1)
        dev.write(protocol.FEATURE_RX_NOTIFY, 1)
        dev.write(protocol.FEATURE_SG, int(self.opts["sg"]))
        dev.write(protocol.FEATURE_GSO_TCPV4, int(self.gso))
        dev.write(protocol.FEATURE_GSO_TCPV6, int(self.gso))
        self._post(range(NRX))

    def connected(self, dev: XenbusDevice) -> None:
        self.is_connected = True
        self.connections += 1
        for fn in list(self.on_connect):
            fn()

    def disconnect(self, dev: XenbusDevice) -> None:
        self.is_connected = False
        for port in {self.tx_port, self.rx_port} - {None}:
            assert port is not None
            self.k.close_port(port)
        self.tx_port = self.rx_port = None
        for ring in (self.tx_ring, self.rx_ring):
            if ring is not None:
                ring.release()
        self.tx_ring = self.rx_ring = None
        gt = self.k.grant_table
        for gref in self.ring_grefs + self.tx_grefs + self.rx_grefs:
            gt.end_foreign_access_later(gref)
        self.stats.tx_dropped += len(self.tx_pending)   # lost with the backend
        self.tx_pending.clear()
        self.tx_busy.clear()
        self.tx_free = []

    # -- events ------------------------------------------------------------------------

    def _guarded(self, fn) -> None:
        try:
            fn()
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

    def _event(self) -> None:
        self._tx_done()
        self._rx_event()

    def _tx_done(self) -> None:
        freed = len(self.tx_free)
        self._tx_collect()
        if self.on_tx_room is not None and len(self.tx_free) > freed:
            self.on_tx_room()

    def _tx_collect(self) -> None:
        ring = self.tx_ring
        while ring is not None:
            rsps = ring.get_responses()
            st = self.stats
            for off in range(0, len(rsps), protocol.TX_RESPONSE_SIZE):
                rid, status = _TXRSP.unpack_from(rsps, off)
                if status == NetifStatus.NULL:
                    continue
                if rid not in self.tx_busy:
                    raise RemoteProtocolError(f"vif: tx response for id {rid}, which is not in flight")
                self.tx_busy.discard(rid)
                self.tx_free.append(rid)
                nbytes = self.tx_pending.pop(rid, None)
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

    def _rx_event(self) -> None:
        ring = self.rx_ring
        if ring is None:
            return
        repost: list[int] = []
        while True:
            start = ring.rsp_cons
            rsps = ring.get_responses()
            for k in range(len(rsps) // RX_SLOT_SIZE):
                raw = rsps[k * RX_SLOT_SIZE:(k + 1) * RX_SLOT_SIZE]
                rid = self.rx_slot[(start + k) & (NRX - 1)]
                repost.append(rid)
                self._rx_slot(raw, rid)
            if not ring.final_check_for_responses():
                break
        if repost and self.rx_ring is not None:
            self._post(repost)

    def _rx_slot(self, raw: bytes, rid: int) -> None:
        if self._extra:  # an extra-info slot overwrote the response
            self._extra = bool(raw[1] & XEN_NETIF_EXTRA_FLAG_MORE)
        else:
            rsp = parse_rx_response(raw)
            if rsp.status < 0:
                self._bad = True
            elif rsp.status > 0:
                base = (self._rx_pfn + rid) * PAGE_SIZE
                self._parts.append(bytes(self.k.memory[base + rsp.offset:base + rsp.offset + rsp.status]))
            self._more = bool(rsp.flags & NETRXF_more_data)
            self._extra = bool(rsp.flags & NETRXF_extra_info)
        if self._extra or self._more:
            return
        frame = b"".join(self._parts)
        bad = self._bad or len(frame) < ETH_HLEN
        self._parts, self._bad = [], False
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

    def _post(self, ids) -> None:
        ring = self.rx_ring
        assert ring is not None
        out = []
        prod = ring.req_prod_pvt
        for n, rid in enumerate(ids):
            self.rx_slot[(prod + n) & (NRX - 1)] = rid
            out.append(_RXREQ.pack(rid, self.rx_grefs[rid]))
        ring.put_requests(b"".join(out))
        if ring.push_requests_and_check_notify() and self.rx_port is not None:
            self.k.xen.notify(self.rx_port)

    # -- the device API ----------------------------------------------------------------

    @property
    def mac_address(self) -> str:
        return ":".join(f"{b:02x}" for b in self.mac)

    def wait_connected(self, timeout: float = 10.0) -> None:
        if not self.k.loop.run_until(lambda: self.is_connected, timeout):
            raise TimeoutError("vif: not connected")

    def _room(self, pages: int, slots: int) -> bool:
        ring = self.tx_ring
        return (self.is_connected and ring is not None and len(self.tx_free) >= pages
                and ring.free_requests() >= slots)

    def send(self, frame: bytes | bytearray | memoryview, *, gso_mss: int = 0, block: bool = True,
             timeout: float | None = 10.0) -> bool:
        """Put one Ethernet frame on the tx ring.  ``gso_mss`` marks a TCP
        frame larger than the MTU for segmentation (a GSO extra).  False
        when ``block`` is off and there is no room; TimeoutError when
        blocking ran out of time."""
        data = bytes(frame)
        n = len(data)
        if not ETH_HLEN <= n <= XEN_NETIF_MAX_TX_SIZE:
            raise LocalError(f"vif: a frame is {ETH_HLEN}..{XEN_NETIF_MAX_TX_SIZE} bytes, not {n}")
        pages = -(-n // PAGE_SIZE)
        if pages > 1 and not self.sg:
            raise LocalError(f"vif: a {n}-byte frame needs feature-sg, which was not negotiated")
        slots = pages + (1 if gso_mss else 0)
        if not self._room(pages, slots):
            if not block:
                self._tx_collect()
                if not self._room(pages, slots):
                    return False
            elif not self.k.loop.run_until(lambda: self._room(pages, slots), timeout):
                raise TimeoutError(f"vif: no room on the tx ring within {timeout} s")
        ring = self.tx_ring
        assert ring is not None and self.tx_port is not None
        ids = [self.tx_free.pop() for _ in range(pages)]
        mem = self.k.memory
        out = []
        for i, rid in enumerate(ids):
            chunk = data[i * PAGE_SIZE:(i + 1) * PAGE_SIZE]
            base = (self._tx_pfn + rid) * PAGE_SIZE
            mem[base:base + len(chunk)] = chunk
            more = NETTXF_more_data if i + 1 < pages else 0
            if i == 0:
                flags = more | (NETTXF_extra_info if gso_mss else 0)
                out.append(_TXREQ.pack(self.tx_grefs[rid], 0, flags, rid, n))
                if gso_mss:
                    out.append(GsoExtra(XEN_NETIF_GSO_TYPE_TCPV4, gso_mss).pack(TX_SLOT_SIZE))
            else:
                out.append(_TXREQ.pack(self.tx_grefs[rid], 0, more, rid, len(chunk)))
        self.tx_busy.update(ids)
        self.tx_pending[ids[0]] = n
        ring.put_requests(b"".join(out))
        if ring.push_requests_and_check_notify():
            self.k.xen.notify(self.tx_port)
        return True

    def recv(self, *, block: bool = True, timeout: float | None = None) -> bytes | None:
        """The next frame received; None when ``block`` is off (or the
        timeout ran out) and none is waiting."""
        if not self.rxq:
            if not block:
                self._rx_event()
            else:
                self.k.loop.run_until(lambda: bool(self.rxq), timeout)
        return self.rxq.popleft() if self.rxq else None

    def counters(self) -> dict[str, int]:
        return self.stats.as_dict()


_buses: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def attach(kernel, devid: int, timeout: float = 30.0) -> NetFront:
    """Start the vif frontend bus and return device ``devid``'s driver once
    the toolstack has created it and it is connected."""
    bus = _buses.get(kernel)
    if bus is None:
        bus = _buses[kernel] = frontend_bus(kernel.xenstore, "vif", lambda: NetFront(kernel))
    node = f"device/vif/{devid}"

    def ready() -> bool:
        dev = bus.devices.get(node)
        return dev is not None and isinstance(dev.driver, NetFront) and dev.driver.is_connected

    if not kernel.loop.run_until(ready, timeout):
        raise TimeoutError(f"vif {devid}: no connected device/vif/{devid}")
    front = bus.devices[node].driver
    assert isinstance(front, NetFront)
    front.bus = bus
    return front


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
