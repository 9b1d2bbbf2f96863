"""The guard every handler of dom0 and of a driver domain runs under
(xmp/domain_proc/service.py)."""

from __future__ import annotations

import pytest

from xmp.domain_proc.service import guard_loop, guarded
from xmp.errors import DomainGone, RemoteProtocolError

pytestmark = pytest.mark.timeout(10)


class Dmesg:
    """Stands for the hypervisor's console_io: what dom0 told dmesg."""

    def __init__(self):
        self.lines: list[str] = []

    def console_io(self, text: str) -> None:
        self.lines.append(text)


def test_a_failing_handler_is_reported_and_only_its_peer_is_cut():
    xen, cut = Dmesg(), []

    def handler(port: int) -> None:
        raise RemoteProtocolError(f"port {port}: garbage")

    guarded(xen, "xenstored: serving dom3", handler, lambda: cut.append(3))(7)
    assert cut == [3]
    assert len(xen.lines) == 1 and xen.lines[0].startswith("xenstored: serving dom3: failed:")
    assert "RemoteProtocolError: port 7: garbage" in xen.lines[0]


def test_supervisor_gone_is_not_survived():
    def handler() -> None:
        raise DomainGone(-1)

    with pytest.raises(DomainGone):
        guarded(Dmesg(), "x", handler)()


def test_a_cut_that_fails_is_reported_too():
    xen = Dmesg()

    def cut() -> None:
        raise OSError("already closed")

    guarded(xen, "xenconsoled", lambda: 1 / 0, cut)()
    assert [line.split(":")[1].strip() for line in xen.lines] == ["failed", "cutting the peer off failed"]


class Loop:
    """Stands for a domain's EventLoop: its handler table, dispatched by hand."""

    def __init__(self):
        self.handlers: dict = {}

    def bind(self, port, handler) -> None:
        self.handlers[port] = handler


class ServingKernel:
    def __init__(self):
        self.loop, self.xen = Loop(), Dmesg()


def test_every_handler_bound_after_guard_loop_is_guarded():
    """What a driver domain's backends and dom0 bind: a handler that raises
    on a peer's data is reported and the next event is still handled."""
    kernel, seen = ServingKernel(), []
    guard_loop(kernel, "stor")

    def backend(port: int) -> None:
        seen.append(port)
        if len(seen) == 1:
            raise RemoteProtocolError("bad ring index from dom5")

    kernel.loop.bind(9, backend)
    kernel.loop.handlers[9](9)  # raises inside: reported, not out of the loop
    kernel.loop.handlers[9](9)
    assert seen == [9, 9]
    [line] = kernel.xen.lines
    assert line.startswith("stor: the handler of port 9: failed:")
    assert "bad ring index from dom5" in line

    def orphaned(_port: int) -> None:
        raise DomainGone(-1)

    cut: list[int] = []
    own = guarded(kernel.xen, "xenstored: serving dom5", backend, lambda: cut.append(5))
    kernel.loop.bind(5, own)  # guarded already, with its own cut: bound as it is
    assert kernel.loop.handlers[5] is own

    kernel.loop.bind(4, orphaned)
    with pytest.raises(DomainGone):  # still the end of a domain whose supervisor went
        kernel.loop.handlers[4](4)
