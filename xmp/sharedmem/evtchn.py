"""Event channels: Xen's 2-level ABI over a shared event object.

The event object of a domain is two pages::

    page 0  struct shared_info (xen.h): vcpu_info[32] (64 bytes each:
            evtchn_upcall_pending u8 @0, evtchn_upcall_mask u8 @1,
            evtchn_pending_sel u64 @8), evtchn_pending[64] u64 @2048,
            evtchn_mask[64] u64 @2560
    page 1  xmp's upcall records, one per vCPU: a process-shared sem_t (the
            "kick"), a shutdown word

Delivery (``send``, evtchn_2l_set_pending): test-and-set the port's pending
bit; only if it was clear and the port is unmasked set the selector bit, and
only if *that* was clear set ``evtchn_upcall_pending`` and, on its 0->1
transition, post the vCPU's semaphore.  The receiver clears
``upcall_pending`` before it scans, so a send that lands during a scan kicks
again: no event is ever lost, and a post can at worst be spurious, which
every handler tolerates by re-checking its ring.  A masked port stays
pending and is delivered by ``unmask``.

All of it runs in C with atomic read-modify-writes; :class:`EventChannels`
is the Python face.  Who may bind which port is the hypervisor's private
bookkeeping, :class:`PortTable`.
"""

from __future__ import annotations

import enum
import errno
from dataclasses import dataclass

from xmp.errors import HypercallError, LocalError
from xmp.sharedmem._ffi import ffi, lib
from xmp.sharedmem.page import PAGE_SIZE

EVTCHN_OBJECT_SIZE = 2 * PAGE_SIZE
EVTCHN_2L_NR_CHANNELS = 4096  # 64 * 64 on a 64-bit guest
DEFAULT_MAX_EVTCHNS = 1023     # xl.cfg max_event_channels
MAX_VCPUS = 32                 # XEN_LEGACY_MAX_VCPUS: vcpu_info slots in shared_info
SHINFO_PENDING = 2048
SHINFO_MASK = 2560

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


class EventChannels:
    """One domain's event object.  The creator passes ``init_vcpus`` to
    initialise the semaphores; everyone else attaches to a live object."""

    def __init__(self, buf, *, init_vcpus: int = 0):
        self._mem = ffi.from_buffer("uint8_t[]", buf, require_writable=True)
        if len(self._mem) < EVTCHN_OBJECT_SIZE or int(ffi.cast("uintptr_t", self._mem)) % 8:
            raise LocalError(f"an event object needs {EVTCHN_OBJECT_SIZE} aligned bytes")
        self._ports = ffi.new("uint32_t[]", EVTCHN_2L_NR_CHANNELS)
        self.nr_vcpus = init_vcpus
        if init_vcpus:
            rc = lib.xmp_evtchn_init(self._mem, init_vcpus)
            if rc:
                raise HypercallError(-rc, "evtchn_init")

    def send(self, port: int, vcpu: int = 0) -> bool:
        """Raise ``port``; True if the receiver was kicked."""
        rc = lib.xmp_evtchn_send(self._mem, _port(port), vcpu)
        if rc < 0:
            raise HypercallError(-rc, "evtchn_send", f"port {port} vcpu {vcpu}")
        return bool(rc)

    def mask(self, port: int) -> None:
        lib.xmp_evtchn_mask(self._mem, _port(port))

    def unmask(self, port: int, vcpu: int = 0) -> bool:
        """EVTCHNOP_unmask: clear the mask; re-deliver if pending."""
        rc = lib.xmp_evtchn_unmask(self._mem, _port(port), vcpu)
        if rc < 0:
            raise HypercallError(-rc, "evtchn_unmask", f"port {port} vcpu {vcpu}")
        return bool(rc)

    def clear(self, port: int) -> None:
        lib.xmp_evtchn_clear(self._mem, _port(port))

    def is_pending(self, port: int) -> bool:
        return bool(lib.xmp_evtchn_is_pending(self._mem, _port(port)))

    def is_masked(self, port: int) -> bool:
        return bool(lib.xmp_evtchn_is_masked(self._mem, _port(port)))

    def upcall_pending(self, vcpu: int = 0) -> bool:
        return bool(self._mem[vcpu * 64])

    def scan(self, vcpu: int = 0) -> list[int]:
        """Take every pending, unmasked port (clearing its pending bit), in
        port order within each selector word."""
        n = lib.xmp_evtchn_scan(self._mem, vcpu, self._ports, EVTCHN_2L_NR_CHANNELS)
        return list(self._ports[0:n])

    def wait(self, vcpu: int = 0, timeout: float | None = None, spin: float = 50e-6) -> Wake:
        """Block until an upcall is pending, ``timeout`` seconds pass, or a
        shutdown is requested.  Polls for ``spin`` seconds first (latency),
        then sleeps on the semaphore (an idle domain uses no CPU)."""
        t = -1 if timeout is None else max(0, int(timeout * 1e9))
        rc = lib.xmp_evtchn_wait(self._mem, vcpu, t, int(spin * 1e9))
        if rc < 0:
            raise HypercallError(-rc, "evtchn_wait")
        return _WAKE[rc]  # a tuple lookup: Wake(rc) costs a microsecond on a hot path

    def request_shutdown(self, vcpu: int = 0) -> None:
        """Make ``wait`` on ``vcpu`` return SHUTDOWN, now and from then on."""
        lib.xmp_evtchn_request_shutdown(self._mem, vcpu)

    def destroy(self) -> None:
        """Creator only, once every user is gone: destroy the semaphores."""
        lib.xmp_evtchn_destroy(self._mem, self.nr_vcpus)
        self.nr_vcpus = 0

    def release(self) -> None:
        ffi.release(self._mem)


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
