"""The guest's control driver against the in-memory store: its posted
boot-time requests, what it does when xenstored refuses one, and the
toolstack's control/shutdown and control/sysrq requests, as Linux's
drivers/xen/manage.c answers them -- no processes."""

from __future__ import annotations

import threading

import pytest

from xmp.domain_proc.control import SYSRQ_HELP, ControlDriver
from xmp.testing import settle, store_client
from xmp.xenstore.server import Quota, XenStore

pytestmark = pytest.mark.timeout(10)


def guest_store(quota: Quota | None = None):
    store = XenStore(quota_overrides={3: quota} if quota else None)
    dom0 = store_client(store, 0, privileged=True)
    for key in ("control/shutdown", "control/feature-poweroff", "control/feature-reboot",
                "control/feature-suspend"):
        dom0.write(f"/local/domain/3/{key}", "")
        dom0.set_perms(f"/local/domain/3/{key}", ["n3"])
    return store, dom0, store_client(store, 3)


def test_a_refused_shutdown_watch_is_told_on_the_console():
    _store, _dom0, xs = guest_store(Quota(watches=0))
    said: list[str] = []
    shutdowns: list[str] = []
    ControlDriver(xs, shutdowns.append, said.append)
    xs.pump_nowait()
    assert said == ["xen:manage: Failed to set shutdown watcher (E2BIG): "
                    "control/shutdown requests will not be seen",
                    "xen:manage: Failed to set sysrq watcher (E2BIG): control/sysrq keys will not be seen"]
    assert xs.posted_errors == []  # told, not also kept for the next call
    assert xs.read("control/feature-poweroff") == b"1"  # the other posts went through


def test_the_control_driver_acts_on_control_shutdown():
    _store, dom0, xs = guest_store()
    said: list[str] = []
    shutdowns: list[str] = []
    ControlDriver(xs, shutdowns.append, said.append)
    settle(xs)
    dom0.write("/local/domain/3/control/shutdown", "reboot")
    settle(xs)
    assert shutdowns == ["reboot"]
    assert dom0.read("/local/domain/3/control/shutdown") == b""  # acknowledged
    assert said == []


@pytest.fixture
def world():
    store = XenStore()
    tool = store_client(store, 0, privileged=True)
    tool.mkdir("/local/domain/1")
    tool.set_perms("/local/domain/1", ["n0", "r1"])
    for key in ("shutdown", "sysrq", "feature-poweroff", "feature-reboot", "feature-suspend"):
        tool.write(f"/local/domain/1/control/{key}", "")
        tool.set_perms(f"/local/domain/1/control/{key}", ["n1"])
    guest = store_client(store, 1)
    ends, said = [], []
    ControlDriver(guest, ends.append, said.append)
    settle(guest)
    return tool, guest, ends, said


def test_features_are_advertised(world):
    tool, *_ = world
    assert [tool.read(f"/local/domain/1/control/feature-{f}") for f in ("poweroff", "reboot", "suspend")] == \
        [b"1"] * 3


@pytest.mark.parametrize(("key", "said", "end"), [
    ("b", ["sysrq: Resetting"], ["reboot"]),
    ("o", ["sysrq: Power Off"], ["poweroff"]),
    ("c", ["sysrq: Trigger a crash", "Kernel panic - not syncing: sysrq triggered crash"], ["crash"]),
    ("h", [SYSRQ_HELP], []),
    ("z", [SYSRQ_HELP], []),  # no handler: Linux prints its help
])
def test_a_sysrq_key_is_taken_cleared_and_acted_on(world, key, said, end):
    tool, guest, ends, lines = world
    tool.write("/local/domain/1/control/sysrq", key)
    settle(guest)
    assert tool.read("/local/domain/1/control/sysrq") == b""
    assert (lines, ends) == (said, end)


def test_sysrq_t_shows_this_threads_stack(world):
    tool, guest, ends, lines = world
    tool.write("/local/domain/1/control/sysrq", "t")
    settle(guest)
    assert lines[0] == "sysrq: Show State"
    assert f"task:{threading.current_thread().name}" in lines  # xdist runs tests off the main thread
    assert any("in test_sysrq_t_shows_this_threads_stack" in ln for ln in lines) and ends == []


def test_clearing_and_the_first_event_do_nothing(world):
    tool, guest, ends, lines = world
    tool.write("/local/domain/1/control/sysrq", "")
    settle(guest)
    assert (lines, ends) == ([], [])


def test_shutdown_is_acknowledged_then_done(world):
    tool, guest, ends, lines = world
    tool.write("/local/domain/1/control/shutdown", "poweroff")
    settle(guest)
    assert tool.read("/local/domain/1/control/shutdown") == b"" and ends == ["poweroff"]
    tool.write("/local/domain/1/control/shutdown", "dance")  # not a request it knows: left alone
    settle(guest)
    assert tool.read("/local/domain/1/control/shutdown") == b"dance" and ends == ["poweroff"]
