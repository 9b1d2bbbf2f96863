"""xmp save / xmp restore end to end: a guest written to a file in Xen's
migration stream format and brought back -- on the same supervisor or on
another -- going on where it was."""

from __future__ import annotations

import hashlib
import os
import re
import signal
import subprocess

import pytest
from xmphost import ENV, HOST, XMP, guest

from xmp.migration.image import ZERO_PAGE, decode_image
from xmp.migration.stream import StreamError
from xmp.startinfo import first_free_pfn

pytestmark = pytest.mark.timeout(120)

KEEP = guest("keep", "idle")   # a guest that stays, so the host does not stop when the saved one goes
COUNTER = guest("c", "counter", args={"count": 0, "interval": 0.02})


def counts(log: str) -> list[int]:
    return [int(m) for m in re.findall(r"^count (\d+)$", log, re.M)]


def image_hash(path) -> str:
    """The hash of the guest's own RAM as the image holds it."""
    with open(path, "rb") as f:
        img = decode_image([f.read()])
    first = first_free_pfn(img.config.max_grant_frames)
    last = img.config.memory_mib * 256
    return hashlib.sha256(b"".join(img.pages.get(p) or ZERO_PAGE for p in range(first, last))).hexdigest()


def test_counter_saved_and_restored_twice_goes_on_without_gap_or_repeat(hosts, tmp_path):
    h = hosts(HOST + KEEP + COUNTER).start(("keep", "c"))
    f = tmp_path / "c.save"
    for round_ in (1, 2):
        seen = len(counts(h.console_log("c")))
        h.wait(lambda seen=seen: len(counts(h.console_log("c"))) > seen + 5, 20, "counting")
        old, uuid = h.info("c")["domid"], h.info("c")["uuid"]
        out = h.xmp("save", "c", str(f)).stdout
        assert f"saved 'c' to {f}" in out
        assert h.info("c") is None and f.exists()
        assert not list(tmp_path.glob(".*partial"))
        out = h.xmp("restore", str(f)).stdout
        new = h.info("c")
        assert f"restored domain 'c' (id {new['domid']})" in out and new["domid"] > old
        assert new["state"] == "running" and new["mem_kb"] == 32 * 1024 and new["uuid"] == uuid
        at = len(counts(h.console_log("c")))
        h.wait(lambda at=at: len(counts(h.console_log("c"))) > at + 5, 20, f"counting after restore {round_}")
    log = h.console_log("c")
    numbers = counts(log)
    assert numbers == list(range(1, len(numbers) + 1)), numbers   # the history and the new output, no gap
    assert log.count("c: suspending") == 2
    assert h.stop() == 0
    h.assert_clean()


def test_ram_is_the_same_before_in_the_file_and_after_twice(hosts, tmp_path):
    h = hosts(HOST + KEEP + guest("r", "idle").replace("xmp.guests.idle:main", "save_kernels:ramhash"))
    h.start(("keep", "r"))
    for gen in (1, 2):
        h.wait(lambda gen=gen: f"ramhash: generation {gen} written" in h.console_log("r"), 20, "the pattern")
        f = tmp_path / f"r{gen}.save"
        h.xmp("save", "r", str(f))
        h.xmp("restore", str(f))
        h.wait(lambda gen=gen: f"ramhash: after {gen} " in h.console_log("r"), 20, "the restored hash")
        log = h.console_log("r")
        before = re.search(rf"ramhash: before {gen} (\w+)", log).group(1)
        after = re.search(rf"ramhash: after {gen} (\w+)", log).group(1)
        assert before == after == image_hash(f)
    assert image_hash(tmp_path / "r1.save") != image_hash(tmp_path / "r2.save")
    assert h.stop() == 0
    h.assert_clean()


def test_checkpoint_keeps_the_source_and_a_second_supervisor_restores_it(hosts, tmp_path):
    src = hosts(HOST + KEEP + COUNTER, name="src").start(("keep", "c"))
    dst = hosts(HOST, name="dst").start()
    src.wait(lambda: len(counts(src.console_log("c"))) > 5, 20, "counting")
    f = tmp_path / "c.save"
    domid = src.info("c")["domid"]
    src.xmp("save", "-c", "c", str(f))
    assert src.info("c")["domid"] == domid
    n = len(counts(src.console_log("c")))
    src.wait(lambda: len(counts(src.console_log("c"))) > n + 3, 20, "the source counting on")
    assert "c: resumed" in src.console_log("c")     # its suspend call returned "cancelled"
    again = src.xmp("restore", str(f), check=False)  # the name is taken here
    assert again.returncode == 1 and "a domain named 'c' already exists" in again.stderr
    dst.xmp("restore", str(f))
    dst.wait(lambda: len(counts(dst.console_log("c"))) > 3, 20, "counting on the second host")
    first = counts(dst.console_log("c"))[0]
    saved_at = counts(src.console_log("c").split("c: suspending")[0])[-1]
    assert first == saved_at + 1
    assert [d["name"] for d in dst.list()] == ["Domain-0", "c"]
    for h in (src, dst):
        assert h.stop() == 0
        h.assert_clean()


def test_a_corrupt_image_creates_nothing(hosts, tmp_path):
    h = hosts(HOST + KEEP + COUNTER).start(("keep", "c"))
    f = tmp_path / "c.save"
    h.xmp("save", "-c", "c", str(f))
    data = f.read_bytes()
    before = [d["domid"] for d in h.list()]
    cut = tmp_path / "cut.save"
    cut.write_bytes(data[:len(data) // 2])
    out = h.xmp("restore", str(cut), check=False)
    assert out.returncode == 1
    assert re.search(r"not a valid image: PAGE_DATA at offset \d+: stream ends", out.stderr), out.stderr
    bad = tmp_path / "bad.save"
    bad.write_bytes(b"Xen saved domain, xm" + data[20:])
    out = h.xmp("restore", str(bad), check=False)
    assert out.returncode == 1 and "xl header at offset 0: magic" in out.stderr, out.stderr
    assert [d["domid"] for d in h.list()] == before
    for args, why in ((("Domain-0", str(f)), "Domain-0 serves other domains: it cannot be saved"),
                      (("c", str(tmp_path / "no" / "f")), f"{tmp_path / 'no'} is not a directory")):
        out = h.xmp("save", *args, check=False)
        assert out.returncode == 1 and why in out.stderr, out.stderr
    h.xmp("pause", "c")
    out = h.xmp("save", "c", str(f), check=False)
    assert out.returncode == 1 and "c is paused, not running" in out.stderr, out.stderr
    assert h.info("c")["state_letters"] == "--p---"     # refused: nothing asked of the guest
    assert h.stop() == 0
    h.assert_clean()


def checker(image, backend: str | None = None, size: str = "16M", args: str = "") -> str:
    where = f"backend={backend}, " if backend else ""
    return ('[[domain]]\nname = "d"\nkernel = "xmp.guests.diskcheck:main"\nmemory = 64\n'
            f'disk = ["vdev=xvda, access=rw, {where}size={size}, target={image}"]\n'
            f'args = {{ seed = 3{args} }}\n')


def test_a_guest_saved_mid_disk_io_verifies_every_byte_after_restore_on_another_host(hosts, tmp_path):
    image = tmp_path / "disk.img"
    # ~84 writes 0.15 s apart: about 13 s of writing, so a loaded machine's
    # slow `xmp save` still comes mid-I/O (at 0.03 s it sometimes came after)
    h = hosts(HOST + KEEP + checker(image, args=", interval = 0.15"), name="src").start(("keep", "d"))
    dst = hosts(HOST, name="dst").start()
    h.wait(lambda: image.stat().st_blocks > 0, 30, "the writes to begin")
    f = tmp_path / "d.save"
    h.xmp("save", "d", str(f))
    log = h.console_log("d")
    assert "diskcheck: wrote" not in log, "saved after the writes: not mid-I/O"
    dst.xmp("restore", str(f))     # its disk re-attached to the same image, behind dst's dom0
    dst.wait(lambda: "diskcheck: OK" in dst.console_log("d") or "FAILED" in dst.console_log("d"), 90,
             "the verify")
    assert f"diskcheck: OK {16 << 20} bytes verified" in dst.console_log("d"), dst.console_log("d")
    for host in (h, dst):
        assert host.stop() == 0
        host.assert_clean()


STOR = '[[domain]]\nname = "stor"\ndriver_domain = true\nmemory = 64\n'


def test_restore_refuses_a_missing_backend_domain_or_image(hosts, tmp_path):
    image = tmp_path / "disk.img"
    topology = HOST + KEEP + STOR + checker(image, backend="stor", size="4M", args=", hold = true")
    src = hosts(topology, name="src").start(("keep", "stor", "d"))
    src.wait(lambda: "flushed" in src.console_log("d"), 30, "the flush")
    f = tmp_path / "d.save"
    src.xmp("save", "d", str(f))
    dst = hosts(HOST, name="dst").start()
    out = dst.xmp("restore", str(f), check=False)
    assert out.returncode == 1 and "d: backend domain 'stor' does not exist here" in out.stderr, out.stderr
    assert [d["name"] for d in dst.list()] == ["Domain-0"]
    moved = tmp_path / "moved.img"
    image.rename(moved)
    out = src.xmp("restore", str(f), check=False)
    assert out.returncode == 1 and f"disk xvda: its image {image} is gone" in out.stderr, out.stderr
    assert "d" not in [d["name"] for d in src.list()]
    moved.rename(image)
    src.xmp("restore", str(f))    # held after its flush: restored, it verifies
    src.wait(lambda: "diskcheck: OK" in src.console_log("d"), 30, "the verify")
    assert f"diskcheck: OK {4 << 20} bytes verified" in src.console_log("d")
    for h in (src, dst):
        assert h.stop() == 0
        h.assert_clean()


def _never_half_suspended(h, f) -> str:
    """Once things settle the guest runs, or is gone and ``f`` is a whole image."""
    def settled():
        info = h.info("c")
        if info is None:
            return "gone"
        return "running" if info["state"] == "running" else None
    outcome = h.wait(settled, 70, "the guest to run again or be gone")
    if outcome == "gone":
        assert decode_image([f.read_bytes()]).context   # complete: it reaches END
    else:
        assert not f.exists()
    return outcome


def test_sigkill_of_xmp_save_leaves_the_guest_running_or_saved(hosts, tmp_path):
    h = hosts(HOST + KEEP + COUNTER).start(("keep", "c"))
    h.wait(lambda: len(counts(h.console_log("c"))) > 3, 20, "counting")
    f = tmp_path / "c.save"
    proc = subprocess.Popen([*XMP, "save", "c", str(f), "--rundir", str(h.rundir)], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = h.rundir / "logs" / "hypervisor.log"
    h.wait(lambda: "to suspend" in log.read_text(), 20, "the suspend request")
    proc.kill()
    proc.wait(10)
    assert _never_half_suspended(h, f) == "gone"   # the supervisor finished the save for nobody
    h.xmp("restore", str(f))
    assert h.info("c")["state"] == "running"
    assert h.stop() == 0
    h.assert_clean()


def test_sigkill_of_the_supervisor_mid_save_leaves_no_image_that_claims_to_be_whole(hosts, tmp_path):
    t = guest("t", "touch", memory=256, args={"fraction": 1.0})
    h = hosts(HOST + KEEP + t).start(("keep", "t"))
    h.wait(lambda: "pages touched" in h.console_log("t"), 30, "the guest to write its memory")
    f = tmp_path / "t.save"
    proc = subprocess.Popen([*XMP, "save", "t", str(f), "--rundir", str(h.rundir)], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    h.wait(lambda: list(tmp_path.glob(".t.save.*.partial")), 20, "the image to be begun")
    h.descendants()
    os.kill(h.pid, signal.SIGKILL)
    h.proc.wait(10)
    proc.wait(10)
    h.assert_clean(sockets=False)        # every domain went with it: none is left suspended
    if f.exists():                       # only if the write ended between the look and the kill
        assert decode_image([f.read_bytes()]).context
    for partial in tmp_path.glob(".*.partial"):
        with pytest.raises(StreamError, match="stream ends"):
            decode_image([partial.read_bytes()])


def test_blkfront_re_issues_what_was_on_its_ring_at_the_suspend(hosts, tmp_path):
    image = tmp_path / "disk.img"
    d = checker(image, size="4M").replace("xmp.guests.diskcheck:main", "save_kernels:inflight")
    h = hosts(HOST + KEEP + d).start(("keep", "d"))
    h.wait(lambda: "inflight: ready" in h.console_log("d"), 20, "the guest")
    f = tmp_path / "d.save"
    h.xmp("save", "d", str(f))
    image.write_bytes(bytes(4 << 20))   # what the old backend wrote of them is gone: a re-issue must
    h.xmp("restore", str(f))
    h.wait(lambda: "inflight: " in h.console_log("d").split("inflight: ready")[-1], 30, "the check")
    log = h.console_log("d")
    assert "vbd: re-issuing 8 request(s) in flight at the suspend" in log
    assert "inflight: 8 re-issued, data OK" in log, log
    assert h.stop() == 0
    h.assert_clean()


def test_a_ballooned_guest_comes_back_with_the_pages_it_had(hosts, tmp_path):
    b = guest("b", "idle", maxmem=64).replace("xmp.guests.idle:main", "save_kernels:balloon")
    h = hosts(HOST + KEEP + b).start(("keep", "b"))
    h.wait(lambda: "balloon: up" in h.console_log("b"), 20, "the guest")
    h.xmp("mem-set", "b", "31m")   # its balloon driver gives back its top MiB
    assert h.info("b")["mem_kb"] == 31 * 1024
    f = tmp_path / "b.save"
    out = h.xmp("save", "b", str(f)).stdout
    assert f"{31 * 256} pages" in out           # the populated ones only
    h.xmp("restore", str(f))
    h.wait(lambda: "balloon: restored" in h.console_log("b"), 20, "the restore")
    info = h.info("b")
    assert info["mem_kb"] == 31 * 1024 and info["maxmem_kb"] == 64 * 1024
    # the target moved with it: its balloon driver does not take the MiB back
    target = h.xmp("xenstore", "read", f"/local/domain/{info['domid']}/memory/target").stdout
    assert target.strip() == str(31 * 1024)
    h.xmp("destroy", "b")
    # the pool got back exactly what the restored domain held: a guest of all the rest fits
    rest = 1024 - 64 - 32
    cfg = tmp_path / "big.toml"
    cfg.write_text(guest("big", "idle", memory=rest))
    h.wait(lambda: h.info("b") is None, 10, "b to go")
    h.xmp("create", str(cfg))
    assert h.info("big")["mem_kb"] == rest * 1024
    assert h.stop() == 0
    h.assert_clean()


def test_paused_after_a_checkpoint_and_after_a_restore(hosts, tmp_path):
    src = hosts(HOST + KEEP + COUNTER, name="src").start(("keep", "c"))
    dst = hosts(HOST, name="dst").start()
    src.wait(lambda: len(counts(src.console_log("c"))) > 3, 20, "counting")
    f = tmp_path / "c.save"
    src.xmp("save", "-c", "-p", "c", str(f))
    assert src.info("c")["state_letters"] == "--p---"
    dst.xmp("restore", "-p", str(f))
    assert dst.info("c")["state_letters"] == "--p---"
    log = dst.rundir / "logs" / "c.log"
    assert "restored" not in log.read_text()        # stopped before its kernel ran at all
    dst.xmp("unpause", "c")
    dst.wait(lambda: "c: restored xmp.guests.counter:main" in log.read_text(), 20, "the kernel to run")
    dst.wait(lambda: len(counts(dst.console_log("c"))) > 2, 20, "counting after unpause")
    for h in (src, dst):
        assert h.stop() == 0
        h.assert_clean()


def test_a_domain_destroyed_mid_save_fails_the_save_and_leaves_no_file(hosts, tmp_path):
    t = guest("t", "touch", memory=256, args={"fraction": 1.0})
    h = hosts(HOST + KEEP + t).start(("keep", "t"))
    h.wait(lambda: "pages touched" in h.console_log("t"), 30, "the guest to write its memory")
    f = tmp_path / "t.save"
    proc = subprocess.Popen([*XMP, "save", "t", str(f), "--rundir", str(h.rundir)], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    h.wait(lambda: list(tmp_path.glob(".t.save.*.partial")), 20, "the image to be begun")
    h.xmp("destroy", "t")           # served mid-save: the loop goes on between slices of the write
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 1 and "t ended or went on during the save" in err, err
    assert not f.exists() and not list(tmp_path.glob(".*partial"))
    assert h.info("t") is None and h.info("keep")["state"] == "running"
    assert h.stop() == 0
    h.assert_clean()


def test_a_garbled_guest_context_crashes_that_guest_alone(hosts, tmp_path):
    h = hosts(HOST + KEEP + COUNTER).start(("keep", "c"))
    h.wait(lambda: len(counts(h.console_log("c"))) > 2, 20, "counting")
    f = tmp_path / "c.save"
    h.xmp("save", "c", str(f))
    data = f.read_bytes()
    head = b'{"version":2,"pages":[['   # the kernel's context, inside XMP_GUEST_CONTEXT
    at = data.index(head) + len(head)
    f.write_bytes(data[:at] + b"-" + data[at + 1:])   # the first run's pfn negative, same length
    h.xmp("restore", str(f))   # the stream is sound: the context is the kernel's to check
    log = h.rundir / "logs" / "c.log"
    h.wait(lambda: "restoring: the suspend context's page allocator does not fit" in log.read_text(), 20,
           "the restored kernel to refuse its context")
    h.wait(lambda: h.info("c") is None, 20, "the crashed guest to go (on_crash = destroy)")
    assert h.info("keep")["state"] == "running"
    assert h.stop() == 1     # a crash fails the run, as any guest's crash does
    h.assert_clean()


def test_a_guest_that_does_not_suspend_goes_on_running(hosts, tmp_path):
    h = hosts(HOST + KEEP + guest("spin", "busy")).start(("keep", "spin"))
    f = tmp_path / "spin.save"
    out = h.xmp("save", "--timeout", "1", "spin", str(f), check=False)
    assert out.returncode == 1 and "spin did not suspend within 1 s; it goes on running" in out.stderr, \
        out.stderr
    assert h.info("spin")["state"] == "running" and not f.exists() and not list(tmp_path.glob(".*partial"))
    request = h.xmp("xenstore", "read", f"/local/domain/{h.info('spin')['domid']}/control/shutdown").stdout
    assert request.strip() == ""     # the request is withdrawn: a later look at it suspends nothing
    assert h.stop() == 0
    h.assert_clean()
