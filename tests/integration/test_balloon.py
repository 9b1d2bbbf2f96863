"""The balloon driver, xmp mem-set and xmp mem-max, on a real host: memory
really returns (the RAM object's allocated blocks and the guest's PSS drop
by what it gave back), granted pages are never given away, and mem-set's
and mem-max's refusals change nothing."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
from xmphost import HOST

MIB = 1 << 20


def _domain(name: str, kernel: str, memory: int, maxmem: int | None = None, args: str = "") -> str:
    text = f'[[domain]]\nname = "{name}"\nkernel = "balloonkernels:{kernel}"\nmemory = {memory}\n'
    if maxmem is not None:
        text += f"maxmem = {maxmem}\n"
    return text + (f"args = {args}\n" if args else "")


def _ram_bytes(h, domid: int) -> int:
    """Bytes the host has allocated to dom``domid``'s RAM object (st_blocks
    of the supervisor's descriptor of it)."""
    pid = h.pid
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if re.search(rf"\.ram{domid}\.", os.readlink(f"/proc/{pid}/fd/{fd}")):
                return os.stat(f"/proc/{pid}/fd/{fd}").st_blocks * 512
        except FileNotFoundError:
            continue
    raise AssertionError(f"no RAM object of dom{domid} held by the supervisor")


def _pss_shmem(pid: int) -> int:
    text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    return int(re.search(r"^Pss_Shmem:\s+(\d+) kB", text, re.M).group(1)) * 1024


def _lines(h, name: str, tag: str) -> list[str]:
    return [ln for ln in h.console_log(name).splitlines() if ln.startswith(tag)]


def _mem_kb(h, name: str) -> int:
    return h.info(name)["mem_kb"]


@pytest.mark.timeout(90)
def test_balloon_down_and_up_returns_memory_to_the_host(hosts):
    h = hosts(HOST + _domain("b", "filler", 64, maxmem=128)).start(("b",))
    h.wait(lambda: _lines(h, "b", "filler: reservation="), 20, "the filler to touch its memory")
    domid = h.info("b")["domid"]
    assert _mem_kb(h, "b") == 64 * 1024 and h.info("b")["maxmem_kb"] == 128 * 1024
    ram0, pss0 = _ram_bytes(h, domid), _pss_shmem(h.domain_pid("b"))
    assert ram0 >= 60 * MIB  # every free page was written: the host holds them

    out = h.xmp("mem-set", "b", "32m")  # waits for the guest to reach it
    assert out.returncode == 0, out.stderr
    assert _mem_kb(h, "b") == 32 * 1024
    ram1, pss1 = _ram_bytes(h, domid), _pss_shmem(h.domain_pid("b"))
    # 32 MiB given back, every page of it written before: all of it left the host
    assert ram0 - ram1 >= 32 * MIB - 64 * 1024, (ram0, ram1)
    assert pss0 - pss1 >= 31 * MIB, (pss0, pss1)
    assert h.xmp("xenstore", "read", f"/local/domain/{domid}/memory/target").stdout.strip() == "32768"
    last = h.wait(lambda: [ln for ln in _lines(h, "b", "filler: reservation=8192 ")], 10, "the guest's view")
    assert "kept_intact=True" in last[-1]

    # up again, past `memory` to maxmem: the pre-ballooned pages are populated too
    assert h.xmp("mem-set", "b", "128m").returncode == 0
    assert _mem_kb(h, "b") == 128 * 1024
    last = h.wait(lambda: _lines(h, "b", "filler: reservation=32768 "), 10, "the guest's view")
    assert "ballooned=0 " in last[-1] and "kept_intact=True" in last[-1]
    assert not [ln for ln in h.console_log("b").splitlines() if "kept_intact=False" in ln]
    assert h.stop() == 0
    h.assert_clean()


@pytest.mark.timeout(90)
def test_mem_set_and_mem_max_refuse_and_change_nothing(hosts):
    # pool 256 MiB: dom0 64, b 32, deaf 32 -> 128 MiB free
    topo = HOST.replace("memory = 1024", "memory = 256") + _domain("b", "filler", 32, maxmem=512) \
        + _domain("deaf", "deaf", 32)
    h = hosts(topo).start(("b", "deaf"))
    h.wait(lambda: _lines(h, "b", "filler: reservation=") and _lines(h, "deaf", "deaf: ready"), 20,
           "the guests")
    domid = h.info("b")["domid"]

    def target() -> str:
        return h.xmp("xenstore", "read", f"/local/domain/{domid}/memory/target").stdout.strip()

    def refused(*args: str) -> str:
        out = h.xmp(*args, check=False)
        assert out.returncode == 1, (args, out.stdout, out.stderr)
        assert _mem_kb(h, "b") == 32 * 1024 and target() == "32768"
        return out.stderr

    # the keys libxl writes: static-max, target (KiB) and videoram (none for PV/PVH)
    assert [h.xmp("xenstore", "read", f"/local/domain/{domid}/memory/{key}").stdout.strip()
            for key in ("static-max", "target", "videoram")] == ["524288", "32768", "0"]
    assert "above b's maximum of 524288 KiB" in refused("mem-set", "b", "513m")
    assert "the host pool has 131072 KiB free" in refused("mem-set", "b", "400m")
    assert "below the" in refused("mem-set", "b", "16k")
    assert "invalid memory size: 12q" in refused("mem-set", "b", "12q")
    assert "invalid memory size: 1mb" in refused("mem-set", "b", "1mb")
    assert "above b's maxmem of 524288 KiB" in refused("mem-max", "b", "1g")
    assert "below b's memory target of 32768 KiB" in refused("mem-max", "b", "16m")
    assert "Domain-0 has no balloon driver" in h.xmp("mem-set", "Domain-0", "32m", check=False).stderr

    # xl's units: k, a bare number (MiB, as xl's parse_mem_size_kb), b, g
    for size, kb in (("24576k", 24576), ("20", 20480), (str(40 * MIB) + "b", 40960)):
        assert h.xmp("mem-set", "b", size).returncode == 0
        assert _mem_kb(h, "b") == kb and target() == str(kb)

    assert h.xmp("mem-max", "b", "48m").returncode == 0
    info = h.info("b")
    assert info["maxmem_kb"] == 48 * 1024
    assert h.xmp("xenstore", "read", f"/local/domain/{domid}/memory/static-max").stdout.strip() == "49152"
    out = h.xmp("mem-set", "b", "49m", check=False)
    assert out.returncode == 1 and "above b's maximum of 49152 KiB" in out.stderr
    assert h.xmp("mem-set", "b", "0.05g", check=False).returncode == 1  # strtoll stops at '.'

    # a guest that ignores its target keeps its memory, and mem-set says so
    out = h.xmp("mem-set", "deaf", "16m", "--timeout", "1", check=False)
    assert out.returncode == 1
    assert "did not reach its memory target of 16384 KiB within 1 s: it keeps 32768 KiB" in out.stderr
    assert _mem_kb(h, "deaf") == 32 * 1024
    assert "did not reach its memory target" in h.dmesg()
    assert h.stop() == 0
    h.assert_clean()


@pytest.mark.timeout(90)
def test_the_balloon_never_gives_away_a_granted_page(hosts):
    h = hosts(HOST + _domain("c", "careless", 32)).start(("c",))
    first = json.loads(h.wait(lambda: _lines(h, "c", "careless: "), 20, "the report")[-1][len("careless: "):])
    assert first["granted_state"] == [0] * 8  # freed to the allocator, still granted
    # a target that needs every free page: all but the 8 granted ones go
    target_pages = first["reservation"] - first["free"]
    out = h.xmp("mem-set", "c", f"{target_pages * 4}k", "--timeout", "2", check=False)
    assert out.returncode == 1 and "did not reach its memory target" in out.stderr
    assert _mem_kb(h, "c") == (target_pages + 8) * 4
    last = json.loads(h.wait(lambda: [ln for ln in _lines(h, "c", "careless: ")
                                      if f'"reservation": {target_pages + 8},' in ln], 10, "the report")[-1]
                      [len("careless: "):])
    assert last["free"] == 8 and last["granted_state"] == [0] * 8 and last["granted_intact"]
    assert h.stop() == 0
    h.assert_clean()


@pytest.mark.timeout(60)
def test_a_page_another_domain_maps_is_not_taken_back(hosts):
    """decrease_reservation of a page dom0 holds mapped: refused, as Xen
    keeps such a page for its mapper (punching it would pull it from under
    dom0's mapping).  Before the hypervisor checked, the page was taken."""
    topo = HOST.replace("[dom0]\n", '[dom0]\nkernel = "kernels:dom0mapper"\nargs = { granter = 1 }\n') \
        + _domain("m", "mapped", 32)
    h = hosts(topo).start(("m",))
    line = h.wait(lambda: _lines(h, "m", "mapped: "), 20, "the report")[-1]
    r = json.loads(line[len("mapped: "):])
    assert r["mapped"] is True
    assert r["given"] == 0 and r["after"] == r["before"]
    assert r["still_there"] == "granted-page-123dom0-was-here!!!"
    assert h.stop() == 0
    h.assert_clean()


@pytest.mark.timeout(60)
def test_a_page_given_back_reads_as_zeros_when_touched(hosts):
    """What a guest gets touching a page it gave away (README, balloon.py):
    a zeroed page of its own memory -- never what the page held -- and its
    reservation does not grow."""
    h = hosts(HOST + _domain("t", "prefilled_toucher", 32)).start(("t",))
    r = json.loads(h.wait(lambda: _lines(h, "t", "toucher: "), 20, "the report")[-1][len("toucher: "):])
    assert r["given"] > 3000 and r["reads_zero"] and r["write_kept"] == "scribble"
    assert r["reservation_after_touch"] == r["given"]
    assert _mem_kb(h, "t") == 32 * 1024 - r["given"] * 4
    assert h.stop() == 0
    h.assert_clean()
