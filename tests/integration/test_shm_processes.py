"""Shared-memory objects across processes: leaks and crashes.

An xmp object's name is unlinked the moment it is created; its capability
is the descriptor, passed by SCM_RIGHTS.  These tests check that with real
processes -- including ones killed with SIGKILL mid-exchange -- and that
nothing of a test outlives it in /dev/shm or in the process table.

The peer functions live at module level: ``spawn`` pickles them by name.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import struct
import subprocess
import time

import psutil
import pytest

from xmp.sharedmem.evtchn import Wake
from xmp.sharedmem.ring import RSP_PROD, BackRing
from xmp.sharedmem.shm import (
    PAGE_SIZE,
    ShmNamespace,
    ShmObject,
    leftovers,
    recv_handles,
    remove_stale,
    send_handles,
)
from xmp.testing import LINK_PORT, LinkLayout, SharedLink, reap, spawn_peer

SPAWN = multiprocessing.get_context("spawn")


def _named(prefix: str) -> list[str]:
    return [n for n in leftovers() if n.startswith(prefix)]


def _mapped(prefix: str) -> list[str]:
    """Lines of our /proc/self/maps that map an object named with ``prefix``."""
    with open("/proc/self/maps") as maps:
        return [line.strip() for line in maps if prefix in line]


def _children() -> set[int]:
    """Our live (non-zombie) descendants."""
    out = set()
    for c in psutil.Process().children(recursive=True):
        try:
            if c.status() != psutil.STATUS_ZOMBIE:
                out.add(c.pid)
        except psutil.NoSuchProcess:
            pass
    return out


def _pattern(seed: bytes, n: int) -> bytes:
    return hashlib.shake_256(seed).digest(n)


# ---------------------------------------------------------------------------
# (a) a descriptor, not a name
# ---------------------------------------------------------------------------


def _shm_child(sock: socket.socket, tx, bye) -> None:
    seed, fds = recv_handles(sock, 1)
    sock.close()
    obj = ShmObject.from_fd(fds[0])
    m = obj.map()
    st = os.fstat(obj.fd)
    prefix = seed.decode()
    tx.send({
        "size": obj.size, "ino": (st.st_dev, st.st_ino), "nlink": st.st_nlink,
        "parent_bytes_ok": m[:PAGE_SIZE] == _pattern(seed, PAGE_SIZE),
        "named": _named(prefix),
    })
    m[PAGE_SIZE:2 * PAGE_SIZE] = _pattern(seed + b"child", PAGE_SIZE)
    tx.send("written")
    bye.recv()  # hold the object until the parent has looked
    obj.close()


@pytest.mark.timeout(60)
def test_descriptor_passing_shares_bytes_and_no_name_exists(ns):
    """The parent creates an object and hands the descriptor to a child over
    a Unix socket: the child sees the parent's bytes and the parent the
    child's, it is the same inode, and its name is already gone from
    /dev/shm (link count 0) while both hold it."""
    obj = ShmObject.create(ns, "shared", 4 * PAGE_SIZE)
    proc = None
    try:
        assert _named(ns.prefix) == []
        assert os.fstat(obj.fd).st_nlink == 0
        seed = ns.prefix.encode()
        m = obj.map()
        m[:PAGE_SIZE] = _pattern(seed, PAGE_SIZE)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        rx, tx = SPAWN.Pipe(duplex=False)
        bye_rx, bye_tx = SPAWN.Pipe(duplex=False)
        try:
            proc = SPAWN.Process(target=_shm_child, args=(theirs, tx, bye_rx), daemon=True)
            proc.start()
        finally:
            theirs.close()
            tx.close()
            bye_rx.close()
        send_handles(ours, seed, [obj.fd])
        ours.close()
        assert rx.poll(30), "no report from the child"
        seen = rx.recv()
        st = os.fstat(obj.fd)
        assert seen == {"size": 4 * PAGE_SIZE, "ino": (st.st_dev, st.st_ino), "nlink": 0,
                        "parent_bytes_ok": True, "named": []}
        assert rx.poll(30) and rx.recv() == "written"
        # both hold it: still no name, and the child's bytes are ours
        assert proc.is_alive()
        assert _named(ns.prefix) == []
        assert m[PAGE_SIZE:2 * PAGE_SIZE] == _pattern(seed + b"child", PAGE_SIZE)
        assert m[2 * PAGE_SIZE:] == bytes(2 * PAGE_SIZE)
        # only descriptor holders reach it: the kernel shows it as deleted
        assert all(line.endswith("(deleted)") for line in _mapped(ns.prefix))
        assert _mapped(ns.prefix)
        bye_tx.send("bye")
        reap(proc)
        assert proc.exitcode == 0
    finally:
        if proc is not None:
            reap(proc)
        obj.close()
    assert _mapped(ns.prefix) == []


# ---------------------------------------------------------------------------
# (b) a peer killed in the middle of a ring exchange
# ---------------------------------------------------------------------------

MSG = 64
_SEQ = struct.Struct("<Q")
_BODIES = [_pattern(j.to_bytes(2, "little"), MSG - 8) for j in range(251)]
_XFORM = bytes((b ^ 0x5A) for b in range(256))


def _reqs(start: int, k: int) -> bytes:
    return b"".join([_SEQ.pack(i) + _BODIES[i % 251] for i in range(start, start + k)])


def _echo(link: SharedLink, tx, until: int, resume: bool) -> None:
    """Answer requests up to sequence ``until`` (each verified, answered
    XOR-transformed); ``resume`` takes over a ring another backend served."""
    ring = BackRing(link.ring_buf, MSG, MSG, resume=True) if resume else link.back_ring(MSG, MSG)
    seq = ring.req_cons
    if resume:  # a predecessor killed mid-scan may have left our port stuck pending
        link.back_ev.clear(LINK_PORT)
    rep = {"first": seq, "bad": None, "error": None}
    try:
        tx.send(("started", seq))
        while seq < until:
            data = ring.get_requests()
            if data:
                k = len(data) // MSG
                if data != _reqs(seq, k):
                    rep["bad"] = seq
                    break
                seq += k
                ring.put_responses(data.translate(_XFORM))
                if ring.push_responses_and_check_notify():
                    link.front_ev.send(LINK_PORT)
            elif not ring.final_check_for_requests():
                if link.back_ev.wait(timeout=1.0) == Wake.SHUTDOWN:
                    rep["error"] = "shut down"
                    break
                link.back_ev.scan()
    except Exception as exc:
        rep["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        if resume:
            ring.release()
    rep["last"] = seq
    tx.send(("done", rep))


class _Front:
    """The test process as frontend: sends numbered requests, checks answers."""

    def __init__(self, link: SharedLink):
        self.link = link
        self.ring = link.front_ring(MSG, MSG)
        self.sent = self.got = 0
        self.pending = bytearray()

    def step(self, limit: int) -> int:
        """Send what fits (up to ``limit``), take what came back; returns
        the number of responses taken (0: caller may sleep)."""
        k = min(self.ring.free_requests(), limit - self.sent, 32)
        if k > 0:
            reqs = _reqs(self.sent, k)
            assert self.ring.put_requests(reqs) == k
            self.pending += reqs
            self.sent += k
            if self.ring.push_requests_and_check_notify():
                self.link.back_ev.send(LINK_PORT)
        data = self.ring.get_responses()
        if data:
            want = bytes(self.pending[:len(data)]).translate(_XFORM)
            assert data == want, f"bad response among {self.got}..{self.got + len(data) // MSG}"
            del self.pending[:len(data)]
            self.got += len(data) // MSG
        return len(data) // MSG

    def sleep(self, timeout: float) -> Wake:
        if self.ring.final_check_for_responses():
            return Wake.EVENT
        wake = self.link.front_ev.wait(timeout=timeout)
        self.link.front_ev.scan()
        return wake


@pytest.mark.timeout(90)
def test_sigkill_backend_mid_exchange_is_noticed_and_leaves_nothing(ns):
    """SIGKILL the backend while requests stream: the frontend notices the
    process exit, every response it got before was right, the ring stops
    exactly where the dead backend left it, no child remains and nothing of
    this test is named in /dev/shm.  A fresh backend process then resumes
    the same ring (BackRing(resume=True)) and answers everything that was
    left, in order, without loss or duplicate."""
    total = 300_000
    link = SharedLink.create(ns, LinkLayout(ring_page_order=1))
    victim = heir = None
    try:
        front = _Front(link)
        rx, tx = SPAWN.Pipe(duplex=False)
        victim = spawn_peer(link, _echo, tx, total, False)
        assert rx.poll(30) and rx.recv() == ("started", 0)
        killed_at = None
        noticed = None
        deadline = time.monotonic() + 60
        while noticed is None:
            assert time.monotonic() < deadline, "never noticed the dead backend"
            if front.step(total) == 0:
                front.sleep(0.05)
            if killed_at is None and front.got >= 50_000:
                os.kill(victim.pid, signal.SIGKILL)
                killed_at = time.monotonic()
            elif killed_at is not None and multiprocessing.connection.wait([victim.sentinel], timeout=0):
                noticed = time.monotonic()
        front.step(front.sent)  # take whatever it published before it died
        # It may have died inside evtchn_send, leaving our port pending with
        # no selector bit (later sends would then never kick): re-arm it, as
        # re-binding the port would.
        link.front_ev.clear(LINK_PORT)
        victim.join(5)
        assert victim.exitcode == -signal.SIGKILL
        assert noticed - killed_at < 5
        assert not rx.poll(0.2), "a SIGKILLed backend cannot have reported"
        rx.close()
        tx.close()
        assert 50_000 <= front.got < total
        # The ring stands still where the dead backend left it.
        stuck = front.ring.shared_index(RSP_PROD)
        assert front.ring.rsp_cons == stuck == front.got
        time.sleep(0.1)
        assert front.step(front.sent) == 0 and front.ring.shared_index(RSP_PROD) == stuck
        assert victim.pid not in _children()
        assert _named(ns.prefix) == []

        # A new backend takes over the live ring and finishes the job.
        rx, tx = SPAWN.Pipe(duplex=False)
        heir = spawn_peer(link, _echo, tx, total, True)
        tx.close()
        assert rx.poll(30)
        assert rx.recv() == ("started", stuck)  # resumes at the first unanswered request
        deadline = time.monotonic() + 60
        while front.got < total:
            assert time.monotonic() < deadline, f"stalled at {front.got}"
            if front.step(total) == 0:
                front.sleep(0.5)
        assert rx.poll(30)
        tag, rep = rx.recv()
        assert tag == "done" and rep == {"first": stuck, "bad": None, "error": None, "last": total}
        reap(heir)
        assert heir.exitcode == 0
        assert front.ring.shared_index(RSP_PROD) == total and not front.pending
    finally:
        for p in (victim, heir):
            if p is not None and p.exitcode is None:
                link.back_ev.request_shutdown()
                reap(p)
        link.close()
    assert {victim.pid, heir.pid} & _children() == set()
    assert _named(ns.prefix) == [] and _mapped(ns.prefix) == []


# ---------------------------------------------------------------------------
# (c) the creator of a link killed while another process holds it
# ---------------------------------------------------------------------------


def _creator(sock: socket.socket) -> None:
    ns = ShmNamespace()
    link = SharedLink.create(ns, LinkLayout(ring_page_order=0, data_pages=2))
    link.ram[:PAGE_SIZE] = _pattern(ns.prefix.encode(), PAGE_SIZE)
    send_handles(sock, link.layout.pack() + ns.prefix.encode(), [link.obj.fd])
    sock.close()
    link.front_ev.wait()  # blocked in sem_wait on the link itself until SIGKILLed


@pytest.mark.timeout(90)
def test_sigkill_link_creator_while_other_holds_descriptor():
    """A process creates a SharedLink, hands its descriptor to us and is
    SIGKILLed while blocked on the link's own semaphore.  We still have the
    memory (its bytes intact), and the link still works: a ring exchange
    with event-channel wake-ups between us and a third process, on
    semaphores the dead creator initialised.  After both are gone nothing
    of it remains, named or mapped."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    creator = SPAWN.Process(target=_creator, args=(theirs,), daemon=True)
    creator.start()
    theirs.close()
    link = peer = None
    try:
        ours.settimeout(30)
        payload, fds = recv_handles(ours, 1)
        ours.close()
        layout = LinkLayout.unpack(payload)
        prefix = payload[12:].decode()
        assert prefix.startswith(f"xmp.{creator.pid}.")
        link = SharedLink(ShmObject.from_fd(fds[0]), layout, create=False)
        assert link.ram[:PAGE_SIZE] == _pattern(prefix.encode(), PAGE_SIZE)
        assert _named(prefix) == []

        time.sleep(0.2)  # let it reach sem_wait
        os.kill(creator.pid, signal.SIGKILL)
        creator.join(10)
        assert creator.exitcode == -signal.SIGKILL
        assert creator.pid not in _children()

        # The survivor's memory is intact and writable.
        assert link.ram[:PAGE_SIZE] == _pattern(prefix.encode(), PAGE_SIZE)
        link.ram[PAGE_SIZE:] = _pattern(b"survivor", PAGE_SIZE)
        assert link.ram[PAGE_SIZE:] == _pattern(b"survivor", PAGE_SIZE)
        assert all(line.endswith("(deleted)") for line in _mapped(prefix)) and _mapped(prefix)

        # ... and carries a full exchange with a fresh process.
        n = 20_000
        front = _Front(link)
        rx, tx = SPAWN.Pipe(duplex=False)
        peer = spawn_peer(link, _echo, tx, n, False)
        tx.close()
        assert rx.poll(30) and rx.recv() == ("started", 0)
        deadline = time.monotonic() + 60
        while front.got < n:
            assert time.monotonic() < deadline, f"stalled at {front.got}"
            if front.step(n) == 0:
                front.sleep(0.5)
        assert rx.poll(30) and rx.recv() == ("done", {"first": 0, "bad": None, "error": None, "last": n})
        reap(peer)
        assert peer.exitcode == 0
    finally:
        if creator.exitcode is None:
            creator.kill()
        reap(creator)
        if peer is not None:
            if peer.exitcode is None:
                link.back_ev.request_shutdown()
            reap(peer)
        if link is not None:
            link.close()
    assert creator.pid not in _children() and peer.pid not in _children()
    assert _named(prefix) == []
    assert _mapped(prefix) == []  # the last holder let go: the memory is gone


# ---------------------------------------------------------------------------
# (d) remove_stale
# ---------------------------------------------------------------------------


def _dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    assert not psutil.pid_exists(child.pid)
    return child.pid


@pytest.mark.timeout(30)
def test_remove_stale_removes_only_dead_supervisors_objects(tmp_path):
    """A supervisor that died between create and unlink leaves a name
    behind; remove_stale() removes exactly the names whose pid is dead and
    leaves live supervisors' objects and foreign files alone."""
    dead = _dead_pid()
    dead_name = ShmNamespace(owner_pid=dead).name("x")[1:]
    live_name = ShmNamespace().name("x")[1:]
    assert dead_name.startswith(f"xmp.{dead}.") and live_name.startswith(f"xmp.{os.getpid()}.")
    others = ["other.123.abc", "xmp.notapid.ab.x.cd", "xmp."]
    for name in [dead_name, live_name, *others]:
        (tmp_path / name).write_bytes(b"\0" * PAGE_SIZE)

    assert remove_stale(str(tmp_path)) == [dead_name]
    assert sorted(os.listdir(tmp_path)) == sorted([live_name, *others])
    assert leftovers(str(tmp_path)) == sorted([live_name, "xmp.notapid.ab.x.cd", "xmp."])
    assert remove_stale(str(tmp_path)) == []  # idempotent
    (tmp_path / live_name).unlink()
    assert remove_stale(str(tmp_path / "missing")) == []


# ---------------------------------------------------------------------------
# (e) a blocked waiter: prompt to wake, free while idle
# ---------------------------------------------------------------------------


def _waiter(link: SharedLink, tx) -> None:
    ev = link.back_ev
    for _ in range(2):
        tx.send("waiting")
        wake = ev.wait()  # no timeout
        tx.send((int(wake), ev.scan(), time.monotonic()))
    tx.send(("after shutdown", int(ev.wait()), int(ev.wait(timeout=None, spin=0))))


def _idle_cpu(pid: int, seconds: float = 0.5) -> float:
    p = psutil.Process(pid)
    before = p.cpu_times()
    time.sleep(seconds)
    after = p.cpu_times()
    return (after.user - before.user) + (after.system - before.system)


def _blocked(pid: int, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if psutil.Process(pid).status() == psutil.STATUS_SLEEPING:
            return True
        time.sleep(0.01)
    return False


@pytest.mark.timeout(60)
def test_blocked_waiter_idles_free_and_wakes_promptly(ns):
    """A child blocked in EventChannels.wait() without a timeout uses
    (almost) no CPU, returns EVENT with the port when kicked, and SHUTDOWN
    promptly when request_shutdown() is called -- and from then on."""
    link = SharedLink.create(ns, LinkLayout())
    proc = None
    try:
        rx, tx = SPAWN.Pipe(duplex=False)
        proc = spawn_peer(link, _waiter, tx)
        tx.close()

        assert rx.poll(30) and rx.recv() == "waiting"
        time.sleep(0.2)
        assert _blocked(proc.pid)
        assert _idle_cpu(proc.pid) < 0.05
        assert not rx.poll(0), "woke up with nothing sent"
        t0 = time.monotonic()
        assert link.back_ev.send(LINK_PORT) is True
        assert rx.poll(5)
        wake, ports, t_woke = rx.recv()
        assert (wake, ports) == (Wake.EVENT, [LINK_PORT])
        assert t_woke - t0 < 2

        assert rx.poll(30) and rx.recv() == "waiting"
        time.sleep(0.2)
        assert _blocked(proc.pid)
        assert _idle_cpu(proc.pid) < 0.05
        t0 = time.monotonic()
        link.back_ev.request_shutdown()
        assert rx.poll(5)
        wake, ports, t_woke = rx.recv()
        assert (wake, ports) == (Wake.SHUTDOWN, [])
        assert t_woke - t0 < 2
        assert rx.poll(5) and rx.recv() == ("after shutdown", Wake.SHUTDOWN, Wake.SHUTDOWN)
        reap(proc)
        assert proc.exitcode == 0
    finally:
        if proc is not None:
            if proc.exitcode is None:
                link.back_ev.request_shutdown()
            reap(proc)
        link.close()
