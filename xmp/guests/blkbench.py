"""A disk, timed (for benchmarks/bench_blk.py): over ``kernel.block(vdev)``
runs, each for ``args.seconds`` after ``args.warmup`` s untimed,

* ``seq_write``: 1 MiB writes, sequential (wrapping at the end of the
  disk), then one flush; the flush is inside the timed span;
* ``seq_read``: 1 MiB reads, sequential (wrapping);
* ``rand_read``: 4 KiB reads at random 4 KiB-aligned offsets;
* ``rand_write``: 4 KiB writes at random 4 KiB-aligned offsets, then one
  flush (timed);
* ``seq_write_qd``, ``seq_read_qd``, ``rand_read_qd``, ``rand_write_qd``:
  the same with requests kept in flight (4 of 1 MiB, ``args.depth`` (32)
  of 4 KiB) through the disk's asynchronous ``submit_read`` /
  ``submit_write`` (a disk without them, like a file, runs them one at a
  time and says ``depth: 1``);

and prints one console line ``blkbench: {json}`` (per operation: bytes or
ops, seconds, MB/s (10^6 bytes) or IOPS, median / p99 latency in µs), then
returns (powers off).  With ``args.stepped`` it runs one operation at a
time when the benchmark asks (see :func:`_stepped`), so the benchmark can
alternate it with its other paths and compare neighbours in time.

Before them the whole disk is filled with 1 MiB writes and flushed
(untimed), so no read meets a hole.  Every write puts the same 1 MiB block
``data(seed)`` at its place in a tiling of the disk, so whatever is read can
be checked: the reads of every warm-up are (the timed ones are not).

The operations are plain functions of a ``disk`` with ``size``,
``write(sector, data)``, ``read(sector, count)`` and ``flush()`` -- a
blkfront here; the benchmark runs the very same functions over a file.

args: vdev ("xvda"), seconds (1.0), warmup (0.2), seed (1), depth (32),
stepped (false), front (blkfront settings, e.g. ``{persistent = false}``: see
``xmp.drivers.blk.frontend.configure``).
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from typing import Protocol

SECTOR = 512
CHUNK = 1 << 20        # sequential request size
SMALL = 4096           # random request size
N_OFFSETS = 1 << 16    # random offsets, drawn once and cycled
OPS = ("seq_write", "seq_read", "seq_write_qd", "seq_read_qd", "rand_read", "rand_write",
       "rand_read_qd", "rand_write_qd")
SEQ_DEPTH = 4          # 1 MiB requests in flight (blkfront's default pool holds 4 MiB)


class Disk(Protocol):
    size: int

    def write(self, sector: int, data: bytes | bytearray | memoryview) -> None: ...

    def read(self, sector: int, count: int) -> bytes: ...

    def flush(self) -> None: ...


class Corrupt(Exception):
    """A read did not return what the writes left there."""


def data(seed: int) -> bytes:
    """The 1 MiB block tiled over the disk."""
    return random.Random(seed).randbytes(CHUNK)


def _offsets(disk_size: int, seed: int) -> list[int]:
    rng = random.Random(seed + 1)
    return [rng.randrange(disk_size // SMALL) * SMALL for _ in range(N_OFFSETS)]


def _check(got: bytes, want: bytes | memoryview, offset: int) -> None:
    if got != want:
        raise Corrupt(f"the {len(got)} bytes read at offset {offset} are not what was written there")


def _loop(op: Callable[[int, bool], None], seconds: float, warmup: float,
          lat: list[float] | None = None) -> tuple[int, float]:
    """``op(i, check)``: untimed warm-up (at least one op, ``check`` True),
    then timed for ``seconds`` (``check`` False): (timed ops, start)."""
    i = 0
    end = time.perf_counter() + warmup
    while True:
        op(i, True)
        i += 1
        if time.perf_counter() >= end:
            break
    first = i
    t0 = now = time.perf_counter()
    end = t0 + seconds
    while now < end:
        op(i, False)
        i += 1
        t = time.perf_counter()
        if lat is not None:
            lat.append(t - now)
        now = t
    return i - first, t0


def _latency(lat: list[float]) -> dict:
    lat.sort()
    n = len(lat)
    return {"median_us": 1e6 * lat[n // 2] if n else None,
            "p99_us": 1e6 * lat[min(n - 1, int(n * 0.99))] if n else None}


def fill(disk: Disk, block: bytes) -> float:
    """The whole disk, 1 MiB at a time, flushed: seconds taken."""
    t0 = time.perf_counter()
    for off in range(0, disk.size, CHUNK):
        disk.write(off // SECTOR, block)
    disk.flush()
    return time.perf_counter() - t0


def seq_write(disk: Disk, block: bytes, seconds: float, warmup: float) -> dict:
    n = disk.size // CHUNK

    def op(i: int, _check: bool) -> None:
        disk.write((i % n) * (CHUNK // SECTOR), block)

    ops, t0 = _loop(op, seconds, warmup)
    tf = time.perf_counter()
    disk.flush()
    t1 = time.perf_counter()
    return {"bytes": ops * CHUNK, "requests": ops, "seconds": t1 - t0, "flush_s": t1 - tf,
            "mb_s": ops * CHUNK / (t1 - t0) / 1e6}


def seq_read(disk: Disk, block: bytes, seconds: float, warmup: float) -> dict:
    n = disk.size // CHUNK

    def op(i: int, check: bool) -> None:
        off = (i % n) * CHUNK
        got = disk.read(off // SECTOR, CHUNK // SECTOR)
        if check:
            _check(got, block, off)

    ops, t0 = _loop(op, seconds, warmup)
    t1 = time.perf_counter()
    return {"bytes": ops * CHUNK, "requests": ops, "seconds": t1 - t0,
            "mb_s": ops * CHUNK / (t1 - t0) / 1e6}


def rand_read(disk: Disk, block: bytes, seconds: float, warmup: float, seed: int) -> dict:
    offs = _offsets(disk.size, seed)
    view = memoryview(block)
    lat: list[float] = []

    def op(i: int, check: bool) -> None:
        off = offs[i % N_OFFSETS]
        got = disk.read(off // SECTOR, SMALL // SECTOR)
        if check:
            _check(got, view[off % CHUNK:off % CHUNK + SMALL], off)

    ops, t0 = _loop(op, seconds, warmup, lat)
    t1 = time.perf_counter()
    return {"ops": ops, "seconds": t1 - t0, "iops": ops / (t1 - t0), **_latency(lat)}


def rand_write(disk: Disk, block: bytes, seconds: float, warmup: float, seed: int) -> dict:
    offs = _offsets(disk.size, seed + 7)
    view = memoryview(block)
    lat: list[float] = []

    def op(i: int, _check: bool) -> None:
        off = offs[i % N_OFFSETS]
        disk.write(off // SECTOR, view[off % CHUNK:off % CHUNK + SMALL])

    ops, t0 = _loop(op, seconds, warmup, lat)
    tf = time.perf_counter()
    disk.flush()
    t1 = time.perf_counter()
    return {"ops": ops, "seconds": t1 - t0, "flush_s": t1 - tf, "iops": ops / (t1 - t0),
            **_latency(lat)}


def _queued(disk, depth: int, submit: Callable[[int], object], check: Callable[[int, bytes], None] | None,
            seconds: float, warmup: float) -> tuple[int, float, list[float]]:
    """Keep ``depth`` requests of ``submit(i)`` in flight: untimed warm-up
    (answers checked by ``check``), then timed: (timed ops, start, latencies)."""
    inflight: dict = {}  # io -> (i, submitted at)
    lat: list[float] = []
    i = timed_from = 0
    start = time.perf_counter()
    warm_end, end = start + warmup, start + warmup + seconds
    t0 = None
    now = start
    while True:
        if t0 is None and now >= warm_end:
            t0, timed_from = now, i
        if now < end:
            while len(inflight) < depth:
                inflight[submit(i)] = (i, time.perf_counter())
                i += 1
        elif not inflight:
            break
        for io in disk.wait_any(list(inflight)):
            j, sent = inflight.pop(io)
            got = io.result()
            now = time.perf_counter()
            if t0 is not None and j >= timed_from:
                lat.append(now - sent)
            elif check is not None:
                check(j, got)
        now = time.perf_counter()
    return i - timed_from, t0 or start, lat


def seq_queued(disk, block: bytes, seconds: float, warmup: float, depth: int, write: bool) -> dict:
    """Sequential 1 MiB reads (or writes, then a timed flush) ``depth`` at a time."""
    if not hasattr(disk, "submit_read"):
        return {**(seq_write if write else seq_read)(disk, block, seconds, warmup), "depth": 1}
    n = disk.size // CHUNK

    def submit(i: int):
        sector = (i % n) * (CHUNK // SECTOR)
        return disk.submit_write(sector, block) if write else disk.submit_read(sector, CHUNK // SECTOR)

    def check(i: int, got) -> None:
        _check(got, block, (i % n) * CHUNK)

    ops, t0, _lat = _queued(disk, depth, submit, None if write else check, seconds, warmup)
    tf = time.perf_counter()
    if write:
        disk.flush()
    t1 = time.perf_counter()
    out = {"bytes": ops * CHUNK, "requests": ops, "seconds": t1 - t0, "depth": depth,
           "mb_s": ops * CHUNK / (t1 - t0) / 1e6}
    if write:
        out["flush_s"] = t1 - tf
    return out


def rand_queued(disk, block: bytes, seconds: float, warmup: float, seed: int, depth: int,
                write: bool) -> dict:
    """Random 4 KiB reads (or writes, then a timed flush) ``depth`` at a time."""
    if not hasattr(disk, "submit_read"):
        out = (rand_write if write else rand_read)(disk, block, seconds, warmup, seed)
        return {**out, "depth": 1}
    offs = _offsets(disk.size, seed + (7 if write else 0))
    view = memoryview(block)

    def submit(i: int):
        off = offs[i % N_OFFSETS]
        if write:
            return disk.submit_write(off // SECTOR, view[off % CHUNK:off % CHUNK + SMALL])
        return disk.submit_read(off // SECTOR, SMALL // SECTOR)

    def check(i: int, got) -> None:
        off = offs[i % N_OFFSETS]
        _check(got, view[off % CHUNK:off % CHUNK + SMALL], off)

    ops, t0, lat = _queued(disk, depth, submit, None if write else check, seconds, warmup)
    tf = time.perf_counter()
    if write:
        disk.flush()
    t1 = time.perf_counter()
    out = {"ops": ops, "seconds": t1 - t0, "iops": ops / (t1 - t0), "depth": depth, **_latency(lat)}
    if write:
        out["flush_s"] = t1 - tf
    return out


def prepare(disk: Disk, seed: int = 1) -> tuple[bytes, float]:
    """The tiling block, and the seconds taken to fill the whole disk with it."""
    if disk.size < CHUNK or disk.size % CHUNK:
        raise ValueError(f"the disk's size {disk.size} is not a whole number (>= 1) of MiB")
    block = data(seed)
    return block, fill(disk, block)


def run_op(disk: Disk, op: str, block: bytes, seconds: float, warmup: float, seed: int = 1,
           depth: int = 32) -> dict:
    """One operation of :data:`OPS`, timed."""
    runs: dict[str, Callable[[], dict]] = {
        "seq_write": lambda: seq_write(disk, block, seconds, warmup),
        "seq_read": lambda: seq_read(disk, block, seconds, warmup),
        "seq_write_qd": lambda: seq_queued(disk, block, seconds, warmup, SEQ_DEPTH, write=True),
        "seq_read_qd": lambda: seq_queued(disk, block, seconds, warmup, SEQ_DEPTH, write=False),
        "rand_read": lambda: rand_read(disk, block, seconds, warmup, seed),
        "rand_write": lambda: rand_write(disk, block, seconds, warmup, seed),
        "rand_read_qd": lambda: rand_queued(disk, block, seconds, warmup, seed, depth, write=False),
        "rand_write_qd": lambda: rand_queued(disk, block, seconds, warmup, seed, depth, write=True),
    }
    if op not in runs:
        raise ValueError(f"unknown operation {op!r}; known: {', '.join(OPS)}")
    return runs[op]()


def final_check(disk: Disk, block: bytes, seed: int = 1) -> None:
    """Read back a few places the random writes went to."""
    for off in _offsets(disk.size, seed + 7)[:8]:
        _check(disk.read(off // SECTOR, SMALL // SECTOR), block[off % CHUNK:off % CHUNK + SMALL], off)


def run_all(disk: Disk, seconds: float, warmup: float, seed: int = 1, depth: int = 32) -> dict:
    """Fill, then every operation once, then :func:`final_check`.  Raises
    :class:`Corrupt` on a wrong read."""
    block, fill_s = prepare(disk, seed)
    out: dict = {"size": disk.size, "fill_s": fill_s}
    for op in OPS:
        out[op] = run_op(disk, op, block, seconds, warmup, seed, depth)
    final_check(disk, block, seed)
    return out


STEP_KEY = "data/bench-go"


def _stepped(kernel, disk, seconds: float, warmup: float, seed: int, depth: int) -> None:
    """Fill, say ``blkbench-ready: {json}``, then run each step the
    benchmark writes to ``data/bench-go`` (``<n>:<op>``, each ``n`` once),
    answering ``blkbench-step: {json}``, until it writes ``end``.  So the
    benchmark can interleave this guest's runs with its other paths'."""
    xs = kernel.xenstore
    block, fill_s = prepare(disk, seed)
    changed: list[str] = []
    xs.on_watch("bench-go", changed.append)
    xs.watch(STEP_KEY, "bench-go")
    kernel.print("blkbench-ready: " + json.dumps({"domid": kernel.domid, "size": disk.size,
                                                  "fill_s": fill_s, "persistent": disk.persistent}))
    seen: set[str] = set()
    while True:
        kernel.loop.run_until(lambda: bool(changed))
        changed.clear()
        step = (xs.read_or(STEP_KEY) or b"").decode()
        if not step or step in seen:
            continue  # the watch's first event, or one we ran already
        seen.add(step)
        if step == "end":
            break
        _n, _, op = step.partition(":")
        result = run_op(disk, op, block, seconds, warmup, seed, depth)
        kernel.print("blkbench-step: " + json.dumps({"step": step, **result}))
    final_check(disk, block, seed)


def main(kernel) -> None:
    """``args.stepped``: run steps as the benchmark asks (:func:`_stepped`);
    otherwise :func:`run_all` at once.  Last, one ``blkbench: {json}`` line."""
    args = kernel.args
    out: dict = {"domid": kernel.domid}
    try:
        from xmp.drivers.blk import frontend

        frontend.configure(kernel, **args.get("front", {}))
        disk = kernel.block(args.get("vdev", "xvda"))
        out["persistent"] = disk.persistent
        timing = (float(args.get("seconds", 1.0)), float(args.get("warmup", 0.2)),
                  int(args.get("seed", 1)), int(args.get("depth", 32)))
        if args.get("stepped"):
            _stepped(kernel, disk, *timing)
        else:
            out.update(run_all(disk, *timing))
        out["ok"] = True
    except Exception as exc:  # reported on the console; the benchmark fails on it
        out["ok"] = False
        out["error"] = f"{type(exc).__name__}: {exc}"
    kernel.print("blkbench: " + json.dumps(out))
