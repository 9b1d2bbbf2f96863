"""The emulated IDE controller: two ATA channels of PIO disks over image
files, as QEMU's ``piix3-ide`` gives an HVM guest before it unplugs it.

Theory of operation.  Each channel (primary 0x1f0-0x1f7 + 0x3f6, secondary
0x170-0x177 + 0x376) has one set of command-block registers that both of its
devices latch (features, sector count, LBA low/mid/high, device/head); the
DEV bit of device/head selects which device answers reads and executes
commands.  A command runs to completion at once -- there is no seek to wait
for -- so BSY is seen only while SRST is held.  A data command leaves DRQ set
with one sector (the "DRQ block") in the device's buffer; the guest moves it
through the data port (16 or 32 bits at a time, or a whole block with rep
ins/outs), and the device loads the next sector (read) or writes the one just
filled (write) until the count is done, then clears DRQ.  Every register
write also shifts the previous value into the "high order byte" latch, which
reads back with HOB set in device control: that is how LBA48 commands get
their 16-bit count and 48-bit LBA (ATA8-ACS, 48-bit Address feature set).

What is not emulated: DMA (bus mastering), READ/WRITE MULTIPLE (IDENTIFY
word 47 says so), ATAPI (an xl ``cdrom`` is not given an emulated drive
here), and interrupts (nIEN is kept, IRQ 14/15 are never raised: the guest
polls status, as a polling PIO driver does).

Choices where hardware varies:
* With device 1 selected and absent, Status and Alternate Status read 0
  (no BSY, no DRDY: the "nothing there" answer Linux's ata_devchk and QEMU
  give), the data port reads all ones, and commands are ignored; the shared
  latches still read back what was written.  A channel with no device at
  all is not claimed (the trap then answers all ones, a floating bus).
* The image is opened O_RDWR (O_RDONLY for a read-only disk) and moved with
  pread/pwrite, no cache of our own, so blkback's next read of the same
  file sees an IDE write and the other way round; FLUSH CACHE is fsync.
* A host I/O error never escapes: a read fails with ERR+UNC, a write with
  ERR+DF+ABRT, as a drive reports a medium it cannot use.

Usage (the device model's bus calls ``read``/``write``/``*_block``)::

    ide = IdeController([IdeDisk(0, 0, "/srv/guest.img")])
    ide.write(0x1f6, 1, 0xE0); ide.write(0x1f7, 1, 0xEC)   # IDENTIFY master
"""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

SECTOR = 512

# Status (ATA8-ACS 6.1) and Error bits.
BSY, DRDY, DF, DSC, DRQ, ERR = 0x80, 0x40, 0x20, 0x10, 0x08, 0x01
ABRT, IDNF, UNC = 0x04, 0x10, 0x40
# Device control: nIEN, SRST, HOB.
NIEN, SRST, HOB = 0x02, 0x04, 0x80
# Device/head: LBA addressing, device 1.
DEV_LBA, DEV_DEV = 0x40, 0x10

# Register offsets from a channel's command block base.
DATA, ERROR_FEATURES, NSECT, LBAL, LBAM, LBAH, DEVICE, STATUS_COMMAND = range(8)

CHANNELS = ((0x1F0, 0x3F6), (0x170, 0x376))   # (command block, control) of channel 0, 1

CMD_READ_SECTORS, CMD_READ_SECTORS_NR, CMD_READ_SECTORS_EXT = 0x20, 0x21, 0x24
CMD_WRITE_SECTORS, CMD_WRITE_SECTORS_NR, CMD_WRITE_SECTORS_EXT = 0x30, 0x31, 0x34
CMD_READ_VERIFY, CMD_READ_VERIFY_NR, CMD_READ_VERIFY_EXT = 0x40, 0x41, 0x42
CMD_IDENTIFY, CMD_SET_FEATURES, CMD_FLUSH_CACHE, CMD_FLUSH_CACHE_EXT = 0xEC, 0xEF, 0xE7, 0xEA
CMD_CHECK_POWER_MODE, CMD_STANDBY_IMMEDIATE, CMD_IDLE_IMMEDIATE = 0xE5, 0xE0, 0xE1
CMD_INIT_DEV_PARAMS = 0x91

LBA28_MAX = 0x0FFFFFFF                     # IDENTIFY words 60-61 never say more
# The legacy geometry an LBA disk reports for CHS addressing (words 1, 3, 6).
HEADS, SPT = 16, 63


def _ata_string(text: str, nbytes: int) -> bytes:
    """An IDENTIFY string: ASCII padded with spaces, the first character of
    each pair in the word's high byte (so swapped in little-endian memory)."""
    raw = text.encode("ascii", "replace")[:nbytes].ljust(nbytes, b" ")
    return bytes(raw[i ^ 1] for i in range(nbytes))


class AtaDisk:
    """One ATA device: its image, its status and error, its DRQ buffer."""

    def __init__(self, path: str | os.PathLike[str], readonly: bool = False, *,
                 model: str = "XMP HARDDISK", serial: str = "XMP00000000000000001",
                 firmware: str = "0.1"):
        self.path = os.fspath(path)
        self.readonly = readonly
        self.fd = os.open(self.path, os.O_RDONLY if readonly else os.O_RDWR)
        self.sectors = os.fstat(self.fd).st_size // SECTOR
        self.model, self.serial, self.firmware = model, serial, firmware
        self.write_cache = True
        self.look_ahead = True
        self.reset()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def reset(self) -> None:
        self.status = DRDY | DSC
        self.error = 0x01                  # diagnostic code: passed
        self.buf = bytearray(SECTOR)
        self.pos = SECTOR                  # the DRQ block is empty/done
        self.lba = 0
        self.left = 0                      # sectors of the data command still to move
        self.writing = False

    # -- command completion --------------------------------------------------

    def ok(self) -> None:
        self.status = DRDY | DSC
        self.error = 0

    def fail(self, error: int, extra: int = 0) -> None:
        self.status = DRDY | DSC | ERR | extra
        self.error = error
        self.left = 0
        self.pos = SECTOR

    # -- DRQ blocks ------------------------------------------------------------

    def start_read(self, lba: int, count: int) -> None:
        self.lba, self.left, self.writing = lba, count, False
        self._load()

    def start_write(self, lba: int, count: int) -> None:
        self.lba, self.left, self.writing = lba, count, True
        self.pos = 0
        self.status = DRDY | DSC | DRQ
        self.error = 0

    def _load(self) -> None:
        try:
            data = os.pread(self.fd, SECTOR, self.lba * SECTOR)
        except OSError:
            self.fail(UNC)
            return
        self.buf[:] = data.ljust(SECTOR, b"\0")   # the file shrank under us: zeros, as blkback
        self.pos = 0
        self.status = DRDY | DSC | DRQ
        self.error = 0

    def _block_done(self) -> None:
        """The guest has moved the whole DRQ block."""
        if self.writing:
            try:
                n = os.pwrite(self.fd, self.buf, self.lba * SECTOR)
            except OSError:
                n = -1
            if n != SECTOR:
                self.fail(ABRT, DF)
                return
        self.lba += 1
        self.left -= 1
        if self.left <= 0:
            self.pos = SECTOR
            self.ok()
        elif self.writing:
            self.pos = 0
        else:
            self._load()

    def data_in(self, n: int) -> bytes:
        """``n`` bytes from the data port: across DRQ blocks, all ones once
        DRQ is clear (or during a write, where the port is the guest's)."""
        out = bytearray()
        while len(out) < n:
            if not self.status & DRQ or self.writing:
                out += b"\xff" * (n - len(out))
                break
            take = min(SECTOR - self.pos, n - len(out))
            out += self.buf[self.pos:self.pos + take]
            self.pos += take
            if self.pos == SECTOR:
                self._block_done()
        return bytes(out)

    def data_out(self, data: bytes | memoryview) -> None:
        """Bytes written to the data port: dropped unless a write command
        has DRQ set (so never past the command's sectors)."""
        view = memoryview(data)
        done = 0
        while done < len(view):
            if not self.status & DRQ or not self.writing:
                return
            take = min(SECTOR - self.pos, len(view) - done)
            self.buf[self.pos:self.pos + take] = view[done:done + take]
            self.pos += take
            done += take
            if self.pos == SECTOR:
                self._block_done()

    # -- IDENTIFY DEVICE -------------------------------------------------------

    def identify(self) -> bytes:
        """The 256 words ATA8-ACS 7.16 defines, those a PIO LBA48 disk fills."""
        w = [0] * 256
        lba28 = min(self.sectors, LBA28_MAX)
        cyls = max(1, min(self.sectors // (HEADS * SPT), 16383))
        w[0] = 0x0040                      # fixed (not removable) ATA device
        w[1], w[3], w[6] = cyls, HEADS, SPT
        w[47] = 0x8000                     # READ/WRITE MULTIPLE: not supported
        w[49] = 0x0200                     # LBA supported (no DMA)
        w[50] = 0x4000
        w[53] = 0x0003                     # words 54-58 and 64-70 valid
        w[54], w[55], w[56] = cyls, HEADS, SPT
        chs = cyls * HEADS * SPT
        w[57], w[58] = chs & 0xFFFF, chs >> 16
        w[60], w[61] = lba28 & 0xFFFF, lba28 >> 16
        w[64] = 0x0003                     # PIO modes 3 and 4
        w[65] = w[66] = w[67] = w[68] = 120
        w[80] = 0x01F0                     # ATA/ATAPI-4 .. ATA8-ACS
        w[82] = 0x0060                     # write cache, look-ahead
        w[83] = 0x7400                     # FLUSH CACHE EXT, FLUSH CACHE, 48-bit address
        w[84] = 0x4000
        w[85] = (0x20 if self.write_cache else 0) | (0x40 if self.look_ahead else 0)
        w[86] = 0x3400
        w[87] = 0x4000
        for i in range(4):                 # words 100-103: the 48-bit capacity
            w[100 + i] = (self.sectors >> (16 * i)) & 0xFFFF
        w[106] = 0x4000                    # 512-byte logical sectors, one per physical
        raw = bytearray(struct.pack("<256H", *w))
        raw[20:40] = _ata_string(self.serial, 20)
        raw[46:54] = _ata_string(self.firmware, 8)
        raw[54:94] = _ata_string(self.model, 40)
        raw[510] = 0xA5                    # word 255: signature, then the checksum
        raw[511] = -sum(raw[:511]) & 0xFF
        return bytes(raw)


class _Latch:
    """A command-block register with its high-order-byte shadow."""

    __slots__ = ("cur", "prev")

    def __init__(self) -> None:
        self.cur = 0
        self.prev = 0

    def write(self, value: int) -> None:
        self.prev, self.cur = self.cur, value & 0xFF


class IdeChannel:
    def __init__(self, index: int, disks: tuple[AtaDisk | None, AtaDisk | None]):
        self.index = index
        self.base, self.ctl = CHANNELS[index]
        self.disks = disks
        self.regs = {r: _Latch() for r in (ERROR_FEATURES, NSECT, LBAL, LBAM, LBAH)}
        self.device = 0
        self.control = 0

    @property
    def selected(self) -> AtaDisk | None:
        return self.disks[1 if self.device & DEV_DEV else 0]

    def soft_reset(self) -> None:
        for d in self.disks:
            if d is not None:
                d.reset()
        # The ATA signature every device leaves in the taskfile after reset.
        for reg, value in ((NSECT, 1), (LBAL, 1), (LBAM, 0), (LBAH, 0)):
            self.regs[reg].cur = self.regs[reg].prev = value
        self.device = 0

    # -- register access -------------------------------------------------------

    def read_reg(self, off: int) -> int:
        disk = self.selected
        if off == STATUS_COMMAND:
            if self.control & SRST:
                return BSY if disk is not None else 0
            return disk.status if disk is not None else 0
        if off == ERROR_FEATURES:
            return disk.error if disk is not None else 0
        if off == DEVICE:
            return self.device
        latch = self.regs[off]
        return latch.prev if self.control & HOB else latch.cur

    def write_reg(self, off: int, value: int) -> None:
        value &= 0xFF
        self.control &= ~HOB               # a command-block write clears HOB (ATA8-ACS)
        if off == DEVICE:
            self.device = value
        elif off == STATUS_COMMAND:
            disk = self.selected
            if disk is not None and not self.control & SRST:
                self.command(disk, value)
        else:
            self.regs[off].write(value)

    def write_control(self, value: int) -> None:
        was = self.control
        self.control = value & (NIEN | SRST | HOB)
        if was & SRST and not value & SRST:
            self.soft_reset()             # the reset completes as SRST falls

    # -- commands --------------------------------------------------------------

    def _lba28(self) -> int | None:
        r = self.regs
        if self.device & DEV_LBA:
            return (self.device & 0x0F) << 24 | r[LBAH].cur << 16 | r[LBAM].cur << 8 | r[LBAL].cur
        cyl, head, sector = r[LBAM].cur | r[LBAH].cur << 8, self.device & 0x0F, r[LBAL].cur
        if sector == 0 or sector > SPT:
            return None
        return (cyl * HEADS + head) * SPT + sector - 1

    def _lba48(self) -> int:
        r = self.regs
        return (r[LBAH].prev << 40 | r[LBAM].prev << 32 | r[LBAL].prev << 24
                | r[LBAH].cur << 16 | r[LBAM].cur << 8 | r[LBAL].cur)

    def _extent(self, cmd: int) -> tuple[int, int] | None:
        """(lba, count) a data command names, or None when it is beyond the disk."""
        r = self.regs
        if cmd in (CMD_READ_SECTORS_EXT, CMD_WRITE_SECTORS_EXT, CMD_READ_VERIFY_EXT):
            lba, count = self._lba48(), (r[NSECT].prev << 8 | r[NSECT].cur) or 65536
        else:
            lba28, count = self._lba28(), r[NSECT].cur or 256
            if lba28 is None:
                return None
            lba = lba28
        disk = self.selected
        assert disk is not None
        if lba + count > disk.sectors:
            return None
        return lba, count

    def command(self, disk: AtaDisk, cmd: int) -> None:
        if cmd in (CMD_READ_SECTORS, CMD_READ_SECTORS_NR, CMD_READ_SECTORS_EXT,
                   CMD_WRITE_SECTORS, CMD_WRITE_SECTORS_NR, CMD_WRITE_SECTORS_EXT,
                   CMD_READ_VERIFY, CMD_READ_VERIFY_NR, CMD_READ_VERIFY_EXT):
            write = cmd in (CMD_WRITE_SECTORS, CMD_WRITE_SECTORS_NR, CMD_WRITE_SECTORS_EXT)
            if write and disk.readonly:
                disk.fail(ABRT)
                return
            extent = self._extent(cmd)
            if extent is None:
                disk.fail(IDNF)
            elif write:
                disk.start_write(*extent)
            elif cmd in (CMD_READ_VERIFY, CMD_READ_VERIFY_NR, CMD_READ_VERIFY_EXT):
                disk.ok()                  # the sectors exist: verified
            else:
                disk.start_read(*extent)
        elif cmd == CMD_IDENTIFY:
            disk.buf[:] = disk.identify()
            disk.pos, disk.left, disk.writing = 0, 1, False
            disk.lba = 0
            disk.status, disk.error = DRDY | DSC | DRQ, 0
        elif cmd in (CMD_FLUSH_CACHE, CMD_FLUSH_CACHE_EXT):
            try:
                if not disk.readonly:
                    os.fsync(disk.fd)
                disk.ok()
            except OSError:
                disk.fail(ABRT, DF)
        elif cmd == CMD_SET_FEATURES:
            self.set_features(disk)
        elif cmd == CMD_CHECK_POWER_MODE:
            self.regs[NSECT].write(0xFF)   # active or idle
            disk.ok()
        elif cmd in (CMD_STANDBY_IMMEDIATE, CMD_IDLE_IMMEDIATE, CMD_INIT_DEV_PARAMS):
            disk.ok()                      # nothing spins; the legacy geometry is fixed
        else:
            disk.fail(ABRT)                # includes NOP, DEVICE RESET (ATAPI only), DMA commands

    def set_features(self, disk: AtaDisk) -> None:
        sub, count = self.regs[ERROR_FEATURES].cur, self.regs[NSECT].cur
        if sub == 0x02:
            disk.write_cache = True
        elif sub == 0x82:
            disk.write_cache = False
        elif sub == 0xAA:
            disk.look_ahead = True
        elif sub == 0x55:
            disk.look_ahead = False
        elif sub in (0x66, 0xCC):
            pass                           # reverting to power-on defaults: kept as they are
        elif sub == 0x03 and (count in (0x00, 0x01) or 0x08 <= count <= 0x0C):
            pass                           # a PIO transfer mode (DMA modes are refused)
        else:
            disk.fail(ABRT)
            return
        disk.ok()


@dataclass(frozen=True)
class IdeDisk:
    """Where one emulated disk sits: ``channel`` 0/1, ``unit`` 0 (master) / 1 (slave)."""

    channel: int
    unit: int
    path: str
    readonly: bool = False


class IdeController:
    """Both channels, as one device on the device model's port bus
    (``xmp.hvm.devices.PortDevice``).  Writes are not ``buffered``: Xen
    buffers only stdvga's; an IDE write's effect (an error) must be in
    status before the guest's next read, which a synchronous write keeps
    simple to reason about."""

    name = "ide"
    buffered = False

    def __init__(self, disks: Iterable[IdeDisk], **disk_args: Any):
        slots: list[list[AtaDisk | None]] = [[None, None], [None, None]]
        opened: list[AtaDisk] = []
        try:
            for d in disks:
                if d.channel not in (0, 1) or d.unit not in (0, 1):
                    raise ValueError(f"IDE position ({d.channel}, {d.unit}): channel and unit are 0 or 1")
                if slots[d.channel][d.unit] is not None:
                    raise ValueError(f"IDE channel {d.channel} unit {d.unit} given twice")
                serial = f"XMP{d.channel}{d.unit}{zlib.crc32(os.fsencode(d.path)):015d}"
                disk = AtaDisk(d.path, d.readonly, serial=serial, **disk_args)
                opened.append(disk)
                slots[d.channel][d.unit] = disk
        except BaseException:
            for disk in opened:
                disk.close()
            raise
        self.channels = [IdeChannel(i, (s[0], s[1])) for i, s in enumerate(slots)]
        self.ranges: list[tuple[int, int]] = []
        for ch in self.channels:
            if ch.disks != (None, None):
                self.ranges += [(ch.base, ch.base + 7), (ch.ctl, ch.ctl)]

    def close(self) -> None:
        for ch in self.channels:
            for d in ch.disks:
                if d is not None:
                    d.close()

    def _where(self, port: int) -> tuple[IdeChannel, int] | None:
        """(channel, offset) of a port; offset 8 is the control register."""
        for ch in self.channels:
            if ch.base <= port <= ch.base + 7:
                return ch, port - ch.base
            if port == ch.ctl:
                return ch, 8
        return None

    # -- PortDevice ------------------------------------------------------------

    def read(self, port: int, size: int) -> int:
        where = self._where(port)
        if where is None:
            return (1 << 8 * size) - 1 if size > 0 else 0
        ch, off = where
        if off == DATA:
            disk = ch.selected
            data = disk.data_in(size) if disk is not None else b"\xff" * size
            return int.from_bytes(data, "little")
        # A wider access to a byte register reads the following ports, as the ISA bus splits it.
        value = 0
        for i in range(max(size, 0)):
            value |= self._read_byte(port + i) << (8 * i)
        return value

    def _read_byte(self, port: int) -> int:
        where = self._where(port)
        if where is None:
            return 0xFF
        ch, off = where
        if off == 8:
            return ch.read_reg(STATUS_COMMAND)   # alternate status: status without side effects
        if off == DATA:
            return self.read(port, 1)
        return ch.read_reg(off)

    def write(self, port: int, size: int, value: int) -> None:
        where = self._where(port)
        if where is None:
            return
        ch, off = where
        if off == DATA:
            disk = ch.selected
            if disk is not None and size > 0:
                disk.data_out((value & ((1 << 8 * size) - 1)).to_bytes(size, "little"))
            return
        for i in range(max(size, 0)):
            self._write_byte(port + i, (value >> (8 * i)) & 0xFF)

    def _write_byte(self, port: int, value: int) -> None:
        where = self._where(port)
        if where is None:
            return
        ch, off = where
        if off == 8:
            ch.write_control(value)
        elif off == DATA:
            self.write(port, 1, value)
        else:
            ch.write_reg(off, value)

    def read_block(self, port: int, size: int, count: int) -> bytes:
        """rep ins: ``count`` items of ``size`` bytes -- a whole DRQ block per
        call when the guest asks for one (256 words, 128 dwords)."""
        n = max(size, 0) * max(count, 0)
        where = self._where(port)
        if where is not None and where[1] == DATA:
            disk = where[0].selected
            if disk is not None:
                return disk.data_in(n)
            return b"\xff" * n
        return b"".join(self.read(port, size).to_bytes(size, "little") for _ in range(max(count, 0))) \
            if size > 0 else b""

    def write_block(self, port: int, size: int, data: bytes) -> None:
        """rep outs: the bytes of ``len(data) // size`` items."""
        if size <= 0:
            return
        where = self._where(port)
        if where is not None and where[1] == DATA:
            disk = where[0].selected
            if disk is not None:
                disk.data_out(data[:len(data) - len(data) % size])
            return
        for i in range(0, len(data) - size + 1, size):
            self.write(port, size, int.from_bytes(data[i:i + size], "little"))
