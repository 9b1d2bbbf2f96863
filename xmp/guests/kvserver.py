"""A key-value server guest reached over its vif: the line protocol of
:mod:`xmp.guests.kvtable` (GET / PUT / DEL / COUNT, answered OK / ERR) on
TCP ``args.port`` (default 7000) of the guest's own TCP/IP stack.

Its table lives in guest RAM -- a run of pages from the guest's page
allocator, laid out by :class:`~xmp.guests.kvtable.KvTable` -- and its
suspend context is only where that run is, so after ``xmp save`` +
``xmp restore`` (or a migration) every acknowledged key is there.

Durability: a write is acknowledged once it is in the table in RAM, and
not before.  RAM is what a save, a restore and a live migration carry (a
PV guest's state is its memory and vCPU context), so that is the promise
that matters when the guest moves; a disk would add surviving a crash or
a destroy, which is not this guest's job -- give it one (the migration
demo does, as ``xl migrate`` wants shared storage) and it is simply there
for other uses.  Sockets come and go: a move closes every connection (the
guest's network namespace is new on the new host), and the client
(:mod:`xmp.guests.kvclient`) reconnects and sends again what was not
answered; PUT is idempotent, so sending it twice is harmless.

Threads: connections are served on threads of their own (they block on
sockets), but every request is applied to the table on the guest's one
event-loop thread: a connection thread queues its lines and raises an IPI
port of ours, the loop answers them all.  The loop is also where the guest
suspends, so the table is never half-written in a saved image, and an
answer is sent only after its write is in RAM.  (Sending stays on the
connection threads: the loop pumps eth0, so it must never block on a
socket.)

Bounded: lines of at most :func:`~xmp.guests.kvtable.max_line` bytes
(longer ones are answered ERR and skipped), at most ``MAX_CONNECTIONS``
clients (one more is told ``ERR busy`` and closed), idle connections
closed after ``IDLE_TIMEOUT``; a client's garbage is answered ERR and
every other client is served on.

args: port (7000), slots (table slots, 8192), key_max (64), value_max (1024).
"""

from __future__ import annotations

import socket
import struct
import threading
from collections import deque

from xmp.drivers.net import stack
from xmp.guests.kvtable import KvTable, answer, max_line, table_bytes
from xmp.sharedmem.page import PAGE_SIZE

_CONTEXT = struct.Struct("<QQ")   # first pfn, pages of the table
MAX_CONNECTIONS = 64
IDLE_TIMEOUT = 600.0


class _Batch:
    """Lines of one connection waiting for the loop's answers."""

    __slots__ = ("lines", "replies", "done")

    def __init__(self, lines: list[bytes]):
        self.lines = lines
        self.replies: list[bytes] = []
        self.done = threading.Event()


class KvServer:
    def __init__(self, kernel, table: KvTable):
        self.k = kernel
        self.table = table
        self.queue: deque[_Batch] = deque()
        self.port = kernel.xen.bind_ipi()
        kernel.loop.bind(self.port, lambda _p: self._apply())
        self.slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self.line_max = max_line(table.key_max, table.value_max)

    def _apply(self) -> None:
        # On the loop's thread: nothing else writes the table, and no
        # suspend comes between a write and the reply that says it is done.
        q = self.queue
        while q:
            batch = q.popleft()
            batch.replies = [answer(self.table, line) for line in batch.lines]
            batch.done.set()

    def _ask(self, lines: list[bytes]) -> list[bytes]:
        if not lines:
            return []
        batch = _Batch(lines)
        self.queue.append(batch)
        self.k.xen.evt.send(self.port)
        batch.done.wait()
        return batch.replies

    def serve(self, srv: socket.socket) -> None:
        while True:
            conn, _ = srv.accept()
            if not self.slots.acquire(blocking=False):
                try:
                    conn.sendall(b"ERR busy\n")
                finally:
                    conn.close()
                continue
            threading.Thread(target=self._connection, args=(conn,), daemon=True).start()

    def _connection(self, conn: socket.socket) -> None:
        too_long = b"ERR line too long\n"
        try:
            conn.settimeout(IDLE_TIMEOUT)
            buf = b""
            skipping = False          # inside a line that was too long: drop up to its LF
            while chunk := conn.recv(1 << 16):
                buf += chunk
                lines: list[bytes | None] = []    # None: a line too long, answered so in its turn
                while (nl := buf.find(b"\n")) >= 0:
                    line, buf = buf[:nl], buf[nl + 1:]
                    if skipping:
                        skipping = False
                    else:
                        lines.append(line if len(line) <= self.line_max else None)
                if len(buf) > self.line_max:
                    if not skipping:
                        lines.append(None)
                    buf, skipping = b"", True
                if lines:
                    asked = self._ask([line for line in lines if line is not None])
                    it = iter(asked)
                    conn.sendall(b"".join(too_long if line is None else next(it) for line in lines))
        except OSError:
            pass   # the client went away (or idled out): its slot is free again
        finally:
            conn.close()
            self.slots.release()


def _table(kernel, args: dict) -> tuple[KvTable, int, int]:
    """The table: attached where it was (restored) or made in fresh pages."""
    if kernel.restored is not None:
        pfn, pages = _CONTEXT.unpack(kernel.restored)
        view = memoryview(kernel.memory)[pfn * PAGE_SIZE:(pfn + pages) * PAGE_SIZE]
        return KvTable.attach(view), pfn, pages
    slots = int(args.get("slots", 8192))
    kmax, vmax = int(args.get("key_max", 64)), int(args.get("value_max", 1024))
    pages = -(-table_bytes(slots, kmax, vmax) // PAGE_SIZE)
    pfn = kernel.alloc_pages(pages)   # not driver=True: the table is the guest's, it moves with it
    view = memoryview(kernel.memory)[pfn * PAGE_SIZE:(pfn + pages) * PAGE_SIZE]
    return KvTable.format(view, slots, kmax, vmax), pfn, pages


def main(kernel) -> None:
    args = kernel.args
    table, pfn, pages = _table(kernel, args)
    kernel.on_suspend(lambda: _CONTEXT.pack(pfn, pages))
    net = stack.start(kernel)
    server = KvServer(kernel, table)
    srv = socket.create_server(("0.0.0.0", int(args.get("port", 7000))), backlog=64)
    threading.Thread(target=server.serve, args=(srv,), name="kvserver", daemon=True).start()
    how = "restored" if kernel.restored is not None else "new"
    kernel.print(f"kvserver: serving {len(table)} keys ({how} table, {table.nslots} slots) on "
                 f"{' '.join(net.addresses) or 'no address'} port {srv.getsockname()[1]}")
    kernel.idle()   # the loop pumps eth0 and applies every request
