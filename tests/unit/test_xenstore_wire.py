"""xenstore framing (io/xs_wire.h): header layout, parser, reply helpers."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xmp.errors import RemoteProtocolError
from xmp.xenstore.wire import (
    HEADER_SIZE,
    XENSTORE_PAYLOAD_MAX,
    Packet,
    PacketParser,
    WireError,
    XsType,
    error_packet,
    ok_packet,
    watch_event,
)


def test_type_numbers_match_xs_wire_h():
    expected = {
        "CONTROL": 0, "DIRECTORY": 1, "READ": 2, "GET_PERMS": 3, "WATCH": 4, "UNWATCH": 5,
        "TRANSACTION_START": 6, "TRANSACTION_END": 7, "INTRODUCE": 8, "RELEASE": 9,
        "GET_DOMAIN_PATH": 10, "WRITE": 11, "MKDIR": 12, "RM": 13, "SET_PERMS": 14,
        "WATCH_EVENT": 15, "ERROR": 16, "IS_DOMAIN_INTRODUCED": 17, "RESUME": 18,
        "SET_TARGET": 19, "RESET_WATCHES": 21, "DIRECTORY_PART": 22, "GET_FEATURE": 23,
        "SET_FEATURE": 24, "GET_QUOTA": 25, "SET_QUOTA": 26,
    }
    assert {t.name: t.value for t in XsType} == expected
    assert 20 not in {t.value for t in XsType}  # XS_RESTRICT, removed
    assert (HEADER_SIZE, XENSTORE_PAYLOAD_MAX) == (16, 4096)


def test_header_layout_is_four_little_endian_u32():
    raw = Packet(XsType.WRITE, 0x01020304, 7, b"a\0b").encode()
    assert raw[:16] == bytes([11, 0, 0, 0, 4, 3, 2, 1, 7, 0, 0, 0, 3, 0, 0, 0])
    assert raw[16:] == b"a\0b"
    assert struct.unpack_from("<IIII", raw) == (11, 0x01020304, 7, 3)


def test_round_trip_several_packets_in_one_feed():
    pkts = [Packet(XsType.READ, 1, 0, b"/a\0"), Packet(XsType.DIRECTORY, 2, 5, b""),
            Packet(XsType.WRITE, 3, 0, b"x" * XENSTORE_PAYLOAD_MAX)]
    parser = PacketParser()
    assert parser.feed(b"".join(p.encode() for p in pkts)) == pkts
    assert parser.pending == 0


def test_parser_fed_one_byte_at_a_time():
    pkts = [Packet(XsType.WATCH, 9, 0, b"/local\0tok\0"), Packet(XsType.RM, 10, 3, b"/x\0")]
    stream = b"".join(p.encode() for p in pkts)
    parser = PacketParser()
    out: list[Packet] = []
    for i in range(len(stream)):
        got = parser.feed(stream[i:i + 1])
        out += got
        if got:
            assert parser.pending == 0
    assert out == pkts


packets = st.builds(
    Packet,
    type=st.sampled_from(list(XsType)),
    req_id=st.integers(0, 2**32 - 1),
    tx_id=st.integers(0, 2**32 - 1),
    payload=st.binary(max_size=300),
)


@settings(max_examples=200, deadline=None)
@given(pkts=st.lists(packets, max_size=8), data=st.data())
def test_any_split_of_the_stream_gives_the_same_packets(pkts, data):
    stream = b"".join(p.encode() for p in pkts)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=20)))
    parser = PacketParser()
    out: list[Packet] = []
    prev = 0
    for cut in [*cuts, len(stream)]:
        out += parser.feed(stream[prev:cut])
        prev = cut
    assert out == pkts
    assert parser.pending == 0


def test_oversized_length_is_a_remote_protocol_error():
    header = struct.pack("<IIII", XsType.WRITE, 1, 0, XENSTORE_PAYLOAD_MAX + 1)
    parser = PacketParser()
    assert parser.feed(header[:15]) == []
    with pytest.raises(WireError) as info:
        parser.feed(header[15:])  # raised at the header, before any payload arrives
    assert isinstance(info.value, RemoteProtocolError)


def test_oversized_length_after_good_packets_still_raises():
    good = Packet(XsType.READ, 1, 0, b"/\0").encode()
    bad = struct.pack("<IIII", XsType.READ, 2, 0, 0xFFFFFFFF)
    with pytest.raises(WireError):
        PacketParser().feed(good + bad)


def test_error_packet_copies_ids_and_carries_the_errno_name():
    req = Packet(XsType.READ, 42, 7, b"/nope\0")
    err = error_packet(req, "ENOENT")
    assert err == Packet(XsType.ERROR, 42, 7, b"ENOENT\0")
    assert err.encode() == struct.pack("<IIII", 16, 42, 7, 7) + b"ENOENT\0"


def test_ok_packet_echoes_the_request_type():
    req = Packet(XsType.WRITE, 3, 0, b"/a\0v")
    assert ok_packet(req) == Packet(XsType.WRITE, 3, 0, b"OK\0")


def test_watch_event_has_zero_ids_and_two_strings():
    ev = watch_event("/local/domain/1/x", "tok")
    assert ev == Packet(XsType.WATCH_EVENT, 0, 0, b"/local/domain/1/x\0tok\0")
    assert ev.encode()[:16] == struct.pack("<IIII", 15, 0, 0, len(b"/local/domain/1/x\0tok\0"))
