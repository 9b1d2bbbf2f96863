"""netif's wire format, sans I/O, as in ``xen/include/public/io/netif.h``
(x86-64 ABI: natural alignment, little-endian).

A vif has two rings per queue, each ``DEFINE_RING_TYPES`` over one page:
tx (guest -> backend) and rx (backend -> guest).  A slot is the union of
the ring's request and response, so a tx slot is 12 bytes and an rx slot
8; both one-page rings round (4096 - 64) / slot down to 256 slots.
Offsets::

    struct netif_tx_request                    (12 bytes, the tx slot)
      0  u32  gref     4  u16 offset (in the granted page)
      6  u16  flags    NETTXF_*
      8  u16  id       echoed in the response
     10  u16  size     first slot of a packet: the whole packet;
                       later slots: that slot's own bytes

    struct netif_tx_response                   (4 bytes; 8 unused in the slot)
      0  u16  id       2  i16 status   NETIF_RSP_*

    struct netif_rx_request                    (8 bytes, the rx slot)
      0  u16  id       2  2 bytes padding      4  u32 gref

    struct netif_rx_response                   (8 bytes)
      0  u16  id       2  u16 offset   4  u16 flags NETRXF_*
      6  i16  status   > 0: bytes in this slot; < 0: NETIF_RSP_*

    struct netif_extra_info                    (8 bytes; in a tx slot 4 more unused)
      0  u8   type     XEN_NETIF_EXTRA_TYPE_*   1  u8 flags XEN_NETIF_EXTRA_FLAG_*
      2  union of 6 bytes:
           gso:   +2 u16 size (the MSS)  +4 u8 type (XEN_NETIF_GSO_TYPE_*)
                  +5 u8 padding          +6 u16 features
           mcast: +2 u8 addr[6]
           hash:  +2 u8 type (_XEN_NETIF_CTRL_HASH_TYPE_*)  +3 u8 algorithm
                  +4 u32 value (little-endian)

An extra-info slot overlays a request (tx) or a response (rx) and follows
the first data slot of its packet.  Every ``pack`` builds its bytes from
zero and fills the whole slot, so nothing the backend did not mean to
write reaches the guest.  The tx packet assembler and the rx response
builder live in :mod:`xmp.drivers.net.packets`.
"""

from __future__ import annotations

import struct
from dataclasses import asdict, dataclass
from enum import IntEnum

from xmp.errors import LocalError, RemoteProtocolError

PAGE_SIZE = 4096
ETH_HLEN = 14               # an Ethernet header: the least a packet's first slot carries
_RING_HEADER = 64           # io/ring.h: four indices, the private union, padding


class NetifStatus(IntEnum):
    """NETIF_RSP_*: a tx response's status, an rx response's when negative."""

    DROPPED = -2
    ERROR = -1
    OKAY = 0
    NULL = 1                 # the answer in an extra-info slot: "no response"


NETIF_RSP_DROPPED = NetifStatus.DROPPED
NETIF_RSP_ERROR = NetifStatus.ERROR
NETIF_RSP_OKAY = NetifStatus.OKAY
NETIF_RSP_NULL = NetifStatus.NULL

# tx request flags
NETTXF_csum_blank = 1 << 0       # the protocol checksum is left to the receiver
NETTXF_data_validated = 1 << 1   # the checksum was verified already
NETTXF_more_data = 1 << 2        # the packet continues in the next slot
NETTXF_extra_info = 1 << 3       # extra-info slots follow this (first) slot

# rx response flags (not the same bit order as tx)
NETRXF_data_validated = 1 << 0
NETRXF_csum_blank = 1 << 1
NETRXF_more_data = 1 << 2
NETRXF_extra_info = 1 << 3
NETRXF_gso_prefix = 1 << 4       # deprecated; never set by xmp

XEN_NETIF_EXTRA_TYPE_NONE = 0    # never valid on the wire
XEN_NETIF_EXTRA_TYPE_GSO = 1
XEN_NETIF_EXTRA_TYPE_MCAST_ADD = 2
XEN_NETIF_EXTRA_TYPE_MCAST_DEL = 3
XEN_NETIF_EXTRA_TYPE_HASH = 4
XEN_NETIF_EXTRA_TYPE_MAX = 5
XEN_NETIF_EXTRA_FLAG_MORE = 1 << 0

XEN_NETIF_GSO_TYPE_NONE = 0
XEN_NETIF_GSO_TYPE_TCPV4 = 1
XEN_NETIF_GSO_TYPE_TCPV6 = 2

# Hash types are bit numbers in the extra (the ctrl ring uses 1 << n).
_XEN_NETIF_CTRL_HASH_TYPE_IPV4 = 0
_XEN_NETIF_CTRL_HASH_TYPE_IPV4_TCP = 1
_XEN_NETIF_CTRL_HASH_TYPE_IPV6 = 2
_XEN_NETIF_CTRL_HASH_TYPE_IPV6_TCP = 3
XEN_NETIF_CTRL_HASH_ALGORITHM_NONE = 0
XEN_NETIF_CTRL_HASH_ALGORITHM_TOEPLITZ = 1

XEN_NETIF_NR_SLOTS_MIN = 18      # slots per packet every backend must take
XEN_NETIF_MAX_TX_SIZE = 0xFFFF   # a tx packet's size is a u16

# -- xenstore keys (docs/misc/xenstore-paths.pandoc points at netif.h) ---------

# Written by both ends, each saying what it can *receive*: a backend's
# feature-sg / feature-gso-* is what it takes on tx, a frontend's what it
# takes on rx.
FEATURE_SG = "feature-sg"
FEATURE_GSO_TCPV4 = "feature-gso-tcpv4"
FEATURE_GSO_TCPV6 = "feature-gso-tcpv6"
# Backend (backend/vif/<domid>/<devid>/).  feature-rx-copy is not in
# netif.h: it is Linux netback's and mirage-net-xen's (rx by grant copy,
# the only rx mode xmp has; rx-flip page transfer is long gone).
FEATURE_RX_COPY = "feature-rx-copy"
FEATURE_RX_FLIP = "feature-rx-flip"
FEATURE_SPLIT_EVENT_CHANNELS = "feature-split-event-channels"
FEATURE_MULTICAST_CONTROL = "feature-multicast-control"
FEATURE_DYNAMIC_MULTICAST_CONTROL = "feature-dynamic-multicast-control"
FEATURE_CTRL_RING = "feature-ctrl-ring"
FEATURE_NO_CSUM_OFFLOAD = "feature-no-csum-offload"
FEATURE_IPV6_CSUM_OFFLOAD = "feature-ipv6-csum-offload"
MULTI_QUEUE_MAX_QUEUES = "multi-queue-max-queues"
# Frontend (device/vif/<devid>/, or its queue-N/ subdirectory for the
# rings and channels once two or more queues are asked for).
REQUEST_RX_COPY = "request-rx-copy"
FEATURE_RX_NOTIFY = "feature-rx-notify"
REQUEST_MULTICAST_CONTROL = "request-multicast-control"
MULTI_QUEUE_NUM_QUEUES = "multi-queue-num-queues"
TX_RING_REF = "tx-ring-ref"
RX_RING_REF = "rx-ring-ref"
EVENT_CHANNEL = "event-channel"
EVENT_CHANNEL_TX = "event-channel-tx"
EVENT_CHANNEL_RX = "event-channel-rx"
CTRL_RING_REF = "ctrl-ring-ref"
EVENT_CHANNEL_CTRL = "event-channel-ctrl"
# Written by the toolstack (libxl_nic.c) in the two directories.
MAC = "mac"
HANDLE = "handle"
BRIDGE = "bridge"
SCRIPT = "script"
MTU = "mtu"                      # frontend dir; absent means 1500
IP = "ip"
RATE = "rate"                    # "<bytes per interval>,<interval usecs>"
DEFAULT_MTU = 1500


def queue_dir(n: int) -> str:
    """The subdirectory of queue ``n`` (``queue-0``, ``queue-1``, …)."""
    if n < 0:
        raise LocalError(f"queue {n}: queues are numbered from 0")
    return f"queue-{n}"


# -- layouts ---------------------------------------------------------------------

_TX_REQUEST = struct.Struct("<IHHHH")
_TX_RESPONSE = struct.Struct("<Hh")
_RX_REQUEST = struct.Struct("<H2xI")
_RX_RESPONSE = struct.Struct("<HHHh")
_EXTRA_HEAD = struct.Struct("<BB")
_EXTRA_GSO = struct.Struct("<BBHBxH")
_EXTRA_MCAST = struct.Struct("<BB6s")
_EXTRA_HASH = struct.Struct("<BBBBI")

TX_REQUEST_SIZE = _TX_REQUEST.size                   # 12
TX_RESPONSE_SIZE = _TX_RESPONSE.size                 # 4
RX_REQUEST_SIZE = _RX_REQUEST.size                   # 8
RX_RESPONSE_SIZE = _RX_RESPONSE.size                 # 8
EXTRA_INFO_SIZE = _EXTRA_GSO.size                    # 8
TX_SLOT_SIZE = max(TX_REQUEST_SIZE, TX_RESPONSE_SIZE)
RX_SLOT_SIZE = max(RX_REQUEST_SIZE, RX_RESPONSE_SIZE)


def const_ring_size(slot_size: int, ring_page_order: int = 0) -> int:
    """``__CONST_RING_SIZE``: slots in a ring of ``4096 << order`` bytes
    after the 64-byte header, rounded down to a power of two."""
    fit = ((PAGE_SIZE << ring_page_order) - _RING_HEADER) // slot_size
    if fit < 1:
        raise LocalError(f"no {slot_size}-byte slot fits a ring of order {ring_page_order}")
    return 1 << (fit.bit_length() - 1)


NET_TX_RING_SIZE = const_ring_size(TX_SLOT_SIZE)     # 256
NET_RX_RING_SIZE = const_ring_size(RX_SLOT_SIZE)     # 256


def _pack(st: struct.Struct, slot: int, *fields: int | bytes) -> bytes:
    try:
        body = st.pack(*fields)
    except struct.error as e:
        raise LocalError(f"field out of range for netif: {e}") from None
    return body.ljust(slot, b"\0")


def _need(buf: bytes | bytearray | memoryview, size: int, what: str) -> bytes:
    if len(buf) < size:
        raise LocalError(f"a netif {what} is {size} bytes, not {len(buf)}")
    return bytes(buf[:size])  # one private copy


@dataclass(frozen=True)
class TxRequest:
    """struct netif_tx_request."""

    gref: int
    offset: int
    flags: int
    id: int
    size: int

    def pack(self) -> bytes:
        return _pack(_TX_REQUEST, TX_SLOT_SIZE, self.gref, self.offset, self.flags, self.id, self.size)


@dataclass(frozen=True)
class TxResponse:
    """struct netif_tx_response; packs to the whole 12-byte tx slot, the
    8 bytes after the status zeroed (create the back ring with
    ``rsp_size=TX_SLOT_SIZE`` so none of the request stays behind)."""

    id: int
    status: int

    def pack(self) -> bytes:
        return _pack(_TX_RESPONSE, TX_SLOT_SIZE, self.id, int(self.status))


@dataclass(frozen=True)
class RxRequest:
    """struct netif_rx_request: a page the frontend posts for the backend to fill."""

    id: int
    gref: int

    def pack(self) -> bytes:
        return _pack(_RX_REQUEST, RX_SLOT_SIZE, self.id, self.gref)


@dataclass(frozen=True)
class RxResponse:
    """struct netif_rx_response; ``status`` is the slot's byte count or a
    negative NETIF_RSP_*."""

    id: int
    offset: int
    flags: int
    status: int

    def pack(self) -> bytes:
        return _pack(_RX_RESPONSE, RX_SLOT_SIZE, self.id, self.offset, self.flags, int(self.status))


@dataclass(frozen=True)
class GsoExtra:
    """XEN_NETIF_EXTRA_TYPE_GSO: segment the packet into ``size``-byte
    (MSS) TCP segments of ``gso_type``."""

    gso_type: int
    size: int
    features: int = 0
    flags: int = 0

    type = XEN_NETIF_EXTRA_TYPE_GSO

    def pack(self, slot: int = RX_SLOT_SIZE) -> bytes:
        return _pack(_EXTRA_GSO, slot, self.type, self.flags, self.size, self.gso_type, self.features)


@dataclass(frozen=True)
class McastExtra:
    """XEN_NETIF_EXTRA_TYPE_MCAST_ADD / _DEL: a multicast filter change,
    sent on a dummy tx request."""

    add: bool
    addr: bytes
    flags: int = 0

    @property
    def type(self) -> int:
        return XEN_NETIF_EXTRA_TYPE_MCAST_ADD if self.add else XEN_NETIF_EXTRA_TYPE_MCAST_DEL

    def pack(self, slot: int = RX_SLOT_SIZE) -> bytes:
        if len(self.addr) != 6:
            raise LocalError(f"a multicast address is 6 bytes, not {len(self.addr)}")
        return _pack(_EXTRA_MCAST, slot, self.type, self.flags, bytes(self.addr))


@dataclass(frozen=True)
class HashExtra:
    """XEN_NETIF_EXTRA_TYPE_HASH: the packet's hash ``value`` of kind
    ``hash_type`` (a _XEN_NETIF_CTRL_HASH_TYPE_* bit number)."""

    hash_type: int
    algorithm: int
    value: int
    flags: int = 0

    type = XEN_NETIF_EXTRA_TYPE_HASH

    def pack(self, slot: int = RX_SLOT_SIZE) -> bytes:
        return _pack(_EXTRA_HASH, slot, self.type, self.flags, self.hash_type, self.algorithm,
                     self.value)


ExtraInfo = GsoExtra | McastExtra | HashExtra


def with_flags(extra: ExtraInfo, flags: int) -> ExtraInfo:
    """``extra`` with its XEN_NETIF_EXTRA_FLAG_* replaced."""
    if isinstance(extra, McastExtra):
        return McastExtra(extra.add, extra.addr, flags)
    if isinstance(extra, GsoExtra):
        return GsoExtra(extra.gso_type, extra.size, extra.features, flags)
    return HashExtra(extra.hash_type, extra.algorithm, extra.value, flags)


# -- decoding ------------------------------------------------------------------------


def parse_tx_request(buf: bytes | bytearray | memoryview) -> TxRequest:
    """Decode a tx slot as a request (no checks: see the assembler)."""
    return TxRequest(*_TX_REQUEST.unpack(_need(buf, TX_REQUEST_SIZE, "tx request")))


def parse_rx_request(buf: bytes | bytearray | memoryview) -> RxRequest:
    return RxRequest(*_RX_REQUEST.unpack(_need(buf, RX_REQUEST_SIZE, "rx request")))


def parse_tx_response(buf: bytes | bytearray | memoryview) -> TxResponse:
    """Decode a tx response written by the backend (the frontend's side)."""
    rsp_id, status = _TX_RESPONSE.unpack(_need(buf, TX_RESPONSE_SIZE, "tx response"))
    if status not in _KNOWN_STATUS:
        raise RemoteProtocolError(f"netif tx response id {rsp_id}: unknown status {status}")
    return TxResponse(rsp_id, status)


def parse_rx_response(buf: bytes | bytearray | memoryview) -> RxResponse:
    """Decode an rx response written by the backend.  A data slot must lie
    inside its page (netfront's check); a negative status must be a known
    NETIF_RSP_*."""
    rsp = RxResponse(*_RX_RESPONSE.unpack(_need(buf, RX_RESPONSE_SIZE, "rx response")))
    if rsp.status < 0 and rsp.status not in _KNOWN_STATUS:
        raise RemoteProtocolError(f"netif rx response id {rsp.id}: unknown status {rsp.status}")
    if rsp.status > 0 and rsp.offset + rsp.status > PAGE_SIZE:
        raise RemoteProtocolError(f"netif rx response id {rsp.id}: {rsp.status} bytes at offset "
                                  f"{rsp.offset} cross the {PAGE_SIZE}-byte page")
    return rsp


_KNOWN_STATUS = frozenset(int(s) for s in NetifStatus)


def extra_type_and_flags(buf: bytes | bytearray | memoryview) -> tuple[int, int]:
    """The type and flags bytes of an extra-info slot."""
    return _EXTRA_HEAD.unpack(_need(buf, 2, "extra info"))


def parse_extra(buf: bytes | bytearray | memoryview) -> ExtraInfo:
    """Decode an extra-info slot; a type outside 1..4 raises
    :class:`RemoteProtocolError` (whoever wrote it broke the protocol)."""
    data = _need(buf, EXTRA_INFO_SIZE, "extra info")
    etype, flags = _EXTRA_HEAD.unpack_from(data)
    if etype == XEN_NETIF_EXTRA_TYPE_GSO:
        _, _, size, gso_type, features = _EXTRA_GSO.unpack(data)
        return GsoExtra(gso_type, size, features, flags)
    if etype in (XEN_NETIF_EXTRA_TYPE_MCAST_ADD, XEN_NETIF_EXTRA_TYPE_MCAST_DEL):
        return McastExtra(etype == XEN_NETIF_EXTRA_TYPE_MCAST_ADD, _EXTRA_MCAST.unpack(data)[2], flags)
    if etype == XEN_NETIF_EXTRA_TYPE_HASH:
        _, _, hash_type, algorithm, value = _EXTRA_HASH.unpack(data)
        return HashExtra(hash_type, algorithm, value, flags)
    raise RemoteProtocolError(f"netif extra info of unknown type {etype}")


@dataclass
class IfStats:
    """One interface's counters, as ``ip -s link`` shows them: netback keeps
    one per vif (tx: what the guest sent), netfront one for its eth."""

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
