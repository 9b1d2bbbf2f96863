"""A running domain's memory, as libxl sets it: the balloon target
(``libxl_set_memory_target``: ``memory/target``, what ``xmp mem-set``
changes) and the hypervisor's cap (``libxl_domain_setmaxmem``:
``domctl max_mem`` and ``memory/static-max``, what ``xmp mem-max``
changes).

Every check comes before anything changes, so a refused request leaves the
domain as it was.  A new target is then written and the toolstack waits
for the guest's balloon driver to reach it, as
``libxl_wait_for_memory_target`` does: a guest that does not (no balloon
driver, or too little free memory to give) keeps what it has, and the
answer says so once the timeout passes.  The target stays written, so a
guest that gets there later still does.
"""

from __future__ import annotations

import errno
import re
import time
from typing import TYPE_CHECKING, Any

from xmp.domid import DOMID_DOM0
from xmp.errors import HypercallError
from xmp.hv.domain import Domain, DomState
from xmp.sharedmem.shm import PAGE_SIZE
from xmp.toolstack.pending import Pending

if TYPE_CHECKING:
    from xmp.toolstack.domains import Toolstack

KIB_PER_PAGE = PAGE_SIZE // 1024
TARGET_WAIT = 10.0   # seconds `xmp mem-set` waits for the guest by default
POLL = 0.05

_SHIFTS = {"t": 30, "g": 20, "m": 10, "": 10, "k": 0}


def parse_mem_size_kb(text: str) -> int:
    """xl's parse_mem_size_kb (tools/xl/xl_utils.c): a decimal number and
    at most one unit letter, b k m g t, any case; a bare number is MiB, as
    there (its switch falls from '\\0' into 'm').  ValueError otherwise."""
    m = re.fullmatch(r"\s*([+-]?\d+)([a-zA-Z]?)", text)
    if m is None:
        raise ValueError(f"invalid memory size: {text}")
    value, unit = int(m.group(1)), m.group(2).lower()
    if value < 0:
        raise ValueError(f"invalid memory size: {text}")
    if unit == "b":
        return value >> 10
    if unit not in _SHIFTS:
        raise ValueError(f"invalid memory size: {text}")
    return value << _SHIFTS[unit]


def _check_domain(dom: Domain, op: str) -> None:
    if dom.domid == DOMID_DOM0:
        raise HypercallError(errno.EINVAL, op, "Domain-0 has no balloon driver in xmp")
    if dom.state == DomState.DYING:
        raise HypercallError(errno.ESRCH, op, f"dom{dom.domid} is dying")


def set_memory_target(ts: Toolstack, dom: Domain, target_kb: int, timeout: float = TARGET_WAIT) -> Pending:
    """``xmp mem-set``: refused (nothing changed) above the domain's maximum,
    below its special pages, or when the host pool cannot give what it
    needs to grow; else ``memory/target`` is written and the answer waits
    (up to ``timeout`` seconds) for the guest to reach it."""
    op = "mem-set"
    _check_domain(dom, op)
    rec = ts.record(dom)
    pages = target_kb // KIB_PER_PAGE
    if pages > dom.max_pages:
        raise HypercallError(errno.EINVAL, op,
                             f"{target_kb} KiB is above {dom.name}'s maximum of "
                             f"{dom.max_pages * KIB_PER_PAGE} KiB (xmp mem-max raises it, "
                             f"up to maxmem = {len(dom.populated) * KIB_PER_PAGE} KiB)")
    if pages < dom.reserved_pfns:
        raise HypercallError(errno.EINVAL, op,
                             f"{target_kb} KiB is below the {dom.reserved_pfns * KIB_PER_PAGE} KiB "
                             f"of {dom.name}'s special pages (start_info, rings, grant table)")
    more = pages - dom.tot_pages
    if more > ts.sup.pool_pages:
        raise HypercallError(errno.ENOMEM, op,
                             f"{dom.name} would need {more * KIB_PER_PAGE} KiB more; the host pool has "
                             f"{ts.sup.pool_pages * KIB_PER_PAGE} KiB free")
    ts.xs.write(f"/local/domain/{dom.domid}/memory/target", str(target_kb),
                f"memory target of dom{dom.domid}")
    rec.target_kb = target_kb
    ts.sup.log(f"dom{dom.domid} {dom.name!r}: memory target {target_kb} KiB "
               f"(holds {dom.tot_pages * KIB_PER_PAGE} KiB)")
    pending = Pending()
    deadline = time.monotonic() + max(0.0, timeout)
    domid = dom.domid

    def check() -> None:
        d = ts.sup.domains.get(domid)
        if d is not dom or d.state == DomState.DYING:
            pending.fail(HypercallError(errno.ESRCH, op, f"dom{domid} went away"))
        elif d.tot_pages == pages or timeout <= 0:
            pending.resolve(_memory(d))
        elif time.monotonic() >= deadline:
            msg = (f"dom{domid} {d.name!r} did not reach its memory target of {target_kb} KiB "
                   f"within {timeout:g} s: it keeps {d.tot_pages * KIB_PER_PAGE} KiB "
                   "(no balloon driver, or not enough free memory to give); the target stays set")
            ts.sup.log(msg)
            pending.fail(HypercallError(errno.ETIMEDOUT, op, msg))
        else:
            ts.sup.call_later(POLL, check)
    check()
    return pending


def set_max_memory(ts: Toolstack, dom: Domain, max_kb: int) -> dict[str, Any]:
    """``xmp mem-max``: the hypervisor's cap on the domain's reservation
    (the guest is not told).  Refused, nothing changed, below the current
    target or reservation, or above maxmem (the size its RAM was built
    with)."""
    op = "mem-max"
    _check_domain(dom, op)
    rec = ts.record(dom)
    pages = max_kb // KIB_PER_PAGE
    if pages > len(dom.populated):
        raise HypercallError(errno.EINVAL, op,
                             f"{max_kb} KiB is above {dom.name}'s maxmem of "
                             f"{len(dom.populated) * KIB_PER_PAGE} KiB (its RAM's size, fixed at creation)")
    if max_kb < rec.target_kb:
        raise HypercallError(errno.EINVAL, op,
                             f"{max_kb} KiB is below {dom.name}'s memory target of {rec.target_kb} KiB "
                             "(lower it first with xmp mem-set)")
    if pages < dom.tot_pages:
        raise HypercallError(errno.EINVAL, op,
                             f"{max_kb} KiB is below the {dom.tot_pages * KIB_PER_PAGE} KiB "
                             f"{dom.name} holds now")
    dom.max_pages = pages
    ts.xs.write(f"/local/domain/{dom.domid}/memory/static-max", str(max_kb),
                f"memory maximum of dom{dom.domid}")
    ts.sup.log(f"dom{dom.domid} {dom.name!r}: memory maximum {max_kb} KiB")
    return _memory(dom)


def _memory(dom: Domain) -> dict[str, Any]:
    return {"domid": dom.domid, "mem_kb": dom.tot_pages * KIB_PER_PAGE,
            "maxmem_kb": dom.max_pages * KIB_PER_PAGE}
