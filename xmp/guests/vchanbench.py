"""bench_vchan's two ends: ``args.role`` server (offers the vchan, streams
``args.bytes`` in 64 KiB writes, then echoes ``args.pings`` small messages)
or client (connects, reads and hashes the stream, then times the ping-pong).
Results go to the console as ``vchanbench: {json}`` lines."""

from __future__ import annotations

import hashlib
import json
import time

from xmp.libs import vchan

MiB = 1 << 20
CHUNK = 64 * 1024
PING = 64


def chunk(i: int) -> bytes:
    """The i-th 64 KiB write: a pattern that differs per write, so a lost
    or repeated chunk changes the hash."""
    seed = hashlib.sha256(i.to_bytes(8, "little")).digest()
    return (seed * (CHUNK // 32))[:CHUNK]


def _say(kernel, **fields) -> None:
    kernel.print("vchanbench: " + json.dumps(fields))


def _server(kernel, peer: int, path: str, total: int, pings: int) -> None:
    v = vchan.server_init(kernel, peer, path, MiB, MiB, blocking=True)
    _say(kernel, listening=True)
    while v.io.peer_live() == 2:
        v.wait(1)
    h = hashlib.sha256()
    chunks = [chunk(i) for i in range(16)]  # built before the clock, as the Pipe peer's
    for i in range(total // CHUNK):
        data = chunks[i % 16]
        v.write(data)
        h.update(data)
    _say(kernel, sent=total, sha=h.hexdigest())
    for _ in range(pings):
        v.write(v.recv(PING))
    _say(kernel, echoed=pings)
    kernel.sleep(0.5)
    v.close()


def _count_hypercalls(kernel) -> list[int]:
    """A counter of this domain's hypercalls (what a grant-copying client
    pays per step): one cell, bumped by every ``kernel.xen.call``."""
    count = [0]
    call = kernel.xen.call

    def counted(*args, **kwargs):
        count[0] += 1
        return call(*args, **kwargs)

    kernel.xen.call = counted
    return count


def _client(kernel, server: int, path: str, total: int, pings: int) -> None:
    v = vchan.client_init(kernel, server, f"/local/domain/{server}/{path}", blocking=True, timeout=20)
    calls = _count_hypercalls(kernel)
    h = hashlib.sha256()
    buf = bytearray(256 * 1024)
    view = memoryview(buf)
    got = 0
    t0 = time.perf_counter()
    while got < total:
        n = v.readinto(buf)
        if n == 0:
            break
        h.update(view[:n])
        got += n
    dt = time.perf_counter() - t0
    _say(kernel, received=got, sha=h.hexdigest(), seconds=dt, hypercalls=calls[0])
    calls[0] = 0
    msg = bytes(range(PING))
    t0 = time.perf_counter()
    ok = 0
    for _ in range(pings):
        v.write(msg)
        ok += v.recv(PING) == msg
    dt = time.perf_counter() - t0
    _say(kernel, pings=pings, echoed_ok=ok, seconds=dt, hypercalls=calls[0])
    kernel.sleep(0.5)
    v.close()


def main(kernel) -> None:
    a = kernel.args
    total, pings = int(a.get("bytes", 64 * MiB)), int(a.get("pings", 1000))
    path = a.get("path", "data/vchanbench")
    if a["role"] == "server":
        _server(kernel, int(a["peer"]), path, total, pings)
    else:
        _client(kernel, int(a["server"]), path, total, pings)
    kernel.idle()
