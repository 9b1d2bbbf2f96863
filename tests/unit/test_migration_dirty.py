"""The toolstack's log-dirty API: windows stitched into one bitmap, CLEAN
vs PEEK, off on exit.  The hypervisor side here is a stand-in that keeps a
dirty set (the real one is tested in tests/integration/test_logdirty.py)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from xmp.hv.logdirty import SHADOW_OP_MAX_PAGES
from xmp.migration.dirty import DirtyLog
from xmp.sharedmem.logdirty import bitmap_pfns, bitmap_size

pytestmark = pytest.mark.timeout(10)


class Hv:
    def __init__(self, dirty):
        self.dirty, self.calls, self.on = set(dirty), [], False

    def logdirty_enable(self, dom, prefer="userfaultfd"):
        self.on = True
        return "hash"

    def logdirty_scan(self, dom, first=0, count=None, clean=True):
        self.calls.append((first, count, clean))
        bm = bytearray(bitmap_size(count))
        for pfn in [p for p in self.dirty if first <= p < first + count]:
            bm[(pfn - first) >> 3] |= 1 << ((pfn - first) & 7)
            if clean:
                self.dirty.discard(pfn)
        return bm

    def logdirty_disable(self, dom):
        self.on = False


def test_a_large_domain_is_read_in_windows_and_stitched_bit_exactly():
    n = 2 * SHADOW_OP_MAX_PAGES + 1000
    dirty = {0, 7, 8, SHADOW_OP_MAX_PAGES - 1, SHADOW_OP_MAX_PAGES, 2 * SHADOW_OP_MAX_PAGES + 999}
    hv = Hv(dirty)
    with DirtyLog(hv, SimpleNamespace(max_pages=n)) as log:
        assert hv.on and log.tracker == "hash"
        peek = log.peek()
        assert peek.pfns == sorted(dirty) and peek.count == len(dirty) and peek.nr_pfns == n
        w = SHADOW_OP_MAX_PAGES
        assert [c[:2] for c in hv.calls] == [(0, w), (w, w), (2 * w, 1000)]
        assert log.clean().pfns == sorted(dirty)
        assert log.clean().pfns == []
    assert not hv.on


def test_bitmap_pfns_reads_xens_layout():
    assert bitmap_pfns(bytes([0b1000_0001, 0, 0b10])) == [0, 7, 17]
    assert bitmap_pfns(bytes([1]), first=64) == [64]
