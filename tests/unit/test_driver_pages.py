"""A frontend's ring and buffer pages are a driver's (``alloc_pages(...,
driver=True)``): the balloon never takes them while they are in use, and
after a move they are free again for the frontend opened afresh -- the
suspend context does not carry them as the guest's."""

from __future__ import annotations

import pytest
from test_kernel_context import FakeLoop, FakeXen

from xmp.domain_proc.kernel import Kernel
from xmp.domain_proc.pages import USED
from xmp.drivers.net.frontend import PAGES_PER_QUEUE, NetFront
from xmp.drivers.vping.frontend import VpingFront
from xmp.sharedmem.shm import PAGE_SIZE
from xmp.startinfo import StartInfo

pytestmark = pytest.mark.timeout(30)


PAGES = 2048   # netfront takes 514 a queue


def kernel(restore: bytes | None = None) -> Kernel:
    si = StartInfo(domid=4, nr_pages=PAGES, max_pages=PAGES, flags=0, store_evtchn=2, console_evtchn=1,
                   vcpus=1, max_vcpus=1, nr_grant_frames=4)
    boot = {"domid": 4, "name": "g", "config": {"name": "g"}}
    return Kernel(FakeXen(), FakeLoop(), boot, bytearray(PAGES * PAGE_SIZE), si, restore)  # type: ignore[arg-type]


class _Stop(Exception):
    pass


class _Dev:
    """A xenbus device that ends netfront's setup right after it took its pages."""

    nodename = "device/vif/0"

    class xs:
        @staticmethod
        def read_or(path):
            raise _Stop


def _moved_used(k) -> int:
    return kernel(k.suspend_context()).pages.count(USED)


def test_vping_ring_page_is_a_drivers_and_free_after_a_move():
    k = kernel()
    before = k.pages.count(USED)
    front = VpingFront(k)
    assert k.pages.count(USED) == before + 1
    assert _moved_used(k) == before            # the restored guest gets it back
    assert kernel(k.suspend_context()).alloc_pages(1) == front.pfn


def test_netfront_queue_pages_are_a_drivers_and_free_after_a_move():
    k = kernel()
    before = k.pages.count(USED)
    front = NetFront(k)
    with pytest.raises(_Stop):
        front.setup(_Dev())  # type: ignore[arg-type]
    assert front.area is not None and k.pages.count(USED) == before + PAGES_PER_QUEUE
    assert _moved_used(k) == before
    front.release()                            # freed by the driver: no driver run left behind
    assert k.pages.count(USED) == before and not k._driver_runs
