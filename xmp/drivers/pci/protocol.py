"""pciif's wire format (``xen/include/public/io/pciif.h``), sans I/O.

One page, granted by the frontend, holds ``struct xen_pci_sharedinfo``::

    0    u32 flags            _XEN_PCIF_active (0)  an op is waiting (front sets, back clears)
                              _XEN_PCIB_AERHANDLER (1)  the front has an AER handler
                              _XEN_PCIB_active (2)  an AER op is waiting (back sets)
    4    struct xen_pci_op    u32 cmd, i32 err, u32 domain, u32 bus, u32 devfn,
                              i32 offset, i32 size, u32 value, u32 info,
                              struct xen_msix_entry {u16 vector, u16 entry} [128]
    552  struct xen_pcie_aer_op  u32 cmd, i32 err, u32 domain, u32 bus, u32 devfn

One op at a time, as pcifront's do_pci_op: the frontend writes ``op``, sets
``_XEN_PCIF_active`` and notifies; the backend copies ``op`` out once,
answers it (``err`` one of XEN_PCI_ERR_*, ``value`` the result), and only
then clears the bit and notifies back.  The flag word is read and written
with acquire / release (the C fast path), so ``op`` is always complete on
the side that sees the bit change.

xenstore (``docs/misc/xenstore-paths.pandoc``, libxl_pci.c, xen-pcifront /
xen-pciback): frontend ``pci-op-ref``, ``event-channel``, ``magic`` =
``XEN_PCI_MAGIC``; backend ``num_devs``, ``dev-N`` / ``key-N`` (the BDF),
``vdevfn-N``, ``opts-N``, ``state-N``, and, once connected, ``root_num`` /
``root-N`` (the buses the frontend scans).
"""

from __future__ import annotations

import enum
import re
import struct
from dataclasses import dataclass

from xmp.errors import RemoteProtocolError, XmpError
from xmp.sharedmem._ffi import ffi, lib

XEN_PCI_MAGIC = "7"

_XEN_PCIF_active = 0
XEN_PCIF_active = 1 << _XEN_PCIF_active
_XEN_PCIB_AERHANDLER = 1
XEN_PCIB_AERHANDLER = 1 << _XEN_PCIB_AERHANDLER
_XEN_PCIB_active = 2
XEN_PCIB_active = 1 << _XEN_PCIB_active


class PciOp(enum.IntEnum):
    CONF_READ = 0
    CONF_WRITE = 1
    ENABLE_MSI = 2
    DISABLE_MSI = 3
    ENABLE_MSIX = 4
    DISABLE_MSIX = 5
    AER_DETECTED = 6
    AER_RESUME = 7
    AER_MMIO = 8
    AER_SLOTRESET = 9
    ENABLE_MULTI_MSI = 10


class PciErr(enum.IntEnum):
    SUCCESS = 0
    DEV_NOT_FOUND = -1
    INVALID_OFFSET = -2
    ACCESS_DENIED = -3
    NOT_IMPLEMENTED = -4
    OP_FAILED = -5       # the backend failed to complete the operation


SH_INFO_MAX_VEC = 128
OP = struct.Struct("<IiIIIiiII")          # xen_pci_op without its msix_entries
MSIX_ENTRY = struct.Struct("<HH")
OP_SIZE = OP.size + SH_INFO_MAX_VEC * MSIX_ENTRY.size
FLAGS_OFFSET = 0
OP_OFFSET = 4
AER_OP = struct.Struct("<IiIII")
AER_OP_OFFSET = OP_OFFSET + OP_SIZE
SHAREDINFO_SIZE = AER_OP_OFFSET + AER_OP.size

CONFIG_SPACE = 256  # conventional PCI configuration space: what pciback serves


@dataclass(frozen=True)
class Op:
    cmd: int
    err: int = 0
    domain: int = 0
    bus: int = 0
    devfn: int = 0
    offset: int = 0
    size: int = 0
    value: int = 0
    info: int = 0

    def pack_into(self, page, at: int = OP_OFFSET) -> None:
        OP.pack_into(page, at, self.cmd & 0xFFFFFFFF, self.err, self.domain & 0xFFFFFFFF,
                     self.bus & 0xFFFFFFFF, self.devfn & 0xFFFFFFFF, self.offset, self.size,
                     self.value & 0xFFFFFFFF, self.info & 0xFFFFFFFF)

    @classmethod
    def unpack_from(cls, page, at: int = OP_OFFSET) -> Op:
        return cls(*OP.unpack_from(page, at))

    @property
    def bdf(self) -> Bdf:
        return Bdf(self.domain, self.bus, self.devfn >> 3, self.devfn & 7)

    def answered(self, err: int, value: int | None = None) -> Op:
        return Op(self.cmd, err, self.domain, self.bus, self.devfn, self.offset, self.size,
                  self.value if value is None else value, self.info)


def config_access_error(offset: int, size: int) -> PciErr | None:
    """pciback's check of a configuration access (conf_space.c
    valid_request): 1, 2 or 4 bytes, naturally aligned, inside the space."""
    if size not in (1, 2, 4) or offset < 0 or offset % size or offset + size > CONFIG_SPACE:
        return PciErr.INVALID_OFFSET
    return None


# -- the flag word: acquire / release, as set_bit / clear_bit with barriers ---

class SharedInfo:
    """The frontend's page, seen by either end (``page`` a writable view)."""

    def __init__(self, page: memoryview):
        self.page = page
        self._mem = ffi.from_buffer("uint8_t[]", page, require_writable=True)
        self._flags = ffi.cast("uint32_t *", self._mem)

    def flags(self) -> int:
        return int(lib.xmp_load32(self._flags))

    def set_flags(self, value: int) -> None:
        lib.xmp_store32(self._flags, value & 0xFFFFFFFF)

    def post(self, op: Op) -> None:
        """Frontend: publish ``op`` (the op first, then the bit, released)."""
        op.pack_into(self.page)
        self.set_flags(self.flags() | XEN_PCIF_active)

    def take(self) -> Op | None:
        """Backend: the waiting op, copied out once (no double fetch), or None."""
        if not self.flags() & XEN_PCIF_active:
            return None
        return Op.unpack_from(bytes(self.page[OP_OFFSET:OP_OFFSET + OP.size]), 0)

    def answer(self, op: Op) -> None:
        """Backend: write the answer, then clear the bit (released)."""
        op.pack_into(self.page)
        self.set_flags(self.flags() & ~XEN_PCIF_active)

    def result(self) -> Op | None:
        """Frontend: the answered op once the bit is clear, else None."""
        if self.flags() & XEN_PCIF_active:
            return None
        return Op.unpack_from(bytes(self.page[OP_OFFSET:OP_OFFSET + OP.size]), 0)

    def release(self) -> None:
        """Drop our hold of the page (its mapping is the caller's)."""
        ffi.release(self._mem)


# -- BDFs ------------------------------------------------------------------

_BDF = re.compile(r"(?:([0-9a-fA-F]{1,4}):)?([0-9a-fA-F]{1,2}):([0-9a-fA-F]{1,2})\.([0-7])")


@dataclass(frozen=True, order=True)
class Bdf:
    """A PCI address, segment:bus:device.function, written as xl writes it."""

    domain: int
    bus: int
    dev: int
    func: int

    @property
    def devfn(self) -> int:
        return (self.dev << 3) | self.func

    def __str__(self) -> str:
        return f"{self.domain:04x}:{self.bus:02x}:{self.dev:02x}.{self.func}"


def parse_bdf(text: str) -> Bdf:
    """``DDDD:BB:DD.F`` or ``BB:DD.F`` (segment 0), as xl's pci spec."""
    m = _BDF.fullmatch(text.strip())
    if m is None:
        raise ValueError(f"{text!r} is not a PCI address like 0000:00:04.0")
    dom, bus, dev, func = m.groups()
    bdf = Bdf(int(dom or "0", 16), int(bus, 16), int(dev, 16), int(func))
    if bdf.dev > 0x1F:
        raise ValueError(f"{text!r}: device {bdf.dev:#x} is past 0x1f")
    return bdf


def parse_peer_int(raw: bytes | None, what: str) -> int:
    """A number the other end wrote in xenstore; its garbage is a remote fault."""
    if raw is None or not raw.isdigit() or len(raw) > 10:
        raise RemoteProtocolError(f"pci: bad {what} {raw!r}")
    return int(raw)


class PciOpError(XmpError):
    """pciback answered an op with a XEN_PCI_ERR_* code."""

    def __init__(self, err: int, cmd: int, bdf: str, detail: str = ""):
        self.err = err
        self.cmd = cmd
        self.bdf = bdf
        self.detail = detail
        super().__init__(err, cmd, bdf, detail)

    def __str__(self) -> str:
        try:
            name = f"XEN_PCI_ERR_{PciErr(self.err).name.lower()}"
        except ValueError:
            name = f"XEN_PCI_ERR({self.err})"
        try:
            cmd = f"XEN_PCI_OP_{PciOp(self.cmd).name.lower()}"
        except ValueError:
            cmd = f"XEN_PCI_OP({self.cmd})"
        return f"{cmd} on {self.bdf}: {name}" + (f" ({self.detail})" if self.detail else "")
