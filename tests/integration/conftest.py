"""Fixtures shared by the process-level tests."""

from __future__ import annotations

import gc
import os
import time
from multiprocessing import resource_tracker

import psutil
import pytest
from netns import NetnsPair, namespaces
from xmphost import Host

from xmp.sharedmem.shm import ShmNamespace, leftovers


@pytest.fixture
def ns():
    """A private namespace per test; nothing of it may stay named in /dev/shm."""
    space = ShmNamespace()
    yield space
    assert [n for n in leftovers() if n.startswith(space.prefix)] == []


@pytest.fixture
def pair():
    """Two network namespaces joined by a veth pair (two hosts on one machine)."""
    p = NetnsPair.create()
    yield p
    p.delete()
    assert not set(p.names) & set(namespaces()), "a namespace was left behind"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.when == "call":
        item.call_failed = report.failed  # for fixtures' teardown
    return report


@pytest.fixture(autouse=True)
def nothing_leaks(request):
    """OSSTest-style leak check around every integration test, after its own
    fixtures' teardown (autouse fixtures are set up first): nothing of its
    supervisors is left (processes, /dev/shm names, sockets in their run
    directories -- Host.leaks), no descriptor opened during the test stays
    open in this process, no child process of it runs, and no /dev/shm name
    of this process stays.  (At each Host.stop, while the host still runs,
    Host.stale_backends checks xenstore too.)  A test that failed already
    is not failed again."""
    # multiprocessing's resource tracker keeps a pipe from its first use on: start it
    # before the first snapshot, so it is not taken for the test's leak
    resource_tracker.ensure_running()
    fds = _fds()
    children = {p.pid for p in _children()}
    yield
    if getattr(request.node, "call_failed", True):
        return  # failed (reported already) or never ran
    left = []
    for h in getattr(request.node, "xmp_hosts", []):
        left += [f"host {h.dir.name}: {item}" for item in h.leaks(sockets=not h.killed)]
    deadline = time.monotonic() + 5
    while True:
        gc.collect()  # a descriptor only garbage holds (a test frame kept by a traceback) is not leaked
        new_fds = {fd: target for fd, target in _fds().items() if fds.get(fd) != target}
        procs = [p for p in _children() if p.pid not in children]
        shm = [n for n in leftovers() if n.startswith(f"xmp.{os.getpid()}.")]
        if not (new_fds or procs or shm) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    left += [f"descriptors left open in the test process: {new_fds}"] if new_fds else []
    left += [f"processes left: {[f'{p.pid} {p.name()}' for p in procs]}"] if procs else []
    left += [f"shared memory of the test process left: {shm}"] if shm else []
    assert not left, "leaked: " + "; ".join(left)


def _fds() -> dict[int, str]:
    out = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            out[int(fd)] = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue  # the listing's own descriptor
    return out


def _children() -> list[psutil.Process]:
    out = []
    for p in psutil.Process().children(recursive=True):
        try:
            if p.status() != psutil.STATUS_ZOMBIE and not any(s in " ".join(p.cmdline()) for s in _INFRA):
                out.append(p)
        except psutil.NoSuchProcess:
            continue
    return out


_INFRA = ("multiprocessing.resource_tracker", "multiprocessing.forkserver")


@pytest.fixture
def hosts(tmp_path, request):
    made: list[Host] = []
    request.node.xmp_hosts = made

    def make(topology: str, name: str = "host", netns: str | None = None) -> Host:
        h = Host(tmp_path, topology, name, netns)
        made.append(h)
        return h

    yield make
    for h in made:
        h.cleanup()
        if getattr(request.node, "call_failed", False):
            print(h.log_tails())  # in the failure's report: what each domain and the hypervisor said
    for h in made:
        h.assert_no_interfaces()
