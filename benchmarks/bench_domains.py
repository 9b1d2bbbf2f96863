#!/usr/bin/env python
"""Domain creation latency, and what idle guests cost, against a running supervisor.

    python benchmarks/bench_domains.py            # full run (a few minutes at most)
    python benchmarks/bench_domains.py --quick    # under 30 s
    python benchmarks/bench_domains.py --json     # one JSON object on stdout

A supervisor is started with ``xmp run --rundir <fresh tmpdir> <topology>``
(dom0, plus one long-lived idle guest so that it does not stop when the
measured guests are destroyed); the benchmark then talks to its control
socket directly, so no ``xmp`` command's Python start-up is timed.  Every
measured guest runs ``xmp.guests.stamp:main``, which prints
``stamp: <time.monotonic_ns() at kernel entry>`` as its first console line
and idles.

(1) create latency, over 50 creates (15 with --quick), each a fresh name,
    destroyed after it is measured; two unmeasured creates warm up first.
    t0 is taken just before the create request is sent.
    ``create_to_kernel``: the guest's stamp - t0 (CLOCK_MONOTONIC, same host).
    ``create_to_console``: when the stamp line shows up in
    ``<rundir>/console/<name>.log`` (polled every 0.2 ms) - t0: the whole
    path guest -> console ring -> dom0's xenconsoled -> log.
    ``create_reply``: when the control socket's answer arrives - t0.
(2) 100 idle guests (20 with --quick): created one request after another;
    wall time from the first request to the last guest entering its kernel.
    Then memory: PSS (``psutil.Process.memory_full_info().pss``) summed over
    the guest processes, per guest and total (USS and RSS for context); and
    CPU: the guests' summed ``cpu_times`` (user + system) over a few seconds
    of idling, in % of one CPU.
(3) reference peers, measured in the same run: a fresh ``python -c pass``
    (subprocess, wall time), a bare ``os.fork()`` + child ``os._exit(0)`` +
    ``waitpid`` from this process, and a ``multiprocessing`` 'forkserver'
    ``Process`` start -> join of a no-op (after one warm-up start of the
    server); medians.

At the end the supervisor gets SIGTERM (it destroys every domain), and the
benchmark checks that none of its processes and nothing named
``xmp.<its pid>.*`` in /dev/shm is left.  A failed check or measurement is
an error (exit status 1); missing a target is not.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import report  # benchmarks/report.py: the shared targets shape
from harness import BenchError, BenchHost  # benchmarks/harness.py: a supervisor under measurement

KERNEL = "xmp.guests.stamp:main"
GUEST_MIB = 32
DOM0_MIB = 256
POLL = 0.0002            # s between looks at a console log
SETTLE = 0.02            # s after each destroy in (1), so one create's aftermath does not overlap the next
START_TIMEOUT = 30.0
GUEST_TIMEOUT = 20.0     # s for one guest to print its stamp
MIB = 1 << 20


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def percentile(sorted_vals, q: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    k = max(0, min(len(sorted_vals) - 1, int(-(-q * len(sorted_vals) // 1)) - 1))
    return sorted_vals[k]


# ---------------------------------------------------------------------------
# The supervisor under measurement
# ---------------------------------------------------------------------------


TOPOLOGY = """\
[host]
memory = {host_mib}

[dom0]
memory = {dom0_mib}

[[domain]]
name = "keeper"
memory = {guest_mib}
kernel = "{kernel}"
"""


class Control:
    """A client of ``<rundir>/control.sock``: one JSON line out, one back."""

    def __init__(self, path: Path):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(str(path))
        self.buf = b""

    @staticmethod
    def encode(cmd: str, **fields) -> bytes:
        return (json.dumps({"cmd": cmd, **fields}) + "\n").encode()

    def send(self, line: bytes) -> None:
        self.sock.sendall(line)

    def reply(self) -> dict:
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise BenchError("the supervisor closed the control connection")
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        reply = json.loads(line)
        if not reply.get("ok"):
            raise BenchError(f"control request failed: {reply.get('error')}")
        return reply

    def call(self, cmd: str, **fields) -> dict:
        self.send(self.encode(cmd, **fields))
        return self.reply()

    def close(self) -> None:
        self.sock.close()


class Host(BenchHost):
    """The measured host: dom0 and a long-lived "keeper" guest, so the
    supervisor goes on while the measured guests come and go."""

    def __init__(self, n_guests: int):
        host_mib = DOM0_MIB + GUEST_MIB * (n_guests + 8)
        super().__init__("xmp-bench-domains-", TOPOLOGY.format(host_mib=host_mib, dom0_mib=DOM0_MIB,
                                                                guest_mib=GUEST_MIB, kernel=KERNEL))
        self.ctl: Control | None = None

    def start(self) -> None:
        super().start()
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            self.check_alive()
            try:
                self.ctl = Control(self.rundir / "control.sock")
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise BenchError("the supervisor's control socket never answered") from None
                time.sleep(0.01)
        # Ready once the keeper has stamped (dom0's xenconsoled is then up too).
        wait_stamp(self.consoles / "keeper.log", deadline)
        self.descendants()

    def guest_processes(self, names: set[str]) -> dict[str, psutil.Process]:
        """Domain processes by name, found by their title ``xmp:<domid>:<name>``."""
        found = {}
        for p in self.descendants():
            try:
                cmd = p.cmdline()
            except psutil.Error:
                continue
            if cmd and cmd[0].startswith("xmp:"):
                name = cmd[0].split(":", 2)[-1]
                if name in names:
                    found[name] = p
        return found

    def stop(self) -> list[str]:
        if self.ctl is not None:
            self.ctl.close()
            self.ctl = None
        return super().stop()


def read_first_line(path: Path, fd_holder: dict) -> bytes | None:
    """The first line of a console log once complete, else None.  Keeps the
    log open between calls (``fd_holder``) so a poll is one read()."""
    fd = fd_holder.get("fd")
    if fd is None:
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        fd_holder["fd"] = fd
        fd_holder["buf"] = b""
    data = os.read(fd, 4096)
    if data:
        fd_holder["buf"] += data
    buf = fd_holder["buf"]
    nl = buf.find(b"\n")
    return buf[:nl] if nl >= 0 else None


def parse_stamp(line: bytes, path: Path) -> int:
    if not line.startswith(b"stamp: "):
        raise BenchError(f"{path.name}: first console line is {line!r}, not a stamp")
    return int(line[7:])


def wait_stamp(path: Path, deadline: float) -> tuple[int, int]:
    """Poll a console log until its stamp line arrives: (stamp, seen_ns)."""
    holder: dict = {}
    try:
        while True:
            line = read_first_line(path, holder)
            if line is not None:
                seen = time.monotonic_ns()
                return parse_stamp(line, path), seen
            if time.monotonic() > deadline:
                raise BenchError(f"no stamp in {path} in time")
            time.sleep(POLL)
    finally:
        if holder.get("fd") is not None:
            os.close(holder["fd"])


# ---------------------------------------------------------------------------
# (1) create -> kernel, create -> first console line
# ---------------------------------------------------------------------------


def bench_create_latency(host: Host, n: int, warm: int) -> dict:
    ctl = host.ctl
    assert ctl is not None
    kern, cons, reply = [], [], []
    for i in range(warm + n):
        name = f"lat{i}"
        line = Control.encode("create", config={"name": name, "memory": GUEST_MIB, "kernel": KERNEL})
        path = host.consoles / f"{name}.log"
        t0 = time.monotonic_ns()
        ctl.send(line)
        ctl.reply()
        t_reply = time.monotonic_ns()
        stamp, seen = wait_stamp(path, time.monotonic() + GUEST_TIMEOUT)
        ctl.call("destroy", dom=name)
        if i >= warm:
            kern.append((stamp - t0) / 1e6)
            cons.append((seen - t0) / 1e6)
            reply.append((t_reply - t0) / 1e6)
        time.sleep(SETTLE)
    kern.sort()
    cons.sort()
    reply.sort()
    return {
        "create_to_kernel_median_ms": statistics.median(kern),
        "create_to_kernel_p90_ms": percentile(kern, 0.9),
        "create_to_kernel_min_ms": kern[0],
        "create_to_console_median_ms": statistics.median(cons),
        "create_to_console_p90_ms": percentile(cons, 0.9),
        "create_to_console_min_ms": cons[0],
        "create_reply_median_ms": statistics.median(reply),
        "create_reply_p90_ms": percentile(reply, 0.9),
        "creates": n,
    }


# ---------------------------------------------------------------------------
# (2) many idle guests: creation time, memory, CPU
# ---------------------------------------------------------------------------


def bench_many(host: Host, n: int, cpu_window: float) -> dict:
    ctl = host.ctl
    assert ctl is not None
    names = [f"idle{i}" for i in range(n)]
    lines = [Control.encode("create", config={"name": nm, "memory": GUEST_MIB, "kernel": KERNEL})
             for nm in names]
    t0 = time.monotonic_ns()
    for line in lines:
        ctl.send(line)
        ctl.reply()
    t_replies = time.monotonic_ns()
    deadline = time.monotonic() + GUEST_TIMEOUT + n * 0.2
    stamps, seen = [], []
    for nm in names:
        s, v = wait_stamp(host.consoles / f"{nm}.log", deadline)
        stamps.append(s)
        seen.append(v)
    out = {
        "guests": n,
        "create_all_to_kernel_s": (max(stamps) - t0) / 1e9,
        "create_all_replies_s": (t_replies - t0) / 1e9,
        "create_all_to_console_s": (max(seen) - t0) / 1e9,
    }
    out["creates_per_s"] = n / out["create_all_to_kernel_s"]

    procs = host.guest_processes(set(names))
    if len(procs) != n:
        raise BenchError(f"found {len(procs)} of the {n} guest processes")
    time.sleep(0.5)  # let the last ones settle into idle
    pss = uss = rss = 0
    for p in procs.values():
        m = p.memory_full_info()
        pss += m.pss
        uss += m.uss
        rss += m.rss
    out.update({
        "pss_per_guest_mib": pss / n / MIB,
        "pss_total_mib": pss / MIB,
        "uss_per_guest_mib": uss / n / MIB,
        "rss_per_guest_mib": rss / n / MIB,
    })
    if n == 100:
        out["pss_100_guests_total_mib"] = pss / MIB

    def cpu() -> float:
        total = 0.0
        for p in procs.values():
            t = p.cpu_times()
            total += t.user + t.system
        return total

    c0, w0 = cpu(), time.monotonic()
    time.sleep(cpu_window)
    c1, w1 = cpu(), time.monotonic()
    out["cpu_idle_guests_percent"] = 100.0 * (c1 - c0) / (w1 - w0)
    out["cpu_window_s"] = w1 - w0
    if n == 100:
        out["cpu_100_idle_guests_percent"] = out["cpu_idle_guests_percent"]
    for nm in names:
        ctl.call("destroy", dom=nm)
    return out


# ---------------------------------------------------------------------------
# (3) reference peers
# ---------------------------------------------------------------------------


def _noop() -> None:
    pass


def peer_python(runs: int) -> float:
    times = []
    for _ in range(runs):
        t0 = time.monotonic_ns()
        subprocess.run([sys.executable, "-c", "pass"], check=True)
        times.append((time.monotonic_ns() - t0) / 1e6)
    return statistics.median(times)


def peer_fork(runs: int) -> float:
    times = []
    for _ in range(runs):
        t0 = time.monotonic_ns()
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        os.waitpid(pid, 0)
        times.append((time.monotonic_ns() - t0) / 1e6)
    return statistics.median(times)


def peer_forkserver(runs: int) -> float:
    ctx = multiprocessing.get_context("forkserver")
    warm = ctx.Process(target=_noop)  # starts the fork server itself: not timed
    warm.start()
    warm.join()
    times = []
    for _ in range(runs):
        t0 = time.monotonic_ns()
        p = ctx.Process(target=_noop)
        p.start()
        p.join()
        times.append((time.monotonic_ns() - t0) / 1e6)
        if p.exitcode != 0:
            raise BenchError(f"forkserver no-op exited with {p.exitcode}")
    return statistics.median(times)


# ---------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Sizes:
    creates: int
    warm: int
    guests: int
    cpu_window: float
    python_runs: int
    fork_runs: int
    forkserver_runs: int


QUICK = Sizes(creates=15, warm=2, guests=20, cpu_window=2.0, python_runs=7, fork_runs=200,
              forkserver_runs=15)
SMOKE = Sizes(creates=3, warm=1, guests=3, cpu_window=0.5, python_runs=2, fork_runs=20,
              forkserver_runs=2)  # --smoke: only proves it works
FULL = Sizes(creates=50, warm=2, guests=100, cpu_window=5.0, python_runs=15, fork_runs=500,
             forkserver_runs=40)

TARGETS = {  # name: (result key, target, better)
    "create_to_kernel_median_ms": ("create_to_kernel_median_ms", 10.0, "lower"),
    "create_to_console_median_ms": ("create_to_console_median_ms", 20.0, "lower"),
    "pss_100_guests_total_mib": ("pss_100_guests_total_mib", 2048.0, "lower"),
    "cpu_100_idle_guests_percent": ("cpu_100_idle_guests_percent", 1.0, "lower"),
}
PEERS = ("python_c_pass_ms", "fork_exit_wait_ms", "forkserver_process_ms")
RATIO_OF = ("create_to_kernel_median_ms", "create_to_console_median_ms")


def run(sizes: Sizes) -> tuple[dict, list[str]]:
    results: dict = {"xmp": {}, "peers": {}}
    errors: list[str] = []
    host = Host(sizes.guests)
    try:
        log(f"starting a supervisor in {host.rundir}")
        host.start()
        log(f"(1) create latency: {sizes.creates} creates (+{sizes.warm} warm-up)")
        try:
            results["xmp"].update(bench_create_latency(host, sizes.creates, sizes.warm))
        except (BenchError, OSError) as exc:
            errors.append(f"create latency: {type(exc).__name__}: {exc}")
        log(f"(2) {sizes.guests} idle guests")
        try:
            results["xmp"].update(bench_many(host, sizes.guests, sizes.cpu_window))
        except (BenchError, OSError, psutil.Error) as exc:
            errors.append(f"idle guests: {type(exc).__name__}: {exc}")
    except (BenchError, OSError) as exc:
        errors.append(f"supervisor: {type(exc).__name__}: {exc}")
    finally:
        errors.extend(host.stop())
        if not errors:
            host.remove_dir()
        else:
            errors.append(f"run directory kept for inspection: {host.dir}")
    log("(3) reference peers")
    for key, fn, runs in (("python_c_pass_ms", peer_python, sizes.python_runs),
                          ("fork_exit_wait_ms", peer_fork, sizes.fork_runs),
                          ("forkserver_process_ms", peer_forkserver, sizes.forkserver_runs)):
        try:
            results["peers"][key] = fn(runs)
        except Exception as exc:  # reported; the run continues
            errors.append(f"peer {key}: {type(exc).__name__}: {exc}")
    return results, errors


def ratios_of(results: dict) -> dict:
    xmp, peers = results["xmp"], results["peers"]
    out = {}
    for m in RATIO_OF:
        if m in xmp:
            r = {p: xmp[m] / peers[p] for p in PEERS if peers.get(p)}
            if r:
                out[m] = r
    return out


def targets_of(results: dict) -> dict:
    out = {}
    for name, (key, target, better) in TARGETS.items():
        measured = results["xmp"].get(key)
        out[name] = report.entry(measured, target, better)
    return out


def print_report(results: dict, ratios: dict, targets: dict, errors: list[str],
                 sizes: Sizes, elapsed: float) -> None:
    x, p = results["xmp"], results["peers"]

    def ms(key):
        return f"{x[key]:8.2f} ms" if key in x else "       - "

    kind = "smoke" if sizes is SMOKE else "quick" if sizes is QUICK else "full"
    print(f"xmp domain benchmark: {kind} run, {elapsed:.1f} s, "
          f"{len(os.sched_getaffinity(0))} CPUs, guests of {GUEST_MIB} MiB running {KERNEL}")
    print()
    print(f"(1) create latency, {sizes.creates} creates (after {sizes.warm} warm-up), "
          "t0 = just before the control request")
    print(f"{'':<28}{'median':>12}{'p90':>12}{'min':>12}")
    for label, stem in (("create -> control reply", "create_reply"),
                        ("create -> kernel entry", "create_to_kernel"),
                        ("create -> first console line", "create_to_console")):
        print(f"{label:<28}" + "".join(
            f"{ms(f'{stem}_{s}_ms'):>12}" for s in ("median", "p90", "min")))
    print()
    n = sizes.guests
    print(f"(2) {n} idle guests")
    rows = (("create all -> last kernel entry", "create_all_to_kernel_s", "{:.3f} s"),
            ("create all -> last control reply", "create_all_replies_s", "{:.3f} s"),
            ("creates per second", "creates_per_s", "{:.1f} /s"),
            ("PSS per guest", "pss_per_guest_mib", "{:.2f} MiB"),
            ("PSS total", "pss_total_mib", "{:.1f} MiB"),
            ("USS per guest", "uss_per_guest_mib", "{:.2f} MiB"),
            ("RSS per guest", "rss_per_guest_mib", "{:.2f} MiB"),
            ("CPU of all idle guests", "cpu_idle_guests_percent", "{:.2f} % of one CPU"))
    for label, key, fmt in rows:
        print(f"  {label:<34}{fmt.format(x[key]) if key in x else '-'}")
    if "cpu_window_s" in x:
        print(f"  (CPU over {x['cpu_window_s']:.1f} s of idling; cpu_times tick: "
              f"{1000 / os.sysconf('SC_CLK_TCK'):.0f} ms per process)")
    print()
    print("(3) reference peers (median)")
    for label, key in (("python -c pass", "python_c_pass_ms"),
                       ("os.fork + _exit + waitpid", "fork_exit_wait_ms"),
                       ("forkserver Process start->join", "forkserver_process_ms")):
        print(f"  {label:<34}{f'{p[key]:.3f} ms' if key in p else '-'}")
    print()
    print("ratios xmp / peer (lower is better for xmp)")
    print(f"{'':<30}{'python -c pass':>16}{'fork':>12}{'forkserver':>12}")
    for m, r in ratios.items():
        print(f"{m:<30}" + "".join(f"{(f'{r[k]:.2f}x' if k in r else '-'):>{w}}"
                                    for k, w in zip(PEERS, (16, 12, 12), strict=True)))
    print()
    report.print_targets("targets" + ("" if n == 100 else
                                       f" (the 100-guest ones are not measured with {n} guests)"),
                          targets, 30, 2)
    report.print_list("ERRORS:", errors)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="a tiny run that only proves it works")
    ap.add_argument("--quick", action="store_true",
                    help="15 creates and 20 guests instead of 50 and 100 (under 30 s)")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)
    sizes = SMOKE if args.smoke else QUICK if args.quick else FULL
    # SIGTERM unwinds like Ctrl-C, so the supervisor is stopped either way.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    t0 = time.monotonic()
    results, errors = run(sizes)
    elapsed = time.monotonic() - t0
    ratios = ratios_of(results)
    targets = targets_of(results)
    alive = multiprocessing.active_children()
    if alive:
        errors.append(f"child processes still running: {[p.pid for p in alive]}")
    if args.json:
        doc: dict[str, Any] = {"results": results, "ratios": ratios, "targets": targets,
               "sizes": {"creates": sizes.creates, "guests": sizes.guests}}
        if errors:
            doc["errors"] = errors
        print(json.dumps(doc, indent=2))
    else:
        print_report(results, ratios, targets, errors, sizes, elapsed)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
