"""libxenforeignmemory (tools/include/xenforeignmemory.h): dom0 maps a
guest's pages by pfn, as privcmd does -- no grant needed, because dom0 is
trusted with every domain's memory.

    xfm = foreignmemory.open(kernel)
    m = xfm.map(domid, [pfn0, pfn1], writable=False)
    m.errs          # per page: 0, or -ENOENT (not populated: left unmapped)
    bytes(m.pages[0][:16]); xfm.unmap(m)

Every other domain is refused with EPERM, as /dev/xen/privcmd is dom0's.
A page the guest balloons out afterwards reads as zeros, what the guest
gave back.  Consecutive pfns are one mapping (``buf`` when all of them are
one run).  A mapping outlives the guest until it is unmapped, as in Xen.
"""

from __future__ import annotations

import errno
import mmap
import os
from dataclasses import dataclass, field

from xmp.errors import HypercallError, LocalError
from xmp.sharedmem.shm import PAGE_SIZE


@dataclass
class ForeignMap:
    domid: int
    pfns: list[int]
    writable: bool
    errs: list[int]
    pages: list[memoryview | None]   # None where errs[i] != 0
    buf: memoryview | None           # all pages, when they are one run
    _maps: list[mmap.mmap] = field(default_factory=list, repr=False)


class XenForeignMemory:
    """An open xenforeignmemory handle."""

    def __init__(self, kernel):
        self._k = kernel
        self._maps: list[ForeignMap] = []
        self._open = True

    def map(self, domid: int, pfns: list[int], writable: bool = True) -> ForeignMap:
        """xenforeignmemory_map: map ``pfns`` of ``domid``; pages that are not
        populated are reported in ``errs`` and not mapped."""
        if not self._open:
            raise LocalError("the xenforeignmemory handle is closed")
        ret, fds = self._k.xen.ch.call_with_fds("memory_op", "foreign_map", dom=domid, pfns=list(pfns),
                                                writable=writable)
        if len(fds) != 1:
            for fd in fds:
                os.close(fd)
            raise HypercallError(errno.EIO, "foreign_map", "no memory descriptor came")
        fd = fds[0]
        errs = [int(e) for e in ret["errs"]]
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        fm = ForeignMap(domid, list(pfns), writable, errs, [None] * len(pfns), None)
        try:
            i = 0
            while i < len(pfns):
                if errs[i]:
                    i += 1
                    continue
                n = 1
                while i + n < len(pfns) and not errs[i + n] and pfns[i + n] == pfns[i] + n:
                    n += 1
                m = mmap.mmap(fd, n * PAGE_SIZE, mmap.MAP_SHARED, prot, offset=pfns[i] * PAGE_SIZE)
                fm._maps.append(m)
                view = memoryview(m)
                for k in range(n):
                    fm.pages[i + k] = view[k * PAGE_SIZE:(k + 1) * PAGE_SIZE]
                if n == len(pfns):
                    fm.buf = view
                else:
                    view.release()
                i += n
        except BaseException:
            self._release(fm)
            raise
        finally:
            os.close(fd)  # the mappings keep the pages; the descriptor is not kept
        self._maps.append(fm)
        return fm

    @staticmethod
    def _release(fm: ForeignMap) -> None:
        for page in fm.pages:
            if page is not None:
                page.release()
        if fm.buf is not None:
            fm.buf.release()
        for m in fm._maps:
            m.close()
        fm.pages = [None] * len(fm.pfns)
        fm.buf = None
        fm._maps.clear()

    def unmap(self, fm: ForeignMap) -> None:
        """xenforeignmemory_unmap."""
        if fm not in self._maps:
            raise HypercallError(errno.EINVAL, "xenforeignmemory_unmap", "not a mapping of this handle")
        self._maps.remove(fm)
        self._release(fm)

    def close(self) -> None:
        """xenforeignmemory_close: every mapping of this handle goes."""
        for fm in list(self._maps):
            self.unmap(fm)
        self._open = False

    def __enter__(self) -> XenForeignMemory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open(kernel) -> XenForeignMemory:
    """xenforeignmemory_open."""
    return XenForeignMemory(kernel)
