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
