"""The key-value server's table, kept in guest RAM: a pure core over a
buffer (a run of the guest's pages), and its line protocol.

Theory of operation.  What moves with a guest is its RAM and a small
suspend context, so the table is not a Python dict but an open-addressing
hash table laid out in a ``memoryview`` of guest pages; the context is only
where that run starts and how long it is.  After a save and restore (or a
migration) the new process attaches to the same bytes and every key is
there.  Nothing here touches a socket, a page allocator or the clock.

Layout (little-endian)::

    header, 64 bytes:  magic "XMPKV\\0\\0\\1" | u32 nslots | u32 slot_size
                       | u32 key_max | u32 value_max | u32 count | u32 tombstones
                       | 16 bytes hash salt | padding
    slot i at 64 + i * slot_size:
                       u8 state (EMPTY 0, FULL 1, DELETED 2) | u8 klen | u16 vlen
                       | u32 (unused) | key[key_max] | value[value_max]

Keys hash with BLAKE2b keyed by a per-table random salt kept in the header:
deterministic across processes (Python's ``hash`` is salted per process,
so a restored guest would look in the wrong slots) yet not predictable by
a client who wants every key in one probe chain.  Linear probing; a delete
leaves a tombstone; when live keys and tombstones fill the load limit the
table is rebuilt in place.  At most ``nslots * 7 // 8`` live keys: past
that a new key is refused ("full"), so a probe always meets an empty slot.

Every mutation runs to completion before the guest can suspend (the guest
applies requests on its one event-loop thread, and suspends from that same
loop), so a saved image never holds a half-written slot.
"""

from __future__ import annotations

import hashlib
import os
import struct

from xmp.errors import LocalError

MAGIC = b"XMPKV\0\0\1"
HEADER = struct.Struct("<8sIIIIII16s")
HEADER_SIZE = 64
SLOT_HEAD = struct.Struct("<BBHI")
EMPTY, FULL, DELETED = 0, 1, 2
KEY_MAX = 250          # klen is a byte
VALUE_MAX = 65535      # vlen is a u16


class TableFull(LocalError):
    """No room for one more key."""


def slot_size(key_max: int, value_max: int) -> int:
    return SLOT_HEAD.size + key_max + value_max


def table_bytes(nslots: int, key_max: int, value_max: int) -> int:
    return HEADER_SIZE + nslots * slot_size(key_max, value_max)


class KvTable:
    """The table over ``buf`` (writable, at least :func:`table_bytes` long)."""

    def __init__(self, buf: memoryview, *, _checked: bool = False):
        if not _checked:
            raise LocalError("use KvTable.format or KvTable.attach")
        self.buf = buf
        (_, self.nslots, self.slot_size, self.key_max, self.value_max,
         self._count, self._tombs, self.salt) = HEADER.unpack_from(buf)
        self.limit = self.nslots * 7 // 8

    @classmethod
    def format(cls, buf: memoryview, nslots: int, key_max: int = 64, value_max: int = 1024,
               salt: bytes | None = None) -> KvTable:
        """A new, empty table over ``buf`` (its bytes are overwritten)."""
        if not (1 <= key_max <= KEY_MAX and 0 <= value_max <= VALUE_MAX and nslots >= 2):
            raise LocalError(f"a table of {nslots} slots, keys <= {key_max}, values <= {value_max}")
        need = table_bytes(nslots, key_max, value_max)
        if len(buf) < need:
            raise LocalError(f"a table of {nslots} slots needs {need} bytes, not {len(buf)}")
        buf[:need] = bytes(need)
        salt = os.urandom(16) if salt is None else salt
        HEADER.pack_into(buf, 0, MAGIC, nslots, slot_size(key_max, value_max), key_max, value_max, 0, 0, salt)
        return cls(buf, _checked=True)

    @classmethod
    def attach(cls, buf: memoryview) -> KvTable:
        """The table a running (or restored) guest left in ``buf``, checked
        as fresh input: its RAM came from another host."""
        if len(buf) < HEADER_SIZE:
            raise LocalError(f"a kv table needs {HEADER_SIZE} bytes of header, not {len(buf)}")
        magic, nslots, size, kmax, vmax, count, tombs, _ = HEADER.unpack_from(buf)
        if magic != MAGIC:
            raise LocalError(f"no kv table here: magic {magic!r}")
        if not (1 <= kmax <= KEY_MAX and vmax <= VALUE_MAX and nslots >= 2
                and size == slot_size(kmax, vmax) and len(buf) >= table_bytes(nslots, kmax, vmax)
                and count + tombs <= nslots):
            raise LocalError(f"a kv table header that does not fit: {nslots} slots of {size} bytes, "
                             f"{count} keys, {tombs} tombstones in {len(buf)} bytes")
        return cls(buf, _checked=True)

    # -- lookups -----------------------------------------------------------------

    def __len__(self) -> int:
        return self._count

    def _home(self, key: bytes) -> int:
        h = hashlib.blake2b(key, digest_size=8, key=self.salt).digest()
        return int.from_bytes(h, "little") % self.nslots

    def _at(self, i: int) -> int:
        return HEADER_SIZE + i * self.slot_size

    def _find(self, key: bytes) -> tuple[int | None, int | None]:
        """(slot holding ``key`` or None, first reusable slot on its chain or None)."""
        buf, i, free = self.buf, self._home(key), None
        kmax = self.key_max
        for _ in range(self.nslots):
            at = self._at(i)
            state, klen, _, _ = SLOT_HEAD.unpack_from(buf, at)
            if state == EMPTY:
                return None, free if free is not None else i
            if state == DELETED:
                if free is None:
                    free = i
            elif klen == len(key) and buf[at + SLOT_HEAD.size:at + SLOT_HEAD.size + klen] == key:
                return i, free
            elif klen > kmax:
                raise LocalError(f"kv slot {i} claims a key of {klen} bytes")
            i = i + 1 if i + 1 < self.nslots else 0
        return None, free

    def _check(self, key: bytes, value: bytes | None = None) -> None:
        if not 1 <= len(key) <= self.key_max:
            raise LocalError(f"a key is 1..{self.key_max} bytes, not {len(key)}")
        if value is not None and len(value) > self.value_max:
            raise LocalError(f"a value is at most {self.value_max} bytes, not {len(value)}")

    def get(self, key: bytes) -> bytes | None:
        self._check(key)
        i, _ = self._find(key)
        if i is None:
            return None
        at = self._at(i)
        _, klen, vlen, _ = SLOT_HEAD.unpack_from(self.buf, at)
        if vlen > self.value_max:
            raise LocalError(f"kv slot {i} claims a value of {vlen} bytes")
        v = at + SLOT_HEAD.size + self.key_max
        return bytes(self.buf[v:v + vlen])

    def items(self) -> list[tuple[bytes, bytes]]:
        out = []
        for i in range(self.nslots):
            at = self._at(i)
            state, klen, vlen, _ = SLOT_HEAD.unpack_from(self.buf, at)
            if state == FULL:
                k = at + SLOT_HEAD.size
                v = k + self.key_max
                out.append((bytes(self.buf[k:k + klen]), bytes(self.buf[v:v + vlen])))
        return out

    # -- mutations ---------------------------------------------------------------

    def _write(self, i: int, key: bytes, value: bytes) -> None:
        at = self._at(i)
        k = at + SLOT_HEAD.size
        v = k + self.key_max
        self.buf[k:k + len(key)] = key
        self.buf[v:v + len(value)] = value
        SLOT_HEAD.pack_into(self.buf, at, FULL, len(key), len(value), 0)  # last: the slot is whole

    def _counts(self, count: int, tombs: int) -> None:
        self._count, self._tombs = count, tombs
        struct.pack_into("<II", self.buf, 24, count, tombs)  # the header's count, tombstones

    def put(self, key: bytes, value: bytes) -> bool:
        """Store ``value`` under ``key``; True if the key is new.  Raises
        :class:`TableFull` for a new key past the load limit."""
        self._check(key, value)
        i, free = self._find(key)
        if i is not None:
            self._write(i, key, value)
            return False
        if self._count >= self.limit:
            raise TableFull(f"the table holds {self._count} keys, its most")
        assert free is not None   # the load limit keeps an empty slot on every chain
        at = self._at(free)
        reused = self.buf[at] == DELETED
        if not reused and self._count + self._tombs + 1 > self.limit:
            self._rebuild()
            i, free = self._find(key)
            assert free is not None
            reused = False
        self._write(free, key, value)
        self._counts(self._count + 1, self._tombs - (1 if reused else 0))
        return True

    def delete(self, key: bytes) -> bool:
        """Remove ``key``; False if it was not there."""
        self._check(key)
        i, _ = self._find(key)
        if i is None:
            return False
        SLOT_HEAD.pack_into(self.buf, self._at(i), DELETED, 0, 0, 0)
        self._counts(self._count - 1, self._tombs + 1)
        return True

    def _rebuild(self) -> None:
        """Clear the tombstones: every live entry put again into a clean table."""
        live = self.items()
        end = table_bytes(self.nslots, self.key_max, self.value_max)
        self.buf[HEADER_SIZE:end] = bytes(end - HEADER_SIZE)
        self._counts(0, 0)
        for key, value in live:
            _, free = self._find(key)
            assert free is not None
            self._write(free, key, value)
        self._counts(len(live), 0)


# -- the line protocol ---------------------------------------------------------------
#
#   PUT <key> <value>\n   -> OK\n            (ERR full | ERR <why>)
#   GET <key>\n           -> OK <value>\n    | ERR nokey\n
#   DEL <key>\n           -> OK\n            | ERR nokey\n
#   COUNT\n               -> OK <keys>\n
#
# A key is printable ASCII without space (0x21..0x7e); a value is any bytes
# but CR and LF (a client stores binary data encoded).  A trailing CR is
# dropped, for telnet-like clients.  Anything else is answered ERR and the
# connection goes on.

def max_line(key_max: int, value_max: int) -> int:
    return len(b"PUT  \r\n") + key_max + value_max


def _key_ok(key: bytes) -> bool:
    return bool(key) and all(0x21 <= c <= 0x7e for c in key)


def answer(table: KvTable, line: bytes) -> bytes:
    """The reply to one request line (without its LF) -- never an exception
    for what a client sent."""
    if line.endswith(b"\r"):
        line = line[:-1]
    op, _, rest = line.partition(b" ")
    try:
        if op == b"PUT":
            key, sep, value = rest.partition(b" ")
            if not sep or not _key_ok(key) or b"\r" in value:
                return b"ERR usage: PUT <key> <value>\n"
            table.put(key, value)
            return b"OK\n"
        if op in (b"GET", b"DEL"):
            if not _key_ok(rest):
                return b"ERR usage: " + op + b" <key>\n"
            if op == b"GET":
                found = table.get(rest)
                return b"ERR nokey\n" if found is None else b"OK " + found + b"\n"
            return b"OK\n" if table.delete(rest) else b"ERR nokey\n"
        if op == b"COUNT" and not rest:
            return b"OK %d\n" % len(table)
    except TableFull:
        return b"ERR full\n"
    except LocalError as exc:
        return b"ERR " + str(exc).encode() + b"\n"
    return b"ERR unknown request\n"
