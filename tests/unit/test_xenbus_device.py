"""The xenbus runner over the real (in-memory) xenstore: a frontend in dom1
and a backend in dom0 reach Connected, close, and reconnect when the
backend starts over -- no processes, two connections to one store."""

from __future__ import annotations

import pytest

from xmp.drivers.xenbus.device import BackendDriver, FrontendDriver, XenbusDevice, backend_bus, frontend_bus
from xmp.drivers.xenbus.state import XenbusState
from xmp.testing import settle, store_client
from xmp.xenstore.server import XenStore

S = XenbusState
FRONT, BACK = "/local/domain/1/device/vtest/0", "/local/domain/0/backend/vtest/1/0"


class Front(FrontendDriver):
    def __init__(self, log):
        self.log = log

    def setup(self, dev):
        assert dev.read_other("feature-echo") == b"1"
        dev.write("ring-ref", 8)
        dev.write("event-channel", 3)
        self.log.append("front setup")

    def connected(self, dev):
        self.log.append("front connected")

    def disconnect(self, dev):
        self.log.append("front disconnect")


class Back(BackendDriver):
    def __init__(self, log):
        self.log = log

    def publish_features(self, dev):
        dev.write("feature-echo", 1)

    def connect(self, dev):
        ring = dev.read_other("ring-ref")
        if ring is None or not ring.isdigit():
            raise ValueError(f"bad ring-ref {ring!r}")
        self.log.append(f"back connect ring-ref={int(ring)}")

    def disconnect(self, dev):
        self.log.append("back disconnect")


@pytest.fixture
def world():
    store = XenStore()
    tool = store_client(store, 0, privileged=True)
    # the toolstack makes both directories (perms first: their nodes inherit them),
    # each end owning its own and the other end allowed to read it
    tool.mkdir(BACK)
    tool.set_perms(BACK, ["n0", "r1"])
    tool.write(f"{BACK}/frontend", FRONT)
    tool.write(f"{BACK}/frontend-id", "1")
    tool.write(f"{BACK}/state", "1")
    tool.mkdir("/local/domain/1/device")  # as the domain builder leaves it: the guest's
    tool.set_perms("/local/domain/1/device", ["n1"])
    tool.mkdir(FRONT)
    tool.set_perms(FRONT, ["n1", "r0"])
    tool.write(f"{FRONT}/backend", BACK)
    tool.write(f"{FRONT}/backend-id", "0")
    tool.write(f"{FRONT}/state", "1")
    guest = store_client(store, 1)
    back = store_client(store, 0, privileged=True)
    return store, tool, guest, back


def states(tool):
    return int(tool.read(f"{FRONT}/state")), int(tool.read(f"{BACK}/state"))


def test_handshake_reaches_connected_through_xenstore(world):
    store, tool, guest, back = world
    log: list[str] = []
    backend_bus(back, 0, "vtest", lambda: Back(log))
    frontend_bus(guest, "vtest", lambda: Front(log))
    settle(guest, back)
    assert states(tool) == (S.CONNECTED, S.CONNECTED)
    assert log == ["front setup", "back connect ring-ref=8", "front connected"]
    assert tool.read(f"{BACK}/feature-echo") == b"1"


def test_backend_starting_over_reconnects_the_frontend(world):
    store, tool, guest, back = world
    log: list[str] = []
    bus = backend_bus(back, 0, "vtest", lambda: Back(log))
    frontend_bus(guest, "vtest", lambda: Front(log))
    settle(guest, back)
    # a new backend takes over the device (its domain restarted): it starts from Initialising
    bus.devices[BACK].close()
    tool.write(f"{BACK}/state", "1")
    fresh = XenbusDevice(back, BACK, Back(log))
    log.clear()
    fresh.start()
    settle(guest, back)
    assert states(tool) == (S.CONNECTED, S.CONNECTED)
    assert log == ["front disconnect", "front setup", "back connect ring-ref=8", "front connected"]


def test_frontend_closing_closes_both(world):
    store, tool, guest, back = world
    log: list[str] = []
    backend_bus(back, 0, "vtest", lambda: Back(log))
    fbus = frontend_bus(guest, "vtest", lambda: Front(log))
    settle(guest, back)
    fbus.devices["device/vtest/0"].switch(S.CLOSING)
    settle(guest, back)
    assert states(tool) == (S.CLOSED, S.CLOSED)
    assert "back disconnect" in log


def test_garbage_from_the_frontend_closes_only_that_device(world):
    store, tool, guest, back = world
    log: list[str] = []
    backend_bus(back, 0, "vtest", lambda: Back(log))
    guest.write(f"{FRONT}/ring-ref", "not-a-number")
    guest.write(f"{FRONT}/state", "3")  # Initialised, with garbage published
    settle(guest, back)
    assert int(tool.read(f"{BACK}/state")) == S.CLOSING
    assert b"bad ring-ref" in tool.read(f"{BACK}/error")
