"""The migration channel over TCP: the listener a receiving supervisor runs
on its topology's ``[host] migrate`` address, and the sender's connect.
The protocol is :mod:`xmp.migration.auth`; this is only its socket side.

The listener runs in a thread of its own (a hostile peer must not hold up
the hypervisor's loop): every connection gets :data:`HANDSHAKE_TIMEOUT`
seconds to prove it holds the key, at most :data:`MAX_PENDING` may be
proving at once, and each failure -- wrong key, no key, garbage, silence,
a trickle -- is logged and closed while the listener goes on serving.
Only an authenticated peer reaches ``handler`` (in a thread of its own),
so an unauthenticated one can start nothing.
"""

from __future__ import annotations

import os
import selectors
import socket
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path

from xmp.errors import LocalError, RemoteProtocolError, XmpError
from xmp.migration.auth import KEY_MAX, KEY_MIN, Authenticated, Endpoint, Frame

HANDSHAKE_TIMEOUT = 5.0
MAX_PENDING = 16
RECV = 1 << 20


class MigrationRefused(XmpError):
    """The other host did not accept us (or we did not accept it)."""


def load_key(path: str | Path) -> bytes:
    """A host's migration key: a regular file only its owner can read (like
    an ssh private key), of KEY_MIN..KEY_MAX bytes, used as it is."""
    p = Path(path)
    try:
        st = p.stat()
        data = p.read_bytes()
    except OSError as exc:
        raise LocalError(f"migration key {p}: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise LocalError(f"migration key {p}: not a regular file")
    if st.st_mode & 0o077:
        raise LocalError(f"migration key {p}: readable by others (mode {st.st_mode & 0o777:o}); chmod 600 it")
    if not KEY_MIN <= len(data) <= KEY_MAX:
        raise LocalError(f"migration key {p}: {len(data)} bytes, not {KEY_MIN}..{KEY_MAX}")
    return data


def generate_key(path: str | Path) -> None:
    """Write a fresh key file (64 hex digits, mode 0600) to copy to the
    other host out of band; never overwrites one."""
    import secrets

    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32) + "\n")


def parse_address(text: str) -> tuple[str, int]:
    """"ADDR:PORT" (IPv6 as "[ADDR]:PORT"); port 0 is any free port."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535 or not host:
        raise LocalError(f"migration address {text!r} is not ADDR:PORT")
    return host.strip("[]"), int(port)


class Session:
    """An authenticated channel over a blocking socket: whole frames."""

    def __init__(self, sock: socket.socket, endpoint: Endpoint, peer: str):
        self.sock, self.endpoint, self.peer = sock, endpoint, peer

    def send(self, payload: bytes) -> None:
        self.endpoint.send(payload)
        self.sock.sendall(self.endpoint.data_to_send())

    def recv(self) -> bytes | None:
        """The next frame, or None when the peer closed the connection."""
        while True:
            ev = self.endpoint.next_event()
            if isinstance(ev, Frame):
                return ev.payload
            data = self.sock.recv(RECV)
            if not data:
                return None
            self.endpoint.receive_data(data)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def connect(address: str, key: bytes, timeout: float = HANDSHAKE_TIMEOUT) -> Session:
    """Connect to a receiving host and authenticate both ways; the socket
    is blocking (with ``timeout``) afterwards."""
    host, port = parse_address(address)
    sock = socket.create_connection((host, port), timeout=timeout)
    try:
        ep = Endpoint("client", key)
        sock.sendall(ep.data_to_send())
        while not ep.authenticated:
            ev = ep.next_event()
            out = ep.data_to_send()
            if out:
                sock.sendall(out)
            if isinstance(ev, Authenticated):
                break
            data = sock.recv(RECV)
            if not data:
                raise MigrationRefused(f"{address} closed the connection during the handshake "
                                       "(does it hold our key?)")
            ep.receive_data(data)
        return Session(sock, ep, address)
    except (RemoteProtocolError, OSError) as exc:
        sock.close()
        if isinstance(exc, RemoteProtocolError):
            raise MigrationRefused(f"{address}: {exc}") from None
        raise
    except BaseException:
        sock.close()
        raise


class _Pending:
    def __init__(self, conn: socket.socket, peer: str, key: bytes, deadline: float):
        self.conn, self.peer, self.deadline = conn, peer, deadline
        self.endpoint = Endpoint("server", key)


class MigrationListener:
    """Listen on ``address`` ("ADDR:PORT"); hand each authenticated peer's
    :class:`Session` to ``handler`` in a thread, which owns it."""

    def __init__(self, address: str, key: bytes, handler: Callable[[Session], None],
                 log: Callable[[str], None], *, handshake_timeout: float = HANDSHAKE_TIMEOUT,
                 max_pending: int = MAX_PENDING):
        host, port = parse_address(address)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.create_server((host, port), family=family, backlog=max_pending)
        self.sock.setblocking(False)
        self.address = self.sock.getsockname()[:2]
        self.key, self.handler, self.log = key, handler, log
        self.handshake_timeout, self.max_pending = handshake_timeout, max_pending
        self._wake_r, self._wake_w = socket.socketpair()
        self._pending: dict[socket.socket, _Pending] = {}
        self._sessions: set[Session] = set()
        self._workers: set[threading.Thread] = set()
        self._lock = threading.Lock()
        self.refused = 0
        self.accepted = 0
        self._thread = threading.Thread(target=self._run, name="xmp-migrate-listener", daemon=True)
        self._thread.start()

    @property
    def address_text(self) -> str:
        host, port = self.address
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def close(self) -> None:
        """Stop listening; close what is pending and every open session."""
        self._wake_w.send(b"x")
        self._thread.join()
        with self._lock:
            for s in list(self._sessions):
                try:
                    s.sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            workers = list(self._workers)
        for t in workers:
            t.join(5)
        self._wake_r.close()
        self._wake_w.close()

    def _refuse(self, p: _Pending, why: str) -> None:
        self.refused += 1
        self.log(f"migration: refused {p.peer}: {why}")
        self._drop(p)

    def _drop(self, p: _Pending) -> None:
        self._sel.unregister(p.conn)
        del self._pending[p.conn]
        p.conn.close()

    def _run(self) -> None:
        self._sel = selectors.DefaultSelector()
        self._sel.register(self.sock, selectors.EVENT_READ)
        self._sel.register(self._wake_r, selectors.EVENT_READ)
        try:
            while True:
                now = time.monotonic()
                for p in [p for p in self._pending.values() if p.deadline <= now]:
                    self._refuse(p, f"no handshake within {self.handshake_timeout:g} s")
                wait = min((p.deadline for p in self._pending.values()), default=now + 3600) - now
                for key, _ in self._sel.select(max(wait, 0)):
                    if key.fileobj is self._wake_r:
                        return
                    if key.fileobj is self.sock:
                        self._accept()
                    else:
                        p = self._pending.get(key.fileobj)  # type: ignore[call-overload]
                        if p is not None:
                            self._readable(p)
        finally:
            for p in list(self._pending.values()):
                self._drop(p)
            self._sel.close()
            self.sock.close()

    def _accept(self) -> None:
        try:
            conn, addr = self.sock.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:  # EMFILE and friends: say so, keep serving
            self.log(f"migration: accept failed: {exc}")
            return
        peer = f"{addr[0]}:{addr[1]}"
        if len(self._pending) >= self.max_pending:
            self.refused += 1
            self.log(f"migration: refused {peer}: {self.max_pending} handshakes already in progress")
            conn.close()
            return
        conn.setblocking(False)
        p = _Pending(conn, peer, self.key, time.monotonic() + self.handshake_timeout)
        self._pending[conn] = p
        self._sel.register(conn, selectors.EVENT_READ)

    def _readable(self, p: _Pending) -> None:
        try:
            data = p.conn.recv(4096)
        except OSError as exc:
            self._refuse(p, f"during the handshake: {exc}")
            return
        if not data:
            self._refuse(p, "closed the connection during the handshake")
            return
        try:
            p.endpoint.receive_data(data)
            ev = p.endpoint.next_event()
            out = p.endpoint.data_to_send()
            if out:
                p.conn.send(out)  # a handshake message: a fresh socket's buffer takes it whole
        except RemoteProtocolError as exc:
            self._refuse(p, str(exc))
            return
        except OSError as exc:
            self._refuse(p, f"during the handshake: {exc}")
            return
        if isinstance(ev, Authenticated):
            self._sel.unregister(p.conn)
            del self._pending[p.conn]
            p.conn.setblocking(True)
            self.accepted += 1
            self.log(f"migration: {p.peer} authenticated")
            session = Session(p.conn, p.endpoint, p.peer)
            t = threading.Thread(target=self._serve, args=(session,), name="xmp-migrate-session", daemon=True)
            with self._lock:
                self._sessions.add(session)
                self._workers.add(t)
            t.start()

    def _serve(self, session: Session) -> None:
        try:
            self.handler(session)
        except (XmpError, OSError) as exc:
            self.log(f"migration: session with {session.peer} failed: {exc}")
        finally:
            session.close()
            with self._lock:
                self._sessions.discard(session)
                self._workers.discard(threading.current_thread())

