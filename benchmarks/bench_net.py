"""Network benchmark: guest-to-guest TCP throughput and 64-byte UDP packet
rate through netfront -> netback -> bridge -> netback -> netfront, side by
side with the same test between two network namespaces joined directly by
a veth pair (the kernel's ceiling) and over ``multiprocessing.Pipe``
carrying the same bytes between two processes (what a Python user would
write).  Two xmp paths: netback in dom0 (it maps the guests' tx pages; vifs
are TAPs on a Linux bridge) and in an untrusted network driver domain
(grant copy both ways; its vifs TAPs on its own bridge, in its own network
namespace, joined to the host's by a veth pair); and dom0 again with the
vifs' MTU at 65000 (jumbo frames: what veth's GSO gives the kernel for
free, netif carries as multi-slot frames).  Needs root.

    python benchmarks/bench_net.py            # 5 s per test
    python benchmarks/bench_net.py --quick    # 2 s per test
    python benchmarks/bench_net.py --json     # one JSON object on stdout
"""

from __future__ import annotations

import argparse
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

from xmp.drivers.net import tap
from xmp.guests import netbench
from xmp.hv.jail import CLONE_NEWNET, unshare

PATHS = ("dom0", "dom0-jumbo", "driver-domain", "veth", "pipe")
LABELS = {"dom0": "(1) xmp dom0", "dom0-jumbo": "(1j) dom0 MTU 65000", "driver-domain": "(1b) xmp driver dom",
          "veth": "(2) veth", "pipe": "(3) Pipe"}
JUMBO_MTU = 65000   # the vifs' MTU for (1j): TCP segments as large as veth's GSO ones
TARGETS = {  # name: (path, metric, compared with, target)
    "tcp_vs_veth": ("dom0", "tcp_mbit_s", "veth", 0.25),
    "tcp_jumbo_vs_veth": ("dom0-jumbo", "tcp_mbit_s", "veth", 0.25),
    "udp64_vs_veth": ("dom0", "udp_pps", "veth", 0.20),
    "udp64_vs_pipe": ("dom0", "udp_pps", "pipe", 2.0),
}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def topology(seconds: float, driver_domain: bool, tag: str, mtu: int = 1500) -> str:
    net = f"10.{200 + int(tag[:2], 16) % 50}.{int(tag[2:4], 16)}"
    back = (', backend=netdd' if driver_domain else "") + f", mtu={mtu}"
    dd = '[[domain]]\nname = "netdd"\ndriver_domain = true\nmemory = 64\n\n' if driver_domain else ""
    return f"""\
[host]
memory = 512

[dom0]
memory = 128

{dd}[[domain]]
name = "srv"
kernel = "xmp.guests.netbench:main"
memory = 96
vif = ["mac=00:16:3e:5b:00:01, bridge=xb{tag}, vifname=xb{tag}s, ip={net}.2/24{back}"]
args = {{ role = "server" }}

[[domain]]
name = "cli"
kernel = "xmp.guests.netbench:main"
memory = 96
vif = ["mac=00:16:3e:5b:00:02, bridge=xb{tag}, vifname=xb{tag}c, ip={net}.3/24{back}"]
args = {{ role = "client", target = "{net}.2", seconds = {seconds}, delay = 1.5 }}
"""


def reports(host: BenchHost, dom: str) -> list[dict]:
    path = host.consoles / f"{dom}.log"
    if not path.exists():
        return []
    lines = path.read_text(errors="replace").splitlines()
    return [json.loads(line.split("netbench: ", 1)[1]) for line in lines if "netbench: " in line]


def run_xmp(seconds: float, driver_domain: bool, mtu: int = 1500) -> dict:
    host = BenchHost("xmp-bench-net-", topology(seconds, driver_domain, uuid.uuid4().hex[:6], mtu))
    try:
        host.start()
        deadline = time.monotonic() + 2 * seconds + 60
        while time.monotonic() < deadline:
            host.check_alive()
            got = {r["test"]: r for r in reports(host, "srv")}
            if "tcp" in got and "udp" in got:
                sent = {r["test"]: r for r in reports(host, "cli")}
                return {"tcp_mbit_s": got["tcp"]["mbit_s"], "udp_pps": got["udp"]["pps"],
                        "udp_sent": sent.get("udp-sent", {}).get("packets"),
                        "udp_received": got["udp"]["packets"], "server_counters": got["udp"]["stats"]}
            time.sleep(0.1)
        raise BenchError(f"no results within the time: {host.output()}")
    finally:
        problems = host.stop()
        host.remove_dir()
        if problems:
            raise BenchError("; ".join(problems))


def _ns_end(role: str, conn, seconds: float, ifname: str, address: str, target: str) -> None:
    unshare(CLONE_NEWNET)
    conn.send("in")
    conn.recv()  # the parent has moved our veth end in
    tap.configure(ifname, mac="02:00:00:5b:00:0" + ("1" if role == "server" else "2"), mtu=1500,
                  addresses=[address])
    if role == "server":
        netbench.servers(5201, conn.send)
        conn.send({"test": "listening"})
        time.sleep(3600)
    else:
        conn.recv()  # the server listens
        conn.send(netbench.tcp_client(target, 5201, seconds))
        time.sleep(0.5)
        conn.send(netbench.udp_client(target, 5201, seconds))
        time.sleep(3600)


def run_veth(seconds: float) -> dict:
    from pyroute2 import IPRoute

    ctx = multiprocessing.get_context("fork")
    tag = uuid.uuid4().hex[:6]
    ends = {}
    for role, addr in (("server", "10.249.1.1/24"), ("client", "10.249.1.2/24")):
        mine, theirs = ctx.Pipe()
        p = ctx.Process(target=_ns_end, args=(role, theirs, seconds, f"xv{tag}{role[0]}", addr, "10.249.1.1"),
                        daemon=True)
        p.start()
        assert mine.recv() == "in"
        ends[role] = (p, mine)
    try:
        with IPRoute() as ipr:
            ipr.link("add", ifname=f"xv{tag}s", kind="veth", peer=f"xv{tag}c")
            for role, (p, _) in ends.items():
                idx = ipr.link_lookup(ifname=f"xv{tag}{role[0]}")[0]
                ipr.link("set", index=idx, net_ns_pid=p.pid)
        for _, conn in ends.values():
            conn.send("go")
        srv, cli = ends["server"][1], ends["client"][1]
        assert srv.recv()["test"] == "listening"
        cli.send("go")
        got: dict[str, Any] = {}
        deadline = time.monotonic() + 2 * seconds + 30
        while len(got) < 2 and time.monotonic() < deadline:
            if srv.poll(0.5):
                r = srv.recv()
                got[r["test"]] = r
        if len(got) < 2:
            raise BenchError("the veth ends gave no results in time")
        return {"tcp_mbit_s": got["tcp"]["mbit_s"], "udp_pps": got["udp"]["pps"]}
    finally:
        for p, _ in ends.values():  # their namespaces, and the veth in them, go with them
            p.kill()
            p.join()


def _pipe_reader(conn, out) -> None:
    n = 0
    t0 = None
    while True:
        msg = conn.recv_bytes()
        if msg == b"end":
            break
        if t0 is None:
            t0 = time.monotonic()
        n += len(msg)
        out_count = n
    dt = time.monotonic() - (t0 or time.monotonic())
    out.send((out_count if n else 0, dt))


def run_pipe(seconds: float) -> dict:
    ctx = multiprocessing.get_context("fork")
    res = {}
    for kind, size in (("tcp", netbench.CHUNK), ("udp", netbench.UDP_SIZE)):
        a, b = ctx.Pipe()
        out_r, out_w = ctx.Pipe(duplex=False)
        p = ctx.Process(target=_pipe_reader, args=(b, out_w), daemon=True)
        p.start()
        data = bytes(size)
        t0 = time.monotonic()
        while time.monotonic() - t0 < seconds:
            for _ in range(64):
                a.send_bytes(data)
        a.send_bytes(b"end")
        n, dt = out_r.recv()
        p.join()
        res[kind] = (n, dt)
    (tn, tdt), (un, udt) = res["tcp"], res["udp"]
    return {"tcp_mbit_s": tn * 8 / tdt / 1e6, "udp_pps": un / netbench.UDP_SIZE / udt}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="a tiny run that only proves it works")
    ap.add_argument("--quick", action="store_true", help="2 s per test")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)
    seconds = 0.5 if args.smoke else 2.0 if args.quick else 5.0
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    results: dict[str, dict] = {}
    errors: list[str] = []
    if not tap.privileged():
        errors.append("needs root: the guests' network namespaces, the bridge and the veth pair")
    else:
        for path, fn in (("dom0", lambda: run_xmp(seconds, False)),
                         ("dom0-jumbo", lambda: run_xmp(seconds, False, JUMBO_MTU)),
                         ("driver-domain", lambda: run_xmp(seconds, True)),
                         ("veth", lambda: run_veth(seconds)), ("pipe", lambda: run_pipe(seconds))):
            log(f"bench_net: {path} ...")
            try:
                results[path] = fn()
            except (BenchError, OSError, AssertionError) as exc:
                errors.append(f"{path}: {exc}")
    ratios = {f"{p}_vs_{o}": {m: (results[p][m] / results[o][m]
                                  if p in results and o in results and results[o][m] else None)
                              for m in ("tcp_mbit_s", "udp_pps")}
              for p in ("dom0", "dom0-jumbo", "driver-domain") for o in ("veth", "pipe")}
    targets = {name: report.entry(ratios[f"{p}_vs_{o}"][m], t, "higher")
               for name, (p, m, o, t) in TARGETS.items()}
    if args.json:
        doc: dict[str, Any] = {"results": results, "ratios": ratios, "targets": targets,
                               "seconds": seconds}
        if errors:
            doc["errors"] = errors
        print(json.dumps(doc, indent=2))
    else:
        print(f"xmp network benchmark: {seconds} s per test, {len(os.sched_getaffinity(0))} CPUs")
        print(f"{'':<28}" + "".join(f"{LABELS[p]:>20}" for p in PATHS))
        for m, label in (("tcp_mbit_s", "TCP guest to guest, Mbit/s"), ("udp_pps", "UDP 64 B, packets/s")):
            print(f"{label:<28}" + "".join(f"{results[p][m]:>20.1f}" if p in results else f"{'-':>20}"
                                           for p in PATHS))
        print()
        for name, r in ratios.items():
            print(f"  {name:<26}" + "  ".join(f"{m} {v:.3f}" if v is not None else f"{m} -"
                                              for m, v in r.items()))
        print()
        report.print_targets("targets (dom0 path)", targets, 18, 3)
        report.print_list("ERRORS:", errors)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
