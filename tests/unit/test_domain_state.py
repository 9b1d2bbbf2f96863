"""A domain's state outside its RAM, written down and read back: each
owner's save/restore pair round-trips, and saved state is checked like
fresh input (nothing half-applied)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from xmp import devices
from xmp.errors import LocalError, XmpError
from xmp.hv.domain import Mapping, build_domain
from xmp.hv.state import populated_from_runs, populated_runs, restore_domain, save_domain
from xmp.sharedmem.evtchn import VIRQ_DOM_EXC, VIRQ_TIMER, PortState, PortTable, bind_interdomain
from xmp.sharedmem.shm import ShmNamespace
from xmp.toolstack.devices import Device
from xmp.toolstack.domains import DomainRecord
from xmp.topology import DomainConfig


def cfg(**over) -> DomainConfig:
    return DomainConfig.from_dict({"name": "g", "kernel": "xmp.guests.idle:main", "memory": 4, "maxmem": 8,
                                   "vcpus": 2, "maxvcpus": 4, **over})


def tables() -> tuple[PortTable, PortTable]:
    a, b = PortTable(1, 64), PortTable(0)
    offered = a.alloc_unbound(0)
    bind_interdomain(b, a, offered)
    a.bind_virq(VIRQ_TIMER, 1)
    a.bind_virq(VIRQ_DOM_EXC)
    a.bind_ipi(2)
    a.alloc_unbound(5)
    return a, b


def test_port_table_round_trips_through_json():
    a, _ = tables()
    back = PortTable.restore(json.loads(json.dumps(a.save())))
    assert back.save() == a.save()
    assert back.bound() == a.bound() and back.max_evtchns == 64
    assert back.virq_port(VIRQ_TIMER, 1) == a.virq_port(VIRQ_TIMER, 1)
    assert back.get(1).state == PortState.INTERDOMAIN
    with pytest.raises(Exception, match="EEXIST|already bound"):
        back.bind_virq(VIRQ_TIMER, 1)  # the VIRQ index came back too


@pytest.mark.parametrize("mangle, why", [
    (lambda d: d["ports"].append(list(d["ports"][0])), "listed twice"),
    (lambda d: d["ports"].append([64, 1, 0, 0, -1, 0]), "out of range"),
    (lambda d: d["ports"].append([9, 42, 0, 0, -1, 0]), "42"),
    (lambda d: d["ports"].append([9, 4, 0, 0, 0, 1]), "virq 0 on vcpu 1"),  # TIMER on vcpu 1 again
    (lambda d: d["ports"].append([9, "1", 0, 0, -1, 0]), "port entry"),
    (lambda d: d.pop("max_evtchns"), "max_evtchns"),
])
def test_a_malformed_port_table_is_refused(mangle, why):
    data = tables()[0].save()
    mangle(data)
    with pytest.raises(LocalError, match=why):
        PortTable.restore(data)


@given(st.lists(st.booleans(), max_size=300))
def test_populated_runs_round_trip(bits):
    pages = bytearray(bits)
    runs = populated_runs(pages)
    assert populated_from_runs(runs, len(pages)) == pages
    assert all(count > 0 for _, count in runs)


@pytest.mark.parametrize("runs, why", [([[0, 4], [2, 2]], "overlaps"), ([[6, 4]], "passes"),
                                       ([[0, 0]], "empty"), ([[0]], "not \\[first, count\\]")])
def test_bad_populated_runs_are_refused(runs, why):
    with pytest.raises(LocalError, match=why):
        populated_from_runs(runs, 8)


@pytest.fixture
def pair():
    ns = ShmNamespace()
    doms = [build_domain(ns, 7, cfg()), build_domain(ns, 8, cfg())]
    yield doms
    for d in doms:
        d.release()


def test_a_domains_state_round_trips(pair):
    old, new = pair
    a, _ = tables()
    old.ports = a
    old.evt.mask(3)
    old.evt.send(1)
    old.populated[700:710] = bytes(10)  # ballooned out
    old.tot_pages -= 10
    old.maptrack[4] = Mapping(0, [8, 9], True)
    pinned = []
    data = json.loads(json.dumps(save_domain(old, {1: 250_000_000})))
    timers = restore_domain(new, data, pinned.append)
    assert timers == {1: 250_000_000}
    assert new.ports.save()["ports"] == a.save()["ports"]
    assert new.populated == old.populated and new.tot_pages == old.tot_pages
    assert new.maptrack == old.maptrack and new.next_handle == 5 and pinned == [Mapping(0, [8, 9], True)]
    assert new.evt.is_masked(3) and new.evt.is_pending(1) and not new.evt.is_pending(2)
    assert save_domain(new, {1: 250_000_000}) == {**data, "domid": 8}


@pytest.mark.parametrize("mangle, why", [
    (lambda d: d.update(version=9), "version"),
    (lambda d: d.update(max_pages=4096), "saved for 4096 pages"),
    (lambda d: d.update(tot_pages=3), "does not match"),
    (lambda d: d.update(timers={"9": 5}), "vCPU the domain lacks"),
    (lambda d: d.update(pending=[5000]), "port list"),
    (lambda d: d.update(maptrack=[[1, 0, [8], False]]), "no granter"),
    (lambda d: d.pop("ports"), "malformed"),
])
def test_bad_domain_state_changes_nothing(pair, mangle, why):
    old, new = pair
    data = save_domain(old, {})
    mangle(data)
    before = (new.ports.save(), bytes(new.populated), new.tot_pages)
    with pytest.raises(LocalError, match=why):
        restore_domain(new, data)
    assert (new.ports.save(), bytes(new.populated), new.tot_pages) == before


def test_the_toolstack_record_round_trips():
    blk = devices.by_command("block")
    spec = devices.DeviceSpec(51712, "xvda", "stor", {"params": "/img", "mode": "w"},
                              {"virtual-device": "51712"})
    rec = DomainRecord(3, cfg(disk=["vdev=xvda, target=/img"]), [Device(3, 1, blk, spec)])
    names, ids = {1: "stor"}, {"stor": 12}
    data = json.loads(json.dumps(rec.save(names.__getitem__)))
    back = DomainRecord.restore(data, 20, ids.__getitem__)
    assert back.cfg == rec.cfg and back.domid == 20
    assert back.devices == [Device(20, 12, blk, spec)]
    data["devices"][0]["class"] = "tape"
    with pytest.raises(XmpError, match="class 'tape', which this host lacks"):
        DomainRecord.restore(data, 20, ids.__getitem__)
