"""The guest's page allocator and balloon driver against the in-memory
store and a hypervisor double that keeps Xen's reservation rules
(decrease_reservation stops at the first page it will not take;
populate_physmap is refused past the pool); and xl's memory sizes."""

from __future__ import annotations

import errno

import pytest

from xmp.domain_proc.balloon import BalloonDriver, granted_frames
from xmp.domain_proc.pages import BALLOONED, FREE, USED, PageAllocator
from xmp.errors import HypercallError, LocalError
from xmp.sharedmem.grant import GrantTable
from xmp.testing import settle, store_client
from xmp.toolstack.memory import parse_mem_size_kb
from xmp.xenstore.server import Quota, XenStore

pytestmark = pytest.mark.timeout(10)
DOMID = 3


# -- the allocator -------------------------------------------------------------


def test_alloc_takes_the_lowest_free_run_and_reuses_what_was_freed():
    pages = PageAllocator(4, 20, 32)
    assert [pages.alloc(2), pages.alloc(3), pages.alloc(1)] == [4, 6, 9]
    pages.free(6, 3)
    assert pages.alloc(2) == 6 and pages.alloc(2) == 10  # 8 alone is too short for 2
    assert pages.alloc(1) == 8
    with pytest.raises(MemoryError, match="no run of 9 free pages"):
        pages.alloc(9)  # 12..19 is 8 pages; 20..31 are ballooned out, not ours


@pytest.mark.parametrize("pfn, n", [(2, 1), (4, 3), (30, 1), (12, 0)])
def test_free_refuses_what_alloc_did_not_hand_out(pfn, n):
    pages = PageAllocator(4, 20, 32)
    pages.alloc(2)
    with pytest.raises(LocalError, match="not taken with alloc_pages"):
        pages.free(pfn, n)


def test_the_balloon_takes_the_highest_free_pages_and_skips_those_kept():
    pages = PageAllocator(4, 12, 16)
    used = pages.alloc(2)
    assert pages.take_free(3, keep={11}) == [10, 9, 8]
    assert [pages.state[p] for p in range(4, 16)] == [USED] * 2 + [FREE] * 2 + [BALLOONED] * 3 + [FREE] \
        + [BALLOONED] * 4
    assert pages.ballooned(5) == [8, 9, 10, 12, 13]
    pages.put_free([8, 9])
    assert pages.count(FREE) == 5 and used == 4
    with pytest.raises(LocalError):
        pages.put_free([4])


def test_granted_frames_reads_only_the_entries_asked():
    table = bytearray(4096)
    gt = GrantTable(table, DOMID)
    gt.grant_access(8, 0, 100)
    gt.grant_access(9, 0, 101, readonly=True)
    gt.grant_access(10, 0, 102)
    gt.end_foreign_access(10)
    assert gt.high_water == 11
    assert granted_frames(table, gt.high_water) == {100, 101}
    assert granted_frames(table, 9) == {100}


# -- the balloon driver --------------------------------------------------------


class Hypervisor:
    """memory_op as the supervisor answers it, for one domain."""

    def __init__(self, populated: set[int], pool: int, mapped: frozenset[int] = frozenset()):
        self.populated, self.pool, self.mapped = populated, pool, mapped
        self.calls: list[tuple[str, list[int]]] = []

    def current_reservation(self) -> int:
        return len(self.populated)

    def decrease_reservation(self, pfns: list[int]) -> int:
        self.calls.append(("decrease", list(pfns)))
        done = 0
        for pfn in pfns:
            if pfn not in self.populated or pfn in self.mapped:
                break
            self.populated.discard(pfn)
            done += 1
        self.pool += done
        return done

    def populate_physmap(self, pfns: list[int]) -> int:
        self.calls.append(("populate", list(pfns)))
        if len(pfns) > self.pool:
            raise HypercallError(errno.ENOMEM, "populate_physmap", "the host pool is empty")
        self.populated |= set(pfns)
        self.pool -= len(pfns)
        return len(pfns)


def balloon(nr_pages=64, max_pages=128, pool=1000, mapped=frozenset(), quota=None):
    store = XenStore(quota_overrides={DOMID: quota} if quota else None)
    dom0 = store_client(store, 0, privileged=True)
    dom0.write(f"/local/domain/{DOMID}/memory/target", str(nr_pages * 4))
    dom0.set_perms(f"/local/domain/{DOMID}/memory/target", ["n0", f"r{DOMID}"])
    xs = store_client(store, DOMID)
    pages = PageAllocator(8, nr_pages, max_pages)
    hv = Hypervisor(set(range(nr_pages)), pool, mapped)
    table = bytearray(4096)
    gt = GrantTable(table, DOMID)
    said: list[str] = []
    drv = BalloonDriver(xs, hv, pages, gt, table, said.append)
    settle(xs)

    def target(kb) -> None:
        dom0.write(f"/local/domain/{DOMID}/memory/target", str(kb))
        settle(xs)
    return drv, pages, hv, gt, said, target


def test_down_then_up_moves_the_reservation_to_the_target():
    drv, pages, hv, _gt, said, target = balloon()
    assert hv.calls == []  # the watch fired at once, at the target already
    used = pages.alloc(4)  # 8..11
    target(40 * 4)
    assert len(hv.populated) == 40 and said == []
    assert hv.calls == [("decrease", list(range(63, 39, -1)))]  # the highest free pages
    assert all(p in hv.populated for p in range(used, used + 4))
    target(100 * 4)
    assert len(hv.populated) == 100 and pages.count(BALLOONED) == 28
    assert hv.calls[-1] == ("populate", list(range(40, 100)))  # the lowest ballooned-out ones
    assert pages.count(FREE) == 100 - 8 - 4


def test_granted_and_mapped_pages_are_never_given_away():
    drv, pages, hv, gt, said, target = balloon(nr_pages=32, max_pages=32, mapped=frozenset({30}))
    run = pages.alloc(24)
    pages.free(run, 24)            # a careless driver frees pages ...
    gt.grant_access(8, 0, 31)      # ... one of them still granted
    target(8 * 4)                  # every free page asked for
    assert 31 in hv.populated and 30 in hv.populated  # granted, and mapped by a peer
    assert len(hv.populated) == 10 and pages.state[31] == FREE and pages.state[30] == FREE
    assert said == ["xen:balloon: 2 of 24 pages could not be given back (not free, or granted): "
                    "will retry as pages are freed"]
    gt.end_foreign_access(8)       # the grant ends and the page is freed again: the balloon retries
    drv.pages_freed()
    assert 31 not in hv.populated and 30 in hv.populated and len(hv.calls) == 3
    assert hv.calls[-1] == ("decrease", [31])  # 30 was refused once: not asked again


def test_a_short_pool_and_a_bad_target_are_told_and_nothing_breaks():
    drv, pages, hv, _gt, said, target = balloon(nr_pages=16, max_pages=64, pool=10)
    target(64 * 4)
    assert said == ["xen:balloon: populate_physmap of 48 pages failed: "
                    f"{HypercallError(errno.ENOMEM, 'populate_physmap', 'the host pool is empty')}"]
    assert len(hv.populated) == 16 and pages.count(BALLOONED) == 48
    target("lots")
    assert said[-1] == "xen:balloon: memory/target b'lots' is not a size in KiB: ignored"
    assert drv.target_pages == 64


def test_a_refused_target_watch_is_told_on_the_console():
    *_, said, _target = balloon(quota=Quota(watches=0))
    assert said == ["xen:balloon: Failed to set memory/target watcher (E2BIG): xmp mem-set will not be seen"]


# -- xl's sizes -------------------------------------------------------------------


@pytest.mark.parametrize("text, kb", [("512m", 524288), ("1g", 1048576), ("1G", 1048576), ("2t", 2 << 30),
                                      ("256k", 256), ("4096b", 4), ("4095b", 3), ("64", 65536),
                                      (" 64M", 65536), ("+8m", 8192), ("0", 0)])
def test_memory_sizes_parse_as_xl_does(text, kb):
    assert parse_mem_size_kb(text) == kb


@pytest.mark.parametrize("text", ["", "m", "12q", "1mb", "1.5g", "-1m", "0x10", "1 g"])
def test_memory_sizes_xl_refuses(text):
    with pytest.raises(ValueError, match="invalid memory size"):
        parse_mem_size_kb(text)
