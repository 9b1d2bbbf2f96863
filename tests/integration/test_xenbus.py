"""A split driver end to end: the vping frontend in a guest, its backend in
dom0, the handshake through xenstored, requests over a granted ring."""

from __future__ import annotations

import os
import signal

import pytest
from xmphost import HOST, guest

from xmp.toolstack.xs import device_tree
from xmp.xenstore.client import SocketTransport, XsClient

pytestmark = pytest.mark.timeout(120)


def add_device(h, front: int, devid: int = 0, **front_keys: str) -> XsClient:
    """Act as the toolstack: write both directories of a vping device."""
    xs = XsClient(SocketTransport.connect(str(h.rundir / "xenstored.sock")))
    for op, payload in device_tree(front, 0, "vping", devid, front_keys=front_keys):
        xs.request(op, payload)
    return xs


def test_vping_handshake_and_traffic(hosts):
    h = hosts(HOST + guest("pinger", "pinger", args={"count": 200, "forever": True})).start(("pinger",))
    xs = add_device(h, 1)
    h.wait(lambda: "pinger: 200 pings verified" in h.console_log("pinger"), 30, "the pings")
    assert xs.read("/local/domain/1/device/vping/0/state") == b"4"       # Connected
    assert xs.read("/local/domain/0/backend/vping/1/0/state") == b"4"
    assert xs.read("/local/domain/0/backend/vping/1/0/feature-echo") == b"1"
    assert xs.read("/local/domain/1/device/vping/0/ring-ref").isdigit()
    xs.close()
    assert h.stop() == 0
    h.assert_clean()


def test_a_hostile_frontend_is_closed_and_others_are_served(hosts):
    h = hosts(HOST + guest("pinger", "pinger", args={"count": 10, "forever": True})
              + guest("victim", "idle")).start(("pinger", "victim"))
    xs = add_device(h, 1)
    h.wait(lambda: "pinger: 10 pings verified" in h.console_log("pinger"), 30, "the pings")
    # a "frontend" (written here as if by the idle guest) publishing garbage
    add_device(h, 2).close()
    xs.write("/local/domain/2/device/vping/0/ring-ref", "garbage")
    xs.write("/local/domain/2/device/vping/0/event-channel", "1")
    xs.write("/local/domain/2/device/vping/0/state", "3")
    h.wait(lambda: xs.read("/local/domain/0/backend/vping/2/0/state") == b"5", 10, "the bad device to close")
    assert b"bad ring-ref" in xs.read("/local/domain/0/backend/vping/2/0/error")
    n = h.console_log("pinger").count("more pings verified")
    h.wait(lambda: h.console_log("pinger").count("more pings verified") > n + 1, 20, "the good one to go on")
    assert "failed" not in h.dmesg()  # no dom0 service fell over
    xs.close()
    assert h.stop() == 0
    h.assert_clean()


def test_device_survives_a_backend_domain_restart(hosts):
    dd = ('[[domain]]\nname = "dd"\nmemory = 32\n'  # no kernel: a driver domain runs xmp.drivers.backends
          'driver_domain = true\ntrusted_backend = true\non_crash = "restart"\n')
    h = hosts(HOST + dd + guest("pinger", "pinger", args={"count": 20, "forever": True, "interval": 0.02}))
    h.start(("dd", "pinger"))
    from xmp.cli import request

    request(h.rundir, "device-attach", dom="pinger", backend="dd", type="vping", devid=0)
    h.wait(lambda: "pinger: 20 pings verified" in h.console_log("pinger"), 30, "pings through dd")
    old = h.info("dd")["domid"]
    os.kill(h.domain_pid("dd"), signal.SIGKILL)
    h.wait(lambda: (h.info("dd") or {}).get("domid", old) != old, 10, "dd to restart")
    n = h.console_log("pinger").count("more pings verified")
    h.wait(lambda: h.console_log("pinger").count("more pings verified") > n + 2, 30,
           "pings through the restarted dd")
    new = h.info("dd")["domid"]
    assert f"vping 0 of dom2: backend now dom{new}" in h.dmesg()
    assert "Traceback" not in h.console_log("pinger")  # no error, no lost answer
    assert h.info("pinger")["state"] == "running"
    assert h.stop() == 0  # dd crashed, but its policy restarted it: not a failure
    h.assert_clean()
