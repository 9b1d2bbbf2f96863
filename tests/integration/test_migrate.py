"""xmp migrate between two hosts (two supervisors in two network
namespaces): the guest goes on there where it was, runs on exactly one
host at every instant, and nothing is left on either."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess

import pytest
from xmphost import ENV, HOST, XMP, guest

from xmp.cli import request
from xmp.clitable import CliError
from xmp.migration.channel import generate_key

pytestmark = [pytest.mark.timeout(180),
              pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("ip"),
                                 reason="network namespaces need root and iproute2")]

KEEP = guest("keep", "idle")   # a guest that stays, so neither host stops when the migrated one leaves
COUNTER = guest("c", "counter", args={"count": 0, "interval": 0.01})
BIG = guest("c", "counter", 256, args={"count": 0, "interval": 0.01})   # round 0 takes a while


def counts(log: str) -> list[int]:
    return [int(m) for m in re.findall(r"^count (\d+)$", log, re.M)]


class Two:
    """Two hosts, alpha and beta, each listening for migrations with one key."""

    def __init__(self, pair, hosts, tmp_path, a_guests: str = KEEP, b_guests: str = KEEP):
        key = tmp_path / "shared.key"
        generate_key(key)
        self.shared = tmp_path / "shared"
        self.shared.mkdir()
        self.hosts = []
        self.address = []
        for i, (name, extra) in enumerate((("alpha", a_guests), ("beta", b_guests))):
            top = HOST.replace("[host]\n", f'[host]\nname = "{name}"\nmigrate = "{pair.addresses[i]}:0"\n'
                                            f'migrate_key = "{key}"\n')
            h = hosts(top + extra, name, netns=pair.names[i]).start()
            path = h.rundir / "migrate.address"
            self.address.append(h.wait(lambda p=path: p.exists() and p.read_text().strip(), 10,
                                       "the address"))
            self.hosts.append(h)

    def migrate(self, src: int, dom: str, *flags: str, check: bool = True):
        h = self.hosts[src]
        return h.xmp("migrate", "--json", "--shared", str(self.shared), *flags, dom, self.address[1 - src],
                     check=check, timeout=120)

    def where(self, name: str) -> list[str]:
        return [h.dir.name for h in self.hosts if h.info(name) is not None]

    def stop(self) -> None:
        for h in self.hosts:
            assert h.stop() == 0
            h.assert_clean()
        assert not list(self.shared.iterdir()), "a decision file was left on the shared storage"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("live", [True, False], ids=["live", "stop-and-copy"])
def test_counter_migrates_and_counts_on_there_without_gap_or_repeat(pair, hosts, tmp_path, live):
    two = Two(pair, hosts, tmp_path, KEEP + COUNTER)
    a, b = two.hosts
    a.wait(lambda: len(counts(a.console_log("c"))) > 20, 20, "counting")
    uuid = a.info("c")["uuid"]
    out = json.loads(two.migrate(0, "c", *(["--live"] if live else [])).stdout)
    assert out["name"] == "c" and out["live"] is live
    assert two.where("c") == ["beta"]
    assert b.info("c")["uuid"] == uuid and b.info("c")["state"] == "running"
    assert 0 < out["downtime_ms"] < 5000
    if live:
        assert len(out["rounds"]) >= 2 and out["rounds"][-1]["suspended"]
        assert out["rounds"][0]["pages"] >= out["tot_pages"] - 64
    at = len(counts(b.console_log("c")))
    b.wait(lambda: len(counts(b.console_log("c"))) > at + 20, 20, "counting on beta")
    before = counts(a.console_log("c").split("c: suspending")[0])
    after = counts(b.console_log("c"))
    assert after[0] == before[-1] + 1, (before[-5:], after[:5])
    assert after == list(range(after[0], after[0] + len(after)))
    two.stop()


@pytest.mark.timeout(120)
def test_a_refused_migration_leaves_the_guest_running_on_the_source_only(pair, hosts, tmp_path):
    """The receiver already has a domain of that name: it refuses before a
    page moves; the guest was never suspended and counts on at home."""
    two = Two(pair, hosts, tmp_path, KEEP + COUNTER, KEEP + COUNTER)
    a, b = two.hosts
    a.wait(lambda: len(counts(a.console_log("c"))) > 5, 20, "counting")
    domid = a.info("c")["domid"]
    out = two.migrate(0, "c", "--live", check=False)
    assert out.returncode == 1 and "a domain named 'c' already exists" in out.stderr, out.stderr
    assert "EEXIST (10.99.0.2" in a.dmesg()
    assert a.info("c")["domid"] == domid and a.info("c")["state"] == "running"
    n = len(counts(a.console_log("c")))
    a.wait(lambda: len(counts(a.console_log("c"))) > n + 5, 20, "counting on at home")
    assert "c: suspending" not in a.console_log("c")
    assert [d["name"] for d in b.list()].count("c") == 1
    two.stop()


def _during_round0(two: Two, dom: str, act, timeout: float = 90) -> tuple[subprocess.Popen, str, str]:
    """``xmp migrate --live DOM`` from alpha to beta in the background,
    ``act()`` once round 0 streams; the finished command and its output."""
    a = two.hosts[0]
    proc = subprocess.Popen([*XMP, "migrate", "--json", "--live", "--shared", str(two.shared), dom,
                             two.address[1], "--rundir", str(a.rundir)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        a.wait(lambda: _phase(a, dom) == "pre-copy", 30, "round 0 under way")
        act()
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc, out, err


def _kill(h) -> None:
    os.kill(h.pid, signal.SIGKILL)
    h.proc.wait(10)


def _phase(h, dom: str) -> str | None:
    try:
        return request(h.rundir, "migrate-status", dom=dom)["phase"]
    except CliError:   # no migration (yet, or any more)
        return None


@pytest.mark.timeout(150)
def test_the_destination_killed_mid_stream_leaves_the_guest_running_on_the_source_only(pair, hosts, tmp_path):
    """beta's supervisor is SIGKILLed while round 0 streams: the migration
    fails with an error, the guest was never suspended and counts on at home
    without a gap or a repeat, and neither host keeps anything of it."""
    two = Two(pair, hosts, tmp_path, KEEP + BIG)
    a, b = two.hosts
    a.wait(lambda: len(counts(a.console_log("c"))) > 5, 20, "counting")
    domid = a.info("c")["domid"]
    proc, _out, err = _during_round0(two, "c", lambda: _kill(b))
    assert proc.returncode == 1 and "the connection to " in err and "was lost" in err \
        and "before the handover: c goes on here" in err, err
    info = a.info("c")
    assert info["domid"] == domid and info["state"] == "running", info
    n = len(counts(a.console_log("c")))
    a.wait(lambda: len(counts(a.console_log("c"))) > n + 20, 20, "counting on at home")
    seen = counts(a.console_log("c"))
    assert seen == list(range(seen[0], seen[0] + len(seen)))    # no gap, no repeat
    assert "c: suspending" not in a.console_log("c")             # never suspended: killed before
    b.assert_clean(sockets=False)                                # the killed host: nothing of it left
    assert a.stop() == 0
    a.assert_clean()
    assert not list(two.shared.iterdir()), "a decision file was left on the shared storage"


@pytest.mark.timeout(150)
def test_the_source_killed_mid_stream_leaves_nothing_on_the_destination(pair, hosts, tmp_path):
    """alpha's supervisor is SIGKILLed while round 0 streams: its guest dies
    with its host (as on a crashed Xen host), and beta drops the half-received
    domain -- it never ran there, and nothing of it is left."""
    two = Two(pair, hosts, tmp_path, KEEP + BIG)
    a, b = two.hosts
    a.wait(lambda: len(counts(a.console_log("c"))) > 5, 20, "counting")
    proc, _out, _err = _during_round0(two, "c", lambda: _kill(a), timeout=60)
    assert proc.returncode != 0
    b.wait(lambda: "migration: receiving 'c'" in b.dmesg(), 10, "the receiver to have begun")
    b.wait(lambda: b.info("c") is None and "c" not in b.console_log("c"), 20, "beta without c")
    assert [d["name"] for d in b.list()] == ["Domain-0", "keep"]
    a.assert_clean(sockets=False)
    assert b.stop() == 0
    b.assert_clean()
    assert not list(two.shared.iterdir()), "a decision file was left on the shared storage"


@pytest.mark.timeout(150)
def test_a_domain_already_migrating_is_refused_ebusy(pair, hosts, tmp_path):
    two = Two(pair, hosts, tmp_path, KEEP + BIG)
    a, b = two.hosts
    a.wait(lambda: len(counts(a.console_log("c"))) > 5, 20, "counting")
    refused = []

    def again() -> None:   # straight to the control socket: no CLI start-up while round 0 runs
        with pytest.raises(CliError) as info:
            request(a.rundir, "migrate", dom="c", address=two.address[1], live=True, shared=str(two.shared))
        refused.append(str(info.value))
    proc, out, err = _during_round0(two, "c", again)
    assert refused == ["c is being migrated or saved already"], refused
    assert proc.returncode == 0, err          # the first one was not disturbed
    assert json.loads(out)["name"] == "c"
    assert two.where("c") == ["beta"]
    two.stop()
