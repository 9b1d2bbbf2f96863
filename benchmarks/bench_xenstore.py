#!/usr/bin/env python
"""xenstore operations per second: a guest over its ring, a tool over the socket, the bare core.

    python benchmarks/bench_xenstore.py            # full run (3 s per operation and path)
    python benchmarks/bench_xenstore.py --quick    # under 30 s
    python benchmarks/bench_xenstore.py --smoke    # a few seconds: only proves it works
    python benchmarks/bench_xenstore.py --json     # one JSON object on stdout

A supervisor is started with ``xmp run --rundir <fresh tmpdir> <topology>``:
dom0 (running xenstored) and one guest running ``xmp.guests.xsbench:main``.
Four operations are timed, each for a fixed time after an untimed warm-up,
every operation timed on its own with ``time.perf_counter``:

* READ of an existing node (the guest's ``name``),
* WRITE (``data/x``),
* a transaction of 10 writes (``XsClient.transactions()``; one op = start,
  10 writes, commit),
* a watch round trip: write a watched node, then wait for its event.

(1) guest ring: the guest's kernel runs them over its xenstore page and
    store event channel (``kernel.xenstore``), waiting in its event loop, and
    prints ``xsbench: {json}`` on its console; the benchmark reads that line
    from ``<rundir>/console/xsbench.log``.
(2) tool socket: once the guest is done, this process runs the same four
    with ``XsClient(SocketTransport.connect(<rundir>/xenstored.sock))``
    (a privileged dom0 connection; nodes under ``/tool/xsbench``, READ of
    the guest's ``/local/domain/<id>/name``).
(3) reference peer, after the supervisor is stopped: the pure core with no
    transport, ``XenStore().handle(conn, <READ packet>)`` plus taking the
    reply off ``conn.out``, in this process.

At the end the supervisor gets SIGTERM, and the benchmark checks that none
of its processes and nothing named ``xmp.<its pid>.*`` in /dev/shm is left.
A failed check or a missing measurement is an error (exit status 1);
missing a target is not.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import report  # benchmarks/report.py: the shared targets shape
from harness import BenchError, BenchHost  # benchmarks/harness.py: a supervisor under measurement

from xmp.errors import XmpError
from xmp.guests.xsbench import TX_WRITES, _timed
from xmp.xenstore.client import SocketTransport, XsClient
from xmp.xenstore.server import XenStore
from xmp.xenstore.wire import Packet, XsType

KERNEL = "xmp.guests.xsbench:main"
GUEST = "xsbench"
START_TIMEOUT = 30.0
POLL = 0.01
OPS = ("read", "write", "transaction", "watch")
LABELS = {"read": "READ (existing node)", "write": "WRITE",
          "transaction": f"transaction of {TX_WRITES} writes", "watch": "watch round trip"}
TOOL_DIR = "/tool/xsbench"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


TOPOLOGY = """\
[host]
memory = 512

[dom0]
memory = 128

[[domain]]
name = "{guest}"
memory = 32
kernel = "{kernel}"
args = {{ seconds = {seconds}, warmup = {warmup} }}
"""


class Host(BenchHost):
    """The measured host: dom0 and the xsbench guest."""

    def __init__(self, seconds: float, warmup: float):
        super().__init__("xmp-bench-xenstore-",
                         TOPOLOGY.format(guest=GUEST, kernel=KERNEL, seconds=seconds, warmup=warmup))

    def guest_result(self, timeout: float) -> dict:
        """Wait for the guest's ``xsbench: {json}`` console line."""
        path = self.rundir / "console" / f"{GUEST}.log"
        deadline = time.monotonic() + timeout
        while True:
            self.check_alive()
            self.descendants()
            try:
                text = path.read_text(errors="replace")
            except FileNotFoundError:
                text = ""
            for line in text.splitlines():
                if line.startswith("xsbench: {"):
                    try:
                        return json.loads(line[len("xsbench: "):])
                    except ValueError as exc:
                        raise BenchError(f"{path.name}: unreadable result line {line!r}") from exc
            if time.monotonic() > deadline:
                raise BenchError(f"no xsbench line in {path} within {timeout:.0f} s; "
                                 f"console: {text[-1000:]!r}; supervisor: {self.output()}")
            time.sleep(POLL)


# ---------------------------------------------------------------------------
# (2) a tool over the Unix socket
# ---------------------------------------------------------------------------


def connect_socket(path: Path, timeout: float) -> XsClient:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return XsClient(SocketTransport.connect(str(path)))
        except OSError:
            if time.monotonic() > deadline:
                raise BenchError(f"{path} never accepted a connection") from None
            time.sleep(POLL)


def bench_socket(path: Path, guest_domid: int, seconds: float, warmup: float) -> dict:
    xs = connect_socket(path, 10)
    try:
        name_path = f"/local/domain/{guest_domid}/name"
        if xs.read(name_path) != GUEST.encode():
            raise BenchError(f"{name_path} is not {GUEST!r}")
        wpath, token = f"{TOOL_DIR}/w", "xsbench-tool"

        def read(_i: int) -> None:
            xs.read(name_path)

        def write(i: int) -> None:
            xs.write(f"{TOOL_DIR}/x", str(i))

        def transaction(i: int) -> None:
            for attempt in xs.transactions():
                with attempt as tx:
                    for k in range(TX_WRITES):
                        xs.write(f"{TOOL_DIR}/t{k}", str(i), tx)

        def watch(i: int) -> None:
            xs.write(wpath, str(i))
            ev = xs.wait_watch(5.0)
            if ev is None:
                raise BenchError("a watch event over the socket did not arrive within 5 s")
            if ev != (wpath, token):
                raise BenchError(f"unexpected watch event {ev}")

        xs.write(wpath, "0")
        xs.watch(wpath, token)
        if xs.wait_watch(5.0) is None:  # the event every new watch fires at once
            raise BenchError("the watch's first event over the socket did not arrive")
        out = {name: _timed(op, seconds, warmup)
               for name, op in (("read", read), ("write", write), ("transaction", transaction),
                                ("watch", watch))}
        xs.unwatch(wpath, token)
        xs.rm(TOOL_DIR)
        return out
    finally:
        xs.close()


# ---------------------------------------------------------------------------
# (3) the pure core, no transport
# ---------------------------------------------------------------------------


def bench_core(seconds: float, warmup: float) -> dict:
    store = XenStore()
    conn = store.connect(0, privileged=True)
    path = b"/local/domain/1/name\0"
    store.handle(conn, Packet(int(XsType.WRITE), 1, 0, path + GUEST.encode()))
    conn.take(1 << 30)
    store.handle(conn, Packet(int(XsType.READ), 2, 0, path))
    reply = conn.take(1 << 30)
    if not reply.endswith(GUEST.encode()):
        raise BenchError(f"the core answered READ with {reply!r}")
    pkts = [Packet(int(XsType.READ), i, 0, path) for i in range(1, 1025)]

    def read(i: int) -> None:
        store.handle(conn, pkts[i & 1023])
        conn.take(1 << 30)

    return {"read": _timed(read, seconds, warmup)}


# ---------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Sizes:
    kind: str
    seconds: float   # timed, per operation and path
    warmup: float    # untimed, before each


FULL = Sizes("full", 3.0, 0.3)
QUICK = Sizes("quick", 1.0, 0.2)
SMOKE = Sizes("smoke", 0.1, 0.02)

TARGETS = {  # name: (path, op, target, better)
    "guest_ring_reads_per_s": ("guest_ring", "read", 20000.0, "higher"),
}


def run(sizes: Sizes) -> tuple[dict, list[str]]:
    results: dict = {"guest_ring": {}, "tool_socket": {}, "core": {}}
    errors: list[str] = []
    host = Host(sizes.seconds, sizes.warmup)
    try:
        log(f"starting a supervisor in {host.rundir}")
        host.start()
        guest_budget = START_TIMEOUT + len(OPS) * (sizes.seconds + sizes.warmup) * 3
        log(f"(1) guest ring: {len(OPS)} operations, {sizes.seconds} s each")
        g = host.guest_result(guest_budget)
        if not g.get("ok"):
            errors.append(f"guest ring: the guest reported {g.get('error')}")
        results["guest_ring"] = {op: g[op] for op in OPS if op in g}
        log(f"(2) tool socket: {len(OPS)} operations, {sizes.seconds} s each")
        try:
            results["tool_socket"] = bench_socket(host.rundir / "xenstored.sock", int(g["domid"]),
                                                  sizes.seconds, sizes.warmup)
        except (BenchError, XmpError, OSError) as exc:
            errors.append(f"tool socket: {type(exc).__name__}: {exc}")
        host.check_alive()
    except (BenchError, OSError) as exc:
        errors.append(f"supervisor: {type(exc).__name__}: {exc}")
    finally:
        errors.extend(host.stop())
        if not errors:
            host.remove_dir()
        else:
            errors.append(f"run directory kept for inspection: {host.dir}")
    log("(3) reference peer: the pure core")
    try:
        results["core"] = bench_core(sizes.seconds, sizes.warmup)
    except Exception as exc:  # reported; the run continues
        errors.append(f"core: {type(exc).__name__}: {exc}")
    for where in ("guest_ring", "tool_socket"):
        missing = [op for op in OPS if op not in results[where]]
        if missing:
            errors.append(f"{where}: no result for {', '.join(missing)}")
    if "read" not in results["core"]:
        errors.append("core: no result for read")
    return results, errors


def targets_of(results: dict) -> dict:
    out = {}
    for name, (where, op, target, better) in TARGETS.items():
        measured = results.get(where, {}).get(op, {}).get("ops_per_s")
        out[name] = report.entry(measured, target, better)
    return out


def print_report(results: dict, targets: dict, errors: list[str], sizes: Sizes, elapsed: float) -> None:
    print(f"xmp xenstore benchmark: {sizes.kind} run, {elapsed:.1f} s, "
          f"{len(os.sched_getaffinity(0))} CPUs, {sizes.seconds} s per operation after {sizes.warmup} s "
          "warm-up")
    print()

    def cells(r: dict | None) -> str:
        if not r:
            return f"{'-':>10}{'-':>9}{'-':>9}"
        return f"{r['ops_per_s']:>10.0f}{r['median_us']:>9.1f}{r['p99_us']:>9.1f}"

    head = f"{'ops/s':>10}{'med µs':>9}{'p99 µs':>9}"
    print(f"{'':<30}{'(1) guest ring':^28}  {'(2) tool socket':^28}  {'(3) core, no transport':^28}")
    print(f"{'':<30}{head}  {head}  {head}")
    for op in OPS:
        print(f"{LABELS[op]:<30}{cells(results['guest_ring'].get(op))}"
              f"  {cells(results['tool_socket'].get(op))}  {cells(results['core'].get(op))}")
    core = results["core"].get("read", {}).get("ops_per_s")
    print()
    if core:
        for where, label in (("guest_ring", "guest ring"), ("tool_socket", "tool socket")):
            r = results[where].get("read")
            if r:
                per = 1e6 / r["ops_per_s"] - 1e6 / core
                print(f"READ: {label} is {core / r['ops_per_s']:.1f}x slower than the bare core "
                      f"(transport cost {per:.1f} µs per READ)")
        print()
    report.print_targets("targets", targets, 30, 0)
    report.print_list("ERRORS:", errors)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="a tiny run that only proves it works")
    ap.add_argument("--quick", action="store_true", help="1 s per operation instead of 3 (under 30 s)")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)
    sizes = SMOKE if args.smoke else QUICK if args.quick else FULL
    # SIGTERM unwinds like Ctrl-C, so the supervisor is stopped either way.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    t0 = time.monotonic()
    results, errors = run(sizes)
    elapsed = time.monotonic() - t0
    targets = targets_of(results)
    if args.json:
        doc: dict[str, Any] = {"results": results, "targets": targets,
                               "sizes": {"kind": sizes.kind, "seconds": sizes.seconds,
                                         "warmup": sizes.warmup}}
        if errors:
            doc["errors"] = errors
        print(json.dumps(doc, indent=2))
    else:
        print_report(results, targets, errors, sizes, elapsed)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
