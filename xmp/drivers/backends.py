"""The kernel of a driver domain that has none of its own: it serves the
backends of every split driver xmp has (every class of
:mod:`xmp.devices` with a ``backend.py``), for the devices the toolstack
gives it (``driver_domain = true``).  dom0 runs the same buses beside its
services (``xmp.dom0``)."""

from __future__ import annotations

import functools

from xmp import devices
from xmp.domain_proc.kernel import Kernel
from xmp.domain_proc.service import guard_loop
from xmp.drivers.xenbus.device import Bus, backend_bus
from xmp.xenstore.client import XsClient


def start_backends(kernel: Kernel, xs: XsClient) -> list[Bus]:
    """One backend bus per device class; the caller keeps them."""
    return [backend_bus(xs, kernel.domid, cls.devtype, functools.partial(cls.part("backend").backend, kernel))
            for cls in devices.DEVICE_CLASSES if cls.has("backend")]


def main(kernel: Kernel) -> None:
    guard_loop(kernel, kernel.name)  # one frontend's bad data must not end every device's service
    start_backends(kernel, kernel.xenstore)  # the buses live on in the xenstore client's watches
    served = " and ".join(c.devtype for c in devices.DEVICE_CLASSES if c.has("backend"))
    kernel.print(f"{kernel.name}: serving {served} backends")
    kernel.idle()
