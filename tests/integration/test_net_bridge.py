"""Root mode: every vif is a real TAP on a real Linux bridge, as a Xen
dom0's vif-bridge script makes it, and the host reaches the guests."""

from __future__ import annotations

import socket
import uuid

import pytest
from netkernels import ETHERTYPE, NET_SIZES, mac_bytes, make_frame
from test_net import backend_dir, guest, read, report, wait_stats
from xmphost import HOST

from xmp.drivers.net import tap

pytestmark = [pytest.mark.timeout(120),
              pytest.mark.skipif(not tap.privileged(), reason="TAP and bridges need root (CAP_NET_ADMIN)")]

def names() -> tuple[str, str, str]:
    """A bridge and two TAP names no parallel test shares."""
    tag = uuid.uuid4().hex[:8]
    return f"xt{tag}", f"xv{tag}a", f"xv{tag}b"


def links() -> dict[str, dict]:
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        out = {}
        for link in ipr.get_links():
            info = link.get_attr("IFLA_LINKINFO")
            out[link.get_attr("IFLA_IFNAME")] = {
                "index": link["index"], "master": link.get_attr("IFLA_MASTER"),
                "mac": link.get_attr("IFLA_ADDRESS"),
                "kind": info.get_attr("IFLA_INFO_KIND") if info is not None else None}
        return out


def test_vifs_are_taps_on_a_bridge_the_host_reaches(hosts):
    br, va, vb = names()
    h = hosts(HOST + guest("a", "echo", "00:16:3e:4e:01:01", br, script="vif-bridge",
                           extra_vif=f", vifname={va}")
              + guest("b", "exchange", "00:16:3e:4e:01:02", br, script="vif-bridge",
                      extra_vif=f", vifname={vb}", peer="00:16:3e:4e:01:03", sizes=[14])).start(("a", "b"))
    report(h, "a", "ready")
    report(h, "b", "ready")
    assert read(h, backend_dir(h, "a") + "/mode") == "bridge"
    assert read(h, backend_dir(h, "a") + "/hotplug-status") == "connected"
    ls = links()
    assert ls[br]["kind"] == "bridge"
    assert ls[va]["master"] == ls[br]["index"] and ls[vb]["master"] == ls[br]["index"]
    # the host, on the bridge, talks to guest a: every size up to the bridge's MTU, byte for byte
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x88B5))
    try:
        s.bind((br, 0))
        s.settimeout(5)
        # the bridge's own address: what the host sends from and what its bridge takes in
        guest_mac, me = mac_bytes("00:16:3e:4e:01:01"), mac_bytes(ls[br]["mac"])
        sizes = [n for n in NET_SIZES if n <= 1514]
        for n in sizes:
            s.send(make_frame(guest_mac, me, n))
            while True:
                try:
                    got = s.recv(65536)
                except TimeoutError:
                    raise AssertionError(f"no answer to the {n}-byte frame; a's counters: "
                                         f"{wait_stats(h, 'a', lambda v: True)}") from None
                if got[6:12] == guest_mac and got[12:14] == ETHERTYPE:
                    break
            assert got == me + guest_mac + make_frame(guest_mac, me, n)[12:], f"{n}-byte frame"
    finally:
        s.close()
    c = wait_stats(h, "a", lambda v: v["tx_packets"] >= len(sizes))
    assert c["rx_packets"] >= len(sizes) and c["tx_errors"] == 0
    h.stop()
    h.wait_exit()
    left = links()
    assert va not in left and vb not in left, "a TAP outlived its backend"
    assert br not in left, "the bridge xmp made outlived its last vif"


def test_vif_default_name_and_existing_bridge_kept(hosts):
    br, _, _ = names()
    tap_bridge = br
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        ipr.link("add", ifname=tap_bridge, kind="bridge")
    try:
        h = hosts(HOST + guest("g", "sink", "00:16:3e:4e:01:05", br, script="vif-bridge")).start(("g",))
        report(h, "g", "ready")
        name = f"vif{h.info('g')['domid']}.0"
        ls = links()
        assert ls[name]["master"] == ls[br]["index"]
        wait_stats(h, "g", lambda v: v["tx_packets"] >= 1)  # the sink's announcement reached the bridge
        h.xmp("network-detach", "g", "0")
        h.wait(lambda: name not in links(), 10, f"{name} gone after network-detach")
        assert br in links(), "a bridge xmp did not make must stay"
    finally:
        with IPRoute() as ipr:
            idx = ipr.link_lookup(ifname=tap_bridge)
            if idx:
                ipr.link("del", index=idx[0])


@pytest.mark.timeout(90)
def test_supervisor_killed_leaves_no_bridge_tap_or_reaper(hosts):
    """kill -9 of the supervisor leaves nothing behind: its TAPs go with
    their descriptors, a driver domain's veth with its namespace, and the
    bridge it made (with the host's address on it) goes by its reaper,
    which then exits."""
    import signal
    import subprocess

    import psutil

    br, va, vb = names()
    h = hosts(f'[host]\nmemory = 1024\nbridges = {{ {br} = "10.251.7.1/24" }}\n[dom0]\nmemory = 64\n'
              '[[domain]]\nname = "netdd"\ndriver_domain = true\nmemory = 48\n'
              + guest("a", "echo", "00:16:3e:4e:01:21", br, script="vif-bridge",
                      extra_vif=f", vifname={va}")
              + guest("b", "echo", "00:16:3e:4e:01:22", br, script="vif-bridge", backend="netdd",
                      extra_vif=f", vifname={vb}")).start(("netdd", "a", "b"))
    report(h, "a", "ready")
    report(h, "b", "ready")
    ls = links()
    uplink = f"{br[:9]}.d{h.info('netdd')['domid']}"  # the driver domain's bridge joined to the host's
    assert ls[va]["master"] == ls[br]["index"] == ls[uplink]["master"]
    reapers = [p for p in h.descendants() if "xmp.reaper" in " ".join(p.cmdline())]
    assert len(reapers) == 1
    h.proc.send_signal(signal.SIGKILL)
    h.proc.wait(10)
    h.assert_no_interfaces(timeout=15)
    shown = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, check=True).stdout
    assert br not in shown and va not in shown and uplink not in shown, shown
    assert psutil.wait_procs(reapers, timeout=10)[1] == [], "the reaper outlived its work"
