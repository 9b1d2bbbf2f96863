#!/usr/bin/env python
"""Block I/O from a guest over blkfront/blkback, against a file written directly.

    python benchmarks/bench_blk.py            # full run (256 MiB disk, 5 rounds of 0.8 s)
    python benchmarks/bench_blk.py --quick    # about 40 s
    python benchmarks/bench_blk.py --smoke    # a few seconds: only proves it works
    python benchmarks/bench_blk.py --json     # one JSON object on stdout

Eight operations (``xmp.guests.blkbench``), each timed with
``time.perf_counter`` for a fixed time after an untimed warm-up (whose
reads are checked), on a disk first filled with 1 MiB writes and flushed:

* sequential write, 1 MiB requests, then a flush (inside the timed span),
  and sequential read: MB/s, one request at a time and 4 in flight;
* random 4 KiB reads, and writes then a flush (timed), one at a time: IOPS;
* the same random reads and writes with 32 requests in flight: IOPS.

"In flight" is the guest's asynchronous blkfront; a file in one process
does them one at a time, so its figures on those rows are at depth 1 (its
ceiling is the same either way: one process, one system call at a time).

MB is 10^6 bytes.  Every image lives on tmpfs (``/dev/shm``), so the
figures are the I/O paths', not a disk's.  Four paths, all set up at once:

(1) xmp: a supervisor is started with ``xmp run --rundir <fresh tmpdir>
    <topology>``: dom0 (blkback) and one guest running
    ``xmp.guests.blkbench:main`` with ``disk = ["vdev=xvda, access=rw,
    size=<N>M, target=/dev/shm/<tmpdir>/xmp.img"]`` (a raw image, created
    sparse), blkfront with persistent grants (the default).
(1b) xmp without persistent grants (``front = {persistent = false}``): a
    second supervisor, the same guest; the backend maps and unmaps each
    request's grants and the guest grants and ends them per request.
    Each guest fills its disk, says ``blkbench-ready`` on its console and
    then runs one operation each time the benchmark writes a step to its
    ``data/bench-go`` in xenstore (over the supervisor's xenstored socket),
    answering ``blkbench-step: {json}``; the benchmark reads those lines
    from ``<rundir>/console/blkbench.log``.  At the end the supervisors
    get SIGTERM and the benchmark checks that none of their processes and
    nothing named ``xmp.<pid>.*`` in /dev/shm is left.
(2) direct file, the "no virtualization" reference: the same functions in
    this process over ``<tmpdir>/file.img`` of the same size, with
    ``os.pwrite`` / ``os.pread`` and ``os.fsync`` where the guest flushes.
(3) pipe RPC, a naive message-passing disk: the same functions, each
    request and its answer pickled over a ``multiprocessing.Pipe`` to a
    child process doing (2)'s file I/O on ``<tmpdir>/pipe.img``.

This machine's speed drifts by a third from one second to the next, so
the paths take turns: each round runs every operation on every path, one
after the other (the order rotating from round to round), while the other
paths sit idle.  A path's figure is its median round; a ratio is the
median of the rounds' ratios xmp ÷ direct file (and pipe ÷ direct file),
each taken between neighbours in time.  Targets: each sequential figure
at least half the direct file's (at depth 4 and at depth 1); random 4 KiB
at 32 in flight at least 20,000 IOPS.  A missing measurement is an error
(exit status 1), and so is a leak found when a supervisor stops (reported
under ``problems``); missing a target is not.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import os
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import report  # benchmarks/report.py: the shared targets shape
from harness import BenchError, BenchHost  # benchmarks/harness.py: a supervisor under measurement

from xmp.guests.blkbench import OPS, SECTOR, STEP_KEY, Corrupt, final_check, prepare, run_op
from xmp.xenstore.client import SocketTransport, XsClient

KERNEL = "xmp.guests.blkbench:main"
GUEST = "blkbench"
START_TIMEOUT = 30.0
POLL = 0.02
PATHS = ("xmp", "xmp-np", "file", "pipe")
XMP_PATHS = {"xmp": "", "xmp-np": "front = { persistent = false }, "}  # path: the guest's extra args
PATH_LABELS = {"xmp": "(1) xmp", "xmp-np": "(1b) no persist", "file": "(2) direct file",
               "pipe": "(3) pipe RPC"}
LABELS = {"seq_write": "seq write 1 MiB + flush", "seq_read": "seq read 1 MiB",
          "rand_read": "random read 4 KiB", "rand_write": "random write 4 KiB + flush",
          "rand_read_qd": "random read 4 KiB, QD32", "rand_write_qd": "random write 4K+flush QD32",
          "seq_write_qd": "seq write 1 MiB+flush QD4", "seq_read_qd": "seq read 1 MiB, QD4"}
UNIT = {"seq_write": "mb_s", "seq_read": "mb_s", "seq_write_qd": "mb_s", "seq_read_qd": "mb_s",
        "rand_read": "iops", "rand_write": "iops",
        "rand_read_qd": "iops", "rand_write_qd": "iops"}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


TOPOLOGY = """\
[host]
memory = 512

[dom0]
memory = 128

[[domain]]
name = "{guest}"
memory = 64
kernel = "{kernel}"
args = {{ {front}stepped = true, seconds = {seconds}, warmup = {warmup} }}
disk = ["format=raw, vdev=xvda, access=rw, size={mib}M, target={image}"]
"""


class Host(BenchHost):
    """The measured host: dom0 (blkback) and the blkbench guest with its
    disk, running one operation per step the benchmark writes."""

    def __init__(self, sizes: Sizes, front: str, image: Path):
        super().__init__("xmp-bench-blk-", "")
        self.topology.write_text(TOPOLOGY.format(guest=GUEST, kernel=KERNEL, seconds=sizes.seconds,
                                                 warmup=sizes.warmup, mib=sizes.disk_mib,
                                                 image=image, front=front))
        self.read_to = 0          # how far the guest's console log has been read
        self.xs: XsClient | None = None
        self.domid = -1
        self.steps = 0

    def line(self, prefix: str, timeout: float, first_wait: float = 0.0) -> dict:
        """The guest's next console line ``<prefix>: {json}``.  A final
        ``blkbench:`` line instead (the guest stopped, with its error) or
        the supervisor's exit is a BenchError."""
        path = self.consoles / f"{GUEST}.log"
        deadline = time.monotonic() + timeout
        time.sleep(first_wait)  # no polling while the guest is being measured
        while True:
            assert self.proc is not None
            exited = self.proc.poll() is not None  # before reading: the log is complete then
            try:
                with open(path, "rb") as f:
                    f.seek(self.read_to)
                    raw = f.read()
            except FileNotFoundError:
                raw = b""
            text = raw.decode(errors="replace")
            for chunk in raw.splitlines(keepends=True):
                if not chunk.endswith(b"\n"):
                    break  # the rest of it is still to come
                self.read_to += len(chunk)
                line = chunk.decode(errors="replace")
                head, sep, doc = line.partition(": {")
                if not sep or head not in (prefix, "blkbench"):
                    continue
                try:
                    got = json.loads("{" + doc)
                except ValueError as exc:
                    raise BenchError(f"{path.name}: unreadable line {line!r}") from exc
                if head == prefix:
                    return got
                if prefix != "blkbench":
                    raise BenchError(f"the guest stopped: {got.get('error', got)}")
            if exited:
                raise BenchError(f"the supervisor exited ({self.proc.returncode}) before the guest's "
                                 f"{prefix} line; console: {text[-1000:]!r}; supervisor: {self.output()}")
            if time.monotonic() > deadline:
                raise BenchError(f"no {prefix} line in {path} within {timeout:.0f} s; "
                                 f"supervisor: {self.output()}")
            time.sleep(POLL)

    def ready(self, timeout: float) -> None:
        self.domid = int(self.line("blkbench-ready", timeout)["domid"])
        self.xs = XsClient(SocketTransport.connect(str(self.rundir / "xenstored.sock")))

    def step(self, op: str, sizes: Sizes) -> dict:
        """Run ``op`` in the guest once; its result."""
        assert self.xs is not None
        self.steps += 1
        self.xs.write(f"/local/domain/{self.domid}/{STEP_KEY}", f"{self.steps}:{op}")
        got = self.line("blkbench-step", START_TIMEOUT + 3 * (sizes.seconds + sizes.warmup),
                        first_wait=sizes.warmup + sizes.seconds)
        return {k: v for k, v in got.items() if k != "step"}

    def finish(self, timeout: float) -> None:
        """The last step: the guest's final check, and its verdict."""
        assert self.xs is not None
        self.xs.write(f"/local/domain/{self.domid}/{STEP_KEY}", "end")
        verdict = self.line("blkbench", timeout)
        if not verdict.get("ok"):
            raise BenchError(f"the guest reported {verdict.get('error')}")

    def stop(self) -> list[str]:
        if self.xs is not None:
            self.xs.close()
            self.xs = None
        return super().stop()


# ---------------------------------------------------------------------------
# (2) direct file, (3) pipe RPC
# ---------------------------------------------------------------------------


class FileDisk:
    """The guest's disk interface over a file: pwrite / pread / fsync."""

    def __init__(self, path: Path, size: int):
        with open(path, "wb") as f:  # sparse, like the toolstack's image
            f.truncate(size)
        self.fd = os.open(path, os.O_RDWR)
        self.size = size

    def write(self, sector: int, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        done, off = 0, sector * SECTOR
        while done < len(view):
            done += os.pwrite(self.fd, view[done:], off + done)

    def read(self, sector: int, count: int) -> bytes:
        n = count * SECTOR
        data = os.pread(self.fd, n, sector * SECTOR)
        if len(data) != n:  # past the end, like a backend's error answer
            raise OSError(f"short read: {len(data)} of {n} bytes at sector {sector}")
        return data

    def flush(self) -> None:
        os.fsync(self.fd)

    def close(self) -> None:
        os.close(self.fd)


def _pipe_server(conn, path: str, size: int) -> None:
    """The child of (3): requests in, answers out, until None."""
    disk = FileDisk(Path(path), size)
    try:
        while True:
            msg = conn.recv()
            if msg is None:
                return
            try:
                op = msg[0]
                if op == "w":
                    disk.write(msg[1], msg[2])
                    conn.send(None)
                elif op == "r":
                    conn.send(disk.read(msg[1], msg[2]))
                elif op == "f":
                    disk.flush()
                    conn.send(None)
                else:
                    conn.send(ValueError(f"unknown request {op!r}"))
            except OSError as exc:
                conn.send(exc)
    finally:
        disk.close()
        conn.close()


class PipeDisk:
    """The guest's disk interface as requests over a Pipe, one at a time."""

    def __init__(self, path: Path, size: int):
        ctx = multiprocessing.get_context("fork")  # this process runs no threads
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_pipe_server, args=(child, str(path), size), daemon=True)
        self.proc.start()
        child.close()
        self.size = size

    def _call(self, msg: tuple) -> Any:
        self.conn.send(msg)
        answer = self.conn.recv()
        if isinstance(answer, Exception):
            raise answer
        return answer

    def write(self, sector: int, data: bytes | bytearray | memoryview) -> None:
        self._call(("w", sector, bytes(data)))

    def read(self, sector: int, count: int) -> bytes:
        return self._call(("r", sector, count))

    def flush(self) -> None:
        self._call(("f",))

    def close(self) -> None:
        try:
            self.conn.send(None)
        except OSError:
            pass
        self.proc.join(10)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()
        self.conn.close()


# ---------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Sizes:
    kind: str
    disk_mib: int
    rounds: int      # each operation on each path, taking turns
    seconds: float   # timed, per operation, path and round
    warmup: float    # untimed, before each


FULL = Sizes("full", 256, 5, 0.8, 0.2)
QUICK = Sizes("quick", 64, 3, 0.3, 0.1)
SMOKE = Sizes("smoke", 8, 1, 0.1, 0.02)

TARGETS = {  # name: (path, op, what is measured, target, better)
    "seq_write_qd4_vs_file": ("xmp", "seq_write_qd", "ratio", 0.5, "higher"),
    "seq_read_qd4_vs_file": ("xmp", "seq_read_qd", "ratio", 0.5, "higher"),
    "seq_write_qd1_vs_file": ("xmp", "seq_write", "ratio", 0.5, "higher"),
    "seq_read_qd1_vs_file": ("xmp", "seq_read", "ratio", 0.5, "higher"),
    "rand_read_qd32_iops": ("xmp", "rand_read_qd", "iops", 20000, "higher"),
    "rand_write_qd32_iops": ("xmp", "rand_write_qd", "iops", 20000, "higher"),
}


class LocalPath:
    """(2) or (3): a disk in this process (or its pipe child), filled at once."""

    def __init__(self, disk: FileDisk | PipeDisk):
        self.disk = disk
        self.block, _fill_s = prepare(disk)

    def step(self, op: str, sizes: Sizes) -> dict:
        return run_op(self.disk, op, self.block, sizes.seconds, sizes.warmup)

    def finish(self, _timeout: float) -> None:
        final_check(self.disk, self.block)


def median_round(rounds: list[dict], op: str) -> dict:
    """The round with the median figure (the lower middle of an even count)."""
    ranked = sorted(rounds, key=lambda r: r[UNIT[op]])
    return {**ranked[(len(ranked) - 1) // 2], "rounds": [r[UNIT[op]] for r in rounds]}


def run(sizes: Sizes) -> tuple[dict, dict, list[str], list[str]]:
    """(results, ratios, errors, problems): errors are missing
    measurements, problems what stopping a supervisor found."""
    rounds: dict = {p: {op: [] for op in OPS} for p in PATHS}
    errors: list[str] = []
    problems: list[str] = []
    images = Path(tempfile.mkdtemp(prefix="bench-blk-images-", dir="/dev/shm"))
    hosts = {where: Host(sizes, front, images / f"{where}.img") for where, front in XMP_PATHS.items()}
    paths: dict = {}
    disks: list[FileDisk | PipeDisk] = []
    try:
        try:
            for where, host in hosts.items():
                log(f"{PATH_LABELS[where]}: starting a supervisor in {host.rundir}")
                host.start()
            for where, host in hosts.items():
                host.ready(START_TIMEOUT + sizes.disk_mib / 10)
                paths[where] = host
            for where, kind in (("file", FileDisk), ("pipe", PipeDisk)):
                disks.append(kind(images / f"{where}.img", sizes.disk_mib << 20))
                paths[where] = LocalPath(disks[-1])
            log(f"{sizes.rounds} rounds of {len(OPS)} operations on {len(PATHS)} paths, "
                f"{sizes.seconds} s each after {sizes.warmup} s warm-up, {sizes.disk_mib} MiB disks")
            for r in range(sizes.rounds):
                order = PATHS[r % len(PATHS):] + PATHS[:r % len(PATHS)]
                for op in OPS:
                    for where in order:
                        rounds[where][op].append(paths[where].step(op, sizes))
                log(f"round {r + 1} of {sizes.rounds} done")
            for where in PATHS:
                paths[where].finish(START_TIMEOUT)
        except (BenchError, Corrupt, OSError, EOFError, ValueError) as exc:
            errors.append(f"{type(exc).__name__}: {exc}")
        finally:
            for disk in disks:
                disk.close()
            for where, host in hosts.items():
                probs = host.stop()
                problems += [f"{where}: {p}" for p in probs]
                if errors or probs:
                    (errors or problems).append(f"{where}: run directory kept for inspection: {host.dir}")
                else:
                    host.remove_dir()
    finally:
        shutil.rmtree(images, ignore_errors=True)
    results = {p: {op: median_round(rs, op) for op, rs in ops.items() if rs} for p, ops in rounds.items()}
    for where in PATHS:
        missing = [op for op in OPS if op not in results[where]]
        if missing and not errors:
            errors.append(f"{where}: no result for {', '.join(missing)}")
    return results, ratios_of(rounds), errors, problems


def ratios_of(rounds: dict) -> dict:
    """Per path and operation, the median over rounds of path ÷ direct file
    in the same round (a run cut short leaves rounds unpaired at the end)."""
    out: dict = {}
    for where in ("xmp", "xmp-np", "pipe"):
        r: dict = {}
        for op in OPS:
            pairs = [a[UNIT[op]] / b[UNIT[op]]
                     for a, b in zip(rounds[where][op], rounds["file"][op], strict=False) if b[UNIT[op]]]
            r[op] = sorted(pairs)[(len(pairs) - 1) // 2] if pairs else None
        out[f"{where}_vs_file"] = r
    return out


def targets_of(results: dict, ratios: dict) -> dict:
    out = {}
    for name, (where, op, what, target, better) in TARGETS.items():
        if what == "ratio":
            value = ratios[f"{where}_vs_file"].get(op)
        else:
            value = results[where].get(op, {}).get(what)
        out[name] = report.entry(value, target, better)
    return out


def print_report(results: dict, ratios: dict, targets: dict, errors: list[str], problems: list[str],
                 sizes: Sizes, elapsed: float) -> None:
    print(f"xmp block benchmark: {sizes.kind} run, {elapsed:.1f} s, "
          f"{len(os.sched_getaffinity(0))} CPUs, {sizes.disk_mib} MiB disk, {sizes.rounds} rounds "
          f"of {sizes.seconds} s per operation after {sizes.warmup} s warm-up; medians of the rounds")
    print()

    def cell(where: str, op: str) -> str:
        v = results[where].get(op, {}).get(UNIT[op])
        return f"{'-':>18}" if v is None else f"{v:>18.1f}" if UNIT[op] == "mb_s" else f"{v:>18.0f}"

    def ratio(where: str, op: str) -> str:
        v = ratios[f"{where}_vs_file"].get(op)
        return f"{'-':>10}" if v is None else f"{v:>10.3f}"

    print(f"{'':<27}{'':<6}" + "".join(f"{PATH_LABELS[p]:>18}" for p in PATHS)
          + f"{'xmp/file':>10}{'np/file':>10}{'pipe/file':>10}")
    for op in OPS:
        unit = "MB/s" if UNIT[op] == "mb_s" else "IOPS"
        print(f"{LABELS[op]:<27}{unit:<6}" + "".join(cell(p, op) for p in PATHS)
              + ratio("xmp", op) + ratio("xmp-np", op) + ratio("pipe", op))
    for op in ("rand_read", "rand_write", "rand_read_qd", "rand_write_qd"):
        def lat(where: str, op: str = op) -> str:
            r = results[where].get(op, {})
            if r.get("median_us") is None:
                return f"{'-':>18}"
            return f"{r['median_us']:>8.1f} / {r['p99_us']:<7.1f}"
        print(f"{LABELS[op] + ' µs':<33}{'med/99':<6}" + "".join(lat(p) for p in PATHS))
    flushes = []
    for op in ("seq_write", "rand_write"):
        f = [results[p].get(op, {}).get("flush_s") for p in PATHS]
        if all(x is not None for x in f):
            flushes.append(f"{op} " + " / ".join(f"{x * 1000:.0f}" for x in f))
    if flushes:
        print(f"final flush, ms ({' / '.join(PATHS)}): {'; '.join(flushes)}")
    print()
    print("the direct file and the pipe have no queue: their QD rows ran at depth 1")
    spread = [f"{op} {min(rs):.0f}-{max(rs):.0f}" for op in ("seq_write", "seq_read")
              if len(rs := results["file"].get(op, {}).get("rounds", [])) > 1]
    if spread:
        print(f"the direct file's rounds ranged (MB/s): {'; '.join(spread)}")
    print()
    report.print_targets("targets (xmp, persistent grants)", targets, 30, 3)
    report.print_list("PROBLEMS (stopping the supervisor):", problems)
    report.print_list("ERRORS:", errors)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="a tiny run that only proves it works")
    ap.add_argument("--quick", action="store_true", help="64 MiB, 3 rounds of 0.3 s (about 40 s)")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)
    sizes = SMOKE if args.smoke else QUICK if args.quick else FULL
    # SIGTERM unwinds like Ctrl-C, so the supervisor is stopped either way.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    t0 = time.monotonic()
    results, ratios, errors, problems = run(sizes)
    elapsed = time.monotonic() - t0
    targets = targets_of(results, ratios)
    if args.json:
        doc: dict[str, Any] = {"results": results, "ratios": ratios, "targets": targets,
                               "sizes": dataclasses.asdict(sizes)}
        if problems:
            doc["problems"] = problems
        if errors:
            doc["errors"] = errors
        print(json.dumps(doc, indent=2))
    else:
        print_report(results, ratios, targets, errors, problems, sizes, elapsed)
    return 1 if errors or problems else 0  # a leak is a failure, as in the other benchmarks


if __name__ == "__main__":
    sys.exit(main())
