"""PCI pass-through end to end: pciback in dom0, pcifront in guests, the
assignable set, isolation between guests, hostile ops, a guest killed
while it uses its device."""

from __future__ import annotations

import json
import os
import signal

import pytest
from xmphost import guest

pytestmark = pytest.mark.timeout(120)

DEVICES = """[host]
memory = 1024
[dom0]
memory = 64
[[host.pci]]
bdf = "0000:00:04.0"
vendor = 0x1af4
device = 0x10f0
bars = [4096, 8192]
assignable = true
[[host.pci]]
bdf = "0000:00:05.0"
vendor = 0x8086
device = 0x10d3
class = 0x020000
assignable = true
[[host.pci]]
bdf = "0000:00:06.0"
vendor = 0x10ec
device = 0x8168
"""


def kernel_table(name: str, kernel: str, **extra) -> str:
    return guest(name, "x", **extra).replace('"xmp.guests.x:main"', f'"{kernel}"')


def assignable(h) -> dict[str, int | None]:
    return {d["bdf"]: d["domid"] for d in json.loads(h.xmp("pci-assignable-list", "--json").stdout)}


def test_a_guest_enumerates_configures_maps_and_gets_interrupts(hosts):
    h = hosts(DEVICES + guest("demo", "pcidemo", pci=["0000:00:04.0"], args={"rounds": 4, "stay": True}))
    h.start(("demo",))
    h.wait(lambda: "pcidemo: done with 1 device(s)" in h.console_log("demo"), 30, "the demo")
    log = h.console_log("demo")
    assert "pcidemo: found 0000:00:04.0\n" in log                   # and nothing else on its bus
    assert "0000:00:04.0 vendor 1af4 device 10f0 BAR0 0xc2000000 size 4096" in log
    assert "id 0x584d5044" in log and "round 3: interrupt 4" in log
    xs = h.xs()
    front, back = "/local/domain/1/device/pci/0", "/local/domain/0/backend/pci/1/0"
    assert xs.read(f"{front}/magic") == b"7"
    assert xs.read(f"{front}/pci-op-ref").isdigit() and xs.read(f"{front}/event-channel").isdigit()
    assert (xs.read(f"{front}/state"), xs.read(f"{back}/state")) == (b"4", b"4")
    assert [xs.read(f"{back}/{k}") for k in ("num_devs", "dev-0", "key-0", "state-0", "root_num", "root-0")] \
        == [b"1", b"0000:00:04.0", b"0000:00:04.0", b"4", b"1", b"0000:00"]
    assert len(xs.read(f"{back}/bar-0-1").split()) == 2           # an 8 KiB BAR: two pages, two grants
    listed = json.loads(h.xmp("pci-list", "demo", "--json").stdout)
    assert [(d["name"], d["state"]) for d in listed] == [("0000:00:04.0", "4")]
    assert assignable(h) == {"0000:00:04.0": 1, "0000:00:05.0": None}
    saved = h.xmp("save", "demo", str(h.dir / "demo.save"), check=False)  # xl refuses too
    assert saved.returncode == 1
    assert "demo: PCI device 0000:00:04.0 is passed through: pci-detach it first" in saved.stderr
    assert h.info("demo") is not None                               # still running, never suspended
    assert not (h.dir / "demo.save").exists()
    h.xmp("pci-detach", "demo", "0000:00:04.0")                      # the guest lets go: Closed, removed
    assert xs.read_or(back) is None and xs.read_or(front) is None
    assert assignable(h) == {"0000:00:04.0": None, "0000:00:05.0": None}
    xs.close()
    assert h.stop() == 0
    h.assert_clean()


def test_assignable_devices_as_xl(hosts):
    h = hosts(DEVICES + guest("a", "idle") + guest("b", "idle")).start(("a", "b"))
    assert h.xmp("pci-assignable-list").stdout == "0000:00:04.0\n0000:00:05.0\n"
    refused = h.xmp("pci-attach", "a", "0000:00:06.0", check=False)
    assert refused.returncode == 1
    assert "PCI device 0000:00:06.0 is not assignable: xmp pci-assignable-add 0000:00:06.0 first" \
        in refused.stderr
    gone = h.xmp("pci-attach", "a", "0000:00:07.0", check=False)
    assert gone.returncode == 1 and "does not exist on this host" in gone.stderr
    assert h.xmp("pci-list", "a").stdout.count("\n") == 1           # the header: nothing was added
    cfg = h.dir / "c.toml"
    cfg.write_text(guest("c", "idle", pci=["0000:00:06.0"]))
    made = h.xmp("create", str(cfg), check=False)                  # a new guest: refused before it is built
    assert made.returncode == 1 and "0000:00:06.0 is not assignable" in made.stderr
    assert h.info("c") is None
    h.xmp("pci-assignable-add", "00:06.0")
    assert "0000:00:06.0" in h.xmp("pci-assignable-list").stdout
    again = h.xmp("pci-assignable-add", "0000:00:06.0", check=False)
    assert again.returncode == 1 and "already assignable" in again.stderr
    h.xmp("pci-attach", "a", "0000:00:06.0")
    taken = h.xmp("pci-attach", "b", "0000:00:06.0", check=False)  # one device, one guest
    assert taken.returncode == 1 and "already assigned to dom1" in taken.stderr
    busy = h.xmp("pci-assignable-remove", "0000:00:06.0", check=False)
    assert busy.returncode == 1 and "assigned to dom1: pci-detach it first" in busy.stderr
    xs = h.xs()
    h.wait(lambda: xs.read_or("/local/domain/0/backend/pci/1/0/state") == b"2", 10, "pciback InitWait")
    h.xmp("pci-detach", "a", "0000:00:06.0", "--force")
    assert assignable(h)["0000:00:06.0"] is None
    h.xmp("pci-attach", "b", "0000:00:06.0")                        # now b may have it
    assert assignable(h)["0000:00:06.0"] == 2
    h.xmp("pci-detach", "b", "0000:00:06.0", "--force")
    h.xmp("pci-assignable-remove", "0000:00:06.0")
    assert h.xmp("pci-assignable-list").stdout == "0000:00:04.0\n0000:00:05.0\n"
    xs.close()
    assert h.stop() == 0
    h.assert_clean()


def test_a_guest_reaches_nothing_it_was_not_given_and_pciback_serves_on(hosts):
    h = hosts(DEVICES + kernel_table("user", "pcikernels:hammer", pci=["0000:00:04.0"],
                                    args={"bdf": "0000:00:04.0"}))
    h.start(("user",))
    h.wait(lambda: "hammer: 20 rounds" in h.console_log("user"), 30, "the user's rounds")
    xs = h.xs()
    grefs = xs.read("/local/domain/0/backend/pci/1/0/bar-0-0").decode().split()
    cfg = h.dir / "hostile.toml"
    cfg.write_text(kernel_table("hostile", "pcikernels:hostile", pci=["0000:00:05.0"],
                               args={"own": "0000:00:05.0", "other": "0000:00:04.0", "grefs": grefs}))
    h.xmp("create", str(cfg))
    h.wait(lambda: "hostile: done" in h.console_log("hostile"), 30, "the hostile guest")
    said = dict(line.removeprefix("hostile: ").split(" ", 1) for line in h.console_log("hostile").splitlines()
                if line.startswith("hostile: ") and line != "hostile: done")
    assert said == {
        "scan": "['0000:00:05.0']",
        "other-read": "XEN_PCI_ERR_dev_not_found", "other-write": "XEN_PCI_ERR_dev_not_found",
        "other-msi": "XEN_PCI_ERR_dev_not_found", "other-bar": "XEN_PCI_ERR_dev_not_found",
        "bad-cmd": "not_implemented", "huge-cmd": "not_implemented", "msix": "not_implemented",
        "past-end": "invalid_offset", "unaligned": "invalid_offset", "size-3": "invalid_offset",
        "negative": "invalid_offset", "segment": "dev_not_found", "devfn": "dev_not_found",
        "own-read": "8086",
        **{f"gref-{ref}": "GNTST_permission_denied" for ref in grefs},
    }
    n = h.console_log("user").count("hammer:")
    h.wait(lambda: h.console_log("user").count("hammer:") > n + 1, 20, "the user to go on")
    xs.close()
    assert h.stop() == 0
    h.assert_clean()


def test_a_guest_killed_mid_op_frees_its_device(hosts):
    h = hosts(DEVICES + guest("bystander", "idle")  # keeps the host up once the user is gone
              + kernel_table("user", "pcikernels:hammer", pci=["0000:00:04.0"], args={"bdf": "0000:00:04.0"}))
    h.start(("bystander", "user"))
    h.wait(lambda: "hammer: 20 rounds" in h.console_log("user"), 30, "the rounds")
    os.kill(h.domain_pid("user"), signal.SIGKILL)                   # always inside an op or a command
    h.wait(lambda: h.info("user") is None, 20, "the killed guest to go")
    xs = h.xs()
    h.wait(lambda: xs.read_or("/local/domain/0/backend/pci/2") is None, 10, "its backend directory to go")
    assert assignable(h)["0000:00:04.0"] is None                     # assignable again, nobody's
    cfg = h.dir / "next.toml"
    cfg.write_text(guest("next", "pcidemo", pci=["0000:00:04.0"], args={"rounds": 2, "stay": True}))
    h.xmp("create", str(cfg))
    # a reset device: its command count starts again (pcidemo checks it), BAR0 at its place
    h.wait(lambda: "pcidemo: done with 1 device(s)" in h.console_log("next"), 30, "the next guest")
    assert "BAR0 0xc2000000 size 4096" in h.console_log("next")
    assert "Traceback" not in h.dmesg() and "Traceback" not in h.output()
    xs.close()
    assert h.stop() == 1  # a guest crashed (SIGKILL) with on_crash = destroy: xmp run says so
    h.assert_clean()


def test_a_frontend_publishing_garbage_is_closed_and_others_are_served(hosts):
    h = hosts(DEVICES + kernel_table("user", "pcikernels:hammer", pci=["0000:00:04.0"],
                                     args={"bdf": "0000:00:04.0"}) + guest("liar", "idle"))
    h.start(("user", "liar"))
    h.wait(lambda: "hammer: 20 rounds" in h.console_log("user"), 30, "the user's rounds")
    h.xmp("pci-attach", "liar", "0000:00:05.0")
    xs = h.xs()
    front, back = "/local/domain/2/device/pci/0", "/local/domain/0/backend/pci/2/0"
    h.wait(lambda: xs.read_or(f"{back}/state") == b"2", 10, "pciback InitWait")
    # written here as if by the idle guest's pcifront: a wrong magic, then a ref that grants nothing
    for key, value in (("pci-op-ref", "8"), ("event-channel", "1"), ("magic", "6"), ("state", "3")):
        xs.write(f"{front}/{key}", value)
    h.wait(lambda: xs.read_or(f"{back}/state") == b"5", 10, "the bad device to close")
    assert b"magic b'6', not '7'" in xs.read(f"{back}/error")
    n = h.console_log("user").count("hammer:")
    h.wait(lambda: h.console_log("user").count("hammer:") > n + 1, 20, "the good one to go on")
    assert "Traceback" not in h.output()
    xs.close()
    assert h.stop() == 0
    h.assert_clean()
