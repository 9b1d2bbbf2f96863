"""`Kernel`: what a guest's entry point receives -- the whole contract
between a domain's kernel (and the drivers it loads) and xmp.

    def main(kernel):
        kernel.print("hello from", kernel.name)
        kernel.sleep(0.5)               # set_timer_op + VIRQ_TIMER
        disk = kernel.block("xvda")     # any device class's opener (xmp.devices)
        kernel.poweroff()

A guest kernel may use: ``domid``, ``name``, ``config``, ``args``,
``start_info``, ``memory`` / ``page`` / ``alloc_pages`` / ``free_pages`` (``pages``, the
one allocator the balloon driver shares),
``grant_table``, ``xen`` (hypercalls), ``loop`` (its event loop),
``console``, ``xenstore``, ``print``, ``sleep`` / ``monotonic`` / ``idle``,
the device openers, ``detect`` / ``cpuid``, ``vcpu(n)`` / ``smp_processor_id`` /
``online_vcpus`` (its vCPUs: :mod:`xmp.domain_proc.vcpus`), the emulated-hardware accesses
``inb`` / ``inw`` / ``inl`` / ``outb`` / ``outw`` / ``outl`` / ``mmio_read`` /
``mmio_write`` (an HVM guest's device model answers them), ``shutdown`` / ``poweroff`` /
``reboot`` / ``crash`` / ``suspend``, and for moving ``on_suspend`` /
``restored``.  Drivers may also use ``close_port``.

Moving (save / restore / migration), as a Xen PV guest moves: what
survives is the guest's RAM and one small context.  ``on_suspend(hook)``
names a function returning bytes (at most ``MAX_GUEST_CONTEXT``), called
when the domain suspends; on the new host the entry point is entered
again, with the RAM as it was (pages from ``alloc_pages`` included) and
``kernel.restored`` holding those bytes (None on a fresh boot).  Nothing
else survives: the Python objects, ports, grants and device connections
are new -- the kernel re-opens its devices (their frontends go through the
xenbus handshake with this host's backends) and re-grants what it needs.
A driver takes its pages with ``alloc_pages(n, driver=True)``: those go
back to the free list on restore, since the driver starts afresh.
dom0's services use ``boot_fds`` and ``rundir``, which the supervisor
hands dom0 alone.

Returning from the entry point powers the domain off; an exception is a
crash (traceback on the console and in the domain's log).
"""

from __future__ import annotations

import base64
import binascii
import errno
import functools
import json
import time
from collections.abc import Callable
from typing import Any

from xmp import devices
from xmp.devices import DeviceClass
from xmp.domain_proc.balloon import BalloonDriver
from xmp.domain_proc.console import Console
from xmp.domain_proc.control import ControlDriver
from xmp.domain_proc.loop import EventLoop
from xmp.domain_proc.pages import PageAllocator
from xmp.domain_proc.vcpus import Vcpu, VcpuHotplug, current
from xmp.domain_proc.xen import Xen
from xmp.errors import HypercallError, LocalError, XmpError
from xmp.hv.hvm import XEN_CPUID_BASE, XEN_CPUID_SIGNATURE
from xmp.hvm.trap import IoTrap
from xmp.sharedmem.evtchn import VIRQ_TIMER
from xmp.sharedmem.grant import GrantTable
from xmp.sharedmem.shm import PAGE_SIZE
from xmp.startinfo import HvmStartInfo, StartInfo, first_free_pfn
from xmp.xenstore.client import RingTransport, XsClient

MAX_GUEST_CONTEXT = 8192   # bytes a guest's suspend hook may return: its state lives in RAM
CONTEXT_VERSION = 2   # 2: the page allocator as runs of used / ballooned-out pages


class ShutdownDone(BaseException):
    """Raised after a shutdown hypercall: the domain must stop running."""


class Kernel:
    def __init__(self, xen: Xen, loop: EventLoop, boot: dict[str, Any], ram, start_info: StartInfo,
                 restore: bytes | None = None):
        self.xen = xen
        self.loop = loop
        self.domid: int = boot["domid"]
        self.name: str = boot["name"]
        self.config: dict[str, Any] = boot["config"]
        self.args: dict[str, Any] = dict(self.config.get("args", {}))
        self.start_info = start_info
        self.memory = ram
        self.first_free_pfn = first_free_pfn(start_info.nr_grant_frames)
        # One allocator for every page the guest takes: the balloon gives back only free ones.
        self.pages = PageAllocator(self.first_free_pfn, start_info.nr_pages,
                                   min(start_info.max_pages, len(ram) // PAGE_SIZE))
        self._driver_runs: list[tuple[int, int]] = []  # runs drivers hold: free again after a restore
        self._suspend_hook: Callable[[], bytes] | None = None
        self._driver_hooks: dict[str, Callable[[], bytes]] = {}
        self._driver_contexts: dict[str, bytes] = {}   # restored, not yet taken by their driver
        self.restored: bytes | None = None
        if restore is not None:
            self._restore_context(restore)
        page = memoryview(ram)[start_info.console_mfn * PAGE_SIZE:(start_info.console_mfn + 1) * PAGE_SIZE]
        self.console = Console(page, start_info.console_evtchn, xen, loop)
        gnt = start_info.gnttab_pfn * PAGE_SIZE
        self.grant_table = GrantTable(memoryview(ram)[gnt:gnt + start_info.nr_grant_frames * PAGE_SIZE],
                                      self.domid)
        self._timer_port = xen.bind_virq(VIRQ_TIMER, 0)
        self._timer_fired = False
        loop.bind(self._timer_port, self._on_timer)
        self._xs: XsClient | None = None
        self.control: ControlDriver | None = None
        self.balloon: BalloonDriver | None = None
        self._vcpus: dict[int, Vcpu] = {}
        self.vcpu_hotplug: VcpuHotplug | None = None
        # dom0's alone: descriptors passed at boot (the terminal to echo consoles to), the run directory.
        self.boot_fds: list[int] = list(boot.get("fds", []))
        self.rundir: str | None = boot.get("rundir")
        self.hvm_start_info: HvmStartInfo | None = None   # set when entered the PVH way
        self._io: IoTrap | None = None

    # -- xenstore -------------------------------------------------------------

    @property
    def xenstore(self) -> XsClient:
        """This domain's xenstore connection, over its ring page and store
        port (relative paths are under /local/domain/<domid>)."""
        if self._xs is None:
            si = self.start_info
            page = memoryview(self.memory)[si.store_mfn * PAGE_SIZE:(si.store_mfn + 1) * PAGE_SIZE]
            self._xs = XsClient(RingTransport(page, si.store_evtchn, self.xen.notify, self.loop.run_until))
            self._xs.events_pending = functools.partial(self.xen.evt.send, si.store_evtchn)
            self.loop.bind(si.store_evtchn, self._store_event)
        return self._xs

    def _store_event(self, _port: int) -> None:
        if self._xs is not None:
            self._xs.pump_nowait()
            self._xs.dispatch()

    def start_control(self) -> None:
        """Answer the toolstack's shutdown requests (control/shutdown)."""
        self.control = ControlDriver(self.xenstore, self.shutdown, self.print)

    def start_balloon(self) -> None:
        """Follow the toolstack's memory target (memory/target)."""
        si = self.start_info
        table = memoryview(self.memory)[si.gnttab_pfn * PAGE_SIZE:
                                        (si.gnttab_pfn + si.nr_grant_frames) * PAGE_SIZE]
        self.balloon = BalloonDriver(self.xenstore, self.xen, self.pages, self.grant_table, table, self.print)

    # -- vCPUs -----------------------------------------------------------------

    def start_vcpus(self) -> None:
        """Bring up vCPUs 1 .. vcpus-1 and follow cpu/N/availability
        (nothing to do with one vCPU at most)."""
        si = self.start_info
        if si.max_vcpus <= 1:
            return
        self._vcpus = {0: Vcpu(self.xen, self.loop, 0)}
        self._vcpus[0].start_boot()
        for n in range(1, si.max_vcpus):
            self._vcpus[n] = Vcpu(self.xen, EventLoop(self.xen.evt, n), n)
        for n in range(1, min(si.vcpus, si.max_vcpus)):
            self._vcpus[n].start()
        self.vcpu_hotplug = VcpuHotplug(self.xenstore, self._vcpus, self.print)

    def vcpu(self, n: int) -> Vcpu:
        """vCPU ``n``: ``kernel.vcpu(2).call(fn, *args)`` runs ``fn`` there
        (``.run`` returns a Future); ``.bind(port, handler)`` moves a port
        there.  EINVAL past maxvcpus; ENXIO (from run / call) while offline."""
        if not 0 <= n < self.start_info.max_vcpus:
            raise HypercallError(errno.EINVAL, "vcpu", f"{self.name} has no vCPU {n} (maxvcpus = "
                                                       f"{self.start_info.max_vcpus}: vCPUs 0.."
                                                       f"{self.start_info.max_vcpus - 1})")
        if not self._vcpus:
            self._vcpus = {0: Vcpu(self.xen, self.loop, 0)}
            self._vcpus[0].start_boot()
        return self._vcpus[n]

    def smp_processor_id(self) -> int:
        """The vCPU the caller runs on (Linux's name)."""
        return current()

    def online_vcpus(self) -> list[int]:
        return [n for n, v in sorted(self._vcpus.items()) if v.online] or [0]

    # -- devices -------------------------------------------------------------

    def device(self, cls: DeviceClass, ref: str | int) -> Any:
        """The device ``ref`` (its name or devid) of class ``cls``, once its
        backend has connected -- what ``kernel.<opener>(ref)`` does."""
        return cls.part("frontend").open(self, ref)

    def __getattr__(self, name: str) -> Callable[..., Any]:
        """The device openers: ``kernel.block("xvda")``, ``kernel.vping(0)``, …
        one for each class of :mod:`xmp.devices` that has one."""
        cls = devices.by_opener(name)
        if cls is None:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        return functools.partial(self.device, cls)

    def close_port(self, port: int) -> None:
        """Stop handling ``port`` and close it (the peer may be gone already)."""
        self.loop.unbind(port)
        try:
            self.xen.close(port)
        except XmpError:
            pass

    # -- console -----------------------------------------------------------

    def alloc_pages(self, n: int = 1, *, driver: bool = False) -> int:
        """Take ``n`` pages of the guest's own memory (for rings and buffers
        it grants, or state that must survive a move), one run; returns the
        first pfn.  The lowest free run is taken, so runs given back with
        :meth:`free_pages` are used again first; pages ballooned out are not
        the guest's to take.  ``driver``: a device driver's pages, free again
        after a restore (the driver is opened afresh there)."""
        try:
            pfn = self.pages.alloc(n)
        except MemoryError as exc:
            raise MemoryError(f"{self.name}: {exc}") from None
        if driver:
            self._driver_runs.append((pfn, n))
        return pfn

    def free_pages(self, pfn: int, n: int) -> None:
        """Give back a run from :meth:`alloc_pages`.  The caller makes sure no
        other domain can reach it any more (its grants have ended)."""
        self.pages.free(pfn, n)
        if (pfn, n) in self._driver_runs:
            self._driver_runs.remove((pfn, n))
        if self.balloon is not None:
            self.balloon.pages_freed()

    # -- moving: the suspend context ------------------------------------------

    def on_suspend(self, hook: Callable[[], bytes]) -> None:
        """``hook()`` returns the guest's context (bytes, small) when the
        domain suspends; a restore hands it back as :attr:`restored`."""
        self._suspend_hook = hook

    def on_suspend_driver(self, key: str, hook: Callable[[], bytes]) -> None:
        """A driver's own small context (``key``: its device, "vbd/51712"),
        taken after the guest's hook; :meth:`driver_restored` gives it back."""
        self._driver_hooks[key] = hook

    def driver_restored(self, key: str) -> bytes | None:
        """What the driver of ``key`` handed over before the move (once)."""
        return self._driver_contexts.pop(key, None)

    def suspend_context(self) -> bytes:
        """What this kernel hands the hypervisor at suspend: its page
        allocator, the guest's own context, then its drivers' (a driver
        sees what the guest's hook did: requests it submitted are in flight)."""
        guest = b"" if self._suspend_hook is None else self._suspend_hook()
        if not isinstance(guest, (bytes, bytearray)) or len(guest) > MAX_GUEST_CONTEXT:
            raise LocalError(f"a suspend hook returns at most {MAX_GUEST_CONTEXT} bytes, not {guest!r:.60}")
        drivers = {key: base64.b64encode(hook()).decode() for key, hook in self._driver_hooks.items()}
        return json.dumps({"version": CONTEXT_VERSION, "pages": self.pages.runs(free=self._driver_runs),
                           "guest": base64.b64encode(guest).decode() if self._suspend_hook else None,
                           "drivers": drivers},
                          separators=(",", ":")).encode()

    def _restore_context(self, raw: bytes) -> None:
        """The context of :meth:`suspend_context`, from another host: checked
        as fresh input (a bad one crashes this domain, nothing else)."""
        try:
            ctx = json.loads(raw)
            if ctx["version"] != CONTEXT_VERSION:
                raise LocalError(f"suspend context version {ctx['version']!r}, expected {CONTEXT_VERSION}")
            runs = [(int(p), int(n), int(st)) for p, n, st in ctx["pages"]]
            guest = None if ctx["guest"] is None else base64.b64decode(ctx["guest"], validate=True)
            drivers = {str(k): base64.b64decode(v, validate=True) for k, v in ctx["drivers"].items()}
        except (KeyError, TypeError, ValueError, AttributeError, binascii.Error) as exc:
            raise LocalError(f"the suspend context is malformed: {exc!r}") from None
        try:
            self.pages.restore_runs(runs)
        except LocalError as exc:
            raise LocalError(f"the suspend context's page allocator does not fit this domain: {exc}") \
                from None
        self.restored = guest
        self._driver_contexts = drivers

    def page(self, pfn: int) -> memoryview:
        """One page of the guest's own memory."""
        return memoryview(self.memory)[pfn * PAGE_SIZE:(pfn + 1) * PAGE_SIZE]

    def print(self, *parts: Any, sep: str = " ", end: str = "\n") -> None:
        text = sep.join(str(p) for p in parts) + end
        if current():  # the console is vCPU 0's: hand it over, in order
            self._vcpus[0].run(self.console.write, text)
            return
        self.console.write(text)

    # -- time --------------------------------------------------------------

    def _on_timer(self, _port: int) -> None:
        self._timer_fired = True

    def monotonic(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        """Block for ``seconds``: a one-shot timer (set_timer_op) whose
        VIRQ_TIMER ends the wait; devices are serviced meanwhile.  On
        vCPU N > 0: that vCPU's own timer and events."""
        if current():
            self._vcpus[current()].sleep(seconds)
            return
        deadline = time.monotonic_ns() + max(0, int(seconds * 1e9))
        while time.monotonic_ns() < deadline:
            self._timer_fired = False
            self.xen.set_timer_op(deadline)
            self.loop.run_until(lambda: self._timer_fired)

    def idle(self) -> None:
        """Do nothing, forever, using no CPU (serving events)."""
        self.loop.run_forever()

    # -- lifecycle -----------------------------------------------------------

    def cpuid(self, leaf: int, subleaf: int = 0, *, forced: bool = False) -> tuple[int, int, int, int]:
        """The CPUID instruction (eax, ebx, ecx, edx); ``forced``: with PV's
        forced-emulation prefix, which an HVM-family guest cannot execute."""
        eax, ebx, ecx, edx = self.xen.call("cpuid", leaf=leaf, subleaf=subleaf, forced=forced,
                                           vcpu=self.loop.vcpu)
        return eax, ebx, ecx, edx

    def detect(self) -> str:
        """As xen-detect: the Xen signature through the PV forced-emulation
        CPUID means PV; through plain CPUID, an HVM container -- PVH when we
        were entered through the PVH entry point (hvm_start_info), else HVM.
        "none" when no Xen signature is found."""
        try:
            if self.cpuid(XEN_CPUID_BASE, forced=True)[1:] == XEN_CPUID_SIGNATURE:
                return "PV"
        except HypercallError:  # #UD: not a PV guest
            pass
        if self.cpuid(XEN_CPUID_BASE)[1:] != XEN_CPUID_SIGNATURE:
            return "none"
        return "PVH" if self.hvm_start_info is not None else "HVM"

    # -- emulated hardware: port and MMIO accesses (trapped to the device model) --

    @property
    def io(self) -> IoTrap:
        if self._io is None:
            self._io = IoTrap(self)
        return self._io

    def inb(self, port: int) -> int:
        return self.io.pio(port, 1)

    def inw(self, port: int) -> int:
        return self.io.pio(port, 2)

    def inl(self, port: int) -> int:
        return self.io.pio(port, 4)

    def outb(self, port: int, value: int) -> None:
        self.io.pio(port, 1, value & 0xFF)

    def outw(self, port: int, value: int) -> None:
        self.io.pio(port, 2, value & 0xFFFF)

    def outl(self, port: int, value: int) -> None:
        self.io.pio(port, 4, value & 0xFFFFFFFF)

    def mmio_read(self, addr: int, size: int) -> int:
        return self.io.mmio(addr, size)

    def mmio_write(self, addr: int, size: int, value: int) -> None:
        self.io.mmio(addr, size, value)

    def shutdown(self, reason: str) -> None:
        """SCHEDOP_shutdown.  Every reason but "suspend" ends the domain."""
        if reason == "suspend":
            self.suspend()
            return
        self.xen.shutdown(reason)
        raise ShutdownDone(reason)

    def suspend(self) -> bool:
        """SCHEDOP_shutdown(suspend), handing over :meth:`suspend_context`.
        Returns True when the toolstack resumes us in place (``xmp resume``,
        ``xmp save -c``: the hypercall reports the suspend as cancelled); a
        save without -c never returns here -- the domain goes on, if
        restored, from its entry point."""
        self.print(f"{self.name}: suspending")
        context = base64.b64encode(self.suspend_context()).decode()
        resumed = bool(self.xen.call("sched_op", "shutdown", reason="suspend", context=context))
        self.print(f"{self.name}: resumed")
        return resumed

    def poweroff(self) -> None:
        self.shutdown("poweroff")

    def reboot(self) -> None:
        self.shutdown("reboot")

    def crash(self) -> None:
        self.shutdown("crash")
