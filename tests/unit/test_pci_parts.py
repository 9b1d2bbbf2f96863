"""pci's pure parts: pciif.h's layout, the simulated device's configuration
space and behaviour, pciback's answer to every op (hostile ones included),
the xl spec and the host's [[host.pci]] tables, the assignable set."""

from __future__ import annotations

import errno
import struct
import zlib
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xmp.drivers.pci import protocol, spec
from xmp.drivers.pci import toolstack as pcits
from xmp.drivers.pci.backend import PciBack, _Exported
from xmp.drivers.pci.device import (
    DATA,
    DEVICE_ID,
    REG_DONE,
    REG_DOORBELL,
    REG_ID,
    REG_IRQS,
    REG_RESULT,
    DeviceModel,
    PciDevice,
)
from xmp.drivers.pci.protocol import Bdf, Op, PciErr, PciOp, PciOpError, SharedInfo, parse_bdf
from xmp.errors import HypercallError, XmpError
from xmp.topology import TopologyError, parse_topology

pytestmark = pytest.mark.timeout(60)

BDF = parse_bdf("0000:00:04.0")


def model(bars=(4096, 8192)) -> DeviceModel:
    return DeviceModel(BDF, 0x1AF4, 0x10F0, 0x020000, bars=bars)


def device(bars=(4096, 8192)):
    irqs: list[int] = []
    mem = [memoryview(bytearray(size)) for size in bars]
    return PciDevice(model(bars), mem, lambda: irqs.append(1)), mem, irqs


# -- pciif.h -----------------------------------------------------------------

def test_the_shared_page_is_laid_out_as_pciif_h():
    assert protocol.XEN_PCI_MAGIC == "7"
    assert (protocol.XEN_PCIF_active, protocol.XEN_PCIB_AERHANDLER, protocol.XEN_PCIB_active) == (1, 2, 4)
    assert [int(c) for c in PciOp] == list(range(11))
    assert [int(e) for e in PciErr] == [0, -1, -2, -3, -4, -5]
    # xen_pci_op: 9 u32 then 128 msix entries of 4 bytes; the aer op after it
    assert protocol.OP_SIZE == 36 + 128 * 4
    assert protocol.AER_OP_OFFSET == 4 + protocol.OP_SIZE == 552
    assert protocol.SHAREDINFO_SIZE == 572


def test_an_op_goes_over_the_page_and_back():
    page = memoryview(bytearray(4096))
    front, back = SharedInfo(page), SharedInfo(page)
    assert back.take() is None                       # nothing posted
    op = Op(PciOp.CONF_READ, 0, 0, 0, BDF.devfn, 0x10, 4)
    front.post(op)
    assert page[0] & protocol.XEN_PCIF_active
    assert front.result() is None                    # not answered yet
    # the fields sit where pciif.h has them: cmd, err, domain, bus, devfn, offset, size, value
    assert struct.unpack_from("<IiIIIiiI", page, 4) == (0, 0, 0, 0, 0x20, 0x10, 4, 0)
    got = back.take()
    assert got == op
    back.answer(got.answered(PciErr.SUCCESS, 0xC2000000))
    assert not page[0] & protocol.XEN_PCIF_active
    assert front.result() == op.answered(0, 0xC2000000)
    front.release()
    back.release()


@pytest.mark.parametrize(("offset", "size", "bad"), [
    (0, 1, False), (0, 2, False), (0, 4, False), (0xFC, 4, False), (0xFF, 1, False),
    (2, 4, True), (1, 2, True), (0, 3, True), (0, 8, True), (0, 0, True),
    (0x100, 1, True), (0xFE, 4, True), (-4, 4, True),
])
def test_configuration_accesses_are_checked_as_pciback_does(offset, size, bad):
    assert (protocol.config_access_error(offset, size) == PciErr.INVALID_OFFSET) is bad


@pytest.mark.parametrize(("text", "want"), [
    ("0000:00:04.0", Bdf(0, 0, 4, 0)), ("00:04.0", Bdf(0, 0, 4, 0)), ("1:ff:1f.7", Bdf(1, 0xFF, 0x1F, 7)),
])
def test_bdfs_are_read_as_xl_writes_them(text, want):
    assert parse_bdf(text) == want
    assert parse_bdf(str(want)) == want


@pytest.mark.parametrize("text", ["", "04.0", "00:04.8", "00:20.0", "00000:00:04.0", "0:0:4.0.1", "x:0:4.0"])
def test_bad_bdfs_are_refused(text):
    with pytest.raises(ValueError):
        parse_bdf(text)


def test_an_op_error_names_command_and_code():
    err = PciOpError(PciErr.DEV_NOT_FOUND, PciOp.CONF_READ, "0000:00:05.0")
    assert str(err) == "XEN_PCI_OP_conf_read on 0000:00:05.0: XEN_PCI_ERR_dev_not_found"
    assert str(PciOpError(-9, 77, "x")) == "XEN_PCI_OP(77) on x: XEN_PCI_ERR(-9)"


# -- the device ------------------------------------------------------------------

def test_configuration_space_answers_as_hardware():
    dev, _, _ = device()
    cfg = dev.config
    assert (cfg.read(0, 2), cfg.read(2, 2), cfg.read(0, 4)) == (0x1AF4, 0x10F0, 0x10F01AF4)
    assert cfg.read(0x09, 1) == 0 and cfg.read(0x0A, 2) == 0x0200      # class code 02 00 00
    assert cfg.read(0x0E, 1) == 0                                      # header type 0
    assert cfg.read(0x06, 2) & 0x10 and cfg.read(0x34, 1) == 0x50      # a capability list, MSI first
    assert cfg.read(0x50, 1) == 0x05
    assert cfg.read(0x3D, 1) == 1                                      # INTA#
    cfg.write(0, 4, 0xFFFFFFFF)                                        # ids are read-only
    assert cfg.read(0, 4) == 0x10F01AF4
    cfg.write(0x04, 2, 0xFFFF)                                         # command keeps its defined bits
    assert cfg.read(0x04, 2) == 0x0547
    cfg.write(0x3C, 1, 11)
    assert cfg.read(0x3C, 1) == 11
    cfg.write(0x3D, 1, 3)
    assert cfg.read(0x3D, 1) == 1


@pytest.mark.parametrize(("i", "size"), [(0, 4096), (1, 8192)])
def test_a_bar_is_sized_by_writing_all_ones(i, size):
    dev, _, _ = device()
    cfg = dev.config
    at = 0x10 + 4 * i
    address = cfg.read(at, 4)
    assert address and address % size == 0
    cfg.write(at, 4, 0xFFFFFFFF)
    assert cfg.read(at, 4) == ~(size - 1) & 0xFFFFFFF0
    cfg.write(at, 4, address)
    assert cfg.read(at, 4) == address
    cfg.write(0x10 + 4 * 5, 4, 0xFFFFFFFF)                             # an unimplemented BAR reads 0
    assert cfg.read(0x10 + 4 * 5, 4) == 0


def test_the_device_works_only_when_the_guest_turned_it_on():
    dev, mem, irqs = device()
    regs = mem[0]
    assert struct.unpack_from("<I", regs, REG_ID)[0] == DEVICE_ID
    regs[DATA:DATA + 5] = b"hello"
    struct.pack_into("<I", regs, REG_DOORBELL, 5)
    assert not dev.kick()                                              # memory decoding off
    dev.config.write(0x04, 2, 0x2)
    assert dev.kick() and not irqs                                     # no bus mastering, no MSI
    assert struct.unpack_from("<III", regs, REG_DONE) == (1, zlib.crc32(b"hello"), 0)
    assert struct.unpack_from("<I", regs, REG_DOORBELL)[0] == 0
    assert not dev.kick()                                              # nothing rung since
    dev.config.write(0x04, 2, 0x6)
    dev.config.set_msi(True)
    struct.pack_into("<I", regs, REG_DOORBELL, 3)
    assert dev.kick() and irqs == [1]
    assert struct.unpack_from("<I", regs, REG_IRQS)[0] == 1
    assert struct.unpack_from("<I", regs, REG_RESULT)[0] == zlib.crc32(b"hel")
    struct.pack_into("<I", regs, REG_DOORBELL, 0xFFFFFFFF)             # past the data: clamped
    assert dev.kick()
    dev.reset()
    assert dev.config.read(0x04, 2) == 0 and not dev.config.msi_enabled
    assert bytes(regs[4:]) == bytes(len(regs) - 4) and not any(mem[1])


# -- pciback's answers -------------------------------------------------------------

def back_with(dev: PciDevice) -> PciBack:
    back = PciBack(SimpleNamespace())
    back.exported[BDF] = _Exported(dev, 0, 0)
    return back


def op(cmd, bdf=BDF, offset=0, size=4, value=0, **kw) -> Op:
    return Op(cmd, 0, kw.get("domain", bdf.domain), kw.get("bus", bdf.bus), kw.get("devfn", bdf.devfn),
              offset, size, value)


@pytest.mark.parametrize(("bad", "err"), [
    (op(99), PciErr.NOT_IMPLEMENTED),
    (op(0xFFFFFFFF), PciErr.NOT_IMPLEMENTED),
    (op(PciOp.ENABLE_MSIX), PciErr.NOT_IMPLEMENTED),
    (op(PciOp.AER_DETECTED), PciErr.NOT_IMPLEMENTED),
    (op(PciOp.CONF_READ, parse_bdf("00:05.0")), PciErr.DEV_NOT_FOUND),
    (op(PciOp.CONF_READ, devfn=0x21), PciErr.DEV_NOT_FOUND),
    (op(PciOp.CONF_READ, domain=0xFFFFFFFF), PciErr.DEV_NOT_FOUND),
    (op(PciOp.CONF_WRITE, bus=0x100), PciErr.DEV_NOT_FOUND),
    (op(PciOp.CONF_READ, offset=0xFE, size=4), PciErr.INVALID_OFFSET),
    (op(PciOp.CONF_READ, offset=2, size=4), PciErr.INVALID_OFFSET),
    (op(PciOp.CONF_WRITE, offset=0, size=3), PciErr.INVALID_OFFSET),
    (op(PciOp.CONF_WRITE, offset=-4, size=4), PciErr.INVALID_OFFSET),
    (op(PciOp.CONF_READ, offset=0x100, size=1), PciErr.INVALID_OFFSET),
])
def test_hostile_ops_get_pciifs_error_and_change_nothing(bad, err):
    dev, _, _ = device()
    before = bytes(dev.config.data)
    back = back_with(dev)
    answer = back.answer(bad)
    assert answer.err == err
    assert bytes(dev.config.data) == before
    assert back.answer(op(PciOp.CONF_READ, offset=0, size=2)).value == 0x1AF4   # and it goes on


def test_configuration_ops_reach_the_device():
    dev, _, _ = device()
    back = back_with(dev)
    assert back.answer(op(PciOp.CONF_WRITE, offset=0x10, size=4, value=0xFFFFFFFF)).err == 0
    assert back.answer(op(PciOp.CONF_READ, offset=0x10, size=4)).value == 0xFFFFF000
    assert back.answer(op(PciOp.CONF_READ, offset=0x11, size=1)).value == 0xF0


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1),
       st.integers(0, 2**32 - 1), st.integers(-2**31, 2**31 - 1), st.integers(-2**31, 2**31 - 1),
       st.integers(0, 2**32 - 1))
def test_no_op_makes_pciback_raise(cmd, domain, bus, devfn, offset, size, value):
    dev, _, _ = device()
    back = back_with(dev)
    if cmd in (PciOp.ENABLE_MSI, PciOp.DISABLE_MSI):
        cmd = PciOp.CONF_WRITE  # these need a live kernel (ports): the integration tests have them
    answer = back.answer(Op(cmd, 0, domain, bus, devfn, offset, size, value))
    assert answer.err in {int(e) for e in PciErr}
    page = memoryview(bytearray(4096))
    answer.pack_into(page)  # and the answer fits the page's fields


# -- specs and the host's table ----------------------------------------------------

def test_xl_pci_specs():
    assert spec.parse("0000:00:04.0") == spec.PciSpec(BDF)
    assert spec.parse("00:04.0, permissive=1,seize=0") == spec.PciSpec(BDF, permissive=True)


@pytest.mark.parametrize(("text", "why"), [
    ("00:04", "is not a PCI address"), ("00:04.0@3", "virtual slot"),
    ("00:04.0,msitranslate=1", "permissive"),
    ("00:04.0,permissive=2", "permissive=0|1"), ("00:04.0,permissive=1,permissive=0", "each once"),
])
def test_bad_xl_pci_specs(text, why):
    with pytest.raises(XmpError, match=why):
        spec.parse(text)


def entry(**kw):
    return {"bdf": "0000:00:04.0", "vendor": 0x1AF4, "device": 0x10F0, **kw}


def test_host_devices_and_their_defaults():
    (dev,) = spec.host_devices([entry()])
    assert dev.model == DeviceModel(BDF, 0x1AF4, 0x10F0, 0xFF0000, bars=(4096,), pin=1)
    assert not dev.assignable
    m = model()
    assert spec.parse_model(BDF, *(v.encode() for v in spec.model_keys(m, 0).values())) == \
        DeviceModel(BDF, m.vendor, m.device, m.class_code, bars=m.bars, pin=m.pin)


@pytest.mark.parametrize(("entries", "why"), [
    ([entry(), entry()], r"pci\[1\]: 0000:00:04.0 is declared twice"),
    ([entry(colour=1)], r"pci\[0\]: unknown key 'colour'"),
    ([{"vendor": 1, "device": 2}], r"pci\[0\]: bdf = .* is missing"),
    ([entry(bdf="00:99.0")], r"pci\[0\]: bdf: "),
    ([entry(vendor=0xFFFF)], r"pci\[0\]: vendor = 65535 is not a number from 0x1 to 0xfffe"),
    ([entry(device=True)], r"pci\[0\]: device"),
    ([entry(bars=[4095])], r"pci\[0\]: bars"),
    ([entry(bars=[4096] * 7)], r"pci\[0\]: bars"),
    ([entry(bars=[1 << 20])], r"pci\[0\]: bars"),
    ([entry(pin=5)], r"pci\[0\]: pin"),
    ([entry(assignable="yes")], r"pci\[0\]: assignable"),
    ({"bdf": "x"}, "an array of tables"),
])
def test_bad_host_tables_are_one_error_naming_the_entry(entries, why):
    with pytest.raises(XmpError, match=why):
        spec.host_devices(entries)


# -- the assignable set ---------------------------------------------------------------

class FakeToolstack:
    """What pci's toolstack part reads of the toolstack (weakly referable, as the real one)."""

    def __init__(self, *entries):
        host = SimpleNamespace(host_devices={"pci": spec.host_devices(list(entries))})
        self.topology = SimpleNamespace(host=host)
        self.records: dict = {}
        self.sup = SimpleNamespace(log=lambda _m: None)


fake_toolstack = FakeToolstack


def give(ts, domid, bdf):
    dev = SimpleNamespace(cls=SimpleNamespace(kind="pci"), spec=SimpleNamespace(name=bdf))
    ts.records[domid] = SimpleNamespace(devices=[dev])


def ctl(ts, op_, arg=None):
    return pcits.control(ts, op_, {"arg": arg})


def test_a_device_must_be_assignable_and_nobodys():
    ts = fake_toolstack(entry(), entry(bdf="00:05.0", assignable=True))
    with pytest.raises(HypercallError) as info:
        pcits.host_device(ts, spec.parse("00:06.0"), "createdomain")
    assert info.value.errno == errno.ENODEV
    with pytest.raises(HypercallError, match="not assignable: xmp pci-assignable-add 0000:00:04.0") as info:
        pcits.host_device(ts, spec.parse("00:04.0"), "pci-attach")
    assert info.value.errno == errno.EPERM
    got = pcits.host_device(ts, spec.parse("00:05.0"), "pci-attach")
    assert got.name == "0000:00:05.0" and got.backend is None
    assert {k: got.back_keys[k] for k in ("num_devs", "dev-0", "key-0", "vdevfn-0", "state-0")} == \
        {"num_devs": "1", "dev-0": "0000:00:05.0", "key-0": "0000:00:05.0", "vdevfn-0": "0x28",
         "state-0": "1"}
    give(ts, 3, "0000:00:05.0")
    with pytest.raises(HypercallError, match="already assigned to dom3") as info:
        pcits.host_device(ts, spec.parse("00:05.0"), "pci-attach")
    assert info.value.errno == errno.EBUSY
    ts.records.clear()  # the guest is gone: it is free again
    pcits.host_device(ts, spec.parse("00:05.0"), "pci-attach")


def test_assignable_add_remove_list_as_xl():
    ts = fake_toolstack(entry(), entry(bdf="00:05.0", assignable=True))
    assert ctl(ts, "assignable-list")["rows"] == ["0000:00:05.0"]
    ctl(ts, "assignable-add", "00:04.0")
    assert ctl(ts, "assignable-list")["rows"] == ["0000:00:04.0", "0000:00:05.0"]
    give(ts, 2, "0000:00:04.0")
    assert ctl(ts, "assignable-list")["devices"][0] == {"bdf": "0000:00:04.0", "domid": 2}
    for args, code, why in [
        (("assignable-remove", "00:04.0"), errno.EBUSY, "assigned to dom2"),
        (("assignable-add", "00:04.0"), errno.EEXIST, "already assignable"),
        (("assignable-add", "00:09.0"), errno.ENODEV, "does not exist on this host"),
        (("assignable-add", "junk"), errno.EINVAL, "is not a PCI address"),
        (("assignable-add", None), errno.EINVAL, "name the device"),
        (("assignable-frob", "00:04.0"), errno.ENOSYS, "no pci operation"),
    ]:
        with pytest.raises(HypercallError, match=why) as info:
            ctl(ts, *args)
        assert info.value.errno == code
    assert ctl(ts, "assignable-list")["rows"] == ["0000:00:04.0", "0000:00:05.0"]  # nothing changed
    ts.records.clear()
    ctl(ts, "assignable-remove", "0000:00:04.0")
    with pytest.raises(HypercallError) as info:
        ctl(ts, "assignable-remove", "0000:00:04.0")
    assert info.value.errno == errno.ENOENT
    assert ctl(ts, "assignable-list")["rows"] == ["0000:00:05.0"]


def test_a_passed_through_device_is_not_restored():
    with pytest.raises(XmpError, match="cannot be restored"):
        pcits.check_restored(SimpleNamespace(name="0000:00:04.0"))


# -- the topology ----------------------------------------------------------------------

HOST_PCI = ('[host]\nmemory = 1024\n[[host.pci]]\nbdf = "0000:00:04.0"\nvendor = 0x1af4\ndevice = 1\n'
            'assignable = true\n')
GUEST = '[[domain]]\nname = "{}"\nkernel = "json:dumps"\npci = ["{}"]\n'


def test_a_topology_declares_host_devices_and_gives_them_out():
    topo = parse_topology(HOST_PCI + GUEST.format("a", "00:04.0"))
    (dev,) = topo.host.host_devices["pci"]
    assert dev.bdf == BDF and dev.assignable
    assert topo.domains[0].devices["pci"] == ("00:04.0",)


@pytest.mark.parametrize(("text", "line", "why"), [
    (HOST_PCI + GUEST.format("a", "00:05.0"), 11,
     "[[domain]] 'a': pci: 0000:00:05.0 is not one of the host's PCI devices"),
    (HOST_PCI + GUEST.format("a", "00:04.0") + GUEST.format("b", "0000:00:04.0"), 15,
     "[[domain]] 'b': pci: 0000:00:04.0 is already given to 'a': a host device goes to one guest"),
    (HOST_PCI + GUEST.format("a", "00:04.0,seize=2"), 11, "pci: pci spec"),
    (HOST_PCI.replace("device = 1", "device = -1"), 3, "[host]: pci: pci[0]: device = -1"),
    ('[host]\npci = 3\n', 2, "[host]: pci: expected an array of tables"),
])
def test_pci_mistakes_are_one_located_error(text, line, why):
    with pytest.raises(TopologyError) as info:
        parse_topology(text, "bad.toml")
    assert info.value.line == line, str(info.value)
    assert why in str(info.value)
