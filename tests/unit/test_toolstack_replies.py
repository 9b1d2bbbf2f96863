"""The toolstack's xenstore connection tells a waiting sender its batch's
answers, and never sends what xenstored would drop it for."""

from __future__ import annotations

import socket

import pytest

from xmp.errors import LocalError
from xmp.hv.toolstack import Toolstack
from xmp.xenstore.wire import XENSTORE_PAYLOAD_MAX, Packet, PacketParser, XsType


@pytest.fixture
def pair(tmp_path):
    ours, theirs = socket.socketpair()
    ts = Toolstack(tmp_path / "xs.sock", lambda _msg: None)
    ts.sock = ours
    ours.setblocking(False)
    yield ts, theirs
    ts.close()
    theirs.close()


def _answer(ts, theirs, errors: dict[int, bytes]) -> None:
    packets = PacketParser().feed(theirs.recv(65536))
    for i, pkt in enumerate(packets):
        kind, body = (XsType.ERROR, errors[i]) if i in errors else (pkt.type, b"OK\0")
        theirs.sendall(Packet(int(kind), pkt.req_id, 0, body).encode())
    ts.readable()


def test_done_hears_every_error_once_all_replies_are_in(pair):
    ts, theirs = pair
    seen: list[list[str]] = []
    reqs = [(XsType.WRITE, b"/a\0x"), (XsType.WRITE, b"/b\0y"), (XsType.MKDIR, b"/c\0")]
    ts.send(reqs, "three", seen.append)
    assert seen == []
    _answer(ts, theirs, {1: b"EACCES\0"})
    assert seen == [["xenstore three: WRITE /b: EACCES"]]
    ts.send([(XsType.WRITE, b"/d\0z")], "one", seen.append)
    _answer(ts, theirs, {})
    assert seen[1] == []


def test_a_lost_connection_answers_the_waiting(pair):
    ts, _theirs = pair
    seen: list[list[str]] = []
    ts.send([(XsType.WRITE, b"/a\0x")], "lost", seen.append)
    ts.close()
    assert seen == [["xenstored's connection was lost before it answered"]]
    ts.send([(XsType.WRITE, b"/a\0x")], "late", seen.append)
    assert seen[1] == ["late: xenstore unavailable"]


def test_a_request_xenstored_would_drop_us_for_is_not_sent(pair):
    ts, theirs = pair
    with pytest.raises(LocalError, match="more than xenstore's 4096"):
        ts.send([(XsType.WRITE, b"/ok\0v"), (XsType.WRITE, b"/p\0" + b"v" * XENSTORE_PAYLOAD_MAX)], "big")
    assert ts.outbuf == b"" and ts.pending == {}
