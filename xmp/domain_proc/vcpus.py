"""A guest's vCPUs: one thread each, as a PV kernel runs one context per CPU.

vCPU 0 is the domain's main thread and its event loop (:mod:`.loop`) --
every driver and blocking call lives there, unchanged.  vCPU N > 0 is a
thread with its own :class:`EventLoop` on vcpu_info[N]: its own upcall
flag, selector and wake word, its own VIRQ_TIMER (set_timer_op for vCPU
N), and a "call function" IPI (EVTCHNOP_bind_ipi on N) through which work
reaches it, as Linux's smp_call_function_single does.  A port moved there
with EVTCHNOP_bind_vcpu is delivered to it (:meth:`Vcpu.bind`).

What runs on vCPU N is the guest's own computing, timers and ports bound
there; device I/O and xenstore stay on vCPU 0 (their rings are served by
its loop).  :meth:`Kernel.print` from another vCPU is handed to vCPU 0 in
order.

Hot-plug as Linux's drivers/xen/cpu_hotplug.c: a watch on ``cpu`` reads
``cpu/N/availability`` ("online" / "offline", written by the toolstack:
``xmp vcpu-set``) and brings vCPU N's thread up (VCPUOP_up, naming its
thread id) or down (its queued work is refused, then VCPUOP_down).  vCPU 0
stays up.
"""

from __future__ import annotations

import collections
import errno
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from xmp.domain_proc.loop import EventLoop
from xmp.errors import HypercallError, XenStoreError
from xmp.sharedmem._ffi import lib
from xmp.sharedmem.evtchn import VIRQ_TIMER
from xmp.xenstore.client import XsClient
from xmp.xenstore.wire import XsType

TOKEN = "cpu-hotplug"
_current = threading.local()


def current() -> int:
    """The vCPU the calling thread is (0 for any thread not a vCPU's)."""
    return getattr(_current, "vcpu", 0)


class Vcpu:
    """One vCPU of this domain.  ``run(fn, *args)`` queues ``fn`` on it and
    returns a :class:`concurrent.futures.Future`; ``call`` waits for it."""

    def __init__(self, xen, loop: EventLoop, vcpu: int):
        self.xen = xen
        self.id = vcpu
        self.loop = loop
        self.tid: int | None = None
        self._work: collections.deque[tuple[Future, Callable[..., Any], tuple]] = collections.deque()
        self._lock = threading.Lock()
        self._up = False
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._ipi = 0
        self._timer_port = 0
        self._timer_fired = False

    @property
    def online(self) -> bool:
        return self._up

    def run(self, fn: Callable[..., Any], *args: Any) -> Future:
        fut: Future = Future()
        with self._lock:
            if not self._up or self._stopping:
                raise HypercallError(errno.ENXIO, "vcpu", f"vCPU {self.id} is offline")
            self._work.append((fut, fn, args))
            ipi = self._ipi
        self.xen.notify(ipi)
        return fut

    def call(self, fn: Callable[..., Any], *args: Any, timeout: float | None = None) -> Any:
        """Run ``fn(*args)`` on this vCPU and return its result (or raise
        what it raised)."""
        if current() == self.id:
            return fn(*args)
        return self.run(fn, *args).result(timeout)

    def bind(self, port: int, handler: Callable[[int], None]) -> None:
        """EVTCHNOP_bind_vcpu: ``port`` (this domain's) is delivered here
        and ``handler`` runs on this vCPU."""
        self.loop.bind(port, handler)
        self.xen.bind_vcpu(port, self.id)

    def sleep(self, seconds: float) -> None:
        """Sleep on this vCPU's own timer (call it from this vCPU)."""
        deadline = time.monotonic_ns() + max(0, int(seconds * 1e9))
        while time.monotonic_ns() < deadline:
            self._timer_fired = False
            self.xen.set_timer_op(deadline, self.id)
            self.loop.run_until(lambda: self._timer_fired)

    # -- bring-up and take-down -------------------------------------------------

    def _attach(self) -> None:
        """On the vCPU's own thread: ports, then VCPUOP_up."""
        _current.vcpu = self.id
        self.tid = threading.get_native_id()
        if self.id:
            lib.xmp_set_comm(f"vcpu{self.id}".encode())  # its name in /proc/<pid>/task/<tid>/comm
        self._timer_port = self.xen.bind_virq(VIRQ_TIMER, self.id) if self.id else self._timer_port
        if self.id:
            self.loop.bind(self._timer_port, self._on_timer)
        self._ipi = self.xen.bind_ipi(self.id)
        self.loop.bind(self._ipi, self._drain)
        if self.id:
            self.xen.call("vcpu_op", "up", vcpu=self.id, tid=self.tid)
        with self._lock:
            self._up, self._stopping = True, False

    def start_boot(self) -> None:
        """vCPU 0, on the main thread: only its IPI (its timer is the kernel's)."""
        self._attach()

    def start(self) -> None:
        started = threading.Event()
        failed: list[BaseException] = []

        def main() -> None:
            try:
                self._attach()
            except BaseException as exc:
                failed.append(exc)
                started.set()
                return
            started.set()
            try:
                while not self._stopping:
                    self.loop.poll(None)
            finally:
                self._detach()

        self._thread = threading.Thread(target=main, name=f"vcpu{self.id}", daemon=True)
        self._thread.start()
        started.wait()
        if failed:
            raise failed[0]

    def stop(self) -> None:
        """Take the vCPU down (from another vCPU): its thread ends once the
        work it is doing returns; work still queued is refused."""
        with self._lock:
            if not self._up or self._stopping:
                return
            self._stopping = True
        self.xen.notify(self._ipi)
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _detach(self) -> None:
        with self._lock:
            self._up = False
            work, self._work = list(self._work), collections.deque()
        for fut, _fn, _args in work:
            fut.set_exception(HypercallError(errno.ENXIO, "vcpu", f"vCPU {self.id} went offline"))
        for port in (self._ipi, self._timer_port):
            self.loop.unbind(port)
            try:
                self.xen.close(port)
            except HypercallError:
                pass
        self.xen.call("vcpu_op", "down", vcpu=self.id)

    def _on_timer(self, _port: int) -> None:
        self._timer_fired = True

    def _drain(self, _port: int) -> None:
        while True:
            with self._lock:
                if not self._work:
                    return
                fut, fn, args = self._work.popleft()
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn(*args))
            except BaseException as exc:  # the caller sees it; this vCPU goes on
                fut.set_exception(exc)


class VcpuHotplug:
    """Linux's cpu_hotplug.c: follow ``cpu/N/availability``."""

    def __init__(self, xs: XsClient, vcpus: dict[int, Vcpu], log: Callable[[str], None]):
        self.xs = xs
        self.vcpus = vcpus
        self.log = log
        xs.on_watch(TOKEN, self._changed)
        xs.post(XsType.WATCH, f"cpu\0{TOKEN}\0".encode())

    def _changed(self, _path: str) -> None:
        for n, vcpu in sorted(self.vcpus.items()):
            if n == 0:
                continue
            try:
                state = self.xs.read_or(f"cpu/{n}/availability")
            except XenStoreError:
                continue
            if state == b"online" and not vcpu.online:
                vcpu.start()
                self.log(f"xen:cpu_hotplug: vCPU {n} online")
            elif state == b"offline" and vcpu.online:
                vcpu.stop()
                self.log(f"xen:cpu_hotplug: vCPU {n} offline")
