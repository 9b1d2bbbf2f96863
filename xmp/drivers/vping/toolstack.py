"""vping's part of the toolstack: a spec ``"devid=0, backend=NAME"`` (both
optional, in xl's ``key=value, …`` style) becomes the two directories of a
vping device."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from xmp.devices import DeviceSpec
from xmp.errors import XmpError

LIST_HEADER = f"{'Idx':<5}{'BE':>4}  {'state':<6}{'evt-ch':<7}{'ring-ref':<9}BE-path"
LIST_KEYS = ("backend-id", "state", "event-channel", "ring-ref", "backend")


@dataclass(frozen=True)
class VpingSpec:
    devid: int = 0
    backend: str | None = None


def parse(text: str) -> VpingSpec:
    fields: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, eq, value = part.partition("=")
        if not eq or key not in ("devid", "backend") or key in fields:
            raise XmpError(f"vping spec {text!r}: {part!r} is not devid=N or backend=NAME (each once)")
        fields[key] = value.strip()
    devid = fields.get("devid", "0")
    if not devid.isdigit() or int(devid) > 0xFFFF:
        raise XmpError(f"vping spec {text!r}: devid must be a number from 0 to 65535")
    return VpingSpec(int(devid), fields.get("backend") or None)


def name_of(spec: VpingSpec) -> str:
    return str(spec.devid)


def devid_of(name: str) -> int:
    if not name.isdigit():
        raise XmpError(f"a vping device is named by its number, not {name!r}")
    return int(name)


def device(spec: VpingSpec, base: Path) -> DeviceSpec:
    return DeviceSpec(spec.devid, str(spec.devid), spec.backend)


def list_row(devid: int, front: dict[str, str]) -> str:
    return (f"{devid:<5}{front.get('backend-id', '-'):>4}  {front.get('state', '-'):<6}"
            f"{front.get('event-channel', '-1'):<7}{front.get('ring-ref', '-1'):<9}"
            f"{front.get('backend', '-')}")
