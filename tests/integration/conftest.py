"""Fixtures shared by the process-level tests."""

from __future__ import annotations

import pytest
from xmphost import Host

from xmp.sharedmem.shm import ShmNamespace, leftovers


@pytest.fixture
def ns():
    """A private namespace per test; nothing of it may stay named in /dev/shm."""
    space = ShmNamespace()
    yield space
    assert [n for n in leftovers() if n.startswith(space.prefix)] == []


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.when == "call":
        item.call_failed = report.failed  # for fixtures' teardown
    return report


@pytest.fixture
def hosts(tmp_path, request):
    made: list[Host] = []

    def make(topology: str, name: str = "host", netns: str | None = None) -> Host:
        h = Host(tmp_path, topology, name, netns)
        made.append(h)
        return h

    yield make
    for h in made:
        h.cleanup()
        if getattr(request.node, "call_failed", False):
            print(h.log_tails())  # in the failure's report: what each domain and the hypervisor said
