"""The domain's event loop: wait on the upcall semaphore, take the pending
ports, call their handlers.

One vCPU, one thread, like a PV kernel with one CPU: a guest's blocking
calls (sleep, console writes, later block I/O) run this loop until their
condition holds -- ``run_until(cond)`` -- so devices are serviced while the
guest waits.  Handlers may be called spuriously and must re-check their
ring.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from xmp.errors import DomainGone
from xmp.sharedmem.evtchn import EventChannels, Wake


class EventLoop:
    def __init__(self, evt: EventChannels, vcpu: int = 0):
        self.evt = evt
        self.vcpu = vcpu
        self.handlers: dict[int, Callable[[int], None]] = {}

    def bind(self, port: int, handler: Callable[[int], None]) -> None:
        self.handlers[port] = handler

    def unbind(self, port: int) -> None:
        self.handlers.pop(port, None)

    def poll(self, timeout: float | None) -> bool:
        """Wait up to ``timeout`` (None: forever) and dispatch; True if any
        port fired."""
        woke = self.evt.wait(self.vcpu, timeout)
        if woke == Wake.SHUTDOWN:
            raise DomainGone(-1)
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
