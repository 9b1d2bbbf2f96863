"""The guest's console driver: the xencons_interface page in its own RAM
(pfn start_info.console_mfn) and the console event channel, served by
dom0's xenconsoled.  Output is never dropped: a writer that finds the ring
full kicks the daemon and waits for room."""

from __future__ import annotations

from xmp.domain_proc.loop import EventLoop
from xmp.domain_proc.xen import Xen
from xmp.sharedmem.bytering import console_rings

RETRY = 0.05  # re-check for room even without an event (the daemon may not be bound yet)


class Console:
    def __init__(self, page, port: int, xen: Xen, loop: EventLoop):
        self.inp, self.out = console_rings(page)
        self.port = port
        self.xen = xen
        self.loop = loop
        self._line = bytearray()  # input read past the end of the last line
        loop.bind(port, lambda _p: None)  # an event only wakes the waiter

    def write(self, data: bytes | str) -> None:
        if isinstance(data, str):
            data = data.encode()
        view = memoryview(data)
        while view:
            n = self.out.write(view)
            view = view[n:]
            self.xen.notify(self.port)
            if view:
                self.loop.run_until(lambda: self.out.space() > 0, RETRY)

    def read(self) -> bytes:
        """Whatever input is waiting (maybe nothing)."""
        data = self.inp.read()
        if data:
            self.xen.notify(self.port)
        return data

    def readline(self, timeout: float | None = None) -> bytes:
        """One line (with its newline), or what there is when ``timeout`` passes."""
        while b"\n" not in self._line:
            if not self.loop.run_until(lambda: self.inp.available() > 0, timeout):
                break
            self._line += self.read()
        end = self._line.find(b"\n") + 1 or len(self._line)
        line = bytes(self._line[:end])
        del self._line[:end]
        return line

    def release(self) -> None:
        self.inp.release()
        self.out.release()
