#!/usr/bin/env python
"""Many idle guests on one host: create latency, and every resource back to
its baseline once they are gone.

    python benchmarks/bench_scale.py            # 1,000 guests
    python benchmarks/bench_scale.py --quick    # 100 guests
    python benchmarks/bench_scale.py --json     # one JSON object on stdout

A supervisor is started with ``xmp run --rundir <fresh tmpdir>`` (dom0 and a
long-lived idle "keeper", so it goes on while the measured guests come and
go), with this process's soft RLIMIT_NOFILE raised to the hard limit (the
supervisor raises its own the same way) and a host pool sized for the guests
(1 MiB each, ``xmp.guests.idle``).  Over the control socket:

(1) N creates, one after another, each a fresh name; a create's latency is
    from just before its request to its reply (the domain is built, its
    process spawned, its xenstore tree queued).  p50 / p99 / max.  If the
    host refuses one (a named limit: descriptors, memory, domain ids), the
    run goes on with the guests it has and reports what stopped it.
(2) Peak, once every guest is up: dom0's xenconsoled has a console socket
    for each and the last guest's control driver has written
    ``control/feature-poweroff``.
(3) All destroyed, in a random order; then the host settles (dying domains
    reaped, dom0 done with their consoles and rings).

Resources, before (after start-up) / peak / after: descriptors and RSS of
the supervisor and of dom0 (``/proc/<pid>/fd``, psutil), the shared memory
those two map (``/proc/<pid>/maps``: ``/dev/shm`` objects and memfds, as
mapped, resident or not), bytes in use on ``/dev/shm`` (statvfs: xmp's
objects are unlinked at birth, so they are counted by the filesystem, not
by name -- every other user of /dev/shm on the machine shows up too, so it
is reported only), and xenstore's node count (a walk of the whole tree over
``xenstored.sock``).  Descriptors and nodes must come back exactly and the
mapped shared memory to within a MiB, or the run reports an error; RSS is
reported only (a Python heap that grew does not shrink).  The descriptors each domain
cost are compared with what ``xmp.limits`` assumes.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import time
from collections import Counter
from typing import Any

import psutil
import report  # benchmarks/report.py: the shared targets shape
from bench_domains import Control  # one JSON line out, one back
from harness import BenchError, BenchHost  # benchmarks/harness.py: a supervisor under measurement

from xmp import limits
from xmp.xenstore.client import XBT_NULL, SocketTransport, XsClient
from xmp.xenstore.wire import XsType

KERNEL = "xmp.guests.idle:main"
GUEST_MIB = 1
DOM0_MIB = 128
MIB = 1 << 20
UP_TIMEOUT = 300.0
SETTLE_TIMEOUT = 60.0
TOPOLOGY = """\
[host]
memory = {host_mib}
[dom0]
memory = {dom0_mib}
[[domain]]
name = "keeper"
kernel = "{kernel}"
memory = {guest_mib}
"""
TARGETS = {  # name: (key, target, better)
    "create p50 (ms)": ("create_p50_ms", 20.0, "lower"),
    "create p99 (ms)": ("create_p99_ms", 100.0, "lower"),
    "descriptors left over": ("fds_left", 0, "lower"),
    "xenstore nodes left over": ("nodes_left", 0, "lower"),
    "shm mapped MiB left over": ("mapped_left_mib", 1.0, "lower"),
}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def percentile(sorted_vals: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    k = max(0, min(len(sorted_vals) - 1, int(-(-q * len(sorted_vals) // 1)) - 1))
    return sorted_vals[k]


class Host(BenchHost):
    def __init__(self, n: int):
        super().__init__("xmp-bench-scale-", TOPOLOGY.format(
            host_mib=DOM0_MIB + GUEST_MIB * (n + 8), dom0_mib=DOM0_MIB, guest_mib=GUEST_MIB, kernel=KERNEL))
        self.ctl: Control | None = None

    def start(self) -> None:
        super().start()
        deadline = time.monotonic() + 30
        while True:
            self.check_alive()
            try:
                self.ctl = Control(self.rundir / "control.sock")
                if {d["name"] for d in self.ctl.call("list")["domains"]} >= {"Domain-0", "keeper"}:
                    break
                self.ctl.close()
            except (OSError, BenchError):
                pass
            self.ctl = None
            if time.monotonic() > deadline:
                raise BenchError(f"the supervisor did not come up: {self.output()}")
            time.sleep(0.05)
        self.wait(lambda: self.feature_poweroff(1), "the keeper's control driver")

    def call(self, cmd: str, **fields: Any) -> dict:
        assert self.ctl is not None
        return self.ctl.call(cmd, **fields)

    def dom0_pid(self) -> int:
        for p in self.descendants():
            try:
                cmd = p.cmdline()
            except psutil.Error:
                continue
            if cmd and cmd[0] == "xmp:0:Domain-0":
                return p.pid
        raise BenchError("no dom0 process")

    def xs(self) -> XsClient:
        return XsClient(SocketTransport.connect(str(self.rundir / "xenstored.sock")))

    def feature_poweroff(self, domid: int) -> bool:
        xs = self.xs()
        try:
            return xs.read_or(f"/local/domain/{domid}/control/feature-poweroff") == b"1"
        finally:
            xs.close()

    def wait(self, cond, what: str, timeout: float = UP_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            self.check_alive()
            if time.monotonic() > deadline:
                raise BenchError(f"timed out waiting for {what}")
            time.sleep(0.1)

    def stop(self) -> list[str]:
        if self.ctl is not None:
            self.ctl.close()
            self.ctl = None
        return super().stop()


def shm_mapped(pid: int) -> int:
    """Bytes of shared-memory objects ``pid`` maps (gone ones included:
    xmp unlinks its objects at birth)."""
    total = 0
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            fields = line.split(maxsplit=5)
            path = fields[5] if len(fields) > 5 else ""
            if path.startswith(("/dev/shm/", "/memfd:")):
                start, _, end = fields[0].partition("-")
                total += int(end, 16) - int(start, 16)
    return total


def holdings(pid: int) -> Counter:
    """What ``pid`` holds, by kind: its descriptors' targets (sockets and
    pipes without their inode) and the shared memory it maps."""
    held: Counter = Counter()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        held["fd " + target.split(":[")[0] if ":[" in target else "fd " + target] += 1
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            fields = line.split(maxsplit=5)
            path = fields[5].strip() if len(fields) > 5 else ""
            if path.startswith(("/dev/shm/", "/memfd:")):
                start, _, end = fields[0].partition("-")
                held[f"map {path.split(' (')[0]} {(int(end, 16) - int(start, 16)) // 1024} KiB"] += 1
    return held


def leftovers(before: dict[str, Counter], host: Host) -> list[str]:
    """What each process holds now beyond what it held before the guests."""
    out = []
    for who, pid in (("supervisor", host.proc.pid), ("dom0", host.dom0_pid())):
        extra = holdings(pid) - before[who]
        if extra:
            out.append(f"{who} still holds " + ", ".join(f"{k} x{v}" for k, v in sorted(extra.items())))
    return out


def shm_used() -> int:
    st = os.statvfs("/dev/shm")
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def children(xs: XsClient, path: str) -> list[str]:
    """DIRECTORY_PART, as libxenstore falls back to: a directory of 1,000
    domains is more than one reply holds (DIRECTORY answers E2BIG, and
    XsClient.directory does not fall back)."""
    names: list[bytes] = []
    offset = 0
    while True:
        data = xs.request(XsType.DIRECTORY_PART, path.encode() + b"\0" + str(offset).encode() + b"\0",
                          XBT_NULL, path)
        _gen, _, rest = data.partition(b"\0")
        part = rest.split(b"\0")
        done = rest.endswith(b"\0\0") or rest == b"\0"
        got = [p for p in part if p]
        names += got
        offset += sum(len(p) + 1 for p in got)
        if done or not got:
            return [n.decode() for n in names]


def node_count(xs: XsClient, path: str = "/") -> int:
    n = 1
    for name in children(xs, path):
        n += node_count(xs, path.rstrip("/") + "/" + name)
    return n


def resources(host: Host) -> dict:
    assert host.proc is not None
    sup, dom0 = host.proc.pid, host.dom0_pid()
    # Descriptors before the walk, the least of a few looks: xenstored holds one
    # for a connection of ours a moment after it closed.
    fds = {"supervisor_fds": 1 << 30, "dom0_fds": 1 << 30}
    for look in range(3):
        if look:
            time.sleep(0.05)
        fds = {"supervisor_fds": min(fds["supervisor_fds"], len(os.listdir(f"/proc/{sup}/fd"))),
               "dom0_fds": min(fds["dom0_fds"], len(os.listdir(f"/proc/{dom0}/fd")))}
    xs = host.xs()
    try:
        nodes = node_count(xs)
    finally:
        xs.close()
    return {**fds,
            "supervisor_rss_mib": psutil.Process(sup).memory_info().rss / MIB,
            "dom0_rss_mib": psutil.Process(dom0).memory_info().rss / MIB,
            "shm_mapped_mib": (shm_mapped(sup) + shm_mapped(dom0)) / MIB,
            "shm_used_mib": shm_used() / MIB, "xenstore_nodes": nodes}


def run(n: int, seed: int) -> tuple[dict, list[str]]:
    results: dict[str, Any] = {"guests_asked": n, "nofile": limits.raise_nofile()}
    errors: list[str] = []
    host = Host(n)
    try:
        host.start()
        base = resources(host)
        results["before"] = base
        held = {"supervisor": holdings(host.proc.pid), "dom0": holdings(host.dom0_pid())}
        lat: list[float] = []
        domids: dict[str, int] = {}
        t_all = time.monotonic()
        for i in range(n):
            name = f"s{i}"
            cfg = {"name": name, "kernel": KERNEL, "memory": GUEST_MIB}
            t0 = time.perf_counter()
            try:
                reply = host.call("create", config=cfg)
            except BenchError as exc:
                results["stopped_by"] = str(exc)
                log(f"create {i + 1} refused: {exc}")
                break
            lat.append((time.perf_counter() - t0) * 1000)
            domids[name] = reply["domid"]
            if (i + 1) % 100 == 0:
                log(f"{i + 1} created")
        results["guests_created"] = len(domids)
        results["create_all_s"] = time.monotonic() - t_all
        if lat:
            lat.sort()
            results.update(create_p50_ms=percentile(lat, 0.5), create_p99_ms=percentile(lat, 0.99),
                           create_max_ms=lat[-1])
        if domids:
            last = max(domids.values())
            host.wait(lambda: all((host.consoles / f"{d}.sock").exists() for d in domids.values()),
                      "xenconsoled to attach every console")
            host.wait(lambda: host.feature_poweroff(last), "the last guest's control driver")
        results["up_s"] = time.monotonic() - t_all
        peak = resources(host)
        results["peak"] = peak
        if domids:
            k = len(domids)
            mapped = peak["shm_mapped_mib"] - base["shm_mapped_mib"]
            results["per_domain"] = {"supervisor_fds": (peak["supervisor_fds"] - base["supervisor_fds"]) / k,
                                     "dom0_fds": (peak["dom0_fds"] - base["dom0_fds"]) / k,
                                     "xenstore_nodes": (peak["xenstore_nodes"] - base["xenstore_nodes"]) / k,
                                     "mapped_kib": mapped * 1024 / k,
                                     "shm_kib": (peak["shm_used_mib"] - base["shm_used_mib"]) * 1024 / k}
            for who, assumed in (("supervisor_fds", limits.SUPERVISOR_FDS_PER_DOMAIN),
                                 ("dom0_fds", limits.DOM0_FDS_PER_DOMAIN)):
                if results["per_domain"][who] > assumed:
                    errors.append(f"{who}: {results['per_domain'][who]:.2f} a domain, "
                                  f"xmp.limits assumes {assumed}")
        order = list(domids)
        random.Random(seed).shuffle(order)
        t_d = time.monotonic()
        for name in order:
            host.call("destroy", dom=name)
        results["destroy_all_s"] = time.monotonic() - t_d

        def settled() -> bool:
            names = {d["name"] for d in host.call("list")["domains"]}
            if names != {"Domain-0", "keeper"}:
                return False
            now = resources(host)
            return now["supervisor_fds"] <= base["supervisor_fds"] and now["dom0_fds"] <= base["dom0_fds"] \
                and now["xenstore_nodes"] <= base["xenstore_nodes"]
        try:
            host.wait(settled, "the host to settle", SETTLE_TIMEOUT)
        except BenchError as exc:
            errors.append(str(exc))
        after = resources(host)
        results["after"] = after
        results["fds_left"] = (after["supervisor_fds"] - base["supervisor_fds"]) + \
            (after["dom0_fds"] - base["dom0_fds"])
        results["nodes_left"] = after["xenstore_nodes"] - base["xenstore_nodes"]
        results["shm_left_mib"] = after["shm_used_mib"] - base["shm_used_mib"]
        results["mapped_left_mib"] = after["shm_mapped_mib"] - base["shm_mapped_mib"]
        for key, bound in (("fds_left", 0), ("nodes_left", 0), ("mapped_left_mib", 1.0)):
            if results[key] > bound:
                errors.append(f"{key}: {results[key]} after every guest was destroyed")
        if results["fds_left"] > 0 or results["mapped_left_mib"] > 0:
            errors += leftovers(held, host)
    except BenchError as exc:
        errors.append(str(exc))
    except KeyboardInterrupt:
        errors.append("interrupted")
    finally:
        errors += host.stop()
        host.remove_dir()
    return results, errors


def print_report(results: dict, targets: dict, errors: list[str], elapsed: float) -> None:
    n, made = results["guests_asked"], results.get("guests_created", 0)
    print(f"xmp scale benchmark: {made} of {n} idle guests ({GUEST_MIB} MiB, {KERNEL}), {elapsed:.1f} s, "
          f"{len(os.sched_getaffinity(0))} CPUs, RLIMIT_NOFILE {results['nofile']} "
          f"({limits.describe_capacity(results['nofile'])})")
    if "stopped_by" in results:
        print(f"  stopped at {made}: {results['stopped_by']}")
    if "create_p50_ms" in results:
        print(f"  create (request -> reply): p50 {results['create_p50_ms']:.2f} ms, p99 "
              f"{results['create_p99_ms']:.2f} ms, max {results['create_max_ms']:.2f} ms; all {made} in "
              f"{results['create_all_s']:.2f} s, every one up after {results['up_s']:.2f} s; destroyed in "
              f"{results.get('destroy_all_s', 0):.2f} s")
    print()
    keys = ("supervisor_fds", "dom0_fds", "supervisor_rss_mib", "dom0_rss_mib", "shm_mapped_mib",
            "shm_used_mib", "xenstore_nodes")
    print(f"  {'':<22}{'before':>12}{'peak':>12}{'after':>12}{'per domain':>12}")
    per = results.get("per_domain", {})
    per_key = {"supervisor_fds": "supervisor_fds", "dom0_fds": "dom0_fds", "xenstore_nodes": "xenstore_nodes",
               "shm_mapped_mib": "mapped_kib", "shm_used_mib": "shm_kib"}
    for key in keys:
        row = [results.get(s, {}).get(key) for s in ("before", "peak", "after")]
        cells = "".join(f"{v:>12.1f}" if v is not None else f"{'-':>12}" for v in row)
        p = per.get(per_key.get(key, ""))
        unit = " KiB" if key in ("shm_mapped_mib", "shm_used_mib") else ""
        print(f"  {key:<22}{cells}{(f'{p:.2f}{unit}' if p is not None else '-'):>12}")
    print()
    report.print_targets("targets", targets, 28, 2)
    report.print_list("ERRORS:", errors)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="100 guests instead of 1,000")
    ap.add_argument("--smoke", action="store_true", help="10 guests: only proves it works")
    ap.add_argument("--guests", type=int, help="this many guests")
    ap.add_argument("--seed", type=int, default=1, help="of the random destroy order")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)
    n = args.guests or (10 if args.smoke else 100 if args.quick else 1000)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM unwinds: the supervisor is stopped
    t0 = time.monotonic()
    results, errors = run(n, args.seed)
    elapsed = time.monotonic() - t0
    targets = {name: report.entry(results.get(key), target, better)
               for name, (key, target, better) in TARGETS.items()}
    if args.json:
        doc: dict[str, Any] = {"results": results, "targets": targets}
        if errors:
            doc["errors"] = errors
        print(json.dumps(doc, indent=2))
    else:
        print_report(results, targets, errors, elapsed)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
