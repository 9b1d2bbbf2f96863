"""The emulated IDE controller as a pure unit over a tmp image file: what a
PIO ATA driver sees through the ports (ATA8-ACS), and that the image is
the one blkback would read and write."""

from __future__ import annotations

import os
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xmp.hvm.devices.ide import (
    ABRT,
    BSY,
    DRDY,
    DRQ,
    ERR,
    IDNF,
    SECTOR,
    SRST,
    IdeController,
    IdeDisk,
)

pytestmark = pytest.mark.timeout(60)

P, CTL = 0x1F0, 0x3F6


def image(tmp_path, name="disk.img", size=4 << 20, fill=None):
    path = tmp_path / name
    with open(path, "wb") as f:
        if fill is None:
            f.truncate(size)
        else:
            f.write(fill)
    return str(path)


@pytest.fixture
def ide(tmp_path):
    ctl = IdeController([IdeDisk(0, 0, image(tmp_path))])
    yield ctl
    ctl.close()


def status(ide, base=P):
    return ide.read(base + 7, 1)


def taskfile(ide, lba, count, dev=0, base=P):
    ide.write(base + 6, 1, 0xE0 | dev << 4 | (lba >> 24 & 0xF))
    ide.write(base + 2, 1, count & 0xFF)
    ide.write(base + 3, 1, lba & 0xFF)
    ide.write(base + 4, 1, lba >> 8 & 0xFF)
    ide.write(base + 5, 1, lba >> 16 & 0xFF)


def taskfile48(ide, lba, count, base=P):
    ide.write(base + 6, 1, 0x40)
    # Each register twice, the high order byte first: the "previous content" latch keeps it.
    for off, high, low in ((2, count >> 8, count), (3, lba >> 24, lba), (4, lba >> 32, lba >> 8),
                           (5, lba >> 40, lba >> 16)):
        ide.write(base + off, 1, high & 0xFF)
        ide.write(base + off, 1, low & 0xFF)


def identify(ide, dev=0, base=P) -> list[int]:
    ide.write(base + 6, 1, 0xA0 | dev << 4)
    ide.write(base + 7, 1, 0xEC)
    assert status(ide, base) & DRQ
    words = [ide.read(base, 2) for _ in range(256)]
    assert status(ide, base) == DRDY | 0x10   # DRQ fell after the 256th word
    return words


def ata_string(words, first, last) -> str:
    return b"".join(struct.pack(">H", w) for w in words[first:last + 1]).decode().rstrip()


def read_sectors(ide, lba, count, ext=False, base=P) -> bytes:
    (taskfile48 if ext else taskfile)(ide, lba, count, base=base)
    ide.write(base + 7, 1, 0x24 if ext else 0x20)
    n = (count or (65536 if ext else 256))
    out = b"".join(ide.read_block(base, 2, SECTOR // 2) for _ in range(n))
    assert status(ide, base) & (DRQ | ERR) == 0
    return out


def write_sectors(ide, lba, data, ext=False, base=P) -> None:
    count = len(data) // SECTOR
    (taskfile48 if ext else taskfile)(ide, lba, count & (0xFFFF if ext else 0xFF), base=base)
    ide.write(base + 7, 1, 0x34 if ext else 0x30)
    for i in range(count):
        assert status(ide, base) & DRQ
        ide.write_block(base, 2, data[i * SECTOR:(i + 1) * SECTOR])
    assert status(ide, base) & (DRQ | ERR) == 0


def test_identify_device_words(tmp_path):
    path = image(tmp_path, size=100 << 20)
    ide = IdeController([IdeDisk(0, 0, path)], model="XMP TEST DISK")
    try:
        w = identify(ide)
    finally:
        ide.close()
    sectors = (100 << 20) // SECTOR
    assert w[0] & 0x8000 == 0                      # an ATA device
    assert ata_string(w, 27, 46) == "XMP TEST DISK"
    assert ata_string(w, 10, 19).startswith("XMP00")
    assert w[49] & 0x0200                          # LBA
    assert w[60] | w[61] << 16 == sectors
    assert w[83] & 0x0400 and w[86] & 0x0400       # 48-bit address supported, enabled
    assert w[83] & 0x3000 == 0x3000                # FLUSH CACHE, FLUSH CACHE EXT
    assert w[100] | w[101] << 16 | w[102] << 32 | w[103] << 48 == sectors
    assert w[47] & 0xFF == 0                       # no READ MULTIPLE: a driver uses READ SECTORS
    raw = struct.pack("<256H", *w)
    assert raw[510] == 0xA5 and sum(raw) % 256 == 0  # word 255's integrity checksum


def test_write_then_read_back_byte_for_byte_and_the_image_is_blkbacks(tmp_path):
    path = image(tmp_path)
    ide = IdeController([IdeDisk(0, 0, path)])
    try:
        data = os.urandom(3 * SECTOR)
        write_sectors(ide, 7, data)
        assert read_sectors(ide, 7, 3) == data
        with open(path, "rb") as f:                # what blkback's pread would see
            f.seek(7 * SECTOR)
            assert f.read(3 * SECTOR) == data
        other = os.urandom(SECTOR)
        fd = os.open(path, os.O_WRONLY)            # blkback writes: IDE's next read sees it
        os.pwrite(fd, other, 8 * SECTOR)
        os.close(fd)
        assert read_sectors(ide, 8, 1) == other
    finally:
        ide.close()


def test_sector_count_zero_means_256(tmp_path):
    fill = os.urandom(300 * SECTOR)
    ide = IdeController([IdeDisk(0, 0, image(tmp_path, fill=fill))])
    try:
        taskfile(ide, 1, 0)
        ide.write(P + 7, 1, 0x20)
        got = b"".join(ide.read_block(P, 4, SECTOR // 4) for _ in range(256))   # 32-bit PIO too
        assert got == fill[SECTOR:257 * SECTOR]
        assert not status(ide) & DRQ
        assert ide.read(P, 2) == 0xFFFF            # the 257th sector is not given
    finally:
        ide.close()


def test_word_by_word_reads_cross_drq_blocks(tmp_path):
    fill = os.urandom(4 * SECTOR)
    ide = IdeController([IdeDisk(0, 0, image(tmp_path, fill=fill))])
    try:
        taskfile(ide, 1, 2)
        ide.write(P + 7, 1, 0x20)
        got = b"".join(ide.read(P, 2).to_bytes(2, "little") for _ in range(SECTOR))
        assert got == fill[SECTOR:3 * SECTOR]
    finally:
        ide.close()


def test_lba48_past_128_gib_on_a_sparse_image(tmp_path):
    size = 200 << 30                               # sparse: costs nothing
    path = image(tmp_path, size=size)
    ide = IdeController([IdeDisk(0, 0, path)])
    try:
        w = identify(ide)
        assert w[60] | w[61] << 16 == 0x0FFFFFFF   # LBA28 capacity is capped
        assert w[100] | w[101] << 16 | w[102] << 32 == size // SECTOR
        lba = (1 << 28) + 12345                    # beyond LBA28 (128 GiB)
        data = os.urandom(2 * SECTOR)
        write_sectors(ide, lba, data, ext=True)
        with open(path, "rb") as f:
            f.seek(lba * SECTOR)
            assert f.read(2 * SECTOR) == data
        assert read_sectors(ide, lba, 2, ext=True) == data
        ide.write(CTL, 1, 0x80)                    # HOB reads back the high order bytes
        assert [ide.read(P + r, 1) for r in (3, 4, 5)] == [lba >> 24 & 0xFF, lba >> 32 & 0xFF, 0]
        ide.write(CTL, 1, 0)
        assert [ide.read(P + r, 1) for r in (3, 4, 5)] == [lba & 0xFF, lba >> 8 & 0xFF, lba >> 16 & 0xFF]
        # The same low 28 bits through LBA28 read elsewhere: sector 12345, zeros.
        assert read_sectors(ide, 12345, 1) == bytes(SECTOR)
    finally:
        ide.close()
    assert os.path.getsize(path) == size


def test_unknown_command_aborts(ide):
    ide.write(P + 6, 1, 0xE0)
    ide.write(P + 7, 1, 0xC8)                      # READ DMA: no DMA here
    assert status(ide) & (ERR | DRDY) == ERR | DRDY
    assert ide.read(P + 1, 1) == ABRT
    ide.write(P + 7, 1, 0xE7)                      # the next command clears the error
    assert status(ide) & ERR == 0 and ide.read(P + 1, 1) == 0


def test_lba_beyond_the_disk_is_idnf(ide):
    last = (4 << 20) // SECTOR - 1
    taskfile(ide, last, 2)                         # its second sector is past the end
    ide.write(P + 7, 1, 0x20)
    assert status(ide) & (ERR | DRQ) == ERR
    assert ide.read(P + 1, 1) == IDNF
    taskfile(ide, last, 1)
    ide.write(P + 7, 1, 0x30)
    assert status(ide) & DRQ                       # the last sector itself is fine


def test_data_port_with_drq_clear_reads_all_ones(ide):
    assert not status(ide) & DRQ
    assert ide.read(P, 2) == 0xFFFF and ide.read(P, 4) == 0xFFFFFFFF
    assert ide.read_block(P, 2, 256) == b"\xff" * 512
    ide.write(P, 2, 0x1234)                        # dropped
    ide.write_block(P, 2, b"\x55" * 512)
    assert read_sectors(ide, 0, 1) == bytes(SECTOR)


def test_readonly_disk_refuses_writes(tmp_path):
    fill = os.urandom(8 * SECTOR)
    path = image(tmp_path, fill=fill)
    ide = IdeController([IdeDisk(0, 0, path, readonly=True)])
    try:
        taskfile(ide, 0, 1)
        ide.write(P + 7, 1, 0x30)
        assert status(ide) & (ERR | DRQ) == ERR and ide.read(P + 1, 1) == ABRT
        ide.write_block(P, 2, bytes(SECTOR))
        assert read_sectors(ide, 0, 8) == fill
    finally:
        ide.close()
    assert open(path, "rb").read() == fill


def test_absent_slave_reads_status_zero_and_ignores_commands(ide):
    ide.write(P + 6, 1, 0xB0)                      # device 1
    assert status(ide) == 0 and ide.read(CTL, 1) == 0
    ide.write(P + 7, 1, 0xEC)
    assert status(ide) == 0 and ide.read(P, 2) == 0xFFFF
    ide.write(P + 2, 1, 0x55)                      # the channel's latch still reads back
    assert ide.read(P + 2, 1) == 0x55
    ide.write(P + 6, 1, 0xA0)
    assert status(ide) & DRDY


def test_srst_resets_and_leaves_the_ata_signature(ide):
    taskfile(ide, 3, 1)
    ide.write(P + 7, 1, 0x20)
    assert status(ide) & DRQ
    ide.write(CTL, 1, SRST)
    assert status(ide) == BSY
    ide.write(CTL, 1, 0)
    assert status(ide) & (BSY | DRQ | DRDY) == DRDY
    assert [ide.read(P + r, 1) for r in (1, 2, 3, 4, 5)] == [0x01, 1, 1, 0, 0]
    assert ide.read(P, 2) == 0xFFFF


def test_flush_cache_and_set_features(ide):
    ide.write(P + 6, 1, 0xA0)
    for cmd in (0xE7, 0xEA):
        ide.write(P + 7, 1, cmd)
        assert status(ide) & (ERR | BSY) == 0
    ide.write(P + 1, 1, 0x82)                      # disable the write cache
    ide.write(P + 7, 1, 0xEF)
    assert status(ide) & ERR == 0
    assert identify(ide)[85] & 0x20 == 0
    ide.write(P + 1, 1, 0x03)
    ide.write(P + 2, 1, 0x45)                      # UDMA mode 5: refused, PIO only
    ide.write(P + 7, 1, 0xEF)
    assert status(ide) & ERR and ide.read(P + 1, 1) == ABRT


def test_secondary_channel_and_slave(tmp_path):
    a, b = image(tmp_path, "a.img"), image(tmp_path, "b.img")
    ide = IdeController([IdeDisk(1, 1, a), IdeDisk(0, 0, b)])
    try:
        assert ide.ranges == [(0x1F0, 0x1F7), (0x3F6, 0x3F6), (0x170, 0x177), (0x376, 0x376)]
        data = os.urandom(SECTOR)
        ide.write(0x176, 1, 0xF0)
        taskfile(ide, 5, 1, dev=1, base=0x170)
        ide.write(0x177, 1, 0x30)
        ide.write_block(0x170, 2, data)
        assert open(a, "rb").read()[5 * SECTOR:6 * SECTOR] == data
        assert open(b, "rb").read() == bytes(4 << 20)
    finally:
        ide.close()


def test_a_channel_with_no_disk_is_not_claimed(tmp_path):
    ide = IdeController([IdeDisk(1, 0, image(tmp_path))])
    try:
        assert (0x1F0, 0x1F7) not in ide.ranges
        assert ide.read(0x1F7, 1) == 0
    finally:
        ide.close()


def test_bad_positions_are_refused_and_nothing_stays_open(tmp_path):
    path = image(tmp_path)
    with pytest.raises(ValueError, match="given twice"):
        IdeController([IdeDisk(0, 0, path), IdeDisk(0, 0, path)])
    with pytest.raises(ValueError, match="channel and unit"):
        IdeController([IdeDisk(2, 0, path)])


_PORTS = [*range(0x1F0, 0x1F8), 0x3F6, *range(0x170, 0x178), 0x376, 0x3F7, 0x1EF]
_op = st.one_of(
    st.tuples(st.just("r"), st.sampled_from(_PORTS), st.sampled_from([1, 2, 4, 8]), st.just(0)),
    st.tuples(st.just("w"), st.sampled_from(_PORTS), st.sampled_from([1, 2, 4, 8]),
              st.one_of(st.sampled_from([0x20, 0x24, 0x30, 0x34, 0xEC, 0xE7, 0xEF, 0x04, 0x80, 0xE0,
                                         0xF0, 0x40, 0xFF]), st.integers(0, (1 << 64) - 1))),
    st.tuples(st.just("rb"), st.sampled_from(_PORTS), st.sampled_from([1, 2, 4]), st.integers(0, 600)),
    st.tuples(st.just("wb"), st.sampled_from(_PORTS), st.sampled_from([1, 2, 4]), st.integers(0, 1200)),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(_op, max_size=60))
def test_random_register_sequences_never_raise_nor_write_outside(tmp_path, ops):
    size = 300 * SECTOR                            # count 0 (256) from LBA 0 fits: transfers happen
    a, b = image(tmp_path, "h0.img", size), image(tmp_path, "h1.img", size)
    ide = IdeController([IdeDisk(0, 0, a), IdeDisk(1, 1, b, readonly=True)])
    try:
        for kind, port, sz, arg in ops:
            if kind == "r":
                assert 0 <= ide.read(port, sz) < 1 << (8 * sz)
            elif kind == "w":
                ide.write(port, sz, arg)
            elif kind == "rb":
                assert len(ide.read_block(port, sz, arg)) == sz * arg
            else:
                ide.write_block(port, sz, bytes([arg & 0xFF]) * arg)
    finally:
        ide.close()
    assert os.path.getsize(a) == size and os.path.getsize(b) == size
    assert open(b, "rb").read() == bytes(size)       # read-only: never written
