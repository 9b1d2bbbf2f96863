"""A driver domain's kernel: serves vping backends for the devices the
toolstack gives it (``driver_domain = true``, ``trusted_backend = true``)."""

from xmp.drivers.vping.backend import VpingBack
from xmp.drivers.xenbus.device import backend_bus


def main(kernel) -> None:
    kernel.vping_backends = backend_bus(kernel.xenstore, kernel.domid, "vping", lambda: VpingBack(kernel))
    kernel.print(f"{kernel.name}: serving vping backends")
    kernel.idle()
