"""The xenstore domain's rights, exactly (XEN_DOMCTL_CDF_xs_domain): it may
map a domain's store page (grant ref 1, which the builder offers it) and
nothing else of it, bind the store ports offered to it, hear VIRQ_DOM_EXC,
and ask whether domains exist -- and no other privileged thing.  The
handlers run here on real domain records (RAM, grant tables, port tables),
without processes."""

from __future__ import annotations

import errno

import pytest

from xmp.domid import DOMID_DOM0, DOMID_XENSTORE
from xmp.errors import GrantError, HypercallError
from xmp.hv.domain import Domain, build_domain
from xmp.hv.hypercalls import HypercallHandlers, may_call
from xmp.sharedmem.evtchn import VIRQ_DOM_EXC, VIRQ_TIMER, PortState
from xmp.sharedmem.grant import GNTTAB_RESERVED_CONSOLE, GNTTAB_RESERVED_XENSTORE
from xmp.sharedmem.shm import ShmNamespace
from xmp.startinfo import XENSTORE_PFN
from xmp.topology import DomainConfig

pytestmark = pytest.mark.timeout(30)


def cfg(name: str) -> DomainConfig:
    return DomainConfig.from_dict({"name": name, "kernel": "xmp.guests.idle:main", "memory": 1})


class Hv(HypercallHandlers):
    """The hypercall handlers over a domain table, as the supervisor mixes them in."""

    def __init__(self):
        self.ns = ShmNamespace()
        self.domains: dict[int, Domain] = {}
        self.xs_domid: int | None = None

    def lookup(self, domid: int, op: str) -> Domain:
        if domid not in self.domains:
            raise HypercallError(errno.ESRCH, op, f"no domain {domid}")
        return self.domains[domid]

    def add(self, domid: int, name: str, xs: bool = False) -> Domain:
        store = DOMID_DOM0 if self.xs_domid is None else self.xs_domid
        dom = build_domain(self.ns, domid, cfg(name), store_domid=store)
        dom.xs_domain = xs
        if xs:
            self.xs_domid = domid
        self.domains[domid] = dom
        return dom


@pytest.fixture
def hv():
    hv = Hv()
    hv.add(DOMID_XENSTORE, "Xenstore", xs=True)
    hv.add(DOMID_DOM0, "Domain-0")
    hv.add(1, "g")
    yield hv
    for dom in hv.domains.values():
        dom.release()


def test_only_what_serving_the_store_needs_of_the_privileged_hypercalls(hv):
    xs, dom0, g = hv.domains[DOMID_XENSTORE], hv.domains[DOMID_DOM0], hv.domains[1]
    assert {"createdomain", "destroydomain", "max_mem"} <= set(Hv.HYPERCALLS["domctl"])
    allowed = {(op, cmd) for op in ("domctl", "sysctl") for cmd in Hv.HYPERCALLS[op] if may_call(xs, op, cmd)}
    assert allowed == {("domctl", "getdomaininfo"), ("sysctl", "getdomaininfolist")}
    assert not any(may_call(g, op, cmd) for op in ("domctl", "sysctl") for cmd in Hv.HYPERCALLS[op])
    assert all(may_call(dom0, op, cmd) for op in ("domctl", "sysctl") for cmd in Hv.HYPERCALLS[op])
    assert may_call(g, "grant_table_op", "copy") and may_call(xs, "event_channel_op", "bind_interdomain")


def test_it_maps_a_domains_store_page_and_nothing_else(hv):
    xs, g = hv.domains[DOMID_XENSTORE], hv.domains[1]
    ret, fds = hv.hc_grant_table_op_map_grant_ref(xs, {"dom": 1, "refs": [GNTTAB_RESERVED_XENSTORE]})
    assert ret["frames"] == [XENSTORE_PFN] and fds == [g.ram.fd]
    assert g.grants.pins(GNTTAB_RESERVED_XENSTORE)[1] == 1  # pinned writable
    assert xs.maptrack[ret["handle"]].refs == [GNTTAB_RESERVED_XENSTORE]
    for refs in ([GNTTAB_RESERVED_CONSOLE], [GNTTAB_RESERVED_XENSTORE, GNTTAB_RESERVED_CONSOLE], [8]):
        with pytest.raises(HypercallError, match=r"xenstore\) maps a domain's store page") as exc:
            hv.hc_grant_table_op_map_grant_ref(xs, {"dom": 1, "refs": refs})
        assert exc.value.errno == errno.EPERM
    assert g.grants.pins(GNTTAB_RESERVED_CONSOLE) == (0, 0)


def test_a_store_page_not_offered_to_it_is_refused_by_the_grant_check(hv):
    xs = hv.domains[DOMID_XENSTORE]
    older = build_domain(hv.ns, 7, cfg("old"))  # built as if dom0 ran xenstored: ref 1 names dom0
    hv.domains[7] = older
    with pytest.raises(GrantError):
        hv.hc_grant_table_op_map_grant_ref(xs, {"dom": 7, "refs": [GNTTAB_RESERVED_XENSTORE]})
    assert older.grants.pins(GNTTAB_RESERVED_XENSTORE) == (0, 0)


def test_a_guest_maps_nothing_not_even_a_store_page(hv):
    other = hv.add(2, "h")
    with pytest.raises(HypercallError) as exc:
        hv.hc_grant_table_op_map_grant_ref(other, {"dom": 1, "refs": [GNTTAB_RESERVED_XENSTORE]})
    assert exc.value.errno == errno.EPERM


def test_store_ports_are_offered_to_it_and_bound_by_it_alone(hv):
    xs, dom0, g = hv.domains[DOMID_XENSTORE], hv.domains[DOMID_DOM0], hv.domains[1]
    for dom in (dom0, g):
        assert dom.ports.get(dom.store_port).remote_dom == DOMID_XENSTORE
        assert dom.ports.get(dom.console_port).remote_dom == DOMID_DOM0
    with pytest.raises(HypercallError, match="not offered"):
        hv.hc_event_channel_op_bind_interdomain(dom0, {"remote_dom": 1, "remote_port": g.store_port})
    ret, _ = hv.hc_event_channel_op_bind_interdomain(xs, {"remote_dom": 1, "remote_port": g.store_port})
    assert g.ports.get(g.store_port).state == PortState.INTERDOMAIN
    assert xs.ports.get(ret["port"]).remote_dom == 1


def test_vir_dom_exc_is_heard_by_dom0_and_xenstore_only(hv):
    xs, dom0, g = hv.domains[DOMID_XENSTORE], hv.domains[DOMID_DOM0], hv.domains[1]
    with pytest.raises(HypercallError, match="may not hear VIRQ_DOM_EXC") as exc:
        hv.hc_event_channel_op_bind_virq(g, {"virq": VIRQ_DOM_EXC})
    assert exc.value.errno == errno.EPERM
    hv.hc_event_channel_op_bind_virq(g, {"virq": VIRQ_TIMER})  # its own VIRQs it binds as before
    ports = {d.domid: hv.hc_event_channel_op_bind_virq(d, {"virq": VIRQ_DOM_EXC})[0] for d in (xs, dom0)}
    hv.raise_dom_exc()
    for d in (xs, dom0):
        assert ports[d.domid] in d.evt.scan()
