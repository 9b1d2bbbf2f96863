"""xenstored in a running host: an independent client (pyxs) on its
socket, the standard tree and its permissions, hostile guests, and the
control driver driven through the CLI."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest
from xmphost import HOST, guest

pyxs = pytest.importorskip("pyxs")
pytestmark = pytest.mark.timeout(120)


def test_pyxs_speaks_to_xenstored(hosts, monkeypatch):
    h = hosts(HOST + guest("web", "idle")).start(("web",))
    monkeypatch.setenv("XENSTORED_PATH", str(h.rundir / "xenstored.sock"))
    with pyxs.Client() as c:  # unchanged: it finds the socket through XENSTORED_PATH
        assert c.read(b"/local/domain/1/name") == b"web"
        assert c.read(b"/local/domain/0/name") == b"Domain-0"
        assert c.get_domain_path(1) == b"/local/domain/1"
        assert c.is_domain_introduced(1)
        c.write(b"/tool/x", b"1")
        c.mkdir(b"/tool/dir")
        assert {b"dir", b"x"} <= set(c.list(b"/tool"))
        c.set_perms(b"/tool/x", [b"n0", b"r1"])
        assert c.get_perms(b"/tool/x") == [b"n0", b"r1"]
        c.delete(b"/tool/x")
        assert not c.exists(b"/tool/x")
        c.transaction()
        c.write(b"/tool/tx", b"in")
        c.commit()
        assert c.read(b"/tool/tx") == b"in"
        c.transaction()
        c.write(b"/tool/tx", b"rolled back")
        c.rollback()
        assert c.read(b"/tool/tx") == b"in"
        with c.monitor() as m:
            m.watch(b"/tool", b"tok")
            assert next(m.wait()) == (b"/tool", b"tok")  # fires once on registration
            c.write(b"/tool/y", b"2")
            assert next(m.wait()) == (b"/tool/y", b"tok")
    assert h.stop() == 0


def test_the_toolstack_writes_the_standard_tree(hosts):
    h = hosts(HOST + guest("g", "idle", memory=48, vcpus=1, maxvcpus=2)).start(("g",))

    def read(path):
        return h.xmp("xenstore", "read", path).stdout.rstrip("\n")

    # written by the guest's control driver once it has booted
    h.wait(lambda: read("/local/domain/1/control/feature-poweroff") == "1", 10, "the control driver")
    assert read("/local/domain/1/name") == "g"
    assert read("/local/domain/1/memory/target") == str(48 * 1024)
    assert read("/local/domain/1/cpu/0/availability") == "online"
    assert read("/local/domain/1/cpu/1/availability") == "offline"
    assert read("/local/domain/1/console/type") == "xenconsoled"
    with pyxs.Client(unix_socket_path=str(h.rundir / "xenstored.sock")) as c:
        assert c.get_perms(b"/local/domain/1") == [b"n0", b"r1"]
        assert c.get_perms(b"/local/domain/1/control/shutdown") == [b"n1"]
        assert c.get_perms(b"/local/domain/1/data") == [b"n1"]
        vm = c.read(b"/local/domain/1/vm")
        assert c.read(vm + b"/name") == b"g"
    ls = h.xmp("xenstore", "ls", "/local/domain/1").stdout
    assert 'name = "g"' in ls and "control" in ls
    h.xmp("destroy", "g")
    h.wait(lambda: h.xmp("xenstore", "read", "/local/domain/1/name", check=False).returncode == 1, 10,
           "the tree to go with the domain")
    assert h.stop() == 0
    h.assert_clean()


def test_a_guest_cannot_reach_other_domains_nodes(hosts):
    probe = '[[domain]]\nname = "probe"\nkernel = "kernels:xsprobe"\nmemory = 32\nargs = { other = 2 }\n'
    h = hosts(HOST + probe + guest("victim", "idle")).start(("probe", "victim"))
    h.wait(lambda: "xsprobe: done" in h.console_log("probe"), 30, "the probe")
    res = {}
    for line in h.console_log("probe").splitlines():
        if line.startswith("xsprobe: {"):
            r = json.loads(line[len("xsprobe: "):])
            res[r["test"]] = r
    assert res["read_own_name"] == {"test": "read_own_name", "ok": True, "value": "probe"}
    for name in ("read_other", "write_other", "chmod_other", "write_own_name", "rm_other", "introduce"):
        assert res[name]["ok"] is False and res[name]["errno"] == "EACCES", res[name]
    assert res["write_own_data"]["ok"] is True
    assert res["node_quota"]["ok"] is False  # C xenstored's 1000-node quota
    assert res["big_node"]["ok"] is False
    # the victim and the tools are unaffected
    h.xmp("xenstore", "write", "/local/domain/2/data/secret", "s3cret")
    assert "spied" not in h.console_log("probe")  # no events for nodes it may not read
    assert h.xmp("xenstore", "read", "/local/domain/2/data/secret").stdout.strip() == "s3cret"
    assert h.stop() == 0


def test_garbage_on_a_ring_closes_only_that_connection(hosts):
    h = hosts(HOST + '[[domain]]\nname = "bad"\nkernel = "kernels:xsgarbage"\nmemory = 32\n'
              + guest("good", "idle")).start(("bad", "good"))
    h.wait(lambda: "xsgarbage: sent" in h.console_log("bad"), 20, "the garbage")
    # xenstored lives: tools and the other guest's control driver still work
    h.xmp("xenstore", "write", "/tool/alive", "yes")
    assert h.xmp("xenstore", "read", "/tool/alive").stdout.strip() == "yes"
    h.xmp("shutdown", "-w", "--timeout", "60", "good", timeout=90)
    assert h.info("good") is None
    assert h.stop() == 0


def test_shutdown_reboot_and_force(hosts):
    h = hosts(HOST + guest("a", "idle") + guest("b", "idle", on_reboot="restart")
              + guest("spin", "busy")).start(("a", "b", "spin"))
    h.xmp("shutdown", "-w", "--timeout", "60", "a", timeout=90)
    assert h.info("a") is None
    assert "dom1 'a' shut down: poweroff" in h.dmesg()
    h.xmp("reboot", "b")
    h.wait(lambda: (h.info("b") or {}).get("domid", 0) >= 4, 60, "b to come back with a new domid")
    assert "dom2 'b' shut down: reboot" in h.dmesg()
    slow = h.xmp("shutdown", "-w", "--timeout", "1", "spin", check=False)
    assert slow.returncode == 1 and "did not shut down within 1 s" in slow.stderr
    h.xmp("shutdown", "-F", "--timeout", "1", "spin")
    assert h.info("spin") is None
    assert h.stop() == 0
    h.assert_clean()


def test_suspend_and_resume_in_place(hosts):
    h = hosts(HOST + guest("s", "counter", args={"count": 0, "interval": 0.05})).start(("s",))
    h.wait(lambda: "count 3" in h.console_log("s"), 10, "counting")
    h.xmp("suspend", "s")
    h.wait(lambda: (h.info("s") or {}).get("state_letters") == "---ss-", 10, "the suspend")
    n = h.console_log("s").count("count ")
    pid = h.domain_pid("s")
    h.xmp("resume", "s")
    h.wait(lambda: h.console_log("s").count("count ") > n + 3, 10, "counting again")
    assert "s: resumed" in h.console_log("s") and h.domain_pid("s") == pid  # in place
    assert h.info("s")["state"] == "running"
    assert h.stop() == 0


def test_ctrl_c_powers_guests_off_cleanly(hosts):
    h = hosts(HOST + guest("polite", "idle") + guest("rude", "busy")).start(("polite", "rude"))
    h.wait(lambda: h.xmp("xenstore", "read", "/local/domain/1/control/feature-poweroff",
                         check=False).stdout.strip() == "1", 10, "the control driver")
    assert h.stop(signal.SIGINT, timeout=30) == 0
    log = (h.rundir / "logs" / "hypervisor.log").read_text()
    assert "dom1 'polite' shut down: poweroff" in log
    assert "dom2 'rude' destroyed (supervisor stopping)" in log
    h.assert_clean()



def test_topology_quota_override_reaches_xenstored(hosts):
    probe = ('[[domain]]\nname = "probe"\nkernel = "kernels:xsprobe"\nmemory = 32\nargs = { other = 2 }\n'
             "xenstore_quota = { nodes = 3000, node-size = 65536 }\n")
    h = hosts(HOST + probe + guest("victim", "idle")).start(("probe", "victim"))
    h.wait(lambda: "xsprobe: done" in h.console_log("probe"), 30, "the probe")
    line = next(ln for ln in h.console_log("probe").splitlines() if '"node_quota"' in ln)
    assert json.loads(line[len("xsprobe: "):])["value"] == "all 2000 written"
    assert h.stop() == 0


@pytest.mark.parametrize("action", ["destroy", "restart", "rename-restart", "preserve",
                                    "coredump-destroy", "coredump-restart"])
def test_shutdown_applies_each_on_poweroff_action(hosts, action):
    h = hosts(HOST + guest("g", "idle", on_poweroff=action) + guest("keep", "idle")).start(("g", "keep"))
    h.xmp("shutdown", "g")
    names = lambda: {d["name"]: d for d in h.list()}  # noqa: E731
    if action in ("restart", "coredump-restart", "rename-restart"):
        h.wait(lambda: names().get("g", {}).get("domid", 0) >= 3, 60, "g to come back")
    if action == "rename-restart":
        assert names()["g-1"]["state_letters"] == "---s--"  # the old one, kept
    if action == "preserve":
        h.wait(lambda: names().get("g", {}).get("state") == "shutdown", 60, "g to be kept")
        assert names()["g"]["state_letters"] == "---s--"
    if action in ("destroy", "coredump-destroy"):
        h.wait(lambda: "g" not in names(), 60, "g to go")
    if action.startswith("coredump"):
        assert (h.rundir / "dumps" / "g-1.core").stat().st_size == 32 << 20
    assert f"on_poweroff = {action}" in h.dmesg() or action in ("preserve", "rename-restart")
    assert h.stop() == 0
    h.assert_clean()


def test_xmp_xenstore_verbs(hosts):
    h = hosts(HOST + guest("g", "idle")).start(("g",))
    h.xmp("xenstore", "write", "/tool/demo/key", "value 1")
    assert h.xmp("xenstore", "read", "/tool/demo/key").stdout == "value 1\n"
    h.xmp("xenstore", "chmod", "/tool/demo/key", "n0", "r1")
    with pyxs.Client(unix_socket_path=str(h.rundir / "xenstored.sock")) as c:
        assert c.get_perms(b"/tool/demo/key") == [b"n0", b"r1"]
    assert 'key = "value 1"' in h.xmp("xenstore", "ls", "/tool/demo").stdout
    h.xmp("xenstore", "rm", "/tool/demo")
    missing = h.xmp("xenstore", "read", "/tool/demo/key", check=False)
    assert missing.returncode == 1 and "ENOENT" in missing.stderr
    watch = h.xmp("xenstore", "watch", "/local/domain/1/name", "1")  # one event: the registration's
    assert watch.stdout == "/local/domain/1/name\n"
    bad = h.xmp("xenstore", "write", "/tool/x", check=False)
    assert bad.returncode == 1 and "usage: xmp xenstore write PATH VALUE" in bad.stderr
    assert h.stop() == 0


def test_requests_a_guest_queued_before_xenstored_took_it_on_are_served(hosts, tmp_path):
    """A new guest runs at once and may write its first xenstore requests
    before dom0's xenstored has handled INTRODUCE (dom0 busy; here: stopped);
    its notifications then reached nobody, and xenstored must read the ring
    when it takes the guest on, as C xenstored does."""
    h = hosts(HOST).start(("Domain-0",))
    cfg = tmp_path / "early.toml"
    cfg.write_text('[[domain]]\nname = "early"\nkernel = "kernels:xsfirst"\nmemory = 32\n')
    dom0 = h.domain_pid("Domain-0")
    os.kill(dom0, signal.SIGSTOP)
    try:
        h.xmp("create", str(cfg))
        h.wait(lambda: h.info("early") is not None, 10, "the guest")
        time.sleep(0.5)  # it has booted and written its request into the ring by now
    finally:
        os.kill(dom0, signal.SIGCONT)
    h.wait(lambda: "xsfirst: my name is early" in h.console_log("early"), 20, "the guest's answer")
    assert h.stop() == 0
    h.assert_clean()
