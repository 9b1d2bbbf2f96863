"""xl's ``disk=`` specification strings, parsed into a :class:`DiskSpec`.

Follows ``docs/man/xl-disk-configuration.5.pod.in`` and its lexer
``tools/libs/util/libxlu_disk_l.l``::

    [<key>=<value>|<flag>,]*[<target>,[<format>,[<vdev>,[<access>]]]],[<key>=<value>|<flag>,]*[target=<target>]

* Comma-separated; whitespace before a parameter is ignored.  A parameter
  without ``=`` that is not a flag fills the next positional slot still
  unspecified, in the order target, format, vdev, access.  So
  ``/dev/vg/guest,,hda`` is ``target=/dev/vg/guest, format=raw, vdev=hda,
  access=rw``.
* Each parameter at most once; an empty value means the default.
* ``target=`` eats the rest of the string, commas included -- except a
  trailing ``, size=…`` or ``, backend=…``, which are read as keys (one trailing
  comma is dropped, as xl does): it must come last.
* Flags: ``cdrom`` (= ``devtype=cdrom``), ``discard``, ``no-discard``.
* The deprecated xend forms too: ``raw:``/``qcow:``/``qcow2:``/``vhd:``
  format prefixes (after which the positionals are target, vdev, access),
  ``iscsi:``/``nbd:``/``enbd:``/``drbd:`` (script ``block-NAME``), ignored
  ``phy:``/``file:``/``tap:``/``tap2:``/``tapdisk:``/``aio:``/``ioemu:``,
  and ``vdev:cdrom`` / ``vdev:disk``.
* xmp's extension ``size=64M``: the disk's size, K/M/G/T being powers of
  1024, bytes without a suffix; a positive multiple of 512.

The vdev is validated and numbered as in ``docs/man/xen-vbd-interface.7``
and libxl's ``libxl__device_disk_dev_number``: ``xvd``, ``hd``, ``sd`` plus
letters (bijective base 26: a=0 … z=25, aa=26) and an optional partition
number without leading zero, or ``d<disk>p<partition>``.
"""

from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass
from pathlib import Path

from xmp.errors import XmpError

FORMATS = ("raw", "qcow", "qcow2", "vhd", "qed", "empty")
BACKENDTYPES = ("phy", "qdisk", "standalone", "tap")
_ACCESS = {"r": "ro", "ro": "ro", "w": "rw", "rw": "rw"}
_DEVTYPES = ("disk", "cdrom")
_KEYS = ("target", "format", "vdev", "access", "devtype", "backend", "backendtype", "script", "size")
_FLAGS = ("cdrom", "discard", "no-discard")
# Known to xl, not offered by xmp: refused by name rather than as unknown.
_XL_ONLY = ("specification", "grant_usage", "colo-host", "colo-port", "colo-export", "active-disk",
            "hidden-disk", "direct-io-safe", "trusted", "untrusted", "colo", "no-colo")
_POSITIONAL = ("target", "format", "vdev", "access")
_TRAILING_KEY = re.compile(r",\s*(size|backend)=([^,=]*)$")

_FORMAT_PREFIX = re.compile(r"(raw|qcow2?|vhd):")
_SCRIPT_PREFIX = re.compile(r"(iscsi|e?nbd|drbd):")
_IGNORED_PREFIX = re.compile(r"(tapdisk|tap2?|aio|ioemu|file|phy):")
_UNKNOWN_PREFIX = re.compile(r"[a-z][a-z0-9]*:(?![a-z0-9])")
_KEY = re.compile(r"[a-z][-a-z0-9_]*\Z")
_SIZE = re.compile(r"([0-9]+)([KMGT]?)\Z", re.IGNORECASE)
_SUFFIX = {"": 0, "K": 10, "M": 20, "G": 30, "T": 40}

# libxl__device_disk_dev_number: (prefix, max disk, max partition).
_VDEV_KINDS = (("xvd", (1 << 20) - 1, 255), ("hd", 3, 63), ("sd", 15, 15))
_VDEV = re.compile(r"(xvd|hd|sd)([a-z]+)(0|[1-9][0-9]*)?\Z")
_DP = re.compile(r"d(0|[1-9][0-9]*)p(0|[1-9][0-9]*)\Z")


class DiskSpecError(XmpError):
    """A disk spec xl would refuse; the message names the part and the spec."""

    def __init__(self, spec: str, reason: str):
        self.spec = spec
        self.reason = reason
        super().__init__(spec, reason)

    def __str__(self) -> str:
        return f"disk spec {self.spec!r}: {self.reason}"


@dataclass(frozen=True)
class DiskSpec:
    """One parsed ``disk=`` entry.  ``target`` None is an empty drive (a
    cdrom) or, with ``size_bytes``, a disk with no backing path given;
    ``backend`` None is dom0; ``discard`` None leaves it to the backend."""

    target: str | None
    format: str
    vdev: str
    access: str
    devtype: str = "disk"
    backend: str | None = None
    backendtype: str | None = None
    script: str | None = None
    discard: bool | None = None
    size_bytes: int | None = None

    @property
    def readonly(self) -> bool:
        return self.access == "ro"

    @property
    def is_cdrom(self) -> bool:
        return self.devtype == "cdrom"

    @property
    def devid(self) -> int:
        """The vbd's number in xenstore (``device/vbd/<devid>``, ``virtual-device``)."""
        return vdev_devid(self.vdev)


def vdev_disk_partition(vdev: str) -> tuple[str, int, int] | None:
    """(kind, disk, partition) of a vdev name, or None if it is not one.
    ``d<disk>p<partition>`` is kind ``xvd``."""
    m = _DP.match(vdev)
    if m:
        disk, part = int(m.group(1)), int(m.group(2))
        return ("xvd", disk, part) if disk < (1 << 20) and part < 256 else None
    m = _VDEV.match(vdev)
    if not m:
        return None
    kind, letters, digits = m.groups()
    _, max_disk, max_part = next(k for k in _VDEV_KINDS if k[0] == kind)
    disk = -1
    for c in letters:
        disk = (disk + 1) * 26 + (ord(c) - ord("a"))
        if disk > max_disk:
            return None
    part = int(digits) if digits else 0
    if part > max_part:
        return None
    return kind, disk, part


def vdev_devid(vdev: str) -> int:
    """The xenstore number of a vdev, as xen-vbd-interface(7) encodes it::

        202 << 8 | disk << 4 | partition      xvd, disk and partition <= 15
        1 << 28 | disk << 8 | partition       xvd, beyond that
        8 << 8 | disk << 4 | partition        sd
        3 << 8 | disk << 6 | partition        hd, disks 0..1
        22 << 8 | (disk-2) << 6 | partition   hd, disks 2..3
    """
    parsed = vdev_disk_partition(vdev)
    if parsed is None:
        raise ValueError(f"not a vdev: {vdev!r}")
    kind, disk, part = parsed
    if kind == "xvd":
        if disk <= 15 and part <= 15:
            return (202 << 8) | (disk << 4) | part
        return (1 << 28) | (disk << 8) | part
    if kind == "sd":
        return (8 << 8) | (disk << 4) | part
    return ((3 if disk < 2 else 22) << 8) | ((disk & 1) << 6) | part


def parse_size(text: str) -> int:
    """``64M`` → 67108864; raises ValueError."""
    m = _SIZE.match(text.strip())
    if not m:
        raise ValueError(f"size {text!r} is not a number with an optional K, M, G or T")
    n = int(m.group(1)) << _SUFFIX[m.group(2).upper()]
    if n <= 0 or n % 512:
        raise ValueError(f"size {text!r} is not a positive multiple of 512 bytes")
    return n


class _Parser:
    def __init__(self, spec: str):
        self.spec = spec
        self.values: dict[str, str] = {}    # parameter -> value as given ("" = default)
        self.depr_prefix = False
        self.format_slot_taken = False      # ",hdc:cdrom,r": vdev sat in format's place
        self.devtype: str | None = None
        self.discard: bool | None = None

    def fail(self, reason: str) -> DiskSpecError:
        return DiskSpecError(self.spec, reason)

    def set(self, name: str, value: str) -> None:
        # At most once; only an empty (= default) value may be overridden.
        if self.values.get(name):
            raise self.fail(f"{name} specified twice ({self.values[name]!r}, then {value!r})")
        self.values[name] = value

    def set_devtype(self, value: str) -> None:
        if value not in _DEVTYPES:
            raise self.fail(f"unknown devtype {value!r} (devtype is disk or cdrom)")
        if self.devtype is not None and self.devtype != value:
            raise self.fail(f"devtype specified twice ({self.devtype!r}, then {value!r})")
        self.devtype = value

    def set_discard(self, value: bool) -> None:
        if self.discard is not None and self.discard != value:
            raise self.fail("both discard and no-discard")
        self.discard = value

    def vdev_colon(self, tok: str) -> bool:
        """Deprecated ``vdev:devtype``; True if ``tok`` was one."""
        vdev, colon, devtype = tok.rpartition(":")
        if not colon:
            return False
        self.set("vdev", vdev)
        self.set_devtype(devtype)
        return True

    def positional(self, tok: str) -> None:
        if "target" not in self.values:
            self.set("target", tok)
        elif not self.depr_prefix and "format" not in self.values and not self.format_slot_taken:
            if self.values["target"] == "" and self.vdev_colon(tok):
                self.format_slot_taken = True
            else:
                self.set("format", tok)
        elif "vdev" not in self.values:
            if not self.vdev_colon(tok):
                self.set("vdev", tok)
        elif "access" not in self.values:
            self.set("access", tok)
        else:
            raise self.fail(f"too many positional parameters at {tok!r} "
                            f"(they are {', '.join(_POSITIONAL)})")

    def strip_prefixes(self, tok: str) -> str:
        while True:
            m = _FORMAT_PREFIX.match(tok)
            if m:
                self.depr_prefix = True
                self.set("format", m.group(1))
            elif m := _SCRIPT_PREFIX.match(tok):
                self.depr_prefix = True
                self.set("script", f"block-{m.group(1)}")
            elif m := _IGNORED_PREFIX.match(tok):
                self.depr_prefix = True
            elif m := _UNKNOWN_PREFIX.match(tok):
                raise self.fail(f"unknown deprecated disk prefix {m.group(0)!r}")
            else:
                return tok
            tok = tok[m.end():]

    def keyvalue(self, tok: str) -> None:
        key, _, value = tok.partition("=")
        value = value.strip()
        if not _KEY.match(key):
            raise self.fail(f"bad parameter {tok!r}")
        if key in _XL_ONLY:
            raise self.fail(f"xl option {key!r} is not supported by xmp")
        if key not in _KEYS:
            guess = difflib.get_close_matches(key, _KEYS + _FLAGS, n=1)
            hint = f" (did you mean {guess[0]!r}?)" if guess else ""
            raise self.fail(f"unknown key {key!r}{hint}")
        if key == "devtype":
            self.set_devtype(value)
        else:
            self.set(key, value)

    def parse(self) -> DiskSpec:
        s, pos = self.spec, 0
        while pos < len(s):
            while pos < len(s) and s[pos] in " \t\n":
                pos += 1
            if pos == len(s):
                break
            if s.startswith("target=", pos):
                rest = s[pos + len("target="):]
                rest = rest[:-1] if rest.endswith(",") else rest
                # xl wants target= last; a trailing ", size=…" or ", backend=…" (xmp's own
                # key, and written after target in the wild) is split off rather than
                # becoming part of the path.
                while (m := _TRAILING_KEY.search(rest)) is not None:
                    self.set(m.group(1), m.group(2).strip())
                    rest = rest[:m.start()]
                self.set("target", rest)
                break
            comma = s.find(",", pos)
            end = len(s) if comma < 0 else comma
            tok, pos = s[pos:end].rstrip(" \t\n"), end + 1
            if tok in _FLAGS:
                if tok == "cdrom":
                    self.set_devtype("cdrom")
                else:
                    self.set_discard(tok == "discard")
            elif tok in _XL_ONLY:
                raise self.fail(f"xl flag {tok!r} is not supported by xmp")
            elif "=" in tok:
                self.keyvalue(tok)
            else:
                self.positional(self.strip_prefixes(tok))
        return self.build()

    def build(self) -> DiskSpec:
        v = self.values
        devtype = self.devtype or "disk"

        vdev = v.get("vdev", "")
        if not vdev:
            raise self.fail("no vdev (the guest's device name, e.g. xvda) -- it is mandatory")
        if vdev_disk_partition(vdev) is None:
            raise self.fail(f"bad vdev {vdev!r} (want xvd[a-z]+, hd[a-d], sd[a-p], each with an "
                            "optional partition number, or d<disk>p<partition>)")

        fmt = v.get("format") or "raw"
        if fmt not in FORMATS:
            raise self.fail(f"unknown format {fmt!r} (one of {', '.join(FORMATS)})")

        access_given = v.get("access", "")
        if access_given and access_given not in _ACCESS:
            raise self.fail(f"unknown access {access_given!r} (ro, r, rw or w)")
        access = _ACCESS[access_given] if access_given else ("ro" if devtype == "cdrom" else "rw")
        if devtype == "cdrom" and access == "rw":
            raise self.fail("a cdrom cannot be read-write")

        backendtype = v.get("backendtype") or None
        if backendtype is not None and backendtype not in BACKENDTYPES:
            raise self.fail(f"unknown backendtype {backendtype!r} (one of {', '.join(BACKENDTYPES)})")

        size = None
        if v.get("size"):
            try:
                size = parse_size(v["size"])
            except ValueError as e:
                raise self.fail(str(e)) from None

        target = v.get("target") or None
        if target is None and devtype == "disk" and size is None:
            raise self.fail("no target (only a cdrom may be empty, or give size= for a fresh disk)")

        return DiskSpec(target=target, format=fmt, vdev=vdev, access=access, devtype=devtype,
                        backend=v.get("backend") or None, backendtype=backendtype,
                        script=v.get("script") or None, discard=self.discard, size_bytes=size)


def parse_diskspec(spec: str) -> DiskSpec:
    """Parse one xl ``disk=`` entry; raises :class:`DiskSpecError`."""
    return _Parser(spec).parse()


# -- where a target lives --------------------------------------------------

# The image path is the value of the backend's ``params`` node: one xenstore
# write of at most XENSTORE_PAYLOAD_MAX (4096) bytes, its node path included.
TARGET_MAX = 4096 - 128


def target_path(target: str, base: str | os.PathLike[str]) -> Path:
    """The image a target names: absolute as given (xl takes them), relative
    to ``base`` (the folder of the file the disk was written in)."""
    path = Path(target)
    return path if path.is_absolute() else Path(base) / path


def target_problem(spec: DiskSpec, base: str | os.PathLike[str]) -> str | None:
    """Why this disk's image could not be what the spec says, or None.

    * A relative target must stay inside ``base``: ``../../etc/x.img`` would
      create a file outside the topology's folder (judged on the path as
      written, ``..`` resolved, so a link the user placed is theirs).
    * Its path must fit the backend's ``params`` node (:data:`TARGET_MAX`).
    * An image to be created (missing, with ``size=``) must not be larger
      than the whole filesystem it would live on -- the nearest existing
      parent's ``statvfs`` -- or it fails on the first write past the end.

    Checks only; creates nothing."""
    if spec.target is None:
        return None
    base_dir = Path(os.path.abspath(base))
    path = Path(os.path.normpath(target_path(spec.target, base_dir)))
    if not Path(spec.target).is_absolute() and not path.is_relative_to(base_dir):
        return (f"target '{spec.target}' resolves to {path}, outside {base_dir}, the folder the "
                "target is relative to; move the image inside it or give an absolute path")
    if len(os.fsencode(path)) > TARGET_MAX:
        return (f"target's path is {len(os.fsencode(path))} bytes; a disk's xenstore params hold at most "
                f"{TARGET_MAX}: use a shorter path")
    if spec.size_bytes is None or path.exists():
        return None
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    try:
        st = os.statvfs(parent)
    except OSError as exc:
        return f"target '{spec.target}': cannot look at {parent}: {exc.strerror or exc}"
    whole = st.f_blocks * st.f_frsize
    if spec.size_bytes > whole:
        return (f"size {_human(spec.size_bytes)} is larger than the whole filesystem that would hold "
                f"{path}: {_human(whole)} at {parent}; give a smaller size= or another target")
    return None


def _human(n: int) -> str:
    for shift, unit in ((40, "TiB"), (30, "GiB"), (20, "MiB"), (10, "KiB")):
        if n >= 1 << shift:
            return f"{n / (1 << shift):.1f} {unit} ({n} bytes)"
    return f"{n} bytes"
