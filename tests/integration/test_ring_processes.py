"""Rings, event channels and grants between two real OS processes.

The test process is the frontend (domid 1: it owns the ring's header, the
grant table and the RAM pages); :func:`xmp.testing.spawn_peer` starts the
backend (domid 0) in a freshly spawned interpreter that receives the
link's descriptor over a Unix socket.  Every payload is verified byte for
byte on both sides, and every backend reports what it saw through a pipe;
the test asserts on that report as well as on its own observations.

The peer functions live at module level: ``spawn`` pickles them by name.
"""

from __future__ import annotations

import errno
import hashlib
import multiprocessing
import os
import struct
import time
from collections import deque

import pytest

from xmp.errors import GrantError, HypercallError, RemoteProtocolError
from xmp.sharedmem.evtchn import Wake
from xmp.sharedmem.grant import (
    GNTST_bad_gntref,
    GNTST_okay,
    GNTST_permission_denied,
    GTF_permit_access,
    GTF_reading,
    GTF_readonly,
    GTF_writing,
)
from xmp.sharedmem.ring import REQ_PROD, RSP_PROD, BackRing
from xmp.sharedmem.shm import PAGE_SIZE
from xmp.testing import BACK_DOMID, LINK_PORT, LinkLayout, SharedLink, reap, spawn_peer

SPAWN = multiprocessing.get_context("spawn")
WAIT_SAFETY = 5.0  # a sleeper re-checks after this long; finding work then = a lost wake-up
PEER_DEADLINE = 240.0  # a peer gives up (and says so) after this long


# ---------------------------------------------------------------------------
# Harness
# ---------------------------------------------------------------------------


def _recv_report(rx, proc, timeout: float) -> dict:
    """The peer's report, or a failure that says why there is none."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if rx.poll(0.1):
            return rx.recv()
        if proc.exitcode is not None and not rx.poll(0.5):
            pytest.fail(f"peer exited with code {proc.exitcode} without a report")
    pytest.fail(f"no report from the peer within {timeout} s")


def _start(link: SharedLink, target, *args):
    """spawn_peer + a report pipe; returns (proc, rx)."""
    rx, tx = SPAWN.Pipe(duplex=False)
    try:
        proc = spawn_peer(link, target, tx, *args)
    finally:
        tx.close()  # the child holds its own copy: EOF on rx if it dies
    return proc, rx


def _stop_peer(link: SharedLink, proc) -> None:
    """Ask a peer still in its loop to leave (its wait() returns SHUTDOWN), reap it."""
    if proc.exitcode is None:
        link.back_ev.request_shutdown()
    reap(proc)


def _sleep(ev, vcpu: int = 0) -> Wake:
    """Block on our event object, then take the pending ports (Xen's upcall)."""
    wake = ev.wait(vcpu, timeout=WAIT_SAFETY)
    ev.scan(vcpu)
    return wake


# ---------------------------------------------------------------------------
# 1. A million small requests and responses
# ---------------------------------------------------------------------------

MSG = 64
_SEQ = struct.Struct("<Q")
_BODIES = [hashlib.blake2b(j.to_bytes(4, "little"), digest_size=MSG - 8).digest() for j in range(257)]
# The backend's answer is its request run through a byte bijection.
_XFORM = bytes(((b * 167) + 13) & 0xFF for b in range(256))


def _req_batch(start: int, k: int) -> bytes:
    """Requests start..start+k-1: the u64 sequence number, then 56 bytes from it."""
    pack, bodies = _SEQ.pack, _BODIES
    return b"".join([pack(i & 0xFFFFFFFFFFFFFFFF) + bodies[i % 257] for i in range(start, start + k)])


def _first_mismatch(got: bytes, want: bytes, first_seq: int, size: int = MSG) -> dict:
    for i in range(0, max(len(got), len(want)), size):
        if got[i:i + size] != want[i:i + size]:
            return {"seq": first_seq + i // size, "got": got[i:i + size].hex(),
                    "want": want[i:i + size].hex()}
    return {"seq": None, "got": len(got), "want": len(want)}


def _echo_backend(link: SharedLink, tx, n: int, resume: bool) -> None:
    """Serve ``n`` requests: verify each batch, answer it transformed.

    Also the victim of the hostile-frontend test: a RemoteProtocolError is
    reported (with what a retry and a final check do) rather than raised.
    """
    rep = {"verified": 0, "mismatch": None, "error": None, "protocol_error": None,
           "retry": None, "sleeps": 0, "lost_wakeups": 0, "pid": os.getpid()}
    ring = BackRing(link.ring_buf, MSG, MSG, resume=True) if resume else link.back_ring(MSG, MSG)
    seq = ring.req_cons
    verified = 0
    deadline = time.monotonic() + PEER_DEADLINE
    try:
        while verified < n:
            data = ring.get_requests()
            k = len(data) // MSG
            if k:
                want = _req_batch(seq, k)
                if data != want:
                    rep["mismatch"] = _first_mismatch(data, want, seq)
                    break
                seq += k
                verified += k
                if ring.put_responses(data.translate(_XFORM)) != k:
                    rep["error"] = "no room for the responses of consumed requests"
                    break
                if ring.push_responses_and_check_notify():
                    link.front_ev.send(LINK_PORT)
                continue
            if ring.final_check_for_requests():
                continue
            rep["sleeps"] += 1
            wake = _sleep(link.back_ev)
            if wake == Wake.SHUTDOWN:
                rep["error"] = "shut down"
                break
            if wake == Wake.TIMEOUT:
                if ring.unconsumed_requests():
                    rep["lost_wakeups"] += 1
                if time.monotonic() > deadline:
                    rep["error"] = f"deadline passed at {verified}"
                    break
    except RemoteProtocolError as exc:
        rep["protocol_error"] = f"{type(exc).__name__}: {exc}"
        retry = []
        for op in (ring.get_requests, ring.final_check_for_requests, ring.unconsumed_requests):
            try:
                op()
                retry.append(f"{op.__name__}: no error")
            except RemoteProtocolError as again:
                retry.append(f"{op.__name__}: {type(again).__name__}")
        rep["retry"] = retry
    except Exception as exc:  # report, never die silently
        rep["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        rep["verified"] = verified
        if resume:
            ring.release()
    tx.send(rep)


def _run_front(link: SharedLink, front, proc, rx, n: int, batch: int = 64) -> dict:
    """Send n requests (seq from front.req_prod_pvt), verify every response.
    Returns the frontend's own counters."""
    first = front.req_prod_pvt
    sent = got = 0
    pending = bytearray()  # requests sent and not yet answered, in order
    stats = {"sleeps": 0, "lost_wakeups": 0}
    deadline = time.monotonic() + 120
    while got < n:
        if sent < n:
            k = min(front.free_requests(), n - sent, batch)
            if k:
                reqs = _req_batch(first + sent, k)
                assert front.put_requests(reqs) == k
                pending += reqs
                sent += k
                if front.push_requests_and_check_notify():
                    link.back_ev.send(LINK_PORT)
        data = front.get_responses()
        if data:
            want = bytes(pending[:len(data)]).translate(_XFORM)
            if data != want:
                pytest.fail(f"response mismatch: {_first_mismatch(data, want, first + got)}")
            del pending[:len(data)]
            got += len(data) // MSG
            continue
        if sent < n and front.free_requests():
            continue
        if front.final_check_for_responses():
            continue
        stats["sleeps"] += 1
        wake = _sleep(link.front_ev)
        if wake == Wake.TIMEOUT:
            if front.unconsumed_responses():
                stats["lost_wakeups"] += 1
            if proc.exitcode is not None:
                rep = rx.recv() if rx.poll(1) else "no report"
                pytest.fail(f"backend exited (code {proc.exitcode}) at {got}/{n}: {rep}")
            assert time.monotonic() < deadline, f"stalled at {got}/{n} responses"
    return stats


@pytest.mark.timeout(180)
@pytest.mark.parametrize("start", [0, 2**32 - 400_000], ids=["from-zero", "across-u32-wrap"])
def test_million_requests_verified_both_sides(ns, start):
    """1,000,000 requests and responses between two processes, every byte
    checked on both sides; the second case starts the free-running indices
    400,000 short of 2**32 so they wrap mid-run."""
    n = 1_000_000
    link = SharedLink.create(ns, LinkLayout(ring_page_order=2))
    proc = None
    try:
        if start:
            # SHARED_RING_INIT with indices close to the wrap; the frontend
            # then attaches to the published indices (init=False).
            struct.pack_into("<IIII", link.ring_buf, 0, start, start + 1, start, start + 1)
            front = link.front_ring(MSG, MSG, init=False)
        else:
            front = link.front_ring(MSG, MSG)
        assert front.nr_ents == 128
        proc, rx = _start(link, _echo_backend, n, bool(start))
        t0 = time.perf_counter()
        stats = _run_front(link, front, proc, rx, n)
        elapsed = time.perf_counter() - t0
        rep = _recv_report(rx, proc, 30)
        reap(proc)
        assert rep["mismatch"] is None, rep
        assert rep["error"] is None and rep["protocol_error"] is None, rep
        assert rep["verified"] == n
        assert rep["lost_wakeups"] == 0 and stats["lost_wakeups"] == 0, (rep, stats)
        assert proc.exitcode == 0
        # Both ends agree where the ring stands, modulo 2**32.
        assert front.shared_index(REQ_PROD) == front.shared_index(RSP_PROD) == (start + n) % 2**32
        assert front.req_prod_pvt == front.rsp_cons == (start + n) % 2**32
        assert elapsed < 60, f"{n} round trips took {elapsed:.1f} s"
    finally:
        if proc is not None:
            _stop_peer(link, proc)
        link.close()


# ---------------------------------------------------------------------------
# 4. A hostile frontend's req_prod
# ---------------------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("claim", ["one-too-many", "half-space", "behind-cons"])
def test_hostile_req_prod_gives_backend_remote_protocol_error(ns, claim):
    """After 100 honest requests the frontend publishes a req_prod that
    claims more than a ring's worth: the backend process raises
    RemoteProtocolError on it (every time it looks), answers nothing more,
    reports it and exits cleanly instead of hanging or reading garbage."""
    link = SharedLink.create(ns, LinkLayout())
    proc = None
    try:
        front = link.front_ring(MSG, MSG)
        nr = front.nr_ents
        proc, rx = _start(link, _echo_backend, 10**9, False)
        _run_front(link, front, proc, rx, 100)
        assert front.shared_index(RSP_PROD) == 100
        bad = {"one-too-many": 100 + nr + 1, "half-space": 100 + 2**31, "behind-cons": 99}[claim]
        struct.pack_into("<I", link.ring_buf, REQ_PROD, bad)
        t0 = time.monotonic()
        link.back_ev.send(LINK_PORT)
        rep = _recv_report(rx, proc, 20)
        took = time.monotonic() - t0
        reap(proc)
        assert rep["protocol_error"] == (
            f"RemoteProtocolError: bad frontend: its producer index claims more than the "
            f"ring's {nr} slots"), rep
        assert rep["retry"] == ["get_requests: RemoteProtocolError",
                                "final_check_for_requests: RemoteProtocolError",
                                "unconsumed_requests: RemoteProtocolError"]
        assert rep["verified"] == 100 and rep["mismatch"] is None and rep["error"] is None, rep
        assert proc.exitcode == 0
        assert took < 10
        # Nothing was answered after the garbage index.
        assert front.shared_index(RSP_PROD) == 100
        assert front.get_responses() == b""
    finally:
        if proc is not None:
            _stop_peer(link, proc)
        link.close()


# ---------------------------------------------------------------------------
# 2/3. Payloads in granted pages
# ---------------------------------------------------------------------------

PAGES_PER_REQ = 16
OP_READ, OP_WRITE, OP_HOLD, OP_RELEASE, OP_STOP = 1, 2, 3, 4, 5
# seq, op, nr_refs, writable, pad, refs[16]  (80 bytes)
_GREQ = struct.Struct(f"<QBBBx{PAGES_PER_REQ}I4x")
# seq, status (GNTST), pad, gref that failed, digest
_GRSP = struct.Struct("<QhxxI32s")
_STAMP = struct.Struct("<QQ")
_BASE_LEN = (1 << 20) + PAGES_PER_REQ * PAGE_SIZE
_BASE = memoryview(hashlib.shake_256(b"xmp granted payloads").digest(_BASE_LEN))


def _payload(seq: int, npages: int) -> bytes:
    """npages pages derived from seq; each page starts with (seq, page no)."""
    off = (seq * 2654435761) % (1 << 20)
    parts = []
    for i in range(npages):
        parts.append(_STAMP.pack(seq, i))
        parts.append(_BASE[off + i * PAGE_SIZE + 16: off + (i + 1) * PAGE_SIZE])
    return b"".join(parts)


def _digest(data) -> bytes:
    return hashlib.sha256(data).digest()


def _gather(ram, frames) -> bytes:
    return b"".join([ram[f * PAGE_SIZE:(f + 1) * PAGE_SIZE] for f in frames])


def _grant_backend(link: SharedLink, tx) -> None:
    """dom0's block-style backend: each request names up to 16 grefs.

    READ: map read-only, check the pages byte for byte against the payload
    the sequence number implies, unmap, answer with a digest.  WRITE: map
    writable, fill the pages with the transformed payload, unmap.  HOLD /
    RELEASE: keep a mapping across requests.  A grant that does not check
    out is answered with its GNTST status and the next request is served.
    """
    rep = {"ok": 0, "bytes_verified": 0, "errors": [], "mismatch": None, "error": None}
    ring = link.back_ring(_GREQ.size, _GRSP.size)
    active = link.active_grants()
    ram = link.ram
    held: dict[int, tuple[list[int], bool]] = {}
    deadline = time.monotonic() + PEER_DEADLINE
    try:
        running = True
        while running:
            data = ring.get_requests()
            if not data:
                if ring.final_check_for_requests():
                    continue
                wake = _sleep(link.back_ev)
                if wake == Wake.SHUTDOWN:
                    rep["error"] = "shut down"
                    break
                if wake == Wake.TIMEOUT and time.monotonic() > deadline:
                    rep["error"] = "deadline passed"
                    break
                continue
            out = []
            for at in range(0, len(data), _GREQ.size):
                seq, op, nrefs, writable, *refs = _GREQ.unpack_from(data, at)
                refs = refs[:nrefs]
                status, bad_ref, digest = GNTST_okay, 0, b""
                try:
                    if op == OP_READ:
                        frames = active.map_grant_ref(refs, mapper=BACK_DOMID, readonly=True)
                        try:
                            got = _gather(ram, frames)
                        finally:
                            active.unmap_grant_ref(refs, readonly=True)
                        want = _payload(seq, nrefs)
                        if got != want:
                            if rep["mismatch"] is None:
                                bad = _first_mismatch(got, want, 0, PAGE_SIZE)
                                rep["mismatch"] = {"seq": seq, "page": bad["seq"]}
                            status = -1
                        else:
                            rep["bytes_verified"] += len(got)
                        digest = _digest(got)
                    elif op == OP_WRITE:
                        frames = active.map_grant_ref(refs, mapper=BACK_DOMID, readonly=False)
                        try:
                            fill = _payload(seq, nrefs).translate(_XFORM)
                            for i, fr in enumerate(frames):
                                ram[fr * PAGE_SIZE:(fr + 1) * PAGE_SIZE] = \
                                    fill[i * PAGE_SIZE:(i + 1) * PAGE_SIZE]
                        finally:
                            active.unmap_grant_ref(refs, readonly=False)
                        digest = _digest(fill)
                    elif op == OP_HOLD:
                        active.map_grant_ref(refs, mapper=BACK_DOMID, readonly=not writable)
                        held[seq] = (refs, not writable)
                        digest = _digest(repr([active.pins(r) for r in refs]).encode())
                    elif op == OP_RELEASE:
                        refs_held, ro = held.pop(seq)
                        active.unmap_grant_ref(refs_held, readonly=ro)
                    elif op == OP_STOP:
                        running = False
                    else:
                        status = -1
                except GrantError as exc:
                    status, bad_ref = exc.status, exc.gref
                    rep["errors"].append((seq, exc.status, exc.gref, str(exc)))
                if status == GNTST_okay and op != OP_STOP:
                    rep["ok"] += 1
                out.append(_GRSP.pack(seq, status, bad_ref, digest))
            assert ring.put_responses(b"".join(out)) == len(out)
            if ring.push_responses_and_check_notify():
                link.front_ev.send(LINK_PORT)
    except Exception as exc:
        rep["error"] = f"{type(exc).__name__}: {exc}"
    rep["still_held"] = sorted(held)
    tx.send(rep)


class _GrantFront:
    """The frontend side of the grant protocol, for the tests below."""

    def __init__(self, link: SharedLink, proc):
        self.link, self.proc = link, proc
        self.ring = link.front_ring(_GREQ.size, _GRSP.size)
        self.gt = link.grant_table()

    def send(self, seq, op, refs, writable=False) -> None:
        refs = list(refs)
        self.ring.put_request(_GREQ.pack(seq, op, len(refs), int(writable),
                                         *(refs + [0] * (PAGES_PER_REQ - len(refs)))))

    def push(self) -> None:
        if self.ring.push_requests_and_check_notify():
            self.link.back_ev.send(LINK_PORT)

    def responses(self, want: int | None = None, timeout: float = 30) -> list[tuple]:
        """Block until at least one response (or ``want`` of them) is in."""
        out = []
        deadline = time.monotonic() + timeout
        while True:
            data = self.ring.get_responses()
            out += [_GRSP.unpack_from(data, i) for i in range(0, len(data), _GRSP.size)]
            if out and (want is None or len(out) >= want):
                return out
            if data or self.ring.final_check_for_responses():
                continue
            if _sleep(self.link.front_ev) == Wake.TIMEOUT:
                assert self.proc.exitcode is None, f"backend died (exit {self.proc.exitcode})"
                assert time.monotonic() < deadline, f"no response within {timeout} s"

    def write_pages(self, frames, payload) -> None:
        ram = self.link.ram
        for i, f in enumerate(frames):
            ram[f * PAGE_SIZE:(f + 1) * PAGE_SIZE] = payload[i * PAGE_SIZE:(i + 1) * PAGE_SIZE]

    def stop(self, seq) -> None:
        self.send(seq, OP_STOP, [])
        self.push()
        (rsp,) = self.responses(1)
        assert rsp[:2] == (seq, GNTST_okay)


def _stream_granted_payloads(ns, count: int) -> None:
    inflight_max = 8
    layout = LinkLayout(data_pages=inflight_max * PAGES_PER_REQ)
    link = SharedLink.create(ns, layout)
    proc = None
    try:
        proc, rx = _start(link, _grant_backend)
        f = _GrantFront(link, proc)
        # Payload page i of a slot goes to a scrambled frame of that slot's
        # 16, so the backend really has to follow the frames it was given.
        perm = [(i * 5 + 3) % PAGES_PER_REQ for i in range(PAGES_PER_REQ)]
        slot_frames = [[s * PAGES_PER_REQ + p for p in perm] for s in range(inflight_max)]
        free_slots = deque(range(inflight_max))
        inflight: dict[int, tuple[int, list[int], bytes]] = {}
        next_seq = done = 0
        t0 = time.perf_counter()
        while done < count:
            while free_slots and next_seq < count:
                slot = free_slots.popleft()
                payload = _payload(next_seq, PAGES_PER_REQ)
                frames = slot_frames[slot]
                f.write_pages(frames, payload)
                refs = [f.gt.grant_foreign_access(BACK_DOMID, fr, readonly=True) for fr in frames]
                f.send(next_seq, OP_READ, refs)
                inflight[next_seq] = (slot, refs, _digest(payload))
                next_seq += 1
            f.push()
            for seq, status, bad_ref, digest in f.responses():
                slot, refs, want = inflight.pop(seq)
                assert (status, bad_ref) == (GNTST_okay, 0), (seq, status, bad_ref)
                for r in refs:  # raises EBUSY if the backend left it mapped
                    f.gt.end_foreign_access(r)
                assert digest == want, f"payload {seq}: digest mismatch"
                free_slots.append(slot)
                done += 1
        elapsed = time.perf_counter() - t0
        assert not inflight
        f.stop(count)
        rep = _recv_report(rx, proc, 30)
        reap(proc)
        assert rep["mismatch"] is None and rep["error"] is None, rep
        assert rep["errors"] == []
        assert rep["ok"] == count
        assert rep["bytes_verified"] == count * PAGES_PER_REQ * PAGE_SIZE
        assert proc.exitcode == 0
        # Every grant was ended: the whole table is free again.
        assert all(f.gt.entry(r)[0] == 0 for r in range(8, f.gt.nr_entries))
        print(f"{count} x 64 KiB granted payloads in {elapsed:.1f} s "
              f"({count * 65536 / elapsed / 1e6:.0f} MB/s)")
    finally:
        if proc is not None:
            _stop_peer(link, proc)
        link.close()


STREAM_BOUNDED = 20_000      # 1.3 GB; what CI runs
STREAM_FULL = 1_000_000      # 65 GB; XMP_STRESS_FULL=1


@pytest.mark.timeout(120)
def test_granted_64k_payloads_verified(ns):
    """20,000 payloads of 64 KiB, each in 16 granted pages, 8 in flight:
    the backend maps the grants read-only, checks every byte, unmaps and
    answers with a digest; the frontend ends each grant (which would fail
    were it still mapped) and checks the digest."""
    _stream_granted_payloads(ns, STREAM_BOUNDED)


@pytest.mark.stress
@pytest.mark.timeout(3600)
@pytest.mark.skipif(os.environ.get("XMP_STRESS_FULL") != "1",
                    reason="the 1,000,000-payload run needs XMP_STRESS_FULL=1")
def test_granted_64k_payloads_full(ns):
    """The same with 1,000,000 payloads (65 GB through granted pages)."""
    _stream_granted_payloads(ns, STREAM_FULL)


@pytest.mark.timeout(60)
def test_end_foreign_access_refused_while_backend_holds_mapping(ns):
    """While the backend process has a grant mapped, the grant entry shows
    it (GTF_reading/GTF_writing, set by the other process), the frontend's
    end_foreign_access fails with EBUSY and leaves the entry as it was, and
    make_readonly of a writably mapped grant fails too; after the backend
    unmaps, both succeed."""
    link = SharedLink.create(ns, LinkLayout(data_pages=4))
    proc = None
    try:
        proc, rx = _start(link, _grant_backend)
        f = _GrantFront(link, proc)
        ro_refs = [f.gt.grant_foreign_access(BACK_DOMID, fr, readonly=True) for fr in (0, 1)]
        rw_ref = f.gt.grant_foreign_access(BACK_DOMID, 2)
        f.send(1, OP_HOLD, ro_refs)
        f.send(2, OP_HOLD, [rw_ref], writable=True)
        f.push()
        rsps = f.responses(2)
        assert [r[:3] for r in rsps] == [(1, GNTST_okay, 0), (2, GNTST_okay, 0)]
        # the backend's own pin counts, as it saw them after mapping
        assert rsps[0][3] == _digest(repr([(1, 0), (1, 0)]).encode())
        assert rsps[1][3] == _digest(repr([(1, 1)]).encode())

        for ref, frame in zip(ro_refs, (0, 1), strict=True):
            assert f.gt.entry(ref) == (GTF_permit_access | GTF_readonly | GTF_reading, BACK_DOMID, frame)
            with pytest.raises(HypercallError) as info:
                f.gt.end_foreign_access(ref)
            assert info.value.errno == errno.EBUSY
            assert str(info.value) == f"end_foreign_access: EBUSY (gref {ref} is mapped)"
            assert f.gt.entry(ref) == (GTF_permit_access | GTF_readonly | GTF_reading, BACK_DOMID, frame)
        assert f.gt.entry(rw_ref) == (GTF_permit_access | GTF_reading | GTF_writing, BACK_DOMID, 2)
        with pytest.raises(HypercallError) as info:
            f.gt.make_readonly(rw_ref)
        assert info.value.errno == errno.EBUSY and f"gref {rw_ref} is mapped writable" in str(info.value)
        with pytest.raises(HypercallError):
            f.gt.end_foreign_access(rw_ref)

        f.send(1, OP_RELEASE, [])
        f.send(2, OP_RELEASE, [])
        f.push()
        assert [r[:2] for r in f.responses(2)] == [(1, GNTST_okay), (2, GNTST_okay)]
        f.gt.make_readonly(rw_ref)
        assert f.gt.entry(rw_ref) == (GTF_permit_access | GTF_readonly, BACK_DOMID, 2)
        for ref in ro_refs + [rw_ref]:
            f.gt.end_foreign_access(ref)
            assert f.gt.entry(ref)[0] == 0
        f.stop(3)
        rep = _recv_report(rx, proc, 10)
        reap(proc)
        assert rep["error"] is None and rep["errors"] == [] and rep["still_held"] == [], rep
        assert proc.exitcode == 0
    finally:
        if proc is not None:
            _stop_peer(link, proc)
        link.close()


class _Round:
    """One round of the hostile-grant test: requests planned in order, each
    with the status (and failing gref) the backend must answer."""

    def __init__(self, front: _GrantFront, seq: int, npages: int, nframes: int):
        self.f, self.gt, self.seq, self.npages = front, front.gt, seq, npages
        self.frames = iter(range(nframes))
        # (seq, op, refs, writable, want_status, want_bad_ref, refs to end after,
        #  bytes the pages / digest must hold, frames)
        self.plan: list[tuple] = []

    def take(self, k: int | None = None) -> list[int]:
        return [next(self.frames) for _ in range(k or self.npages)]

    def honest(self, op: int = OP_READ) -> None:
        fr = self.take()
        data = _payload(self.seq, self.npages)
        if op == OP_READ:
            self.f.write_pages(fr, data)
        else:
            data = data.translate(_XFORM)  # what the backend must write
        refs = [self.gt.grant_foreign_access(BACK_DOMID, x, readonly=op == OP_READ) for x in fr]
        self.plan.append((self.seq, op, refs, False, GNTST_okay, 0, refs, data, fr))
        self.seq += 1

    def hostile(self, refs, want_status, bad, op=OP_READ, end=()) -> None:
        self.plan.append((self.seq, op, list(refs), False, want_status, bad, list(end), None, None))
        self.seq += 1


@pytest.mark.timeout(90)
def test_backend_refuses_bad_grants_and_keeps_serving(ns):
    """A hostile frontend mixes grants that do not check out with honest
    requests, all in flight at once, for 20 rounds.  The backend process
    gets GrantError with the right GNTST status and gref for each bad one,
    answers it with that status, and verifies every honest payload around
    it; a batch that fails on its third ref leaves no pin on the first two."""
    npages = 2
    nframes = 20
    link = SharedLink.create(ns, LinkLayout(data_pages=nframes))
    proc = None
    try:
        proc, rx = _start(link, _grant_backend)
        f = _GrantFront(link, proc)
        gt = f.gt
        seq = 0
        expected_errors = []
        for _round in range(20):
            r = _Round(f, seq, npages, nframes)
            r.honest()
            # granted to the wrong domain
            wrong = [gt.grant_foreign_access(7, x, readonly=True) for x in r.take()]
            r.hostile(wrong, GNTST_permission_denied, wrong[0], end=wrong)
            r.honest()
            # granted, then ended before the backend looks (ended only once
            # every other grant of the round is made, so no ref is reused)
            ended = [gt.grant_foreign_access(BACK_DOMID, x, readonly=True) for x in r.take()]
            r.hostile(ended, GNTST_permission_denied, ended[0])
            # read-only grant, but the request asks the backend to write
            ro = [gt.grant_foreign_access(BACK_DOMID, x, readonly=True) for x in r.take()]
            r.hostile(ro, GNTST_permission_denied, ro[0], op=OP_WRITE, end=ro)
            # an honest write into writable grants
            r.honest(OP_WRITE)
            # a ref outside the table, and reserved ref 0 that nobody granted
            r.hostile([gt.nr_entries + 100], GNTST_bad_gntref, gt.nr_entries + 100)
            r.hostile([0], GNTST_permission_denied, 0)
            # all or nothing: two good refs, then one for another domain
            fr = r.take(3)
            mixed = [gt.grant_foreign_access(BACK_DOMID, x, readonly=True) for x in fr[:2]]
            mixed.append(gt.grant_foreign_access(9, fr[2], readonly=True))
            r.hostile(mixed, GNTST_permission_denied, mixed[2], end=mixed)
            r.honest()
            seq = r.seq

            for ref in ended:
                gt.end_foreign_access(ref)
            for s, op, refs, writable, *_ in r.plan:
                f.send(s, op, refs, writable)
            f.push()
            rsps = f.responses(len(r.plan))
            assert len(rsps) == len(r.plan)
            for (s, status, bad, digest), planned in zip(rsps, r.plan, strict=True):
                ps, op, refs, _w, want_st, want_bad, end, data, frames = planned
                assert (s, status, bad) == (ps, want_st, want_bad), f"request {ps} (op {op}, refs {refs})"
                if want_st != GNTST_okay:
                    expected_errors.append((s, want_st, want_bad))
                    assert digest == bytes(32)
                else:
                    assert digest == _digest(data)
                    if op == OP_WRITE:  # the backend's writes landed in our pages
                        assert _gather(link.ram, frames) == data
                for ref in end:  # no pin left behind, not even by a failed batch
                    flags, _dom, _frame = gt.entry(ref)
                    assert not flags & (GTF_reading | GTF_writing), (ps, ref, flags)
                    gt.end_foreign_access(ref)
        f.stop(seq)
        rep = _recv_report(rx, proc, 10)
        reap(proc)
        assert rep["error"] is None and rep["mismatch"] is None, rep
        assert [e[:3] for e in rep["errors"]] == expected_errors
        names = {GNTST_permission_denied: "GNTST_permission_denied", GNTST_bad_gntref: "GNTST_bad_gntref"}
        for _s, status, gref, msg in rep["errors"]:
            assert msg == f"map_grant_ref of gref {gref} (granted by dom1): {names[status]}"
        assert rep["ok"] == 20 * 4  # 3 honest reads + 1 honest write per round
        assert rep["bytes_verified"] == 20 * 3 * npages * PAGE_SIZE
        assert proc.exitcode == 0
        assert all(gt.entry(r)[0] == 0 for r in range(8, gt.nr_entries))
    finally:
        if proc is not None:
            _stop_peer(link, proc)
        link.close()
