"""Writes a share of its memory (args.fraction, default 0.5, of the pages
above its special pages) with non-zero bytes, says ``touch: N pages
touched`` and idles; restored, it says ``touch: restored`` and idles.  The
guest bench_save saves and restores."""

from xmp.sharedmem.shm import PAGE_SIZE

FILL = b"xmp touched page" * (PAGE_SIZE // 16)


def main(kernel) -> None:
    kernel.on_suspend(lambda: b"touched")   # on every entry: a hook does not move, its bytes do
    if kernel.restored is not None:
        kernel.print("touch: restored")
        kernel.idle()
    fraction = float(kernel.args.get("fraction", 0.5))
    n = int((kernel.start_info.nr_pages - kernel.first_free_pfn) * fraction)
    pfn = kernel.alloc_pages(n) if n else 0
    mem = memoryview(kernel.memory)
    for i in range(pfn, pfn + n):
        mem[i * PAGE_SIZE:(i + 1) * PAGE_SIZE] = FILL
    kernel.print(f"touch: {n} pages touched")
    kernel.idle()
