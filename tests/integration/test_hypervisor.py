"""The supervisor end to end: real domain processes driven through ``xmp``."""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
from xmphost import HOST, XMP, guest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(120)


def test_hello_example_runs_to_completion(tmp_path):
    rundir = tmp_path / "run"
    out = subprocess.run([*XMP, "run", "--rundir", str(rundir), str(ROOT / "examples" / "hello.toml")],
                         capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "hello | Hello from hello (dom1, a PVH guest on Xen 4.19-xmp)" in out.stdout
    assert "hello | bye" in out.stdout
    assert [ln for ln in out.stdout.splitlines() if ln.startswith("counter | count ")] == \
        [f"counter | count {i}" for i in range(1, 6)]
    assert "stopped (every guest has gone), exit status 0" in out.stdout
    assert "counted to 5" in (rundir / "console" / "counter.log").read_text()
    assert not list(rundir.glob("**/*.sock"))


def test_list_shows_xl_columns(hosts):
    h = hosts(HOST + guest("web", "idle", memory=48, vcpus=2)).start(("web",))
    def listing_with_web_blocked():
        # An idle guest is blocked nearly always; on a loaded machine one
        # sample may catch it running its timer, so look again.
        lines = h.xmp("list").stdout.splitlines()
        row = next((ln for ln in lines if ln.startswith("web")), "")
        return lines if "-b----" in row else None
    out = h.wait(listing_with_web_blocked, 10, "an idle guest listed blocked")
    # xl_info.c: "Name" + 40 spaces + "ID   Mem VCPUs\tState\tTime(s)";
    # rows "%-40s %5d %5lu %5d     %c%c%c%c%c%c  %8.1f"
    assert out[0] == "Name" + " " * 40 + "ID   Mem VCPUs\tState\tTime(s)"
    doms = {d["name"]: d for d in h.list()}
    row = next(ln for ln in out if ln.startswith("web"))
    assert row == "%-40s %5d %5d %5d     %s  %8.1f" % (  # noqa: UP031  (xl's printf)
        "web", 1, 48, 2, "-b----", float(row.split()[-1]))
    assert float(row.split()[-1]) == pytest.approx(doms["web"]["cpu_time"], abs=0.2)
    dom0 = next(ln for ln in out if ln.startswith("Domain-0"))
    assert dom0 == "%-40s %5d %5d %5d     %s  %8.1f" % (  # noqa: UP031  (xl's printf)
        "Domain-0", 0, 64, 1, "r-----", float(dom0.split()[-1]))
    info = h.info("web")
    assert info["mem_kb"] == 48 * 1024 and info["vcpus"] == 2 and info["state"] == "running"
    assert h.stop() == 0
    h.assert_clean()


def test_pause_really_stops_the_process(hosts):
    h = hosts(HOST + guest("spin", "busy")).start(("spin",))
    pid = h.domain_pid("spin")
    proc = psutil.Process(pid)
    h.wait(lambda: sum(proc.cpu_times()[:2]) > 0.2, 10, "the busy guest to burn CPU")
    h.xmp("pause", "spin")
    assert h.info("spin")["state_letters"] == "--p---"
    assert proc.status() == psutil.STATUS_STOPPED
    before = sum(proc.cpu_times()[:2])
    time.sleep(0.6)
    assert sum(proc.cpu_times()[:2]) - before < 0.02
    h.xmp("unpause", "spin")
    h.wait(lambda: sum(proc.cpu_times()[:2]) - before > 0.1, 10, "CPU use after unpause")
    assert h.info("spin")["state"] == "running"
    assert h.stop() == 0
    h.assert_clean()


def test_create_and_destroy_from_the_cli(hosts, tmp_path):
    h = hosts(HOST + guest("first", "idle")).start(("first",))
    cfg = tmp_path / "extra.toml"
    cfg.write_text(guest("extra", "counter", args={"count": 0, "interval": 0.05}))
    out = h.xmp("create", str(cfg)).stdout
    assert "created domain 'extra' (id 2)" in out
    h.wait(lambda: "count 3" in h.console_log("extra"), 10, "the new guest's console")
    pid = h.domain_pid("extra")
    dup = h.xmp("create", str(cfg), check=False)
    assert dup.returncode == 1 and "a domain named 'extra' already exists" in dup.stderr
    h.xmp("destroy", "extra")
    assert h.info("extra") is None
    h.wait(lambda: not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE,
           5, "the destroyed process to go")
    assert "dom2 'extra' destroyed" in h.dmesg()
    missing = h.xmp("destroy", "nosuch", check=False)
    assert (missing.returncode, missing.stderr) == (1, "xmp: domain 'nosuch' does not exist\n")
    assert h.stop() == 0
    h.assert_clean()


def test_domain_that_does_not_fit_is_refused(hosts, tmp_path):
    h = hosts("[host]\nmemory = 200\n[dom0]\nmemory = 64\n" + guest("a", "idle", memory=100)).start(("a",))
    cfg = tmp_path / "big.toml"
    cfg.write_text(guest("big", "idle", memory=64))
    out = h.xmp("create", str(cfg), check=False)
    assert out.returncode == 1 and "does not fit" in out.stderr
    assert h.info("big") is None
    assert h.stop() == 0


def test_crash_with_on_crash_restart_gets_a_new_domid(hosts):
    h = hosts(HOST + guest("crashy", "crasher", on_crash="restart", args={"after": 0.3})).start()
    h.wait(lambda: h.info("crashy") and h.info("crashy")["domid"] >= 2, 15, "a restart")
    log = h.console_log("crashy")
    assert "GuestPanic: crasher: deliberate crash" in log and "Traceback" in log
    assert "dom1 'crashy' crashed" in h.dmesg()
    assert h.stop() == 0
    h.assert_clean()


def test_restart_loop_is_stopped(hosts):
    h = hosts(HOST + guest("loop", "crasher", on_crash="restart"))
    h.start()
    assert h.wait_exit(60) == 1
    assert "restarted 10 times" in (h.rundir / "logs" / "hypervisor.log").read_text()
    h.assert_clean()


def test_crash_with_destroy_fails_the_run(hosts):
    h = hosts(HOST + guest("crashy", "crasher"))
    h.start()
    assert h.wait_exit(30) == 1
    assert "crasher: deliberate crash" in h.console_log("crashy")
    assert "crashy | crasher: crashing in 0.0 s" in h.output()
    h.assert_clean()


def test_coredump_and_preserve(hosts):
    h = hosts(HOST + guest("dumped", "crasher", on_crash="coredump-destroy")
              + guest("kept", "hello", on_poweroff="preserve", args={"times": 1})
              + guest("idle", "idle"))
    h.start(("idle",))
    dump = h.rundir / "dumps" / "dumped-1.core"
    h.wait(dump.exists, 15, "the core dump")
    h.wait(lambda: h.info("dumped") is None, 5, "the crashed domain to go")
    assert dump.stat().st_size == 32 << 20
    assert b"xmp-1.0-x86_64" in dump.read_bytes()[:64]  # start_info leads the image
    h.wait(lambda: (h.info("kept") or {}).get("state") == "shutdown", 15, "the preserved domain")
    assert h.info("kept")["state_letters"] == "---s--"
    h.xmp("destroy", "kept")
    assert h.stop() == 1  # a crash whose policy was not restart fails the run
    h.assert_clean()


def test_kill9_of_a_guest_is_a_crash_and_everything_is_reclaimed(hosts):
    h = hosts(HOST + guest("victim", "idle") + guest("bystander", "counter",
                                                     args={"count": 0, "interval": 0.05}))
    h.start(("victim", "bystander"))
    pid = h.domain_pid("victim")
    os.kill(pid, signal.SIGKILL)
    t0 = time.monotonic()
    h.wait(lambda: h.info("victim") is None, 5, "the crash to be handled")
    assert time.monotonic() - t0 < 1.5
    assert "dom1 'victim' crashed" in h.dmesg()
    n = h.console_log("bystander").count("count ")
    h.wait(lambda: h.console_log("bystander").count("count ") > n + 3, 10, "the bystander to go on")
    assert h.stop() == 1  # the crash (on_crash = destroy) fails the run
    h.assert_clean()


def test_kill9_of_dom0_takes_the_host_down(hosts):
    h = hosts(HOST + guest("g", "idle")).start(("g",))
    os.kill(h.domain_pid("Domain-0"), signal.SIGKILL)
    assert h.wait_exit(10) == 1
    assert "dom0 crashed" in h.output()
    h.assert_clean()


def test_kill9_of_the_supervisor_leaves_nothing_running(hosts):
    h = hosts(HOST + guest("a", "idle") + guest("b", "counter", args={"count": 0})).start(("a", "b"))
    domains = h.descendants()
    assert len(domains) >= 4  # zygote, dom0, a, b
    h.proc.kill()
    h.proc.wait(5)
    gone = psutil.wait_procs(domains, timeout=2)[1]
    assert not gone, f"still running 2 s after the supervisor died: {gone}"
    shm = [n for n in os.listdir("/dev/shm") if n.startswith(f"xmp.{h.pid}.")]
    assert not shm
    # The next supervisor in the same run directory clears what could not be removed.
    assert (h.rundir / "control.sock").exists()  # a file the killed supervisor could not remove
    h2 = hosts(HOST + guest("c", "idle"), name=h.dir.name)
    h2.start(("c",))
    assert h2.stop() == 0
    h2.assert_clean()


def test_a_guest_cannot_escape(hosts):
    h = hosts(HOST + guest("probe", "probe") + guest("victim", "idle")).start(("probe", "victim"))
    h.wait(lambda: "probe: done" in h.console_log("probe"), 15, "the probe")
    results = {}
    for line in h.console_log("probe").splitlines():
        if line.startswith("probe: {"):
            r = json.loads(line[len("probe: "):])
            results[r["test"]] = r
    for op in ("getdomaininfo", "createdomain", "destroydomain", "map_grant", "alloc_in_dom0"):
        assert results[op]["errno"] == 1, results[op]  # EPERM
    assert results["malformed"]["errno"] == 22 and "must be an integer" in results["malformed"]["error"]
    assert results["unknown_op"]["errno"] == 38
    assert results["bind_not_offered"]["errno"] == 22
    assert "not offered to dom1" in results["bind_not_offered"]["error"]
    siblings = [r for name, r in results.items() if name.startswith("sibling_mem_")]
    if os.geteuid() == 0:  # jailed (test_jail.py): no /dev/shm; a /proc of the probe alone
        assert results["shm_openable"]["errno"] == errno.ENOENT
        assert results["proc_visible"]["value"] == [1] and not siblings
    else:  # the host's tree: nothing of xmp opens, no sibling's memory reads
        assert results["shm_openable"] == {"test": "shm_openable", "ok": True, "value": []}
        # (a sibling gone under the probe is ok: null, proving nothing either way)
        assert sum(r["ok"] is False for r in siblings) >= 3 and not any(r["ok"] for r in siblings)
    # and the hypervisor still serves everyone
    assert {d["name"] for d in h.list()} >= {"Domain-0", "probe", "victim"}
    assert "internal error" not in h.dmesg()
    assert h.stop() == 0
    h.assert_clean()


def test_proc_of_a_guest_shows_only_its_own_memory(hosts):
    h = hosts(HOST + guest("a", "idle") + guest("b", "idle")).start(("a", "b"))
    for name, domid in (("a", 1), ("b", 2)):
        pid = h.domain_pid(name)
        maps = Path(f"/proc/{pid}/maps").read_text()
        objects = set(re.findall(r"/dev/shm/xmp\.\d+\.[0-9a-f]+\.([a-z]+\d+)\.", maps))
        fds = {os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
        objects |= {m.group(1) for f in fds if (m := re.search(r"xmp\.\d+\.[0-9a-f]+\.([a-z]+\d+)\.", f))}
        # its own RAM and event object; never another domain's RAM or event
        # object (its peers' doorbells, db<n>-<m>, are not matched here)
        assert {o for o in objects if o.startswith("ram")} == {f"ram{domid}"}, objects
        assert objects == {f"ram{domid}", f"evt{domid}"}, objects
        status = Path(f"/proc/{pid}/status").read_text()
        assert re.search(r"CapEff:\s+0+\n", status), "a guest keeps no capability"
    assert h.stop() == 0
    h.assert_clean()


def test_console_attach_sends_input_and_shows_output(hosts):
    h = hosts(HOST + guest("echo", "echo")).start(("echo",))
    h.wait(lambda: "echo: ready" in h.console_log("echo"), 10, "the echo guest")
    out = h.xmp("console", "echo", input="hello there\nquit\n", timeout=30)
    assert "echo: hello there" in out.stdout and "echo: bye" in out.stdout
    assert h.wait_exit(10) == 0  # its only guest powered off
    h.assert_clean()


def test_commands_without_a_supervisor_say_so(tmp_path):
    out = subprocess.run([*XMP, "list", "--rundir", str(tmp_path / "none")], capture_output=True,
                         text=True, timeout=30, check=False)
    assert out.returncode == 1
    assert f"no supervisor runs in {tmp_path / 'none'}" in out.stderr


@pytest.mark.parametrize(("text", "message"), [
    ('[[domain]]\nname = "a"\nkernel = "xmp.guests.idle:main"\nmemroy = 5\n', ":4: ", ),
    ('[[domain]]\nname = "a"\nkernel = "xmp.guests.nosuch:main"\n', "not found"),
    ("[host]\nmemory = 100\n[[domain]]\nname = \"a\"\nkernel = \"xmp.guests.idle:main\"\nmemory = 4096\n",
     "does not fit"),
    ("[[domain]\n", "topology.toml:1"),
])
def test_bad_topology_starts_nothing(tmp_path, text, message):
    topo = tmp_path / "topology.toml"
    topo.write_text(text)
    rundir = tmp_path / "run"
    out = subprocess.run([*XMP, "run", "--rundir", str(rundir), str(topo)], capture_output=True,
                         text=True, timeout=30, check=False)
    assert out.returncode == 1 and message in out.stderr, out.stderr
    assert out.stderr.count("\n") == 1  # one clear error
    assert not rundir.exists()


def test_parallel_supervisors_do_not_meet(hosts):
    made = [hosts(HOST + guest("same-name", "counter", args={"count": 0, "interval": 0.05}), f"h{i}")
            for i in range(3)]
    for h in made:
        h.start(("same-name",))
    for h in made:
        h.wait(lambda h=h: "count 5" in h.console_log("same-name"), 15, "each host's guest")
        assert [d["name"] for d in h.list()] == ["Domain-0", "same-name"]
    for h in made:
        assert h.stop() == 0
        h.assert_clean()


def test_detach_and_stop_by_destroying_dom0(tmp_path):
    topo = tmp_path / "t.toml"
    topo.write_text(HOST + guest("bg", "idle"))
    rundir = tmp_path / "run"
    def ours():
        return [p for p in psutil.process_iter(["cmdline"])
                if "--detach" in (p.info["cmdline"] or []) and str(rundir) in p.info["cmdline"]]

    try:
        out = subprocess.run([*XMP, "run", "--detach", "--rundir", str(rundir), str(topo)],
                             capture_output=True, text=True, timeout=30, check=False)
    except BaseException:
        for p in ours():
            p.kill()
        raise
    found = ours()
    assert out.returncode == 0, out.stderr
    pid = int(re.search(r"supervisor (\d+) running", out.stdout).group(1))
    assert [p.pid for p in found] == [pid]
    try:
        listed = subprocess.run([*XMP, "list", "--json", "--rundir", str(rundir)], capture_output=True,
                                text=True, timeout=30, check=True)
        assert [d["name"] for d in json.loads(listed.stdout)] == ["Domain-0", "bg"]
        procs = psutil.Process(pid).children(recursive=True)
        subprocess.run([*XMP, "destroy", "Domain-0", "--rundir", str(rundir)], timeout=30, check=True)
        deadline = time.monotonic() + 10
        while psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
            assert time.monotonic() < deadline, "the detached supervisor did not stop"
            time.sleep(0.05)
        assert not psutil.wait_procs(procs, timeout=3)[1]
        assert not [n for n in os.listdir("/dev/shm") if n.startswith(f"xmp.{pid}.")]
        assert not list(rundir.glob("**/*.sock"))
    finally:
        if psutil.pid_exists(pid):
            os.kill(pid, signal.SIGKILL)


def test_sigint_destroys_every_domain_and_exits_zero(hosts):
    h = hosts(HOST + guest("a", "idle")).start(("a",))
    assert h.stop(signal.SIGINT) == 0
    assert "stopping: signal SIGINT" in (h.rundir / "logs" / "hypervisor.log").read_text()
    h.assert_clean()



def _report(h, name: str, tag: str) -> dict:
    line = h.wait(lambda: next((ln for ln in h.console_log(name).splitlines() if ln.startswith(tag)), None),
                  20, f"{name}'s report")
    return json.loads(line[len(tag):])


def _held_objects(pid: int) -> set[str]:
    """The supervisor's objects (``ram3``, ``evt0`` ...) a process maps or holds a descriptor of."""
    shm = re.compile(r"xmp\.\d+\.[0-9a-f]+\.([a-z]+\d+)\.")
    held = set(shm.findall(Path(f"/proc/{pid}/maps").read_text()))
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if m := shm.search(os.readlink(f"/proc/{pid}/fd/{fd}")):
                held.add(m.group(1))
        except FileNotFoundError:
            pass
    return held


@pytest.mark.timeout(60)
def test_dom0_maps_a_read_only_grant_through_a_read_only_descriptor(hosts):
    h = hosts(HOST.replace("[dom0]\n", '[dom0]\nkernel = "kernels:dom0mapper"\nargs = { granter = 1 }\n')
              + '[[domain]]\nname = "granter"\nkernel = "kernels:granter"\nmemory = 32\nargs = { to = 0 }\n')
    h.start(("granter",))
    r = _report(h, "Domain-0", "dom0mapper: ")
    assert r["ro_read"] == "read-only-page!!" and r["rw_read"] == "granted-page-123"
    # the read-only map is PROT_READ and came through an O_RDONLY descriptor (the
    # descriptor and mmap's own duplicate of it): neither mprotect nor a new mmap
    # can make a writable view of the granter's RAM from it
    assert r["ro_write"] == "TypeError"
    assert r["ro_mprotect_writable"] == "EACCES"
    assert r["fds_for_ro"] == ["O_RDONLY", "O_RDONLY"]
    assert r["fds_for_ro_mapped_writable"] == ["EACCES", "EACCES"]
    # the granter saw dom0's answer in its writable page while it was mapped (the
    # in-use bits GTF_permit_access | GTF_reading | GTF_writing), its read-only page
    # unchanged; once dom0 unmapped, the in-use bits were clear and access could end
    h.wait(lambda: "granter: ended" in h.console_log("granter"), 10, "the grant's release")
    log = h.console_log("granter")
    assert "flags=0x19 reply=b'dom0-was-here!!!'" in log
    ro_pages = set(re.findall(r" ro=(b'[^']*')", log))
    assert ro_pages == {repr(b"read-only-page!!" + bytes(16))}, ro_pages
    assert "flags=0x1 reply=b'dom0-was-here!!!'" in log
    assert h.stop() == 0
    h.assert_clean()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("trusted", [True, False], ids=["trusted_backend", "untrusted"])
def test_a_driver_domain_reaches_only_what_was_granted_and_never_the_ram(hosts, trusted):
    """trusted_backend or not, a driver domain may not map (only dom0 holds a
    guest's RAM descriptor): grant copy reads and writes what the grants
    allow and nothing else, and the domain holds no object of the guest's."""
    h = hosts(HOST
              + '[[domain]]\nname = "granter"\nkernel = "kernels:granter"\nmemory = 32\n'
              + 'args = { to = 2, end = false }\n'
              + '[[domain]]\nname = "dd"\nkernel = "kernels:ddmapper"\nmemory = 32\ndriver_domain = true\n'
              + ("trusted_backend = true\n" if trusted else "") + "args = { granter = 1 }\n")
    h.start(("granter", "dd"))
    r = _report(h, "dd", "ddmapper: ")
    denied = -8  # GNTST_permission_denied
    assert r == {"read": "granted-page-123", "map": "EPERM", "reply": 0,
                 "ro_read": 0, "ro_read_bytes": "read-only-page!!", "ro_write": denied,
                 "ungranted_ref": denied, "frames": [denied] * 3}
    held = _held_objects(h.domain_pid("dd"))
    assert "ram1" not in held and {o for o in held if o.startswith("ram")} == {"ram2"}, held
    h.wait(lambda: "reply=b'copier-was-here!'" in h.console_log("granter"), 10, "the copied reply")
    log = h.console_log("granter")
    assert set(re.findall(r" ro=(b'[^']*')", log)) == {repr(b"read-only-page!!" + bytes(16))}
    assert set(re.findall(r" secret=(b'[^']*')", log)) == {repr(b"never-granted!!!" + bytes(16))}
    assert h.stop() == 0
    h.assert_clean()


def test_console_output_is_never_lost(hosts):
    h = hosts(HOST + '[[domain]]\nname = "flood"\nkernel = "kernels:flood"\nmemory = 32\n'
              + "args = { n = 30000 }\n").start()
    assert h.wait_exit(60) == 0
    lines = h.console_log("flood").splitlines()
    assert lines[:-1] == [f"line {i:06d} " + "x" * 40 for i in range(30000)]
    assert lines[-1] == "flood: done"
    h.assert_clean()


def test_memory_op_balloons_really_and_grant_table_size(hosts):
    h = hosts(HOST + '[[domain]]\nname = "m"\nkernel = "kernels:memops"\nmemory = 32\n').start(("m",))
    h.wait(lambda: "memops: {" in h.console_log("m"), 15, "the report")
    line = next(ln for ln in h.console_log("m").splitlines() if ln.startswith("memops: {"))
    r = json.loads(line[len("memops: "):])
    pages = 32 * 256
    assert r["max"] == pages and r["before"] == pages
    assert r["released"] == 256 and r["after_release"] == pages - 256
    assert r["punched_reads_zero"]  # the pages were punched out of the object, not just counted
    assert r["special_released"] == 0
    assert r["populated"] == 256 and r["after_populate"] == pages
    assert r["double_populate"] == 22  # EINVAL
    assert r["grant_frames"] == {"nr_frames": 1, "max_nr_frames": 64}
    assert r["setup_table"] == [3, 4]
    # GNTTABOP_copy: good segments copied in order, each bad one its own status, nothing else
    ok, bad_arg = 0, -10
    assert r["copy"] == {"frame_to_frame": ok, "frame_to_own_grant": ok, "not_a_dict": bad_arg,
                         "len_too_long": bad_arg, "len_negative": bad_arg, "len_bool": bad_arg,
                         "crosses_page": bad_arg, "offset_4096": bad_arg, "ref_string": bad_arg,
                         "ref_huge": bad_arg, "frame_outside": bad_arg,
                         "dom0_frame": -8,            # GNTST_permission_denied: not its memory
                         "no_such_domain": -2,        # GNTST_bad_domain
                         "dom0_ungranted_ref": -8,    # GNTST_permission_denied: not granted to it
                         "dom0_ref_beyond_table": -3}  # GNTST_bad_gntref: past max_grant_frames
    assert r["copy_data"] == ["copied by xen ok", "copied by xen ok"]
    assert r["copy_513"] == 22  # EINVAL
    # the record form: statuses written into the records, the bytes where they were sent
    assert r["records"][:3] == [ok, ok, -8] and r["records"][3] < 0 and r["records"][4] == -2
    assert r["records_data"] == ["copied by xen ok", "copied by xen ok"]
    assert (r["records_513"], r["records_0"], r["records_outside"]) == (22, 22, 14)  # EINVAL, EFAULT
    assert h.info("m")["mem_kb"] == 32 * 1024
    assert h.stop() == 0


BURST = 100 if os.environ.get("XMP_STRESS_FULL") == "1" else 30  # the full size saturates 2 CPUs


@pytest.mark.timeout(180)
@pytest.mark.stress
@pytest.mark.xdist_group("heavy")  # never beside another heavy test
def test_a_burst_of_creates_never_stalls_the_supervisor(hosts):
    """Creates back to back: the toolstack's xenstore traffic (a tree and an
    INTRODUCE each) must never block the loop xenstored's hypercalls need.
    100 of them deadlocked before the toolstack wrote without blocking (run
    that size with XMP_STRESS_FULL=1; CI runs a bounded slice)."""
    import socket as so

    from xmp.topology import parse_domain

    h = hosts("[host]\nmemory = 2048\n[dom0]\nmemory = 64\n" + guest("keeper", "idle")).start(("keeper",))
    sock = so.socket(so.AF_UNIX, so.SOCK_STREAM)
    sock.connect(str(h.rundir / "control.sock"))
    f = sock.makefile("rwb")
    for i in range(BURST):
        cfg = parse_domain(f'[[domain]]\nname = "g{i}"\nkernel = "xmp.guests.idle:main"\nmemory = 8\n')
        f.write((json.dumps({"cmd": "create", "config": cfg.to_dict()}) + "\n").encode())
    f.flush()
    replies = [json.loads(f.readline()) for _ in range(BURST)]
    sock.close()
    assert all(r["ok"] for r in replies), [r for r in replies if not r["ok"]][:3]
    h.wait(lambda: len([d for d in h.list() if d["name"].startswith("g")]) == BURST, 60, "the guests")
    h.wait(lambda: h.xmp("xenstore", "read", f"/local/domain/{BURST + 1}/control/feature-poweroff",
                         check=False).stdout.strip() == "1", 60, "the last guest's control driver")
    assert h.stop() == 0
    h.assert_clean(timeout=20)
