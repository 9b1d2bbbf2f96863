"""The migration channel's protocol, two ends joined in memory."""

from __future__ import annotations

import pytest

from xmp.errors import LocalError, RemoteProtocolError
from xmp.migration.auth import (
    CHALLENGE_SIZE,
    HELLO_SIZE,
    MAGIC,
    MAX_FRAME,
    Authenticated,
    Endpoint,
    Frame,
)

pytestmark = pytest.mark.timeout(10)
KEY = b"k" * 32
OTHER = b"o" * 32


def pump(a: Endpoint, b: Endpoint, *, bytewise: bool = False) -> tuple[list, list]:
    """Move bytes both ways until neither has anything to say."""
    events: tuple[list, list] = ([], [])
    for _ in range(100):
        moved = False
        for src, dst, evs in ((a, b, events[1]), (b, a, events[0])):
            data = src.data_to_send()
            if data:
                moved = True
                for chunk in ([data[i:i + 1] for i in range(len(data))] if bytewise else [data]):
                    dst.receive_data(chunk)
                    while (ev := dst.next_event()) is not None:
                        evs.append(ev)
        if not moved:
            return events
    raise AssertionError("no end to the exchange")


@pytest.mark.parametrize("bytewise", [False, True])
def test_both_ends_authenticate_then_frames_flow_both_ways(bytewise):
    c, s = Endpoint("client", KEY), Endpoint("server", KEY)
    ce, se = pump(c, s, bytewise=bytewise)
    assert ce == [Authenticated()] and se == [Authenticated()]
    c.send(b"page data")
    c.send(b"")
    s.send(b"resumed")
    ce, se = pump(c, s, bytewise=bytewise)
    assert se == [Frame(b"page data"), Frame(b"")] and ce == [Frame(b"resumed")]


def test_a_client_with_the_wrong_key_gets_no_frame_and_the_server_refuses_it():
    c, s = Endpoint("client", OTHER), Endpoint("server", KEY)
    s.receive_data(c.data_to_send())
    assert s.next_event() is None
    challenge = s.data_to_send()
    assert len(challenge) == CHALLENGE_SIZE
    c.receive_data(challenge)
    with pytest.raises(RemoteProtocolError, match="server does not hold our key"):
        c.next_event()  # the wrong-key client cannot even tell the server is real...
    # ...and a proof made with the wrong key is refused, with nothing sent back
    forged = Endpoint("client", OTHER, nonce=b"n" * 32)
    s2 = Endpoint("server", KEY)
    s2.receive_data(forged.data_to_send())
    s2.next_event()
    s2.data_to_send()
    s2.receive_data(b"\0" * 32)
    with pytest.raises(RemoteProtocolError, match="client does not hold our key"):
        s2.next_event()
    assert s2.data_to_send() == b"" and not s2.authenticated
    with pytest.raises(RemoteProtocolError):  # and stays refused
        s2.receive_data(b"more")


def test_a_server_without_the_key_is_refused_by_the_client():
    c, s = Endpoint("client", KEY), Endpoint("server", OTHER)
    with pytest.raises(RemoteProtocolError, match="server does not hold our key"):
        pump(c, s)
    assert not c.authenticated


@pytest.mark.parametrize("garbage", [b"GET / HTTP/1.1\r\n\r\n", b"\x16\x03\x01\x02\x00",
                                     b"XMPMIG02" + bytes(32), MAGIC + bytes(32) + b"extra"])
def test_garbage_instead_of_a_hello_is_refused_at_once(garbage):
    s = Endpoint("server", KEY)
    with pytest.raises(RemoteProtocolError):
        s.receive_data(garbage)
        s.next_event()
    assert s.data_to_send() == b""


def test_the_server_answers_nothing_but_the_challenge_until_proven():
    s = Endpoint("server", KEY)
    s.receive_data(MAGIC + bytes(32))
    assert s.next_event() is None
    assert len(s.data_to_send()) == CHALLENGE_SIZE
    with pytest.raises(LocalError):
        s.send(b"guest memory")  # no frame leaves before the peer proved itself


def test_a_reflected_challenge_does_not_prove_anything():
    """An attacker without the key replays the server's own MAC as a proof."""
    s = Endpoint("server", KEY)
    s.receive_data(MAGIC + b"c" * 32)
    s.next_event()
    challenge = s.data_to_send()
    s.receive_data(challenge[-32:])
    with pytest.raises(RemoteProtocolError):
        s.next_event()


def _authenticated() -> tuple[Endpoint, Endpoint]:
    c, s = Endpoint("client", KEY), Endpoint("server", KEY)
    pump(c, s)
    return c, s


def test_a_tampered_frame_does_not_verify():
    c, s = _authenticated()
    c.send(b"page 1")
    wire = bytearray(c.data_to_send())
    wire[5] ^= 1
    s.receive_data(bytes(wire))
    with pytest.raises(RemoteProtocolError, match="does not verify"):
        s.next_event()


def test_a_replayed_or_reordered_frame_does_not_verify():
    c, s = _authenticated()
    c.send(b"one")
    one = c.data_to_send()
    c.send(b"two")
    two = c.data_to_send()
    s.receive_data(one)
    assert s.next_event() == Frame(b"one")
    s.receive_data(one)  # replayed
    with pytest.raises(RemoteProtocolError):
        s.next_event()
    c2, s2 = _authenticated()
    c2.send(b"one")
    c2.data_to_send()
    c2.send(b"two")
    s2.receive_data(c2.data_to_send())  # the first one dropped
    with pytest.raises(RemoteProtocolError):
        s2.next_event()
    assert two  # (each frame's MAC covers its sequence number)


def test_a_frame_longer_than_the_limit_is_refused_from_its_header():
    c, s = _authenticated()
    s.receive_data((MAX_FRAME + 1).to_bytes(4, "big"))
    with pytest.raises(RemoteProtocolError, match="a frame of"):
        s.next_event()


def test_a_recorded_session_replayed_to_a_fresh_server_fails():
    c, s = Endpoint("client", KEY), Endpoint("server", KEY)
    hello = c.data_to_send()
    s.receive_data(hello)
    s.next_event()
    c.receive_data(s.data_to_send())
    c.next_event()
    proof = c.data_to_send()[:32]
    fresh = Endpoint("server", KEY)  # a new nonce: the old proof is for another challenge
    fresh.receive_data(hello)
    fresh.next_event()
    fresh.receive_data(proof)
    with pytest.raises(RemoteProtocolError):
        fresh.next_event()
    assert HELLO_SIZE == 40
