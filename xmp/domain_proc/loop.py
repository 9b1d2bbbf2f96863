"""The domain's event loop: wait on the upcall semaphore, take the pending
ports, call their handlers.

One vCPU, one thread, like a PV kernel with one CPU: a guest's blocking
calls (sleep, console writes, later block I/O) run this loop until their
condition holds -- ``run_until(cond)`` -- so devices are serviced while the
guest waits.  Handlers may be called spuriously and must re-check their
ring.

The wait polls before it sleeps, for as long as events have lately come
soon: when the last one arrived within ``SPIN_MAX`` of starting to wait
(a ring in full flow), the next wait polls that long, because a sleeping
process is woken slowly (tens of microseconds, far more on a virtual
machine); when it took longer, polling would only burn the CPU, so the
next wait polls ``SPIN_MIN`` and sleeps.  An idle domain stays at the
minimum and uses no CPU.

Each port has an event budget (as Xen's lateeoi bounds what a storming
frontend costs its backend): past ``RATE_BUDGET`` events within one
``RATE_PERIOD`` the port is masked in our own shared_info for a back-off
(``BACKOFF_MIN``, doubling up to ``BACKOFF_MAX`` while it keeps storming),
then unmasked, which delivers what came meanwhile as one event.  Masked,
its doorbell bit stays set, so the storming sender's notifies stop reaching
us at all: a storm costs this domain a bounded share of a CPU, and the
other ports are served between.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from xmp.errors import DomainGone
from xmp.sharedmem.evtchn import EventChannels, Wake

SPIN_MIN = 50e-6
SPIN_MAX = 400e-6
RATE_PERIOD = 0.01   # seconds over which a port's events are counted
RATE_BUDGET = 512    # events a port may raise per period (~51k/s) before it is throttled
BACKOFF_MIN = 0.001
BACKOFF_MAX = 0.256
STORM_MEMORY = 1.0   # throttled again within this: the back-off doubles
DOORBELL_GRACE = 0.01  # a detached doorbell is closed one scan later, at most this much after


class EventLoop:
    def __init__(self, evt: EventChannels, vcpu: int = 0):
        self.evt = evt
        self.vcpu = vcpu
        self.handlers: dict[int, Callable[[int], None]] = {}
        self.spin = SPIN_MIN
        self._counts: dict[int, int] = {}
        self._period_end = 0.0
        self._throttled: dict[int, float] = {}   # port -> when it is unmasked again
        self._backoff: dict[int, tuple[float, float]] = {}  # port -> (last back-off, when)
        self._next_unmask = float("inf")
        self.throttles = 0  # how often a port was throttled (statistics)

    def bind(self, port: int, handler: Callable[[int], None]) -> None:
        self.handlers[port] = handler

    def unbind(self, port: int) -> None:
        self.handlers.pop(port, None)
        if self._throttled.pop(port, None) is not None:
            self.evt.unmask(port, self.vcpu)
        self._backoff.pop(port, None)

    def poll(self, timeout: float | None) -> bool:
        """Wait up to ``timeout`` (None: forever) and dispatch; True if any
        port fired."""
        start = time.perf_counter()
        if self._throttled:
            wake_at = self._next_unmask - start
            timeout = wake_at if timeout is None else min(timeout, wake_at)
            timeout = max(timeout, 0.0)
        if self.evt.closing:  # a quiet domain would otherwise hold a dead peer's doorbell for ever
            timeout = DOORBELL_GRACE if timeout is None else min(timeout, DOORBELL_GRACE)
        woke = self.evt.wait(self.vcpu, timeout, self.spin)
        if woke == Wake.SHUTDOWN:
            raise DomainGone(-1)
        now = time.perf_counter()
        self.spin = SPIN_MAX if woke == Wake.EVENT and now - start < SPIN_MAX else SPIN_MIN
        if now >= self._period_end:
            self._counts.clear()
            self._period_end = now + RATE_PERIOD
        if now >= self._next_unmask:
            self._unthrottle(now)
        ports = self.evt.scan(self.vcpu)
        counts = self._counts
        for port in ports:
            n = counts.get(port, 0) + 1
            counts[port] = n
            handler = self.handlers.get(port)
            if handler is not None:
                handler(port)
            if n > RATE_BUDGET:
                self._throttle(port, now)
        return bool(ports)

    def _throttle(self, port: int, now: float) -> None:
        if port in self._throttled or self.evt.is_masked(port):
            return  # masked by its owner: not ours to unmask later
        last, when = self._backoff.get(port, (0.0, -STORM_MEMORY))
        backoff = min(last * 2, BACKOFF_MAX) if last and now - when < STORM_MEMORY else BACKOFF_MIN
        self._backoff[port] = (backoff, now)
        self.evt.mask(port)
        self._throttled[port] = now + backoff
        self._next_unmask = min(self._next_unmask, now + backoff)
        self._counts[port] = 0
        self.throttles += 1

    def _unthrottle(self, now: float) -> None:
        for port, until in list(self._throttled.items()):
            if until <= now:
                del self._throttled[port]
                self.evt.unmask(port, self.vcpu)  # re-delivers what came meanwhile
        self._next_unmask = min(self._throttled.values(), default=float("inf"))

    def run_until(self, cond: Callable[[], bool], timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not cond():
            if deadline is None:
                self.poll(None)
                continue
            left = deadline - time.monotonic()
            if left <= 0:
                return cond()
            self.poll(left)
        return True

    def run_forever(self) -> None:
        while True:
            self.poll(None)
