"""Disks from the topology, end to end: what a guest wrote and flushed
survives a kill -9 of the guest, of its backend's domain and of the
supervisor; a driver domain's restart under I/O costs the guest nothing."""

from __future__ import annotations

import os
import signal

import pytest
from xmphost import HOST

pytestmark = pytest.mark.timeout(180)


def checker(name: str, image, *, verify_only: bool = False, backend: str | None = None, size: str = "8M",
            seed: int = 7, hold: bool = False, front: str = "") -> str:
    where = f"backend={backend}, " if backend else ""
    spec = f"vdev=xvda, access=rw, {where}size={size}, target={image}"
    flags = "".join(f", {k} = true" for k, on in (("verify_only", verify_only), ("hold", hold)) if on)
    flags += f", front = {{ {front} }}" if front else ""
    args = f"{{ seed = {seed}{flags} }}"
    return (f'[[domain]]\nname = "{name}"\nkernel = "xmp.guests.diskcheck:main"\nmemory = 64\n'
            f'disk = ["{spec}"]\nargs = {args}\n')


STOR = ('[[domain]]\nname = "stor"\ndriver_domain = true\ntrusted_backend = true\nmemory = 64\n'
        'on_crash = "restart"\n')


@pytest.mark.parametrize("victim", ["guest", "backend-domain", "supervisor"])
def test_flushed_data_survives_kill9(hosts, tmp_path, victim):
    image = tmp_path / "disk.img"
    h = hosts(HOST + STOR + checker("w", image, backend="stor", hold=True), name="writer")
    h.start(("stor", "w"))
    h.wait(lambda: "flushed" in h.console_log("w"), 60, "the flush")
    pid = {"guest": lambda: h.domain_pid("w"), "backend-domain": lambda: h.domain_pid("stor"),
           "supervisor": lambda: h.pid}[victim]()
    os.kill(pid, signal.SIGKILL)
    if victim == "supervisor":
        h.proc.wait(10)
        h.assert_clean(sockets=False)
    else:
        h.stop(timeout=30)
        h.assert_clean()
    again = hosts(HOST + STOR + checker("r", image, backend="stor", verify_only=True), name="reader")
    again.start()
    assert again.wait_exit(60) == 0
    assert f"diskcheck: OK {8 << 20} bytes verified" in again.console_log("r")
    again.assert_clean()


@pytest.mark.parametrize("stor, front", [
    (STOR, ""),
    # untrusted: grant copy only; two queues of two-page rings, no persistent grants
    (STOR.replace("trusted_backend = true\n", ""), "num_queues = 2, ring_page_order = 1, persistent = false"),
], ids=["trusted", "untrusted-multiqueue"])
def test_driver_domain_restart_under_io_loses_nothing(hosts, tmp_path, stor, front):
    image = tmp_path / "disk.img"
    h = hosts(HOST.replace("1024", "2048") + stor + checker("g", image, backend="stor", size="256M",
                                                           front=front))
    h.start(("stor", "g"))
    state = "/local/domain/1/backend/vbd/2/51712/state"
    h.wait(lambda: h.xmp("xenstore", "read", state, check=False).stdout.strip() == "4", 20, "the disk")
    os.kill(h.domain_pid("stor"), signal.SIGKILL)  # the guest has just begun writing 256 MiB
    assert h.wait_exit(120) == 0  # stor restarted (its policy), the guest finished and powered off
    log = h.console_log("g")
    assert f"diskcheck: OK {256 << 20} bytes verified" in log, log
    assert "backend now dom" in (h.rundir / "logs" / "hypervisor.log").read_text()
    h.assert_clean()


def test_block_attach_list_and_detach(hosts, tmp_path):
    h = hosts(HOST + '[[domain]]\nname = "g"\nkernel = "kernels:blkuser"\nmemory = 48\n').start(("g",))
    attach = h.xmp("block-attach", "g", f"vdev=xvdb, access=rw, size=4M, target={tmp_path / 'hot.img'}")
    assert "disk 51728 attached to dom1 (backend dom0)" in attach.stdout
    assert (tmp_path / "hot.img").stat().st_size == 4 << 20
    h.wait(lambda: "blkuser: xvdb has 8192 sectors" in h.console_log("g"), 20, "the guest to use it")
    listing = h.xmp("block-list", "g").stdout.splitlines()
    assert listing[0].split() == ["Vdev", "BE", "handle", "state", "evt-ch", "ring-ref", "BE-path"]
    assert listing[1].split()[:4] == ["51728", "0", "51728", "4"]  # Connected
    assert listing[1].endswith("/local/domain/0/backend/vbd/1/51728")
    bad = h.xmp("block-attach", "g", "vdev=xvdb, acess=rw, target=x.img", check=False)
    assert bad.returncode == 1 and "unknown key 'acess'" in bad.stderr
    # a disk the guest never opens (its frontend stays Initialising) detaches all the same
    h.xmp("block-attach", "g", f"vdev=xvdc, access=r, size=1M, target={tmp_path / 'unused.img'}")
    h.wait(lambda: len(h.xmp("block-list", "g").stdout.splitlines()) == 3, 10, "xvdc to be listed")
    h.xmp("block-detach", "g", "xvdc")
    h.xmp("block-detach", "g", "xvdb")
    assert h.xmp("block-list", "g").stdout.splitlines()[1:] == []
    missing = h.xmp("block-detach", "g", "xvdb", check=False)
    assert missing.returncode == 1 and "g has no disk xvdb" in missing.stderr
    assert h.stop() == 0
    h.assert_clean()


def test_hot_plug_cycles_give_the_guests_memory_back(hosts, tmp_path):
    # each blkfront takes ~4.4 MiB of the guest (its pool, indirect pages, ring):
    # twelve plug/unplug cycles in a 32 MiB guest work only if unplugging gives it back;
    # every other one is forced (both directories removed at once, the guest not asked)
    h = hosts(HOST + '[[domain]]\nname = "g"\nkernel = "kernels:blkcycle"\nmemory = 32\n').start(("g",))
    xs = "/local/domain/0/backend/vbd/1"
    for i in range(12):
        h.xmp("block-attach", "g", f"vdev=xvdb, access=rw, size=1M, target={tmp_path / 'hot.img'}")
        h.wait(lambda i=i: f"blkcycle: {i} ok" in h.console_log("g"), 20, f"cycle {i}")
        h.xmp("block-detach", *(["--force"] if i % 2 else []), "g", "xvdb")
        assert h.xmp("block-list", "g").stdout.splitlines()[1:] == []
        assert h.xmp("xenstore", "ls", xs).stdout == ""
    assert "Traceback" not in h.console_log("g") and h.info("g")["state"] != "crashed"
    assert h.stop() == 0
    h.assert_clean()


FULL = os.environ.get("XMP_STRESS_FULL") == "1"


@pytest.mark.stress
@pytest.mark.xdist_group("heavy")  # never beside another heavy test
@pytest.mark.parametrize("trusted", [True, False], ids=["trusted", "untrusted"])
def test_guests_hammering_one_driver_domain(hosts, tmp_path, trusted):
    """Several guests, random asynchronous I/O checked sector by sector, one
    driver domain serving them all (CI: 3 guests for 3 s; XMP_STRESS_FULL=1:
    8 guests for 60 s)."""
    n, seconds = (8, 60) if FULL else (3, 3)
    stor = STOR if trusted else STOR.replace("trusted_backend = true\n", "")
    guests = "".join(
        f'[[domain]]\nname = "g{i}"\nkernel = "kernels:blkstress"\nmemory = 48\n'
        f'args = {{ seconds = {seconds}, depth = 8 }}\n'
        f'disk = ["vdev=xvda, access=rw, backend=stor, size=16M, target={tmp_path}/g{i}.img"]\n'
        for i in range(n))
    h = hosts(HOST.replace("1024", "2048") + stor + guests)
    h.start(("stor", *(f"g{i}" for i in range(n))))
    assert h.wait_exit(seconds + 120) == 0  # every guest finished and powered off
    for i in range(n):
        log = h.console_log(f"g{i}")
        assert "blkstress: OK" in log, log[-2000:]
    h.assert_clean()
