"""Fixtures shared by the process-level tests."""

from __future__ import annotations

import pytest

from xmp.sharedmem.shm import ShmNamespace, leftovers


@pytest.fixture
def ns():
    """A private namespace per test; nothing of it may stay named in /dev/shm."""
    space = ShmNamespace()
    yield space
    assert [n for n in leftovers() if n.startswith(space.prefix)] == []
