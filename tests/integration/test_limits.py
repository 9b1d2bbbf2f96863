"""Ordinary limits are named errors, never a dead supervisor: many domains,
descriptors running out, a supervisor asked for more while it stops."""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import socket as so
import subprocess

import pytest
from xmphost import ENV, HOST, XMP, guest

from xmp.topology import parse_domain

pytestmark = pytest.mark.timeout(120)


def _long(i: int) -> str:
    return f"g{i:03d}".ljust(64, "x")  # names at xl's 64 characters: the widest info records


@pytest.mark.xdist_group("heavy")  # never beside another heavy test
def test_more_domains_than_one_info_message_holds(hosts):
    """dom0 asks for every domain's info each time one comes or goes; 220
    records of 64-character names are 70 KiB, more than one hypercall
    message.  The supervisor crashed on the reply ("hypercall message of
    72,000-odd bytes exceeds 65536") and took every domain with it; now dom0
    pages through sysctl getdomaininfolist and attaches every console."""
    n = 220
    h = hosts("[host]\nmemory = 2048\n[dom0]\nmemory = 64\n"
              + "".join(guest(_long(i), "idle", memory=1) for i in range(n))).start()
    last = h.rundir / "console" / f"{n}.sock"  # xenconsoled's socket for the last guest
    h.wait(last.exists, 60, "xenconsoled to attach the last guest's console")
    assert len([d for d in h.list() if d["name"].startswith("g")]) == n
    assert h.proc.poll() is None
    assert h.stop() == 0
    h.assert_clean(timeout=20)


def test_no_domain_is_created_while_the_supervisor_stops(hosts, tmp_path):
    """Teardown asks the guests to power off and serves its loop while they
    do; `xmp create` reached it there and was obeyed (38 domains were
    created during one teardown); so was a hot-plug.  Both are refused,
    naming why."""
    h = hosts(HOST + guest("spin", "busy")).start(("spin",))  # spins: never answers poweroff
    cfg = tmp_path / "late.toml"
    cfg.write_text(guest("late", "idle"))
    log = h.rundir / "logs" / "hypervisor.log"
    h.proc.send_signal(signal.SIGTERM)
    h.wait(lambda: "stopping: signal SIGTERM" in log.read_text(), 10, "the teardown to begin")
    out = h.xmp("create", str(cfg), check=False)
    assert out.returncode == 1, out.stdout
    assert "the supervisor is stopping (signal SIGTERM): no new domains" in out.stderr
    disk = h.xmp("block-attach", "spin", f"vdev=xvdb, size=1M, target={tmp_path / 'late.img'}", check=False)
    assert disk.returncode == 1
    assert "the supervisor is stopping (signal SIGTERM): no new devices" in disk.stderr
    assert not (tmp_path / "late.img").exists()
    assert h.wait_exit(30) == 0
    assert "'late'" not in log.read_text()
    h.assert_clean()


def test_a_detached_supervisor_that_fails_leaves_its_traceback_in_its_log(tmp_path):
    """`xmp run --detach` pointed the supervisor's stderr at /dev/null: its
    traceback went nowhere.  Here it cannot bind its control socket (the run
    directory's path is too long for AF_UNIX)."""
    rundir = tmp_path / ("r" * max(1, 110 - len(str(tmp_path / "control.sock"))))
    topo = tmp_path / "t.toml"
    topo.write_text(HOST + guest("a", "idle"))
    out = subprocess.run([*XMP, "run", "--detach", "--rundir", str(rundir), str(topo)], capture_output=True,
                         text=True, timeout=60, check=False, env=ENV)
    assert out.returncode == 1 and "the supervisor did not start: AF_UNIX path too long" in out.stderr
    log = (rundir / "logs" / "hypervisor.log").read_text()
    assert "Traceback (most recent call last)" in log and "OSError: AF_UNIX path too long" in log


def test_running_out_of_descriptors_is_a_named_refusal(hosts):
    """With RLIMIT_NOFILE 256 dom0 ran out at its 34th guest: later guests
    were "created" without xenstore or console, then EMFILE in the build
    crashed the supervisor.  Now a domain is refused before it is built,
    naming the limit, and every domain that was accepted works."""
    h = hosts(HOST + guest("first", "idle", memory=4)).start(("first",), nofile=256)
    info = h.xmp("info").stdout
    assert f"xmp_supervisor         : {h.rundir}: 2 domains of 16 it can hold (RLIMIT_NOFILE 256)" in info, \
        info
    sock = so.socket(so.AF_UNIX, so.SOCK_STREAM)
    sock.connect(str(h.rundir / "control.sock"))
    f = sock.makefile("rwb")
    replies = []
    for i in range(40):
        cfg = parse_domain(f'[[domain]]\nname = "g{i}"\nkernel = "xmp.guests.idle:main"\nmemory = 4\n')
        f.write((json.dumps({"cmd": "create", "config": cfg.to_dict()}) + "\n").encode())
        f.flush()
        replies.append(json.loads(f.readline()))
    sock.close()
    ok = [r for r in replies if r["ok"]]
    assert len(ok) == 14  # 16 with dom0 and "first"
    for r in replies[14:]:
        assert r["errno"] == errno.EMFILE
        assert r["error"].startswith("this host can hold 16 domains (RLIMIT_NOFILE 256"), r["error"]
    last = ok[-1]["domid"]
    h.wait(lambda: h.xmp("xenstore", "read", f"/local/domain/{last}/control/feature-poweroff",
                         check=False).stdout.strip() == "1", 30, "the last guest's xenstore")
    h.wait((h.rundir / "console" / f"{last}.sock").exists, 30, "the last guest's console")
    assert "Too many open files" not in (h.rundir / "logs" / "Domain-0.log").read_text()
    assert h.proc.poll() is None
    assert h.stop() == 0
    h.assert_clean(timeout=20)


def test_sigterm_during_start_up_stops_at_once(hosts):
    """SIGTERM while `xmp run` creates its domains was honoured only once
    the whole file had been created (110 s for a large one)."""
    n = 150
    h = hosts("[host]\nmemory = 1024\n[dom0]\nmemory = 64\n"
              + "".join(guest(f"g{i}", "idle", memory=1) for i in range(n)))
    log = h.rundir / "logs" / "hypervisor.log"
    out = open(h.out_path, "wb")
    h.proc = subprocess.Popen([*XMP, "run", "--rundir", str(h.rundir), str(h.topology)], stdout=out,
                              stderr=subprocess.STDOUT, env=ENV)
    out.close()
    h.wait(lambda: log.exists() and "created dom2 " in log.read_text(), 30, "the first guests")
    h.proc.send_signal(signal.SIGTERM)
    assert h.wait_exit(30) == 0
    text = log.read_text()
    created = text.count("created dom") - 1  # dom0
    assert 2 <= created < n, created
    assert f"start-up interrupted: {created} of {n} domains created" in text
    h.assert_clean(timeout=20)


def test_how_a_domain_process_ended_is_told(hosts):
    """The zygote reports every exit status; the supervisor threw them away."""
    h = hosts(HOST + guest("crashy", "crasher", on_crash="preserve") + guest("victim", "idle")).start(
        ("crashy", "victim"))
    h.wait(lambda: (h.info("crashy") or {}).get("exit") == "exited with status 1", 15, "the crash's status")
    assert h.info("crashy")["state_letters"] == "---sc-"
    assert h.info("victim")["exit"] is None
    pid = h.domain_pid("victim")
    os.kill(pid, signal.SIGKILL)
    h.wait(lambda: f"dom2 'victim': process {pid} killed by SIGKILL" in h.dmesg(), 15, "the kill's report")
    assert re.search(r"dom1 'crashy': process \d+ exited with status 1", h.dmesg())
    assert h.stop() == 1  # a crash that was not restarted fails the run
    h.assert_clean()


def test_block_attach_answers_after_xenstore_and_reports_what_failed(hosts, tmp_path):
    """`xmp block-attach` said "attached" before xenstore had answered; an
    image path xenstore cannot hold went out anyway, xenstored dropped the
    toolstack's connection and every later domain had no xenstore; a path
    that cannot be created crashed the supervisor (FileExistsError)."""
    h = hosts(HOST + guest("g", "idle")).start(("g",))
    out = h.xmp("block-attach", "g", f"vdev=xvdb, size=1M, target={tmp_path / 'b.img'}")
    assert out.stdout.startswith("xmp: disk 51728 attached to dom1 (backend dom0)")
    assert h.xmp("xenstore", "read", "/local/domain/0/backend/vbd/1/51728/state").stdout.strip() in "1234"
    deep = tmp_path.joinpath(*["d" * 200] * 20, "c.img")  # 4,000-odd bytes: Linux takes it, xenstore not
    long = h.xmp("block-attach", "g", f"vdev=xvdc, size=1M, target={deep}", check=False)
    assert long.returncode == 1 and "the image path is longer than xenstore holds (3968 bytes)" in long.stderr
    bad = h.xmp("block-attach", "g", "vdev=xvdd, size=1M, target=/dev/null/d.img", check=False)
    assert bad.returncode == 1 and "disk xvdd: cannot create /dev/null/d.img: " in bad.stderr
    cfg = tmp_path / "later.toml"
    cfg.write_text(guest("later", "idle"))
    domid = h.xmp("create", str(cfg)).stdout.split("(id ")[1].rstrip(")\n")
    h.wait(lambda: h.xmp("xenstore", "read", f"/local/domain/{domid}/control/feature-poweroff",
                         check=False).stdout.strip() == "1", 20, "the later guest's xenstore")
    assert "xenstored closed the toolstack's connection" not in h.dmesg()
    assert h.stop() == 0
    h.assert_clean()


def test_a_restart_the_host_cannot_hold_is_logged_not_fatal(hosts, tmp_path):
    """on_crash = restart when the domain's memory went to another meanwhile:
    the refusal ended the supervisor's loop (an exception from _create)."""
    crashy = guest("crashy", "crasher", memory=32, on_crash="restart", args={"after": 3.0})
    h = hosts("[host]\nmemory = 128\n[dom0]\nmemory = 64\n" + crashy).start(("crashy",))
    cfg = tmp_path / "hog.toml"
    cfg.write_text(guest("hog", "idle", memory=32))
    h.xmp("create", str(cfg))  # the pool is now full: crashy's restart cannot fit
    h.wait(lambda: "'crashy' not restarted: createdomain: ENOMEM" in h.dmesg(), 20, "the refused restart")
    assert h.info("hog")["state"] == "running" and h.info("crashy") is None
    assert h.proc.poll() is None
    assert h.stop() == 1  # a crash that was not restarted fails the run
    h.assert_clean()
