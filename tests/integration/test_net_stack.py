"""Guests with their own TCP/IP stack (a network namespace whose eth0 is
netfront's TAP) reached by real, unmodified clients: ping and curl from
the host through the bridge, and guest-to-guest ICMP."""

from __future__ import annotations

import random
import re
import shutil
import socket
import subprocess
import time
import uuid
from pathlib import Path

import pytest
from test_net import backend_dir, read, stats, wait_stats
from xmphost import guest

from xmp.drivers.net import tap

pytestmark = [pytest.mark.timeout(120),
              pytest.mark.skipif(not tap.privileged(),
                                 reason="network namespaces, TAPs and bridges need root")]


def lan() -> tuple[str, str]:
    """A bridge name and a /24 no parallel test shares."""
    return f"xt{uuid.uuid4().hex[:8]}", f"10.{random.randint(200, 250)}.{random.randint(0, 255)}"  # 10 chars


HOST_BARE = "[host]\nmemory = 1024\n[dom0]\nmemory = 64\n"


def topology(br: str, net: str) -> str:
    return (f'[host]\nmemory = 1024\nbridges = {{ {br} = "{net}.1/24" }}\n[dom0]\nmemory = 64\n'
            + guest("web", "httpd", 48,
                    vif=[f"mac=00:16:3e:4e:02:02, bridge={br}, ip={net}.2, vifname={br}a"],
                    args={"port": 8080})
            + guest("pinger", "netpinger", 48,
                    vif=[f"mac=00:16:3e:4e:02:03, bridge={br}, ip={net}.3/24, vifname={br}b"],
                    args={"target": f"{net}.2", "count": 5}))


def run(*cmd: str, timeout: float = 20) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)


def test_host_pings_and_curls_a_guest_and_guests_ping_each_other(hosts):
    for tool in ("ping", "curl"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (apt-get install iputils-ping curl)")
    br, net = lan()
    h = hosts(topology(br, net)).start(("web", "pinger"))
    h.wait(lambda: "httpd: serving" in h.console_log("web"), 20, "the web guest serving")
    # guest to guest: ICMP from pinger's stack to web's, through both vifs and the bridge
    h.wait(lambda: "netpinger: 5/5 answers" in h.console_log("pinger"), 30, "pinger's answers")
    ping = run("ping", "-c", "3", "-W", "2", f"{net}.2")
    assert ping.returncode == 0 and "3 received" in ping.stdout, ping.stdout + ping.stderr
    got = run("curl", "-s", "--max-time", "5", f"http://{net}.2:8080/")
    assert got.returncode == 0 and got.stdout.startswith("hello from web"), got
    put = run("curl", "-s", "--max-time", "5", "-X", "PUT", "--data-binary", "x" * 100_000,
              f"http://{net}.2:8080/kv/big")
    assert put.stdout == "stored\n", put
    back = run("curl", "-s", "--max-time", "5", f"http://{net}.2:8080/kv/big")
    assert back.stdout == "x" * 100_000
    # the frames took the rings: netback counted them, and so did the guest's netfront
    s = wait_stats(h, "web", lambda v: v["rx_bytes"] > 100_000 and v["tx_packets"] > 10)
    assert s["tx_errors"] == s["rx_errors"] == 0
    front = run("curl", "-s", "--max-time", "5", f"http://{net}.2:8080/stats")
    assert front.returncode == 0 and '"rx_bytes"' in front.stdout
    assert stats(h, "pinger")["tx_packets"] >= 5


EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def example(name: str, br: str, net: str) -> str:
    """An example with its bridge and subnet made unique for this test."""
    text = (EXAMPLES / name).read_text()
    text = text.replace("xenbr0", br).replace("10.77.0", net).replace("10.78.0", net).replace("lan0", br)
    n = iter(range(10))  # TAP names of their own: vif<domid>.0 is every parallel host's
    return re.sub(r"(vif = \[\"mac=[^,]+)", lambda m: f"{m.group(1)}, vifname={br}v{next(n)}", text)


def test_example_net_toml_host_reaches_both_guests(hosts):
    for tool in ("ping", "curl"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (apt-get install iputils-ping curl)")
    br, net = lan()
    h = hosts(example("net.toml", br, net)).start(("web", "sink", "pinger"))
    h.wait(lambda: "httpd: serving" in h.console_log("web"), 20, "the web guest serving")
    h.wait(lambda: "tcpsink: listening" in h.console_log("sink"), 20, "the sink listening")
    assert run("ping", "-c", "2", "-W", "2", f"{net}.2").returncode == 0
    assert run("curl", "-s", "--max-time", "5", f"http://{net}.2/").stdout.startswith("hello from web")
    # a stream into the sink: nc when there is one, else Python's own socket
    data = bytes(range(256)) * 4096  # 1 MiB
    with socket.create_connection((f"{net}.3", 5201), timeout=5) as c:
        c.sendall(data)
    h.wait(lambda: f"tcpsink: {len(data)} bytes" in h.console_log("sink"), 20, "the sink's count")
    h.wait(lambda: "netpinger: 3/3 answers" in h.console_log("pinger"), 20, "the pinger's answers")
    h.stop()
    assert h.wait_exit() == 0


def test_example_net_driver_domain_guests_meet_on_its_bridge_the_host_reaches(hosts):
    br, net = lan()
    h = hosts(example("net-driver-domain.toml", br, net)).start(("netdd", "web", "pinger"))
    h.wait(lambda: "netpinger: 3/3 answers" in h.console_log("pinger"), 30, "the pinger's answers")
    assert read(h, backend_dir(h, "web", "netdd") + "/mode") == "bridge"
    h.wait(lambda: "httpd: serving" in h.console_log("web"), 20, "the web guest serving")
    assert run("ping", "-c", "2", "-W", "2", f"{net}.2").returncode == 0
    s = wait_stats(h, "pinger", lambda v: v["rx_packets"] >= 3, "netdd")
    assert s["tx_errors"] == s["rx_errors"] == 0


@pytest.mark.timeout(300)
@pytest.mark.xdist_group("heavy")
def test_bench_net_smoke_run_reports_every_target():
    import json
    import sys

    bench = EXAMPLES.parent / "benchmarks" / "bench_net.py"
    out = subprocess.run([sys.executable, str(bench), "--smoke", "--json"], capture_output=True, text=True,
                         timeout=280, check=False, cwd=bench.parent)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    doc = json.loads(out.stdout)
    assert set(doc["results"]) == {"dom0", "dom0-jumbo", "driver-domain", "veth", "pipe"}
    assert all(r["tcp_mbit_s"] > 0 and r["udp_pps"] > 0 for r in doc["results"].values())
    for target in doc["targets"].values():
        assert set(target) >= {"measured", "target", "better", "met"}


def test_real_iperf3_and_nc_from_the_host(hosts):
    for tool in ("iperf3", "nc", "nsenter"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (apt-get install iperf3 netcat-openbsd)")
    br, net = lan()
    h = hosts(f'[host]\nmemory = 1024\nbridges = {{ {br} = "{net}.1/24" }}\n[dom0]\nmemory = 64\n'
              + guest("perf", "tcpsink", 48, vif=[f"mac=00:16:3e:4e:03:02, bridge={br}, ip={net}.2/24, "
                                                   f"vifname={br}a"], args={"port": 5999})
              + guest("sink", "tcpsink", 48, vif=[f"mac=00:16:3e:4e:03:03, bridge={br}, ip={net}.3/24, "
                                                   f"vifname={br}b"])).start(("perf", "sink"))
    h.wait(lambda: "tcpsink: listening" in h.console_log("sink"), 20, "the sink listening")
    h.wait(lambda: "tcpsink: listening" in h.console_log("perf"), 20, "the perf guest up")
    # iperf3 -s in the guest's own network namespace (its jail has no iperf3 to run): the
    # host's binary, entered into the namespace, on the guest's TCP/IP stack and its rings
    server = subprocess.Popen(["nsenter", "-t", str(h.domain_pid("perf")), "-n", "iperf3", "-s"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def iperf() -> subprocess.CompletedProcess | None:
        out = run("iperf3", "-c", f"{net}.2", "-t", "2", "-J", timeout=30)
        return out if out.returncode == 0 and '"sum_received"' in out.stdout else None

    try:
        out = h.wait(iperf, 20, "iperf3 to the guest")
    finally:
        server.kill()
        server.wait()
    import json
    result = json.loads(out.stdout)
    assert result["end"]["sum_received"]["bytes"] > 1_000_000
    s = wait_stats(h, "perf", lambda v: v["rx_bytes"] >= result["end"]["sum_received"]["bytes"])
    assert s["rx_errors"] == 0
    data = "netcat says hi\n" * 1000
    nc = subprocess.run(["nc", "-N", "-w", "5", f"{net}.3", "5201"], input=data, capture_output=True,
                        text=True, timeout=20, check=False)
    assert nc.returncode == 0, nc.stderr
    h.wait(lambda: f"tcpsink: {len(data)} bytes" in h.console_log("sink"), 20, "the sink's count")
    h.stop()
    h.wait_exit()
    h.assert_clean()


def test_guest_announces_itself_with_a_gratuitous_arp(hosts):
    """The bridge exists before the host starts (the host keeps it), so a
    listener on it hears the guest's eth0 come up."""
    from pyroute2 import IPRoute

    br, net = lan()
    with IPRoute() as ipr:
        ipr.link("add", ifname=br, kind="bridge")
        ipr.link("set", index=ipr.link_lookup(ifname=br)[0], state="up")
    try:
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0806))
        s.bind((br, 0))
        s.settimeout(1)
        h = hosts(HOST_BARE + guest("web", "httpd", 48,
                                    vif=[f"mac=00:16:3e:4e:04:02, bridge={br}, ip={net}.2/24, "
                                         f"vifname={br}a"]))
        h.start(("web",))
        ip = socket.inet_aton(f"{net}.2")
        mac = bytes.fromhex("00163e4e0402")
        deadline = time.monotonic() + 20
        seen = None
        while seen is None and time.monotonic() < deadline:
            try:
                f = s.recv(2048)
            except TimeoutError:
                continue
            # ARP request, sender = target = our address, from our MAC: gratuitous
            if f[6:12] == mac and f[20:22] == b"\x00\x01" and f[28:32] == ip and f[38:42] == ip:
                seen = f
        s.close()
        assert seen is not None, "no gratuitous ARP from the guest"
        assert seen[:6] == b"\xff" * 6 and seen[22:28] == mac
        h.stop()
        h.wait_exit()
    finally:
        with IPRoute() as ipr:
            idx = ipr.link_lookup(ifname=br)
            if idx:
                ipr.link("del", index=idx[0])


def test_hot_plugged_vif_gets_the_guests_own_stack(hosts):
    """A vif given by ``xmp network-attach`` to a running (jailed, capability-
    less) guest gets its TAP eth0 like a boot-time one: the host curls it."""
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed (apt-get install curl)")
    br, net = lan()
    h = hosts(f'[host]\nmemory = 1024\nbridges = {{ {br} = "{net}.1/24" }}\n[dom0]\nmemory = 64\n'
              + guest("web", "httpd", 48, args={"port": 8080})).start(("web",))
    h.xmp("network-attach", "web", f"mac=00:16:3e:4e:05:02, bridge={br}, ip={net}.2/24, vifname={br}a")
    h.wait(lambda: "httpd: serving" in h.console_log("web"), 30, "the web guest serving on its new vif")
    got = h.wait(lambda: (r := run("curl", "-s", "--max-time", "3", f"http://{net}.2:8080/")).returncode == 0
                 and r, 20, "curl through the hot-plugged vif")
    assert got.stdout.startswith("hello from web"), got
    s = wait_stats(h, "web", lambda v: v["rx_packets"] > 0 and v["tx_packets"] > 0)
    assert s["tx_errors"] == s["rx_errors"] == 0
    # unplugged, its TAP leaves the guest's namespace, so the devid can be plugged again
    pid = h.domain_pid("web")
    assert tap.in_netns(pid, lambda: tap.present("eth0"))
    h.xmp("network-detach", "web", "0", "--force")
    h.wait(lambda: not tap.in_netns(pid, lambda: tap.present("eth0")), 10, "eth0 gone from the guest")
    h.xmp("network-attach", "web", f"mac=00:16:3e:4e:05:03, bridge={br}, ip={net}.4/24, vifname={br}c")
    assert tap.in_netns(pid, lambda: tap.present("eth0"))
    h.stop()
    assert h.wait_exit() == 0


def test_host_reaches_a_guest_behind_a_network_driver_domain(hosts):
    """A network driver domain owns its bridge (its own namespace, CAP_NET_ADMIN
    there only): its vifs are TAPs on it, joined to the host's bridge by a veth
    pair, so the host curls a guest it serves and a dom0 guest's pings reach it."""
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed (apt-get install curl)")
    br, net = lan()
    h = hosts(f'[host]\nmemory = 1024\nbridges = {{ {br} = "{net}.1/24" }}\n[dom0]\nmemory = 64\n'
              '[[domain]]\nname = "netdd"\ndriver_domain = true\nmemory = 48\n'
              + guest("web", "httpd", 48, args={"port": 8080},
                      vif=[f"mac=00:16:3e:4e:06:02, bridge={br}, backend=netdd, ip={net}.2/24"])
              + guest("pinger", "netpinger", 48, args={"target": f"{net}.2", "count": 3},
                      vif=[f"mac=00:16:3e:4e:06:03, bridge={br}, ip={net}.3/24, vifname={br}b"]))
    h.start(("netdd", "web", "pinger"))
    h.wait(lambda: "httpd: serving" in h.console_log("web"), 30, "the web guest serving")
    assert read(h, backend_dir(h, "web", "netdd") + "/mode") == "bridge"
    assert any("CAP_NET_ADMIN there only" in p.read_text() for p in (h.rundir / "logs").glob("*netdd*.log"))
    got = h.wait(lambda: (r := run("curl", "-s", "--max-time", "3", f"http://{net}.2:8080/")).returncode == 0
                 and r, 20, "curl to the guest behind the driver domain")
    assert got.stdout.startswith("hello from web"), got
    # a guest of dom0's bridge reaches it too: host bridge -> veth -> netdd's bridge -> its vif
    h.wait(lambda: "netpinger: 3/3 answers" in h.console_log("pinger"), 30, "the pinger's answers")
    s = wait_stats(h, "web", lambda v: v["rx_packets"] > 3 and v["tx_packets"] > 3, "netdd")
    assert s["tx_errors"] == s["rx_errors"] == 0
    dd = h.info("netdd")["domid"]
    assert tap.exists(f"{br[:9]}.d{dd}")  # the host's end of the join
    h.stop()
    assert h.wait_exit() == 0
    assert not tap.exists(f"{br[:9]}.d{dd}")
