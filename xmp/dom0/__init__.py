"""dom0's own kernel: its services -- xenstored, xenconsoled -- and the
backends of the split drivers, all told of domains coming and going by
VIRQ_DOM_EXC (one binding, shared).  The supervisor starts it as
``xmp.dom0:main``."""

from __future__ import annotations

from pathlib import Path

from xmp.dom0.xenconsoled import XenConsoled
from xmp.dom0.xenstored import XenStored
from xmp.domain_proc.kernel import Kernel
from xmp.domain_proc.main import load_entry
from xmp.domain_proc.service import guard_loop, guarded
from xmp.drivers.backends import start_backends
from xmp.hypercall import domain_info_list
from xmp.sharedmem.evtchn import VIRQ_DOM_EXC


def service(kernel: Kernel):
    """A dom0 service's event handler: a failure in one is reported to the
    hypervisor log (and dom0's own log) and the others go on, as separate
    daemons would."""
    def wrap(handler):
        return guarded(kernel.xen, f"dom0 service {handler.__name__}", handler)
    return wrap


def main(kernel: Kernel) -> None:
    guard_loop(kernel, "dom0")  # the backends' handlers too, not only the services'
    fds = kernel.boot_fds
    rundir = Path(kernel.rundir or ".")
    xenstored = XenStored(kernel, rundir)
    consoled = XenConsoled(kernel, rundir, fds[0] if fds else None)

    @service(kernel)
    def domains_changed(_port: int) -> None:
        # Whose doorbells we hold, read before the list: a domain named here and
        # absent from the list after has been freed (ids are never reused), and
        # what we hold of it goes even if the refresh that should have dropped
        # it never came (a lost doorbell kept a dead guest's fd and map for ever).
        held = kernel.xen.evt.doorbell_senders()
        infos = {i["domid"]: i for i in domain_info_list(kernel.xen.call) if i["domid"] != kernel.domid}
        for domid in set(held) - set(infos) - {kernel.domid}:
            kernel.xen.forget_domain(domid)
        consoled.scan(infos)
        xenstored.domains_changed(infos)

    # backends: one bus per driver dom0 serves
    local = xenstored.local_client()
    start_backends(kernel, local)

    port = kernel.xen.bind_virq(VIRQ_DOM_EXC)
    kernel.loop.bind(port, domains_changed)
    domains_changed(port)
    user = kernel.config.get("kernel")
    if user:
        # dom0's own tools reach the store as its services do: in-process
        kernel._xs = xenstored.local_client()
        load_entry(user)(kernel)
    kernel.idle()
