#!/usr/bin/env python
"""vchan benchmark: throughput of 64 KiB writes and the round trip of a
64-byte ping-pong between two xmp guest domains over ``xmp.libs.vchan``
(``xmp.guests.vchanbench``: the server offers the vchan and streams, the
client reads; a guest client grant-copies), side by side with two OS
processes doing the same over ``multiprocessing.Pipe`` in the same run.
Both ends hash what they sent and what they received; a mismatch is an
error, so neither side can report bytes it did not move.

    python benchmarks/bench_vchan.py            # 256 MiB, 10,000 pings
    python benchmarks/bench_vchan.py --quick    # 64 MiB, 2,000 pings
    python benchmarks/bench_vchan.py --smoke    # 4 MiB, 200 pings: only proves it works
    python benchmarks/bench_vchan.py --json     # one JSON object on stdout
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import signal
import sys
import time
import uuid
from typing import Any

import report  # benchmarks/report.py: the shared targets shape
from harness import BenchError, BenchHost  # benchmarks/harness.py: a supervisor under measurement

from xmp.guests import vchanbench

MiB = 1 << 20
TARGETS = {  # name: (metric, better, target): vchan over Pipe
    "throughput_64k_vs_pipe": ("mib_s", "higher", 5.0),
    "round_trip_vs_pipe": ("rtt_us", "lower", 0.5),
}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def topology(total: int, pings: int, tag: str) -> str:
    common = f'bytes = {total}, pings = {pings}, path = "data/vchanbench-{tag}"'
    return f"""\
[host]
memory = 256

[dom0]
memory = 64

[[domain]]
name = "vsrv{tag}"
kernel = "xmp.guests.vchanbench:main"
memory = 48
args = {{ role = "server", peer = 2, {common} }}

[[domain]]
name = "vcli{tag}"
kernel = "xmp.guests.vchanbench:main"
memory = 48
args = {{ role = "client", server = 1, {common} }}
"""


def reports(host: BenchHost, dom: str) -> list[dict]:
    path = host.consoles / f"{dom}.log"
    if not path.exists():
        return []
    lines = path.read_text(errors="replace").splitlines()
    return [json.loads(line.split("vchanbench: ", 1)[1]) for line in lines if "vchanbench: " in line]


def _find(rs: list[dict], key: str) -> dict | None:
    return next((r for r in rs if key in r), None)


def run_vchan(total: int, pings: int, timeout: float) -> dict:
    tag = uuid.uuid4().hex[:6]
    host = BenchHost("xmp-bench-vchan-", topology(total, pings, tag))
    try:
        host.start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            host.check_alive()
            srv, cli = reports(host, f"vsrv{tag}"), reports(host, f"vcli{tag}")
            sent, got, rtt = _find(srv, "sent"), _find(cli, "received"), _find(cli, "pings")
            if sent and got and rtt:
                return _check("vchan", total, pings, sent["sha"], got, rtt)
            time.sleep(0.1)
        raise BenchError(f"no results within {timeout:.0f} s: {host.output()}")
    finally:
        problems = host.stop()
        host.remove_dir()
        if problems:
            raise BenchError("; ".join(problems))


def _check(name: str, total: int, pings: int, sent_sha: str, got: dict, rtt: dict) -> dict:
    if got["received"] != total:
        raise BenchError(f"{name}: received {got['received']} of {total} bytes")
    if got["sha"] != sent_sha:
        raise BenchError(f"{name}: the receiver's sha256 {got['sha'][:16]} "
                         f"is not the sender's {sent_sha[:16]}")
    if rtt["echoed_ok"] != pings:
        raise BenchError(f"{name}: {pings - rtt['echoed_ok']} of {pings} pings came back wrong")
    res = {"mib_s": total / MiB / got["seconds"], "rtt_us": rtt["seconds"] / pings * 1e6,
           "bytes": total, "pings": pings, "sha256": sent_sha}
    if "hypercalls" in got:  # the guest client's: what each step costs it
        res["client_hypercalls_per_64k"] = got["hypercalls"] / (total / vchanbench.CHUNK)
        res["client_hypercalls_per_ping"] = rtt["hypercalls"] / pings
    return res


def _pipe_server(conn, total: int, pings: int) -> None:
    """The Pipe peer's server: stream, then echo -- what the guest server does."""
    h = hashlib.sha256()
    chunks = [vchanbench.chunk(i) for i in range(16)]
    conn.recv_bytes()  # the client is there
    for i in range(total // vchanbench.CHUNK):
        data = chunks[i % 16]
        conn.send_bytes(data)
        h.update(data)
    conn.send(h.hexdigest())
    for _ in range(pings):
        conn.send_bytes(conn.recv_bytes())


def run_pipe(total: int, pings: int) -> dict:
    ctx = multiprocessing.get_context("fork")
    a, b = ctx.Pipe()
    p = ctx.Process(target=_pipe_server, args=(b, total, pings), daemon=True)
    p.start()
    try:
        h = hashlib.sha256()
        got = 0
        buf = bytearray(256 * 1024)
        view = memoryview(buf)
        a.send_bytes(b"go")
        t0 = time.perf_counter()
        while got < total:
            n = a.recv_bytes_into(buf)
            h.update(view[:n])
            got += n
        dt = time.perf_counter() - t0
        sent_sha = a.recv()
        msg = bytes(range(vchanbench.PING))
        ok = 0
        t0 = time.perf_counter()
        for _ in range(pings):
            a.send_bytes(msg)
            ok += a.recv_bytes() == msg
        rdt = time.perf_counter() - t0
        return _check("pipe", total, pings, sent_sha, {"received": got, "sha": h.hexdigest(), "seconds": dt},
                      {"echoed_ok": ok, "seconds": rdt})
    finally:
        p.join(10)
        if p.is_alive():
            p.kill()
            p.join()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="4 MiB and 200 pings: only proves it works")
    ap.add_argument("--quick", action="store_true", help="64 MiB and 2,000 pings")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)
    mib, pings = (4, 200) if args.smoke else (64, 2000) if args.quick else (256, 10000)
    total = mib * MiB
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    results: dict[str, dict] = {}
    errors: list[str] = []
    for name, fn in (("vchan", lambda: run_vchan(total, pings, 60 + mib + pings / 100)),
                     ("pipe", lambda: run_pipe(total, pings))):
        log(f"bench_vchan: {name} ...")
        try:
            results[name] = fn()
        except (BenchError, OSError, AssertionError, EOFError) as exc:
            errors.append(f"{name}: {exc}")
    ratios: dict[str, float | None] = {}
    for m in ("mib_s", "rtt_us"):
        both = "vchan" in results and "pipe" in results and results["pipe"][m]
        ratios[m] = results["vchan"][m] / results["pipe"][m] if both else None
    targets = {name: report.entry(ratios[m], t, better) for name, (m, better, t) in TARGETS.items()}
    if args.json:
        doc: dict[str, Any] = {"results": results, "ratios": ratios, "targets": targets,
                               "mib": mib, "pings": pings}
        if errors:
            doc["errors"] = errors
        print(json.dumps(doc, indent=2))
    else:
        print(f"xmp vchan benchmark: {mib} MiB in 64 KiB writes, {pings} pings of {vchanbench.PING} B, "
              f"{len(os.sched_getaffinity(0))} CPUs")
        print(f"{'':<30}{'vchan (2 guests)':>18}{'Pipe (2 procs)':>18}{'vchan / Pipe':>14}")
        for m, label in (("mib_s", "64 KiB writes, MiB/s"), ("rtt_us", "64 B round trip, us")):
            cells = "".join(f"{results[p][m]:>18.1f}" if p in results else f"{'-':>18}"
                            for p in ("vchan", "pipe"))
            r = ratios[m]
            print(f"{label:<30}{cells}" + (f"{r:>14.3f}" if r is not None else f"{'-':>14}"))
        if "vchan" in results:
            r = results["vchan"]
            print(f"the guest client's hypercalls: {r['client_hypercalls_per_64k']:.1f} per 64 KiB, "
                  f"{r['client_hypercalls_per_ping']:.1f} per round trip")
        print()
        report.print_targets("targets (vchan over Pipe, same run)", targets, 24, 3)
        report.print_list("ERRORS:", errors)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
