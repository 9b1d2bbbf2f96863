"""The xenbus runner over the real (in-memory) xenstore: a frontend in dom1
and a backend in dom0 reach Connected, close, and reconnect when the
backend starts over -- no processes, two connections to one store."""

from __future__ import annotations

import pytest

from xmp.drivers.xenbus.device import BackendDriver, FrontendDriver, XenbusDevice, backend_bus, frontend_bus
from xmp.drivers.xenbus.state import XenbusState
from xmp.errors import RemoteProtocolError, XenStoreError
from xmp.testing import settle, store_client
from xmp.toolstack.xs import device_tree, move_backend_tree
from xmp.xenstore.server import XenStore
from xmp.xenstore.wire import PacketParser, XsType

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


class BackWithParams(Back):
    """A backend that needs a toolstack key to publish its features (blkback's ``params``)."""

    def publish_features(self, dev):
        self.log.append(f"back params={dev.read('params').decode()}")
        super().publish_features(dev)


def _one_by_one(tool, reqs, *clients):
    """Apply the toolstack's requests one at a time, both ends running in between:
    each end sees every intermediate xenstore a burst split by the socket can show."""
    for op, payload in reqs:
        tool.request(op, payload)
        settle(*clients)


def test_no_end_acts_on_a_half_written_device_directory():
    store = XenStore()
    tool = store_client(store, 0, privileged=True)
    # as the domain builder leaves them
    for domid, path in ((1, "/local/domain/1/device"), (2, "/local/domain/2")):
        tool.mkdir(path)
        tool.set_perms(path, [f"n{domid}"])
    guest, back2 = store_client(store, 1), store_client(store, 2)
    back = store_client(store, 0, privileged=True)
    log: list[str] = []
    backend_bus(back, 0, "vtest", lambda: BackWithParams(log))
    fbus = frontend_bus(guest, "vtest", lambda: Front(log))
    _one_by_one(tool, device_tree(1, 0, "vtest", 0, {"params": "/img"}, {"virtual-device": "0"}), guest, back)
    assert states(tool) == (S.CONNECTED, S.CONNECTED)
    assert log == ["back params=/img", "front setup", "back connect ring-ref=8", "front connected"]

    # The backend's domain restarts as dom2: the device moves there, request by request.
    log.clear()
    backend_bus(back2, 2, "vtest", lambda: BackWithParams(log))
    _one_by_one(tool, move_backend_tree(1, 2, "vtest", 0, {"params": "/img"}), guest, back2)
    new_back = "/local/domain/2/backend/vtest/1/0"
    assert [int(tool.read(f"{node}/state")) for node in (FRONT, new_back)] == [S.CONNECTED, S.CONNECTED]
    assert tool.read_or(f"{new_back}/error") is None
    assert log == ["back params=/img", "front disconnect", "front setup", "back connect ring-ref=8",
                   "front connected"]
    assert fbus.devices["device/vtest/0"].otherend == new_back


class GrantingFront(Front):
    """Its ring is granted to one backend domain: ring-ref names that domain."""

    def setup(self, dev):
        dev.write("ring-ref", 100 + dev.otherend_id)
        dev.write("event-channel", 3)
        self.log.append(f"front setup for dom{dev.otherend_id}")


class CheckingBack(Back):
    def connect(self, dev):
        mine = int(dev.nodename.split("/")[3])
        ring = int(dev.read_other("ring-ref"))
        if ring != 100 + mine:  # blkback's map or copy of a ring granted to another domain fails
            raise ValueError(f"ring-ref {ring} is not granted to dom{mine}")
        self.log.append(f"back{mine} connect")


def test_a_moved_frontend_starts_over_before_the_new_backend_can_read_it(world):
    store, tool, guest, back = world
    tool.mkdir("/local/domain/2")
    tool.set_perms("/local/domain/2", ["n2"])
    back2 = store_client(store, 2)
    log: list[str] = []
    frontend_bus(guest, "vtest", lambda: GrantingFront(log))
    # dom0's backend published its features and went InitWait; the frontend set up
    # for it (Initialised) -- and then dom0's backend died before connecting.
    tool.write(f"{BACK}/feature-echo", "1")
    tool.write(f"{BACK}/state", "2")
    settle(guest)
    assert int(tool.read(f"{FRONT}/state")) == S.INITIALISED
    backend_bus(back2, 2, "vtest", lambda: CheckingBack(log))
    # The new backend runs whenever the frontend lets it read (the frontend's
    # set_perms), as two processes would: it must then see a frontend starting over.
    set_perms = guest.set_perms

    def set_perms_then_run_backend(path, perms):
        set_perms(path, perms)
        settle(back2)

    guest.set_perms = set_perms_then_run_backend
    for op, payload in move_backend_tree(1, 2, "vtest", 0):
        tool.request(op, payload)
        settle(guest, back2)
    new_back = "/local/domain/2/backend/vtest/1/0"
    assert tool.read_or(f"{new_back}/error") is None
    assert [int(tool.read(f"{node}/state")) for node in (FRONT, new_back)] == [S.CONNECTED, S.CONNECTED]
    assert log == ["front setup for dom0", "front disconnect", "front setup for dom2", "back2 connect",
                   "front connected"]


# -- a frontend that goes: the backend gives everything back and leaves no node ----------

class ReleasingBack(Back):
    def release(self):
        self.log.append("back release")


def _watch_paths(store, domid):
    return sorted(w.path for c in store.connections.values() if c.domid == domid for w in c.watches)


def test_a_released_frontend_domain_leaves_nothing_in_its_backend(world):
    store, tool, guest, back = world
    tool.introduce(1, 1, 1)
    log: list[str] = []
    bus = backend_bus(back, 0, "vtest", lambda: ReleasingBack(log))
    frontend_bus(guest, "vtest", lambda: Front(log))
    settle(guest, back)
    assert states(tool) == (S.CONNECTED, S.CONNECTED)
    watching = _watch_paths(store, 0)
    log.clear()
    tool.release(1)  # the guest died: xenstored deletes what it owned (its frontend directory)
    settle(back)
    assert log == ["back disconnect", "back release"]
    assert bus.devices == {}
    # its directory is gone (the <frontid> one above it is the toolstack's to remove)
    assert tool.directory("/local/domain/0/backend/vtest/1") == []
    # the device's watches went with it (the online one leaked before); the bus's own stay
    assert set(watching) - set(_watch_paths(store, 0)) == {f"{FRONT}/state", f"{BACK}/online"}
    assert _watch_paths(store, 0) == ["/local/domain/0/backend/vtest", "@releaseDomain"]


def test_a_frontend_directory_removed_while_its_domain_lives_unplugs_the_device(world):
    store, tool, guest, back = world
    log: list[str] = []
    backend_bus(back, 0, "vtest", lambda: ReleasingBack(log))
    frontend_bus(guest, "vtest", lambda: Front(log))
    settle(guest, back)
    log.clear()
    tool.rm(FRONT)  # xl block-detach --force, or a guest removing its own device
    settle(guest, back)
    assert [e for e in log if e.startswith("back")] == ["back disconnect", "back release"]
    assert tool.read_or(BACK) is None


def test_a_driver_domain_sees_its_frontend_go_although_it_may_not_read_what_is_left():
    store = XenStore()
    tool = store_client(store, 0, privileged=True)
    for domid, path in ((1, "/local/domain/1/device"), (2, "/local/domain/2")):
        tool.mkdir(path)
        tool.set_perms(path, [f"n{domid}"])
    tool.introduce(1, 1, 1)
    guest, drv = store_client(store, 1), store_client(store, 2)
    tool.mkdir("/local/domain/2/backend/vtest/1")  # (dom2's here, as it owns its directory)
    owned_before = store.store.owned[2]
    log: list[str] = []
    bus = backend_bus(drv, 2, "vtest", lambda: ReleasingBack(log))
    frontend_bus(guest, "vtest", lambda: Front(log))
    _one_by_one(tool, device_tree(1, 2, "vtest", 0), guest, drv)
    back = "/local/domain/2/backend/vtest/1/0"
    assert [int(tool.read(f"{n}/state")) for n in (FRONT, back)] == [S.CONNECTED, S.CONNECTED]
    log.clear()
    tool.release(1)
    # an unprivileged reader of the vanished frontend is told EACCES (/local/domain/1 is not its)
    with pytest.raises(XenStoreError) as err:
        drv.read(f"{FRONT}/state")
    assert err.value.errno == "EACCES"
    settle(drv)
    assert log == ["back disconnect", "back release"] and bus.devices == {}
    assert tool.directory("/local/domain/2/backend/vtest/1") == []
    assert store.store.owned[2] == owned_before  # its quota usage is back where it was


class _DeadRing:
    """A ring whose frontend's domain has died: every copy from it fails."""

    def get_requests(self):
        raise RemoteProtocolError("bad frontend: grant copy of ring page 0 (gref 8) failed: GNTST_bad_domain")

    def release(self):
        pass


class _Kernel:
    def __init__(self):
        self.closed: list[int] = []

    def close_port(self, port):
        self.closed.append(port)


@pytest.mark.parametrize("frontend_alive", [True, False])
def test_blkback_failing_on_a_dead_frontends_ring_makes_no_node_again(world, frontend_alive):
    """An event on a ring whose frontend died is served before the watches
    say the domain has gone: the failure must not write error/state into the
    directory the toolstack has just removed (dom0 may write anywhere, and the
    nodes would stay), nor raise out of the event loop."""
    from xmp.drivers.blk.backend import BlkBack, _Queue

    store, tool, guest, back = world
    tool.write(f"{FRONT}/state", "4")
    tool.write(f"{BACK}/state", "4")
    k = _Kernel()
    blk = BlkBack(k)
    dev = XenbusDevice(back, BACK, blk)
    q = _Queue(0, _DeadRing(), 17)  # type: ignore[arg-type]
    blk.dev, blk.queues = dev, [q]
    if not frontend_alive:
        tool.introduce(1, 1, 1)
        tool.release(1)  # as the toolstack's teardown does, before the backend's watches run
        tool.rm("/local/domain/0/backend/vtest/1")
    blk._event(q)
    assert k.closed == [17] and blk.queues == []
    if frontend_alive:
        assert b"GNTST_bad_domain" in tool.read(f"{BACK}/error")
        assert int(tool.read(f"{BACK}/state")) == S.CLOSING
    else:
        assert tool.read_or("/local/domain/0/backend/vtest/1") is None
        assert dev.removed


def test_a_frontend_whose_backend_domain_has_gone_disconnects_and_waits():
    """Its backend's directory went with its domain: a frontend that could
    read it and now is told EACCES (the nearest node left is not its to
    read) sees Unknown and disconnects, as for a vanished backend."""
    store = XenStore()
    tool = store_client(store, 0, privileged=True)
    for domid, path in ((1, "/local/domain/1/device"), (2, "/local/domain/2")):
        tool.mkdir(path)
        tool.set_perms(path, [f"n{domid}"])
    guest, back2 = store_client(store, 1), store_client(store, 2)
    log: list[str] = []
    backend_bus(back2, 2, "vtest", lambda: Back(log))
    frontend_bus(guest, "vtest", lambda: Front(log))
    _one_by_one(tool, device_tree(1, 2, "vtest", 0), guest, back2)
    assert int(tool.read(f"{FRONT}/state")) == S.CONNECTED
    log.clear()
    tool.rm("/local/domain/2")  # dom2 died: its backend directory went with it
    settle(guest)
    assert log == ["front disconnect"] and int(tool.read(f"{FRONT}/state")) == S.INITIALISING


class _ToolstackXs:
    """The toolstack's xenstore connection, straight into a real store."""

    def __init__(self, client):
        self.client = client

    def send(self, reqs, what, done=None):
        for op, payload in reqs:
            self.client.request(op, payload)


def test_teardown_removes_every_backend_frontid_directory_of_the_dead_domain():
    """libxl removes ``backend/<type>/<frontid>`` itself: the dead domain's
    directories go in every backend domain, nobody else's."""
    from types import SimpleNamespace

    from xmp import devices
    from xmp.devices import DeviceSpec
    from xmp.toolstack.devices import Device, DeviceManager
    from xmp.toolstack.domains import DomainRecord

    store = XenStore()
    tool = store_client(store, 0, privileged=True)
    vbd, vping = devices.by_devtype("vbd"), devices.by_devtype("vping")
    devs = [Device(3, 0, vbd, DeviceSpec(51712, "xvda", None)),
            Device(3, 2, vbd, DeviceSpec(51728, "xvdb", "s")),
            Device(3, 2, vping, DeviceSpec(0, "0", "s")),
            Device(4, 0, vbd, DeviceSpec(51712, "xvda", None))]
    for dev in devs:
        tool.write(f"{dev.back_path}/state", "4")
    ts = SimpleNamespace(xs=_ToolstackXs(tool))
    DeviceManager(ts).forget(DomainRecord(3, None, devs[:3]))  # type: ignore[arg-type]
    assert tool.directory("/local/domain/0/backend/vbd") == ["4"]
    assert tool.read("/local/domain/0/backend/vbd/4/51712/state") == b"4"
    assert tool.directory("/local/domain/2/backend/vbd") == []
    assert tool.directory("/local/domain/2/backend/vping") == []


def test_keys_written_inside_a_known_device_cost_its_bus_no_scan(world):
    """netback writes its statistics into its own device every tick; each
    write fires the bus's watch on backend/<type>.  A full scan for each
    (directories of every frontend, a read of every state) made dom0 fall
    behind its own writes (net.toml's guests, under load)."""
    store, tool, guest, back = world
    log: list[str] = []
    bus = backend_bus(back, 0, "vtest", lambda: Back(log))
    frontend_bus(guest, "vtest", lambda: Front(log))
    settle(guest, back)
    assert states(tool) == (S.CONNECTED, S.CONNECTED)
    sent: list[XsType] = []
    parser, send = PacketParser(), back.t.send

    def counting(data: bytes, timeout: float | None = None) -> None:
        sent.extend(XsType(p.type) for p in parser.feed(data))
        send(data, timeout)

    back.t.send = counting  # type: ignore[method-assign]
    for i in range(50):
        back.write(f"{BACK}/statistics/rx_packets", str(i))
    settle(guest, back)
    assert sent.count(XsType.WRITE) == 50
    assert XsType.DIRECTORY not in sent and XsType.READ not in sent, sorted({t.name for t in sent})
    # a device removed still goes
    tool.rm(f"{BACK}")
    settle(guest, back)
    assert bus.devices == {}
