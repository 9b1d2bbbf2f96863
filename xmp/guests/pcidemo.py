"""Drives a passed-through PCI device as a driver would: scans the bus
pcifront sees, reads the ids, sizes BAR0 (all-ones written, the size read
back), turns on memory decoding and bus mastering, enables MSI, maps BAR0,
then ``args.rounds`` times (default 3) writes data and rings the doorbell,
waits for the interrupt and checks the device's crc32 of the data.  With
``args.stay`` it idles afterwards instead of powering off."""

from __future__ import annotations

import zlib

PCI_COMMAND, BAR0 = 0x04, 0x10
REG_ID, REG_DOORBELL, REG_DONE, REG_RESULT, REG_IRQS, DATA = 0x00, 0x04, 0x08, 0x0C, 0x10, 0x100


def main(kernel) -> None:
    pci = kernel.pci(kernel.args.get("bdf", 0))
    found = pci.scan()
    kernel.print(f"pcidemo: found {', '.join(map(str, found)) or 'nothing'}")
    for bdf in found:
        drive(kernel, pci, bdf, int(kernel.args.get("rounds", 3)))
    kernel.print(f"pcidemo: done with {len(found)} device(s)")
    while kernel.args.get("stay"):
        kernel.sleep(1)


def drive(kernel, pci, bdf, rounds: int) -> None:
    vendor, device = pci.conf_read(bdf, 0, 2), pci.conf_read(bdf, 2, 2)
    address = pci.conf_read(bdf, BAR0, 4)
    pci.conf_write(bdf, BAR0, 4, 0xFFFFFFFF)
    size = (~(pci.conf_read(bdf, BAR0, 4) & 0xFFFFFFF0) + 1) & 0xFFFFFFFF
    pci.conf_write(bdf, BAR0, 4, address)
    kernel.print(f"pcidemo: {bdf} vendor {vendor:04x} device {device:04x} BAR0 {address:#x} size {size}")
    pci.conf_write(bdf, PCI_COMMAND, 2, pci.conf_read(bdf, PCI_COMMAND, 2) | 0x6)  # memory, master
    msi = pci.enable_msi(bdf)
    bar = pci.map_bar(bdf, 0)
    kernel.print(f"pcidemo: {bdf} id {bar.read32(REG_ID):#x}")
    for i in range(rounds):
        data = f"round {i} from {kernel.name}".encode() * (i + 1)
        seen = msi.count
        bar.write(DATA, data)
        bar.write32(REG_DOORBELL, len(data))
        # an interrupt handler asks the device what happened: events may be spurious
        if not msi.wait_for(lambda s=seen, n=i + 1: msi.count > s and bar.read32(REG_IRQS) == n, 10):
            raise AssertionError(f"pcidemo: no interrupt for round {i}")
        crc, done = bar.read32(REG_RESULT), bar.read32(REG_DONE)
        if crc != zlib.crc32(data) or done != i + 1:
            raise AssertionError(f"pcidemo: round {i}: the device says crc {crc:#x} after {done} "
                                 f"command(s), not {zlib.crc32(data):#x} after {i + 1}")
        kernel.print(f"pcidemo: {bdf} round {i}: interrupt {i + 1}, crc {crc:#010x} ok")
