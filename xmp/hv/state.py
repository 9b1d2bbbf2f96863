"""A domain's state, written down: the inventory save, restore and
migration work from.

What a domain is, and where each part lives:

In the guest's RAM (it moves with the memory, as in Xen)
    ``start_info`` (pfn 0), the console ring (pfn 1), the xenstore ring
    (pfn 2), the grant table (pfn 3…), the rings and data pages of its
    frontends, and whatever the guest kernel keeps there.

Written down by its owner here (JSON-safe data, checked on the way back in
like fresh input)
    * the hypervisor's port table (:meth:`PortTable.save`);
    * the pending and masked ports of its event object (the 2-level
      bitmaps of ``shared_info``, which xmp keeps beside the RAM);
    * the populated-page set and the reservation (``tot_pages``,
      ``max_pages``), as runs of pfns;
    * the grants it maps from others (maptrack), whose pins in the
      granters' active entries are derived from it;
    * its one-shot timers, as time *remaining* per vCPU, so a restore on
      another host (another monotonic clock) re-arms them relative to now;
    * its vCPUs (how many are online of how many);
    * the toolstack's record of it (config and devices:
      :meth:`xmp.toolstack.domains.DomainRecord.save`).

Not written down, rebuilt instead
    its process, hypercall channel and the descriptors peers hold of it;
    each driver's state outside RAM (``xmp/drivers/<kind>/state.py`` says
    how it is rebuilt: frontends reconnect and re-issue, backends start
    fresh on the destination).

Nothing here is on a hot path: it is read only when a domain is saved.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from xmp.errors import LocalError
from xmp.hv.domain import Domain, Mapping
from xmp.sharedmem.evtchn import EVTCHN_2L_NR_CHANNELS, PortTable

if TYPE_CHECKING:
    from collections.abc import Callable

STATE_VERSION = 1


def populated_runs(populated: bytes | bytearray) -> list[list[int]]:
    """The populated pfns as ``[first, count]`` runs."""
    runs: list[list[int]] = []
    start = None
    for pfn, present in enumerate(populated):
        if present and start is None:
            start = pfn
        elif not present and start is not None:
            runs.append([start, pfn - start])
            start = None
    if start is not None:
        runs.append([start, len(populated) - start])
    return runs


def populated_from_runs(runs: list[list[int]], max_pages: int) -> bytearray:
    out = bytearray(max_pages)
    end = 0
    for run in runs:
        if len(run) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in run):
            raise LocalError(f"a saved populated run {run!r} is not [first, count]")
        first, count = run
        if first < end or count <= 0 or first + count > max_pages:
            raise LocalError(f"a saved populated run {run!r} overlaps, is empty or passes "
                             f"the domain's {max_pages} pages")
        out[first:first + count] = b"\1" * count
        end = first + count
    return out


def save_domain(dom: Domain, timers: dict[int, int]) -> dict[str, Any]:
    """Everything the hypervisor holds for ``dom`` outside its RAM.
    ``timers``: vCPU -> nanoseconds until its one-shot timer fires."""
    ports = dom.ports.save()
    bound = [n for n, *_ in ports["ports"]]
    return {
        "version": STATE_VERSION,
        "domid": dom.domid,
        "ports": ports,
        "pending": [p for p in bound if dom.evt.is_pending(p)],
        "masked": [p for p in range(1, dom.ports.max_evtchns) if dom.evt.is_masked(p)],
        "tot_pages": dom.tot_pages,
        "max_pages": dom.max_pages,
        "populated": populated_runs(dom.populated),
        "maptrack": [[h, m.granter, list(m.refs), m.readonly] for h, m in sorted(dom.maptrack.items())],
        "timers": {str(v): max(0, t) for v, t in sorted(timers.items())},
        "vcpus": {"online": dom.cfg.vcpus, "max": dom.cfg.maxvcpus},
    }


def restore_domain(dom: Domain, data: dict[str, Any],
                   pin: Callable[[Mapping], None] | None = None) -> dict[int, int]:
    """Apply :func:`save_domain`'s data to a freshly built ``dom`` (same
    size); returns the timers to re-arm (vCPU -> nanoseconds from now).
    ``pin`` re-pins each mapping in its granter (the caller checks the
    granter's entry, as a fresh map would); without it, saved mappings are
    refused.  Everything is checked before anything changes."""
    try:
        if data["version"] != STATE_VERSION:
            raise LocalError(f"saved domain state version {data['version']!r}, expected {STATE_VERSION}")
        ports = PortTable.restore(data["ports"])
        pending = _port_list(data["pending"])
        masked = _port_list(data["masked"])
        max_pages = int(data["max_pages"])
        if max_pages != len(dom.populated):
            raise LocalError(f"saved for {max_pages} pages, the domain has {len(dom.populated)}")
        populated = populated_from_runs(data["populated"], max_pages)
        tot_pages = int(data["tot_pages"])
        if tot_pages != sum(populated):
            raise LocalError(f"tot_pages {tot_pages} does not match the {sum(populated)} pages populated")
        maptrack = {int(h): Mapping(int(g), [int(r) for r in refs], bool(ro))
                    for h, g, refs, ro in data["maptrack"]}
        if maptrack and pin is None:
            raise LocalError("the saved domain maps others' grants, and no granter is here to pin them")
        timers = {int(v): int(t) for v, t in data["timers"].items()}
        if any(not 0 <= v < dom.cfg.maxvcpus or t < 0 for v, t in timers.items()):
            raise LocalError(f"saved timers {timers!r} name a vCPU the domain lacks")
        if any(not 0 <= p.vcpu < dom.cfg.maxvcpus for p in ports.bound().values()):
            raise LocalError("a saved port is bound to a vCPU the domain lacks")
    except (KeyError, TypeError, ValueError) as exc:
        raise LocalError(f"saved domain state is malformed: {exc!r}") from None
    for m in maptrack.values():
        assert pin is not None
        pin(m)
    dom.ports, dom.populated, dom.tot_pages, dom.max_pages = ports, populated, tot_pages, max_pages
    dom.maptrack = maptrack
    dom.next_handle = max(maptrack, default=0) + 1
    for port, p in ports.bound().items():
        dom.evt.set_vcpu(port, p.vcpu)
    for port in masked:
        dom.evt.mask(port)
    for port in pending:
        dom.evt.send(port)
    return timers


def _port_list(ports: Any) -> list[int]:
    if not isinstance(ports, list) or not all(isinstance(p, int) and 0 < p < EVTCHN_2L_NR_CHANNELS
                                              for p in ports):
        raise LocalError(f"a saved port list {ports!r} is malformed")
    return ports
