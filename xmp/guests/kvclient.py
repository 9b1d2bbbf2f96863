"""A client of the key-value server guest (:mod:`xmp.guests.kvserver`)
that rides out the server's moves: a request not answered -- the guest
paused, suspended, saved, restored or migrated, its connection gone -- is
sent again on a new connection until it is answered or ``deadline``
seconds have passed.  It records every write the server acknowledged, so a
test (or the migration demo) can read them all back afterwards and show
that none was lost.

A PUT sent twice stores the same value twice: harmless.  A DEL whose first
answer was lost may be answered ``nokey`` when sent again (the first one
did it); :meth:`KvClient.delete` counts either as done.

    c = KvClient("10.0.0.2", 7000)
    c.put(b"k", b"v")         # returns once acknowledged (raises KvError if refused)
    assert c.get(b"k") == b"v"
    lost = c.verify()         # every acknowledged write, read back: [] if none was lost
"""

from __future__ import annotations

import socket
import time

from xmp.errors import XmpError


class KvError(XmpError):
    """The server answered ERR (``why`` is its reason)."""

    def __init__(self, why: str):
        super().__init__(why)
        self.why = why

    def __reduce__(self):
        return (type(self), (self.why,))


class KvClient:
    def __init__(self, host: str, port: int = 7000, *, timeout: float = 2.0, deadline: float = 60.0):
        self.addr = (host, port)
        self.timeout = timeout        # one attempt's wait for a connection or an answer
        self.deadline = deadline      # how long a request is retried before it fails
        self.sock: socket.socket | None = None
        self.buf = b""
        self.acked: dict[bytes, bytes | None] = {}   # key -> value acknowledged (None: deleted)
        self.unsure: dict[bytes, bytes | None] = {}  # a write sent, never answered: either may hold
        self.retries = 0              # requests sent again after a connection failed
        self.longest_wait = 0.0       # seconds the slowest request took, retries included

    # -- transport ---------------------------------------------------------------

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        self.buf = b""

    def __enter__(self) -> KvClient:
        return self

    def __exit__(self, *_exc) -> None:
        self.close()

    def _once(self, line: bytes) -> bytes:
        if self.sock is None:
            self.sock = socket.create_connection(self.addr, timeout=self.timeout)
        self.sock.sendall(line + b"\n")
        while (nl := self.buf.find(b"\n")) < 0:
            chunk = self.sock.recv(1 << 16)
            if not chunk:
                raise ConnectionResetError("the server closed the connection")
            self.buf += chunk
        reply, self.buf = self.buf[:nl], self.buf[nl + 1:]
        return reply

    def request(self, line: bytes) -> bytes:
        """One request line's answer line (without LF), sent again on a new
        connection until answered; TimeoutError past the deadline."""
        t0 = time.monotonic()
        while True:
            try:
                reply = self._once(line)
                break
            except OSError as exc:
                self.close()
                if time.monotonic() - t0 > self.deadline:
                    raise TimeoutError(f"kv {self.addr[0]}:{self.addr[1]}: no answer to "
                                       f"{line[:40]!r} in {self.deadline} s ({exc})") from None
                self.retries += 1
                time.sleep(0.02)
        self.longest_wait = max(self.longest_wait, time.monotonic() - t0)
        return reply

    @staticmethod
    def _ok(reply: bytes) -> bytes:
        if reply == b"OK":
            return b""
        if reply.startswith(b"OK "):
            return reply[3:]
        raise KvError(reply.decode(errors="replace").removeprefix("ERR "))

    # -- the protocol ------------------------------------------------------------

    def put(self, key: bytes, value: bytes) -> None:
        self.unsure[key] = value
        self._ok(self.request(b"PUT " + key + b" " + value))
        del self.unsure[key]
        self.acked[key] = value

    def get(self, key: bytes) -> bytes | None:
        try:
            return self._ok(self.request(b"GET " + key))
        except KvError as exc:
            if exc.why == "nokey":
                return None
            raise

    def delete(self, key: bytes) -> None:
        self.unsure[key] = None
        try:
            self._ok(self.request(b"DEL " + key))
        except KvError as exc:
            if exc.why != "nokey":
                raise
        del self.unsure[key]
        self.acked[key] = None

    def count(self) -> int:
        return int(self._ok(self.request(b"COUNT")))

    def verify(self) -> list[tuple[bytes, bytes | None, bytes | None]]:
        """Every acknowledged write read back: ``(key, expected, found)`` for
        each that does not hold (a write never answered may hold either its
        value or the last acknowledged one)."""
        bad = []
        for key, want in self.acked.items():
            got = self.get(key)
            if got != want and not (key in self.unsure and got == self.unsure[key]):
                bad.append((key, want, got))
        return bad
