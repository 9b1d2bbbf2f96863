"""The toolstack's xenstore connection never sends what xenstored would
drop it for: its one connection serves every domain."""

from __future__ import annotations

import socket

import pytest

from xmp.errors import LocalError
from xmp.toolstack.xs import XsConnection
from xmp.xenstore.wire import XENSTORE_PAYLOAD_MAX, XsType


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
