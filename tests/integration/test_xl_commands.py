"""xl's everyday commands against a real host: uptime, domid, domname,
rename, sysrq, trigger, list's CPU time, and the one-line refusals of bad
input (nothing changed by them)."""

# ruff: noqa: UP031  (xl's printf formats, kept as printf formats)
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time

import psutil
import pytest
from xmphost import ENV, HOST, XMP, guest

pytestmark = pytest.mark.timeout(90)


def _xs(h, path: str) -> str:
    return h.xmp("xenstore", "read", path).stdout.rstrip("\n")


def test_list_time_is_the_domains_cpu_time(hosts):
    h = hosts(HOST + guest("spin", "busy") + guest("still", "idle")).start(("spin", "still"))
    proc = psutil.Process(h.domain_pid("spin"))
    h.wait(lambda: h.info("spin")["cpu_time"] > 0.5, 20, "the busy guest's CPU time to show")
    before = sum(proc.cpu_times()[:2])
    listed = h.info("spin")["cpu_time"]
    after = sum(proc.cpu_times()[:2])
    assert before - 0.05 <= listed <= after + 0.05
    row = next(ln for ln in h.xmp("list", "spin").stdout.splitlines() if ln.startswith("spin"))
    assert float(row.split()[-1]) >= 0.5
    assert h.info("still")["cpu_time"] < 0.5  # an idle guest uses (almost) none
    assert h.stop() == 0
    h.assert_clean()


def test_uptime_domid_domname(hosts):
    h = hosts(HOST + guest("web", "idle") + guest("db", "idle")).start(("web", "db"))
    out = h.xmp("uptime").stdout.splitlines()
    assert out[0] == "%-33s %4s %s" % ("Name", "ID", "Uptime")
    assert [re.fullmatch(r"(\S+) +(\d+) +\d+:\d\d:\d\d", ln).groups() for ln in out[1:]] == \
        [("Domain-0", "0"), ("web", "1"), ("db", "2")]
    assert re.fullmatch(r"%-33s %4d [ \d]\d:\d\d:\d\d" % ("db", 2), out[3])
    short = h.xmp("uptime", "-s", "db", "web").stdout.splitlines()
    assert [re.fullmatch(r" \d\d:\d\d:\d\d up [ \d]\d:\d\d, (\S+) \((\d+)\)", ln).groups()
            for ln in short] == [("db", "2"), ("web", "1")]
    doms = json.loads(h.xmp("uptime", "--json").stdout)
    assert [d["name"] for d in doms] == ["Domain-0", "web", "db"] and all(d["uptime"] < 60 for d in doms)
    start = _xs(h, f"/vm/{h.info('web')['uuid']}/start_time")  # libxl's node, "%lu.%02d"
    assert re.fullmatch(r"\d+\.\d\d", start) and abs(float(start) - time.time()) < 60
    assert h.xmp("domid", "db").stdout == "2\n"
    assert h.xmp("domname", "1").stdout == "web\n"
    assert h.xmp("domname", "0").stdout == "Domain-0\n"
    for argv, err in ((["domid", "nosuch"], "xmp: domain 'nosuch' does not exist\n"),
                      (["domid", "1"], "xmp: domain '1' does not exist\n"),
                      (["domname", "9"], "xmp: domain '9' does not exist\n"),
                      (["domname", "web"], "xmp: 'web' is not a domain id\n"),
                      (["uptime", "web", "nosuch"], "xmp: domain 'nosuch' does not exist\n")):
        out = h.xmp(*argv, check=False)
        assert (out.returncode, out.stdout, out.stderr) == (1, "", err), argv
    assert h.stop() == 0
    h.assert_clean()


def test_rename_follows_in_xenstore_and_across_a_restart(hosts):
    h = hosts(HOST + guest("old", "idle") + guest("other", "idle")).start(("old", "other"))
    uuid = h.info("old")["uuid"]
    h.xmp("rename", "old", "new")
    assert [d["name"] for d in h.list()] == ["Domain-0", "new", "other"]
    assert _xs(h, "/local/domain/1/name") == "new" and _xs(h, f"/vm/{uuid}/name") == "new"
    assert h.xmp("domid", "new").stdout == "1\n"
    for argv, err in ((["rename", "old", "x"], "xmp: domain 'old' does not exist\n"),
                      (["rename", "new", "other"], "xmp: a domain named 'other' already exists\n"),
                      (["rename", "new", "bad name"],
                       "xmp: domain name 'bad name' is not 1..64 characters of A-Z a-z 0-9 _ . -\n"),
                      (["rename", "new", "Domain-0"],
                       "xmp: domain name 'Domain-0' is dom0's name; configure dom0 in [dom0]\n"),
                      (["rename", "Domain-0", "boss"], "xmp: Domain-0 keeps its name\n")):
        out = h.xmp(*argv, check=False)
        assert (out.returncode, out.stderr) == (1, err), argv
    assert [d["name"] for d in h.list()] == ["Domain-0", "new", "other"]
    assert _xs(h, "/local/domain/1/name") == "new"
    h.xmp("reboot", "new")  # on_reboot = restart: the toolstack rebuilds it from its record
    h.wait(lambda: (h.info("new") or {}).get("domid", 1) > 1, 15, "the restart")
    domid = h.info("new")["domid"]
    assert _xs(h, f"/local/domain/{domid}/name") == "new"
    assert h.info("old") is None
    assert h.stop() == 0
    h.assert_clean()


def test_sysrq_reaches_the_guests_control_driver(hosts):
    h = hosts(HOST + guest("g", "idle") + guest("stay", "idle", on_reboot="destroy")).start(("g", "stay"))
    h.xmp("sysrq", "g", "h")
    h.wait(lambda: "sysrq: HELP : reboot(b) crash(c) poweroff(o) show-task-states(t)" in h.console_log("g"),
           10, "the help line")
    h.wait(lambda: _xs(h, "/local/domain/1/control/sysrq") == "", 10, "the guest to clear the key")
    h.xmp("sysrq", "g", "q")  # a key it has no handler for: the help line again, as Linux
    h.wait(lambda: h.console_log("g").count("sysrq: HELP :") == 2, 10, "a second help line")
    h.xmp("sysrq", "g", "t")
    h.wait(lambda: "sysrq: Show State" in h.console_log("g") and "in domain_main" in h.console_log("g"),
           10, "the task states")
    assert "task:MainThread" in h.console_log("g") and "in idle" in h.console_log("g")
    bad = h.xmp("sysrq", "g", "tb", check=False)
    assert (bad.returncode, bad.stderr) == (1, "xmp: a sysrq is one letter, not 'tb'\n")
    assert h.info("g")["state"] == "running"
    h.xmp("sysrq", "g", "b")  # an immediate reboot: on_reboot (restart) applies
    h.wait(lambda: (h.info("g") or {}).get("domid", 1) > 2, 15, "the reboot")
    assert "sysrq: Resetting" in h.console_log("g")
    h.xmp("sysrq", "stay", "o")
    h.wait(lambda: h.info("stay") is None, 15, "the poweroff")
    assert "dom2 'stay' shut down: poweroff" in h.dmesg()
    missing = h.xmp("sysrq", "gone", "h", check=False)
    assert (missing.returncode, missing.stderr) == (1, "xmp: domain 'gone' does not exist\n")
    dom0 = h.xmp("sysrq", "Domain-0", "h", check=False)
    assert dom0.returncode == 1 and "Domain-0 takes no sysrq" in dom0.stderr
    assert h.stop() == 0
    h.assert_clean()


def test_sysrq_c_crashes_and_on_crash_applies(hosts):
    h = hosts(HOST + guest("c", "idle", on_crash="restart")).start(("c",))
    h.xmp("sysrq", "c", "c")
    h.wait(lambda: (h.info("c") or {}).get("domid", 1) > 1, 15, "the restart after the crash")
    assert "Kernel panic - not syncing: sysrq triggered crash" in h.console_log("c")
    assert "dom1 'c' crashed" in h.dmesg()
    assert h.stop() == 0
    h.assert_clean()


def test_triggers(hosts):
    h = hosts(HOST + guest("hung", "busy", on_crash="coredump-destroy") + guest("r", "busy")
              + guest("p", "idle") + guest("keep", "idle")).start(("hung", "r", "p", "keep"))
    for what, err in (("init", "xmp: init: xmp's vCPUs have no local APIC to send an INIT to\n"),
                      ("sleep", "xmp: sleep: xmp guests have no ACPI S3 sleep state\n"),
                      ("s3resume", "xmp: s3resume: xmp guests have no ACPI S3 sleep state\n"),
                      ("bogus",
                       'xmp: Invalid trigger "bogus" (one of nmi, reset, init, power, sleep, s3resume)\n')):
        out = h.xmp("trigger", "keep", what, check=False)
        assert (out.returncode, out.stderr) == (1, err), what
    assert h.info("keep")["state"] == "running"
    # nmi: a guest that answers nothing (it spins) still panics; on_crash writes its core
    h.xmp("trigger", "hung", "nmi")
    h.wait(lambda: h.info("hung") is None, 15, "the crash")
    assert (h.rundir / "dumps" / "hung-1.core").stat().st_size == 32 << 20
    # reset: at once, as a reboot: on_reboot = restart
    h.xmp("trigger", "r", "reset", "0")
    h.wait(lambda: (h.info("r") or {}).get("domid", 2) > 4, 15, "the reset's restart")
    # power: the power button is an orderly poweroff
    h.xmp("trigger", "p", "power")
    h.wait(lambda: h.info("p") is None, 15, "the poweroff")
    log = h.dmesg()
    assert "dom1 'hung' crashed" in log and "dom3 'p' shut down: poweroff" in log
    assert "dom2 'r' destroyed (reboot: on_reboot = restart)" in log
    vcpu = h.xmp("trigger", "keep", "nmi", "x", check=False)
    assert vcpu.returncode == 2 and "invalid int value: 'x'" in vcpu.stderr
    vcpu = h.xmp("trigger", "keep", "nmi", "1", check=False)
    assert (vcpu.returncode, vcpu.stderr) == (1, "xmp: keep has no vCPU 1\n")
    assert h.info("keep")["state"] == "running"
    assert h.stop() == 1  # the nmi was a crash whose policy was not a restart
    h.assert_clean()


def test_a_second_run_on_the_same_rundir_is_refused_and_changes_nothing(hosts):
    h = hosts(HOST + guest("a", "idle")).start(("a",))
    hvlog = (h.rundir / "logs" / "hypervisor.log").read_text()
    second = subprocess.run([*XMP, "run", "--rundir", str(h.rundir), str(h.topology)], capture_output=True,
                            text=True, timeout=30, check=False, env=ENV)
    assert (second.returncode, second.stdout) == (1, "")
    assert second.stderr == (f"xmp: a supervisor (pid {h.pid}) already runs in {h.rundir}: stop it with "
                             f"`xmp destroy Domain-0 --rundir {h.rundir}`, or use another --rundir\n")
    detached = subprocess.run([*XMP, "run", "--detach", "--rundir", str(h.rundir), str(h.topology)],
                              capture_output=True, text=True, timeout=30, check=False, env=ENV)
    assert (detached.returncode, detached.stdout, detached.stderr) == (1, "", second.stderr)
    # the first still serves: its sockets, its xenstore, its log untouched
    assert (h.rundir / "xenstored.sock").exists() and (h.rundir / "control.sock").exists()
    assert _xs(h, "/local/domain/1/name") == "a"
    assert (h.rundir / "logs" / "hypervisor.log").read_text().startswith(hvlog)
    assert "created dom" not in (h.rundir / "logs" / "hypervisor.log").read_text()[len(hvlog):]
    # no guest holds the lock's descriptor (it could unlock it)
    fds = f"/proc/{h.domain_pid('a')}/fd"
    guest_fds = [os.readlink(f"{fds}/{fd}") for fd in os.listdir(fds)]
    assert not [f for f in guest_fds if f.endswith("xmp.pid")]
    assert h.stop() == 0
    h.assert_clean()
    assert not (h.rundir / "xmp.pid").exists()


def test_bad_control_requests_are_answered_and_change_nothing(hosts):
    from xmp.cli import CliError, request

    h = hosts(HOST + guest("a", "idle")).start(("a",))
    for fields, message in (({"cmd": "rename", "dom": "a", "name": 5}, "name is a string"),
                            ({"cmd": "rename", "dom": "a"}, "name is a string"),
                            ({"cmd": "sysrq", "dom": "a", "key": ["b"]}, "key is a string"),
                            ({"cmd": "sysrq", "dom": "a", "key": "\n"}, "a sysrq is one letter"),
                            ({"cmd": "trigger", "dom": "a", "trigger": "nmi", "vcpu": True},
                             "has no vCPU True"),
                            ({"cmd": "trigger", "dom": "a", "trigger": "nmi", "vcpu": -1}, "has no vCPU -1"),
                            ({"cmd": "trigger", "dom": "a"}, "trigger is a string"),
                            ({"cmd": "uptime", "dom": ["x"]}, None)):
        try:
            reply = request(h.rundir, **fields)
        except CliError as exc:
            assert message is not None and message in str(exc), (fields, exc)
        else:
            assert message is None and [d["name"] for d in reply["domains"]] == ["Domain-0", "a"]
    assert [(d["name"], d["state"]) for d in h.list()] == [("Domain-0", "running"), ("a", "running")]
    assert _xs(h, "/local/domain/1/control/sysrq") == ""
    assert h.stop() == 0
    h.assert_clean()


def test_a_supervisor_killed_leaves_a_lock_the_next_one_takes(hosts):
    h = hosts(HOST + guest("a", "idle")).start(("a",))
    h.stop(signal.SIGKILL)
    h.assert_clean(sockets=False)
    assert (h.rundir / "xmp.pid").read_text() == f"{h.pid}\n"
    h.start(("a",))
    assert (h.rundir / "xmp.pid").read_text() == f"{h.pid}\n"
    assert h.stop() == 0
    h.assert_clean()


def test_sigint_while_the_host_is_being_made_is_a_clean_stop(hosts):
    h = hosts(HOST + guest("a", "idle") + guest("b", "idle"))
    h.proc = subprocess.Popen([*XMP, "run", "--rundir", str(h.rundir), str(h.topology)],
                              stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, env=ENV)
    assert h.proc.stdout is not None
    first = h.proc.stdout.readline()  # printed once the supervisor exists, before dom0 is built
    assert "xmp: supervisor" in first, first
    h.descendants()
    h.proc.send_signal(signal.SIGINT)
    rest = h.proc.stdout.read()
    assert h.proc.wait(30) == 0, rest
    assert rest.splitlines()[-1] == "xmp: stopped (signal SIGINT), exit status 0"
    h.proc.stdout.close()
    h.assert_clean()


DOMAIN_COMMANDS = [["destroy"], ["pause"], ["unpause"], ["shutdown"], ["reboot"], ["suspend"], ["resume"],
                   ["console"], ["list"], ["uptime"], ["domid"], ["rename", "{}", "newname"],
                   ["sysrq", "{}", "h"], ["trigger", "{}", "nmi"], ["block-list"],
                   ["block-detach", "{}", "xvda"],
                   ["block-attach", "{}", "format=raw, vdev=xvdb, target=x.img, size=1M"]]


def test_an_unknown_domain_is_one_line_for_every_command(hosts):
    h = hosts(HOST + guest("a", "idle")).start(("a",))
    before = h.list()
    for argv in DOMAIN_COMMANDS:
        argv = [a.format("nosuch") for a in argv] if len(argv) > 1 else [argv[0], "nosuch"]
        out = h.xmp(*argv, check=False)
        assert (out.returncode, out.stdout, out.stderr) == \
            (1, "", "xmp: domain 'nosuch' does not exist\n"), argv
    after = h.list()
    assert [(d["domid"], d["name"], d["state"]) for d in after] == \
        [(d["domid"], d["name"], d["state"]) for d in before]
    assert h.stop() == 0
    h.assert_clean()


@pytest.mark.parametrize("argv", [["list"], ["uptime"], ["rename", "a", "b"], ["sysrq", "a", "h"],
                                  ["trigger", "a", "power"], ["domid", "a"], ["dmesg"]])
def test_no_supervisor_says_how_to_start_one(tmp_path, argv):
    rundir = tmp_path / "none"
    out = subprocess.run([*XMP, *argv, "--rundir", str(rundir)], capture_output=True, text=True, timeout=30,
                         check=False, env=ENV)
    assert (out.returncode, out.stdout) == (1, "")
    assert out.stderr == (f"xmp: no supervisor runs in {rundir} (start one with "
                          f"`xmp run TOPOLOGY --rundir {rundir}`)\n")
    assert not rundir.exists()


def test_cleanup_removes_a_dead_supervisors_sockets_and_keeps_a_live_ones(hosts):
    h = hosts(HOST + guest("a", "idle")).start(("a",))
    kept = h.xmp("cleanup").stdout
    assert f"kept the sockets of {h.rundir}: a supervisor (pid {h.pid}) already runs in {h.rundir}" in kept
    assert (h.rundir / "control.sock").exists() and h.info("a") is not None
    h.stop(signal.SIGKILL)
    h.assert_clean(sockets=False)
    assert (h.rundir / "control.sock").exists()  # a SIGKILL leaves them
    out = h.xmp("cleanup").stdout
    assert f"removed {h.rundir / 'control.sock'}" in out
    h.assert_clean()
    assert not (h.rundir / "xmp.pid").exists()


def test_dump_core_and_vm_list(hosts, tmp_path):
    h = hosts(HOST + guest("d", "idle")).start(("d",))
    core = tmp_path / "d.core"
    h.xmp("dump-core", "d", str(core))
    data = core.read_bytes()
    assert len(data) == 32 << 20 and b"xmp-1.0-x86_64" in data[:64]  # start_info leads the image
    assert h.info("d")["state"] == "running"  # xl dump-core leaves it running
    bad = h.xmp("dump-core", "d", str(tmp_path / "no" / "such" / "dir" / "x.core"), check=False)
    assert bad.returncode == 1 and bad.stderr.startswith(f"xmp: cannot write {tmp_path / 'no'}")
    out = h.xmp("vm-list").stdout
    doms = h.list()
    assert out == "UUID                                  ID    name\n" + "".join(
        "%s  %d    %-30s\n" % (d["uuid"], d["domid"], d["name"]) for d in doms)
    assert json.loads(h.xmp("vm-list", "--json").stdout) == [
        {"uuid": d["uuid"], "domid": d["domid"], "name": d["name"]} for d in doms]
    assert h.stop() == 0
    h.assert_clean()


def test_shutdown_all_waits_for_every_guest(hosts):
    h = hosts(HOST + guest("a", "idle") + guest("b", "idle", on_reboot="destroy") + guest("c", "idle"))
    h.start(("a", "b", "c"))
    for argv in (["shutdown"], ["shutdown", "-a", "a"]):
        out = h.xmp(*argv, check=False)
        assert (out.returncode, out.stderr) == (2, "xmp: name one domain, or give -a for every guest\n")
    h.xmp("reboot", "-a", "-w")  # a and c restart (on_reboot = restart); b's policy destroys it
    names = {d["name"]: d["domid"] for d in h.list()}
    assert "b" not in names and names["a"] > 3 and names["c"] > 3
    h.xmp("shutdown", "-a", "-w")
    assert h.wait_exit(20) == 0  # every guest gone: the supervisor stops
    h.assert_clean()


def test_info_is_xl_info_with_the_supervisors_pool(hosts):
    h = hosts(HOST + guest("a", "idle", memory=32)).start(("a",))
    lines = h.xmp("info").stdout.splitlines()
    keys = [ln.split(":", 1)[0].rstrip() for ln in lines]
    assert keys[:4] == ["host", "release", "version", "machine"] and "xend_config_format" in keys
    assert all(re.fullmatch(r"[a-z_0-9]{1,22} +:( .*)?", ln) and ln.index(":") == 23 for ln in lines), lines
    assert "total_memory           : 1024" in lines  # [host] memory: the pool
    assert "free_memory            : 928" in lines  # less dom0's 64 and a's 32
    assert "xen_version            : 4.19-xmp" in lines
    assert next(ln for ln in lines if ln.startswith("xen_commandline")).endswith(f"run --rundir {h.rundir} "
                                                                                  f"{h.topology}")
    assert f"xmp_supervisor         : {h.rundir}: 2 domains of " in "\n".join(lines)
    assert h.xmp("info", "free_memory").stdout == "928\n"
    facts = json.loads(h.xmp("info", "--json").stdout)
    assert facts["total_memory"] == 1024 and facts["xen_pagesize"] == 4096
    assert facts["nr_cpus"] == os.cpu_count()
    assert isinstance(facts["xmp_isolation"], list)
    assert h.stop() == 0
    h.assert_clean()
