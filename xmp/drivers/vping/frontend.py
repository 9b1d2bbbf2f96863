"""vping frontend: in a guest, over the guest's own memory and event loop."""

from __future__ import annotations

from xmp.drivers.vping import protocol
from xmp.drivers.xenbus.device import FrontendDriver, XenbusDevice, attach_frontend
from xmp.sharedmem.ring import FrontRing


class VpingFront(FrontendDriver):
    devtype = "vping"

    def __init__(self, kernel) -> None:
        self.k = kernel
        self.pfn = kernel.alloc_pages(1, driver=True)  # the ring page, kept across reconnections
        self.ring: FrontRing | None = None
        self.gref: int | None = None
        self.port: int | None = None
        self.connected_once = False
        self.is_connected = False
        self.answers: dict[int, bytes] = {}
        self.in_flight: dict[int, bytes] = {}  # sent, not answered: re-issued after a reconnection
        self.next_id = 1

    def setup(self, dev: XenbusDevice) -> None:
        self.k.grant_table.retry_deferred()
        page = self.k.page(self.pfn)
        page[:] = bytes(len(page))
        self.ring = FrontRing(page, protocol.SLOT, protocol.SLOT)
        self.gref = self.k.grant_table.grant_foreign_access(dev.otherend_id, self.pfn)
        self.port = self.k.xen.alloc_unbound(dev.otherend_id)
        self.k.loop.bind(self.port, self._event)
        dev.write("ring-ref", self.gref)
        dev.write("event-channel", self.port)

    def connected(self, dev: XenbusDevice) -> None:
        self.is_connected = self.connected_once = True
        if self.in_flight:  # the backend restarted under them: send them again
            self._send([self.in_flight[i] for i in sorted(self.in_flight)])

    def disconnect(self, dev: XenbusDevice) -> None:
        self.is_connected = False
        if self.port is not None:
            self.k.close_port(self.port)
            self.port = None
        if self.ring is not None:
            self.ring.release()
            self.ring = None
        if self.gref is not None:
            self.k.grant_table.end_foreign_access_later(self.gref)
            self.gref = None

    def _event(self, _port: int) -> None:
        if self.ring is None:
            return
        while True:
            rsps = self.ring.get_responses()
            for i in range(0, len(rsps), protocol.SLOT):
                rsp = rsps[i:i + protocol.SLOT]
                req_id = protocol.HEADER.unpack_from(rsp)[0]
                if self.in_flight.pop(req_id, None) is not None:  # a late duplicate is dropped
                    self.answers[req_id] = rsp[8:]
            if not self.ring.final_check_for_responses():
                return

    def ping(self, data: bytes, timeout: float = 5.0) -> bytes:
        """Send one request and wait for its answer."""
        self.k.loop.run_until(lambda: self.is_connected, timeout)
        if self.ring is None or self.port is None:
            raise TimeoutError("vping: not connected")
        req_id = self.next_id
        self.next_id += 1
        self.in_flight[req_id] = protocol.request(req_id, data)
        self._send([self.in_flight[req_id]])
        if not self.k.loop.run_until(lambda: req_id in self.answers, timeout):
            raise TimeoutError(f"vping: no answer to request {req_id}")
        return self.answers.pop(req_id)

    def _send(self, requests: list[bytes]) -> None:
        if self.ring is None or self.port is None:
            return  # not connected: connected() sends what is in flight
        for req in requests:
            self.ring.put_request(req)
        if self.ring.push_requests_and_check_notify():
            self.k.xen.notify(self.port)


def attach(kernel, devid: int = 0) -> VpingFront:
    """Start the vping frontend bus (once per guest) and return device
    ``devid``'s driver once the toolstack has created it."""
    return attach_frontend(kernel, "vping", VpingFront, devid, 10.0, connected=False)[1]


def open(kernel, ref: str | int = 0) -> VpingFront:
    """``kernel.vping(devid)``."""
    return attach(kernel, int(ref))
