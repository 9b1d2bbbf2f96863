"""The block driver's part of the toolstack (libxl's ``libxl_disk.c``):
an xl disk spec becomes the two xenstore directories of a vbd, and a
missing image with ``size=`` is created sparse."""

from __future__ import annotations

import errno
import os
from pathlib import Path

from xmp.devices import DeviceSpec
from xmp.drivers.blk.spec import TARGET_MAX, DiskSpec, parse_diskspec, target_path, target_problem, vdev_devid
from xmp.errors import HypercallError, XmpError

LIST_HEADER = f"{'Vdev':<6}{'BE':>4}  {'handle':<7}{'state':<6}{'evt-ch':<7}{'ring-ref':<9}BE-path"


def parse(text: str) -> DiskSpec:
    return parse_diskspec(text)


def name_of(spec: DiskSpec) -> str:
    return spec.vdev


def devid_of(name: str) -> int:
    """A vbd by its vdev ("xvdb") or its number."""
    return int(name) if name.isdigit() else vdev_devid(name)


def problem(spec: DiskSpec, base: Path) -> str | None:
    """What the topology checker refuses before anything starts (nothing
    is created): a target outside ``base``, too long, or too big."""
    return target_problem(spec, base)


def image_path(spec: DiskSpec, base: Path) -> Path:
    """The image a spec names; a relative target is relative to ``base``
    (the folder of the file the domain came from)."""
    if spec.target is None:
        raise XmpError(f"disk {spec.vdev}: no target")
    return target_path(spec.target, base)


def device(spec: DiskSpec, base: Path) -> DeviceSpec:
    """The vbd's keys, as libxl writes them; a missing image with ``size=``
    is created sparse (a present one is never touched).  A path that cannot
    be created, or that xenstore cannot hold, is the caller's error."""
    image = image_path(spec, base)
    if len(os.fsencode(image.absolute())) > TARGET_MAX:  # its params write would cut dom0's xenstore off
        raise HypercallError(errno.ENAMETOOLONG, "createdomain", f"disk {spec.vdev}: the image path "
                             f"is longer than xenstore holds ({TARGET_MAX} bytes)")
    if not image.exists():
        if spec.size_bytes is None:
            raise XmpError(f"disk {spec.vdev}: {image} does not exist (give size=… to create it)")
        made = False
        try:
            image.parent.mkdir(parents=True, exist_ok=True)
            with open(image, "xb") as f:
                made = True
                f.truncate(spec.size_bytes)
        except OSError as exc:
            if made:
                image.unlink(missing_ok=True)
            raise HypercallError(exc.errno or errno.EIO, "createdomain",
                                 f"disk {spec.vdev}: cannot create {image}: {exc.strerror or exc}") from None
    return DeviceSpec(spec.devid, spec.vdev, spec.backend,
                      back_keys={"params": str(image.resolve()), "mode": "r" if spec.readonly else "w",
                                 "device-type": spec.devtype, "type": "file"},
                      front_keys={"virtual-device": str(spec.devid), "device-type": spec.devtype})


def check_restored(spec: DeviceSpec) -> None:
    """A saved vbd about to be re-attached: its image must still be there."""
    image = spec.back_keys.get("params", "")
    if not Path(image).is_file():
        raise XmpError(f"disk {spec.name}: its image {image} is gone")


LIST_KEYS = ("backend-id", "state", "event-channel", "ring-ref", "backend")  # of the frontend's directory


def list_row(devid: int, front: dict[str, str]) -> str:
    """One line of xl block-list; -1 where a multi-queue or multi-page device
    has no single key, as libxl shows it."""
    return (f"{devid:<6}{front.get('backend-id', '-'):>4}  {devid:<7}{front.get('state', '-'):<6}"
            f"{front.get('event-channel', '-1'):<7}{front.get('ring-ref', '-1'):<9}"
            f"{front.get('backend', '-')}")
