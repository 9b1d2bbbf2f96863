#!/usr/bin/env python
"""Block I/O from a guest over blkfront/blkback, against a file written directly.

    python benchmarks/bench_blk.py            # full run (256 MiB disk, 3 s per operation)
    python benchmarks/bench_blk.py --quick    # under 40 s
    python benchmarks/bench_blk.py --smoke    # a few seconds: only proves it works
    python benchmarks/bench_blk.py --json     # one JSON object on stdout

Four operations, each timed with ``time.perf_counter`` for a fixed time
after an untimed warm-up (whose reads are checked), on a disk first filled
with 1 MiB writes and flushed (``xmp.guests.blkbench``):

* sequential write, 1 MiB requests, then a flush (inside the timed span): MB/s;
* sequential read, 1 MiB requests: MB/s;
* random 4 KiB reads: IOPS;
* random 4 KiB writes, then a flush (timed): IOPS.

MB is 10^6 bytes.  Three paths, one after the other in one run:

(1) xmp: a supervisor is started with ``xmp run --rundir <fresh tmpdir>
    <topology>``: dom0 (blkback) and one guest running
    ``xmp.guests.blkbench:main`` with ``disk = ["vdev=xvda, access=rw,
    size=<N>M, target=<tmpdir>/xmp.img"]`` (a raw image, created sparse).
    The guest prints ``blkbench: {json}`` on its console and powers off;
    the benchmark reads that line from ``<rundir>/console/blkbench.log``.
    Then the supervisor gets SIGTERM (if it has not stopped by itself) and
    the benchmark checks that none of its processes and nothing named
    ``xmp.<its pid>.*`` in /dev/shm is left.
(2) direct file, the "no virtualization" reference: once the supervisor is
    gone, the same functions in this process over ``<tmpdir>/file.img`` of
    the same size, with ``os.pwrite`` / ``os.pread`` and ``os.fsync`` where
    the guest flushes.
(3) pipe RPC, a naive message-passing disk: the same functions, each
    request and its answer pickled over a ``multiprocessing.Pipe`` to a
    child process doing (2)'s file I/O on ``<tmpdir>/pipe.img``.

Ratios are xmp ÷ direct file (and pipe ÷ direct file).  A missing
measurement is an error (exit status 1), and so is a leak found when the
supervisor stops (reported under ``problems``); missing a target is not.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import report  # benchmarks/report.py: the shared targets shape
from harness import BenchError, BenchHost  # benchmarks/harness.py: a supervisor under measurement

from xmp.guests.blkbench import OPS, SECTOR, Corrupt, run_all

KERNEL = "xmp.guests.blkbench:main"
GUEST = "blkbench"
START_TIMEOUT = 30.0
POLL = 0.02
PATHS = ("xmp", "file", "pipe")
PATH_LABELS = {"xmp": "(1) xmp blkfront", "file": "(2) direct file", "pipe": "(3) pipe RPC"}
LABELS = {"seq_write": "seq write 1 MiB + flush", "seq_read": "seq read 1 MiB",
          "rand_read": "random read 4 KiB", "rand_write": "random write 4 KiB + flush"}
UNIT = {"seq_write": "mb_s", "seq_read": "mb_s", "rand_read": "iops", "rand_write": "iops"}


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
args = {{ seconds = {seconds}, warmup = {warmup} }}
disk = ["format=raw, vdev=xvda, access=rw, size={mib}M, target={image}"]
"""


class Host(BenchHost):
    """The measured host: dom0 (blkback) and the blkbench guest with its disk."""

    def __init__(self, sizes: Sizes):
        super().__init__("xmp-bench-blk-", "")
        self.topology.write_text(TOPOLOGY.format(guest=GUEST, kernel=KERNEL, seconds=sizes.seconds,
                                                 warmup=sizes.warmup, mib=sizes.disk_mib,
                                                 image=self.dir / "xmp.img"))

    def guest_result(self, timeout: float) -> dict:
        """Wait for the guest's ``blkbench: {json}`` console line.  The
        guest powers off after printing it, and the supervisor then stops
        by itself: its exit is an error only if the line never came."""
        path = self.consoles / f"{GUEST}.log"
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc is not None
            exited = self.proc.poll() is not None  # before reading: the log is complete then
            if not exited:
                self.descendants()
            try:
                text = path.read_text(errors="replace")
            except FileNotFoundError:
                text = ""
            for line in text.splitlines():
                if line.startswith("blkbench: {"):
                    try:
                        return json.loads(line[len("blkbench: "):])
                    except ValueError as exc:
                        raise BenchError(f"{path.name}: unreadable result line {line!r}") from exc
            if exited:
                raise BenchError(f"the supervisor exited ({self.proc.returncode}) with no blkbench "
                                 f"line; console: {text[-1000:]!r}; supervisor: {self.output()}")
            if time.monotonic() > deadline:
                raise BenchError(f"no blkbench line in {path} within {timeout:.0f} s; "
                                 f"console: {text[-1000:]!r}; supervisor: {self.output()}")
            time.sleep(POLL)


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


def bench_file(path: Path, sizes: Sizes) -> dict:
    disk = FileDisk(path, sizes.disk_mib << 20)
    try:
        return run_all(disk, sizes.seconds, sizes.warmup)
    finally:
        disk.close()


def bench_pipe(path: Path, sizes: Sizes) -> dict:
    disk = PipeDisk(path, sizes.disk_mib << 20)
    try:
        return run_all(disk, sizes.seconds, sizes.warmup)
    finally:
        disk.close()


# ---------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Sizes:
    kind: str
    disk_mib: int
    seconds: float   # timed, per operation and path
    warmup: float    # untimed, before each


FULL = Sizes("full", 256, 3.0, 0.5)
QUICK = Sizes("quick", 64, 1.5, 0.2)
SMOKE = Sizes("smoke", 8, 0.1, 0.02)

TARGETS = {  # name: (op, target, better) -- on xmp ÷ direct file
    "seq_write_vs_file": ("seq_write", 0.25, "higher"),
    "seq_read_vs_file": ("seq_read", 0.25, "higher"),
    "rand_read_iops_vs_file": ("rand_read", 0.1, "higher"),
}


def run(sizes: Sizes) -> tuple[dict, list[str], list[str]]:
    """(results, errors, problems): errors are missing measurements,
    problems what stopping the supervisor found."""
    results: dict = {p: {} for p in PATHS}
    errors: list[str] = []
    problems: list[str] = []
    host = Host(sizes)
    try:
        try:
            log(f"starting a supervisor in {host.rundir}")
            host.start()
            budget = (START_TIMEOUT + sizes.disk_mib / 10
                      + len(OPS) * (sizes.seconds + sizes.warmup) * 3)
            log(f"(1) xmp: a guest over blkfront/blkback, {sizes.disk_mib} MiB disk, "
                f"{len(OPS)} operations, {sizes.seconds} s each")
            g = host.guest_result(budget)
            if not g.get("ok"):
                errors.append(f"xmp: the guest reported {g.get('error')}")
            results["xmp"] = {k: v for k, v in g.items() if k not in ("ok", "error", "domid")}
        except (BenchError, OSError) as exc:
            errors.append(f"xmp: {type(exc).__name__}: {exc}")
        finally:
            problems.extend(host.stop())
        for where, bench in (("file", bench_file), ("pipe", bench_pipe)):
            log(f"{PATH_LABELS[where]}: {len(OPS)} operations, {sizes.seconds} s each")
            try:
                results[where] = bench(host.dir / f"{where}.img", sizes)
            except (Corrupt, OSError, EOFError, ValueError) as exc:
                errors.append(f"{where}: {type(exc).__name__}: {exc}")
    finally:
        for img in host.dir.glob("*.img"):
            img.unlink(missing_ok=True)
        if errors:
            errors.append(f"run directory kept for inspection (images removed): {host.dir}")
        elif problems:
            problems.append(f"run directory kept for inspection (images removed): {host.dir}")
        else:
            host.remove_dir()
    for where in PATHS:
        missing = [op for op in OPS if UNIT[op] not in results[where].get(op, {})]
        if missing:
            errors.append(f"{where}: no result for {', '.join(missing)}")
    return results, errors, problems


def ratios_of(results: dict) -> dict:
    out: dict = {}
    for where in ("xmp", "pipe"):
        r: dict = {}
        for op in OPS:
            num = results[where].get(op, {}).get(UNIT[op])
            den = results["file"].get(op, {}).get(UNIT[op])
            r[op] = num / den if num is not None and den else None
        out[f"{where}_vs_file"] = r
    return out


def targets_of(ratios: dict) -> dict:
    return {name: report.entry(ratios["xmp_vs_file"].get(op), target, better)
            for name, (op, target, better) in TARGETS.items()}


def print_report(results: dict, ratios: dict, targets: dict, errors: list[str], problems: list[str],
                 sizes: Sizes, elapsed: float) -> None:
    print(f"xmp block benchmark: {sizes.kind} run, {elapsed:.1f} s, "
          f"{len(os.sched_getaffinity(0))} CPUs, {sizes.disk_mib} MiB disk, "
          f"{sizes.seconds} s per operation after {sizes.warmup} s warm-up")
    print()

    def cell(where: str, op: str) -> str:
        v = results[where].get(op, {}).get(UNIT[op])
        return f"{'-':>18}" if v is None else f"{v:>18.1f}" if UNIT[op] == "mb_s" else f"{v:>18.0f}"

    def ratio(where: str, op: str) -> str:
        v = ratios[f"{where}_vs_file"].get(op)
        return f"{'-':>10}" if v is None else f"{v:>10.3f}"

    print(f"{'':<27}{'':<6}" + "".join(f"{PATH_LABELS[p]:>18}" for p in PATHS)
          + f"{'xmp/file':>10}{'pipe/file':>10}")
    for op in OPS:
        unit = "MB/s" if UNIT[op] == "mb_s" else "IOPS"
        print(f"{LABELS[op]:<27}{unit:<6}" + "".join(cell(p, op) for p in PATHS)
              + ratio("xmp", op) + ratio("pipe", op))
    for op in ("rand_read", "rand_write"):
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
        print(f"final flush, ms (xmp / file / pipe): {'; '.join(flushes)}")
    print()
    report.print_targets("targets (xmp ÷ direct file)", targets, 30, 3)
    report.print_list("PROBLEMS (stopping the supervisor):", problems)
    report.print_list("ERRORS:", errors)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="a tiny run that only proves it works")
    ap.add_argument("--quick", action="store_true", help="64 MiB, 1.5 s per operation (under 40 s)")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)
    sizes = SMOKE if args.smoke else QUICK if args.quick else FULL
    # SIGTERM unwinds like Ctrl-C, so the supervisor is stopped either way.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    t0 = time.monotonic()
    results, errors, problems = run(sizes)
    elapsed = time.monotonic() - t0
    ratios = ratios_of(results)
    targets = targets_of(ratios)
    if args.json:
        doc: dict[str, Any] = {"results": results, "ratios": ratios, "targets": targets,
                               "sizes": {"kind": sizes.kind, "disk_mib": sizes.disk_mib,
                                         "seconds": sizes.seconds, "warmup": sizes.warmup}}
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
