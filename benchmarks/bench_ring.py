#!/usr/bin/env python
"""xmp's ring + event channel fast path against the usual Python IPC.

    python benchmarks/bench_ring.py            # full run (a few minutes at most)
    python benchmarks/bench_ring.py --quick    # under 30 s
    python benchmarks/bench_ring.py --json     # one JSON object on stdout
    python benchmarks/bench_ring.py --pin      # sender and receiver on different CPUs

Every measurement runs between two OS processes on this machine:

(a) streaming throughput of 64-byte messages (msgs/s),
(b) throughput of 64 KiB payloads (bytes/s),
(c) ping-pong round trip of one 64-byte message (median and p99, us),

for these peers:

``xmp``
    :class:`FrontRing`/:class:`BackRing` over a :class:`SharedLink`, kicks
    with ``EventChannels.send``, waits with ``EventChannels.wait`` (adaptive
    spin, then the semaphore).  (a) puts 512 requests per call into a
    1024-slot ring (ring-page-order 5), each request answered by an 8-byte
    response; (b) carries payloads the Xen way: the frontend writes them
    into its RAM pages, a request names the 16 pages by persistent grant
    reference, the backend (domid 0) maps the grants of each batch of
    requests read-only (one map_grant_ref call), copies each 64 KiB out of
    the granter's RAM, unmaps and responds, with 8 payloads in flight;
    (c) one 64-byte request, one response, each side kicking the other and
    waiting with the default spin.
``pipe``
    ``multiprocessing.Pipe`` with ``send_bytes``/``recv_bytes``, one message
    per call (the honest per-message peer).  ``pipe-batched`` is reported too
    for (a), 256 messages per ``send_bytes``; the ratios and targets use
    ``pipe``.
``queue``
    ``multiprocessing.Queue`` (its feeder thread shares the sender's CPU
    when pinned).
``c-sem-floor`` / ``c-sem-floor-spin50us``
    (c) only: a raw process-shared POSIX semaphore ping-pong in C (xmp's
    ``xmp_bench_sem_pingpong``), pure sleep/wake and with a 50 us spin.

Placement: by default the scheduler places the processes, as it would a
user's.  Linux tends to keep a ping-ponging pair on one CPU here; xmp's
short poll before sleeping yields the CPU as it spins, so it does not
starve a peer that shares it.  ``--pin`` puts the sender on one CPU and
the receiving child on another, for every peer alike.

Every benchmark checks what arrived: the receiver compares each batch of
messages byte for byte with what the sender must have sent (sequence
numbers included, so loss, duplication and reordering show), each 64 KiB
payload likewise, and the sender checks the receiver's final tally.  A
check that fails makes that benchmark an error (exit status 1); missing a
performance target does not (exit status 0).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import queue
import random
import statistics
import struct
import sys
import time
from dataclasses import dataclass

import report  # benchmarks/report.py: the shared targets shape

from xmp.sharedmem._ffi import ffi, lib
from xmp.sharedmem.evtchn import Wake
from xmp.sharedmem.shm import PAGE_SIZE, ShmNamespace, leftovers
from xmp.testing import BACK_DOMID, LINK_PORT, LinkLayout, SharedLink, spawn_peer

MSG = 64                         # (a) and (c) message size
POOL_MSGS = 8192                 # distinct sequence numbers in the message pool
POOL_EXTRA = 2048                # >= any ring's nr_ents, so a batch's pool slice never wraps
PAYLOAD = 64 * 1024              # (b) payload size
PAYLOAD_PAGES = PAYLOAD // PAGE_SIZE
NR_PAYLOADS = 8                  # distinct payload bodies
SEED = 0x58656E                  # both processes build the same data from it
WAIT_SLICE = 0.5                 # s: longest single wait before re-checking the peer
STREAM_RING_ORDER = 5            # 128 KiB ring: 1024 slots of 64 bytes
BATCH_PIPE = 256                 # messages per send_bytes in pipe-batched
STREAM_CHUNK = 512               # xmp (a): requests per put_requests call (half the ring)

# (b) wire format: request = id, seq, 16 grant refs; response = id, seq, status
BULK_REQ = struct.Struct(f"<QQ{PAYLOAD_PAGES}I")
BULK_RSP = struct.Struct("<QQq")
BULK_RING_ORDER = 0              # 4 KiB ring: 32 slots of 80 bytes, like blkif's 32
U64 = struct.Struct("<Q")
RSP_A = 8                        # (a) response: u64, the last of a batch carries the tally


class BenchError(Exception):
    """A benchmark failed: wrong data, a dead peer, a timeout."""


# ---------------------------------------------------------------------------
# Deterministic data both ends can rebuild
# ---------------------------------------------------------------------------


def message_pool() -> bytes:
    """POOL_MSGS + POOL_EXTRA 64-byte messages; message q starts with its
    sequence number q % POOL_MSGS and is followed by 56 pseudo-random bytes.
    Sequence number i is sent as message i % POOL_MSGS; a batch starting at
    i is the slice at (i % POOL_MSGS) * 64, which never runs off the end."""
    rnd = random.Random(SEED)
    filler = rnd.randbytes((MSG - 8) * POOL_MSGS)
    base = b"".join(U64.pack(q) + filler[q * (MSG - 8):(q + 1) * (MSG - 8)]
                    for q in range(POOL_MSGS))
    return base + base[:POOL_EXTRA * MSG]


def payload_tails() -> list[bytes]:
    """Bodies of the 64 KiB payloads: payload i is u64 i + tails[i % NR_PAYLOADS]."""
    rnd = random.Random(SEED + 1)
    return [rnd.randbytes(PAYLOAD - 8) for _ in range(NR_PAYLOADS)]


def check_payload(data, seq: int, tails) -> bool:
    """Whole-payload check without extra copies (memcmp via startswith/endswith)."""
    return (len(data) == PAYLOAD and data.startswith(U64.pack(seq))
            and data.endswith(tails[seq % NR_PAYLOADS]))


def ping_message(seq: int, filler: bytes) -> bytes:
    return U64.pack(seq) + filler


def percentile(sorted_vals, q: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    k = max(0, min(len(sorted_vals) - 1, int(-(-q * len(sorted_vals) // 1)) - 1))
    return sorted_vals[k]


def latency_stats(ns: list[int]) -> dict:
    ns = sorted(ns)
    return {"c_rtt_median_us": statistics.median(ns) / 1e3,
            "c_rtt_p99_us": percentile(ns, 0.99) / 1e3}


# Placement.  Left to itself, Linux (wake-affine, and this VM's vCPUs share
# no cache level the scheduler would search for an idle sibling) keeps a
# ping-ponging pair on ONE CPU, where any spinning wait only burns the time
# the peer needs.  With --pin every peer runs with the sending process on
# one CPU and the receiving child on another (the child learns its CPU from
# this variable, which spawned children inherit).
CHILD_CPU_ENV = "XMP_BENCH_CHILD_CPU"


def _pin_child() -> None:
    cpu = os.environ.get(CHILD_CPU_ENV)
    if cpu:
        os.sched_setaffinity(0, {int(cpu)})


def pin_processes() -> tuple[set, str]:
    """Pin this process to its first allowed CPU and tell children to take
    the second.  Returns (previous affinity, description)."""
    prev = os.sched_getaffinity(0)
    cpus = sorted(prev)
    if len(cpus) < 2:
        return prev, f"not pinned (only CPU {cpus} allowed)"
    os.sched_setaffinity(0, {cpus[0]})
    os.environ[CHILD_CPU_ENV] = str(cpus[1])
    return prev, f"sender on CPU {cpus[0]}, receiver on CPU {cpus[1]}"


def unpin_processes(prev: set) -> None:
    os.environ.pop(CHILD_CPU_ENV, None)
    os.sched_setaffinity(0, prev)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------
# xmp: waiting helpers
# ---------------------------------------------------------------------------


def _sleep(ev, proc, deadline: float, what: str) -> None:
    """One wait on our event object (spin, then semaphore) and a scan.  On a
    timeout slice, fail if the peer died or the deadline passed."""
    if ev.wait(timeout=WAIT_SLICE) == Wake.TIMEOUT:
        if proc is not None and not proc.is_alive():
            raise BenchError(f"{what}: peer exited with status {proc.exitcode}")
        if time.monotonic() > deadline:
            raise BenchError(f"{what}: timed out")
    ev.scan()


def _await_ready(link: SharedLink, proc, deadline: float, what: str) -> None:
    """The peer kicks our event channel once its rings are attached."""
    while True:
        if link.front_ev.wait(timeout=WAIT_SLICE) != Wake.TIMEOUT:
            link.front_ev.scan()
            return
        if not proc.is_alive():
            raise BenchError(f"{what}: peer exited with status {proc.exitcode} before it was ready")
        if time.monotonic() > deadline:
            raise BenchError(f"{what}: peer never became ready")


def _peer_gone(proc, what: str, why) -> BenchError:
    proc.join(2)
    return BenchError(f"{what}: {why}; peer exit status {proc.exitcode}")


def _finish_peer(proc, what: str, timeout: float = 30.0) -> None:
    proc.join(timeout)
    if proc.is_alive():
        proc.terminate()
        proc.join(5)
        if proc.is_alive():
            proc.kill()
            proc.join()
        raise BenchError(f"{what}: peer did not finish")
    if proc.exitcode != 0:
        raise BenchError(f"{what}: peer exited with status {proc.exitcode}")


# ---------------------------------------------------------------------------
# xmp (a): streaming 64-byte messages
# ---------------------------------------------------------------------------


def _xmp_stream_back(link: SharedLink, n: int, timeout: float) -> None:
    """Backend: consume every request, compare each batch with the pool,
    answer each request with 8 bytes (the batch's last one: the tally)."""
    _pin_child()
    deadline = time.monotonic() + timeout
    pool = message_pool()
    ring = link.back_ring(MSG, RSP_A)
    ev = link.back_ev
    link.front_ev.send(LINK_PORT)          # ready
    got = 0
    while got < n:
        data = ring.get_requests()
        if data:
            k = len(data) // MSG
            if not pool.startswith(data, (got % POOL_MSGS) * MSG):
                raise BenchError(f"stream: batch of {k} at seq {got} differs from what was sent")
            got += k
            ring.put_responses(bytes((k - 1) * RSP_A) + U64.pack(got))
            if ring.push_responses_and_check_notify():
                link.front_ev.send(LINK_PORT)
            continue
        if ring.final_check_for_requests():
            continue
        _sleep(ev, None, deadline, "stream backend")
    if got != n:
        raise BenchError(f"stream: backend got {got} messages, expected {n}")


def bench_xmp_stream(ns: ShmNamespace, n: int, timeout: float) -> float:
    what = "xmp stream"
    link = SharedLink.create(ns, LinkLayout(ring_page_order=STREAM_RING_ORDER))
    proc = None
    try:
        front = link.front_ring(MSG, RSP_A)
        if front.nr_ents > POOL_EXTRA:
            raise BenchError(f"{what}: {front.nr_ents} slots outrun the check pool")
        chunk = min(STREAM_CHUNK, front.nr_ents)
        pool = message_pool()
        mv = memoryview(pool)
        deadline = time.monotonic() + timeout
        proc = spawn_peer(link, _xmp_stream_back, n, timeout)
        _await_ready(link, proc, deadline, what)
        ev = link.front_ev
        sent = recvd = 0
        last = b""
        t0 = time.perf_counter()
        while recvd < n:
            put = 0
            if sent < n:
                off = (sent % POOL_MSGS) * MSG
                put = front.put_requests(mv[off:off + min(chunk, n - sent) * MSG])
                if put:
                    sent += put
                    if front.push_requests_and_check_notify():
                        link.back_ev.send(LINK_PORT)
            data = front.get_responses()
            if data:
                recvd += len(data) // RSP_A
                last = data
                continue
            if put or front.final_check_for_responses():
                continue
            _sleep(ev, proc, deadline, what)
        dt = time.perf_counter() - t0
        del mv
        tally = U64.unpack_from(last, len(last) - RSP_A)[0]
        if recvd != n or tally != n:
            raise BenchError(f"{what}: {recvd} responses, backend verified {tally}, expected {n}")
        _finish_peer(proc, what)
        return n / dt
    finally:
        _reap(proc)
        link.close()


def _reap(proc) -> None:
    if proc is not None and proc.is_alive():
        proc.terminate()
        proc.join(5)
        if proc.is_alive():
            proc.kill()
            proc.join()


# ---------------------------------------------------------------------------
# xmp (b): 64 KiB payloads through granted pages
# ---------------------------------------------------------------------------


def _xmp_bulk_back(link: SharedLink, n: int, timeout: float) -> None:
    """Backend (dom0) with persistent grants, as blkback's feature-persistent:
    a ref is mapped (checked and pinned) the first time a request names it
    and stays mapped; each payload is copied out of the frontend's RAM,
    checked, and answered.  Everything is unmapped at the end."""
    _pin_child()
    deadline = time.monotonic() + timeout
    tails = payload_tails()
    ring = link.back_ring(BULK_REQ.size, BULK_RSP.size)
    active = link.active_grants()
    ram = link.ram
    ram_pages = len(ram) // PAGE_SIZE
    ev = link.back_ev
    persistent: dict[int, int] = {}        # gref -> frame, mapped read-only
    link.front_ev.send(LINK_PORT)          # ready
    got = 0
    try:
        while got < n:
            reqs = ring.get_requests()
            if reqs:
                rsps = []
                for bid, seq, *refs in BULK_REQ.iter_unpack(reqs):
                    new = [r for r in refs if r not in persistent]
                    if new:
                        persistent.update(zip(new, active.map_grant_ref(new, BACK_DOMID, readonly=True),
                                              strict=True))
                    fr = [persistent[r] for r in refs]
                    f0 = fr[0]
                    if fr == list(range(f0, f0 + PAYLOAD_PAGES)) and f0 + PAYLOAD_PAGES <= ram_pages:
                        data = ram[f0 * PAGE_SIZE:f0 * PAGE_SIZE + PAYLOAD]  # one copy
                    else:                  # scattered pages (or bad frames: caught below)
                        data = b"".join(ram[f * PAGE_SIZE:(f + 1) * PAGE_SIZE] for f in fr)
                    if seq != got or not check_payload(data, seq, tails):
                        raise BenchError(f"bulk: payload {got} (request says {seq}) is not what was sent")
                    got += 1
                    rsps.append(BULK_RSP.pack(bid, seq, 0))
                ring.put_responses(b"".join(rsps))
                if ring.push_responses_and_check_notify():
                    link.front_ev.send(LINK_PORT)
                continue
            if ring.final_check_for_requests():
                continue
            _sleep(ev, None, deadline, "bulk backend")
    finally:
        active.unmap_grant_ref(list(persistent), readonly=True)


def bench_xmp_bulk(ns: ShmNamespace, n: int, nbuf: int, timeout: float) -> float:
    what = "xmp bulk"
    layout = LinkLayout(ring_page_order=BULK_RING_ORDER, data_pages=nbuf * PAYLOAD_PAGES)
    link = SharedLink.create(ns, layout)
    proc = None
    try:
        front = link.front_ring(BULK_REQ.size, BULK_RSP.size)
        if front.nr_ents < nbuf:
            raise BenchError(f"{what}: {nbuf} buffers but only {front.nr_ents} ring slots")
        gt = link.grant_table()
        # Persistent grants: each buffer's 16 pages are granted once, read-only.
        grefs = [[gt.grant_foreign_access(BACK_DOMID, b * PAYLOAD_PAGES + p, readonly=True)
                  for p in range(PAYLOAD_PAGES)] for b in range(nbuf)]
        tails = payload_tails()
        ram = link.ram
        deadline = time.monotonic() + timeout
        proc = spawn_peer(link, _xmp_bulk_back, n, timeout)
        _await_ready(link, proc, deadline, what)
        ev = link.front_ev
        free = list(range(nbuf))
        inflight = [None] * nbuf
        sent = done = 0
        t0 = time.perf_counter()
        while done < n:
            while free and sent < n:
                b = free.pop()
                off = b * PAYLOAD
                ram[off + 8:off + PAYLOAD] = tails[sent % NR_PAYLOADS]
                U64.pack_into(ram, off, sent)
                front.put_request(BULK_REQ.pack(b, sent, *grefs[b]))
                inflight[b] = sent
                sent += 1
                if front.push_requests_and_check_notify():
                    link.back_ev.send(LINK_PORT)
            rsps = front.get_responses()
            if rsps:
                for bid, seq, status in BULK_RSP.iter_unpack(rsps):
                    if status != 0 or bid >= nbuf or inflight[bid] != seq:
                        raise BenchError(f"{what}: bad response id={bid} seq={seq} status={status}")
                    inflight[bid] = None
                    free.append(bid)
                    done += 1
                continue
            if front.final_check_for_responses():
                continue
            _sleep(ev, proc, deadline, what)
        dt = time.perf_counter() - t0
        _finish_peer(proc, what)
        for refs in grefs:
            for ref in refs:
                gt.end_foreign_access(ref)
        return n * PAYLOAD / dt
    finally:
        _reap(proc)
        link.close()


# ---------------------------------------------------------------------------
# xmp (c): ping-pong
# ---------------------------------------------------------------------------


def _xmp_ping_back(link: SharedLink, n: int, timeout: float) -> None:
    _pin_child()
    deadline = time.monotonic() + timeout
    ring = link.back_ring(MSG, MSG)
    ev = link.back_ev
    link.front_ev.send(LINK_PORT)          # ready
    for i in range(n):
        # final_check: look, arm req_event, look again.  When idle, scan
        # (clear the upcall) and look once more *before* waiting, so that
        # the scan is done while the peer works, not after it kicks us.
        while not ring.final_check_for_requests():
            ev.scan()
            if ring.final_check_for_requests():
                break
            if ev.wait(timeout=WAIT_SLICE) == Wake.TIMEOUT and time.monotonic() > deadline:
                raise BenchError("ping backend: timed out")
        req = ring.get_request()
        if U64.unpack_from(req)[0] != i:
            raise BenchError(f"ping: request {i} carries seq {U64.unpack_from(req)[0]}")
        ring.put_response(req)
        if ring.push_responses_and_check_notify():
            link.front_ev.send(LINK_PORT)


def bench_xmp_ping(ns: ShmNamespace, warm: int, rounds: int, timeout: float) -> dict:
    what = "xmp ping-pong"
    link = SharedLink.create(ns, LinkLayout(ring_page_order=0))
    proc = None
    try:
        front = link.front_ring(MSG, MSG)
        filler = random.Random(SEED + 2).randbytes(MSG - 8)
        total = warm + rounds
        deadline = time.monotonic() + timeout
        proc = spawn_peer(link, _xmp_ping_back, total, timeout)
        _await_ready(link, proc, deadline, what)
        fev, bev = link.front_ev, link.back_ev
        lat = []
        clock = time.perf_counter_ns
        for i in range(total):
            msg = ping_message(i, filler)
            t0 = clock()
            front.put_request(msg)
            if front.push_requests_and_check_notify():
                bev.send(LINK_PORT)
            while not front.final_check_for_responses():
                fev.scan()                 # as in the backend: scan before waiting
                if front.final_check_for_responses():
                    break
                if fev.wait(timeout=WAIT_SLICE) == Wake.TIMEOUT:
                    if not proc.is_alive() or time.monotonic() > deadline:
                        raise BenchError(f"{what}: no response to round {i}")
            rsp = front.get_response()
            t1 = clock()
            if rsp != msg:
                raise BenchError(f"{what}: round {i} came back different")
            if i >= warm:
                lat.append(t1 - t0)
        _finish_peer(proc, what)
        return latency_stats(lat)
    finally:
        _reap(proc)
        link.close()


# ---------------------------------------------------------------------------
# c-sem-floor (c)
# ---------------------------------------------------------------------------


def _sem_back(link: SharedLink, phases) -> None:
    _pin_child()
    area = ffi.from_buffer("uint8_t[]", link.ram, require_writable=True)
    try:
        link.front_ev.send(LINK_PORT)      # ready
        for rounds, spin_ns in phases:
            lib.xmp_bench_sem_pingpong(area, 0, rounds, spin_ns, ffi.NULL)
    finally:
        ffi.release(area)


def bench_sem_floor(ns: ShmNamespace, warm: int, rounds: int, spins_ns: list[int],
                    timeout: float) -> list[dict]:
    what = "c-sem-floor"
    link = SharedLink.create(ns, LinkLayout(data_pages=1))
    area = ffi.from_buffer("uint8_t[]", link.ram, require_writable=True)
    proc = None
    inited = False
    try:
        rc = lib.xmp_bench_sem_init(area)
        if rc:
            raise BenchError(f"{what}: sem_init failed ({rc})")
        inited = True
        deadline = time.monotonic() + timeout
        proc = spawn_peer(link, _sem_back, [(warm + rounds, s) for s in spins_ns])
        _await_ready(link, proc, deadline, what)
        out = []
        for spin in spins_ns:
            lib.xmp_bench_sem_pingpong(area, 1, warm, spin, ffi.NULL)
            lat = ffi.new("int64_t[]", rounds)
            lib.xmp_bench_sem_pingpong(area, 1, rounds, spin, lat)
            vals = list(lat)
            # Each round's time is written only after the responder's post
            # was taken: every slot filled means every ping was answered.
            if len(vals) != rounds or min(vals) <= 0:
                raise BenchError(f"{what}: {sum(v <= 0 for v in vals)} rounds not answered")
            out.append(latency_stats(vals))
        _finish_peer(proc, what)
        return out
    finally:
        _reap(proc)
        if inited:
            lib.xmp_bench_sem_destroy(area)
        ffi.release(area)
        link.close()


# ---------------------------------------------------------------------------
# multiprocessing.Pipe and multiprocessing.Queue
# ---------------------------------------------------------------------------


def _mp():
    return multiprocessing.get_context("spawn")


def _pipe_stream_recv(conn, n: int, batch: int) -> None:
    """Receive n 64-byte messages (batch per send_bytes), compare each with
    the pool, send back the tally."""
    _pin_child()
    pool = message_pool()
    conn.send_bytes(b"ready")
    got = 0
    while got < n:
        data = conn.recv_bytes()
        if not pool.startswith(data, (got % POOL_MSGS) * MSG) or len(data) % MSG:
            raise BenchError(f"pipe stream: data at seq {got} differs from what was sent")
        got += len(data) // MSG
    conn.send_bytes(U64.pack(got))
    conn.close()


def bench_pipe_stream(n: int, batch: int, timeout: float) -> float:
    what = f"pipe stream (batch {batch})"
    ctx = _mp()
    ours, theirs = ctx.Pipe()
    proc = ctx.Process(target=_pipe_stream_recv, args=(theirs, n, batch), daemon=True)
    try:
        proc.start()
        theirs.close()
        if not ours.poll(timeout) or ours.recv_bytes() != b"ready":
            raise BenchError(f"{what}: receiver not ready")
        pool = message_pool()
        if batch == 1:
            msgs = [pool[q * MSG:(q + 1) * MSG] for q in range(POOL_MSGS)]
            send = ours.send_bytes
            t0 = time.perf_counter()
            for i in range(n):
                send(msgs[i % POOL_MSGS])
        else:
            mv = memoryview(pool)
            t0 = time.perf_counter()
            sent = 0
            while sent < n:
                k = min(batch, n - sent)
                off = (sent % POOL_MSGS) * MSG
                ours.send_bytes(mv[off:off + k * MSG])
                sent += k
        if not ours.poll(timeout):
            raise BenchError(f"{what}: no tally from the receiver")
        tally = U64.unpack(ours.recv_bytes())[0]
        dt = time.perf_counter() - t0
        if tally != n:
            raise BenchError(f"{what}: receiver verified {tally}, expected {n}")
        _finish_peer(proc, what)
        return n / dt
    except (OSError, EOFError) as exc:
        raise _peer_gone(proc, what, f"{type(exc).__name__}: {exc}") from None
    finally:
        ours.close()
        _reap(proc)


def _pipe_bulk_recv(conn, n: int) -> None:
    _pin_child()
    tails = payload_tails()
    conn.send_bytes(b"ready")
    for i in range(n):
        if not check_payload(conn.recv_bytes(), i, tails):
            raise BenchError(f"pipe bulk: payload {i} is not what was sent")
    conn.send_bytes(U64.pack(n))
    conn.close()


def bench_pipe_bulk(n: int, timeout: float) -> float:
    what = "pipe bulk"
    ctx = _mp()
    ours, theirs = ctx.Pipe()
    proc = ctx.Process(target=_pipe_bulk_recv, args=(theirs, n), daemon=True)
    try:
        proc.start()
        theirs.close()
        if not ours.poll(timeout) or ours.recv_bytes() != b"ready":
            raise BenchError(f"{what}: receiver not ready")
        tails = payload_tails()
        buf = bytearray(PAYLOAD)
        t0 = time.perf_counter()
        for i in range(n):
            buf[8:] = tails[i % NR_PAYLOADS]   # same work as xmp's write into its RAM
            U64.pack_into(buf, 0, i)
            ours.send_bytes(buf)
        if not ours.poll(timeout):
            raise BenchError(f"{what}: no tally from the receiver")
        tally = U64.unpack(ours.recv_bytes())[0]
        dt = time.perf_counter() - t0
        if tally != n:
            raise BenchError(f"{what}: receiver verified {tally}, expected {n}")
        _finish_peer(proc, what)
        return n * PAYLOAD / dt
    except (OSError, EOFError) as exc:
        raise _peer_gone(proc, what, f"{type(exc).__name__}: {exc}") from None
    finally:
        ours.close()
        _reap(proc)


def _pipe_ping_echo(conn, n: int) -> None:
    _pin_child()
    conn.send_bytes(b"ready")
    for i in range(n):
        m = conn.recv_bytes()
        if U64.unpack_from(m)[0] != i:
            raise BenchError(f"pipe ping: round {i} carries seq {U64.unpack_from(m)[0]}")
        conn.send_bytes(m)
    conn.close()


def bench_pipe_ping(warm: int, rounds: int, timeout: float) -> dict:
    what = "pipe ping-pong"
    ctx = _mp()
    ours, theirs = ctx.Pipe()
    total = warm + rounds
    proc = ctx.Process(target=_pipe_ping_echo, args=(theirs, total), daemon=True)
    try:
        proc.start()
        theirs.close()
        if not ours.poll(timeout) or ours.recv_bytes() != b"ready":
            raise BenchError(f"{what}: peer not ready")
        filler = random.Random(SEED + 2).randbytes(MSG - 8)
        clock = time.perf_counter_ns
        send, recv = ours.send_bytes, ours.recv_bytes
        lat = []
        for i in range(total):
            msg = ping_message(i, filler)
            t0 = clock()
            send(msg)
            rsp = recv()
            t1 = clock()
            if rsp != msg:
                raise BenchError(f"{what}: round {i} came back different")
            if i >= warm:
                lat.append(t1 - t0)
        _finish_peer(proc, what)
        return latency_stats(lat)
    except (OSError, EOFError) as exc:
        raise _peer_gone(proc, what, f"{type(exc).__name__}: {exc}") from None
    finally:
        ours.close()
        _reap(proc)


def _queue_stream_recv(q, ctl, n: int) -> None:
    _pin_child()
    pool = message_pool()
    ctl.put(b"ready")
    for i in range(n):
        off = (i % POOL_MSGS) * MSG
        m = q.get()
        if len(m) != MSG or not pool.startswith(m, off):
            raise BenchError(f"queue stream: message {i} differs from what was sent")
    ctl.put(n)


def _queue_bulk_recv(q, ctl, n: int) -> None:
    _pin_child()
    tails = payload_tails()
    ctl.put(b"ready")
    for i in range(n):
        if not check_payload(q.get(), i, tails):
            raise BenchError(f"queue bulk: payload {i} is not what was sent")
    ctl.put(n)


def _queue_ping_echo(q, ctl, n: int) -> None:
    _pin_child()
    ctl.put(b"ready")
    for i in range(n):
        m = q.get()
        if U64.unpack_from(m)[0] != i:
            raise BenchError(f"queue ping: round {i} carries seq {U64.unpack_from(m)[0]}")
        ctl.put(m)


def _queue_run(target, n: int, timeout: float, what: str, body):
    """Start target(q, ctl, n) in a child; body(q, ctl) does the sending and
    returns the result."""
    ctx = _mp()
    q, ctl = ctx.Queue(), ctx.Queue()
    proc = ctx.Process(target=target, args=(q, ctl, n), daemon=True)
    ok = False
    try:
        proc.start()
        try:
            if ctl.get(timeout=timeout) != b"ready":
                raise BenchError(f"{what}: peer not ready")
            result = body(q, ctl)
        except queue.Empty:
            raise _peer_gone(proc, what, "no answer") from None
        _finish_peer(proc, what)
        ok = True
        return result
    finally:
        _reap(proc)
        for qq in (q, ctl):
            if not ok:
                # the reader is gone: don't wait for the feeder to flush
                qq.cancel_join_thread()
            qq.close()
            qq.join_thread()


def bench_queue_stream(n: int, timeout: float) -> float:
    def body(q, ctl):
        pool = message_pool()
        msgs = [pool[j * MSG:(j + 1) * MSG] for j in range(POOL_MSGS)]
        put = q.put
        t0 = time.perf_counter()
        for i in range(n):
            put(msgs[i % POOL_MSGS])
        tally = ctl.get(timeout=timeout)
        dt = time.perf_counter() - t0
        if tally != n:
            raise BenchError(f"queue stream: receiver verified {tally}, expected {n}")
        return n / dt
    return _queue_run(_queue_stream_recv, n, timeout, "queue stream", body)


def bench_queue_bulk(n: int, timeout: float) -> float:
    def body(q, ctl):
        tails = payload_tails()
        t0 = time.perf_counter()
        for i in range(n):
            # a fresh object each time: Queue pickles in a feeder thread, later
            q.put(U64.pack(i) + tails[i % NR_PAYLOADS])
        tally = ctl.get(timeout=timeout)
        dt = time.perf_counter() - t0
        if tally != n:
            raise BenchError(f"queue bulk: receiver verified {tally}, expected {n}")
        return n * PAYLOAD / dt
    return _queue_run(_queue_bulk_recv, n, timeout, "queue bulk", body)


def bench_queue_ping(warm: int, rounds: int, timeout: float) -> dict:
    def body(q, ctl):
        filler = random.Random(SEED + 2).randbytes(MSG - 8)
        clock = time.perf_counter_ns
        lat = []
        for i in range(warm + rounds):
            msg = ping_message(i, filler)
            t0 = clock()
            q.put(msg)
            rsp = ctl.get(timeout=timeout)
            t1 = clock()
            if rsp != msg:
                raise BenchError(f"queue ping: round {i} came back different")
            if i >= warm:
                lat.append(t1 - t0)
        return latency_stats(lat)
    return _queue_run(_queue_ping_echo, warm + rounds, timeout, "queue ping-pong", body)


# ---------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Sizes:
    xmp_msgs: int
    pipe_msgs: int
    pipe_batched_msgs: int
    queue_msgs: int
    xmp_payloads: int
    pipe_payloads: int
    queue_payloads: int
    warm: int
    rounds: int
    bulk_buffers: int = 8
    repeats: int = 1
    timeout: float = 60.0


QUICK = Sizes(xmp_msgs=3_000_000, pipe_msgs=100_000, pipe_batched_msgs=2_000_000,
              queue_msgs=40_000, xmp_payloads=4_000, pipe_payloads=2_000,
              queue_payloads=1_000, warm=500, rounds=5_000, repeats=3, timeout=20.0)
FULL = Sizes(xmp_msgs=20_000_000, pipe_msgs=500_000, pipe_batched_msgs=10_000_000,
             queue_msgs=150_000, xmp_payloads=40_000, pipe_payloads=20_000,
             queue_payloads=4_000, warm=2_000, rounds=30_000, repeats=5, timeout=120.0)

# --smoke: just enough to prove every peer still runs and verifies (the suite's check)
SMOKE = Sizes(xmp_msgs=100_000, pipe_msgs=5_000, pipe_batched_msgs=50_000, queue_msgs=2_000,
              xmp_payloads=200, pipe_payloads=100, queue_payloads=50, warm=50, rounds=300,
              repeats=1, timeout=20.0)

SEM_SPIN_NS = 50_000
METRICS = ("a_msgs_per_s", "b_bytes_per_s", "c_rtt_median_us", "c_rtt_p99_us")
TARGETS = {  # name: (metric, target, better)
    "a_msgs_vs_pipe": ("a_msgs_per_s", 10.0, "higher"),
    "b_bytes_vs_pipe": ("b_bytes_per_s", 10.0, "higher"),
    "c_median_vs_pipe": ("c_rtt_median_us", 0.5, "lower"),
    "c_p99_vs_pipe": ("c_rtt_p99_us", 1.0, "lower"),
}


def _best(values: list, better: str):
    """Throughputs: the best of the repeats; latencies: the median run."""
    if better == "higher":
        return max(values)
    return statistics.median(values)


def run(sizes: Sizes) -> tuple[dict, list[str]]:
    ns = ShmNamespace()
    results: dict[str, dict] = {p: {} for p in
                                ("xmp", "pipe", "pipe-batched", "queue",
                                 "c-sem-floor", "c-sem-floor-spin50us")}
    errors: list[str] = []
    to = sizes.timeout

    def measure(peer: str, label: str, fn, *args):
        samples = []
        for r in range(sizes.repeats):
            log(f"  {peer:<17} {label} [{r + 1}/{sizes.repeats}]")
            try:
                samples.append(fn(*args))
            except Exception as exc:  # reported; the run continues
                errors.append(f"{peer} {label}: {type(exc).__name__}: {exc}")
                log(f"    ERROR {errors[-1]}")
                return None
        return samples

    def store_rate(peer, metric, samples):
        if samples:
            results[peer][metric] = _best(samples, "higher")

    def store_lat(peer, samples):
        if samples:
            for m in ("c_rtt_median_us", "c_rtt_p99_us"):
                results[peer][m] = statistics.median(s[m] for s in samples)

    log("(a) 64-byte message streaming")
    store_rate("xmp", "a_msgs_per_s",
               measure("xmp", "stream", bench_xmp_stream, ns, sizes.xmp_msgs, to))
    store_rate("pipe", "a_msgs_per_s",
               measure("pipe", "stream", bench_pipe_stream, sizes.pipe_msgs, 1, to))
    store_rate("pipe-batched", "a_msgs_per_s",
               measure("pipe-batched", "stream", bench_pipe_stream, sizes.pipe_batched_msgs,
                       BATCH_PIPE, to))
    store_rate("queue", "a_msgs_per_s",
               measure("queue", "stream", bench_queue_stream, sizes.queue_msgs, to))

    log("(b) 64 KiB payloads")
    store_rate("xmp", "b_bytes_per_s",
               measure("xmp", "bulk", bench_xmp_bulk, ns, sizes.xmp_payloads,
                       sizes.bulk_buffers, to))
    store_rate("pipe", "b_bytes_per_s",
               measure("pipe", "bulk", bench_pipe_bulk, sizes.pipe_payloads, to))
    store_rate("queue", "b_bytes_per_s",
               measure("queue", "bulk", bench_queue_bulk, sizes.queue_payloads, to))

    log("(c) ping-pong round trip")
    store_lat("xmp", measure("xmp", "ping-pong", bench_xmp_ping, ns, sizes.warm, sizes.rounds, to))
    store_lat("pipe", measure("pipe", "ping-pong", bench_pipe_ping, sizes.warm, sizes.rounds, to))
    store_lat("queue", measure("queue", "ping-pong", bench_queue_ping, sizes.warm, sizes.rounds,
                               to))
    sem = measure("c-sem-floor", "ping-pong", bench_sem_floor, ns, sizes.warm, sizes.rounds,
                  [0, SEM_SPIN_NS], to)
    if sem:
        store_lat("c-sem-floor", [s[0] for s in sem])
        store_lat("c-sem-floor-spin50us", [s[1] for s in sem])
    return {p: r for p, r in results.items() if r}, errors


def ratios_of(results: dict) -> dict:
    xmp = results.get("xmp", {})
    out = {}
    for peer, vals in results.items():
        if peer == "xmp":
            continue
        r = {m: xmp[m] / vals[m] for m in METRICS if m in xmp and vals.get(m)}
        if r:
            out[peer] = r
    return out


def targets_of(ratios: dict) -> dict:
    out = {}
    pipe = ratios.get("pipe", {})
    for name, (metric, target, better) in TARGETS.items():
        measured = pipe.get(metric)
        out[name] = report.entry(measured, target, better)
    return out


def _fmt(metric: str, v) -> str:
    if v is None:
        return "-"
    if metric == "a_msgs_per_s":
        return f"{v / 1e6:.3f} M/s"
    if metric == "b_bytes_per_s":
        return f"{v / 1e6:,.0f} MB/s"
    return f"{v:,.1f} us"


HEADERS = {"a_msgs_per_s": "(a) 64 B msgs", "b_bytes_per_s": "(b) 64 KiB bytes",
           "c_rtt_median_us": "(c) RTT median", "c_rtt_p99_us": "(c) RTT p99"}


def print_report(results: dict, ratios: dict, targets: dict, errors: list[str],
                 sizes: Sizes, elapsed: float, placement: str) -> None:
    w = 18
    print(f"xmp ring benchmark: {'quick' if sizes is QUICK else 'full'} run, {elapsed:.1f} s, "
          f"{len(os.sched_getaffinity(0))} CPUs, {placement}")
    print(f"throughput: best of {sizes.repeats} runs; latency: median over {sizes.repeats} "
          f"runs of each run's median / p99 ({sizes.rounds} round trips per run)")
    print()
    print(f"{'peer':<18}" + "".join(f"{HEADERS[m]:>{w}}" for m in METRICS))
    for peer, vals in results.items():
        print(f"{peer:<18}" + "".join(f"{_fmt(m, vals.get(m)):>{w}}" for m in METRICS))
    print()
    print("ratios xmp / peer  (throughput: higher is better for xmp; latency: lower is)")
    print(f"{'peer':<18}" + "".join(f"{HEADERS[m]:>{w}}" for m in METRICS))
    for peer, vals in ratios.items():
        print(f"{peer:<18}" + "".join(
            f"{(f'{vals[m]:.2f}x' if m in vals else '-'):>{w}}" for m in METRICS))
    print()
    report.print_targets("targets (xmp vs per-message multiprocessing.Pipe)", targets, 18)
    report.print_list("ERRORS (these measurements are missing):", errors)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a short run (under 30 s)")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--smoke", action="store_true", help="a tiny run that only proves it works")
    ap.add_argument("--pin", action="store_true",
                    help="pin sender and receiver to different CPUs (default: the scheduler places them)")
    args = ap.parse_args(argv)
    sizes = SMOKE if args.smoke else QUICK if args.quick else FULL
    t0 = time.monotonic()
    prev = None
    placement = "not pinned (placed by the scheduler)"
    if args.pin:
        prev, placement = pin_processes()
    try:
        results, errors = run(sizes)
    finally:
        if prev is not None:
            unpin_processes(prev)
    elapsed = time.monotonic() - t0
    ratios = ratios_of(results)
    targets = targets_of(ratios)
    left = leftovers()
    if left:
        errors.append(f"shared-memory objects left in /dev/shm: {left}")
    alive = multiprocessing.active_children()
    if alive:
        errors.append(f"child processes still running: {[p.pid for p in alive]}")
    if args.json:
        doc = {"results": results, "ratios": ratios, "targets": targets}
        if errors:
            doc["errors"] = errors
        print(json.dumps(doc, indent=2))
    else:
        print_report(results, ratios, targets, errors, sizes, elapsed, placement)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
