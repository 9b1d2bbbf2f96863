"""libxenevtchn (tools/include/xenevtchn.h): event channels for a tool.

    xce = evtchn.open(kernel)
    port = xce.bind_unbound_port(remote_domid)   # or bind_interdomain / bind_virq
    xce.notify(port)
    p = xce.pending()                            # a port that fired, or None
    xce.unmask(p)                                # ... once it has been handled

As Linux's evtchn device: a port that fires is masked and queued; the tool
takes it with :meth:`XenEvtchn.pending` and unmasks it when done, so one
event is delivered per unmask, never lost (a port raised while masked stays
pending and fires again on unmask).

The descriptor (:meth:`XenEvtchn.fd`, an eventfd) is readable while ports
are queued, for ``select``/``selectors`` loops.  Ports are delivered by the
domain's event loop, as a kernel's interrupt handler delivers them: a tool
that selects in a thread of its own lets the domain's main thread serve its
loop (``kernel.idle()``, ``kernel.sleep()``, a device's blocking call); a
tool that has no thread of its own waits with :meth:`XenEvtchn.wait`, which
runs the loop until a port is queued.  After fork, nothing carries over:
a handle belongs to the domain that opened it.
"""

from __future__ import annotations

import collections
import errno
import os
import threading

from xmp.errors import HypercallError, LocalError


class XenEvtchn:
    """An open xenevtchn handle (xenevtchn_open)."""

    def __init__(self, kernel):
        self._k = kernel
        self._evt = kernel.xen.evt
        self._ports: set[int] = set()
        self._queue: collections.deque[int] = collections.deque()
        self._queued: set[int] = set()
        self._lock = threading.Lock()
        self._fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)

    # -- binding (each returns the local port) ---------------------------------

    def bind_unbound_port(self, domid: int) -> int:
        """xenevtchn_bind_unbound_port: a fresh port ``domid`` may bind to."""
        return self._take(self._k.xen.alloc_unbound(domid))

    def bind_interdomain(self, domid: int, remote_port: int) -> int:
        """xenevtchn_bind_interdomain: connect to ``domid``'s unbound port."""
        return self._take(self._k.xen.bind_interdomain(domid, remote_port))

    def bind_virq(self, virq: int) -> int:
        """xenevtchn_bind_virq (on vCPU 0; the global VIRQs are dom0's)."""
        return self._take(self._k.xen.bind_virq(virq, 0))

    def _take(self, port: int) -> int:
        self._check_open()
        self._ports.add(port)
        self._k.loop.bind(port, self._fired)
        return port

    def unbind(self, port: int) -> None:
        """xenevtchn_unbind: close ``port`` (EINVAL if it is not ours)."""
        self._own(port, "unbind")
        self._ports.discard(port)
        with self._lock:
            if port in self._queued:
                self._queued.discard(port)
                self._queue.remove(port)
        self._k.close_port(port)

    # -- events ----------------------------------------------------------------

    def notify(self, port: int) -> None:
        """xenevtchn_notify: raise the other end of ``port``."""
        self._own(port, "notify")
        self._k.xen.notify(port)

    def _fired(self, port: int) -> None:
        # The domain's loop: mask and queue, as the evtchn driver's handler does.
        if port not in self._ports:
            return
        self._evt.mask(port)
        with self._lock:
            if port in self._queued:
                return
            self._queued.add(port)
            self._queue.append(port)
        os.eventfd_write(self._fd, 1)

    def pending(self) -> int | None:
        """xenevtchn_pending: the next port that fired (it stays masked
        until :meth:`unmask`), or None when none has."""
        with self._lock:
            if not self._queue:
                self._drain_fd()
                return None
            port = self._queue.popleft()
            self._queued.discard(port)
            if not self._queue:
                self._drain_fd()
        return port

    def _drain_fd(self) -> None:
        try:
            os.eventfd_read(self._fd)
        except BlockingIOError:
            pass

    def unmask(self, port: int) -> None:
        """xenevtchn_unmask: let ``port`` fire again (at once if it was
        raised meanwhile)."""
        self._own(port, "unmask")
        self._k.xen.unmask(port)

    def wait(self, timeout: float | None = None) -> int | None:
        """Run the domain's loop until a port fires (or ``timeout``), then
        :meth:`pending`.  For a tool on the domain's main thread."""
        self._k.loop.run_until(lambda: bool(self._queue), timeout)
        return self.pending()

    def fd(self) -> int:
        """xenevtchn_fd: readable while a port is queued."""
        self._check_open()
        return self._fd

    def ports(self) -> frozenset[int]:
        return frozenset(self._ports)

    # -- lifetime --------------------------------------------------------------

    def close(self) -> None:
        """xenevtchn_close: unbind every port of this handle."""
        if self._fd < 0:
            return
        for port in sorted(self._ports):
            self._k.close_port(port)
        self._ports.clear()
        self._queue.clear()
        self._queued.clear()
        os.close(self._fd)
        self._fd = -1

    def __enter__(self) -> XenEvtchn:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._fd < 0:
            raise LocalError("the xenevtchn handle is closed")

    def _own(self, port: int, op: str) -> None:
        self._check_open()
        if port not in self._ports:
            raise HypercallError(errno.EINVAL, f"xenevtchn_{op}", f"port {port} is not bound by this handle")


def open(kernel) -> XenEvtchn:
    """xenevtchn_open."""
    return XenEvtchn(kernel)


__all__ = ["XenEvtchn", "open"]
