"""Log-dirty mode, the hypervisor's half: XEN_DOMCTL_shadow_op's
ENABLE_LOGDIRTY / CLEAN / PEEK / OFF on a domain, and the marks Xen makes
on the paths a guest-side tracker cannot see (a writable grant unmapped, a
grant copy into a page).  The trackers themselves are
:mod:`xmp.sharedmem.logdirty`; the toolstack's API over this is
:mod:`xmp.migration.dirty`.  Mixed into the supervisor with the other
hypercall handlers.
"""

from __future__ import annotations

import base64
import errno
from typing import Any

from xmp.domid import DOMID_SELF
from xmp.errors import HypercallError, LocalError
from xmp.hv.domain import Domain, DomState, Mapping
from xmp.hypercall import arg
from xmp.sharedmem.logdirty import open_tracker

# XEN_DOMCTL_SHADOW_OP_* (domctl.h)
SHADOW_OP_OFF, SHADOW_OP_ENABLE_LOGDIRTY, SHADOW_OP_CLEAN, SHADOW_OP_PEEK = 0, 2, 11, 12
SHADOW_OP_MAX_PAGES = 262144  # a 32 KiB bitmap, ~44 KiB in base64: well inside a reply


class LogDirtyOps:
    domains: dict[int, Domain]
    logdirty_domains: int = 0  # how many are in log-dirty mode (grant copies mark only then)

    def lookup(self, domid: int, op: str) -> Domain:
        raise NotImplementedError

    def log(self, msg: str) -> None: ...

    def grant_unmapped(self, granter: Domain, m: Mapping) -> None:
        """Unpin a mapping's grants.  Writes through a writable one never
        passed the granter's own (tracked) mapping: log-dirty marks its
        frames now, as Xen's unmap marks a writable grant's page dirty."""
        granter.grants.unmap_grant_ref(m.refs, m.readonly)
        if granter.logdirty is not None and not m.readonly:
            for frame in m.frames:
                granter.logdirty.mark(frame)

    def _copied_into(self, caller: Domain, domid: int, ref: int | None, frame: int) -> None:
        """A grant copy wrote a page through the hypervisor's mapping, which
        no guest-side tracking sees: log-dirty marks it (paging_mark_dirty
        in Xen's gnttab_copy)."""
        dom = caller if domid in (DOMID_SELF, caller.domid) else self.domains.get(domid)
        if dom is None or dom.logdirty is None:
            return
        if ref is not None:
            frame = dom.own_table.entry(ref)[2]
        dom.logdirty.mark(frame)

    # -- domctl shadow_op: log-dirty mode -----------------------------------

    def logdirty_enable(self, dom: Domain, prefer: str = "userfaultfd") -> str:
        """XEN_DOMCTL_SHADOW_OP_ENABLE_LOGDIRTY: from now on every write to
        the domain's RAM is logged; answers which tracker does it."""
        op = "shadow_op"
        if dom.privileged or dom.state == DomState.DYING:
            raise HypercallError(errno.EINVAL, op, f"dom{dom.domid} cannot be put in log-dirty mode")
        if dom.logdirty is not None:  # as Xen: enabling twice is EINVAL
            raise HypercallError(errno.EINVAL, op, f"dom{dom.domid} is already in log-dirty mode")
        tracker, why = open_tracker(dom.pid, dom.ram.fd, dom.ram_map, dom.max_pages, dom.populated, prefer)
        dom.logdirty = tracker
        self.logdirty_domains += 1
        self.log(f"dom{dom.domid} log-dirty on ({tracker.kind}{': ' + why if why else ''})")
        return tracker.kind

    def logdirty_scan(self, dom: Domain, first: int = 0, count: int | None = None,
                      clean: bool = True) -> bytearray:
        """SHADOW_OP_CLEAN (``clean``) or PEEK: the dirty bitmap of pfns
        [first, first+count).  The reserved pages (start_info, console,
        xenstore, grant table) are always dirty: dom0 writes the rings
        through its own mappings, which nothing tracks."""
        if dom.logdirty is None:
            raise HypercallError(errno.EINVAL, "shadow_op", f"dom{dom.domid} is not in log-dirty mode")
        for pfn in range(dom.reserved_pfns):
            dom.logdirty.mark(pfn)
        try:
            return dom.logdirty.scan(first, count, clean=clean)
        except LocalError as exc:
            raise HypercallError(errno.EINVAL, "shadow_op", str(exc)) from None

    def logdirty_disable(self, dom: Domain) -> None:
        """SHADOW_OP_OFF."""
        if dom.logdirty is not None:
            dom.logdirty.close()
            dom.logdirty = None
            self.logdirty_domains -= 1
            self.log(f"dom{dom.domid} log-dirty off")

    def hc_domctl_shadow_op(self, caller: Domain, args: dict) -> tuple[Any, list[int]]:
        """XEN_DOMCTL_shadow_op's log-dirty subset, by Xen's numbers: OFF 0,
        ENABLE_LOGDIRTY 2, CLEAN 11, PEEK 12, in ``sop``.  CLEAN and PEEK answer
        ``{"bitmap": base64, "first": pfn, "pages": n, "dirty_count": k}``
        for ``pages`` pfns from ``first`` (xmp's: the bitmap travels in the
        reply, so a caller pages through a large domain)."""
        op = "shadow_op"
        dom = self.lookup(arg(args, "domid", int, op), op)
        mode = arg(args, "sop", int, op)  # xen_domctl_shadow_op.op (Channel.call takes "op")
        if mode == SHADOW_OP_OFF:
            self.logdirty_disable(dom)
            return 0, []
        if mode == SHADOW_OP_ENABLE_LOGDIRTY:
            return {"tracker": self.logdirty_enable(dom, arg(args, "tracker", str, op, "userfaultfd"))}, []
        if mode not in (SHADOW_OP_CLEAN, SHADOW_OP_PEEK):
            raise HypercallError(errno.EINVAL, op, f"shadow op {mode} is not supported")
        first = arg(args, "first", int, op, 0)
        pages = arg(args, "pages", int, op, SHADOW_OP_MAX_PAGES)
        if not 0 < pages <= SHADOW_OP_MAX_PAGES:
            raise HypercallError(errno.EINVAL, op, f"pages must be 1..{SHADOW_OP_MAX_PAGES}")
        pages = min(pages, max(dom.max_pages - first, 0))
        bitmap = self.logdirty_scan(dom, first, pages, clean=mode == SHADOW_OP_CLEAN)
        dirty = sum(bin(b).count("1") for b in bitmap)
        return {"bitmap": base64.b64encode(bitmap).decode(), "first": first, "pages": pages,
                "dirty_count": dirty, "broken": dom.logdirty.broken if dom.logdirty else None}, []

