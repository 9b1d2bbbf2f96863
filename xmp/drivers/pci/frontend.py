"""pcifront: a guest's PCI bus, over pciback's one shared page.

``kernel.pci(ref)`` (a devid or the BDF) waits for the device to connect;
then, as xen-pcifront: :meth:`PciFront.scan` reads the backend's
``root-N`` buses and probes every devfn of each with a configuration read
of the vendor id (a devfn pciback did not export answers
XEN_PCI_ERR_dev_not_found), :meth:`conf_read` / :meth:`conf_write` go over
the shared page one op at a time, :meth:`map_bar` gives the guest BAR i
(the pages pciback granted to this guest alone, reached by grant copy:
a guest maps no foreign memory) and :meth:`enable_msi` binds the
device's interrupt.
"""

from __future__ import annotations

from collections.abc import Callable

from xmp.drivers.grantcopy import CopyList
from xmp.drivers.pci import protocol
from xmp.drivers.pci.protocol import Bdf, Op, PciErr, PciOp, PciOpError, SharedInfo
from xmp.drivers.xenbus.device import FrontendDriver, XenbusDevice, attach_frontend
from xmp.errors import GrantError, LocalError, XmpError
from xmp.sharedmem.shm import PAGE_SIZE

OP_TIMEOUT = 5.0
PCI_VENDOR_ID = 0x00


class PciFront(FrontendDriver):
    devtype = "pci"

    def __init__(self, kernel) -> None:
        self.k = kernel
        self.pfn = kernel.alloc_pages(1)  # the xen_pci_sharedinfo page
        self.shared: SharedInfo | None = None
        self.gref: int | None = None
        self.port: int | None = None
        self.dev: XenbusDevice | None = None
        self.is_connected = False
        self.irqs: dict[Bdf, Msi] = {}
        self.bars: list[Bar] = []

    def setup(self, dev: XenbusDevice) -> None:
        self.dev = dev
        self.k.grant_table.retry_deferred()
        page = self.k.page(self.pfn)
        page[:] = bytes(len(page))
        self.shared = SharedInfo(page)
        self.gref = self.k.grant_table.grant_foreign_access(dev.otherend_id, self.pfn)
        self.port = self.k.xen.alloc_unbound(dev.otherend_id)
        self.k.loop.bind(self.port, lambda _port: None)  # the answer is looked for by the waiter
        dev.write("pci-op-ref", self.gref)
        dev.write("event-channel", self.port)
        dev.write("magic", protocol.XEN_PCI_MAGIC)

    def connected(self, dev: XenbusDevice) -> None:
        self.is_connected = True

    def disconnect(self, dev: XenbusDevice) -> None:
        self.is_connected = False
        for bar in self.bars:
            bar.close()
        self.bars.clear()
        for msi in self.irqs.values():
            msi.close()
        self.irqs.clear()
        if self.port is not None:
            self.k.close_port(self.port)
            self.port = None
        if self.shared is not None:
            self.shared.release()
            self.shared = None
        if self.gref is not None:
            self.k.grant_table.end_foreign_access_later(self.gref)
            self.gref = None

    # -- ops ------------------------------------------------------------------

    def do_op(self, op: Op, timeout: float = OP_TIMEOUT) -> Op:
        """pcifront's do_pci_op: post, notify, wait for the bit to clear."""
        shared, port = self.shared, self.port
        if not self.is_connected or shared is None or port is None:
            raise LocalError("pci: not connected")
        if shared.flags() & protocol.XEN_PCIF_active:
            raise LocalError("pci: an op is already in flight")
        shared.post(op)
        self.k.xen.notify(port)
        if not self.k.loop.run_until(lambda: self.shared is not shared or shared.result() is not None,
                                     timeout):
            raise TimeoutError(f"pci: pciback did not answer op {op.cmd} within {timeout:g} s")
        if self.shared is not shared:
            raise LocalError("pci: the device disconnected during the op")
        answer = shared.result()
        assert answer is not None
        return answer

    def _op(self, cmd: PciOp, bdf: Bdf, offset: int = 0, size: int = 0, value: int = 0) -> Op:
        answer = self.do_op(Op(cmd, 0, bdf.domain, bdf.bus, bdf.devfn, offset, size, value))
        if answer.err != PciErr.SUCCESS:
            raise PciOpError(answer.err, cmd, str(bdf))
        return answer

    def conf_read(self, bdf: Bdf | str, offset: int, size: int) -> int:
        return self._op(PciOp.CONF_READ, _bdf(bdf), offset, size).value

    def conf_write(self, bdf: Bdf | str, offset: int, size: int, value: int) -> None:
        self._op(PciOp.CONF_WRITE, _bdf(bdf), offset, size, value)

    def scan(self) -> list[Bdf]:
        """The devices on the buses pciback exported (``root-N``), probed
        devfn by devfn as Linux's pci_scan_bus does."""
        dev = self._dev()
        found = []
        roots = protocol.parse_peer_int(dev.read_other("root_num"), "root_num")
        for i in range(min(roots, 256)):
            root = (dev.read_other(f"root-{i}") or b"").decode()
            dom, _, bus = root.partition(":")
            try:
                segment, busno = int(dom, 16), int(bus, 16)
            except ValueError:
                continue  # the backend's garbage: nothing on that bus
            for devfn in range(256):
                bdf = Bdf(segment, busno, devfn >> 3, devfn & 7)
                try:
                    vendor = self.conf_read(bdf, PCI_VENDOR_ID, 2)
                except PciOpError as exc:
                    if exc.err == PciErr.DEV_NOT_FOUND:
                        continue
                    raise
                if vendor != 0xFFFF:
                    found.append(bdf)
        return found

    def _dev(self) -> XenbusDevice:
        if self.dev is None:
            raise LocalError("pci: not set up")
        return self.dev

    def _index(self, bdf: Bdf) -> int:
        dev = self._dev()
        count = protocol.parse_peer_int(dev.read_other("num_devs"), "num_devs")
        for n in range(min(count, 256)):
            if dev.read_other(f"dev-{n}") == str(bdf).encode():
                return n
        raise PciOpError(PciErr.DEV_NOT_FOUND, PciOp.CONF_READ, str(bdf), "not exported to this guest")

    # -- BARs and interrupts -----------------------------------------------------

    def map_bar(self, bdf: Bdf | str, i: int) -> Bar:
        """BAR ``i`` of ``bdf``: its pages, granted by pciback to us alone."""
        bdf = _bdf(bdf)
        dev, n = self._dev(), self._index(bdf)
        raw = dev.read_other(f"bar-{n}-{i}")
        if raw is None:
            raise PciOpError(PciErr.INVALID_OFFSET, PciOp.CONF_READ, str(bdf), f"no BAR {i}")
        refs = [protocol.parse_peer_int(r, f"bar-{n}-{i}") for r in raw.split()]
        doorbell = self.k.xen.bind_interdomain(dev.otherend_id,
                                               protocol.parse_peer_int(dev.read_other(f"doorbell-{n}"),
                                                                       f"doorbell-{n}"))
        bar = Bar(self.k, dev.otherend_id, refs, doorbell)
        self.bars.append(bar)
        return bar

    def enable_msi(self, bdf: Bdf | str, handler: Callable[[], None] | None = None) -> Msi:
        """XEN_PCI_OP_enable_msi; the answer's value is the pirq -- in xmp
        pciback's unbound port, which we bind as Xen's guest binds its pirq."""
        bdf = _bdf(bdf)
        pirq = self._op(PciOp.ENABLE_MSI, bdf).value
        msi = Msi(self.k, self.k.xen.bind_interdomain(self._dev().otherend_id, pirq), handler)
        self.irqs[bdf] = msi
        return msi

    def disable_msi(self, bdf: Bdf | str) -> None:
        bdf = _bdf(bdf)
        self._op(PciOp.DISABLE_MSI, bdf)
        msi = self.irqs.pop(bdf, None)
        if msi is not None:
            msi.close()


class Bar:
    """A BAR's memory seen through grant copies (one page of bounce here).
    A write is followed by an event on the device's doorbell port: the MMIO
    write reaching the device."""

    def __init__(self, kernel, backend: int, refs: list[int], doorbell: int):
        self.k = kernel
        self.backend = backend
        self.refs = refs
        self.size = len(refs) * PAGE_SIZE
        self.doorbell: int | None = doorbell
        self.bounce = kernel.alloc_pages(1)
        self.copies: CopyList | None = CopyList(kernel)

    def _run(self, offset: int, length: int, out: bool) -> None:
        if self.copies is None:
            raise LocalError("pci: BAR unmapped")
        if offset < 0 or not 0 < length <= PAGE_SIZE or offset + length > self.size \
                or offset // PAGE_SIZE != (offset + length - 1) // PAGE_SIZE:
            raise LocalError(f"pci: {length} bytes at {offset:#x} leave one page of the BAR")
        page, poff = divmod(offset, PAGE_SIZE)
        if out:
            self.copies.copy_out(self.bounce, 0, self.backend, self.refs[page], poff, length)
        else:
            self.copies.copy_in(self.backend, self.refs[page], poff, self.bounce, 0, length)
        status = self.copies.run()[0]
        if status:
            raise GrantError(self.backend, self.refs[page], status, "grant_copy")

    def read(self, offset: int, length: int) -> bytes:
        self._run(offset, length, out=False)
        return bytes(self.k.page(self.bounce)[:length])

    def write(self, offset: int, data: bytes) -> None:
        self.k.page(self.bounce)[:len(data)] = data
        self._run(offset, len(data), out=True)
        if self.doorbell is not None:
            self.k.xen.notify(self.doorbell)

    def read32(self, offset: int) -> int:
        return int.from_bytes(self.read(offset, 4), "little")

    def write32(self, offset: int, value: int) -> None:
        self.write(offset, (value & 0xFFFFFFFF).to_bytes(4, "little"))

    def close(self) -> None:
        if self.doorbell is not None:
            self.k.close_port(self.doorbell)
            self.doorbell = None
        if self.copies is not None:
            self.copies.release()
            self.copies = None
            self.k.free_pages(self.bounce, 1)


class Msi:
    """The device's interrupt: events on our port, counted.  Handlers may
    run spuriously (the event loop's rule), so a driver asks the device
    what happened (:meth:`wait_for` re-checks after every event)."""

    def __init__(self, kernel, port: int, handler: Callable[[], None] | None):
        self.k = kernel
        self.port: int | None = port
        self.count = 0
        self.handler = handler
        kernel.loop.bind(port, self._fired)

    def _fired(self, _port: int) -> None:
        self.count += 1
        if self.handler is not None:
            self.handler()

    def wait_for(self, cond: Callable[[], bool], timeout: float = OP_TIMEOUT) -> bool:
        """Run events until ``cond()`` (checked after each) holds."""
        return self.k.loop.run_until(cond, timeout)

    def close(self) -> None:
        if self.port is not None:
            self.k.close_port(self.port)
            self.port = None


def _bdf(bdf: Bdf | str) -> Bdf:
    try:
        return bdf if isinstance(bdf, Bdf) else protocol.parse_bdf(bdf)
    except ValueError as exc:
        raise LocalError(str(exc)) from None


def open(kernel, ref: str | int = 0) -> PciFront:
    """``kernel.pci(devid)`` or ``kernel.pci("0000:00:04.0")`` (found by its ``dev-0``)."""
    if isinstance(ref, int) or str(ref).isdigit():
        return attach_frontend(kernel, "pci", PciFront, int(ref), 10.0)[1]
    want = str(_bdf(str(ref))).encode()
    xs = kernel.xenstore
    found: list[int] = []

    def given() -> bool:
        try:
            for name in xs.directory("device/pci"):
                backend = xs.read_or(f"device/pci/{name}/backend")
                if name.isdigit() and backend is not None and xs.read_or(f"{backend.decode()}/dev-0") == want:
                    found.append(int(name))
                    return True
        except XmpError:
            pass  # not there yet
        return False

    if not kernel.loop.run_until(given, 10.0):
        raise LocalError(f"pci: no device {want.decode()} given to this guest")
    return attach_frontend(kernel, "pci", PciFront, found[0], 10.0)[1]
