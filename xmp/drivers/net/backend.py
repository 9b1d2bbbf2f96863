"""netif backend ("vif"): in dom0 or a driver domain, one per guest NIC.

The toolstack writes ``mac``, ``bridge``, ``script``, ``handle`` (and
optionally ``vifname``, ``mtu``, ``ip``) in the backend directory, as
libxl does.  The backend offers ``feature-sg``, ``feature-gso-tcpv4``,
``feature-gso-tcpv6``, ``feature-rx-copy`` (and ``feature-rx-flip`` 0) and
``feature-split-event-channels`` and ``multi-queue-max-queues`` (4); the
frontend must ask for ``request-rx-copy`` and gives ``tx-ring-ref``,
``rx-ring-ref`` and ``event-channel`` (or ``event-channel-tx`` / ``-rx``),
per queue under ``queue-N/`` when it asks for ``multi-queue-num-queues``
above 1.  A frame for the guest goes to the queue its flow hashes to.

tx (guest -> network).  Slots are copied out of the ring once and judged
by :class:`~xmp.drivers.net.packets.TxAssembler` (XSA-39 / -432 rules); a
good packet's bytes are read from the granted pages -- dom0 maps them
read-only at their first use and keeps them mapped for the connection
(netfront grants its tx pages once), a driver domain (which may not map: EPERM) grant-
copies them into its own bounce pages, many packets per GNTTABOP_copy --
and go to the switch port (:mod:`xmp.drivers.net.switch`).  A bad packet
is answered ERROR and counted; a fatal one disables the vif alone: its
error node is written and it goes Closing (netback's
``xenvif_fatal_tx_err``).

rx (network -> guest).  Frames for the guest wait in a queue bounded in
frames and bytes (a guest that never posts buffers loses frames, counted,
XSA-392); posted rx requests are taken from the ring into a private list;
:class:`~xmp.drivers.net.packets.RxBuilder` plans each frame, the bytes go
to the guest's pages by grant copy (one GNTTABOP_copy for as many frames as
the bounce pages hold), and a failed copy (a bad gref) answers that slot
NETIF_RSP_ERROR.

Counters (tx = the guest's tx ring, rx = its rx ring): packets, bytes,
errors, dropped; published under ``statistics/`` in the backend directory
a few times a second while they change, for ``xmp network-list``.
"""

from __future__ import annotations

import errno
import itertools
import struct
import traceback
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from xmp.domain_proc.xen import GrantMapping
from xmp.drivers import grantcopy
from xmp.drivers.net import protocol, switch
from xmp.drivers.net.packets import (
    RxBuilder,
    RxDrop,
    TxAssembler,
    TxMcast,
    TxPacket,
    TxReject,
    flow_hash,
    rx_slots_needed,
)
from xmp.drivers.net.protocol import (
    ETH_HLEN,
    PAGE_SIZE,
    RX_SLOT_SIZE,
    TX_SLOT_SIZE,
    XEN_NETIF_GSO_TYPE_TCPV4,
    XEN_NETIF_GSO_TYPE_TCPV6,
    GsoExtra,
    NetifStatus,
    parse_rx_request,
)
from xmp.drivers.xenbus.device import BackendDriver, XenbusDevice
from xmp.errors import GrantError, HypercallError, RemoteProtocolError, XmpError
from xmp.sharedmem.ring import BackRing

RXQ_MAX_FRAMES = 256        # frames waiting for a guest's rx buffers
RXQ_MAX_BYTES = 4 << 20
DATA_BOUNCE_PAGES = 64      # a driver domain's (and rx's) bounce pages per vif
RING_BOUNCE_PAGES = grantcopy.bounce_pages_for(PAGE_SIZE)
BATCHES_PER_EVENT = 4
MAX_QUEUES = 4              # multi-queue-max-queues
MAX_TX_MAPPED = 1024        # dom0's tx grants kept mapped per vif (netfront uses 256)
GSO_TYPES = frozenset({XEN_NETIF_GSO_TYPE_TCPV4, XEN_NETIF_GSO_TYPE_TCPV6})
SCRIPTS = ("vif-bridge", "vif-switch")
RING_BOUNCE_TOTAL = 2 * MAX_QUEUES * RING_BOUNCE_PAGES   # a driver domain's, for every ring


Ring = BackRing | grantcopy.CopyBackRing


@dataclass(eq=False)
class _Queue:
    """One queue of a vif: its two rings, their ports (one, or split),
    what its frontend posted and what waits for it."""

    index: int
    tx: Ring
    rx: Ring
    tx_port: int = 0
    rx_port: int = 0
    assembler: TxAssembler = field(default_factory=lambda: TxAssembler(gso_types=GSO_TYPES))
    posted: deque = field(default_factory=deque)             # protocol.RxRequest, ring order
    rxq: deque = field(default_factory=deque)                # (frame, gso) for the guest
    rxq_bytes: int = 0

    def release(self) -> None:
        self.tx.release()
        self.rx.release()


class NetBack(BackendDriver, switch.SwitchPort):
    devtype = "vif"

    def __init__(self, kernel) -> None:
        self.k = kernel
        self.svc = switch.service(kernel)
        self.dev: XenbusDevice | None = None
        self.queues: list[_Queue] = []
        self.mappings: list[GrantMapping] = []
        self.tx_pages: dict[int, Any] = {}       # dom0: gref -> its page, mapped read-only
        self.tx_maps: list[GrantMapping] = []
        self.copying = False
        self.stats = protocol.IfStats()
        self._published: dict[str, int] | None = None
        self.builder = RxBuilder()
        self.mac = b""
        self.mtu = protocol.DEFAULT_MTU
        self.gso_rx: frozenset[int] = frozenset()
        self.sw: switch.LearningSwitch | None = None
        self.tap: switch.TapPort | None = None
        self.ifname = ""
        self.ring_bounce: int | None = None
        self.ring_copies: grantcopy.CopyList | None = None
        self.bounce: int | None = None
        self.copies: grantcopy.CopyList | None = None

    # -- xenbus ----------------------------------------------------------------

    def publish_features(self, dev: XenbusDevice) -> None:
        for key, value in {protocol.FEATURE_SG: 1, protocol.FEATURE_GSO_TCPV4: 1,
                           protocol.FEATURE_GSO_TCPV6: 1, protocol.FEATURE_RX_COPY: 1,
                           protocol.FEATURE_RX_FLIP: 0, protocol.FEATURE_SPLIT_EVENT_CHANNELS: 1,
                           protocol.MULTI_QUEUE_MAX_QUEUES: MAX_QUEUES}.items():
            dev.write(key, value)

    def connect(self, dev: XenbusDevice) -> None:
        if dev.read_other(protocol.REQUEST_RX_COPY) != b"1":
            raise ValueError("vif: the frontend did not set request-rx-copy (rx-flip is not supported)")
        nq = _number(dev, protocol.MULTI_QUEUE_NUM_QUEUES, 1, 1, MAX_QUEUES, other=True)
        keys = []  # every queue's keys checked before anything is mapped or bound
        for i in range(nq):
            pre = f"{protocol.queue_dir(i)}/" if nq > 1 else ""
            tx_ref = _number(dev, pre + protocol.TX_RING_REF, None, 0, 0xFFFFFFFF, other=True)
            rx_ref = _number(dev, pre + protocol.RX_RING_REF, None, 0, 0xFFFFFFFF, other=True)
            if dev.read_other(pre + protocol.EVENT_CHANNEL_TX) is not None:
                ports = (_number(dev, pre + protocol.EVENT_CHANNEL_TX, None, 1, 0xFFFFFFFF, other=True),
                         _number(dev, pre + protocol.EVENT_CHANNEL_RX, None, 1, 0xFFFFFFFF, other=True))
            else:
                port = _number(dev, pre + protocol.EVENT_CHANNEL, None, 1, 0xFFFFFFFF, other=True)
                ports = (port, port)
            keys.append((tx_ref, rx_ref, ports))
        mac = (dev.xs.read_or(f"{dev.nodename}/{protocol.MAC}") or b"").decode()
        try:
            self.mac = bytes.fromhex(mac.replace(":", ""))
        except ValueError:
            self.mac = b""
        if len(self.mac) != 6:
            raise ValueError(f"vif: mac {mac!r} in the backend directory is not a MAC")
        self.mtu = _number(dev, protocol.MTU, protocol.DEFAULT_MTU, 68, 65535)
        script = (dev.xs.read_or(f"{dev.nodename}/{protocol.SCRIPT}") or b"vif-bridge").decode()
        if script not in SCRIPTS:
            raise ValueError(f"vif: script {script!r} is not one of {', '.join(SCRIPTS)}")
        bridge = (dev.xs.read_or(f"{dev.nodename}/{protocol.BRIDGE}") or b"xenbr0").decode()
        self.gso_rx = frozenset(t for t, key in ((XEN_NETIF_GSO_TYPE_TCPV4, protocol.FEATURE_GSO_TCPV4),
                                                 (XEN_NETIF_GSO_TYPE_TCPV6, protocol.FEATURE_GSO_TCPV6))
                                if dev.read_other(key) == b"1")
        self.builder = RxBuilder(sg=dev.read_other(protocol.FEATURE_SG) == b"1", gso_types=self.gso_rx)
        self._drop_connection()
        self.dev = dev
        try:
            for index, (tx_ref, rx_ref, ports) in enumerate(keys):
                self._connect_queue(dev, index, tx_ref, rx_ref, ports)
            self._plug(dev, script, bridge)
        except BaseException:
            self._drop_connection()
            raise
        self.svc.add_ticker(self._tick)
        dev.write("hotplug-status", "connected")
        for q in list(self.queues):
            self._on_event(self._serve_both, q)
        if not self.queues:  # what was queued already broke the protocol: stay closed
            raise ValueError(dev.error or "vif: disabled while connecting")

    def _connect_queue(self, dev: XenbusDevice, index: int, tx_ref: int, rx_ref: int,
                       ports: tuple[int, int]) -> None:
        tx = self._ring(dev, tx_ref, TX_SLOT_SIZE, TX_SLOT_SIZE, 2 * index)  # responses fill their slot
        try:
            rx = self._ring(dev, rx_ref, RX_SLOT_SIZE, RX_SLOT_SIZE, 2 * index + 1)
        except BaseException:
            tx.release()
            raise
        q = _Queue(index, tx, rx)
        self.queues.append(q)  # from here _drop_connection undoes it
        q.tx_port = q.rx_port = self.k.xen.bind_interdomain(dev.otherend_id, ports[0])
        if ports[1] != ports[0]:
            q.rx_port = self.k.xen.bind_interdomain(dev.otherend_id, ports[1])
            self.k.loop.bind(q.tx_port, lambda _p: self._on_event(self._serve_tx, q))
            self.k.loop.bind(q.rx_port, lambda _p: self._on_event(self._rx_flush, q))
        else:
            self.k.loop.bind(q.tx_port, lambda _p: self._on_event(self._serve_both, q))

    def _plug(self, dev: XenbusDevice, script: str, bridge: str) -> None:
        """Join the switch, or make the TAP on the bridge (vif-bridge's job)."""
        frontid, devid = dev.nodename.rsplit("/", 2)[-2:]
        self.ifname = (dev.xs.read_or(f"{dev.nodename}/vifname") or f"vif{frontid}.{devid}".encode()).decode()
        if script == "vif-bridge" and self.svc.may_tap():
            try:
                self.tap = self.svc.open_tap(self.ifname, bridge, self.mtu, self)
            except OSError as exc:  # a name in use, no such bridge: this vif fails, alone
                raise ValueError(f"vif: cannot put TAP {self.ifname} on bridge {bridge}: "
                                 f"{exc.strerror or exc}") from None
            dev.write("mode", "bridge")
        else:
            self.sw = self.svc.switch(bridge)
            self.sw.join(self)
            dev.write("mode", "switch")

    def _ring(self, dev: XenbusDevice, ref: int, req_size: int, rsp_size: int, which: int) -> Ring:
        if not self.copying:
            try:
                mapping = self.k.xen.map_grant_ref(dev.otherend_id, [ref])
            except HypercallError as exc:
                if exc.errno != errno.EPERM:
                    raise
                self.copying = True  # a driver domain: grant copy from now on
            else:
                self.mappings.append(mapping)
                return BackRing(mapping.pages[0], req_size, rsp_size)
        if self.ring_bounce is None:
            self.ring_bounce = self.k.alloc_pages(RING_BOUNCE_TOTAL)
            self.ring_copies = grantcopy.CopyList(self.k)
        assert self.ring_copies is not None
        copier = grantcopy.GrantCopier(self.k, dev.otherend_id, [ref],
                                       self.ring_bounce + which * RING_BOUNCE_PAGES,
                                       RING_BOUNCE_PAGES, self.ring_copies)
        return grantcopy.CopyBackRing(copier, PAGE_SIZE, req_size, rsp_size)

    def disconnect(self, dev: XenbusDevice) -> None:
        self._drop_connection()

    def _drop_connection(self) -> None:
        self.svc.remove_ticker(self._tick)
        for q in self.queues:
            for port in {q.tx_port, q.rx_port} - {0}:
                self.k.close_port(port)
            q.release()
            self.stats.rx_dropped += len(q.rxq)
        self.queues = []
        self._unmap_tx()
        for mapping in self.mappings:
            _unmap_quietly(self.k, mapping)
        self.mappings = []
        if self.sw is not None:
            self.sw.leave(self)
            self.svc.drop_switch(self.sw)
            self.sw = None
        if self.tap is not None:
            tap, self.tap = self.tap, None
            try:
                self.svc.close_tap(tap)
            except Exception:  # the TAP is gone with its descriptor; a bridge left is logged
                print(traceback.format_exc(), flush=True)
        self.svc.dirty.discard(self)
        if self.dev is not None:
            try:
                self._publish()
            except XmpError:  # its directory went meanwhile
                pass

    def release(self) -> None:
        for pfn, pages in ((self.ring_bounce, RING_BOUNCE_TOTAL), (self.bounce, DATA_BOUNCE_PAGES)):
            if pfn is not None:
                self.k.free_pages(pfn, pages)
        self.ring_bounce = self.bounce = None
        for copies in (self.ring_copies, self.copies):
            if copies is not None:
                copies.release()
        self.ring_copies = self.copies = None

    # -- counters ----------------------------------------------------------------

    def _tick(self) -> None:
        if self.dev is not None:
            self._guarded(self._publish)

    def _publish(self) -> None:
        dev = self.dev
        assert dev is not None
        now = self.stats.as_dict()
        if now == self._published:
            return
        # A WRITE makes its parents: never bring back a directory the toolstack removed
        # (the frontend's domain is gone).  The read and the writes are not one
        # transaction: a removal in just between can still leave these keys behind.
        if dev.xs.read_or(f"{dev.nodename}/state") is None:
            return
        for key, value in now.items():
            if self._published is None or self._published.get(key) != value:
                dev.write(f"statistics/{key}", value)
        self._published = now

    # -- failure -------------------------------------------------------------------

    def _on_event(self, fn, *args) -> None:
        self._guarded(fn, *args)
        self.svc.flush()

    def rx_flush(self) -> None:
        for q in list(self.queues):
            self._guarded(self._rx_flush, q)

    def _guarded(self, fn, *args) -> None:
        try:
            fn(*args)
        except RemoteProtocolError as exc:  # a broken frontend: close its vif, serve the rest
            self._fail(str(exc))
        except XmpError as exc:  # its directory is gone (the frontend's domain died), or the like
            self._fail(f"vif: {exc}")
        except Exception:  # never take the backend's process down
            text = traceback.format_exc()
            print(text, flush=True)
            self._fail("vif backend failure: " + text.strip().splitlines()[-1])

    def _fail(self, message: str) -> None:
        dev = self.dev
        if dev is None:
            return
        print(f"{dev.nodename}: disabled: {message}", flush=True)
        dev.fatal(message)  # disconnects us (or removes the device, if its frontend has gone)

    # -- tx: the guest's frames ----------------------------------------------------

    def _serve_both(self, q: _Queue) -> None:
        self._serve_tx(q)
        self._rx_flush(q)

    def _serve_tx(self, q: _Queue) -> None:
        ring = q.tx
        for _ in range(BATCHES_PER_EVENT):
            if q not in self.queues:
                return
            reqs = ring.get_requests()
            if reqs:
                self._tx_batch(q, q.assembler.feed(reqs))
                continue
            if ring.final_check_for_requests():
                continue
            reject = q.assembler.end_of_batch()
            if reject is not None:
                self._tx_batch(q, [reject])
            return
        if q in self.queues:  # still busy: let the loop serve the others first
            self.k.xen.evt.send(q.tx_port)

    def _tx_batch(self, q: _Queue, decisions: list) -> None:
        ring = q.tx
        packets = [d for d in decisions if isinstance(d, TxPacket)]
        frames = self._tx_data(packets) if packets else {}
        out: list[bytes] = []
        fatal: TxReject | None = None
        st = self.stats
        for d in decisions:
            if isinstance(d, TxPacket):
                frame = frames.get(id(d))
                if frame is None:
                    st.tx_errors += 1
                    out.append(d.pack_responses(NetifStatus.ERROR))
                    continue
                out.append(d.pack_responses())
                st.tx_packets += 1
                st.tx_bytes += len(frame)
                self._forward(frame, d.gso)
            elif isinstance(d, TxMcast):
                out.append(d.pack_responses())
            else:
                assert isinstance(d, TxReject)
                st.tx_errors += 1
                out.append(d.pack_responses())
                if d.fatal:
                    fatal = d
        if out and q in self.queues:
            ring.put_responses(b"".join(out))
            if ring.push_responses_and_check_notify():
                self.k.xen.notify(q.tx_port)
        if fatal is not None:
            raise RemoteProtocolError(f"vif: fatal tx error: {fatal.reason}")

    def _forward(self, frame: bytes, gso: GsoExtra | None) -> None:
        if self.tap is not None:
            if not self.tap.send(frame):
                self.stats.tx_dropped += 1
        elif self.sw is not None:
            self.sw.forward(self, frame, gso)

    def _tx_data(self, packets: list[TxPacket]) -> dict[int, bytes]:
        """Each good packet's bytes (by id() of the packet); a packet whose
        grants fail is missing (answered ERROR)."""
        if self.copying:
            return self._tx_copy(packets)
        return self._tx_map(packets)

    def _tx_map(self, packets: list[TxPacket]) -> dict[int, bytes]:
        """dom0: read the packets from the frontend's pages, mapped read-only
        at their first use and kept for the connection (netfront grants its
        tx pages once), so a batch costs no hypercall once warm."""
        assert self.dev is not None
        pages = self.tx_pages
        missing = list(dict.fromkeys(p.gref for pk in packets for p in pk.pieces if p.gref not in pages))
        if missing:
            if len(pages) + len(missing) > MAX_TX_MAPPED:  # a frontend cycling through grants
                self._unmap_tx()
            try:
                mapping = self.k.xen.map_grant_ref(self.dev.otherend_id, missing, readonly=True)
            except (HypercallError, GrantError) as exc:
                if isinstance(exc, HypercallError) and exc.errno == errno.EPERM:
                    self.copying = True
                    return self._tx_copy(packets)
                if len(packets) == 1:
                    return {}
                out: dict[int, bytes] = {}
                for pk in packets:  # one bad gref costs only its own packet
                    out.update(self._tx_map([pk]))
                return out
            self.tx_maps.append(mapping)
            pages.update(zip(missing, mapping.pages, strict=True))
        return {id(pk): b"".join(pages[p.gref][p.offset:p.offset + p.length] for p in pk.pieces)
                for pk in packets}

    def _unmap_tx(self) -> None:
        self.tx_pages.clear()
        for mapping in self.tx_maps:
            _unmap_quietly(self.k, mapping)
        self.tx_maps = []

    def _tx_copy(self, packets: list[TxPacket]) -> dict[int, bytes]:
        assert self.dev is not None
        out: dict[int, bytes] = {}
        group: list[TxPacket] = []
        used = 0
        for pk in packets + [None]:  # type: ignore[list-item]
            n = len(pk.pieces) if pk is not None else 0
            if group and (pk is None or used + n > DATA_BOUNCE_PAGES):
                out.update(self._tx_copy_group(group))
                group, used = [], 0
            if pk is not None:
                group.append(pk)
                used += n
        return out

    def _tx_copy_group(self, group: list[TxPacket]) -> dict[int, bytes]:
        assert self.dev is not None
        segs = [(p.gref, p.offset, p.length) for pk in group for p in pk.pieces]
        try:
            views = grantcopy.copy_from_grants(self.k, self.dev.otherend_id, segs, self._bounce(),
                                               DATA_BOUNCE_PAGES, self._copies())
        except GrantError:
            if len(group) == 1:
                return {}
            out: dict[int, bytes] = {}
            for pk in group:
                out.update(self._tx_copy_group([pk]))
            return out
        out = {}
        it = iter(views)
        for pk in group:
            out[id(pk)] = b"".join(bytes(next(it)) for _ in pk.pieces)
        return out

    def _bounce(self) -> int:
        if self.bounce is None:
            self.bounce = self.k.alloc_pages(DATA_BOUNCE_PAGES)
        return self.bounce

    def _copies(self) -> grantcopy.CopyList:
        if self.copies is None:
            self.copies = grantcopy.CopyList(self.k)
        return self.copies

    # -- rx: frames for the guest ------------------------------------------------------

    def deliver(self, frame: bytes, gso: GsoExtra | None = None) -> None:
        """A frame from the switch or the TAP, queued for the guest (bounded),
        on the queue its flow hashes to (so a flow keeps its order)."""
        queues = self.queues
        if not queues:
            self.stats.rx_dropped += 1
            return
        q = queues[flow_hash(frame) % len(queues)] if len(queues) > 1 else queues[0]
        if len(q.rxq) >= RXQ_MAX_FRAMES or q.rxq_bytes + len(frame) > RXQ_MAX_BYTES:
            self.stats.rx_dropped += 1
            return
        q.rxq.append((frame, gso if gso is not None and gso.gso_type in self.gso_rx else None))
        q.rxq_bytes += len(frame)
        self.svc.dirty.add(self)

    def _take_rx_requests(self, q: _Queue) -> None:
        ring = q.rx
        while True:
            reqs = ring.get_requests()
            for off in range(0, len(reqs), RX_SLOT_SIZE):
                q.posted.append(parse_rx_request(reqs[off:off + RX_SLOT_SIZE]))
            if not reqs and not ring.final_check_for_requests():
                return

    def _rx_flush(self, q: _Queue) -> None:
        if q not in self.queues:
            return
        self._take_rx_requests(q)
        batch: list[tuple] = []   # (plan, its first copy record) or (None, record, id, bytes)
        records = 0
        assert self.dev is not None
        other = self.dev.otherend_id
        bounce = self._bounce()
        copies = self._copies()
        cursor = 0                              # bytes of bounce used
        st = self.stats
        rxq, posted = q.rxq, q.posted
        while rxq:
            frame, gso = rxq[0]
            need = rx_slots_needed(len(frame), gso=gso is not None)
            if need > len(posted):
                break  # wait for the guest to post buffers (the queue is bounded)
            nbytes = len(frame)
            if batch and (records + need > grantcopy.MAX_COPY_OPS
                          or _bounce_after(cursor, frame) > DATA_BOUNCE_PAGES * PAGE_SIZE):
                self._rx_run(q, batch)
                batch, records, cursor = [], 0, 0
            rxq.popleft()
            q.rxq_bytes -= nbytes
            if gso is None and ETH_HLEN <= nbytes <= PAGE_SIZE:
                # The common frame, one slot: what RxBuilder would plan, without the planning.
                req = posted.popleft()
                if cursor % PAGE_SIZE + nbytes > PAGE_SIZE:
                    cursor = -(-cursor // PAGE_SIZE) * PAGE_SIZE
                pfn, off = bounce + cursor // PAGE_SIZE, cursor % PAGE_SIZE
                self.k.page(pfn)[off:off + nbytes] = frame
                copies.copy_out(pfn, off, other, req.gref, 0, nbytes)
                cursor += nbytes
                batch.append((None, records, req.id, nbytes))
                records += 1
                continue
            plan = self.builder.build(nbytes, list(itertools.islice(posted, need)), gso=gso)
            if isinstance(plan, RxDrop):
                st.rx_dropped += 1
                continue
            for _ in range(plan.consumed):
                posted.popleft()
            first = records
            for c in plan.copies:
                if cursor % PAGE_SIZE + c.length > PAGE_SIZE:
                    cursor = -(-cursor // PAGE_SIZE) * PAGE_SIZE
                pfn, off = bounce + cursor // PAGE_SIZE, cursor % PAGE_SIZE
                self.k.page(pfn)[off:off + c.length] = frame[c.frame_offset:c.frame_offset + c.length]
                copies.copy_out(pfn, off, other, c.gref, c.offset, c.length)
                cursor += c.length
                records += 1
            batch.append((plan, first))
        if batch:
            self._rx_run(q, batch)

    def _rx_run(self, q: _Queue, batch: list[tuple]) -> None:
        ring = q.rx
        statuses = self._copies().run()
        st = self.stats
        out = []
        for item in batch:
            plan = item[0]
            if plan is None:  # a one-slot frame
                _, record, rid, n = item
                if statuses[record]:
                    st.rx_errors += 1
                    out.append(_RX_RSP.pack(rid, 0, 0, NetifStatus.ERROR))
                else:
                    st.rx_packets += 1
                    st.rx_bytes += n
                    out.append(_RX_RSP.pack(rid, 0, 0, n))
                continue
            first = item[1]
            failed = [i for i in range(len(plan.copies)) if statuses[first + i] != 0]
            if failed:
                st.rx_errors += 1
                plan = plan.with_errors(failed)
            else:
                st.rx_packets += 1
                st.rx_bytes += sum(c.length for c in plan.copies)
            out.append(plan.pack_responses())
        ring.put_responses(b"".join(out))
        if ring.push_responses_and_check_notify():
            self.k.xen.notify(q.rx_port)


_RX_RSP = struct.Struct("<HHHh")   # struct netif_rx_response, as in protocol


def _bounce_after(cursor: int, frame: bytes) -> int:
    """Bounce bytes used after placing ``frame`` from ``cursor`` (pages not crossed)."""
    for start in range(0, len(frame), PAGE_SIZE):
        n = min(PAGE_SIZE, len(frame) - start)
        if cursor % PAGE_SIZE + n > PAGE_SIZE:
            cursor = -(-cursor // PAGE_SIZE) * PAGE_SIZE
        cursor += n
    return cursor


def _number(dev: XenbusDevice, key: str, default: int | None, lo: int, hi: int, *,
            other: bool = False) -> int:
    """A numeric key (the frontend's with ``other``), checked: one clear ValueError otherwise."""
    raw = dev.read_other(key) if other else dev.xs.read_or(f"{dev.nodename}/{key}")
    if raw is None:
        if default is None:
            raise ValueError(f"vif: the frontend gave no {key}")
        return default
    if not raw.isdigit() or len(raw) > 10 or not lo <= int(raw) <= hi:
        raise ValueError(f"vif: {key} is {raw[:32]!r}, not a number in {lo}..{hi}")
    return int(raw)


def _unmap_quietly(kernel, mapping: GrantMapping) -> None:
    try:
        kernel.xen.unmap_grant_ref(mapping)
    except XmpError:
        pass


def backend(kernel) -> NetBack:
    """One backend driver for a device of this class (the registry's factory)."""
    return NetBack(kernel)
