"""The toolstack's xenstore connection: every sender hears its replies (or the
connection's loss), and it never sends what xenstored would drop it for
(its one connection serves every domain)."""

from __future__ import annotations

import socket

import pytest

from xmp.errors import LocalError
from xmp.toolstack.xs import XsConnection
from xmp.xenstore.wire import XENSTORE_PAYLOAD_MAX, Packet, PacketParser, XsType


@pytest.mark.timeout(30)
def test_a_request_xenstored_would_drop_us_for_is_not_sent(tmp_path):
    ours, theirs = socket.socketpair()
    conn = XsConnection(tmp_path / "xs.sock", lambda _msg: None)
    conn.sock = ours
    ours.setblocking(False)
    try:
        with pytest.raises(LocalError, match="more than xenstore's 4096"):
            big = b"/p\0" + b"v" * XENSTORE_PAYLOAD_MAX
            conn.send([(XsType.WRITE, b"/ok\0v"), (XsType.WRITE, big)], "big")
        assert conn.outbuf == b"" and conn.pending == {}  # not even the first, small, one
        theirs.setblocking(False)
        with pytest.raises(BlockingIOError):
            theirs.recv(1)
        conn.send([(XsType.WRITE, b"/p\0" + b"v" * (XENSTORE_PAYLOAD_MAX - 3))], "just fits")
        assert len(theirs.recv(65536)) == 16 + XENSTORE_PAYLOAD_MAX
    finally:
        conn.close()
        theirs.close()


def _answer(theirs: socket.socket, conn: XsConnection, errors: dict[int, bytes]) -> None:
    """xenstored's side: answer each request, with ``errors[i]`` for the i-th."""
    for i, pkt in enumerate(PacketParser().feed(theirs.recv(65536))):
        kind, body = (XsType.ERROR, errors[i]) if i in errors else (pkt.type, b"OK\0")
        theirs.sendall(Packet(int(kind), pkt.req_id, 0, body).encode())
    conn.readable()


@pytest.mark.timeout(30)
def test_done_hears_every_reply_once_all_are_in(tmp_path):
    ours, theirs = socket.socketpair()
    logged: list[str] = []
    conn = XsConnection(tmp_path / "xs.sock", logged.append)
    conn.sock = ours
    ours.setblocking(False)
    seen: list[list[tuple[int, bytes]]] = []

    def done(replies: list[Packet]) -> None:
        seen.append([(p.type, p.payload) for p in replies])

    try:
        reqs = [(XsType.WRITE, b"/a\0x"), (XsType.WRITE, b"/b\0y"), (XsType.MKDIR, b"/c\0")]
        conn.send(reqs, "three", done)
        assert seen == []
        _answer(theirs, conn, {1: b"EACCES\0"})
        assert seen == [[(XsType.WRITE, b"OK\0"), (XsType.ERROR, b"EACCES\0"), (XsType.MKDIR, b"OK\0")]]
        assert logged == ["xenstore three: WRITE /b: EACCES"]  # an error reply is logged, not dropped
        conn.send([], "nothing", done)
        assert seen[1] == []
    finally:
        conn.close()
        theirs.close()


@pytest.mark.timeout(30)
def test_a_lost_connection_answers_the_waiting(tmp_path):
    ours, theirs = socket.socketpair()
    conn = XsConnection(tmp_path / "xs.sock", lambda _msg: None)
    conn.sock = ours
    ours.setblocking(False)
    seen: list[list[bytes]] = []
    conn.send([(XsType.WRITE, b"/a\0x"), (XsType.WRITE, b"/b\0y")], "lost",
              lambda replies: seen.append([p.payload for p in replies]))
    conn.close()
    theirs.close()
    assert seen == [[b"ENOTCONN\0", b"ENOTCONN\0"]]
    conn.send([(XsType.WRITE, b"/a\0x")], "late", lambda replies: seen.append([p.payload for p in replies]))
    assert seen[1] == [b"ENOTCONN\0"]
