"""pci: PCI pass-through -- pciback in dom0 hands a host PCI device (simulated
in dom0: :mod:`xmp.drivers.pci.device`) to a guest's pcifront over the one
shared page of ``io/pciif.h``."""
