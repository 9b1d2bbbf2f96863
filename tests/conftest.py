"""Session-wide guarantees: nothing of xmp outlives the test run.

After the whole session (each xdist worker checks its own), no shared-memory
object named by this process may remain in /dev/shm and no child process
may still be running.  A leak fails the run.
"""

from __future__ import annotations

import os
import time

import psutil
import pytest

from xmp.sharedmem.shm import leftovers

# Helpers of the test machinery itself, not of xmp.
_INFRA = ("multiprocessing.resource_tracker", "multiprocessing.forkserver")


def _xmp_children() -> list[psutil.Process]:
    out = []
    for child in psutil.Process().children(recursive=True):
        try:
            cmd = " ".join(child.cmdline())
            if child.status() == psutil.STATUS_ZOMBIE or any(s in cmd for s in _INFRA):
                continue
        except psutil.NoSuchProcess:
            continue
        out.append(child)
    return out


def _own_objects() -> list[str]:
    return [name for name in leftovers() if name.startswith(f"xmp.{os.getpid()}.")]


@pytest.fixture(scope="session", autouse=True)
def no_leaks_after_session():
    yield
    deadline = time.monotonic() + 5
    while (_xmp_children() or _own_objects()) and time.monotonic() < deadline:
        time.sleep(0.05)
    procs, objs = _xmp_children(), _own_objects()
    for p in procs:  # do not leave them behind even when failing
        p.kill()
    assert not procs, f"child processes left running after the session: {procs}"
    assert not objs, f"shared-memory objects left in /dev/shm after the session: {objs}"
