"""vping backend: in dom0 (or a trusted driver domain), answering on the
frontend's granted ring page."""

from __future__ import annotations

from xmp.drivers.vping import protocol
from xmp.drivers.xenbus.device import BackendDriver, XenbusDevice
from xmp.errors import RemoteProtocolError, XmpError
from xmp.sharedmem.ring import BackRing


class VpingBack(BackendDriver):
    devtype = "vping"

    def __init__(self, kernel) -> None:
        self.k = kernel
        self.mapping = None
        self.ring: BackRing | None = None
        self.port: int | None = None
        self.dev: XenbusDevice | None = None
        self.served = 0

    def publish_features(self, dev: XenbusDevice) -> None:
        dev.write("feature-echo", 1)

    def connect(self, dev: XenbusDevice) -> None:
        raw_ref = dev.read_other("ring-ref") or b""
        raw_port = dev.read_other("event-channel") or b""
        if not raw_ref.isdigit() or not raw_port.isdigit():
            raise ValueError(f"vping: bad ring-ref {raw_ref!r} or event-channel {raw_port!r}")
        self.dev = dev
        mapping = self.mapping = self.k.xen.map_grant_ref(dev.otherend_id, [int(raw_ref)])
        self.ring = BackRing(mapping.pages[0], protocol.SLOT, protocol.SLOT)
        self.port = self.k.xen.bind_interdomain(dev.otherend_id, int(raw_port))
        self.k.loop.bind(self.port, self._event)

    def _event(self, _port: int) -> None:
        ring = self.ring
        if ring is None:
            return
        try:
            while True:
                reqs = ring.get_requests()
                if reqs:
                    ring.put_responses(b"".join(protocol.answer(reqs[i:i + protocol.SLOT])
                                                for i in range(0, len(reqs), protocol.SLOT)))
                    self.served += len(reqs) // protocol.SLOT
                    if ring.push_responses_and_check_notify() and self.port is not None:
                        self.k.xen.notify(self.port)
                    continue
                if not ring.final_check_for_requests():
                    return
        except RemoteProtocolError as exc:  # a broken frontend: close its device, serve the rest
            if self.dev is not None:
                self.dev.fatal(str(exc))  # disconnects us (or removes the device)

    def disconnect(self, dev: XenbusDevice) -> None:
        if self.port is not None:
            self.k.close_port(self.port)
            self.port = None
        if self.ring is not None:
            self.ring.release()
            self.ring = None
        if self.mapping is not None:
            mapping, self.mapping = self.mapping, None
            try:
                self.k.xen.unmap_grant_ref(mapping)
            except XmpError:
                pass  # the supervisor forgot it already (the frontend's domain is gone)
