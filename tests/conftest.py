"""Session-wide guarantees: nothing of xmp outlives the test run.

After the whole session (each xdist worker checks its own), no shared-memory
object named by this process may remain in /dev/shm and no child process
may still be running.  A leak fails the run.
"""

from __future__ import annotations

import fcntl
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


@pytest.fixture(autouse=True)
def heavy_tests_one_at_a_time(request, tmp_path_factory):
    """Tests marked ``xdist_group("heavy")`` (the 100-guest burst, the
    benchmark runs, the stress runs) never run beside each other: they take
    a lock shared by this run's workers.  pytest-xdist's loadgroup would do
    it, but its grouping is lost with pytest 9 (it sets ``item._nodeid``,
    which pytest 9 no longer reads)."""
    marker = request.node.get_closest_marker("xdist_group")
    if marker is None or (marker.args[:1] or [marker.kwargs.get("name")])[0] != "heavy":
        yield
        return
    # basetemp is <run>/popen-gwN under xdist, <run> alone without: the lock lives in <run>
    base = tmp_path_factory.getbasetemp()
    run = base.parent if base.name.startswith("popen-gw") else base
    with open(run / "heavy.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
