"""vping backend: in dom0 or a driver domain, answering on the frontend's
granted ring page.  dom0 maps the page; a driver domain may not map (the
hypervisor says EPERM) and serves the same ring through grant copies into
its own bounce pages (:mod:`xmp.drivers.grantcopy`)."""

from __future__ import annotations

import errno

from xmp.drivers import grantcopy
from xmp.drivers.vping import protocol
from xmp.drivers.xenbus.device import BackendDriver, XenbusDevice
from xmp.errors import HypercallError, RemoteProtocolError, XmpError
from xmp.sharedmem.ring import BackRing
from xmp.sharedmem.shm import PAGE_SIZE

BOUNCE_PAGES = grantcopy.bounce_pages_for(PAGE_SIZE)


class VpingBack(BackendDriver):
    devtype = "vping"

    def __init__(self, kernel) -> None:
        self.k = kernel
        self.mapping = None
        self.ring: BackRing | grantcopy.CopyBackRing | None = None
        self.port: int | None = None
        self.dev: XenbusDevice | None = None
        self.served = 0
        self.bounce: int | None = None   # first pfn of our bounce pages (copying)
        self.copies: grantcopy.CopyList | None = None

    def publish_features(self, dev: XenbusDevice) -> None:
        dev.write("feature-echo", 1)

    def connect(self, dev: XenbusDevice) -> None:
        raw_ref = dev.read_other("ring-ref") or b""
        raw_port = dev.read_other("event-channel") or b""
        if not raw_ref.isdigit() or not raw_port.isdigit():
            raise ValueError(f"vping: bad ring-ref {raw_ref!r} or event-channel {raw_port!r}")
        self.dev = dev
        try:
            mapping = self.mapping = self.k.xen.map_grant_ref(dev.otherend_id, [int(raw_ref)])
            self.ring = BackRing(mapping.pages[0], protocol.SLOT, protocol.SLOT)
        except HypercallError as exc:
            if exc.errno != errno.EPERM:
                raise
            if self.bounce is None or self.copies is None:
                self.bounce = self.k.alloc_pages(BOUNCE_PAGES)
                self.copies = grantcopy.CopyList(self.k)
            copier = grantcopy.GrantCopier(self.k, dev.otherend_id, [int(raw_ref)], self.bounce,
                                           BOUNCE_PAGES, self.copies)
            self.ring = grantcopy.CopyBackRing(copier, PAGE_SIZE, protocol.SLOT, protocol.SLOT)
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
                self.dev.fatal(str(exc))  # disconnects us (or removes the device, if its frontend has gone)

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
                pass  # the hypervisor forgot it already (the frontend's domain is gone)

    def release(self) -> None:
        if self.bounce is not None:  # copies are synchronous: none is in flight now
            self.k.free_pages(self.bounce, BOUNCE_PAGES)
            self.bounce = None
        if self.copies is not None:
            self.copies.release()
            self.copies = None


def backend(kernel) -> VpingBack:
    """One backend driver for a device of this class (the registry's factory)."""
    return VpingBack(kernel)
