"""The migration channel's protocol, sans I/O: mutual authentication over a
shared key, then authenticated frames.  Bytes in, events out; the socket
side is :mod:`xmp.migration.channel`.

Theory of operation
-------------------
Both hosts hold the same secret key ``K`` (a key file exchanged out of
band, as ssh host keys are; :func:`xmp.migration.channel.load_key`).  Nothing here is a cipher
of our own: HMAC-SHA256 (``hmac``), ``secrets`` nonces, constant-time
comparison.  The handshake, with ``cn``/``sn`` fresh 32-byte nonces::

    client -> server   HELLO      "XMPMIG01" cn                         40 bytes
    server -> client   CHALLENGE  "XMPMIG01" sn HMAC(K, "server" cn sn) 72 bytes
    client -> server   PROOF      HMAC(K, "client" cn sn)               32 bytes
    server -> client   the first frame (empty): accepted

Each side proves it holds ``K`` over the other side's nonce, with its own
role in the MAC (a reflected MAC never verifies), so a replayed exchange
fails on the fresh nonce.  The server says nothing after a bad proof: an
unauthenticated peer gets no frame and can start nothing.  After the
handshake every frame, each way, is::

    length (u32 big-endian) | payload | HMAC(k_dir, seq u64 | length | payload)

with ``k_dir = HMAC(K, "c2s" | "s2c" cn sn)`` and ``seq`` counting that
direction's frames from 0, so a frame cannot be altered, dropped, reordered
or replayed without the next MAC failing.  Frames are authenticated, not
encrypted: guest memory crosses the link in clear (on two real hosts, run
it over a private link or a VPN, as Xen's migration over plain TCP needs).

Whose fault: a peer's bytes that break this (wrong magic, a MAC that does
not verify, a frame over :data:`MAX_FRAME`) raise RemoteProtocolError;
using the API out of order raises LocalError.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import struct
from dataclasses import dataclass

from xmp.errors import LocalError, RemoteProtocolError

MAGIC = b"XMPMIG01"
NONCE = 32
TAG = 32
HELLO_SIZE = len(MAGIC) + NONCE
CHALLENGE_SIZE = len(MAGIC) + NONCE + TAG
PROOF_SIZE = TAG
MAX_FRAME = 16 << 20  # a PAGE_DATA record of 1024 pages with room to spare
KEY_MIN, KEY_MAX = 32, 4096
_LEN = struct.Struct(">I")
_SEQ = struct.Struct(">Q")


def _mac(key: bytes, *parts: bytes) -> bytes:
    return hmac.new(key, b"".join(parts), hashlib.sha256).digest()


@dataclass(frozen=True)
class Authenticated:
    """The handshake is done: both ends proved they hold the key."""


@dataclass(frozen=True)
class Frame:
    payload: bytes


Event = Authenticated | Frame


class Endpoint:
    """One end of a migration channel: ``role`` is "client" (the source,
    which connects) or "server" (the listener).  Feed what the socket read
    to :meth:`receive_data`, take events with :meth:`next_event`, write
    :meth:`data_to_send` out."""

    def __init__(self, role: str, key: bytes, *, nonce: bytes | None = None):
        if role not in ("client", "server"):
            raise LocalError(f"role {role!r} is neither client nor server")
        if not KEY_MIN <= len(key) <= KEY_MAX:
            raise LocalError(f"a migration key is {KEY_MIN}..{KEY_MAX} bytes")
        self.role, self._key = role, key
        self._nonce = nonce or secrets.token_bytes(NONCE)
        self._cn = self._sn = b""
        self._in = bytearray()
        self._out = bytearray()
        self._send_key = self._recv_key = b""
        self._send_seq = self._recv_seq = 0
        self.authenticated = False
        self._failed: RemoteProtocolError | None = None
        if role == "client":
            self._cn = self._nonce
            self._out += MAGIC + self._cn
            self._state = "challenge"
        else:
            self._sn = self._nonce
            self._state = "hello"

    # -- bytes --------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        if self._failed is not None:
            raise self._failed
        self._in += data
        # a handshake message is a fixed size: more before it is answered is garbage
        # a handshake step answers the other end's: a conforming peer never
        # sends more than the one message it owes, so more is garbage
        limit = {"hello": HELLO_SIZE, "challenge": CHALLENGE_SIZE, "proof": PROOF_SIZE}.get(self._state)
        if limit is not None and len(self._in) > limit:
            self._fail(f"{len(self._in)} bytes where the {self._state} is {limit}")

    def data_to_send(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        return out

    def _fail(self, why: str) -> None:
        self._failed = RemoteProtocolError(f"migration peer: {why}")
        raise self._failed

    # -- events -------------------------------------------------------------

    def next_event(self) -> Event | None:
        """The next thing the peer said, or None until more bytes come."""
        if self._failed is not None:
            raise self._failed
        if self._state == "hello":
            return self._hello()
        if self._state == "challenge":
            return self._challenge()
        if self._state == "proof":
            return self._proof()
        return self._frame()

    def _hello(self) -> Event | None:
        if len(self._in) < HELLO_SIZE:
            self._check_magic()
            return None
        self._check_magic()
        self._cn = bytes(self._in[len(MAGIC):HELLO_SIZE])
        del self._in[:HELLO_SIZE]
        self._out += MAGIC + self._sn + _mac(self._key, b"server", self._cn, self._sn)
        self._state = "proof"
        return None if not self._in else self._proof()

    def _challenge(self) -> Event | None:
        if len(self._in) < CHALLENGE_SIZE:
            self._check_magic()
            return None
        self._check_magic()
        self._sn = bytes(self._in[len(MAGIC):len(MAGIC) + NONCE])
        tag = bytes(self._in[len(MAGIC) + NONCE:CHALLENGE_SIZE])
        del self._in[:CHALLENGE_SIZE]
        if not hmac.compare_digest(tag, _mac(self._key, b"server", self._cn, self._sn)):
            self._fail("the server does not hold our key")
        self._out += _mac(self._key, b"client", self._cn, self._sn)
        self._keys()
        self._state = "accept"  # the server's empty first frame says it accepted
        return self._frame()

    def _proof(self) -> Event | None:
        if len(self._in) < PROOF_SIZE:
            return None
        tag = bytes(self._in[:PROOF_SIZE])
        del self._in[:PROOF_SIZE]
        if not hmac.compare_digest(tag, _mac(self._key, b"client", self._cn, self._sn)):
            self._fail("the client does not hold our key")
        self._keys()
        self._state = "frames"
        self.authenticated = True
        self._send_frame(b"")
        return Authenticated()

    def _check_magic(self) -> None:
        n = min(len(self._in), len(MAGIC))
        if bytes(self._in[:n]) != MAGIC[:n]:
            self._fail("not a migration channel (bad magic)")

    def _keys(self) -> None:
        c2s = _mac(self._key, b"c2s", self._cn, self._sn)
        s2c = _mac(self._key, b"s2c", self._cn, self._sn)
        self._send_key, self._recv_key = (c2s, s2c) if self.role == "client" else (s2c, c2s)

    def _frame(self) -> Event | None:
        if len(self._in) < _LEN.size:
            return None
        (n,) = _LEN.unpack_from(self._in)
        if n > MAX_FRAME:
            self._fail(f"a frame of {n} bytes (at most {MAX_FRAME})")
        if len(self._in) < _LEN.size + n + TAG:
            return None
        body = bytes(self._in[:_LEN.size + n])
        tag = bytes(self._in[_LEN.size + n:_LEN.size + n + TAG])
        if not hmac.compare_digest(tag, _mac(self._recv_key, _SEQ.pack(self._recv_seq), body)):
            self._fail(f"frame {self._recv_seq} does not verify")
        del self._in[:_LEN.size + n + TAG]
        self._recv_seq += 1
        if self._state == "accept":
            if n:
                self._fail("the server's first frame is not its acceptance")
            self._state = "frames"
            self.authenticated = True
            return Authenticated()
        return Frame(body[_LEN.size:])

    # -- frames out -----------------------------------------------------------

    def send(self, payload: bytes) -> None:
        """Queue one frame (after :class:`Authenticated` only)."""
        if not self.authenticated:
            raise LocalError("no frame before the handshake is done")
        if len(payload) > MAX_FRAME:
            raise LocalError(f"a frame of {len(payload)} bytes (at most {MAX_FRAME})")
        self._send_frame(payload)

    def _send_frame(self, payload: bytes) -> None:
        body = _LEN.pack(len(payload)) + payload
        self._out += body + _mac(self._send_key, _SEQ.pack(self._send_seq), body)
        self._send_seq += 1
