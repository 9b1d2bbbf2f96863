#!/usr/bin/env python
"""xmp save and xmp restore, against writing and reading the same bytes.

    python benchmarks/bench_save.py            # 64 and 256 MiB guests, 3 rounds each
    python benchmarks/bench_save.py --quick    # 64 MiB, 2 rounds (under 30 s)
    python benchmarks/bench_save.py --json     # one JSON object on stdout

A supervisor (dom0 and an idle guest that stays) is started in a fresh
temporary directory; each round creates a guest running
``xmp.guests.touch:main`` with half of its pages written, then over the
control socket (no ``xmp`` command's start-up is timed):

``save``     the "save" request until its answer: suspend through
             control/shutdown, console drained, the image written and renamed,
             the domain destroyed.  ``save_write`` is the supervisor's own
             figure for writing the image alone.
``restore``  the "restore" request until its answer: the image read and
             checked, the domain built with its RAM filled, its process started
             (a running guest); ``restore_to_console`` until the restored
             kernel's first line is in its console log.

Peers, in this process, on the same file system, with as many bytes as the
image: ``file_write`` (one ``write`` of a bytes object, then ``flush``),
``file_read`` (``read`` of the whole file), ``pickle_dump`` / ``pickle_load``
of a bytes object of that size.  Throughputs are image bytes / s; a ratio is
xmp's throughput over the peer's, the median over rounds.

Targets: save and restore each >= 50% of the file-copy ceiling (the
write-only ``save_write`` against ``file_write``, and ``restore`` against
``file_read``), and restore of a 64 MiB guest < 100 ms.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import report  # benchmarks/report.py: the shared targets shape
from harness import BenchError, BenchHost  # benchmarks/harness.py: a supervisor under measurement

TOPOLOGY = ('[host]\nmemory = 1536\n[dom0]\nmemory = 128\n'
            '[[domain]]\nname = "keep"\nkernel = "xmp.guests.idle:main"\nmemory = 32\n')
MIB = 1 << 20


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class Control:
    def __init__(self, rundir: Path):
        self.path = rundir / "control.sock"

    def request(self, cmd: str, timeout: float = 120, **fields: Any) -> dict[str, Any]:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(self.path))
            sock.sendall((json.dumps({"cmd": cmd, **fields}) + "\n").encode())
            buf = b""
            while not buf.endswith(b"\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    raise BenchError(f"{cmd}: the supervisor closed the connection")
                buf += chunk
        reply = json.loads(buf)
        if not reply.get("ok"):
            raise BenchError(f"{cmd}: {reply.get('error')}")
        return reply


def wait_for(cond, timeout: float, what: str, poll: float = 0.0005) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return time.monotonic()
        time.sleep(poll)
    raise BenchError(f"timed out waiting for {what}")


def console(host: BenchHost, name: str) -> str:
    path = host.consoles / f"{name}.log"
    return path.read_text(errors="replace") if path.exists() else ""


def one_round(host: BenchHost, ctl: Control, mib: int, n: int, workdir: Path) -> dict[str, float]:
    name = f"t{mib}-{n}"
    ctl.request("create", config={"name": name, "kernel": "xmp.guests.touch:main", "memory": mib,
                                  "args": {"fraction": 0.5}})
    wait_for(lambda: "pages touched" in console(host, name), 60, f"{name} to touch its memory")
    image = workdir / f"{name}.save"
    t0 = time.monotonic()
    saved = ctl.request("save", dom=name, path=str(image))
    save = time.monotonic() - t0
    size = image.stat().st_size
    t0 = time.monotonic()
    restored = ctl.request("restore", path=str(image))
    restore = time.monotonic() - t0
    seen = wait_for(lambda: "touch: restored" in console(host, name), 30, f"{name} restored")
    ctl.request("destroy", dom=restored["domid"])
    image.unlink()
    return {"bytes": size, "pages": saved["pages"], "save": save, "save_write": saved["write_seconds"],
            "restore": restore, "restore_to_console": seen - t0, **peers(size, workdir)}


def peers(size: int, workdir: Path) -> dict[str, float]:
    data = os.urandom(1 << 20) * (size >> 20) + os.urandom(size & ((1 << 20) - 1))
    path = workdir / "peer.bin"
    t0 = time.monotonic()
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
    file_write = time.monotonic() - t0
    t0 = time.monotonic()
    with open(path, "rb") as f:
        back = f.read()
    file_read = time.monotonic() - t0
    assert len(back) == size
    del back
    t0 = time.monotonic()
    with open(path, "wb") as f:
        pickle.dump(data, f, protocol=pickle.HIGHEST_PROTOCOL)
    pickle_dump = time.monotonic() - t0
    t0 = time.monotonic()
    with open(path, "rb") as f:
        pickle.load(f)
    pickle_load = time.monotonic() - t0
    path.unlink()
    return {"file_write": file_write, "file_read": file_read, "pickle_dump": pickle_dump,
            "pickle_load": pickle_load}


def summarize(rounds: list[dict[str, float]]) -> dict[str, Any]:
    med = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
    # a throughput ratio (same bytes) is the inverse ratio of the times
    ratio = {f"{a}/{b}": statistics.median(r[b] / r[a] for r in rounds)
             for a, b in (("save", "file_write"), ("save_write", "file_write"), ("save", "pickle_dump"),
                          ("restore", "file_read"), ("restore", "pickle_load"))}
    mbps = {k: med["bytes"] / med[k] / 1e6 for k in ("save", "save_write", "restore", "file_write",
                                                      "file_read", "pickle_dump", "pickle_load")}
    return {"median_seconds": med, "ratios": ratio, "MB_per_s": mbps}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="one 16 MiB round (the test suite's run)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    sizes, rounds = ([16], 1) if args.smoke else ([64], 2) if args.quick else ([64, 256], 3)
    host = BenchHost("xmp-bench-save-", TOPOLOGY)
    results: dict[str, Any] = {}
    errors: list[str] = []
    try:
        host.start()
        ctl = Control(host.rundir)
        wait_for(lambda: (host.check_alive(), "keep.log" in os.listdir(host.consoles)
                          if host.consoles.exists() else False)[1], 30, "the host", 0.05)
        for mib in sizes:
            log(f"bench_save: {mib} MiB guests, {rounds} round(s)")
            results[f"{mib}MiB"] = summarize([one_round(host, ctl, mib, n, host.dir) for n in range(rounds)])
    except (BenchError, OSError) as exc:
        errors.append(str(exc))
    finally:
        errors += host.stop()
        host.remove_dir()
    first = results.get(f"{sizes[0]}MiB")
    targets = {
        "save_write / file_write": report.entry(first and first["ratios"]["save_write/file_write"], 0.5,
                                                "higher"),
        "restore / file_read": report.entry(first and first["ratios"]["restore/file_read"], 0.5, "higher"),
        "restore 64 MiB (ms)": report.entry(results["64MiB"]["median_seconds"]["restore"] * 1000
                                            if "64MiB" in results else None, 100, "lower"),
    }
    out: dict[str, Any] = {"results": results, "targets": targets}
    if errors:
        out["errors"] = errors
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        for size, r in results.items():
            print(f"{size}: " + ", ".join(f"{k} {v:.0f} MB/s" for k, v in r["MB_per_s"].items()))
            print("  ratios: " + ", ".join(f"{k} {v:.2f}" for k, v in r["ratios"].items()))
        report.print_targets("targets:", targets)
        report.print_list("errors:", errors)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
