"""libxengnttab and libxengntshr (tools/include/xengnttab.h): grants for a tool.

    xgt = gnttab.open(kernel)                  # the grantee's side
    m = xgt.map_grant_refs(domid, [ref], writable=False)
    data = bytes(m.buf[:64]); xgt.unmap(m)
    xgt.grant_copy([{"source": {"domid": d, "ref": r, "offset": 0},
                     "dest": {"domid": DOMID_SELF, "frame": pfn, "offset": 0}, "len": 64}])

    xgs = gnttab.open_gntshr(kernel)           # the granter's side
    share = xgs.share_pages(domid, 4)           # share.refs, share.buf
    xgs.unshare(share)

Mapping is what Xen's dom0 does through gntdev: xmp lets only dom0 map
another domain's pages (DESIGN.md section 3), so the hypervisor refuses
every other domain (EPERM) and they use :meth:`XenGnttab.grant_copy`,
which everyone may.  A read-only map is read-only for real: its buffer
refuses writes, and so does the page under it.  Sharing is every domain's:
pages of its own memory, granted.  Unsharing pages the peer still maps
ends their grants when it unmaps (as gntalloc defers it): the pages are
given back only then.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass, field

from xmp.domain_proc.xen import GrantMapping
from xmp.errors import HypercallError, LocalError, XmpError
from xmp.sharedmem.shm import PAGE_SIZE


@dataclass
class GrantMap:
    """Pages of another domain, mapped: ``buf`` is all of them as one buffer
    when the granter's frames are consecutive, else ``pages[i]`` page by page."""

    domid: int
    refs: list[int]
    writable: bool
    buf: memoryview | None
    pages: list
    _mapping: GrantMapping = field(repr=False)


class XenGnttab:
    """An open xengnttab handle."""

    def __init__(self, kernel):
        self._k = kernel
        self._maps: list[GrantMap] = []
        self._open = True

    def map_grant_ref(self, domid: int, ref: int, writable: bool = True) -> GrantMap:
        """xengnttab_map_grant_ref."""
        return self.map_grant_refs(domid, [ref], writable)

    def map_grant_refs(self, domid: int, refs: list[int], writable: bool = True) -> GrantMap:
        """xengnttab_map_domain_grant_refs: ``refs`` of ``domid``, in order.
        EPERM unless this is dom0; a GNTST error for a ref not granted to us
        (or granted read-only and asked writable)."""
        self._check_open()
        if not refs:
            raise LocalError("map_grant_refs of no refs")
        mapping = self._k.xen.map_grant_ref(domid, list(refs), readonly=not writable)
        buf = mapping.contiguous()
        gm = GrantMap(domid, list(refs), writable,
                      None if buf is None else (buf if writable else buf.toreadonly()),
                      [memoryview(p) if writable else memoryview(p).toreadonly() for p in mapping.pages],
                      mapping)
        self._maps.append(gm)
        return gm

    def unmap(self, gm: GrantMap) -> None:
        """xengnttab_unmap: the pages go; the granter may end its grants."""
        if gm not in self._maps:
            raise HypercallError(errno.EINVAL, "xengnttab_unmap", "not a mapping of this handle")
        self._maps.remove(gm)
        for view in gm.pages:
            view.release()
        if gm.buf is not None:
            gm.buf.release()
        gm.pages.clear()
        gm.buf = None
        self._k.xen.unmap_grant_ref(gm._mapping)

    def grant_copy(self, segments: list[dict]) -> list[int]:
        """xengnttab_grant_copy: each segment ``{"source", "dest", "len"}``,
        a side being ``{"domid", "ref", "offset"}`` (a grant) or
        ``{"domid": DOMID_SELF, "frame", "offset"}`` (our own page); returns
        each segment's GNTST status (0: copied)."""
        self._check_open()
        return list(self._k.xen.grant_copy(segments))

    def close(self) -> None:
        """xengnttab_close: every mapping of this handle is unmapped."""
        for gm in list(self._maps):
            try:
                self.unmap(gm)
            except XmpError:
                pass  # the granter is gone: nothing to give back
        self._open = False

    def _check_open(self) -> None:
        if not self._open:
            raise LocalError("the xengnttab handle is closed")

    def __enter__(self) -> XenGnttab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class Share:
    """Pages of our own memory granted to ``domid``: ``refs[i]`` grants
    page i of ``buf``."""

    domid: int
    refs: list[int]
    pfn: int
    count: int
    writable: bool
    buf: memoryview


class XenGntshr:
    """An open xengntshr handle."""

    def __init__(self, kernel):
        self._k = kernel
        self._shares: list[Share] = []
        self._ending: list[Share] = []   # unshared, still mapped by the peer
        self._open = True

    def share_pages(self, domid: int, count: int, writable: bool = True) -> Share:
        """xengntshr_share_pages: ``count`` zeroed pages, one run, granted
        to ``domid`` (read-only unless ``writable``)."""
        self._check_open()
        if count < 1:
            raise LocalError("share_pages of no pages")
        self._reap()
        pfn = self._k.alloc_pages(count)
        buf = memoryview(self._k.memory)[pfn * PAGE_SIZE:(pfn + count) * PAGE_SIZE]
        buf[:] = bytes(len(buf))
        gt = self._k.grant_table
        refs: list[int] = []
        try:
            for i in range(count):
                refs.append(gt.grant_foreign_access(domid, pfn + i, readonly=not writable))
        except BaseException:
            for ref in refs:
                gt.end_foreign_access(ref)
            buf.release()
            self._k.free_pages(pfn, count)
            raise
        share = Share(domid, refs, pfn, count, writable, buf)
        self._shares.append(share)
        return share

    def unshare(self, share: Share) -> bool:
        """xengntshr_unshare: end the grants; True if the pages are back
        now, False if the peer still maps some (they come back when it
        unmaps, at a later call of this handle)."""
        if share not in self._shares:
            raise HypercallError(errno.EINVAL, "xengntshr_unshare", "not a share of this handle")
        self._shares.remove(share)
        share.buf.release()
        self._ending.append(share)
        return share not in self._reap()

    def _reap(self) -> list[Share]:
        """End what can be ended; the shares still mapped by their peer."""
        gt = self._k.grant_table
        still = []
        for share in self._ending:
            left = []
            for ref in share.refs:
                try:
                    gt.end_foreign_access(ref)
                except HypercallError:
                    left.append(ref)
            share.refs = left
            if left:
                still.append(share)
            else:
                self._k.free_pages(share.pfn, share.count)
        self._ending = still
        return still

    def pending_unshares(self) -> int:
        """Shares unshared but still mapped by their peer."""
        return len(self._reap())

    def close(self) -> None:
        """xengntshr_close: unshare everything (pages the peer maps come
        back when it unmaps; until then they stay granted)."""
        for share in list(self._shares):
            self.unshare(share)
        self._open = False

    def _check_open(self) -> None:
        if not self._open:
            raise LocalError("the xengntshr handle is closed")

    def __enter__(self) -> XenGntshr:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open(kernel) -> XenGnttab:
    """xengnttab_open."""
    return XenGnttab(kernel)


def open_gntshr(kernel) -> XenGntshr:
    """xengntshr_open."""
    return XenGntshr(kernel)
