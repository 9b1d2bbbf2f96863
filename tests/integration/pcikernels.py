"""Guest kernels of the PCI pass-through tests (imported by the domains
through PYTHONPATH, as kernels.py)."""

from __future__ import annotations

import zlib

from xmp.drivers.grantcopy import CopyList
from xmp.drivers.pci.protocol import Op, PciErr, PciOp, PciOpError, parse_bdf
from xmp.errors import GNTST_NAMES, XmpError
from xmp.guests.pcidemo import DATA, PCI_COMMAND, REG_DOORBELL, REG_IRQS, REG_RESULT


def hammer(kernel) -> None:
    """Use device ``args.bdf`` without end: a command and its interrupt per
    round, every answer checked; ``hammer: N rounds`` every 20."""
    pci = kernel.pci(kernel.args["bdf"])
    bdf = parse_bdf(kernel.args["bdf"])
    pci.conf_write(bdf, PCI_COMMAND, 2, 0x6)
    msi = pci.enable_msi(bdf)
    bar = pci.map_bar(bdf, 0)
    n = 0
    while True:
        data = f"{kernel.name} {n}".encode()
        bar.write(DATA, data)
        bar.write32(REG_DOORBELL, len(data))
        if not msi.wait_for(lambda k=n + 1: bar.read32(REG_IRQS) == k, 10):
            raise AssertionError(f"hammer: no interrupt in round {n}")
        if bar.read32(REG_RESULT) != zlib.crc32(data):
            raise AssertionError(f"hammer: round {n}: wrong crc")
        n += 1
        if n % 20 == 0:
            kernel.print(f"hammer: {n} rounds")


def _err(fn) -> str:
    try:
        fn()
    except PciOpError as exc:
        return f"XEN_PCI_ERR_{PciErr(exc.err).name.lower()}"
    except XmpError as exc:
        return type(exc).__name__
    return "ok"


def hostile(kernel) -> None:
    """Given device ``args.own``, reach for ``args.other`` (not given) every
    way a guest can, and send pciback malformed ops; print what each got."""
    pci = kernel.pci(kernel.args["own"])
    own, other = parse_bdf(kernel.args["own"]), parse_bdf(kernel.args["other"])
    out = [f"scan {[str(b) for b in pci.scan()]}",
           f"other-read {_err(lambda: pci.conf_read(other, 0, 2))}",
           f"other-write {_err(lambda: pci.conf_write(other, 4, 2, 6))}",
           f"other-msi {_err(lambda: pci.enable_msi(other))}",
           f"other-bar {_err(lambda: pci.map_bar(other, 0))}"]
    raw = [("bad-cmd", Op(99, 0, own.domain, own.bus, own.devfn, 0, 4)),
           ("huge-cmd", Op(0xFFFFFFFF, 0, own.domain, own.bus, own.devfn, 0, 4)),
           ("msix", Op(PciOp.ENABLE_MSIX, 0, own.domain, own.bus, own.devfn)),
           ("past-end", Op(PciOp.CONF_READ, 0, own.domain, own.bus, own.devfn, 0xFE, 4)),
           ("unaligned", Op(PciOp.CONF_READ, 0, own.domain, own.bus, own.devfn, 2, 4)),
           ("size-3", Op(PciOp.CONF_WRITE, 0, own.domain, own.bus, own.devfn, 0, 3, 1)),
           ("negative", Op(PciOp.CONF_READ, 0, own.domain, own.bus, own.devfn, -4, 4)),
           ("segment", Op(PciOp.CONF_READ, 0, 0xFFFFFFFF, own.bus, own.devfn, 0, 2)),
           ("devfn", Op(PciOp.CONF_READ, 0, own.domain, own.bus, 0x12345, 0, 2))]
    for name, op in raw:
        answer = pci.do_op(op)
        out.append(f"{name} {PciErr(answer.err).name.lower()}")
    out.append(f"own-read {pci.conf_read(own, 0, 2):04x}")
    # the other guest's BAR pages, by their grant refs (the test read them from xenstore)
    copies, bounce = CopyList(kernel), kernel.alloc_pages(1)
    for ref in kernel.args.get("grefs", []):
        copies.copy_in(0, int(ref), 0, bounce, 0, 16)
        out.append(f"gref-{ref} {GNTST_NAMES[copies.run()[0]]}")
    for line in out:
        kernel.print(f"hostile: {line}")
    kernel.print("hostile: done")
    while True:
        kernel.sleep(1)
