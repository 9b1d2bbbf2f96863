"""The vbd (blkif) split driver end to end: the frontend in a guest, its
backend in dom0 (or a driver domain) serving a raw image file."""

from __future__ import annotations

import json
import os
import re
import signal

import pytest
from kernels import BLK_CASES, BLK_MATRIX_SIZES, VBD, blk_pattern
from xmphost import HOST

from xmp.cli import request
from xmp.xenstore.client import SocketTransport, XsClient

pytestmark = pytest.mark.timeout(120)

MIB = 1024 * 1024


def domain(name: str, kernel: str, memory: int = 48, **extra: str) -> str:
    lines = [f'[[domain]]\nname = "{name}"\nkernel = "kernels:{kernel}"\nmemory = {memory}']
    lines += [f"{k} = {v}" for k, v in extra.items()]
    return "\n".join(lines) + "\n"


def image(tmp_path, name: str = "disk.img", size: int = 32 * MIB):
    path = tmp_path / name
    with open(path, "wb"):
        pass
    os.truncate(path, size)
    return path


def attach(h, dom: str, img, *, mode: str = "w", backend: str = "Domain-0", devid: int = VBD) -> None:
    request(h.rundir, "device-attach", dom=dom, backend=backend, type="vbd", devid=devid,
            back_keys={"params": str(img), "mode": mode, "device-type": "disk"},
            front_keys={"virtual-device": str(devid), "device-type": "disk"})


def reports(h, dom: str) -> list[dict]:
    return [json.loads(line.split("blktest: ", 1)[1]) for line in h.console_log(dom).splitlines()
            if "blktest: " in line]


def report(h, dom: str, test: str, timeout: float = 30) -> dict:
    return h.wait(lambda: next((r for r in reports(h, dom) if r["test"] == test), None), timeout,
                  f"{dom}'s {test} report")


def xs_client(h) -> XsClient:
    return XsClient(SocketTransport.connect(str(h.rundir / "xenstored.sock")))


def tell(h, dom: str, key: str) -> None:
    """Let a waiting test kernel go on (it polls data/<key>)."""
    xs = xs_client(h)
    domid = h.info(dom)["domid"]
    xs.write(f"/local/domain/{domid}/data/{key}", "1")
    xs.close()


def test_integrity_bounds_flush_discard(hosts, tmp_path):
    img = image(tmp_path)
    h = hosts(HOST + domain("g", "blkcheck")).start(("g",))
    attach(h, "g", img)
    info = report(h, "g", "info")
    assert info["sectors"] == 32 * MIB // 512 and info["size"] == 32 * MIB
    assert info["sector_size"] == 512 and info["readonly"] is False
    assert info["features"]["feature-flush-cache"] == 1 and info["features"]["feature-discard"] == 1
    assert info["features"]["feature-max-indirect-segments"] == 256
    # byte for byte, in the guest and -- after its flush -- in the image file
    assert report(h, "g", "integrity") == {"test": "integrity", "ok": True, "bad": []}
    with open(img, "rb") as f:
        for sector, size in BLK_CASES:
            f.seek(sector * 512)
            assert f.read(size) == blk_pattern(sector, size), f"image bytes at sector {sector}"
        f.seek(2 * 512)  # what lies between the cases was never written
        assert f.read(7 * 512) == bytes(7 * 512)
    bounds = report(h, "g", "bounds")
    assert bounds == {"test": "bounds", "read_past_end": -1, "write_past_end": -1,
                      "discard_past_end": -1, "after": True}
    tp = report(h, "g", "throughput", 60)
    assert tp["ok"] is True
    print(f"vbd throughput from a guest, 1 MiB requests: write {tp['write_mbs']} MB/s, "
          f"read {tp['read_mbs']} MB/s")
    # discard: the range reads zeros and its blocks are given back to the host
    report(h, "g", "discard_ready")
    before = os.stat(img).st_blocks * 512
    assert before >= 2 * MIB
    tell(h, "g", "discard")
    assert report(h, "g", "discard") == {"test": "discard", "zeros": True, "edges": True}
    after = os.stat(img).st_blocks * 512
    assert before - after >= MIB - 2 * 4096, (before, after)
    with open(img, "rb") as f:
        f.seek(16384 * 512 + 512)
        assert f.read(MIB - 1024) == bytes(MIB - 1024)
    xs = xs_client(h)
    back = "/local/domain/0/backend/vbd/1/51712"
    assert xs.read(f"{back}/state") == b"4" and xs.read("/local/domain/1/device/vbd/51712/state") == b"4"
    assert xs.read(f"{back}/sectors") == str(32 * MIB // 512).encode()
    assert xs.read(f"{back}/discard-granularity") == b"4096"
    assert xs.read("/local/domain/1/device/vbd/51712/protocol") == b"x86_64-abi"
    xs.close()
    assert "failed" not in h.dmesg()
    assert h.stop() == 0
    h.assert_clean()


def test_read_only_disk(hosts, tmp_path):
    img = image(tmp_path, size=MIB)
    with open(img, "r+b") as f:
        f.write(b"read-only-bytes!")
    os.chmod(img, 0o444)
    h = hosts(HOST + domain("ro", "blkro")).start(("ro",))
    attach(h, "ro", img, mode="r")
    r = report(h, "ro", "readonly")
    assert r["readonly"] is True
    assert r["write"] == -1 and r["discard"] == -1
    assert bytes.fromhex(r["read"]) == b"read-only-bytes!" == bytes.fromhex(r["read_after"])
    xs = xs_client(h)
    assert xs.read("/local/domain/0/backend/vbd/1/51712/info") == b"4"  # VDISK_READONLY
    xs.close()
    assert open(img, "rb").read(16) == b"read-only-bytes!"
    assert h.stop() == 0
    h.assert_clean()


def test_hostile_frontend_gets_errors_and_others_are_served(hosts, tmp_path):
    good_img, bad_img = image(tmp_path, "good.img", 4 * MIB), image(tmp_path, "bad.img", 4 * MIB)
    h = hosts(HOST + domain("good", "blkloop") + domain("evil", "blkhostile")).start(("good", "evil"))
    attach(h, "good", good_img)
    attach(h, "evil", bad_img)
    h.wait(lambda: "blkloop: 20 verified," in h.console_log("good"), 30, "the good guest's I/O")
    h.wait(lambda: len([r for r in reports(h, "evil") if r["test"] == "hostile"]) == 16, 30,
           "answers to the hostile requests")
    answers = {r["name"]: r for r in reports(h, "evil") if r["test"] == "hostile"}
    for name, r in answers.items():
        assert r["op"] == r["sent_op"], name  # each answer echoes its request's id and operation
    statuses = {name: r["status"] for name, r in answers.items()}
    assert statuses == {"unknown_op": -2, "twelve_segments": -1, "last_sect_9": -1,
                        "first_after_last": -1, "bad_gref": -1, "past_end": -1,
                        "wrapping_sector": -1, "zero_segments": -1, "indirect_bad_segment": -1,
                        "discard_past_end": -1, "barrier": -2, "valid_read": 0,
                        "indirect_257_segments": -1, "indirect_op_discard": -1, "indirect_bad_gref": -1,
                        "indirect_valid_write": 0}
    flipped = report(h, "evil", "flipped")
    assert sum(flipped["statuses"].values()) == 100
    assert set(flipped["statuses"]) <= {"0", "-1"}, flipped  # each answer matches one version
    assert flipped["padding"] == ["00" * 5], flipped  # no answer carries stray bytes
    xs = xs_client(h)
    evil = h.info("evil")["domid"]
    evil_back = f"/local/domain/0/backend/vbd/{evil}/51712"
    assert xs.read(f"{evil_back}/state") == b"4"  # bad requests alone close nothing
    n = h.console_log("good").count("verified")
    h.wait(lambda: h.console_log("good").count("verified") > n + 1, 20, "the good guest to go on")
    # a producer index far past the ring: only that device is closed
    tell(h, "evil", "overflow")
    report(h, "evil", "overflowed")
    # Closing (5), then Closed (6) once the hostile guest's xenbus follows
    h.wait(lambda: xs.read(f"{evil_back}/state") in (b"5", b"6"), 10, "the hostile device to close")
    assert b"producer index" in xs.read(f"{evil_back}/error")
    n = h.console_log("good").count("verified")
    h.wait(lambda: h.console_log("good").count("verified") > n + 2, 20, "the good guest to go on")
    good = h.info("good")["domid"]
    assert xs.read(f"/local/domain/0/backend/vbd/{good}/51712/state") == b"4"
    # and the hostile frontend may start over: the backend serves it again
    h.wait(lambda: xs.read(f"{evil_back}/state") == b"6", 10, "the hostile device to be closed")
    tell(h, "evil", "reconnect")
    assert report(h, "evil", "reconnected") == {"test": "reconnected", "up": True, "status": 0}
    assert xs.read(f"{evil_back}/state") == b"4"
    xs.close()
    assert "failed" not in h.dmesg()  # no dom0 service fell over
    assert "Traceback" not in h.console_log("good")
    assert h.stop() == 0
    h.assert_clean()


def test_io_survives_a_backend_domain_restart(hosts, tmp_path):
    img = image(tmp_path, size=4 * MIB)
    # no kernel of its own: a driver domain runs xmp.drivers.backends
    dd = ('[[domain]]\nname = "dd"\nmemory = 32\ndriver_domain = true\ntrusted_backend = true\n'
          'on_crash = "restart"\n')
    h = hosts(HOST + dd + domain("g", "blkloop", args="{ interval = 0 }")).start(("dd", "g"))
    attach(h, "g", img, backend="dd")
    h.wait(lambda: "blkloop: 40 verified," in h.console_log("g"), 30, "I/O through dd")
    old = h.info("dd")["domid"]
    os.kill(h.domain_pid("dd"), signal.SIGKILL)
    h.wait(lambda: (h.info("dd") or {}).get("domid", old) != old, 10, "dd to restart")
    n = h.console_log("g").count("verified")
    h.wait(lambda: h.console_log("g").count("verified") > n + 3, 30, "I/O through the restarted dd")
    assert "Traceback" not in h.console_log("g")  # no error, no lost or wrong block
    # the requests in flight when dd died were sent again to the new dd
    last = [line for line in h.console_log("g").splitlines() if "re-issued" in line][-1]
    assert int(last.split(", ")[1].split()[0]) > 0, last
    assert h.info("g")["state"] == "running"
    assert h.stop() == 0
    h.assert_clean()


def test_a_frontend_reconnects_to_a_new_backend_domain(hosts, tmp_path):
    """A migration without the memory copy: the guest's disk is served by
    dd1; dd1 is destroyed, the toolstack points the device at dd2 (another
    domain, another id), and the guest's I/O goes on there, every block
    verified."""
    img = image(tmp_path, size=4 * MIB)
    dd = '[[domain]]\nname = "{}"\nmemory = 32\ndriver_domain = true\ntrusted_backend = true\n'
    h = hosts(HOST + dd.format("dd1") + dd.format("dd2") + domain("g", "blkloop", args="{ interval = 0 }"))
    h.start(("dd1", "dd2", "g"))
    attach(h, "g", img, backend="dd1")
    h.wait(lambda: "blkloop: 20 verified," in h.console_log("g"), 30, "I/O through dd1")
    dd2 = h.info("dd2")["domid"]
    h.xmp("destroy", "dd1")
    n = h.console_log("g").count("verified")
    moved = request(h.rundir, "device-move", **{"class": "block"}, dom="g", name=str(VBD), backend="dd2")
    assert moved["backend"] == dd2
    h.wait(lambda: h.console_log("g").count("verified") > n + 5, 30, "I/O through dd2")
    assert "Traceback" not in h.console_log("g")
    front = f"/local/domain/{h.info('g')['domid']}/device/vbd/{VBD}"
    assert h.xmp("xenstore", "read", f"{front}/backend-id").stdout.strip() == str(dd2)
    assert h.xmp("xenstore", "read", f"{front}/state").stdout.strip() == "4"  # Connected, to dd2
    assert h.stop() == 0
    h.assert_clean()


MATRIX = {
    # name: (the guest's blkfront settings, backend domain's trust,
    #        what must be negotiated: persistent, max segments, ring-page-order, queues)
    "defaults": ({}, "dom0", (True, 256, 0, 1)),
    "no-persistent": ({"persistent": False}, "dom0", (False, 256, 0, 1)),
    "no-indirect": ({"max_indirect_segments": 0}, "dom0", (True, 11, 0, 1)),
    "multi-page-ring": ({"ring_page_order": 2}, "dom0", (True, 256, 2, 1)),
    "multi-queue": ({"num_queues": 3, "persistent": False, "max_indirect_segments": 32}, "dom0",
                    (False, 32, 0, 3)),
    "untrusted-copy": ({"num_queues": 2, "ring_page_order": 1}, "untrusted", (True, 256, 1, 2)),
    "trusted-dd": ({"ring_page_order": 4, "num_queues": 4}, "trusted", (True, 256, 4, 4)),
}


@pytest.mark.parametrize("name", list(MATRIX))
def test_data_integrity_across_negotiated_features(hosts, tmp_path, name):
    front, where, want = MATRIX[name]
    img = image(tmp_path, size=64 * MIB)
    args = "{ front = { " + ", ".join(f"{k} = {str(v).lower()}" for k, v in front.items()) + " } }"
    dd = ""
    if where != "dom0":
        dd = '[[domain]]\nname = "dd"\nmemory = 32\ndriver_domain = true\n'
        dd += "trusted_backend = true\n" if where == "trusted" else ""
    h = hosts(HOST + dd + domain("g", "blkmatrix", memory=64, args=args))
    h.start(("dd", "g") if dd else ("g",))
    attach(h, "g", img, backend="Domain-0" if where == "dom0" else "dd")
    got = report(h, "g", "negotiated")
    assert (got["persistent"], got["max_segments"], got["ring_page_order"], got["queues"]) == want
    result = report(h, "g", "matrix", 60)
    assert result["ok"] is True, result["bad"]
    assert result["reissued"] == 0
    # the keys of each queue's rings, as blkif.h names them
    xs = xs_client(h)
    domid = h.info("g")["domid"]
    fdir = f"/local/domain/{domid}/device/vbd/{VBD}"
    _, order, queues = want[1:]
    for q in range(queues):
        prefix = f"{fdir}/queue-{q}/" if queues > 1 else f"{fdir}/"
        refs = ["ring-ref"] if order == 0 else [f"ring-ref{i}" for i in range(1 << order)]
        for key in refs + ["event-channel"]:
            assert xs.read(prefix + key).isdigit(), prefix + key
    assert xs.read_or(f"{fdir}/multi-queue-num-queues") == (str(queues).encode() if queues > 1 else None)
    assert xs.read_or(f"{fdir}/ring-page-order") == (str(order).encode() if order else None)
    xs.close()
    row = h.xmp("block-list", "g").stdout.splitlines()[1].split()
    backend = "0" if where == "dom0" else str(h.info("dd")["domid"])
    assert row[:4] == [str(VBD), backend, str(VBD), "4"], row
    if queues > 1 or order:  # no single event-channel / ring-ref: -1, as libxl shows it
        assert row[4:6] == (["-1", "-1"] if queues > 1 else [row[4], "-1"]), row
    # what the guest wrote and flushed is in the image, byte for byte
    with open(img, "rb") as f:
        at = 0
        for n in BLK_MATRIX_SIZES:
            for sector in (at, at + 3):
                if sector == at + 3:  # the odd write overlapped the aligned one's tail
                    f.seek(sector * 512)
                    assert f.read(n * 512) == blk_pattern(sector, n * 512), (sector, n)
            at += 2 * n + 8
        base = result["async_base"]
        for b in result["blocks"]:
            f.seek((base + b * 8) * 512)
            assert f.read(4096) == blk_pattern(base + b * 8, 4096), b
    if where == "untrusted":  # it served every byte without mapping a page of the guest
        pid = h.domain_pid("dd")
        shm = re.compile(r"xmp\.\d+\.[0-9a-f]+\.([a-z]+\d+)\.")
        held = set(shm.findall(open(f"/proc/{pid}/maps").read()))
        held |= {m.group(1) for fd in os.listdir(f"/proc/{pid}/fd")
                 if (m := shm.search(os.readlink(f"/proc/{pid}/fd/{fd}")))}
        assert f"ram{domid}" not in held, held
    assert "Traceback" not in h.console_log("g")
    assert h.stop() == 0
    h.assert_clean()


def test_two_disks_of_one_guest_from_two_backends(hosts, tmp_path):
    a, b = tmp_path / "a.img", tmp_path / "b.img"
    dd = '[[domain]]\nname = "dd"\nmemory = 32\ndriver_domain = true\n'  # untrusted: grant copy
    disks = (f'disk = ["vdev=xvda, access=rw, size=8M, target={a}", '
             f'"vdev=xvdb, access=rw, size=4M, backend=dd, target={b}"]')
    h = hosts(HOST + dd + domain("g", "blktwo", memory=64) + disks + "\n").start(("dd", "g"))
    assert report(h, "g", "two", 60) == {"test": "two", "ok": True, "sizes": [8 * MIB, 4 * MIB]}
    with open(a, "rb") as fa, open(b, "rb") as fb:  # each image holds its own disk's bytes
        for i in range(64):
            fa.seek(i * 128 * 512)
            fb.seek(i * 128 * 512)
            assert fa.read(65536) == blk_pattern(i * 128, 65536), i
            assert fb.read(65536) == blk_pattern(i * 128 + 1, 65536), i
    listing = h.xmp("block-list", "g").stdout.splitlines()[1:]
    assert [row.split()[:2] for row in listing] == [["51712", "0"], ["51728", str(h.info("dd")["domid"])]]
    assert h.stop() == 0
    h.assert_clean()
