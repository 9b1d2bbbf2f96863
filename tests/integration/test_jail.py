"""Guests are jailed (xmp/hv/jail.py): each escape a guest tries is refused
and its victims are unharmed; the zygote never runs a stale guest module."""

from __future__ import annotations

import errno
import hashlib
import json
import os
from pathlib import Path

import psutil
import pytest
import xmphost
from xmphost import HOST, guest

pytestmark = pytest.mark.timeout(90)
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="guests are jailed only when xmp runs as root")
REFUSED = {errno.EPERM, errno.EACCES, errno.ENOENT, errno.ESRCH, errno.EROFS}


def _probe_results(h, name: str) -> dict[str, dict]:
    h.wait(lambda: "probe: done" in h.console_log(name), 20, f"the probe {name}")
    out = {}
    for line in h.console_log(name).splitlines():
        if line.startswith("probe: {"):
            r = json.loads(line[len("probe: "):])
            out[r["test"]] = r
    return out


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _uid_base() -> int:
    # A range of its own per test process, away from the default range, so
    # parallel tests never contend for these uids.
    return 300000 + (os.getpid() % 20000) * 4


@as_root
def test_a_jailed_guest_cannot_kill_signal_or_write_what_is_not_its_own(hosts, tmp_path):
    h = hosts(HOST + guest("victim", "idle", disk=["format=raw, vdev=xvda, access=rw, target=victim.img, "
                                                   "size=1M"]) + guest("bystander", "idle"))
    h.start(("victim", "bystander"))
    victim, bystander = h.domain_pid("victim"), h.domain_pid("bystander")
    image = h.dir / "victim.img"
    h.wait(image.exists, 10, "the victim's image")
    host_file = tmp_path / "host-file.txt"
    host_file.write_bytes(b"the host's own bytes\n")
    os.chmod(host_file, 0o644)
    assert host_file.stat().st_uid == 0
    before = {host_file: _digest(host_file), image: _digest(image)}
    cfg = tmp_path / "probe.toml"
    cfg.write_text(guest("probe", "probe", args={"kill": [victim, bystander], "signal": [h.pid],
                                                 "append": [str(host_file), str(image)]}))
    h.xmp("create", str(cfg))
    results = _probe_results(h, "probe")

    for test in (f"kill_{victim}", f"kill_{bystander}", f"signal_{h.pid}", "append_0", "append_1"):
        assert results[test]["ok"] is False and results[test]["errno"] in REFUSED, results[test]
    # the victims are unharmed
    for pid in (victim, bystander, h.pid):
        assert psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    assert {d["name"] for d in h.list()} >= {"victim", "bystander", "probe"}
    assert {path: _digest(path) for path in before} == before
    # each guest runs as a uid of its own, none as root
    uids = {name: psutil.Process(h.domain_pid(name)).uids() for name in ("victim", "bystander", "probe")}
    assert all(set(u) == {u.real} for u in uids.values()), uids
    assert len({u.real for u in uids.values()}) == 3 and all(u.real >= 200000 for u in uids.values())
    assert results["uid"]["value"] == uids["probe"].real
    assert results["unshare_user"]["errno"] == errno.EPERM  # the seccomp filter
    # and sees nothing of the host: no /dev/shm, no process but itself in /proc
    assert results["proc_visible"]["value"] == [1]
    # its mounts (mountinfo: the mount point is field 4, its options field 5):
    # all read-only but its own procfs, which holds no host-wide file
    mounts = [m.split() for m in Path(f"/proc/{h.domain_pid('probe')}/mountinfo").read_text().splitlines()]
    assert [m[-3:] for m in mounts if m[4] == "/proc"] == [["proc", "proc", "rw,subset=pid"]], mounts
    assert all(m[5].split(",")[0] == "ro" for m in mounts if m[4] != "/proc"), mounts
    assert results["shm_openable"]["errno"] == errno.ENOENT
    log = (h.rundir / "logs" / "probe.log").read_text()
    assert "jail: uid " in log and "namespaces pid,mnt,ipc,net" in log and "calls denied" in log
    assert h.stop() == 0
    h.assert_clean()


@as_root
def test_guest_uids_come_from_the_range_and_are_never_shared_while_one_runs(hosts, tmp_path):
    base = _uid_base()
    uids = f'guest_uids = "{base}-{base + 1}"\n'
    h = hosts(HOST.replace("[host]\n", "[host]\n" + uids) + guest("a", "idle") + guest("b", "idle"))
    h.start(("a", "b"))
    got = {psutil.Process(h.domain_pid(n)).uids().real for n in ("a", "b")}
    assert got == {base, base + 1}
    # both uids are held: a third guest is refused, with the reason
    cfg = tmp_path / "c.toml"
    cfg.write_text(guest("c", "idle"))
    out = h.xmp("create", str(cfg), check=False)
    assert out.returncode == 1 and f"every uid of {base}-{base + 1} is held by a running guest" in out.stderr
    # another supervisor on the same range gets none of them either
    h2 = hosts(HOST.replace("[host]\n", "[host]\n" + f'guest_uids = "{base}-{base}"\n'), name="other")
    h2.start()
    out = h2.xmp("create", str(cfg), check=False)
    assert out.returncode == 1 and "is held by a running guest" in out.stderr
    # once a guest is gone its uid is free again
    h.xmp("destroy", "a")
    h.wait(lambda: h.xmp("create", str(cfg), check=False).returncode == 0, 10, "the freed uid")
    assert psutil.Process(h.domain_pid("c")).uids().real in {base, base + 1}
    assert h2.stop() == 0 and h.stop() == 0
    h2.assert_clean()
    h.assert_clean()


@as_root
def test_pause_unpause_and_destroy_reach_a_guest_in_its_own_pid_namespace(hosts):
    h = hosts(HOST + guest("spin", "busy")).start(("spin",))
    proc = psutil.Process(h.domain_pid("spin"))
    assert os.readlink(f"/proc/{proc.pid}/ns/pid") != os.readlink("/proc/self/ns/pid")
    h.xmp("pause", "spin")
    h.wait(lambda: proc.status() == psutil.STATUS_STOPPED, 5, "the stop")
    h.xmp("unpause", "spin")
    h.wait(lambda: proc.status() != psutil.STATUS_STOPPED, 5, "the continue")
    h.xmp("destroy", "spin")
    h.wait(lambda: not psutil.pid_exists(proc.pid) or proc.status() == psutil.STATUS_ZOMBIE, 5, "the kill")
    assert h.wait_exit() == 0  # its only guest is gone
    h.assert_clean()


def test_the_zygote_runs_a_guest_module_as_it_is_now_not_as_it_was(hosts, tmp_path, monkeypatch):
    mods = tmp_path / "mods"
    mods.mkdir(mode=0o755)
    os.chmod(mods, 0o755)  # jailed guests read it as their own uid
    module = mods / "xmp_stale_probe.py"
    source = "def main(kernel):\n    kernel.print('module version 1')\n    kernel.idle()\n"
    module.write_text(source)
    monkeypatch.setattr(xmphost, "ENV", {**xmphost.ENV, "PYTHONPATH": os.pathsep.join(
        [str(mods), xmphost.ENV["PYTHONPATH"]])})
    kernel = 'kernel = "xmp_stale_probe:main"'
    h = hosts(HOST + guest("first", "idle").replace('kernel = "xmp.guests.idle:main"', kernel))
    h.start(("first",))  # the zygote preloaded the module for "first"
    h.wait(lambda: "module version 1" in h.console_log("first"), 10, "version 1")
    before = module.stat().st_mtime_ns
    module.write_text(source.replace("version 1", "version 2"))  # the same size
    if module.stat().st_mtime_ns == before:  # (a coarse clock): it is still another file now
        os.utime(module, ns=(before + 1000, before + 1000))
    cfg = tmp_path / "second.toml"
    cfg.write_text(guest("second", "idle").replace('kernel = "xmp.guests.idle:main"', kernel))
    h.xmp("create", str(cfg))
    h.wait(lambda: "module version" in h.console_log("second"), 10, "the second guest's line")
    assert "module version 2" in h.console_log("second")
    assert "module version 2" not in h.console_log("first")  # a running guest keeps its code
    assert h.stop() == 0
    h.assert_clean()


@as_root
def test_a_driver_domain_signals_no_other_process(hosts, tmp_path):
    h = hosts(HOST + guest("bystander", "idle")).start(("bystander",))
    bystander = h.domain_pid("bystander")
    cfg = tmp_path / "dd.toml"
    args = {"kill": [bystander], "signal": [h.pid]}
    cfg.write_text(guest("ddprobe", "probe", driver_domain=True, args=args))
    h.xmp("create", str(cfg))
    results = _probe_results(h, "ddprobe")
    for test in (f"kill_{bystander}", f"signal_{h.pid}"):
        assert results[test]["ok"] is False and results[test]["errno"] == errno.ESRCH, results[test]
    assert psutil.Process(bystander).status() != psutil.STATUS_ZOMBIE
    assert results["uid"]["value"] == 0  # (its own uid only once its images are made its own)
    assert results["unshare_user"]["errno"] == errno.EPERM
    log = (h.rundir / "logs" / "ddprobe.log").read_text()
    assert ("jail: driver domain: host uid and mount, own network namespace (CAP_NET_ADMIN there only, "
            "through a user namespace of its own), own PID namespace") in log
    # a network driver domain's one capability, over a network namespace of its own
    pid = h.domain_pid("ddprobe")
    with open(f"/proc/{pid}/status") as f:
        caps = {k: int(v, 16) for k, _, v in (line.partition(":\t") for line in f) if k.startswith("Cap")}
    assert caps["CapEff"] == caps["CapPrm"] == caps["CapBnd"] == 1 << 12, caps  # CAP_NET_ADMIN
    assert os.stat(f"/proc/{pid}/ns/net").st_ino != os.stat("/proc/self/ns/net").st_ino
    # ... held in a user namespace of its own (uid 0 is itself, no capability in the host's)
    assert os.stat(f"/proc/{pid}/ns/user").st_ino != os.stat("/proc/self/ns/user").st_ino
    with open(f"/proc/{pid}/uid_map") as f:
        assert f.read().split() == ["0", "0", "1"]
    assert h.stop() == 0
    h.assert_clean()


NETNS_HOOK_MODULE = '''
import json
import os
import socket

from xmp.hv.jail import on_guest_netns

SEEN = {}


@on_guest_netns
def setup(domid, config):
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # made in the guest's own namespace
    SEEN.update(domid=domid, name=config["name"], euid=os.geteuid(), fd=sock.detach(),
                netns=os.readlink("/proc/self/ns/net"))  # (no /proc in the jail: the host's tree still)
    return [SEEN["fd"]]


def main(kernel):
    os.fstat(SEEN["fd"])  # still open: kept through the zygote's close of the rest
    kernel.print("hook: " + json.dumps({**SEEN, "uid_now": os.getuid()}))
    kernel.idle()
'''


@as_root
def test_a_netns_hook_sets_up_the_guests_own_network_namespace_before_the_drop(hosts, tmp_path, monkeypatch):
    mods = tmp_path / "mods"
    mods.mkdir(mode=0o755)
    os.chmod(mods, 0o755)
    (mods / "xmp_netns_hook.py").write_text(NETNS_HOOK_MODULE)
    monkeypatch.setattr(xmphost, "ENV", {**xmphost.ENV, "PYTHONPATH": os.pathsep.join(
        [str(mods), xmphost.ENV["PYTHONPATH"]])})
    h = hosts(HOST + guest("netty", "idle").replace("xmp.guests.idle:main", "xmp_netns_hook:main"))
    h.start(("netty",))
    h.wait(lambda: "hook: " in h.console_log("netty"), 10, "the hook's report")
    line = next(ln for ln in h.console_log("netty").splitlines() if ln.startswith("hook: "))
    seen = json.loads(line[len("hook: "):])
    pid = h.domain_pid("netty")
    assert seen["name"] == "netty" and seen["domid"] == h.info("netty")["domid"]
    assert seen["euid"] == 0 and seen["uid_now"] == psutil.Process(pid).uids().real >= 200000
    # the namespace the hook saw is the one the guest runs in, and not the host's
    assert seen["netns"] == os.readlink(f"/proc/{pid}/ns/net") != os.readlink("/proc/self/ns/net")
    assert os.readlink(f"/proc/{pid}/fd/{seen['fd']}").startswith("socket:")
    assert h.stop() == 0
    h.assert_clean()


def test_xmp_info_says_what_isolation_guests_get():
    import subprocess

    out = subprocess.run([*xmphost.XMP, "info"], capture_output=True, text=True, timeout=30, check=True,
                         env=xmphost.ENV).stdout
    lines = [ln for ln in out.splitlines() if ln.startswith("xmp_isolation          : ")]
    want = "own uid (from [host] guest_uids)" if os.geteuid() == 0 else "not root, so no own uid"
    assert any(want in ln for ln in lines), out
    assert any("calls denied" in ln for ln in lines), out  # libseccomp is there (a dependency of apt)
    assert any(ln.startswith("xmp_isolation          : driver domains: ") for ln in lines), out


def test_without_root_the_isolation_said_is_the_weaker_one():
    from xmp.hv.jail import describe

    head = describe(rooted=False)[0]
    assert "run as this user" in head and "can signal this user's processes" in head
