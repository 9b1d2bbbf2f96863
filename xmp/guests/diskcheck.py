"""Writes a verifiable pattern over a disk in mixed request sizes, flushes,
reads it all back with other sizes and checks every byte; prints throughput,
and last one line ``diskcheck: OK <N> bytes verified`` or
``diskcheck: FAILED <why>``.

args: vdev ("xvda"), bytes (how much of the disk, default all), seed (default 1),
verify_only (only check a pattern an earlier run left: kill everything, start
again, verify), hold (after the flush, wait to be killed or shut down), front
(blkfront settings: see ``xmp.drivers.blk.frontend.configure``), interval
(seconds to sleep between writes, default 0: a slow writer, to be caught
mid-way).

Saved and restored (or migrated) at any point, it goes on where it was: a
page of its RAM holds how many writes the disk has acknowledged and
whether the flush was answered, and only that page's pfn is its suspend
context.  On the new host it re-opens the disk, writes again from the first
write not acknowledged (a request in flight at the suspend), flushes, and
verifies every byte -- so every acknowledged write must have survived."""

from __future__ import annotations

import struct
import time

SECTOR = 512
_STATE = struct.Struct("<QQ")   # writes acknowledged, flushed (0/1)
WRITE_SIZES = (1, 8, 88, 2048, 3, 256)     # sectors: 512 B, 4 KiB, 44 KiB, 1 MiB, odd, 128 KiB
READ_SIZES = (2048, 7, 1, 512, 88)


def pattern(seed: int, first: int, count: int) -> bytes:
    """Sector n holds (seed, n) repeated: any misplaced or stale sector shows."""
    return b"".join(struct.pack("<QQ", seed, n) * (SECTOR // 16) for n in range(first, first + count))


def _chunks(total: int, sizes: tuple[int, ...]):
    sector, i = 0, 0
    while sector < total:
        n = min(sizes[i % len(sizes)], total - sector)
        yield sector, n
        sector += n
        i += 1


def main(kernel) -> None:
    args = kernel.args
    if args.get("front"):
        from xmp.drivers.blk import frontend

        frontend.configure(kernel, **args["front"])
    if kernel.restored is not None:
        (pfn,) = struct.unpack("<Q", kernel.restored)
    else:
        pfn = kernel.alloc_pages(1)
    kernel.on_suspend(lambda: struct.pack("<Q", pfn))
    state = kernel.page(pfn)
    acked, flushed = _STATE.unpack_from(state)
    disk = kernel.block(args.get("vdev", "xvda"))
    seed = int(args.get("seed", 1))
    total = min(disk.sectors, int(args.get("bytes", disk.sectors * SECTOR)) // SECTOR)
    interval = float(args.get("interval", 0))
    if not args.get("verify_only") and not flushed:
        t0 = time.perf_counter()
        for i, (sector, n) in enumerate(_chunks(total, WRITE_SIZES)):
            if i < acked:
                continue
            disk.write(sector, pattern(seed, sector, n))
            _STATE.pack_into(state, 0, i + 1, 0)
            if interval:
                kernel.sleep(interval)
        disk.flush()
        _STATE.pack_into(state, 0, _STATE.unpack_from(state)[0], 1)
        dt = time.perf_counter() - t0
        kernel.print(f"diskcheck: wrote {total * SECTOR} bytes in {dt:.2f} s "
                     f"({total * SECTOR / dt / 1e6:.1f} MB/s), flushed")
        if args.get("hold"):
            kernel.idle()   # restored from here, it goes on to verify
    t0 = time.perf_counter()
    for sector, n in _chunks(total, READ_SIZES):
        data = disk.read(sector, n)
        if data != pattern(seed, sector, n):
            bad = next(i for i in range(n) if data[i * SECTOR:(i + 1) * SECTOR]
                       != pattern(seed, sector + i, 1))
            kernel.print(f"diskcheck: FAILED sector {sector + bad} does not hold its pattern")
            return
    dt = time.perf_counter() - t0
    rate = total * SECTOR / dt / 1e6
    kernel.print(f"diskcheck: read {total * SECTOR} bytes in {dt:.2f} s ({rate:.1f} MB/s)")
    kernel.print(f"diskcheck: OK {total * SECTOR} bytes verified")
