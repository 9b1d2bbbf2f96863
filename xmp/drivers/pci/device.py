"""A PCI device simulated in dom0: what pciback hands to a guest.

Its configuration space is a type-0 header as PCI Local Bus 3.0 lays it
out, 256 bytes, with a write mask per byte so that it answers as hardware
does: read-only fields ignore writes, a BAR keeps only its address bits (so
writing all-ones and reading back gives ``~(size - 1)``, the sizing every
OS does), the command register keeps its defined bits::

    0x00 vendor id      0x02 device id      0x04 command (rw)  0x06 status
    0x08 revision       0x09 class code (3) 0x0c cache line (rw) 0x0d latency (rw)
    0x0e header type 0  0x10-0x27 BAR0-5 (32-bit memory, non-prefetchable)
    0x2c subsystem vendor / id  0x34 capabilities -> 0x50
    0x3c interrupt line (rw)    0x3d interrupt pin
    0x50 MSI capability (id 5): control, address, data -- virtualised by
         pciback (XEN_PCI_OP_enable_msi), read-only to the guest

Every device behaves as xmp's test device, whatever ids the topology gives
it; BAR0 holds its registers and each BAR is backed by whole pages of dom0's
memory (the page the guest reaches through a grant)::

    BAR0 + 0x00  u32 ID        0x584d5044 ("DPMX" in memory: xmp's device)
           0x04  u32 DOORBELL  the guest writes n (1..DATA_MAX); on the device's
                               next look it takes DATA[:n], writes RESULT, clears it
           0x08  u32 DONE      commands completed
           0x0c  u32 RESULT    crc32 of the last command's data
           0x10  u32 IRQS      interrupts raised
           0x100 DATA          the command's bytes

A command completes only while memory decoding (command bit 1) is on, and
raises an interrupt only with bus mastering (bit 2) and MSI enabled.  Sans
I/O: the BAR memory and the interrupt are injected.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from xmp.drivers.pci.protocol import CONFIG_SPACE, Bdf

PCI_COMMAND = 0x04
PCI_STATUS = 0x06
PCI_BASE_ADDRESS_0 = 0x10
PCI_CAPABILITY_LIST = 0x34
PCI_INTERRUPT_LINE = 0x3c
PCI_INTERRUPT_PIN = 0x3d
MSI_CAP = 0x50
PCI_CAP_ID_MSI = 0x05
PCI_STATUS_CAP_LIST = 0x10
PCI_COMMAND_IO, PCI_COMMAND_MEMORY, PCI_COMMAND_MASTER = 0x1, 0x2, 0x4
PCI_COMMAND_INTX_DISABLE = 0x400
COMMAND_WRITABLE = 0x0547  # io, memory, master, parity, serr, intx-disable
MSI_FLAGS_ENABLE = 0x1
MAX_BARS = 6

DEVICE_ID = 0x584D5044
REG_ID, REG_DOORBELL, REG_DONE, REG_RESULT, REG_IRQS = 0x00, 0x04, 0x08, 0x0C, 0x10
DATA = 0x100
DATA_MAX = 4096 - DATA
_U32 = struct.Struct("<I")


@dataclass(frozen=True)
class DeviceModel:
    """What the topology says of one host device (``[[host.pci]]``)."""

    bdf: Bdf
    vendor: int
    device: int
    class_code: int = 0xFF0000       # unclassified
    revision: int = 1
    bars: tuple[int, ...] = (4096,)  # memory BAR sizes in bytes: powers of two, whole pages
    pin: int = 1                     # INTA#; 0: none

    def bar_address(self, i: int) -> int:
        """Where firmware put BAR ``i`` (size-aligned, each device its own 1 MiB)."""
        slot = ((self.bdf.bus << 8) | self.bdf.devfn) << 20
        return (0xC0000000 + slot + i * 0x20000) & 0xFFFFFFFF & ~(self.bars[i] - 1)


class ConfigSpace:
    """The 256 bytes and their write masks."""

    def __init__(self, model: DeviceModel):
        self.model = model
        self.data = bytearray(CONFIG_SPACE)
        self.mask = bytearray(CONFIG_SPACE)
        d = self.data
        struct.pack_into("<HH", d, 0, model.vendor, model.device)
        struct.pack_into("<H", d, PCI_STATUS, PCI_STATUS_CAP_LIST)
        d[8] = model.revision
        d[9:12] = model.class_code.to_bytes(3, "little")
        struct.pack_into("<HH", d, 0x2C, model.vendor, model.device)
        d[PCI_CAPABILITY_LIST] = MSI_CAP
        d[PCI_INTERRUPT_PIN] = model.pin
        d[MSI_CAP] = PCI_CAP_ID_MSI
        self._writable(PCI_COMMAND, 2, COMMAND_WRITABLE)
        self._writable(0x0C, 2, 0xFFFF)
        self._writable(PCI_INTERRUPT_LINE, 1, 0xFF)
        for i, size in enumerate(model.bars):
            _U32.pack_into(d, PCI_BASE_ADDRESS_0 + 4 * i, model.bar_address(i))
            self._writable(PCI_BASE_ADDRESS_0 + 4 * i, 4, ~(size - 1) & 0xFFFFFFF0)

    def _writable(self, offset: int, size: int, bits: int) -> None:
        self.mask[offset:offset + size] = (bits & ((1 << 8 * size) - 1)).to_bytes(size, "little")

    def read(self, offset: int, size: int) -> int:
        return int.from_bytes(self.data[offset:offset + size], "little")

    def write(self, offset: int, size: int, value: int) -> None:
        """Only the writable bits change (a checked, aligned access)."""
        for i, byte in enumerate((value & ((1 << 8 * size) - 1)).to_bytes(size, "little")):
            m = self.mask[offset + i]
            self.data[offset + i] = (self.data[offset + i] & ~m & 0xFF) | (byte & m)

    @property
    def command(self) -> int:
        return self.read(PCI_COMMAND, 2)

    def bar(self, i: int) -> int:
        return self.read(PCI_BASE_ADDRESS_0 + 4 * i, 4) & 0xFFFFFFF0

    def set_msi(self, enabled: bool) -> None:
        """pciback's view of the MSI capability (the guest cannot write it)."""
        flags = self.read(MSI_CAP + 2, 2)
        self.data[MSI_CAP + 2:MSI_CAP + 4] = ((flags | MSI_FLAGS_ENABLE) if enabled
                                              else (flags & ~MSI_FLAGS_ENABLE)).to_bytes(2, "little")

    @property
    def msi_enabled(self) -> bool:
        return bool(self.read(MSI_CAP + 2, 2) & MSI_FLAGS_ENABLE)


class PciDevice:
    """One device: its configuration space, its BARs' memory (one buffer
    per BAR, injected) and its interrupt (``raise_irq()``, injected)."""

    def __init__(self, model: DeviceModel, bars: Sequence[memoryview], raise_irq: Callable[[], None]):
        if len(bars) != len(model.bars):
            raise ValueError("one buffer per BAR")
        self.model = model
        self.config = ConfigSpace(model)
        self.bars = list(bars)
        self.raise_irq = raise_irq
        self.reset()

    def reset(self) -> None:
        """A function-level reset, as pciback does before a device changes
        hands: fresh configuration space, BAR memory cleared."""
        self.config = ConfigSpace(self.model)
        for bar in self.bars:
            bar[:] = bytes(len(bar))
        if self.bars:
            _U32.pack_into(self.bars[0], REG_ID, DEVICE_ID)

    def kick(self) -> bool:
        """The device looks at its doorbell (the guest's MMIO write reached
        it); True if it completed a command."""
        if not self.bars or not self.config.command & PCI_COMMAND_MEMORY:
            return False
        regs = self.bars[0]
        n = _U32.unpack_from(regs, REG_DOORBELL)[0]
        if n == 0:
            return False
        _U32.pack_into(regs, REG_DOORBELL, 0)
        n = min(n, DATA_MAX, len(regs) - DATA)
        _U32.pack_into(regs, REG_RESULT, zlib.crc32(regs[DATA:DATA + n]))
        _U32.pack_into(regs, REG_DONE, (_U32.unpack_from(regs, REG_DONE)[0] + 1) & 0xFFFFFFFF)
        if self.config.command & PCI_COMMAND_MASTER and self.config.msi_enabled:
            _U32.pack_into(regs, REG_IRQS, (_U32.unpack_from(regs, REG_IRQS)[0] + 1) & 0xFFFFFFFF)
            self.raise_irq()
        return True
