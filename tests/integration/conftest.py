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


@pytest.fixture
def hosts(tmp_path):
    made: list[Host] = []

    def make(topology: str, name: str = "host") -> Host:
        h = Host(tmp_path, topology, name)
        made.append(h)
        return h

    yield make
    for h in made:
        h.cleanup()
