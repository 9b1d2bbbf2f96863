"""pciback: in dom0, the host's PCI devices served to one guest each.

On connect (the frontend Initialised, as xen-pciback's
``xen_pcibk_attach``) it checks ``magic``, maps the frontend's
``pci-op-ref`` page, binds its ``event-channel``, then exports each
``dev-N``: the device is built from the toolstack's ``model-N`` /
``bars-N`` and reset, each BAR's pages are allocated here and granted to
that frontend alone (``bar-N-I``: the BAR's grant refs, in page order), and
an unbound port for MMIO writes (``doorbell-N``) waits for it -- xmp has
no MMIO trap, so the guest's BAR write is a grant copy followed by an event
on that port.  Then ``root_num`` / ``root-N`` say which buses to scan and
the device is Connected.

Each event: the op, if ``_XEN_PCIF_active`` is set, is copied out once
and answered with pciif's error codes -- a device not exported to this
frontend is XEN_PCI_ERR_dev_not_found, a bad offset / size /
alignment XEN_PCI_ERR_invalid_offset, an unknown command
XEN_PCI_ERR_not_implemented -- and the device goes on serving.  Only
dom0 maps the frontend's page (a driver domain cannot: the device fails).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from xmp.drivers.pci import protocol, spec
from xmp.drivers.pci.device import PciDevice
from xmp.drivers.pci.protocol import Bdf, Op, PciErr, PciOp, SharedInfo
from xmp.drivers.xenbus.device import BackendDriver, XenbusDevice
from xmp.errors import XmpError
from xmp.sharedmem.shm import PAGE_SIZE


@dataclass
class _Exported:
    """One device handed to the frontend, and what it holds here."""

    device: PciDevice
    pfn: int                          # first page of its BARs' memory
    pages: int
    grefs: list[int] = field(default_factory=list)
    doorbell: int | None = None       # our end of the MMIO-write port
    irq: int | None = None            # our end of the MSI port, while enabled


class PciBack(BackendDriver):
    devtype = "pci"

    def __init__(self, kernel) -> None:
        self.k = kernel
        self.dev: XenbusDevice | None = None
        self.mapping = None
        self.shared: SharedInfo | None = None
        self.port: int | None = None
        self.exported: dict[Bdf, _Exported] = {}
        self.served = 0

    def connect(self, dev: XenbusDevice) -> None:
        self.dev = dev
        magic = dev.read_other("magic")
        if magic != protocol.XEN_PCI_MAGIC.encode():
            raise XmpError(f"pci: frontend magic {magic!r}, not {protocol.XEN_PCI_MAGIC!r}")
        ref = protocol.parse_peer_int(dev.read_other("pci-op-ref"), "pci-op-ref")
        remote_port = protocol.parse_peer_int(dev.read_other("event-channel"), "event-channel")
        mapping = self.mapping = self.k.xen.map_grant_ref(dev.otherend_id, [ref])
        self.shared = SharedInfo(mapping.pages[0])
        self.port = self.k.xen.bind_interdomain(dev.otherend_id, remote_port)
        count = protocol.parse_peer_int(dev.read("num_devs"), "num_devs")
        roots = set()
        for n in range(count):
            bdf = protocol.parse_bdf(dev.read(f"dev-{n}").decode())
            model = spec.parse_model(bdf, dev.read(f"model-{n}"), dev.read(f"bars-{n}"))
            self._export(dev, n, model)
            roots.add(f"{bdf.domain:04x}:{bdf.bus:02x}")
            dev.write(f"state-{n}", 4)
        dev.write("root_num", len(roots))
        for i, root in enumerate(sorted(roots)):
            dev.write(f"root-{i}", root)
        self.k.loop.bind(self.port, self._event)
        self._event(self.port)  # an op posted before we bound

    def _export(self, dev: XenbusDevice, n: int, model) -> None:
        pages = sum(size // PAGE_SIZE for size in model.bars)
        pfn = self.k.alloc_pages(pages) if pages else 0
        views, at = [], pfn
        for size in model.bars:
            views.append(memoryview(self.k.memory)[at * PAGE_SIZE:at * PAGE_SIZE + size])
            at += size // PAGE_SIZE
        ex = _Exported(PciDevice(model, views, lambda: self._raise(model.bdf)), pfn, pages)
        self.exported[model.bdf] = ex
        at = pfn
        for i, size in enumerate(model.bars):
            refs = [self.k.grant_table.grant_foreign_access(dev.otherend_id, at + p)
                    for p in range(size // PAGE_SIZE)]
            ex.grefs += refs
            at += size // PAGE_SIZE
            dev.write(f"bar-{n}-{i}", " ".join(map(str, refs)))
        ex.doorbell = self.k.xen.alloc_unbound(dev.otherend_id)
        self.k.loop.bind(ex.doorbell, lambda _port: ex.device.kick())
        dev.write(f"doorbell-{n}", ex.doorbell)

    def _raise(self, bdf: Bdf) -> None:
        ex = self.exported.get(bdf)
        if ex is not None and ex.irq is not None:
            try:
                self.k.xen.notify(ex.irq)
            except XmpError:
                pass  # the guest has not bound its end (yet): the interrupt is lost, as on an unbound pirq

    # -- ops -----------------------------------------------------------------

    def _event(self, _port: int) -> None:
        shared = self.shared
        if shared is None:
            return
        op = shared.take()
        if op is None:
            return  # a spurious event (allowed), or an op still being written
        shared.answer(self.answer(op))
        self.served += 1
        if self.port is not None:
            self.k.xen.notify(self.port)

    def answer(self, op: Op) -> Op:
        """pciback's xen_pcibk_do_op: one op to its answer; never raises."""
        try:
            cmd = PciOp(op.cmd)
        except ValueError:
            return op.answered(PciErr.NOT_IMPLEMENTED)
        ex = self.exported.get(op.bdf) if op.domain <= 0xFFFF and op.bus <= 0xFF and op.devfn <= 0xFF \
            else None
        if ex is None:
            return op.answered(PciErr.DEV_NOT_FOUND)
        config = ex.device.config
        if cmd in (PciOp.CONF_READ, PciOp.CONF_WRITE):
            bad = protocol.config_access_error(op.offset, op.size)
            if bad is not None:
                return op.answered(bad)
            if cmd == PciOp.CONF_READ:
                return op.answered(PciErr.SUCCESS, config.read(op.offset, op.size))
            config.write(op.offset, op.size, op.value)
            return op.answered(PciErr.SUCCESS)
        if cmd == PciOp.ENABLE_MSI:
            if ex.irq is not None or self.dev is None:
                return op.answered(PciErr.OP_FAILED, 0)
            try:
                ex.irq = self.k.xen.alloc_unbound(self.dev.otherend_id)
            except XmpError:
                return op.answered(PciErr.OP_FAILED, 0)
            config.set_msi(True)
            return op.answered(PciErr.SUCCESS, ex.irq)  # the "pirq" the guest binds
        if cmd == PciOp.DISABLE_MSI:
            self._drop_irq(ex)
            return op.answered(PciErr.SUCCESS, 0)
        return op.answered(PciErr.NOT_IMPLEMENTED)  # no MSI-X capability; AER ops go the other way

    def _drop_irq(self, ex: _Exported) -> None:
        ex.device.config.set_msi(False)
        if ex.irq is not None:
            self.k.close_port(ex.irq)
            ex.irq = None

    # -- teardown ------------------------------------------------------------

    def disconnect(self, dev: XenbusDevice) -> None:
        """Unexport everything: ports closed, BAR grants ended (a guest
        cannot map them, so none is in use), pages freed; the device is
        reset before anyone else gets it."""
        for ex in self.exported.values():
            self._drop_irq(ex)
            if ex.doorbell is not None:
                self.k.close_port(ex.doorbell)
            for ref in ex.grefs:
                self.k.grant_table.end_foreign_access_later(ref)
            ex.device.reset()
            for bar in ex.device.bars:
                bar.release()
            if ex.pages:
                self.k.free_pages(ex.pfn, ex.pages)
        self.exported.clear()
        if self.port is not None:
            self.k.close_port(self.port)
            self.port = None
        if self.shared is not None:
            self.shared.release()
            self.shared = None
        if self.mapping is not None:
            mapping, self.mapping = self.mapping, None
            try:
                self.k.xen.unmap_grant_ref(mapping)
            except XmpError:
                pass  # the frontend's domain is gone: the hypervisor forgot it


def backend(kernel) -> PciBack:
    return PciBack(kernel)
