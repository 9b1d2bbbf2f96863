"""The guest kernel's suspend context (xmp.domain_proc.kernel): what moves
with a domain besides its RAM -- the page allocator, the guest's hook bytes,
its drivers' -- round-trips, and a context from elsewhere is checked like
fresh input."""

from __future__ import annotations

import base64
import json

import pytest

from xmp.domain_proc.kernel import MAX_GUEST_CONTEXT, Kernel
from xmp.errors import LocalError
from xmp.sharedmem.shm import PAGE_SIZE
from xmp.startinfo import StartInfo

PAGES = 256


class FakeXen:
    """Just what building a Kernel calls: its timer VIRQ."""

    def bind_virq(self, virq: int, vcpu: int = 0) -> int:
        return 3


class FakeLoop:
    def bind(self, port, handler) -> None:
        pass


def kernel(restore: bytes | None = None) -> Kernel:
    ram = bytearray(PAGES * PAGE_SIZE)
    si = StartInfo(domid=4, nr_pages=PAGES, max_pages=PAGES, flags=0, store_evtchn=2, console_evtchn=1,
                   vcpus=1, max_vcpus=1, nr_grant_frames=4)
    boot = {"domid": 4, "name": "g", "config": {"name": "g"}}
    return Kernel(FakeXen(), FakeLoop(), boot, ram, si, restore)  # type: ignore[arg-type]


def test_the_allocator_and_the_hooks_move_and_driver_pages_come_back():
    k = kernel()
    mine = k.alloc_pages(2)
    ring = k.alloc_pages(4, driver=True)
    k.on_suspend(lambda: b"\x00state\xff")
    k.on_suspend_driver("vbd/51712", lambda: b"shadow")
    back = kernel(k.suspend_context())
    assert back.restored == b"\x00state\xff"
    assert back.driver_restored("vbd/51712") == b"shadow" and back.driver_restored("vbd/51712") is None
    assert back.alloc_pages(4) == ring          # the driver's run is free again
    assert back.alloc_pages(1) == mine + 2 + 4  # the guest's pages stay taken
    assert kernel().restored is None            # a fresh boot


def test_no_hook_restores_as_none():
    assert kernel(kernel().suspend_context()).restored is None


def test_a_hook_returning_too_much_is_the_guests_error():
    k = kernel()
    k.on_suspend(lambda: bytes(MAX_GUEST_CONTEXT + 1))
    with pytest.raises(LocalError, match=f"at most {MAX_GUEST_CONTEXT} bytes"):
        k.suspend_context()


def _ctx(**over) -> bytes:
    ctx = {"version": 1, "next_free": 10, "freed": [], "guest": None, "drivers": {}}
    return json.dumps({**ctx, **over}).encode()


@pytest.mark.parametrize("raw, why", [
    (b"not json", "malformed"),
    (_ctx(version=2), "version 2"),
    (_ctx(next_free=PAGES + 1), "does not fit"),
    (_ctx(next_free=2), "does not fit"),                  # inside the special pages
    (_ctx(freed=[[8, 4]]), "does not fit"),               # a run past next_free
    (_ctx(freed=[[1, 1]]), "does not fit"),
    (_ctx(guest="@@@"), "malformed"),
    (_ctx(drivers={"vbd/1": "%%"}), "malformed"),
    (_ctx(drivers=[1]), "malformed"),
    (json.dumps({"version": 1}).encode(), "malformed"),
])
def test_a_context_from_elsewhere_is_checked(raw, why):
    with pytest.raises(LocalError, match=why):
        kernel(raw)


def test_a_good_context_from_elsewhere_is_taken():
    k = kernel(_ctx(guest=base64.b64encode(b"x").decode(), freed=[[8, 2]]))
    assert k.restored == b"x" and k.alloc_pages(2) == 8
