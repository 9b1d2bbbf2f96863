"""A xenstore client: the wire protocol over a socket (tools, the
toolstack) or over a domain's xenstore ring page (guests).

    xs = XsClient(SocketTransport.connect("/run/xmp/host/xenstored.sock"))
    xs.write("/local/domain/3/data/x", b"1")
    for attempt in xs.transactions():      # retried on EAGAIN, as libxenstore users do
        with attempt as tx:
            v = xs.read("data/x", tx)
            xs.write("data/x", v + b"1", tx)

Watch events that arrive while waiting for a reply are queued;
``wait_watch`` returns them.  Errors raise XenStoreError with the wire's
errno name.

A request waits at most ``timeout`` seconds (``DEFAULT_TIMEOUT``; the CLI
uses 5) and then raises XenStoreError("ETIMEDOUT"): a stopped or wedged
xenstored costs its callers an error, not an endless hang.  Its req_id is
remembered, so a reply that arrives later is discarded, never taken for
another request's.  A posted request (``post``, fire-and-forget) that
fails is handed to ``on_posted_error``, or, when none is set, raised by
the next request -- a failure is never dropped.
"""

from __future__ import annotations

import contextlib
import itertools
import socket
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Protocol

from xmp.errors import DomainGone, RemoteProtocolError, XenStoreError
from xmp.sharedmem.bytering import xenstore_rings
from xmp.xenstore.wire import Packet, PacketParser, XsType

XBT_NULL = 0
DEFAULT_TIMEOUT = 10.0  # seconds a request waits for its reply
TIMEOUT_SLACK = 0.1     # how far from what is asked a socket's wait may end


class Transport(Protocol):
    def send(self, data: bytes, timeout: float | None = None) -> None:
        """All of ``data``, in order; TimeoutError if it cannot within ``timeout``."""
        ...

    def recv(self, timeout: float | None, ready: Callable[[], bool] = ...) -> bytes:
        """Some bytes; b"" on timeout or as soon as ``ready()`` holds."""
        ...


class SocketTransport:
    def __init__(self, sock: socket.socket):
        self.sock = sock

    @classmethod
    def connect(cls, path: str) -> SocketTransport:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(str(path))
        return cls(sock)

    def _arm(self, timeout: float | None) -> None:
        """settimeout is a syscall: keep a timeout within TIMEOUT_SLACK of
        what is asked (successive requests ask for nearly the same; a wait
        that ends early only makes the caller wait again)."""
        cur = self.sock.gettimeout()
        if timeout is None or cur is None or abs(cur - timeout) > TIMEOUT_SLACK:
            if cur != timeout:
                self.sock.settimeout(timeout)

    def send(self, data: bytes, timeout: float | None = None) -> None:
        self._arm(timeout)
        self.sock.sendall(data)

    def recv(self, timeout: float | None, ready: Callable[[], bool] = lambda: False) -> bytes:
        try:
            if timeout == 0:  # (a socket with a timeout polls first, MSG_DONTWAIT or not)
                if self.sock.gettimeout() != 0:
                    self.sock.settimeout(0)
            else:
                self._arm(timeout)
            data = self.sock.recv(65536)
        except (TimeoutError, BlockingIOError):  # BlockingIOError: nothing yet (timeout 0)
            return b""
        if not data:
            raise DomainGone(0)
        return data

    def close(self) -> None:
        self.sock.close()


class RingTransport:
    """A guest's end of its xenstore page (xenstore_domain_interface): writes
    requests into ``req``, reads replies from ``rsp``, kicks the store port,
    and waits in the domain's event loop (so devices are served meanwhile)."""

    def __init__(self, page, port: int, notify: Callable[[int], None],
                 wait: Callable[[Callable[[], bool], float | None], bool]):
        self.req, self.rsp = xenstore_rings(page)
        self.port = port
        self.notify = notify
        self.wait = wait
        self._tail = bytearray()  # requests not yet in req: written before anything newer

    def send(self, data: bytes, timeout: float | None = None) -> None:
        """Write ``data`` after whatever is still queued.  TimeoutError if
        xenstored has not made room within ``timeout``: the rest stays queued
        (and goes first next time), so the packet stream stays whole."""
        self._tail += data
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._tail:
            n = self.req.write(self._tail)
            del self._tail[:n]
            self.notify(self.port)
            if self._tail:
                left = 0.05 if deadline is None else min(0.05, deadline - time.monotonic())
                if left <= 0:
                    raise TimeoutError("xenstore req ring full")
                self.wait(lambda: self.req.space() > 0, left)

    def recv(self, timeout: float | None, ready: Callable[[], bool] = lambda: False) -> bytes:
        if self._tail:
            with contextlib.suppress(TimeoutError):
                self.send(b"", 0)
        # ``ready``: an event handler may have pumped our reply meanwhile.
        if not self.wait(lambda: self.rsp.available() > 0 or ready(), timeout) or ready():
            return b""
        data, writer_waits = self.rsp.read_and_check_room()
        if writer_waits:  # xenstored may be waiting for room (as Linux's xb_read, only then)
            self.notify(self.port)
        return data

    def pending(self) -> bool:
        return self.rsp.available() > 0

    def close(self) -> None:
        self.req.release()
        self.rsp.release()


class XsClient:
    def __init__(self, transport: Transport, timeout: float | None = DEFAULT_TIMEOUT):
        self.t = transport
        self.timeout = timeout  # seconds a request waits for its reply (None: for ever)
        self.parser = PacketParser()
        self._ids = itertools.count(1)
        self._replies: dict[int, Packet] = {}
        self.events: deque[tuple[str, str]] = deque()
        self._callbacks: dict[str, Callable[[str], None]] = {}
        self._dispatching = False
        self._posted: dict[int, tuple[XsType, str]] = {}  # req_id -> what was posted
        self._abandoned: set[int] = set()  # timed out: their replies are dropped when they come
        self.posted_errors: list[XenStoreError] = []  # failed posts no callback took, raised next
        # Called with a failed posted request's error; unset, the next request raises it.
        self.on_posted_error: Callable[[XenStoreError], None] | None = None
        # Called when a request returns with watch events queued; a domain
        # raises its own store port so its event loop dispatches them.
        self.events_pending: Callable[[], object] | None = None

    # -- the protocol --------------------------------------------------------

    def request(self, op: XsType, payload: bytes, tx: int = XBT_NULL, path: str = "") -> bytes:
        if self.posted_errors:
            raise self.posted_errors.pop(0)
        req_id = next(self._ids) & 0xFFFFFFFF
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        try:
            self.t.send(Packet(int(op), req_id, tx, payload).encode(), self.timeout)
            while req_id not in self._replies:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    # One last look: a domain paused past the deadline may
                    # have its answer waiting already.
                    if not self._pump(0) or req_id not in self._replies:
                        raise TimeoutError
                    break
                self._pump(left, lambda: req_id in self._replies)
        except TimeoutError:
            self._abandoned.add(req_id)
            raise XenStoreError("ETIMEDOUT", path, op.name) from None
        reply = self._replies.pop(req_id)
        if self.events and self.events_pending is not None:
            self.events_pending()  # events came with the reply: have the owner's loop dispatch them
        if reply.type == XsType.ERROR:
            raise XenStoreError(reply.payload.rstrip(b"\0").decode(errors="replace"), path, op.name)
        if reply.type != op:
            raise RemoteProtocolError(f"xenstore answered {op.name} with type {reply.type}")
        return reply.payload

    def post(self, op: XsType, payload: bytes, tx: int = XBT_NULL) -> None:
        """Send a request without waiting for its answer (boot-time writes and
        watches): the reply is taken when it comes; an error one goes to
        ``on_posted_error`` (or is raised by the next request)."""
        req_id = next(self._ids) & 0xFFFFFFFF
        self._posted[req_id] = (op, payload.split(b"\0", 1)[0].decode(errors="replace"))
        self.t.send(Packet(int(op), req_id, tx, payload).encode(), self.timeout)

    def _pump(self, timeout: float | None, ready: Callable[[], bool] = lambda: False) -> bool:
        data = self.t.recv(timeout, ready)
        if not data:
            return False
        for pkt in self.parser.feed(data):
            if pkt.type == XsType.WATCH_EVENT:
                parts = pkt.payload.split(b"\0")
                if len(parts) >= 2:
                    self.events.append((parts[0].decode(errors="replace"), parts[1].decode(errors="replace")))
            elif pkt.req_id in self._abandoned:
                self._abandoned.discard(pkt.req_id)  # its caller had its ETIMEDOUT already
            elif pkt.req_id in self._posted:
                op, path = self._posted.pop(pkt.req_id)
                if pkt.type == XsType.ERROR:
                    self._posted_failed(XenStoreError(pkt.payload.rstrip(b"\0").decode(errors="replace"),
                                                      path, op.name))
            else:
                self._replies[pkt.req_id] = pkt
        return True

    def _posted_failed(self, exc: XenStoreError) -> None:
        if self.on_posted_error is not None:
            self.on_posted_error(exc)
        else:
            self.posted_errors.append(exc)

    # -- operations, by their xs_* names -----------------------------------------

    def read(self, path: str, tx: int = XBT_NULL) -> bytes:
        return self.request(XsType.READ, _z(path), tx, path)

    def read_or(self, path: str, default: bytes | None = None, tx: int = XBT_NULL) -> bytes | None:
        try:
            return self.read(path, tx)
        except XenStoreError as exc:
            if exc.errno == "ENOENT":
                return default
            raise

    def write(self, path: str, value: bytes | str, tx: int = XBT_NULL) -> None:
        value = value.encode() if isinstance(value, str) else value
        self.request(XsType.WRITE, path.encode() + b"\0" + value, tx, path)

    def mkdir(self, path: str, tx: int = XBT_NULL) -> None:
        self.request(XsType.MKDIR, _z(path), tx, path)

    def rm(self, path: str, tx: int = XBT_NULL) -> None:
        self.request(XsType.RM, _z(path), tx, path)

    def directory(self, path: str, tx: int = XBT_NULL) -> list[str]:
        data = self.request(XsType.DIRECTORY, _z(path), tx, path)
        return [n.decode() for n in data.split(b"\0") if n]

    def get_perms(self, path: str, tx: int = XBT_NULL) -> list[str]:
        data = self.request(XsType.GET_PERMS, _z(path), tx, path)
        return [p.decode() for p in data.split(b"\0") if p]

    def set_perms(self, path: str, perms: list[str], tx: int = XBT_NULL) -> None:
        self.request(XsType.SET_PERMS, _z(path) + b"".join(_z(p) for p in perms), tx, path)

    def watch(self, path: str, token: str) -> None:
        self.request(XsType.WATCH, _z(path) + _z(token), XBT_NULL, path)

    def unwatch(self, path: str, token: str) -> None:
        self.request(XsType.UNWATCH, _z(path) + _z(token), XBT_NULL, path)

    def transaction_start(self) -> int:
        return int(self.request(XsType.TRANSACTION_START, b"\0").rstrip(b"\0"))

    def transaction_end(self, tx: int, commit: bool = True) -> None:
        """Raises XenStoreError("EAGAIN") when the transaction conflicted."""
        self.request(XsType.TRANSACTION_END, b"T\0" if commit else b"F\0", tx)

    def transactions(self, attempts: int = 50) -> Iterator[contextlib.AbstractContextManager[int]]:
        """Attempts at one transaction, retried while it conflicts (EAGAIN)."""
        for _ in range(attempts):
            attempt = _Attempt(self)
            yield attempt
            if attempt.committed:
                return
        raise XenStoreError("EAGAIN", "", "transaction (gave up retrying)")

    def introduce(self, domid: int, mfn: int, port: int) -> None:
        self.request(XsType.INTRODUCE, _z(str(domid)) + _z(str(mfn)) + _z(str(port)))

    def release(self, domid: int) -> None:
        self.request(XsType.RELEASE, _z(str(domid)))

    def get_domain_path(self, domid: int) -> str:
        return self.request(XsType.GET_DOMAIN_PATH, _z(str(domid))).rstrip(b"\0").decode()

    def is_domain_introduced(self, domid: int) -> bool:
        return self.request(XsType.IS_DOMAIN_INTRODUCED, _z(str(domid))).rstrip(b"\0") == b"T"

    def pump_nowait(self) -> None:
        """Take whatever has arrived (from an event-channel handler)."""
        while self._pump(0):
            pass

    def on_watch(self, token: str, callback: Callable[[str], None]) -> None:
        """Call ``callback(path)`` for events of ``token`` (see dispatch)."""
        self._callbacks[token] = callback

    def dispatch(self) -> None:
        """Run the callbacks of queued watch events; not re-entered by a
        callback's own requests.  With an owner loop (``events_pending``)
        only the events queued when it started: those that come meanwhile
        are left for the next turn, which it asks for.  A callback's request
        waits in that loop, and so may whoever waits beneath this dispatch
        (dom0's start-up): draining to the end, a stream of events kept it
        from ever returning to them."""
        if self._dispatching:
            return
        self._dispatching = True
        kept: deque[tuple[str, str]] = deque()  # no callback (yet): for wait_watch, in order
        try:
            todo = len(self.events) if self.events_pending is not None else -1
            while self.events and todo != 0:
                todo -= 1
                path, token = self.events.popleft()
                cb = self._callbacks.get(token)
                if cb is None:
                    kept.append((path, token))
                else:
                    cb(path)
        finally:  # (a callback that raised leaves the rest for the next turn too)
            self._dispatching = False
            self.events.extendleft(reversed(kept))
            if self.events_pending is not None and any(t in self._callbacks for _, t in self.events):
                self.events_pending()

    def wait_watch(self, timeout: float | None = None) -> tuple[str, str] | None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.events:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return None
            self._pump(left, lambda: bool(self.events))  # an event handler may queue it meanwhile
        return self.events.popleft()

    def close(self) -> None:
        close = getattr(self.t, "close", None)
        if close is not None:
            close()


class _Attempt:
    def __init__(self, xs: XsClient):
        self.xs = xs
        self.committed = False

    def __enter__(self) -> int:
        self.tx = self.xs.transaction_start()
        return self.tx

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            with contextlib.suppress(XenStoreError):
                self.xs.transaction_end(self.tx, commit=False)
            return
        try:
            self.xs.transaction_end(self.tx, commit=True)
        except XenStoreError as e:
            if e.errno == "EAGAIN":
                return  # the loop tries again
            raise
        self.committed = True


def _z(s: str) -> bytes:
    return s.encode() + b"\0"
