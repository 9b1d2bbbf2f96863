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
"""

from __future__ import annotations

import time
from collections.abc import Callable

from xmp.errors import DomainGone
from xmp.sharedmem.evtchn import EventChannels, Wake

SPIN_MIN = 50e-6
SPIN_MAX = 400e-6


class EventLoop:
    def __init__(self, evt: EventChannels, vcpu: int = 0):
        self.evt = evt
        self.vcpu = vcpu
        self.handlers: dict[int, Callable[[int], None]] = {}
        self.spin = SPIN_MIN

    def bind(self, port: int, handler: Callable[[int], None]) -> None:
        self.handlers[port] = handler

    def unbind(self, port: int) -> None:
        self.handlers.pop(port, None)

    def poll(self, timeout: float | None) -> bool:
        """Wait up to ``timeout`` (None: forever) and dispatch; True if any
        port fired."""
        start = time.perf_counter()
        woke = self.evt.wait(self.vcpu, timeout, self.spin)
        if woke == Wake.SHUTDOWN:
            raise DomainGone(-1)
        soon = woke == Wake.EVENT and time.perf_counter() - start < SPIN_MAX
        self.spin = SPIN_MAX if soon else SPIN_MIN
        ports = self.evt.scan(self.vcpu)
        for port in ports:
            handler = self.handlers.get(port)
            if handler is not None:
                handler(port)
        return bool(ports)

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
