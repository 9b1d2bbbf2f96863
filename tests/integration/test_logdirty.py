"""Log-dirty tracking against a real writer process: every write caught.

The writer plays the guest: a process of its own that maps the RAM object
once and writes at a high rate.  The test plays the migration source: it
arms a tracker, copies all of RAM (round 0), then copies each round's
dirty pages while the writer runs; after the writer stops and one last
round, the replica must equal the RAM byte for byte -- a missed write
would leave a stale page in it.  The writer touches only even pfns, so a
tracker that reported everything would fail too."""

from __future__ import annotations

import errno
import hashlib
import json
import mmap
import os
import re
import signal
import time

import pytest
from xmphost import HOST

from xmp.migration.precopy import Policy
from xmp.migration.rounds import run_precopy
from xmp.sharedmem._ffi import lib
from xmp.sharedmem.logdirty import (
    HashTracker,
    UffdTracker,
    bitmap_pfns,
    guest_uffd,
    open_tracker,
)
from xmp.sharedmem.shm import PAGE_SIZE, ShmNamespace, ShmObject

pytestmark = pytest.mark.timeout(60)
NR = 2048  # 8 MiB
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="userfaultfd needs root on this host")


def _writer(fd: int, ready: int, stop: mmap.mmap, uffd: bool) -> None:
    """The child: map once, say ready, write 8-byte counters to random even
    pages until told to stop; then say how many writes it made and wait."""
    code = 1
    try:
        if uffd:
            assert guest_uffd() >= 0
        ram = mmap.mmap(fd, NR * PAGE_SIZE)
        os.write(ready, b"r")
        rnd = int.from_bytes(os.urandom(8), "little") | 1
        n = 0
        while not stop[0]:
            for _ in range(1000):
                rnd = (rnd * 6364136223846793005 + 1442695040888963407) & (1 << 64) - 1
                pfn = (rnd >> 33) % (NR // 2) * 2
                off = pfn * PAGE_SIZE + (rnd >> 12) % (PAGE_SIZE // 8) * 8
                n += 1
                ram[off:off + 8] = n.to_bytes(8, "little")
        stop[8:16] = n.to_bytes(8, "little")
        os.write(ready, b"s")  # stopped, as a suspended guest: still there for the last round
        time.sleep(60)
        code = 0
    finally:
        os._exit(code)


@pytest.fixture
def ram():
    obj = ShmObject.create(ShmNamespace(), f"ldtest{os.getpid()}x{time.monotonic_ns()}", NR * PAGE_SIZE)
    yield obj
    obj.close()


def _run(ram: ShmObject, kind: str) -> tuple[int, set[int], int]:
    """(writes made, pfns ever reported dirty, rounds); asserts the replica."""
    stop = mmap.mmap(-1, PAGE_SIZE)
    r, w = os.pipe()
    pid = os.fork()  # before our own mapping: the writer must map its RAM once
    if pid == 0:
        os.close(r)
        _writer(ram.fd, w, stop, kind == "userfaultfd")
    os.close(w)
    tracker = None
    ours = ram.map()
    try:
        assert os.read(r, 1) == b"r"
        populated = bytearray(b"\1" * NR)
        tracker = (UffdTracker(pid, ram.fd, NR, populated) if kind == "userfaultfd"
                   else HashTracker(ours, NR, populated))
        replica = bytearray(ours)  # round 0: everything, after arming
        seen: set[int] = set()
        rounds = 0

        def one_round() -> None:
            nonlocal rounds
            for pfn in bitmap_pfns(tracker.scan(clean=True)):
                seen.add(pfn)
                replica[pfn * PAGE_SIZE:(pfn + 1) * PAGE_SIZE] = ours[pfn * PAGE_SIZE:(pfn + 1) * PAGE_SIZE]
            rounds += 1

        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            one_round()
        stop[0] = 1
        assert os.read(r, 1) == b"s"
        one_round()  # the guest is stopped: the last dirty pages
        assert tracker.broken is None
        stale = [p for p in range(NR)
                 if replica[p * PAGE_SIZE:(p + 1) * PAGE_SIZE] != ours[p * PAGE_SIZE:(p + 1) * PAGE_SIZE]]
        assert hashlib.sha256(replica).digest() == hashlib.sha256(ours).digest(), f"stale pages {stale[:10]}"
        writes = int.from_bytes(stop[8:16], "little")
        print(f"{kind}: {writes} writes in {rounds} rounds")
        return writes, seen, rounds
    finally:
        if pid:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        if tracker is not None:
            tracker.close()
        os.close(r)
        ours.close()
        stop.close()


@needs_root
def test_userfaultfd_catches_every_write_of_a_fast_writer(ram):
    writes, seen, rounds = _run(ram, "userfaultfd")
    assert writes > 100_000 and rounds > 3
    # only what was written, and all of it (100k writes at random miss one of 1024 pages with p ~ e^-97)
    assert seen == set(range(0, NR, 2))


def test_hashing_catches_every_write_of_a_fast_writer(ram):
    writes, seen, rounds = _run(ram, "hash")
    assert writes > 100_000 and rounds > 3
    assert seen == set(range(0, NR, 2))


@needs_root
def test_a_replaced_mapping_breaks_the_tracker_and_everything_is_dirty(ram):
    """A guest that unmaps its RAM and maps it again has an unarmed mapping:
    the tracker notices (the mapping moved; one replaced in place fails
    PM_SCAN_CHECK_WPASYNC) and every populated page is reported, never a
    silently empty round."""
    r, w = os.pipe()
    r2, w2 = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(r)
            os.close(w2)
            guest_uffd()
            m = mmap.mmap(ram.fd, NR * PAGE_SIZE)
            os.write(w, b"r")
            os.read(r2, 1)
            addr = m  # keep a reference while we swap it
            m2 = mmap.mmap(ram.fd, NR * PAGE_SIZE)
            addr.close()
            m2[0:4] = b"gone"
            os.write(w, b"s")
            os.read(r2, 1)
            code = 0
        finally:
            os._exit(code)
    tracker = None
    try:
        assert os.read(r, 1) == b"r"
        populated = bytearray(NR)
        populated[:10] = b"\1" * 10
        tracker = UffdTracker(pid, ram.fd, NR, populated)
        assert bitmap_pfns(tracker.scan(clean=True)) == []
        os.write(w2, b"g")
        assert os.read(r, 1) == b"s"
        assert bitmap_pfns(tracker.scan(clean=True)) == list(range(10))
        assert tracker.broken and "moved" in tracker.broken
        os.write(w2, b"g")
    finally:
        if tracker is not None:
            tracker.close()
        for fd in (r, w, r2, w2):
            os.close(fd)
        os.waitpid(pid, 0)


def test_without_a_userfaultfd_the_tracker_falls_back_to_hashing(ram):
    """A guest process that holds no userfaultfd (none was made for it)
    gets page hashing, with the reason."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            m = mmap.mmap(ram.fd, NR * PAGE_SIZE)
            os.write(w, b"r")
            time.sleep(30)  # until killed
            m.close()
            code = 0
        finally:
            os._exit(code)
    ours = ram.map()
    try:
        assert os.read(r, 1) == b"r"
        tracker, why = open_tracker(pid, ram.fd, ours, NR, bytearray(b"\1" * NR))
        assert tracker.kind == "hash" and why and "holds no userfaultfd" in why
        ours[5 * PAGE_SIZE] = 1
        assert bitmap_pfns(tracker.scan(clean=True)) == [5]
        tracker.close()
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(r)
        os.close(w)
        ours.close()


@needs_root
def test_without_root_the_supervisor_cannot_take_the_guests_userfaultfd(ram):
    """As an ordinary user: the guest can make its (user-mode-only)
    userfaultfd, but a supervisor without CAP_SYS_PTRACE has no ptrace
    access to a non-dumpable guest (its /proc maps and pagemap are EACCES,
    pidfd_getfd EPERM), so it hashes, and says why."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the unprivileged "supervisor", which forks its guest
        code = 1
        try:
            os.setresgid(65534, 65534, 65534)
            os.setresuid(65534, 65534, 65534)
            gr, gw = os.pipe()
            guest = os.fork()
            if guest == 0:
                lib.xmp_set_dumpable(0)
                rc = guest_uffd()
                mmap.mmap(ram.fd, NR * PAGE_SIZE)
                os.write(gw, str(rc).encode())
                time.sleep(30)
                os._exit(0)
            rc = int(os.read(gr, 16))
            ours = mmap.mmap(ram.fd, NR * PAGE_SIZE)
            tracker, why = open_tracker(guest, ram.fd, ours, NR, bytearray(b"\1" * NR))
            os.write(w, json.dumps({"uffd": rc, "kind": tracker.kind, "why": why}).encode())
            tracker.close()
            os.kill(guest, signal.SIGKILL)
            os.waitpid(guest, 0)
            code = 0
        finally:
            os._exit(code)
    try:
        got = json.loads(os.read(r, 4096))
    finally:
        os.waitpid(pid, 0)
        os.close(r)
        os.close(w)
    assert got["uffd"] >= 0  # UFFD_USER_MODE_ONLY needs no privilege
    assert got["kind"] == "hash" and "Permission denied" in got["why"], got


@pytest.mark.parametrize("kind", ["userfaultfd", "hash"])
def test_dom0_tracks_a_guest_through_shadow_op(hosts, kind):
    """XEN_DOMCTL_shadow_op end to end: dom0 enables log-dirty on a guest
    that writes only its own few pages, CLEANs rounds and reads each round's
    bitmap: the guest's pages and the reserved ones (rings and grant table,
    which dom0 writes through mappings nothing tracks) -- nothing else; a
    page dom0 wrote through a grant mapping is dirty once it unmapped, and
    one a grant copy wrote is dirty at the next round."""
    if kind == "userfaultfd" and os.geteuid() != 0:
        pytest.skip("userfaultfd needs root on this host")
    dom0 = f'[dom0]\nkernel = "kernels:logdirty"\nargs = {{ tracker = "{kind}" }}\n'
    h = hosts(HOST.replace("[dom0]\n", dom0)
              + '[[domain]]\nname = "scribbler"\nkernel = "kernels:scribbler"\nmemory = 32\n')
    h.start(("scribbler",))
    line = h.wait(lambda: next((ln for ln in h.console_log("Domain-0").splitlines()
                                if ln.startswith("logdirty: ")), None), 30, "dom0's report")
    r = json.loads(line[len("logdirty: "):])
    first, n, granted = map(int, re.search(r"scribbler: pfns (\d+) (\d+) granted (\d+)",
                                           h.console_log("scribbler")).groups())
    written = set(range(first, first + n))
    assert r["tracker"] == kind and r["broken"] is None
    assert r["enable_twice"] == errno.EINVAL and r["clean_when_off"] == errno.EINVAL
    rounds = [set(x) for x in r["rounds"]]
    assert all(d <= written for d in rounds), [sorted(d) for d in rounds]
    assert set().union(*rounds) == written
    assert all(r["reserved_dirty"])
    # dom0's write through its grant mapping: marked when it unmapped, as Xen does
    assert granted in r["after_unmap"]
    # ...and each grant copy into it (the hypervisor's own write: Xen's gnttab_copy marks it)
    assert r["copy_status"] == [0] and r["records_status"] == 0
    assert granted in r["after_copy"] and granted in r["after_records"]
    assert r["refusals"] == {"unknown_op": errno.EINVAL, "no_pages": errno.EINVAL, "no_domain": errno.ESRCH,
                             "dom0": errno.EINVAL, "not_int": errno.EINVAL}
    assert r["peek_window"][:2] == [8, 8] and r["peek_window"][2] == list(range(8, 16))
    assert h.stop() == 0
    h.assert_clean()


@pytest.mark.parametrize("kind", ["userfaultfd", "hash"])
def test_policy_driven_rounds_over_a_real_tracker_replicate_the_ram(ram, kind):
    """run_precopy over a live writer, then the stop-and-copy with the
    writer stopped (a suspended guest): the replica is the RAM."""
    if kind == "userfaultfd" and os.geteuid() != 0:
        pytest.skip("userfaultfd needs root on this host")
    stop = mmap.mmap(-1, PAGE_SIZE)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        _writer(ram.fd, w, stop, kind == "userfaultfd")
    os.close(w)
    ours = ram.map()
    tracker = None
    try:
        assert os.read(r, 1) == b"r"
        populated = bytearray(b"\1" * NR)
        tracker = (UffdTracker(pid, ram.fd, NR, populated) if kind == "userfaultfd"
                   else HashTracker(ours, NR, populated))
        replica = bytearray(NR * PAGE_SIZE)
        sent = []

        def send(pfns):
            sent.append(len(pfns))
            for pfn in pfns:
                replica[pfn * PAGE_SIZE:(pfn + 1) * PAGE_SIZE] = ours[pfn * PAGE_SIZE:(pfn + 1) * PAGE_SIZE]

        decision, pc = run_precopy(range(NR), NR, lambda: bitmap_pfns(tracker.scan(clean=True)), send,
                                   Policy(max_rounds=8))
        stop[0] = 1  # suspend
        assert os.read(r, 1) == b"s"
        last = set(decision.pfns) | set(bitmap_pfns(tracker.scan(clean=True)))
        send(sorted(last))
        assert decision.stop and decision.reason and sent[0] == NR and len(pc.rounds) <= 8
        assert hashlib.sha256(replica).digest() == hashlib.sha256(ours).digest()
        assert all(p % 2 == 0 for p in last)  # the writer's pages: the working set, not all of RAM
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        if tracker is not None:
            tracker.close()
        os.close(r)
        ours.close()
        stop.close()
