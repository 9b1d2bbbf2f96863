"""Guest kernels of the vCPU tests (imported by the domain processes
through PYTHONPATH, as kernels.py)."""

from __future__ import annotations

import errno
import threading
import time

from xmp.errors import HypercallError
from xmp.sharedmem.evtchn import VIRQ_TIMER


def smp(kernel) -> None:
    """Report, one console line each: every online vCPU's thread id, an
    event bound to vCPU 2 and on which thread it ran, IPIs between vCPUs,
    two vCPUs sleeping on their own timers at once, and the errors."""
    deadline = time.monotonic() + 10
    while len(kernel.online_vcpus()) < 3 and time.monotonic() < deadline:
        kernel.sleep(0.02)
    kernel.print("smp: online", kernel.online_vcpus())
    for n in kernel.online_vcpus():
        tid, who = kernel.vcpu(n).call(lambda: (threading.get_native_id(), kernel.smp_processor_id()),
                                       timeout=5)
        kernel.print(f"smp: vcpu {n} tid {tid} says {who}")
    # a loopback interdomain pair; the receiving end moved to vCPU 2
    a = kernel.xen.alloc_unbound(kernel.domid)
    b = kernel.xen.bind_interdomain(kernel.domid, a)
    got = threading.Event()
    seen: list[int] = []

    def on_event(_port: int) -> None:
        seen.append(threading.get_native_id())
        got.set()
    kernel.vcpu(2).bind(a, on_event)
    kernel.xen.notify(b)
    while not got.wait(0.01):  # vCPU 0 keeps serving while it waits
        kernel.loop.poll(0)
    kernel.print(f"smp: event on port {a} ran on tid {seen[0]} "
                 f"(status vcpu {kernel.xen.status(a)['vcpu']})")
    # an IPI from vCPU 1 to vCPU 2 (its work queue's IPI), answered there
    answer = kernel.vcpu(1).call(lambda: kernel.vcpu(2).call(lambda: ("ipi", kernel.smp_processor_id()),
                                                             timeout=5), timeout=10)
    kernel.print(f"smp: vcpu 1 asked vcpu 2: {answer}")

    # vCPUs 1 and 2 sleep at once: each on its own VIRQ_TIMER (one shared
    # timer would leave one of them asleep for ever)
    def nap() -> tuple[int, float]:
        start = time.monotonic()
        kernel.sleep(0.2)
        return kernel.smp_processor_id(), time.monotonic() - start
    futs = [kernel.vcpu(n).run(nap) for n in (1, 2)]
    naps = []
    for f in futs:
        while not f.done():
            kernel.loop.poll(0.01)
        naps.append(f.result())
    kernel.print("smp: naps " + " ".join(f"{v}:{t >= 0.2}" for v, t in naps))
    try:
        kernel.vcpu(kernel.start_info.max_vcpus)
    except HypercallError as exc:
        kernel.print(f"smp: vcpu({kernel.start_info.max_vcpus}) -> {errno.errorcode[exc.errno]} {exc}")
    try:
        kernel.xen.bind_virq(VIRQ_TIMER, 9)
    except HypercallError as exc:
        kernel.print(f"smp: bind_virq on vcpu 9 -> {errno.errorcode[exc.errno]}")
    try:
        kernel.vcpu(3).call(lambda: None)
    except HypercallError as exc:
        kernel.print(f"smp: offline vcpu 3 -> {errno.errorcode[exc.errno]}")
    kernel.print("smp: done")
    while True:
        kernel.sleep(0.05)
        online = kernel.online_vcpus()
        if online != getattr(kernel, "_last_online", None):
            kernel._last_online = online
            kernel.print("smp: now online", online)


def spinners(kernel) -> None:
    """Every vCPU spins (for vcpu-list's times and pinning)."""
    def spin() -> None:
        while True:
            pass
    for n in kernel.online_vcpus()[1:]:
        kernel.vcpu(n).run(spin)
    kernel.print("spinners: spinning on", kernel.online_vcpus())
    n = 0
    while True:
        n += 1
        if n % 100000 == 0:
            kernel.loop.poll(0)
