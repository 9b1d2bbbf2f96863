"""netif packets, sans I/O: the backend's tx packet assembler and rx
response builder, over the structs of :mod:`xmp.drivers.net.protocol`.

Theory of operation, tx.  A guest's packet is a chain of tx slots::

    first request      flags NETTXF_*, size = the whole packet
    [extra info]...    if the first has NETTXF_extra_info; each further one
                       if the previous has XEN_NETIF_EXTRA_FLAG_MORE
    [request]...       while the previous request has NETTXF_more_data;
                       size = that slot's own bytes

so the first slot's own share is its size minus the others'.  The backend
copies a batch of slots out of the ring (once: the guest may rewrite them)
and feeds them to :class:`TxAssembler` in ring order.  Every complete chain
comes out as exactly one decision, and its ``responses()`` (or
``pack_responses()``, the ring's bytes) are one per slot consumed, in slot
order -- the first's id, XEN_NETIF_RSP_NULL for each extra, then the
others' ids -- so ``rsp_prod`` keeps pace with ``req_cons`` as netback's
``make_tx_response`` does:

* :class:`TxPacket` -- good: the (gref, offset, length) pieces, checksum
  and GSO flags;
* :class:`TxMcast` -- a multicast filter change on a dummy request; the
  backend applies it and answers OKAY, or ERROR if its filter is full;
* :class:`TxReject` -- bad: answer every slot with ERROR; if ``fatal``
  the frontend broke the protocol and the vif must be disabled
  (netback's ``xenvif_fatal_tx_err``: carrier off, no more requests read).

The checks are Linux xen-netback's (``xenvif_tx_build_gops``,
``xenvif_get_extras``, ``xenvif_count_requests``, ``xenvif_set_skb_gso``)
as hardened after XSA-39 (a malformed chain disables the vif instead of
looping or overrunning) and with XSA-432's lesson (a short head spread over
many tiny slots is a valid packet, described exactly):

========================================================  ==========
the frontend sent                                          decision
========================================================  ==========
more than ``max_tx_slots`` (18) slots after the first      ERROR
a slot larger than what the first's size leaves            ERROR
a first slot with less than an Ethernet header (14 B)      ERROR
more than ``fatal_tx_slots`` (20) slots after the first    fatal
a slot whose offset + size crosses its 4 KiB page          fatal
an extra of type 0 or >= XEN_NETIF_EXTRA_TYPE_MAX          fatal
a GSO extra of size 0, of an unknown type, or of a type
  the backend did not offer (``feature-gso-tcpv4/6``)      fatal
a chain still open when the batch ends                     fatal
========================================================  ==========

The limits count slots after the first, as netback does against
XEN_NETBK_LEGACY_SLOTS_MAX = XEN_NETIF_NR_SLOTS_MIN: a packet of 1 + 18
data slots is taken, as every Linux frontend expects.  The GSO-offer check
is xmp's own (netback offers both kinds and never looks): using a feature
not offered is a broken protocol, so it is fatal like a bad GSO type.  As
netback, a hash extra of an unknown hash type is ignored, a later extra of
a type seen already replaces it, and a multicast dummy is answered without
following its ``more_data``.  A chain is published whole by every
frontend (netfront pushes after the last slot), so an incomplete one at
:meth:`TxAssembler.end_of_batch` is fatal ("Missing extra info" / "Asked
for N slots" in netback).

Theory of operation, rx.  The frontend posts empty pages (rx requests);
:class:`RxBuilder` lays a frame into them fully packed, 4 KiB per slot at
offset 0 (netback since it always coalesces), the extras (GSO, then hash)
in the slots right after the first, and writes each response into the
slot of the request it consumed -- netfront finds responses by slot, not
id, and an extra overwrites its slot's id.  A frame it cannot deliver
(too few posted slots, sg or GSO the frontend did not ask for, too big or
too small) is dropped and counted, never queued without bound (XSA-392).
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from xmp.drivers.net.protocol import (
    _XEN_NETIF_CTRL_HASH_TYPE_IPV6_TCP,
    ETH_HLEN,
    PAGE_SIZE,
    TX_SLOT_SIZE,
    XEN_NETIF_EXTRA_FLAG_MORE,
    XEN_NETIF_EXTRA_TYPE_GSO,
    XEN_NETIF_EXTRA_TYPE_HASH,
    XEN_NETIF_EXTRA_TYPE_MAX,
    XEN_NETIF_EXTRA_TYPE_MCAST_ADD,
    XEN_NETIF_EXTRA_TYPE_MCAST_DEL,
    XEN_NETIF_GSO_TYPE_TCPV4,
    XEN_NETIF_GSO_TYPE_TCPV6,
    XEN_NETIF_NR_SLOTS_MIN,
    ExtraInfo,
    GsoExtra,
    HashExtra,
    McastExtra,
    NetifStatus,
    NETRXF_csum_blank,
    NETRXF_data_validated,
    NETRXF_extra_info,
    NETRXF_more_data,
    NETTXF_csum_blank,
    NETTXF_data_validated,
    NETTXF_extra_info,
    NETTXF_more_data,
    RxRequest,
    RxResponse,
    TxRequest,
    TxResponse,
    parse_extra,
    with_flags,
)
from xmp.errors import LocalError

FATAL_TX_SLOTS = 20     # netback's fatal_skb_slots default (FATAL_SKB_SLOTS_DEFAULT)
GSO_FEATURE = {XEN_NETIF_GSO_TYPE_TCPV4: "feature-gso-tcpv4", XEN_NETIF_GSO_TYPE_TCPV6: "feature-gso-tcpv6"}

_TX = struct.Struct("<IHHHH")     # struct netif_tx_request, as in protocol


def _responses(ids: Sequence[int], extra_count: int, status: int) -> list[TxResponse]:
    if not ids:
        return []
    return ([TxResponse(ids[0], status)] + [TxResponse(0, NetifStatus.NULL)] * extra_count
            + [TxResponse(i, status) for i in ids[1:]])


_TX_RSP_SLOT = struct.Struct("<Hh8x")     # a tx response filling its 12-byte slot
_NULL_SLOT = _TX_RSP_SLOT.pack(0, NetifStatus.NULL)


def _pack_responses(ids: Sequence[int], extra_count: int, status: int) -> bytes:
    # The hot path's twin of _responses: bytes straight for BackRing.put_responses.
    if not ids:
        return b""
    rsp = _TX_RSP_SLOT.pack
    return (rsp(ids[0], status) + _NULL_SLOT * extra_count
            + b"".join([rsp(i, status) for i in ids[1:]]))


@dataclass(frozen=True)
class TxPiece:
    """``length`` bytes at ``offset`` of the page granted as ``gref``."""

    gref: int
    offset: int
    length: int


@dataclass(frozen=True)
class TxPacket:
    """A well-formed packet: its bytes are the pieces, in order."""

    ids: tuple[int, ...]            # the data slots' ids, first slot first
    extra_count: int
    pieces: tuple[TxPiece, ...]
    flags: int                      # the first slot's NETTXF_*
    gso: GsoExtra | None = None
    hash: HashExtra | None = None

    @property
    def size(self) -> int:
        return sum(p.length for p in self.pieces)

    @property
    def slots(self) -> int:
        return len(self.ids) + self.extra_count

    @property
    def csum_blank(self) -> bool:
        return bool(self.flags & NETTXF_csum_blank)

    @property
    def data_validated(self) -> bool:
        return bool(self.flags & NETTXF_data_validated)

    def responses(self, status: int = NetifStatus.OKAY) -> list[TxResponse]:
        return _responses(self.ids, self.extra_count, status)

    def pack_responses(self, status: int = NetifStatus.OKAY) -> bytes:
        return _pack_responses(self.ids, self.extra_count, status)


@dataclass(frozen=True)
class TxMcast:
    """A multicast filter change; answer with :meth:`responses`."""

    extra: McastExtra
    id: int
    extra_count: int

    @property
    def slots(self) -> int:
        return 1 + self.extra_count

    def responses(self, status: int = NetifStatus.OKAY) -> list[TxResponse]:
        return _responses((self.id,), self.extra_count, status)

    def pack_responses(self, status: int = NetifStatus.OKAY) -> bytes:
        return _pack_responses((self.id,), self.extra_count, status)


@dataclass(frozen=True)
class TxReject:
    """A packet refused: answer every slot with ``status``; if ``fatal``,
    disable the vif (there is no point answering then, but no harm)."""

    reason: str
    ids: tuple[int, ...]
    extra_count: int
    fatal: bool
    status: int = NetifStatus.ERROR

    @property
    def slots(self) -> int:
        return len(self.ids) + self.extra_count

    def responses(self) -> list[TxResponse]:
        return _responses(self.ids, self.extra_count, self.status)

    def pack_responses(self) -> bytes:
        return _pack_responses(self.ids, self.extra_count, self.status)


TxDecision = TxPacket | TxMcast | TxReject

_FIRST, _EXTRA, _MORE = 0, 1, 2


class TxAssembler:
    """Groups tx slots into packets and judges them (see the module doc).

    ``gso_types`` are the XEN_NETIF_GSO_TYPE_* the backend advertised with
    ``feature-gso-tcpv4/6``.  After a fatal decision the assembler refuses
    more input until :meth:`reset` (the vif reconnects).
    """

    def __init__(self, *, gso_types: frozenset[int] = frozenset(),
                 max_tx_slots: int = XEN_NETIF_NR_SLOTS_MIN, fatal_tx_slots: int = FATAL_TX_SLOTS):
        if not 1 <= max_tx_slots <= fatal_tx_slots:
            raise LocalError(f"want 1 <= max_tx_slots ({max_tx_slots}) <= fatal_tx_slots ({fatal_tx_slots})")
        if not gso_types <= set(GSO_FEATURE):
            raise LocalError(f"unknown GSO types {sorted(gso_types - set(GSO_FEATURE))}")
        self.gso_types = gso_types
        self.max_tx_slots = max_tx_slots
        self.fatal_tx_slots = fatal_tx_slots
        self.disabled = False
        self._start()

    def reset(self) -> None:
        """Forget any partial packet and a fatal error: a fresh ring."""
        self.disabled = False
        self._start()

    @property
    def pending(self) -> int:
        """Slots of an unfinished packet held for the next :meth:`feed`."""
        if self._state == _FIRST:
            return 0
        return len(self._ids) + self._extra_count

    def _start(self) -> None:
        self._state = _FIRST
        self._first: TxRequest | None = None
        self._ids: list[int] = []
        self._pieces: list[TxPiece] = []
        self._extras: dict[int, ExtraInfo] = {}
        self._extra_count = 0
        self._remaining = 0
        self._drop: str | None = None

    def feed(self, slots: bytes | bytearray | memoryview) -> list[TxDecision]:
        """Take whole tx slots (12 bytes each, ring order); return the
        decisions for the packets they complete."""
        if self.disabled:
            raise LocalError("the vif was disabled by a fatal tx error: reset() it first")
        if len(slots) % TX_SLOT_SIZE:
            raise LocalError(f"{len(slots)} bytes is not a whole number of {TX_SLOT_SIZE}-byte tx slots")
        data = slots if isinstance(slots, bytes) else bytes(slots)  # one private copy
        out: list[TxDecision] = []
        for off in range(0, len(data), TX_SLOT_SIZE):
            decision = self._slot(data, off)
            if decision is not None:
                out.append(decision)
                if isinstance(decision, TxReject) and decision.fatal:
                    self.disabled = True
                    break
        return out

    def end_of_batch(self) -> TxReject | None:
        """Call when the ring holds no more requests: a packet still open
        is the frontend's fault, and fatal."""
        if self._state == _FIRST or self.disabled:
            return None
        what = "extra info" if self._state == _EXTRA else "slots (NETTXF_more_data)"
        decision = self._fatal(f"packet incomplete when the batch ended: missing {what}")
        self.disabled = True
        return decision

    # -- one slot ---------------------------------------------------------------

    def _slot(self, data: bytes, off: int) -> TxDecision | None:
        if self._state == _EXTRA:
            return self._extra(data, off)
        gref, offset, flags, req_id, size = _TX.unpack_from(data, off)
        if self._state == _FIRST:
            if not flags & (NETTXF_more_data | NETTXF_extra_info) and size >= ETH_HLEN \
                    and offset + size <= PAGE_SIZE:
                # The common packet, one slot and good: skip the chain bookkeeping.
                return TxPacket((req_id,), 0, (TxPiece(gref, offset, size),), flags)
            self._first = TxRequest(gref, offset, flags, req_id, size)
            self._ids.append(req_id)
            self._remaining = size
            if flags & NETTXF_extra_info:
                self._state = _EXTRA
                return None
            return self._after_extras()
        return self._more(TxRequest(gref, offset, flags, req_id, size))

    def _extra(self, data: bytes, off: int) -> TxDecision | None:
        self._extra_count += 1
        etype, eflags = data[off], data[off + 1]
        if etype == 0 or etype >= XEN_NETIF_EXTRA_TYPE_MAX:
            return self._fatal(f"invalid extra info type {etype}")
        self._extras[etype] = parse_extra(data[off:off + TX_SLOT_SIZE])
        if eflags & XEN_NETIF_EXTRA_FLAG_MORE:
            return None
        return self._after_extras()

    def _after_extras(self) -> TxDecision | None:
        first = self._first
        assert first is not None
        mcast = self._extras.get(XEN_NETIF_EXTRA_TYPE_MCAST_ADD) or self._extras.get(
            XEN_NETIF_EXTRA_TYPE_MCAST_DEL)
        if isinstance(mcast, McastExtra):
            decision = TxMcast(mcast, first.id, self._extra_count)
            self._start()
            return decision
        if first.flags & NETTXF_more_data:
            self._state = _MORE
            return None
        return self._finish()

    def _more(self, txp: TxRequest) -> TxDecision | None:
        n = len(self._ids) - 1          # slots after the first read so far
        if n >= self.fatal_tx_slots:
            return self._fatal(f"more than {self.fatal_tx_slots} slots after the first")
        if self._drop is None and n >= self.max_tx_slots:
            self._drop = f"more than {self.max_tx_slots} slots after the first"
        if self._drop is None and txp.size > self._remaining:
            self._drop = (f"slot id {txp.id}: size {txp.size} exceeds the {self._remaining} bytes "
                          "the first slot's size leaves")
        self._ids.append(txp.id)
        self._remaining = (self._remaining - txp.size) & 0xFFFF
        if txp.offset + txp.size > PAGE_SIZE:
            return self._fatal(f"slot id {txp.id}: {txp.size} bytes at offset {txp.offset} "
                               f"cross the {PAGE_SIZE}-byte page")
        self._pieces.append(TxPiece(txp.gref, txp.offset, txp.size))
        if txp.flags & NETTXF_more_data:
            return None
        return self._finish()

    def _finish(self) -> TxDecision:
        first = self._first
        assert first is not None
        if self._drop is not None:
            return self._reject(self._drop)
        own = self._remaining
        if own < ETH_HLEN:
            return self._reject(f"first slot id {first.id} carries {own} bytes, less than an "
                                f"Ethernet header ({ETH_HLEN})")
        if first.offset + own > PAGE_SIZE:
            return self._fatal(f"first slot id {first.id}: {own} bytes at offset {first.offset} "
                               f"cross the {PAGE_SIZE}-byte page")
        gso = self._extras.get(XEN_NETIF_EXTRA_TYPE_GSO)
        if isinstance(gso, GsoExtra):
            if gso.size == 0:
                return self._fatal("GSO extra with size 0")
            if gso.gso_type not in GSO_FEATURE:
                return self._fatal(f"bad GSO type {gso.gso_type}")
            if gso.gso_type not in self.gso_types:
                return self._fatal(f"GSO type {gso.gso_type} used, but the backend did not offer "
                                   f"{GSO_FEATURE[gso.gso_type]}")
        else:
            gso = None
        hsh = self._extras.get(XEN_NETIF_EXTRA_TYPE_HASH)
        if not isinstance(hsh, HashExtra) or hsh.hash_type > _XEN_NETIF_CTRL_HASH_TYPE_IPV6_TCP:
            hsh = None
        pieces = (TxPiece(first.gref, first.offset, own), *self._pieces)
        packet = TxPacket(tuple(self._ids), self._extra_count, pieces, first.flags, gso, hsh)
        self._start()
        return packet

    def _reject(self, reason: str) -> TxReject:
        decision = TxReject(reason, tuple(self._ids), self._extra_count, fatal=False)
        self._start()
        return decision

    def _fatal(self, reason: str) -> TxReject:
        decision = TxReject(reason, tuple(self._ids), self._extra_count, fatal=True)
        self._start()
        return decision


# -- rx ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RxCopy:
    """Copy ``length`` frame bytes from ``frame_offset`` into the page
    granted as ``gref`` at ``offset``."""

    gref: int
    offset: int
    frame_offset: int
    length: int


@dataclass(frozen=True)
class RxPlan:
    """How to deliver one frame: do the copies, then write ``responses``
    (one per consumed request, in the same slots) and push."""

    consumed: int
    copies: tuple[RxCopy, ...]
    responses: tuple[RxResponse | ExtraInfo, ...]

    def pack_responses(self) -> bytes:
        return b"".join(r.pack() for r in self.responses)

    def with_errors(self, failed: Iterable[int]) -> RxPlan:
        """The plan after the copies numbered ``failed`` did not happen (a
        bad gref): their slots answer NETIF_RSP_ERROR, as netback's
        ``xenvif_rx_copy_flush`` does, and netfront drops the frame."""
        bad = set(failed)
        if not bad <= set(range(len(self.copies))):
            raise LocalError(f"copies {sorted(bad)} not all in 0..{len(self.copies) - 1}")
        out: list[RxResponse | ExtraInfo] = []
        n = 0
        for r in self.responses:
            if isinstance(r, RxResponse):
                if n in bad:
                    r = RxResponse(r.id, r.offset, r.flags, NetifStatus.ERROR)
                n += 1
            out.append(r)
        return RxPlan(self.consumed, self.copies, tuple(out))


@dataclass(frozen=True)
class RxDrop:
    """A frame not delivered (counted in :attr:`RxBuilder.dropped`)."""

    reason: str
    status: int = NetifStatus.DROPPED


RX_MAX_DATA_SLOTS = XEN_NETIF_NR_SLOTS_MIN   # netfront takes no more per packet


def rx_slots_needed(frame_len: int, *, gso: bool = False, hash: bool = False) -> int:
    """Posted rx requests a frame of ``frame_len`` bytes uses."""
    return -(-frame_len // PAGE_SIZE) + gso + hash


class RxBuilder:
    """Plans rx deliveries for one vif; the frontend's features come from
    its xenstore directory: ``sg`` = feature-sg, ``gso_types`` =
    feature-gso-tcpv4/6."""

    def __init__(self, *, sg: bool = False, gso_types: frozenset[int] = frozenset()):
        if not gso_types <= set(GSO_FEATURE):
            raise LocalError(f"unknown GSO types {sorted(gso_types - set(GSO_FEATURE))}")
        self.sg = sg
        self.gso_types = gso_types
        self.delivered = 0
        self.dropped = 0

    def build(self, frame_len: int, posted: Sequence[RxRequest], *, gso: GsoExtra | None = None,
              hash: HashExtra | None = None, csum_blank: bool = False,
              data_validated: bool = False) -> RxPlan | RxDrop:
        """Plan the delivery of a ``frame_len``-byte frame into ``posted``
        (the unconsumed rx requests, ring order).  ``csum_blank`` says the
        checksum is still to be filled (it implies validated data)."""
        reason = self._refuse(frame_len, len(posted), gso, hash)
        if reason is not None:
            self.dropped += 1
            return RxDrop(reason)
        extras: list[ExtraInfo] = [e for e in (gso, hash) if e is not None]
        extras = [with_flags(e, XEN_NETIF_EXTRA_FLAG_MORE if i < len(extras) - 1 else 0)
                  for i, e in enumerate(extras)]
        flags0 = NETRXF_extra_info if extras else 0
        if csum_blank:
            flags0 |= NETRXF_csum_blank | NETRXF_data_validated
        elif data_validated:
            flags0 |= NETRXF_data_validated

        # Slot 0 takes the first 4 KiB, the extras the slots after it, then the rest.
        chunks = [(start, min(PAGE_SIZE, frame_len - start)) for start in range(0, frame_len, PAGE_SIZE)]
        layout: list[tuple[int, int] | ExtraInfo] = [chunks[0], *extras, *chunks[1:]]
        copies: list[RxCopy] = []
        responses: list[RxResponse | ExtraInfo] = []
        for req, item in zip(posted, layout, strict=False):
            if not isinstance(item, tuple):
                responses.append(item)
                continue
            start, n = item
            copies.append(RxCopy(req.gref, 0, start, n))
            flags = (flags0 if start == 0 else 0) | (NETRXF_more_data if start + n < frame_len else 0)
            responses.append(RxResponse(req.id, 0, flags, n))
        self.delivered += 1
        return RxPlan(len(layout), tuple(copies), tuple(responses))

    def _refuse(self, frame_len: int, nposted: int, gso: GsoExtra | None,
                hsh: HashExtra | None) -> str | None:
        if frame_len < ETH_HLEN:
            return f"frame of {frame_len} bytes is shorter than an Ethernet header"
        data_slots = -(-frame_len // PAGE_SIZE)
        if data_slots > RX_MAX_DATA_SLOTS:
            return f"frame of {frame_len} bytes needs {data_slots} slots; frontends take {RX_MAX_DATA_SLOTS}"
        if data_slots > 1 and not self.sg:
            return f"frame of {frame_len} bytes needs {data_slots} slots and the frontend has no feature-sg"
        if gso is not None:
            if gso.gso_type not in self.gso_types:
                name = GSO_FEATURE.get(gso.gso_type, f"GSO type {gso.gso_type}")
                return f"GSO frame and the frontend did not ask for {name}"
            if gso.size == 0:
                raise LocalError("a GSO extra needs a non-zero size (the MSS)")
        needed = rx_slots_needed(frame_len, gso=gso is not None, hash=hsh is not None)
        if nposted < needed:
            return f"frame needs {needed} rx slots, the frontend posted {nposted}"
        return None


def flow_hash(frame: bytes) -> int:
    """A frame's flow, as a number: its MACs, and for IPv4 its addresses
    and (TCP/UDP) ports -- frames of one flow always hash alike."""
    key = frame[:12]
    if frame[12:14] == b"\x08\x00" and len(frame) >= 34:
        ihl = (frame[14] & 0x0F) * 4
        key += frame[26:34] + frame[14 + ihl:18 + ihl]
    return zlib.crc32(key)


def pack_tx_responses(responses: Sequence[TxResponse]) -> bytes:
    """Responses as whole tx slots, ready for ``BackRing.put_responses``."""
    return b"".join(r.pack() for r in responses)

