"""The kernel of a driver domain that has none of its own: it serves the
backends of every split driver xmp has, for the devices the toolstack
gives it (``driver_domain = true``).  dom0 runs the same buses beside its
services (``xmp.dom0``)."""

from __future__ import annotations

from xmp.domain_proc.kernel import Kernel
from xmp.drivers.blk.backend import BlkBack
from xmp.drivers.vping.backend import VpingBack
from xmp.drivers.xenbus.device import Bus, backend_bus
from xmp.xenstore.client import XsClient


def start_backends(kernel: Kernel, xs: XsClient) -> list[Bus]:
    # A removed device's frontend domain is forgotten: its RAM and event
    # objects are closed once nothing here maps them (in dom0 xenconsoled and
    # xenstored may still, for a while).
    forget = kernel.xen.forget_domain
    return [backend_bus(xs, kernel.domid, "vbd", lambda: BlkBack(kernel), forget),
            backend_bus(xs, kernel.domid, "vping", lambda: VpingBack(kernel), forget)]


def main(kernel: Kernel) -> None:
    kernel.backends = start_backends(kernel, kernel.xenstore)  # type: ignore[attr-defined]
    kernel.print(f"{kernel.name}: serving vbd and vping backends")
    kernel.idle()
