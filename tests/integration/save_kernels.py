"""Test-only guest kernels for save and restore (imported by the domain
processes through PYTHONPATH, as kernels.py)."""

from __future__ import annotations

import hashlib
import struct

from xmp.sharedmem.shm import PAGE_SIZE

PAGES = 64


def ram_hash(kernel, first: int, last: int) -> str:
    return hashlib.sha256(kernel.memory[first * PAGE_SIZE:last * PAGE_SIZE]).hexdigest()


def ramhash(kernel) -> None:
    """Fills ``PAGES`` pages of its RAM with a pattern of its generation,
    and prints the hash of all its own RAM (first free pfn to the end) when
    it suspends and again as soon as it is restored; each restore is a new
    generation, which rewrites half the pages (so the next save differs)."""
    si = kernel.start_info
    span = (kernel.first_free_pfn, si.nr_pages)
    if kernel.restored is None:
        pfn, gen = kernel.alloc_pages(PAGES), 0
    else:
        pfn, gen = struct.unpack("<QQ", kernel.restored)
        kernel.print(f"ramhash: after {gen} {ram_hash(kernel, *span)}")
    gen += 1

    def hook() -> bytes:
        kernel.print(f"ramhash: before {gen} {ram_hash(kernel, *span)}")
        return struct.pack("<QQ", pfn, gen)

    kernel.on_suspend(hook)
    for i in range(0, PAGES, 1 if gen == 1 else 2):
        kernel.page(pfn + i)[:] = struct.pack("<QQ", gen, i) * (PAGE_SIZE // 16)
    kernel.print(f"ramhash: generation {gen} written")
    kernel.idle()


def _data(i: int) -> bytes:
    return struct.pack("<QQ", 0xAB5A, i) * (PAGE_SIZE // 16)


INFLIGHT = 8


def inflight(kernel) -> None:
    """Its suspend hook submits INFLIGHT writes without waiting, so they are
    on the ring when the domain suspends; restored, it waits for what
    blkfront re-issues, then reads the sectors back and says what it found."""
    disk = kernel.block("xvda")
    if kernel.restored is None:
        def hook() -> bytes:
            for i in range(INFLIGHT):
                disk.submit_write(8 * i, _data(i))
            return b"submitted"
        kernel.on_suspend(hook)
        kernel.print("inflight: ready")
        kernel.idle()
    kernel.loop.run_until(lambda: not disk.inflight and not disk.pending, 20)
    ok = all(disk.read(8 * i, 8) == _data(i) for i in range(INFLIGHT))
    kernel.print(f"inflight: {disk.reissued} re-issued, data {'OK' if ok else 'BAD'}")
    kernel.idle()


def balloon(kernel) -> None:
    """Gives back its top MiB (decrease_reservation) on a fresh boot; says
    so, or that it was restored, and idles."""
    kernel.on_suspend(lambda: b"ballooned")
    if kernel.restored is None:
        top = kernel.start_info.nr_pages
        released = kernel.xen.decrease_reservation(list(range(top - 256, top)))
        kernel.print(f"balloon: released {released}")
    else:
        kernel.print("balloon: restored")
    kernel.idle()
