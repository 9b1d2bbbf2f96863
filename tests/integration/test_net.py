"""The vif (netif) split driver end to end: netfront in guests, netback in
dom0 or a driver domain, joined by netback's learning switch
(``script=vif-switch``) so that the same frames pass with or without root."""

from __future__ import annotations

import json
import os
import signal
import time
import uuid

import pytest
from netkernels import NET_SIZES
from xmphost import HOST

from xmp.errors import XmpError
from xmp.xenstore.client import SocketTransport, XsClient

pytestmark = pytest.mark.timeout(120)

MAC_A, MAC_B, MAC_C, MAC_D = (f"00:16:3e:4e:00:0{i}" for i in range(1, 5))


def bridge() -> str:
    """A bridge name no parallel test shares (15 characters at most)."""
    return "xt" + uuid.uuid4().hex[:10]


def guest(name: str, kernel: str, mac: str, br: str, *, memory: int = 48, backend: str | None = None,
          script: str = "vif-switch", extra_vif: str = "", **args) -> str:
    spec = f"mac={mac}, bridge={br}, script={script}" + (f", backend={backend}" if backend else "")
    spec += extra_vif
    table = _toml(args)
    return (f'[[domain]]\nname = "{name}"\nkernel = "netkernels:{kernel}"\nmemory = {memory}\n'
            f'vif = ["{spec}"]\nargs = {table}\n')


def _toml(value) -> str:
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + " }"
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return json.dumps(value)  # strings, numbers and booleans read the same in TOML


def driver_domain(name: str = "netdd") -> str:
    return f'[[domain]]\nname = "{name}"\ndriver_domain = true\nmemory = 48\n'


def reports(h, dom: str) -> list[dict]:
    return [json.loads(line.split("nettest: ", 1)[1]) for line in h.console_log(dom).splitlines()
            if "nettest: " in line]


def report(h, dom: str, test: str, timeout: float = 30) -> dict:
    return h.wait(lambda: next((r for r in reports(h, dom) if r["test"] == test), None), timeout,
                  f"{dom}'s {test} report")


def xs(h) -> XsClient:
    return XsClient(SocketTransport.connect(str(h.rundir / "xenstored.sock")))


def go(h, *doms: str, key: str = "go") -> None:
    c = xs(h)
    try:
        for dom in doms:
            c.write(f"/local/domain/{h.info(dom)['domid']}/data/{key}", "1")
    finally:
        c.close()


def backend_dir(h, dom: str, back: str = "Domain-0", devid: int = 0) -> str:
    return f"/local/domain/{h.info(back)['domid']}/backend/vif/{h.info(dom)['domid']}/{devid}"


def stats(h, dom: str, back: str = "Domain-0") -> dict[str, int]:
    c = xs(h)
    try:
        base = backend_dir(h, dom, back) + "/statistics"
        return {k: int(c.read(f"{base}/{k}")) for k in c.directory(base)}
    finally:
        c.close()


def wait_stats(h, dom: str, cond, back: str = "Domain-0", what: str = "the counters") -> dict[str, int]:
    last: list[dict] = [{}]

    def check():
        try:
            last[0] = stats(h, dom, back)
        except XmpError as exc:  # not published yet
            last[0] = {"unreadable": str(exc)}
            return None
        return last[0] if cond(last[0]) else None
    try:
        return h.wait(check, 10, f"{dom}'s {what}")
    except AssertionError as exc:
        raise AssertionError(f"{dom}'s counters stayed {last[0]}") from exc


def read(h, path: str) -> str | None:
    c = xs(h)
    try:
        value = c.read_or(path)
        return None if value is None else value.decode()
    finally:
        c.close()


def exchange_pair(hosts, front: dict | None = None, backend: str | None = None, rounds: int = 1):
    br = bridge()
    args = {"rounds": rounds, **({"front": front} if front else {})}
    topo = (HOST + (driver_domain() if backend else "")
            + guest("a", "exchange", MAC_A, br, backend=backend, peer=MAC_B, **args)
            + guest("b", "exchange", MAC_B, br, backend=backend, peer=MAC_A, **args))
    h = hosts(topo).start(("a", "b"))
    report(h, "a", "ready")
    report(h, "b", "ready")
    go(h, "a", "b")
    return h, report(h, "a", "exchange", 60), report(h, "b", "exchange", 60)


@pytest.mark.parametrize("front", [None, {"split": True}, {"queues": 4}, {"queues": 3, "split": True}],
                         ids=["one-channel", "split-channels", "four-queues", "three-queues-split"])
def test_frames_of_every_size_both_ways_through_dom0(hosts, front):
    h, ra, rb = exchange_pair(hosts, front)
    want = len(NET_SIZES)
    for r in (ra, rb):
        assert r["bad"] == [] and r["got"] == want == r["want"]
        assert r["stats"]["tx_packets"] == want and r["stats"]["rx_packets"] == want
        assert r["stats"]["tx_errors"] == r["stats"]["rx_errors"] == 0
    front_dir = f"/local/domain/{h.info('a')['domid']}/device/vif/0"
    queues = (front or {}).get("queues", 1)
    if queues > 1:
        assert read(h, front_dir + "/multi-queue-num-queues") == str(queues)
        assert read(h, front_dir + f"/queue-{queues - 1}/tx-ring-ref") is not None
        assert report(h, "a", "ready")["queues"] == queues
    if (front or {}).get("split"):
        assert report(h, "a", "ready")["split"] is True
        where = f"{front_dir}/queue-0" if queues > 1 else front_dir
        assert read(h, where + "/event-channel-tx") is not None
    total = sum(NET_SIZES)
    # the backend counted the same frames, each direction
    s = wait_stats(h, "a", lambda v: v["rx_packets"] == want)
    assert s["tx_packets"] == want and s["tx_bytes"] == total and s["rx_bytes"] == total
    assert s["tx_errors"] == s["rx_errors"] == s["rx_dropped"] == 0


def test_frames_without_sg_stay_within_a_page(hosts):
    br = bridge()
    sizes = [14, 1514, 4096]
    h = hosts(HOST + guest("a", "exchange", MAC_A, br, peer=MAC_B, sizes=sizes, front={"sg": False})
              + guest("b", "exchange", MAC_B, br, peer=MAC_A, sizes=sizes)).start(("a", "b"))
    assert report(h, "a", "ready")["sg"] is False
    report(h, "b", "ready")
    go(h, "a", "b")
    ra, rb = report(h, "a", "exchange", 60), report(h, "b", "exchange", 60)
    assert ra["bad"] == rb["bad"] == [] and ra["got"] == rb["got"] == 3
    assert read(h, f"/local/domain/{h.info('a')['domid']}/device/vif/0/feature-sg") == "0"


def test_frames_through_a_network_driver_domain(hosts):
    h, ra, rb = exchange_pair(hosts, backend="netdd", rounds=2)
    for r in (ra, rb):
        assert r["bad"] == [] and r["got"] == r["want"] == 2 * len(NET_SIZES)
    s = wait_stats(h, "b", lambda v: v["rx_packets"] == 2 * len(NET_SIZES), "netdd")
    assert s["tx_packets"] == 2 * len(NET_SIZES) and s["tx_errors"] == 0


def test_network_list_and_hot_plug(hosts):
    br = bridge()
    h = hosts(HOST + guest("a", "sink", MAC_A, br)).start(("a",))
    report(h, "a", "ready")
    out = h.xmp("network-list", "a").stdout.splitlines()
    assert out[0].split() == ["Idx", "BE", "Mac", "Addr.", "handle", "state", "evt-ch", "tx-/rx-ring-ref",
                              "BE-path"]
    row = out[1].split()
    assert row[0] == "0" and row[1] == "0" and row[2] == MAC_A and row[3] == "0" and row[4] == "4"
    assert row[-1] == backend_dir(h, "a")
    h.xmp("network-attach", "a", f"mac={MAC_C}, bridge={br}, script=vif-switch")
    h.wait(lambda: len(h.xmp("network-list", "a").stdout.splitlines()) == 3, 10, "the second vif")
    second = h.xmp("network-list", "a").stdout.splitlines()[2].split()
    assert second[0] == "1" and second[2] == MAC_C
    h.xmp("network-detach", "a", MAC_C, "--force")
    h.wait(lambda: len(h.xmp("network-list", "a").stdout.splitlines()) == 2, 10, "the vif gone")
    assert read(h, backend_dir(h, "a", devid=1)) is None


HOSTILE = [
    ("bad_gref", False), ("size_mismatch", False), ("some_slots", False),
    ("cross_page", True), ("too_many_slots", True),
]


@pytest.mark.parametrize("case,fatal", HOSTILE, ids=[c for c, _ in HOSTILE])
def test_hostile_frontend_alone_is_refused(hosts, case, fatal):
    br = bridge()
    h = hosts(HOST + guest("bad", "hostile", MAC_A, br, peer=MAC_B, case=case)
              + guest("b", "exchange", MAC_B, br, peer=MAC_C, rounds=2)
              + guest("c", "exchange", MAC_C, br, peer=MAC_B, rounds=2)).start(("bad", "b", "c"))
    for dom in ("bad", "b", "c"):
        report(h, dom, "ready")
    go(h, "bad")
    r = report(h, "bad", "hostile")
    back = backend_dir(h, "bad")
    if fatal:  # disabled: its error node says why, and it is no longer Connected
        h.wait(lambda: "fatal tx error" in (read(h, back + "/error") or ""), 10, "the vif disabled")
        assert read(h, back + "/state") != "4"
    else:
        assert set(r["answers"].values()) == {-1}, r  # NETIF_RSP_ERROR for every slot
        assert read(h, back + "/state") == "4"
    wait_stats(h, "bad", lambda v: v["tx_errors"] >= 1)
    assert stats(h, "bad")["tx_packets"] == 0
    # the others' traffic goes on, byte for byte
    go(h, "b", "c")
    for dom in ("b", "c"):
        x = report(h, dom, "exchange", 60)
        assert x["bad"] == [] and x["got"] == x["want"] == 2 * len(NET_SIZES)


def test_rx_never_refilled_is_bounded_and_counted(hosts):
    br = bridge()
    h = hosts(HOST + guest("stall", "sink", MAC_A, br, stall=True)
              + guest("p", "pump", MAC_B, br, peer=MAC_A, count=3000)
              + guest("b", "exchange", MAC_C, br, peer=MAC_D)
              + guest("c", "exchange", MAC_D, br, peer=MAC_C)).start(("stall", "p", "b", "c"))
    for dom in ("stall", "p", "b", "c"):
        report(h, dom, "ready")
    go(h, "p")
    pumped = report(h, "p", "pumped", 60)
    assert pumped["stats"]["tx_packets"] == 3000
    # its ring's 256 buffers filled once, 256 frames wait in the bounded queue, the rest are dropped
    s = wait_stats(h, "stall", lambda v: v["rx_dropped"] + v["rx_packets"] >= 3000 - 256)
    assert s["rx_packets"] <= 256 and s["rx_dropped"] >= 3000 - 2 * 256
    go(h, "b", "c")
    for dom in ("b", "c"):
        x = report(h, dom, "exchange", 60)
        assert x["bad"] == [] and x["got"] == x["want"]


def test_rx_buffers_under_a_bad_gref_are_errors_for_that_vif_alone(hosts):
    br = bridge()
    h = hosts(HOST + guest("bad", "sink", MAC_A, br, bad_gref=True)
              + guest("p", "pump", MAC_B, br, peer=MAC_A, count=1000)
              + guest("b", "exchange", MAC_C, br, peer=MAC_D)
              + guest("c", "exchange", MAC_D, br, peer=MAC_C)).start(("bad", "p", "b", "c"))
    for dom in ("bad", "p", "b", "c"):
        report(h, dom, "ready")
    go(h, "p")
    report(h, "p", "pumped", 60)
    # the first 256 buffers were good; a frame after them hits a bad gref (NETIF_RSP_ERROR),
    # or, when the pump outran the guest, the bounded queue (dropped)
    s = wait_stats(h, "bad", lambda v: v["rx_errors"] + v["rx_dropped"] + v["rx_packets"] >= 1000 - 256)
    assert s["rx_packets"] <= 257 and s["rx_errors"] >= 100, s
    assert read(h, backend_dir(h, "bad") + "/state") == "4"  # an error answer, not a disconnect
    go(h, "b", "c")
    for dom in ("b", "c"):
        x = report(h, dom, "exchange", 60)
        assert x["bad"] == [] and x["got"] == x["want"]


def test_tx_flood_does_not_starve_the_others(hosts):
    br = bridge()
    h = hosts(HOST + guest("f", "hostile", MAC_A, br, peer=MAC_D, case="flood", seconds=4)
              + guest("s", "sink", MAC_D, br)
              + guest("b", "exchange", MAC_B, br, peer=MAC_C, rounds=3)
              + guest("c", "exchange", MAC_C, br, peer=MAC_B, rounds=3)).start(("f", "b", "c", "s"))
    for dom in ("f", "b", "c", "s"):
        report(h, dom, "ready")
    go(h, "f")
    go(h, "b", "c")
    for dom in ("b", "c"):
        x = report(h, dom, "exchange", 60)
        assert x["bad"] == [] and x["got"] == x["want"] == 3 * len(NET_SIZES)
    flooded = report(h, "f", "flooded", 30)
    assert flooded["sent"] > 100 and flooded["stats"]["tx_errors"] == 0


def chatter_reports(h, dom: str) -> list[dict]:
    return [r for r in reports(h, dom) if r["test"] == "chatter"]


def test_network_driver_domain_killed_while_traffic_flows(hosts):
    br = bridge()
    h = hosts(HOST + driver_domain().rstrip("\n") + '\non_crash = "restart"\n'
              + guest("a", "chatter", MAC_A, br, backend="netdd", peer=MAC_B)
              + guest("b", "chatter", MAC_B, br, backend="netdd", peer=MAC_A)).start(("netdd", "a", "b"))
    h.wait(lambda: any(r["got"] > 20 for r in chatter_reports(h, "a")), 20, "traffic through netdd")
    old = h.info("netdd")["domid"]
    os.kill(h.domain_pid("netdd"), signal.SIGKILL)
    h.wait(lambda: (h.info("netdd") or {}).get("domid", old) != old, 10, "netdd to restart")
    for dom in ("a", "b"):  # both guests live on, reconnect to the new netdd, and hear each other again
        h.wait(lambda dom=dom: (r := chatter_reports(h, dom)) and r[-1]["connections"] == 2, 20,
               f"{dom} reconnected")
        base = chatter_reports(h, dom)[-1]["got"]
        h.wait(lambda dom=dom, base=base: chatter_reports(h, dom)[-1]["got"] > base + 20, 20,
               f"traffic to {dom} through the restarted netdd")
    assert {d["name"] for d in h.list()} >= {"a", "b", "netdd"}


def test_flows_spread_over_the_queues_both_ways(hosts):
    br = bridge()
    h = hosts(HOST + guest("a", "flows", MAC_A, br, peer=MAC_B, count=64)
              + guest("b", "count_ipv4", MAC_B, br)).start(("a", "b"))
    assert report(h, "a", "ready")["queues"] == 4 and report(h, "b", "ready")["queues"] == 4
    go(h, "a")
    r = report(h, "a", "flows")
    assert sum(r["per_queue"]) == 64 and sum(1 for n in r["per_queue"] if n) >= 3, r
    h.wait(lambda: any(x.get("got") == 64 for x in reports(h, "b") if x["test"] == "ipv4"), 10,
           "every flow's frame at b")


def test_a_destroyed_guests_backend_directory_stays_gone(hosts):
    """netback's last counters must not bring back the backend directory the
    toolstack removed with the guest (a xenstore WRITE makes its parents)."""
    br = bridge()
    h = hosts(HOST + guest("a", "chatter", MAC_A, br, peer=MAC_B)
              + guest("b", "chatter", MAC_B, br, peer=MAC_A)).start(("a", "b"))
    h.wait(lambda: any(r["got"] > 10 for r in chatter_reports(h, "a")), 20, "traffic")
    back = backend_dir(h, "a")
    h.xmp("destroy", "a")
    h.wait(lambda: read(h, back) is None and h.info("a") is None, 10, "a and its backend gone")
    time.sleep(1)  # four ticks of netback's counter publication: nothing may come back
    assert read(h, back) is None
    assert chatter_reports(h, "b")[-1]["connections"] == 1
