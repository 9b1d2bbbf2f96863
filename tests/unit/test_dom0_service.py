"""The guard every dom0 handler runs under (xmp/dom0/service.py)."""

from __future__ import annotations

import pytest

from xmp.dom0.service import guarded
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
