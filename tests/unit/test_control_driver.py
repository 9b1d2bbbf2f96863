"""The guest's control driver against the in-memory store: its posted
boot-time requests, and what it does when xenstored refuses one."""

from __future__ import annotations

import pytest

from xmp.domain_proc.control import ControlDriver
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
                    "control/shutdown requests will not be seen"]
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
