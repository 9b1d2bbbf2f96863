"""netif's wire format: struct layouts byte by byte against the offsets of
xen/include/public/io/netif.h (x86-64), ring sizes against ring.py's
__RING_SIZE, round trips, zeroed padding, and a hostile backend's
responses refused."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from xmp.drivers.net import protocol as p
from xmp.drivers.net.protocol import (
    EXTRA_INFO_SIZE,
    NET_RX_RING_SIZE,
    NET_TX_RING_SIZE,
    RX_REQUEST_SIZE,
    RX_RESPONSE_SIZE,
    RX_SLOT_SIZE,
    TX_REQUEST_SIZE,
    TX_RESPONSE_SIZE,
    TX_SLOT_SIZE,
    GsoExtra,
    HashExtra,
    McastExtra,
    NetifStatus,
    RxRequest,
    RxResponse,
    TxRequest,
    TxResponse,
    const_ring_size,
    parse_extra,
    parse_rx_request,
    parse_rx_response,
    parse_tx_request,
    parse_tx_response,
    queue_dir,
    with_flags,
)
from xmp.errors import LocalError, RemoteProtocolError
from xmp.sharedmem.ring import ring_nr_ents

pytestmark = pytest.mark.timeout(60)

u16s = st.integers(0, 0xFFFF)
u32s = st.integers(0, 2**32 - 1)
i16s = st.integers(-0x8000, 0x7FFF)


def u16(b: bytes, off: int) -> int:
    return struct.unpack_from("<H", b, off)[0]


def i16(b: bytes, off: int) -> int:
    return struct.unpack_from("<h", b, off)[0]


def u32(b: bytes, off: int) -> int:
    return struct.unpack_from("<I", b, off)[0]


# -- constants ---------------------------------------------------------------------


def test_constants_are_netif_h():
    assert (p.NETTXF_csum_blank, p.NETTXF_data_validated, p.NETTXF_more_data, p.NETTXF_extra_info) == \
        (1, 2, 4, 8)
    assert (p.NETRXF_data_validated, p.NETRXF_csum_blank, p.NETRXF_more_data, p.NETRXF_extra_info,
            p.NETRXF_gso_prefix) == (1, 2, 4, 8, 16)
    assert (p.XEN_NETIF_EXTRA_TYPE_NONE, p.XEN_NETIF_EXTRA_TYPE_GSO, p.XEN_NETIF_EXTRA_TYPE_MCAST_ADD,
            p.XEN_NETIF_EXTRA_TYPE_MCAST_DEL, p.XEN_NETIF_EXTRA_TYPE_HASH,
            p.XEN_NETIF_EXTRA_TYPE_MAX) == (0, 1, 2, 3, 4, 5)
    assert p.XEN_NETIF_EXTRA_FLAG_MORE == 1
    assert (p.XEN_NETIF_GSO_TYPE_NONE, p.XEN_NETIF_GSO_TYPE_TCPV4, p.XEN_NETIF_GSO_TYPE_TCPV6) == (0, 1, 2)
    assert (p.NETIF_RSP_DROPPED, p.NETIF_RSP_ERROR, p.NETIF_RSP_OKAY, p.NETIF_RSP_NULL) == (-2, -1, 0, 1)
    assert [int(s) for s in NetifStatus] == [-2, -1, 0, 1]
    assert p.XEN_NETIF_NR_SLOTS_MIN == 18 and p.XEN_NETIF_MAX_TX_SIZE == 0xFFFF
    assert (p._XEN_NETIF_CTRL_HASH_TYPE_IPV4, p._XEN_NETIF_CTRL_HASH_TYPE_IPV4_TCP,
            p._XEN_NETIF_CTRL_HASH_TYPE_IPV6, p._XEN_NETIF_CTRL_HASH_TYPE_IPV6_TCP) == (0, 1, 2, 3)
    assert p.XEN_NETIF_CTRL_HASH_ALGORITHM_TOEPLITZ == 1


def test_xenstore_key_names():
    assert (p.FEATURE_SG, p.FEATURE_GSO_TCPV4, p.FEATURE_GSO_TCPV6, p.FEATURE_RX_NOTIFY) == \
        ("feature-sg", "feature-gso-tcpv4", "feature-gso-tcpv6", "feature-rx-notify")
    assert (p.REQUEST_RX_COPY, p.FEATURE_RX_COPY, p.FEATURE_SPLIT_EVENT_CHANNELS) == \
        ("request-rx-copy", "feature-rx-copy", "feature-split-event-channels")
    assert (p.MULTI_QUEUE_MAX_QUEUES, p.MULTI_QUEUE_NUM_QUEUES) == \
        ("multi-queue-max-queues", "multi-queue-num-queues")
    assert (p.TX_RING_REF, p.RX_RING_REF, p.EVENT_CHANNEL, p.EVENT_CHANNEL_TX, p.EVENT_CHANNEL_RX) == \
        ("tx-ring-ref", "rx-ring-ref", "event-channel", "event-channel-tx", "event-channel-rx")
    assert (p.MAC, p.HANDLE, p.BRIDGE, p.SCRIPT, p.MTU) == ("mac", "handle", "bridge", "script", "mtu")
    assert p.DEFAULT_MTU == 1500
    assert queue_dir(0) == "queue-0" and queue_dir(7) == "queue-7"
    with pytest.raises(LocalError):
        queue_dir(-1)


# -- sizes ---------------------------------------------------------------------------


def test_struct_sizes():
    assert TX_REQUEST_SIZE == 12 and TX_RESPONSE_SIZE == 4
    assert RX_REQUEST_SIZE == 8 and RX_RESPONSE_SIZE == 8
    assert EXTRA_INFO_SIZE == 8
    # DEFINE_RING_TYPES' union: the larger of request and response.
    assert TX_SLOT_SIZE == 12 and RX_SLOT_SIZE == 8


@pytest.mark.parametrize("order", [0, 1, 2, 4, 8])
def test_ring_sizes_match_ring_py(order):
    for slot in (TX_SLOT_SIZE, RX_SLOT_SIZE):
        assert const_ring_size(slot, order) == ring_nr_ents(4096 << order, slot)


def test_one_page_rings_have_256_slots():
    # (4096 - 64) / 12 = 336 and / 8 = 504, both rounded down to 256.
    assert NET_TX_RING_SIZE == 256 and NET_RX_RING_SIZE == 256


# -- layouts, byte by byte --------------------------------------------------------


def test_tx_request_layout():
    b = TxRequest(0xA1B2C3D4, 0x0102, 0x000F, 0x0304, 0x0506).pack()
    assert len(b) == 12
    assert u32(b, 0) == 0xA1B2C3D4 and u16(b, 4) == 0x0102 and u16(b, 6) == 0x000F
    assert u16(b, 8) == 0x0304 and u16(b, 10) == 0x0506


def test_tx_response_fills_the_slot_with_zero_padding():
    b = TxResponse(0xBEEF, NetifStatus.DROPPED).pack()
    assert len(b) == TX_SLOT_SIZE
    assert u16(b, 0) == 0xBEEF and i16(b, 2) == -2
    assert b[4:] == bytes(8)


def test_rx_request_layout():
    b = RxRequest(0x1234, 0xCAFEF00D).pack()
    assert len(b) == 8
    assert u16(b, 0) == 0x1234 and b[2:4] == bytes(2) and u32(b, 4) == 0xCAFEF00D


def test_rx_response_layout():
    b = RxResponse(7, 0x20, p.NETRXF_more_data, 4000).pack()
    assert len(b) == 8
    assert (u16(b, 0), u16(b, 2), u16(b, 4), i16(b, 6)) == (7, 0x20, 4, 4000)
    b = RxResponse(7, 0, 0, NetifStatus.ERROR).pack()
    assert i16(b, 6) == -1


def test_gso_extra_layout():
    b = GsoExtra(p.XEN_NETIF_GSO_TYPE_TCPV6, 1440, 0x0102, p.XEN_NETIF_EXTRA_FLAG_MORE).pack()
    assert len(b) == 8
    assert b[0] == 1 and b[1] == 1 and u16(b, 2) == 1440 and b[4] == 2 and b[5] == 0
    assert u16(b, 6) == 0x0102
    tx = GsoExtra(p.XEN_NETIF_GSO_TYPE_TCPV4, 1448).pack(TX_SLOT_SIZE)
    assert len(tx) == 12 and tx[:8] == GsoExtra(1, 1448).pack() and tx[8:] == bytes(4)


def test_mcast_extra_layout():
    addr = bytes.fromhex("01005e000001")
    b = McastExtra(True, addr).pack(TX_SLOT_SIZE)
    assert b[0] == 2 and b[1] == 0 and b[2:8] == addr and b[8:] == bytes(4)
    assert McastExtra(False, addr).pack()[0] == 3
    with pytest.raises(LocalError):
        McastExtra(True, b"\x01\x00").pack()


def test_hash_extra_layout():
    b = HashExtra(p._XEN_NETIF_CTRL_HASH_TYPE_IPV4_TCP, p.XEN_NETIF_CTRL_HASH_ALGORITHM_TOEPLITZ,
                  0x11223344).pack()
    assert b[0] == 4 and b[1] == 0 and b[2] == 1 and b[3] == 1
    assert b[4:8] == bytes([0x44, 0x33, 0x22, 0x11])     # value: LSB first


def test_with_flags():
    assert with_flags(GsoExtra(1, 100), 1) == GsoExtra(1, 100, 0, 1)
    assert with_flags(McastExtra(True, bytes(6)), 1).flags == 1
    assert with_flags(HashExtra(0, 1, 5, 1), 0) == HashExtra(0, 1, 5, 0)


def test_out_of_range_field_is_local_error():
    with pytest.raises(LocalError, match="out of range"):
        TxRequest(0, 0, 0, 0x10000, 0).pack()
    with pytest.raises(LocalError):
        RxResponse(0, 0, 0, 0x8000).pack()
    with pytest.raises(LocalError):
        parse_tx_request(bytes(11))


# -- round trips ---------------------------------------------------------------------


@given(u32s, u16s, u16s, u16s, u16s)
def test_tx_request_round_trip(gref, offset, flags, req_id, size):
    req = TxRequest(gref, offset, flags, req_id, size)
    assert parse_tx_request(req.pack()) == req


@given(u16s, st.sampled_from(list(NetifStatus)))
def test_tx_response_round_trip(rsp_id, status):
    rsp = TxResponse(rsp_id, status)
    b = rsp.pack()
    assert b[4:] == bytes(8)
    assert parse_tx_response(b) == rsp


@given(u16s, u32s)
def test_rx_request_round_trip(req_id, gref):
    assert parse_rx_request(RxRequest(req_id, gref).pack()) == RxRequest(req_id, gref)


@given(u16s, st.integers(0, 4095), u16s, st.data())
def test_rx_response_round_trip(rsp_id, offset, flags, data):
    status = data.draw(st.one_of(st.sampled_from([-2, -1, 0]), st.integers(1, 4096 - offset)))
    rsp = RxResponse(rsp_id, offset, flags, status)
    assert parse_rx_response(rsp.pack()) == rsp


extras = st.one_of(
    st.builds(GsoExtra, st.integers(0, 255), u16s, u16s, st.integers(0, 255)),
    st.builds(McastExtra, st.booleans(), st.binary(min_size=6, max_size=6), st.integers(0, 255)),
    st.builds(HashExtra, st.integers(0, 255), st.integers(0, 255), u32s, st.integers(0, 255)),
)


@given(extras, st.sampled_from([RX_SLOT_SIZE, TX_SLOT_SIZE]))
def test_extra_round_trip(extra, slot):
    b = extra.pack(slot)
    assert len(b) == slot and b[8:] == bytes(slot - 8)
    if isinstance(extra, GsoExtra):
        assert b[5] == 0                        # the gso union's pad byte
    assert parse_extra(b) == extra


def test_parse_takes_a_private_copy():
    slot = bytearray(TxRequest(1, 2, 3, 4, 5).pack())
    req = parse_tx_request(memoryview(slot))
    slot[:] = bytes(12)
    assert req == TxRequest(1, 2, 3, 4, 5)


# -- a hostile backend ---------------------------------------------------------------


@pytest.mark.parametrize("status", [2, 100, -3, -32768])
def test_tx_response_unknown_status(status):
    b = struct.pack("<Hh", 9, status)
    with pytest.raises(RemoteProtocolError, match=f"id 9: unknown status {status}"):
        parse_tx_response(b)


def test_rx_response_checks():
    with pytest.raises(RemoteProtocolError, match="unknown status -5"):
        parse_rx_response(struct.pack("<HHHh", 1, 0, 0, -5))
    with pytest.raises(RemoteProtocolError, match="cross the 4096-byte page"):
        parse_rx_response(struct.pack("<HHHh", 1, 100, 0, 4000))
    assert parse_rx_response(struct.pack("<HHHh", 1, 96, 0, 4000)).status == 4000


@pytest.mark.parametrize("etype", [0, 5, 6, 255])
def test_extra_of_unknown_type(etype):
    with pytest.raises(RemoteProtocolError, match=f"unknown type {etype}"):
        parse_extra(bytes([etype]) + bytes(7))
