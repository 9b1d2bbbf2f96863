"""The host's PCI devices (``[[host.pci]]``) and xl's pci spec.

A host declares the devices it has, one ``[[host.pci]]`` table each::

    [[host.pci]]
    bdf = "0000:00:04.0"     # required: where it sits, as xl writes it
    vendor = 0x1af4          # required: 0x0001..0xfffe
    device = 0x10f0          # required: 0x0000..0xffff
    class = 0xff0000         # 24-bit class code, default 0xff0000 (unclassified)
    bars = [4096, 65536]     # memory BAR sizes: powers of two, 4 KiB..64 KiB, at most 6
    pin = 1                  # interrupt pin: 0 none, 1-4 INTA#-INTD#; default 1
    assignable = true        # bound to pciback from boot (pciback.hide=); default false

A guest's ``pci = ["0000:00:04.0"]`` (xl.cfg's ``pci``: ``[DDDD:]BB:DD.F``
then ``,key=value`` options; xmp knows ``permissive`` and ``seize``, as
``0`` / ``1``) names one of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from xmp.drivers.pci.device import MAX_BARS, DeviceModel
from xmp.drivers.pci.protocol import Bdf, parse_bdf
from xmp.errors import XmpError
from xmp.sharedmem.shm import PAGE_SIZE

HOST_PCI_KEYS = ("bdf", "vendor", "device", "class", "bars", "pin", "assignable")
MAX_BAR = 16 * PAGE_SIZE


@dataclass(frozen=True)
class HostPci:
    model: DeviceModel
    assignable: bool = False

    @property
    def bdf(self) -> Bdf:
        return self.model.bdf


@dataclass(frozen=True)
class PciSpec:
    bdf: Bdf
    devid: int = 0              # its place among the guest's pci devices
    permissive: bool = False
    seize: bool = False
    backend: str | None = None  # pciback runs in dom0 only


def parse(text: str) -> PciSpec:
    """One xl pci spec."""
    head, *opts = [p.strip() for p in text.split(",")]
    try:
        bdf = parse_bdf(head.split("@")[0])
    except ValueError as exc:
        raise XmpError(f"pci spec {text!r}: {exc}") from None
    if "@" in head:
        raise XmpError(f"pci spec {text!r}: a virtual slot (@VSLOT) is for HVM guests; PV guests see the "
                       "device at its host address")
    flags: dict[str, bool] = {}
    for opt in filter(None, opts):
        key, eq, value = opt.partition("=")
        key, value = key.strip(), value.strip()
        if key not in ("permissive", "seize") or not eq or value not in ("0", "1") or key in flags:
            raise XmpError(f"pci spec {text!r}: {opt!r} is not permissive=0|1 or seize=0|1 (each once)")
        flags[key] = value == "1"
    return PciSpec(bdf, permissive=flags.get("permissive", False), seize=flags.get("seize", False))


def _int(i: int, raw: dict, key: str, lo: int, hi: int, default: int | None = None) -> int:
    value = raw.get(key, default)
    if value is None:
        raise XmpError(f"pci[{i}]: {key} is missing")
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise XmpError(f"pci[{i}]: {key} = {value!r} is not a number from {lo:#x} to {hi:#x}")
    return value


def host_devices(value: Any) -> tuple[HostPci, ...]:
    """``[host] pci``: every table checked; the first problem raises,
    naming the entry (``pci[1]``) and the key."""
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise XmpError("expected an array of tables: one [[host.pci]] per device")
    out: list[HostPci] = []
    seen: set[Bdf] = set()
    for i, raw in enumerate(value):
        unknown = sorted(set(raw) - set(HOST_PCI_KEYS))
        if unknown:
            raise XmpError(f"pci[{i}]: unknown key {unknown[0]!r} (known: {', '.join(HOST_PCI_KEYS)})")
        if not isinstance(raw.get("bdf"), str):
            raise XmpError(f"pci[{i}]: bdf = \"0000:00:04.0\" is missing")
        try:
            bdf = parse_bdf(raw["bdf"])
        except ValueError as exc:
            raise XmpError(f"pci[{i}]: bdf: {exc}") from None
        if bdf in seen:
            raise XmpError(f"pci[{i}]: {bdf} is declared twice")
        seen.add(bdf)
        bars = raw.get("bars", [PAGE_SIZE])
        if not isinstance(bars, list) or len(bars) > MAX_BARS or not all(
                isinstance(b, int) and not isinstance(b, bool) and PAGE_SIZE <= b <= MAX_BAR
                and b & (b - 1) == 0 for b in bars):
            raise XmpError(f"pci[{i}]: bars = {bars!r}: at most {MAX_BARS} sizes, each a power of two "
                           f"from {PAGE_SIZE} to {MAX_BAR} bytes")
        assignable = raw.get("assignable", False)
        if not isinstance(assignable, bool):
            raise XmpError(f"pci[{i}]: assignable is true or false")
        model = DeviceModel(bdf, _int(i, raw, "vendor", 0x0001, 0xFFFE), _int(i, raw, "device", 0, 0xFFFF),
                            _int(i, raw, "class", 0, 0xFFFFFF, 0xFF0000), bars=tuple(bars),
                            pin=_int(i, raw, "pin", 0, 4, 1))
        out.append(HostPci(model, assignable))
    return tuple(out)


def model_keys(model: DeviceModel, n: int) -> dict[str, str]:
    """What pciback needs of the device it simulates, for ``dev-N``: xmp's
    own keys beside Xen's (a real pciback finds the device in the host)."""
    return {f"model-{n}": f"{model.vendor:04x}:{model.device:04x}:{model.class_code:06x}:{model.pin}",
            f"bars-{n}": " ".join(str(b) for b in model.bars)}


def parse_model(bdf: Bdf, model: bytes | None, bars: bytes | None) -> DeviceModel:
    """The toolstack's ``model-N`` / ``bars-N`` back into a model."""
    try:
        vendor, device, cls, pin = (int(x, 16) for x in (model or b"").decode().split(":"))
        sizes = tuple(int(b) for b in (bars or b"").split())
    except ValueError:
        raise XmpError(f"pci {bdf}: bad model {model!r} / bars {bars!r}") from None
    if len(sizes) > MAX_BARS or not all(PAGE_SIZE <= s <= MAX_BAR and s & (s - 1) == 0 for s in sizes):
        raise XmpError(f"pci {bdf}: bad bars {bars!r}")
    return DeviceModel(bdf, vendor, device, cls, bars=sizes, pin=pin)
