"""The watch-driven xenbus runner and the driver API.

A split driver is a protocol module plus two classes::

    class PingFront(FrontendDriver):
        def setup(self, dev): ...        # make ring + evtchn, dev.write("ring-ref", ...)
        def connected(self, dev): ...    # the device is usable
        def disconnect(self, dev): ...   # drop ring / evtchn; keep what must be re-issued

    class PingBack(BackendDriver):
        def publish_features(self, dev): ...   # dev.write("feature-x", "1")
        def connect(self, dev): ...            # dev.read_other("ring-ref"), map, bind
        def disconnect(self, dev): ...

A :class:`XenbusDevice` is one end of one device: it watches the other
end's ``state``, asks the pure state machine (``state.py``) what to do, has
the driver do it, and publishes its own new state.  A :class:`Bus` finds
devices: a frontend bus watches ``device/<type>`` in the guest's own
directory, a backend bus ``backend/<type>`` in the backend domain's.

The xenstore client is injected (a guest's ring client, dom0's in-process
client, or a socket in tests); watch callbacks run where the client
dispatches them -- in a domain, its event loop.
"""

from __future__ import annotations

import functools
import itertools
import weakref
from collections.abc import Callable
from typing import Any, TypeVar, cast

from xmp.drivers.xenbus.state import Act, XenbusState, backend_step, frontend_step, parse_state
from xmp.errors import XenStoreError, XmpError
from xmp.xenstore.client import XsClient

_tokens = itertools.count(1)


class FrontendDriver:
    devtype = ""

    def setup(self, dev: XenbusDevice) -> None:
        raise NotImplementedError

    def connected(self, dev: XenbusDevice) -> None:
        pass

    def disconnect(self, dev: XenbusDevice) -> None:
        pass

    def release(self) -> None:
        """The device is gone from xenstore: give back what it held."""


class BackendDriver:
    devtype = ""

    def publish_features(self, dev: XenbusDevice) -> None:
        pass

    def connect(self, dev: XenbusDevice) -> None:
        raise NotImplementedError

    def disconnect(self, dev: XenbusDevice) -> None:
        pass

    def release(self) -> None:
        """The device is gone from xenstore: give back what it held."""


class XenbusDevice:
    def __init__(self, xs: XsClient, nodename: str, driver: FrontendDriver | BackendDriver):
        self.xs = xs
        self.nodename = nodename
        self.driver = driver
        self.frontend = isinstance(driver, FrontendDriver)
        other = "backend" if self.frontend else "frontend"
        self.otherend = xs.read(f"{nodename}/{other}").decode()
        self.otherend_id = int(xs.read(f"{nodename}/{other}-id"))
        self.state = parse_state(xs.read_or(f"{nodename}/state"))
        self.error: str | None = None
        self.data: dict = {}  # the driver's per-device state
        self.removed = False
        self._seen_otherend = False  # we have read the other end's state at least once
        self.on_removed: Callable[[XenbusDevice], None] | None = None  # the bus forgets it
        self._token = f"xenbus-{next(_tokens)}"
        xs.on_watch(self._token, lambda _path: self.changed())
        xs.watch(f"{self.otherend}/state", self._token)  # fires once now
        self._other_key = f"{nodename}/{other}"
        self._online_token = self._move_token = ""
        if not self.frontend:
            # The toolstack unplugs a device by writing online = 0 (xl block-detach).
            self._online_token = f"xenbus-online-{next(_tokens)}"
            xs.on_watch(self._online_token, lambda _path: self._online_changed())
            xs.watch(f"{nodename}/online", self._online_token)
        if self.frontend:
            # The toolstack may move the device to a restarted backend domain.
            self._move_token = f"xenbus-move-{next(_tokens)}"
            xs.on_watch(self._move_token, lambda _path: self._otherend_moved())
            xs.watch(self._other_key, self._move_token)

    # -- what drivers use ----------------------------------------------------

    def read(self, key: str) -> bytes:
        return self.xs.read(f"{self.nodename}/{key}")

    def write(self, key: str, value: str | int) -> None:
        self.xs.write(f"{self.nodename}/{key}", str(value))

    def read_other(self, key: str, default: bytes | None = None) -> bytes | None:
        return self.xs.read_or(f"{self.otherend}/{key}", default)

    def other_state(self) -> XenbusState:
        return parse_state(self.xs.read_or(f"{self.otherend}/state"))

    # -- the machine ---------------------------------------------------------

    def _otherend_moved(self) -> None:
        path = (self.xs.read_or(self._other_key) or b"").decode()
        if not path or path == self.otherend:
            return
        self._xs_try(lambda: self.xs.unwatch(f"{self.otherend}/state", self._token))
        # Start over, and only then let the new backend read us: seeing our
        # old state (Initialised) with the old ring's keys, it would connect
        # to a ring granted to someone else, fail, and close the device.
        if self.state != XenbusState.INITIALISING:
            self._xs_try(functools.partial(self.driver.disconnect, self))
            self.switch(XenbusState.INITIALISING)
        self.otherend = path
        self._seen_otherend = False
        self.otherend_id = int(self.xs.read(f"{self.nodename}/backend-id"))
        # Our nodes let the old backend read them: let the new one instead.
        perms = [self.xs.get_perms(self.nodename)[0], f"r{self.otherend_id}"]
        for node in self._subtree(self.nodename):  # queue-N/ directories too
            self._xs_try(functools.partial(self.xs.set_perms, node, perms))
        self.xs.watch(f"{self.otherend}/state", self._token)  # its first event runs the machine

    def _subtree(self, path: str) -> list[str]:
        nodes = [path]
        try:
            children = self.xs.directory(path)
        except (XmpError, ValueError):
            return nodes
        for child in children:
            nodes += self._subtree(f"{path}/{child}")
        return nodes

    def _online_changed(self) -> None:
        if self.xs.read_or(f"{self.nodename}/online") != b"0" or self.state == XenbusState.CLOSED:
            return
        self._xs_try(functools.partial(self.driver.disconnect, self))
        # With a connected frontend, close and let it follow; otherwise nobody is there to wait for.
        connected = self._xs_try_value(self.other_state) == XenbusState.CONNECTED
        self.switch(XenbusState.CLOSING if connected else XenbusState.CLOSED)

    def _xs_try_value(self, fn):
        try:
            return fn()
        except (XmpError, ValueError):
            return None

    def changed(self) -> None:
        if self.removed:
            return
        try:
            other = self.other_state()
        except XenStoreError as exc:
            if self.frontend and not (exc.errno == "EACCES" and self._seen_otherend):
                return  # not readable (yet): the next event retries
            # A backend need not see its frontend to publish its features and
            # wait (InitWait); the frontend may not have let it read yet.  An
            # end that could read the other and no longer may finds it gone
            # (see _otherend_vanished): Unknown, as if it read nothing.
            other = XenbusState.UNKNOWN
        if other != XenbusState.UNKNOWN:
            self._seen_otherend = True
        elif not self.frontend and self._otherend_vanished():
            self.frontend_gone()
            return
        step = frontend_step(self.state, other) if self.frontend else backend_step(self.state, other)
        try:
            for act in step.actions:
                self._do(act)
        except (XmpError, ValueError) as exc:
            # the other end's garbage or a failure here: this process goes on
            # serving its other devices
            self.fatal(str(exc))
            return
        if step.switch_to is not None:
            self.switch(step.switch_to)

    def _do(self, act: Act) -> None:
        d = self.driver
        if act == Act.PUBLISH_FEATURES and isinstance(d, BackendDriver):
            d.publish_features(self)
        elif act == Act.CONNECT and isinstance(d, BackendDriver):
            d.connect(self)
        elif act == Act.SETUP and isinstance(d, FrontendDriver):
            d.setup(self)
        elif act == Act.CONNECTED and isinstance(d, FrontendDriver):
            d.connected(self)
        elif act == Act.DISCONNECT:
            d.disconnect(self)

    def switch(self, state: XenbusState) -> None:
        if state == self.state or self.removed:
            return
        self.state = state
        self.xs.write(f"{self.nodename}/state", str(int(state)))

    def start(self) -> None:
        """Kick the machine once (a backend publishes its features at once)."""
        self.changed()

    @staticmethod
    def _xs_try(fn: Callable[[], object]) -> None:
        try:
            fn()
        except (XmpError, ValueError):
            pass

    def fatal(self, message: str) -> None:
        """xenbus_dev_fatal: the driver cannot go on serving the device (the
        other end's garbage, or our own failure): disconnect, say why in
        ``error`` and close.  Never raises.  A backend whose frontend has
        gone meanwhile (a ring that fails because its domain died, before
        the watch says so) removes the device instead: writing there would
        make nodes again in a directory the toolstack has just removed (dom0
        may write anywhere), or be refused (a driver domain)."""
        if self.removed:
            return
        if not self.frontend and self._otherend_vanished():
            self.frontend_gone()
            return
        self.error = message
        self._xs_try(lambda: self.write("error", message[:200]))
        self._xs_try(functools.partial(self.driver.disconnect, self))
        self._xs_try(functools.partial(self.switch, XenbusState.CLOSING))

    def _otherend_vanished(self) -> bool:
        """Is the other end's directory gone?  The toolstack writes the
        frontend's directory before the backend's, so a backend that finds
        none finds one that was there and is no more.  An unprivileged
        backend asking for a node that has gone is told EACCES when the
        nearest node left is not its to read (C xenstored hides what
        exists): once it has read the frontend, that is gone too -- a
        frontend that locks its backend out cannot be served either.
        Before that, EACCES is a frontend that has not let it read yet."""
        try:
            return self.xs.read_or(self.otherend) is None
        except XenStoreError as exc:
            return exc.errno == "EACCES" and self._seen_otherend
        except (XmpError, ValueError):
            return False

    def frontend_gone(self) -> None:
        """The frontend's directory has vanished -- its domain died (RELEASE
        deletes what it owned) or it was unplugged: give back everything we
        hold of it and remove our own directory, as xen-blkback does when
        its frontend turns XenbusStateUnknown.  The toolstack removes the
        directory too (libxl does); doing it here as well keeps a toolstack
        that does not from filling this domain's xenstore quota."""
        if self.removed:
            return
        self.remove()
        self._xs_try(lambda: self.xs.rm(self.nodename))

    def remove(self) -> None:
        """Stop serving the device and give back everything it holds: the
        driver unmaps its grants (persistent ones too) and closes its ports,
        the watches go, the driver is released and the bus told (once; later
        calls do nothing)."""
        if self.removed:
            return
        self.removed = True
        try:
            self.driver.disconnect(self)
        except Exception as exc:  # a dead peer's leftovers must not stop the rest of the clean-up
            print(f"xenbus: {self.nodename}: disconnect on removal failed: {exc!r}", flush=True)
        self.close()
        self.driver.release()
        if self.on_removed is not None:
            self.on_removed(self)

    def close(self) -> None:
        """Drop this device's watches.  Their callbacks become no-ops rather
        than going: the client keeps events whose token has no callback."""
        watches = [(f"{self.otherend}/state", self._token), (f"{self.nodename}/online", self._online_token),
                   (self._other_key, self._move_token)]
        for path, token in watches:
            if token:
                self._xs_try(functools.partial(self.xs.unwatch, path, token))
                self.xs.on_watch(token, _ignore)


def _ignore(_path: str) -> None:
    pass


class Bus:
    """Finds the devices of one type under ``root`` and runs them."""

    def __init__(self, xs: XsClient, root: str, driver_factory: Callable[[], FrontendDriver | BackendDriver],
                 depth: int):
        self.xs = xs
        self.root = root
        self.factory = driver_factory
        self.depth = depth  # 1: device/<type>/<devid>; 2: backend/<type>/<frontid>/<devid>
        self.devices: dict[str, XenbusDevice] = {}
        self._frontend_introduced: dict[str, bool] = {}  # a backend device's node -> its frontend's, at first
        self._token = f"xenbus-bus-{next(_tokens)}"
        xs.on_watch(self._token, self._changed)
        xs.watch(root, self._token)
        if depth == 2:
            # A frontend domain released: its devices go even if no watch on its
            # directory fired.  Only a privileged backend (dom0) gets these events
            # (XSA-115); a driver domain sees the frontend's directory vanish.
            self._release_token = f"xenbus-release-{next(_tokens)}"
            xs.on_watch(self._release_token, lambda _path: self._domain_released())
            try:
                xs.watch("@releaseDomain", self._release_token)
            except XenStoreError:
                pass  # the frontend-state watches still see frontends go

    def _introduced(self, domid: int) -> bool | None:
        try:
            return self.xs.is_domain_introduced(domid)
        except (XmpError, ValueError):
            return None  # not ours to ask (unprivileged)

    def _domain_released(self) -> None:
        # Only a frontend domain that was introduced when its device came and
        # is not now has gone (one never introduced -- a test's, dom0 -- stays).
        for node, was in list(self._frontend_introduced.items()):
            dev = self.devices.get(node)
            if dev is None:
                self._frontend_introduced.pop(node, None)
            elif was and self._introduced(dev.otherend_id) is False:
                dev.frontend_gone()

    def _removed(self, dev: XenbusDevice) -> None:
        if self.devices.get(dev.nodename) is dev:
            del self.devices[dev.nodename]
        self._frontend_introduced.pop(dev.nodename, None)

    def _changed(self, path: str) -> None:
        """A watch event under the root.  As Linux's xenbus_dev_changed, only
        the device the path names is looked at: a key written inside a known
        device (netback's statistics, every tick) costs nothing.  A full
        scan for each made a busy dom0 fall behind its own writes, its
        start-up waiting beneath the dispatch for ever."""
        parts = path[len(self.root):].strip("/").split("/") if path.startswith(self.root + "/") else []
        if len(parts) <= self.depth:  # the root, a frontend's directory, a device's: made or removed
            self._scan_guarded()
            return
        node = "/".join([self.root, *parts[:self.depth]])
        if node not in self.devices:
            self._scan_guarded(lambda: self._consider(node))

    def _scan_guarded(self, scan: Callable[[], object] | None = None) -> None:
        try:
            (scan or self.scan)()
        except XenStoreError:
            pass  # half-written by the toolstack: the next event brings the rest

    def _nodes(self) -> list[str]:
        level = [self.root]
        for _ in range(self.depth):
            nxt = []
            for path in level:
                try:
                    nxt += [f"{path}/{name}" for name in self.xs.directory(path)]
                except XenStoreError:
                    pass
            level = nxt
        return level

    def scan(self) -> None:
        present = set()
        for node in self._nodes():
            present.add(node)
            self._consider(node)
        for node in [n for n in self.devices if n not in present]:
            self.devices[node].remove()

    def _consider(self, node: str) -> None:
        """Start serving ``node`` if it is new and complete (it has a state)."""
        if node in self.devices or self.xs.read_or(f"{node}/state") is None:
            return
        try:
            dev = XenbusDevice(self.xs, node, self.factory())
        except (XenStoreError, ValueError, MemoryError):
            return  # half-written by the toolstack: the next event brings the rest
        self.devices[node] = dev
        dev.on_removed = self._removed
        if not dev.frontend:
            self._frontend_introduced[node] = bool(self._introduced(dev.otherend_id))
        dev.start()


def frontend_bus(xs: XsClient, devtype: str, factory: Callable[[], FrontendDriver]) -> Bus:
    return Bus(xs, f"device/{devtype}", factory, 1)


Front = TypeVar("Front", bound=FrontendDriver)
# a guest kernel's frontend buses, one per device type it has opened
_frontend_buses: weakref.WeakKeyDictionary[Any, dict[str, Bus]] = weakref.WeakKeyDictionary()


def attach_frontend(kernel: Any, devtype: str, driver: type[Front], devid: int, timeout: float, *,
                    connected: bool = True) -> tuple[Bus, Front]:
    """A guest's device ``device/<devtype>/<devid>``: start the guest's bus
    for ``devtype`` (once), wait until the toolstack has created the device
    (and, with ``connected``, until its driver has connected) and return the
    bus and the driver -- what every frontend's ``open`` does."""
    buses = _frontend_buses.setdefault(kernel, {})
    bus = buses.get(devtype)
    if bus is None:
        make = cast(Callable[[Any], Front], driver)   # a frontend driver is made from its kernel
        bus = buses[devtype] = frontend_bus(kernel.xenstore, devtype, lambda: make(kernel))
    node = f"device/{devtype}/{devid}"

    def ready() -> bool:
        dev = bus.devices.get(node)
        return dev is not None and isinstance(dev.driver, driver) \
            and (not connected or bool(getattr(dev.driver, "is_connected", False)))

    if not kernel.loop.run_until(ready, timeout):
        raise TimeoutError(f"{devtype} {devid}: no {'connected ' if connected else ''}{node}")
    front = bus.devices[node].driver
    assert isinstance(front, driver)
    return bus, front


def backend_bus(xs: XsClient, backend_domid: int, devtype: str,
                factory: Callable[[], BackendDriver]) -> Bus:
    return Bus(xs, f"/local/domain/{backend_domid}/backend/{devtype}", factory, 2)
