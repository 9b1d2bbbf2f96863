"""Event channels: Xen's 2-level ABI, split by who may write what.

A domain's event state is three kinds of object (the layouts are in
fast.c)::

    private event object  held by the domain and the supervisor only
        page 0     struct shared_info (xen.h): vcpu_info[32] (64 bytes each:
                   evtchn_upcall_pending u8 @0, evtchn_upcall_mask u8 @1,
                   evtchn_pending_sel u64 @8), evtchn_pending[64] u64 @2048,
                   evtchn_mask[64] u64 @2560
        page 1     per-vCPU upcall records (shutdown word, private kick
                   futex word), doorbell generation
        pages 2-3  owner[4096] u16: 1 + the domid each port is bound to
        page 4     notify_vcpu[4096] u8: the vCPU each port is delivered to
    wake page             one word per vCPU, 1 while the vCPU sleeps; the
                          domain writes it, senders hold it sealed read-only
    doorbell (R, S)       one per receiver R and sender S, the only thing S
                          writes: summary[32] u64 @0 (per-vCPU selector),
                          kick[32] u32 @256 (futex words), pending[64] u64 @512

Why: a peer handed the receiver's shared_info could mask, clear or fake any
of its events, and a sem_t in a page the peer writes can be overwritten.
Now a sender writes only its own doorbell; the receiver takes from it only
ports the supervisor bound to that sender (the owner table), so a hostile
sender disturbs nothing but the events it sends itself.

Delivery.  The supervisor, and a domain raising its own ports, use
``send`` (evtchn_2l_set_pending): test-and-set the pending bit; only if it
was clear and the port is unmasked set the selector bit, and only if *that*
was clear set ``evtchn_upcall_pending`` and wake the vCPU if it sleeps.  A
peer's notify goes through :class:`Doorbell`: set the bit, on 0->1 the
summary bit, on 0->1 bump the doorbell's kick word and, if the receiver
sleeps, ``FUTEX_WAKE`` it.  The receiver sleeps in ``futex_waitv`` on its
private kick word and every doorbell's at once (futexes need a word that
changes: a wake-only futex loses a kick that lands just before the sleep).
No lost wake-up: the waiter reads the kick words, sets its sleep flag,
fences, re-checks ``upcall_pending`` and every doorbell summary; a sender
sets its bit, bumps its word, fences, reads the flag -- one of the two sees
the other, and a bump after the read makes the wait return at once.  A
sender changes only its own doorbell's words, so it can spoil only its own
wake-ups.  The receiver clears ``upcall_pending`` (and takes each
summary) before it scans, so a send during a scan tells it again.  A
masked port stays pending -- in the doorbell its bit stays set, so its
sender stops telling -- and is delivered by ``unmask``.  A post can at worst
be spurious, which every handler tolerates by re-checking its ring.

vCPUs.  A port is delivered to its notify vCPU (Xen's notify_vcpu_id:
bind_virq / bind_ipi name it, ``set_vcpu`` -- EVTCHNOP_bind_vcpu -- moves
it), whoever sends: ``send`` raises that vCPU's selector and wakes it, and
a vCPU's scan takes only its own ports.  Doorbells are vCPU 0's: a sender
cannot see the receiver's bindings, so vCPU 0's scan hands a port bound
elsewhere to its vCPU (one more kick, only for such ports).  So only
vCPU 0 ever touches the doorbell array, and the other vCPUs' threads can
wait and scan beside it without a lock.

Doorbells come and go (a peer binds, a peer dies): the supervisor bumps
the generation and kicks; the receiver's next :meth:`EventChannels.scan`
calls its ``refresh`` hook (the domain asks the supervisor for its set).
Who may bind which port is the hypervisor's private bookkeeping,
:class:`PortTable`.
"""

from __future__ import annotations

import enum
import errno
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from xmp.errors import HypercallError, LocalError
from xmp.sharedmem._ffi import ffi, lib
from xmp.sharedmem.page import PAGE_SIZE

EVTCHN_OBJECT_SIZE = 5 * PAGE_SIZE
EVTCHN_WAKE_SIZE = PAGE_SIZE
DOORBELL_SIZE = PAGE_SIZE
EVTCHN_2L_NR_CHANNELS = 4096  # 64 * 64 on a 64-bit guest
DEFAULT_MAX_EVTCHNS = 1023     # xl.cfg max_event_channels
MAX_VCPUS = 32                 # XEN_LEGACY_MAX_VCPUS: vcpu_info slots in shared_info
SHINFO_PENDING = 2048
SHINFO_MASK = 2560
OWNER_TABLE = 2 * PAGE_SIZE
DOORBELL_KICK = 256
DOORBELL_PENDING = 512

# VIRQs (xen.h)
VIRQ_TIMER, VIRQ_DEBUG, VIRQ_CONSOLE, VIRQ_DOM_EXC = 0, 1, 2, 3
VIRQ_CON_RING = 8
NR_VIRQS = 24
PER_VCPU_VIRQS = frozenset({VIRQ_TIMER, VIRQ_DEBUG})


class Wake(enum.IntEnum):
    """Why :meth:`EventChannels.wait` returned."""

    TIMEOUT = 0
    EVENT = 1
    SHUTDOWN = 2


_WAKE = (Wake.TIMEOUT, Wake.EVENT, Wake.SHUTDOWN)
_SCAN_RESYNC = 0xFFFFFFFF  # fast.c's XMP_SCAN_RESYNC


class EventChannels:
    """One domain's private event object and wake page, as the domain and
    the supervisor see them.  The creator passes ``init_vcpus``; everyone
    else attaches to a live object.  ``wake`` defaults to a private page
    (one process, e.g. unit tests)."""

    def __init__(self, buf, wake=None, *, init_vcpus: int = 0):
        self._buf = buf
        self._mem = ffi.from_buffer("uint8_t[]", buf, require_writable=True)
        if len(self._mem) < EVTCHN_OBJECT_SIZE or int(ffi.cast("uintptr_t", self._mem)) % 8:
            raise LocalError(f"an event object needs {EVTCHN_OBJECT_SIZE} aligned bytes")
        self._wake_buf = bytearray(EVTCHN_WAKE_SIZE) if wake is None else wake
        self._wake = ffi.from_buffer("uint32_t[]", self._wake_buf, require_writable=True)
        if len(self._wake) * 4 < EVTCHN_WAKE_SIZE:
            raise LocalError(f"a wake page needs {EVTCHN_WAKE_SIZE} bytes")
        self._ct = ffi.new("xmp_evtchn_t *")
        self._ct.ev = self._mem
        self._ct.wake = self._wake
        self._ports = ffi.new("uint32_t[]", EVTCHN_2L_NR_CHANNELS)
        self._vcpu_ports: dict[int, Any] = {}   # vCPU > 0: each thread its own buffer
        # Doorbells: changed from any thread, applied by sync() in the
        # thread that scans, so the array a waiter in C reads never moves
        # under it; what it replaced is kept one more sync.
        self._doorbells: dict[int, Any] = {}
        self._dbs_lock = threading.Lock()
        self._dbs_dirty = False
        self._dbs_arr = ffi.new("xmp_doorbell_ref_t[]", 1)
        self._old_arr: Any = None
        self._dead: list[tuple[Any, Callable[[], None] | None]] = []   # detached since the last sync
        self._dying: list[tuple[Any, Callable[[], None] | None]] = []  # closed at the next sync
        self.refresh: Callable[[], None] | None = None
        self.nr_vcpus = init_vcpus
        if init_vcpus:
            rc = lib.xmp_evtchn_init(self._mem, init_vcpus)
            if rc:
                raise HypercallError(-rc, "evtchn_init")

    # -- the domain's own events (and the supervisor's) ----------------------

    def send(self, port: int, vcpu: int = 0) -> bool:
        """Raise ``port``; True if the receiver was kicked."""
        rc = lib.xmp_evtchn_send(self._ct, _port(port), vcpu)
        if rc < 0:
            raise HypercallError(-rc, "evtchn_send", f"port {port} vcpu {vcpu}")
        return bool(rc)

    def mask(self, port: int) -> None:
        lib.xmp_evtchn_mask(self._ct, _port(port))

    def unmask(self, port: int, vcpu: int = 0) -> bool:
        """EVTCHNOP_unmask: clear the mask; re-deliver if pending."""
        rc = lib.xmp_evtchn_unmask(self._ct, _port(port), vcpu)
        if rc < 0:
            raise HypercallError(-rc, "evtchn_unmask", f"port {port} vcpu {vcpu}")
        return bool(rc)

    def clear(self, port: int) -> None:
        lib.xmp_evtchn_clear(self._ct, _port(port))

    def is_pending(self, port: int) -> bool:
        """Pending privately or in the doorbell of the port's sender."""
        return bool(lib.xmp_evtchn_is_pending(self._ct, _port(port)))

    def is_masked(self, port: int) -> bool:
        return bool(lib.xmp_evtchn_is_masked(self._ct, _port(port)))

    def upcall_pending(self, vcpu: int = 0) -> bool:
        return bool(self._mem[vcpu * 64])

    def set_owner(self, port: int, remote_dom: int | None) -> None:
        """Supervisor: ``port`` is bound to ``remote_dom`` (None: to nobody);
        only that domain's doorbell may raise it."""
        lib.xmp_evtchn_set_owner(self._mem, _port(port), 0 if remote_dom is None else remote_dom + 1)

    def set_vcpu(self, port: int, vcpu: int) -> None:
        """Supervisor: deliver ``port`` to ``vcpu`` from now on (what is
        pending is told to it)."""
        rc = lib.xmp_evtchn_set_vcpu(self._ct, _port(port), vcpu)
        if rc < 0:
            raise HypercallError(-rc, "evtchn_bind_vcpu", f"port {port} vcpu {vcpu}")

    def notify_vcpu(self, port: int) -> int:
        return self._mem[4 * PAGE_SIZE + _port(port)]

    def scan(self, vcpu: int = 0) -> list[int]:
        """Take every pending, unmasked port of ``vcpu`` (clearing its
        pending bit), private ones first, then (vCPU 0) each doorbell's."""
        if vcpu:
            buf = self._vcpu_ports.get(vcpu)
            if buf is None:
                buf = self._vcpu_ports[vcpu] = ffi.new("uint32_t[]", EVTCHN_2L_NR_CHANNELS)
            n = lib.xmp_evtchn_scan(self._ct, vcpu, buf, EVTCHN_2L_NR_CHANNELS)
            return list(buf[0:n])
        if self._dbs_dirty:
            self.sync()
        n = lib.xmp_evtchn_scan(self._ct, vcpu, self._ports, EVTCHN_2L_NR_CHANNELS)
        if n == _SCAN_RESYNC:  # the supervisor changed our doorbells: fetch them first
            self.sync()
            n = lib.xmp_evtchn_scan(self._ct, vcpu, self._ports, EVTCHN_2L_NR_CHANNELS)
            if n == _SCAN_RESYNC:  # changed again meanwhile: the next scan gets it
                lib.xmp_evtchn_kick(self._ct, vcpu)
                return []
        return list(self._ports[0:n])

    def wait(self, vcpu: int = 0, timeout: float | None = None, spin: float = 50e-6) -> Wake:
        """Block until an upcall is pending, ``timeout`` seconds pass, or a
        shutdown is requested.  Polls for ``spin`` seconds first (latency),
        then sleeps on the wake word (an idle domain uses no CPU)."""
        t = -1 if timeout is None else max(0, int(timeout * 1e9))
        rc = lib.xmp_evtchn_wait(self._ct, vcpu, t, int(spin * 1e9))
        if rc < 0:
            raise HypercallError(-rc, "evtchn_wait")
        return _WAKE[rc]  # a tuple lookup: Wake(rc) costs a microsecond on a hot path

    def request_shutdown(self, vcpu: int = 0) -> None:
        """Make ``wait`` on ``vcpu`` return SHUTDOWN, now and from then on."""
        lib.xmp_evtchn_request_shutdown(self._ct, vcpu)

    # -- doorbells -------------------------------------------------------------

    def attach_doorbell(self, sender: int, buf, closer: Callable[[], None] | None = None) -> None:
        """Take events from ``sender``'s doorbell (it replaces an older one).
        ``closer`` unmaps it once nothing can be reading it any more."""
        mem = ffi.from_buffer("uint8_t[]", buf, require_writable=True)
        if len(mem) < DOORBELL_SIZE:
            raise LocalError(f"a doorbell needs {DOORBELL_SIZE} bytes")
        with self._dbs_lock:
            old = self._doorbells.pop(sender, None)
            if old is not None:
                self._dead.append(old)
            self._doorbells[sender] = (mem, closer)
            self._dbs_dirty = True
        self._kick_self()

    def detach_doorbell(self, sender: int) -> bool:
        """Stop looking at ``sender``'s doorbell; it is closed by a later
        :meth:`sync`, once the scanning thread has let go of it."""
        with self._dbs_lock:
            held = self._doorbells.pop(sender, None)
            if held is None:
                return False
            self._dead.append(held)
            self._dbs_dirty = True
        self._kick_self()
        return True

    def doorbell_senders(self) -> list[int]:
        with self._dbs_lock:
            return sorted(self._doorbells)

    def doorbell_muted(self, sender: int) -> bool:
        """Is ``sender``'s doorbell muted (its news kept holding nothing)?
        For the scanning thread and tests."""
        owner = sender + 1
        now = time.monotonic_ns()  # CLOCK_MONOTONIC, as fast.c's
        return any(self._dbs_arr[i].owner == owner and self._dbs_arr[i].muted_until > now
                   for i in range(self._ct.nr_dbs))

    def bump_generation(self) -> None:
        """Supervisor: the set of doorbells changed; make the domain look."""
        lib.xmp_evtchn_bump_gen(self._ct, max(self.nr_vcpus, 1))

    def sync(self, drain: bool = False) -> None:
        """Apply doorbell changes; called by the scanning thread (scan does
        it), or by a single-threaded owner such as the supervisor with
        ``drain`` (nothing else is in C: close detached doorbells now).
        Calls ``refresh`` first when the supervisor said the set changed."""
        gen = lib.xmp_evtchn_db_gen(self._ct)
        if gen != self._ct.seen_gen:
            if self.refresh is not None:
                self.refresh()
            self._ct.seen_gen = gen  # a bump during refresh is seen by the next scan
        with self._dbs_lock:
            # Detached before the previous sync: no C call can still be on
            # them (another thread's unmask got the array of then at worst).
            dying, self._dying = self._dying, []
            if self._dbs_dirty:
                self._dbs_dirty = False
                items = sorted(self._doorbells.items())
                arr = ffi.new("xmp_doorbell_ref_t[]", max(len(items), 1))
                # a mute (see fast.c) outlives the array it was decided in
                kept = {self._dbs_arr[i].owner: self._dbs_arr[i] for i in range(self._ct.nr_dbs)}
                for i, (sender, (mem, _closer)) in enumerate(items):
                    arr[i].db = mem
                    arr[i].owner = sender + 1
                    old = kept.get(sender + 1)
                    if old is not None:
                        arr[i].empty, arr[i].strikes = old.empty, old.strikes
                        arr[i].muted_until = old.muted_until
                self._ct.dbs = arr
                self._ct.nr_dbs = len(items)
                self._old_arr, self._dbs_arr = self._dbs_arr, arr
                self._dying, self._dead = self._dead, []
            if drain:
                dying += self._dying
                self._dying, self._old_arr = [], None
            self._dbs_dirty = self._dbs_dirty or bool(self._dying)  # come back to close them
        for mem, closer in dying:
            ffi.release(mem)
            if closer is not None:
                closer()

    @property
    def closing(self) -> bool:
        """Detached doorbells wait for a later :meth:`sync` to be closed: the
        scanning thread must come back even if no event wakes it."""
        return bool(self._dying or self._dead)

    def _kick_self(self) -> None:
        # the scanning thread may be asleep in wait(): make it scan (and sync)
        for vcpu in range(max(self.nr_vcpus, 1)):
            lib.xmp_evtchn_kick(self._ct, vcpu)

    def destroy(self) -> None:
        """Creator only, once every user is gone."""
        lib.xmp_evtchn_destroy(self._mem, self.nr_vcpus)
        self.nr_vcpus = 0

    def release(self) -> None:
        self._ct.dbs = ffi.NULL
        self._ct.nr_dbs = 0
        with self._dbs_lock:
            held = list(self._doorbells.values()) + self._dead + self._dying
            self._doorbells.clear()
            self._dead, self._dying = [], []
        for mem, closer in held:
            ffi.release(mem)
            if closer is not None:
                closer()
        ffi.release(self._mem)
        ffi.release(self._wake)
        for buf in (self._buf, self._wake_buf):
            if isinstance(buf, memoryview):
                buf.release()  # a slice of a mapping: let the mapping close


class Doorbell:
    """A sender's end of one (receiver, sender) doorbell: the doorbell page
    (writable) and the receiver's wake page (read-only)."""

    def __init__(self, buf, wake):
        self._db = ffi.from_buffer("uint8_t[]", buf, require_writable=True)
        self._wake = ffi.from_buffer("uint32_t[]", wake)
        if len(self._db) < DOORBELL_SIZE or len(self._wake) * 4 < EVTCHN_WAKE_SIZE:
            raise LocalError("a doorbell and a wake page need a page each")

    def send(self, port: int, vcpu: int = 0) -> bool:
        """Raise ``port`` at the receiver; True if it was told (0->1)."""
        rc = lib.xmp_doorbell_send(self._db, self._wake, _port(port), vcpu)
        if rc < 0:
            raise HypercallError(-rc, "evtchn_send", f"port {port} vcpu {vcpu}")
        return bool(rc)

    def release(self) -> None:
        ffi.release(self._db)
        ffi.release(self._wake)


def _port(port: int) -> int:
    if not 0 <= port < EVTCHN_2L_NR_CHANNELS:
        raise HypercallError(errno.EINVAL, "evtchn", f"port {port} outside 0..{EVTCHN_2L_NR_CHANNELS - 1}")
    return port


# ---------------------------------------------------------------------------
# Port bookkeeping (the hypervisor's private state, event_channel.c)
# ---------------------------------------------------------------------------


class PortState(enum.IntEnum):
    """EVTCHNSTAT_* as returned by EVTCHNOP_status."""

    CLOSED = 0
    UNBOUND = 1
    INTERDOMAIN = 2
    PIRQ = 3
    VIRQ = 4
    IPI = 5


@dataclass
class Port:
    state: PortState = PortState.CLOSED
    remote_dom: int = -1
    remote_port: int = 0
    virq: int = -1
    vcpu: int = 0


class PortTable:
    """One domain's ports.  Port 0 is reserved, as in Xen; valid ports are
    1 .. max_evtchns-1 and allocation past that fails with ENOSPC."""

    def __init__(self, domid: int, max_evtchns: int = DEFAULT_MAX_EVTCHNS):
        if not 1 < max_evtchns <= EVTCHN_2L_NR_CHANNELS:
            raise LocalError(f"max_event_channels {max_evtchns} outside 2..{EVTCHN_2L_NR_CHANNELS}")
        self.domid = domid
        self.max_evtchns = max_evtchns
        self._ports: dict[int, Port] = {}
        self._virqs: dict[tuple[int, int], int] = {}

    def _alloc(self, op: str, port: Port) -> int:
        for p in range(1, self.max_evtchns):
            if p not in self._ports:
                self._ports[p] = port
                return p
        raise HypercallError(errno.ENOSPC, op, f"dom{self.domid} has all {self.max_evtchns - 1} ports in use")

    def get(self, port: int, op: str = "evtchn_status") -> Port:
        if not 0 < port < self.max_evtchns:
            raise HypercallError(errno.EINVAL, op, f"port {port} is not valid for dom{self.domid}")
        return self._ports.get(port) or Port()

    def alloc_unbound(self, remote_dom: int) -> int:
        return self._alloc("alloc_unbound", Port(PortState.UNBOUND, remote_dom=remote_dom))

    def bind_virq(self, virq: int, vcpu: int = 0) -> int:
        if not 0 <= virq < NR_VIRQS:
            raise HypercallError(errno.EINVAL, "bind_virq", f"virq {virq}")
        if virq not in PER_VCPU_VIRQS and vcpu != 0:
            raise HypercallError(errno.EINVAL, "bind_virq", f"global virq {virq} binds on vcpu 0 only")
        if (virq, vcpu) in self._virqs:
            raise HypercallError(errno.EEXIST, "bind_virq", f"virq {virq} already bound on vcpu {vcpu}")
        port = self._alloc("bind_virq", Port(PortState.VIRQ, virq=virq, vcpu=vcpu))
        self._virqs[(virq, vcpu)] = port
        return port

    def virq_port(self, virq: int, vcpu: int = 0) -> int | None:
        return self._virqs.get((virq, vcpu))

    def bind_ipi(self, vcpu: int = 0) -> int:
        return self._alloc("bind_ipi", Port(PortState.IPI, vcpu=vcpu))

    def bound(self) -> dict[int, Port]:
        return dict(self._ports)

    # -- saved state -------------------------------------------------------

    def save(self) -> dict:
        """The table as JSON-safe data: ``[port, state, remote_dom,
        remote_port, virq, vcpu]`` for each port in use."""
        return {"domid": self.domid, "max_evtchns": self.max_evtchns,
                "ports": [[n, int(p.state), p.remote_dom, p.remote_port, p.virq, p.vcpu]
                          for n, p in sorted(self._ports.items())]}

    @classmethod
    def restore(cls, data: dict) -> PortTable:
        """A table from :meth:`save`'s data, checked as fresh input is: a
        port out of range, twice, of an unknown state, or a VIRQ bound twice
        is refused (LocalError) and nothing is built."""
        try:
            table = cls(int(data["domid"]), int(data["max_evtchns"]))
            for n, state, remote_dom, remote_port, virq, vcpu in data["ports"]:
                ints = (n, state, remote_dom, remote_port, virq, vcpu)
                if not all(isinstance(v, int) and not isinstance(v, bool) for v in ints):
                    raise ValueError(f"port entry {ints!r}")
                if not 0 < n < table.max_evtchns or n in table._ports:
                    raise ValueError(f"port {n} is out of range or listed twice")
                port = Port(PortState(state), remote_dom, remote_port, virq, vcpu)
                if port.state == PortState.VIRQ:
                    if not 0 <= virq < NR_VIRQS or (virq, vcpu) in table._virqs:
                        raise ValueError(f"virq {virq} on vcpu {vcpu}")
                    table._virqs[(virq, vcpu)] = n
                table._ports[n] = port
        except (KeyError, TypeError, ValueError) as exc:
            raise LocalError(f"a saved port table is malformed: {exc}") from None
        return table


def bind_interdomain(local: PortTable, remote: PortTable, remote_port: int) -> int:
    """EVTCHNOP_bind_interdomain: bind a fresh local port to ``remote_port``,
    which must be unbound and offered to ``local``'s domain (else EINVAL,
    and nothing changes).  Both ends become INTERDOMAIN; the caller must
    then mark the new local port pending, as Xen does."""
    rp = remote.get(remote_port, "bind_interdomain")
    if rp.state != PortState.UNBOUND or rp.remote_dom != local.domid:
        raise HypercallError(errno.EINVAL, "bind_interdomain",
                             f"dom{remote.domid} port {remote_port} is not offered to dom{local.domid}")
    port = local._alloc("bind_interdomain", Port(PortState.INTERDOMAIN, remote.domid, remote_port))
    rp.state, rp.remote_port = PortState.INTERDOMAIN, port
    remote._ports[remote_port] = rp
    return port


def close_port(table: PortTable, port: int, peers: dict[int, PortTable]) -> None:
    """EVTCHNOP_close: free ``port``; an interdomain peer reverts to
    UNBOUND (still offered to this domain)."""
    p = table.get(port, "evtchn_close")
    if p.state == PortState.CLOSED:
        raise HypercallError(errno.EINVAL, "evtchn_close", f"port {port} of dom{table.domid} is not bound")
    if p.state == PortState.INTERDOMAIN:
        peer = peers.get(p.remote_dom)
        if peer is not None:
            rp = peer._ports.get(p.remote_port)
            if rp is not None and rp.state == PortState.INTERDOMAIN and rp.remote_port == port:
                rp.state, rp.remote_port = PortState.UNBOUND, 0
    if p.state == PortState.VIRQ:
        del table._virqs[(p.virq, p.vcpu)]
    del table._ports[port]
