"""XsClient against a real socket whose other end this test plays as a
xenstored that is slow, or answers late, or fails posted requests."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from xmp.errors import XenStoreError
from xmp.xenstore.client import SocketTransport, XsClient
from xmp.xenstore.wire import Packet, PacketParser, XsType

pytestmark = pytest.mark.timeout(20)


class SlowStore:
    """Answers READ with ``<path>@<req_id>``, after ``delay[req_id]`` seconds;
    answers any request in ``fail`` (by type) with ERROR ``errno``."""

    def __init__(self, sock: socket.socket, delay: dict[int, float] | None = None,
                 fail: tuple[XsType, ...] = (), errno: str = "E2BIG"):
        self.sock, self.delay, self.fail, self.errno = sock, delay or {}, fail, errno
        self.seen: list[Packet] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            self._answer()
        except OSError:
            pass  # the test is over and closed the socket

    def _answer(self) -> None:
        parser = PacketParser()
        while data := self.sock.recv(65536):
            for pkt in parser.feed(data):
                self.seen.append(pkt)
                time.sleep(self.delay.get(pkt.req_id, 0))
                if pkt.type in self.fail:
                    reply = Packet(int(XsType.ERROR), pkt.req_id, 0, self.errno.encode() + b"\0")
                elif pkt.type == XsType.READ:
                    reply = Packet(pkt.type, pkt.req_id, 0, pkt.payload.rstrip(b"\0") + b"@%d" % pkt.req_id)
                else:
                    reply = Packet(pkt.type, pkt.req_id, 0, b"OK\0")
                self.sock.sendall(reply.encode())


@pytest.fixture
def pair():
    a, b = socket.socketpair()
    yield a, b
    a.close()
    b.close()


def test_a_request_times_out_with_etimedout_and_its_late_reply_is_discarded(pair):
    a, b = pair
    SlowStore(b, delay={1: 1.0})
    xs = XsClient(SocketTransport(a), timeout=0.3)
    start = time.monotonic()
    with pytest.raises(XenStoreError) as info:
        xs.read("/slow")
    assert 0.3 <= time.monotonic() - start < 0.55  # once, not twice
    assert (info.value.errno, info.value.path, info.value.op) == ("ETIMEDOUT", "/slow", "READ")
    xs.timeout = 5
    # req 1's answer ("/slow@1") comes first and must not be taken for req 2's
    assert xs.read("/next") == b"/next@2"
    assert xs.read("/third") == b"/third@3"


def test_the_default_timeout_is_finite():
    a, b = socket.socketpair()
    try:
        assert XsClient(SocketTransport(a)).timeout == 10.0
    finally:
        a.close()
        b.close()


def test_a_failed_posted_request_is_raised_by_the_next_call(pair):
    a, b = pair
    store = SlowStore(b, fail=(XsType.WATCH,))
    xs = XsClient(SocketTransport(a), timeout=5)
    xs.post(XsType.WATCH, b"control/shutdown\0tok\0")
    assert xs.read("/x") == b"/x@2"  # the WATCH's ERROR arrived with (before) this reply
    with pytest.raises(XenStoreError) as info:
        xs.read("/y")
    assert (info.value.errno, info.value.path, info.value.op) == ("E2BIG", "control/shutdown", "WATCH")
    assert xs.read("/z") == b"/z@3"  # raised once
    assert [p.payload for p in store.seen][1:] == [b"/x\0", b"/z\0"]  # /y was never sent


def test_a_failed_posted_request_goes_to_on_posted_error(pair):
    a, b = pair
    SlowStore(b, fail=(XsType.WATCH,), errno="EACCES")
    xs = XsClient(SocketTransport(a), timeout=5)
    got: list[XenStoreError] = []
    xs.on_posted_error = got.append
    xs.post(XsType.WATCH, b"control/shutdown\0tok\0")
    assert xs.read("/x") == b"/x@2"
    assert [(e.errno, e.path, e.op) for e in got] == [("EACCES", "control/shutdown", "WATCH")]
    assert xs.read("/y") == b"/y@3"


def test_a_dispatch_with_an_owner_loop_takes_only_what_was_queued_and_asks_for_another_turn():
    """A callback whose every write brings another event (netback's ticker
    under the bus's watch): drained to the end, the dispatch never returned
    to whoever waited beneath it in the domain's loop (dom0's start-up, its
    VIRQ_DOM_EXC not yet bound: no guest's console ever read)."""
    from xmp.testing import store_client
    from xmp.xenstore.server import XenStore

    xs = store_client(XenStore(), 0, privileged=True)
    turns: list[int] = []
    xs.events_pending = lambda: turns.append(len(xs.events))
    calls = []

    def busy(path: str) -> None:
        calls.append(path)
        if len(calls) < 1000:
            xs.write("/busy/x", str(len(calls)))  # fires this watch again

    xs.on_watch("busy", busy)
    xs.watch("/busy", "busy")
    xs.pump_nowait()
    xs.events.append(("/other", "no-callback"))  # kept, in order, for wait_watch
    turns.clear()
    xs.dispatch()
    assert len(calls) == 1
    assert turns and turns[-1] == 2  # the new event waits, and its owner is told
    assert list(xs.events) == [("/other", "no-callback"), ("/busy/x", "busy")]
    xs.dispatch()
    assert len(calls) == 2
    assert xs.wait_watch(0) == ("/other", "no-callback")


def test_a_dispatch_without_an_owner_loop_still_drains_every_event():
    from xmp.testing import store_client
    from xmp.xenstore.server import XenStore

    xs = store_client(XenStore(), 0, privileged=True)
    calls = []

    def busy(path: str) -> None:
        calls.append(path)
        if len(calls) < 5:
            xs.write("/busy/x", str(len(calls)))

    xs.on_watch("busy", busy)
    xs.watch("/busy", "busy")
    xs.pump_nowait()
    xs.dispatch()
    assert len(calls) == 5 and not xs.events
