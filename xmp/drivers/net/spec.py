"""xl's ``vif=`` specification strings, parsed into a :class:`VifSpec`.

Follows ``docs/man/xl-network-configuration.5.pod.in``, xl's
``parse_nic_config`` (``tools/xl/xl_parse.c``), the rate grammar of
``tools/libs/util/libxlu_vif.c`` and libxl's defaults
(``libxl__device_nic_setdefault``)::

    [<key>=<value>|<flag>,]*

* Comma-separated; spaces around a parameter are trimmed and empty
  parameters skipped.  Every key is optional; an empty value means the
  default.  Unlike xl (where the last of two wins), a key given twice is
  refused: it is always a mistake in a config.
* ``mac``: six hex octets separated by colons, unicast.  Default (and, as
  libxl, for ``00:00:00:00:00:00``): random in Xen's OUI, ``00:16:3e`` +
  three random octets with the top bit of the first cleared
  (``00:16:3e:00:00:00`` .. ``00:16:3e:7f:ff:ff``).  The locally
  administered bit is for addresses users pick; libxl's generator stays in
  the OUI and so does this one.
* ``bridge`` (``xenbr0``), ``script`` (``vif-bridge``), ``backend`` (a domain
  name or id; default dom0), ``vifname`` (a Linux interface name; default
  ``vif<domid>.<devid>``, see :meth:`VifSpec.ifname`), ``model``,
  ``gatewaydev`` (``netdev`` is its deprecated alias), ``devid`` (default:
  the index in the vif list), ``mtu`` (1500, as the man page; 68..65535).
* ``ip``: one or more IPv4/IPv6 addresses, optionally with a ``/prefix``,
  separated by spaces.
* ``type``: ``vif`` (default).  ``ioemu`` is an emulated NIC, which only an
  HVM guest has; xmp's guests are PV, so libxl's refusal is kept.
* ``rate=RATE/s[@INTERVAL]``: RATE a decimal number with an optional
  K/M/G (powers of 1000) and ``B`` (bytes) or ``b`` (bits); INTERVAL a
  number with ``s``, ``ms``, ``us`` (or ``m``/``u``; no unit is seconds),
  default 50 ms.  Stored as libxl does: bytes per interval and the interval
  in microseconds.  (xl reads the numbers with ``strtoull(..., 0)``, so a
  leading 0 makes them octal there; here they are always decimal.)
* Flags ``trusted`` / ``untrusted``.
"""

from __future__ import annotations

import difflib
import ipaddress
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass

from xmp.errors import XmpError

DEFAULT_BRIDGE = "xenbr0"
DEFAULT_SCRIPT = "vif-bridge"
DEFAULT_MTU = 1500
DEFAULT_RATE_INTERVAL_USECS = 50_000
XEN_OUI = b"\x00\x16\x3e"
MTU_MIN, MTU_MAX = 68, 65535        # Linux's ETH_MIN_MTU .. ETH_MAX_MTU

_KEYS = ("mac", "bridge", "ip", "type", "model", "vifname", "script", "backend", "rate", "mtu", "devid",
         "gatewaydev", "netdev")
_FLAGS = ("trusted", "untrusted")
# Known to xl, not offered by xmp: refused by name rather than as unknown.
_XL_ONLY = ("accel", "forwarddev", "vlan", "vid")
_KEY = re.compile(r"[a-z][-a-z0-9_]*\Z")
_MAC = re.compile(r"([0-9a-fA-F]{1,2}):([0-9a-fA-F]{1,2}):([0-9a-fA-F]{1,2}):"
                  r"([0-9a-fA-F]{1,2}):([0-9a-fA-F]{1,2}):([0-9a-fA-F]{1,2})\Z")
_DIGITS = re.compile(r"[0-9]+\Z")
_RATE = re.compile(r"([0-9]+)([GMK]?)([Bb])/s\Z")
_INTERVAL = re.compile(r"([0-9]+)([mu]?)(s?)\Z")
_RATE_MULT = {"": 1, "K": 1000, "M": 1000**2, "G": 1000**3}
_UINT32_MAX = 2**32 - 1


class VifSpecError(XmpError):
    """A vif spec xmp refuses; the message names the key and the spec."""

    def __init__(self, spec: str, reason: str):
        self.spec = spec
        self.reason = reason
        super().__init__(spec, reason)

    def __str__(self) -> str:
        return f"vif spec {self.spec!r}: {self.reason}"


@dataclass(frozen=True)
class VifRate:
    """A credit-based tx limit: ``bytes_per_interval`` every ``interval_usecs``."""

    bytes_per_interval: int
    interval_usecs: int = DEFAULT_RATE_INTERVAL_USECS

    def xenstore(self) -> str:
        """The backend's ``rate`` node, as libxl writes it."""
        return f"{self.bytes_per_interval},{self.interval_usecs}"


@dataclass(frozen=True)
class VifSpec:
    """One parsed ``vif=`` entry (defaults filled in as libxl does)."""

    mac: str                                 # lower case, two digits per octet
    bridge: str = DEFAULT_BRIDGE
    ip: tuple[str, ...] = ()
    type: str = "vif"
    model: str | None = None
    vifname: str | None = None
    script: str = DEFAULT_SCRIPT
    backend: str | None = None               # None: dom0
    rate: VifRate | None = None
    mtu: int = DEFAULT_MTU
    devid: int | None = None                 # None: the index in the vif list
    gatewaydev: str | None = None
    trusted: bool | None = None
    mac_generated: bool = False

    @property
    def mac_bytes(self) -> bytes:
        return bytes.fromhex(self.mac.replace(":", ""))

    def ifname(self, domid: int, devid: int) -> str:
        """The backend interface's name: ``vifname``, else ``vif<domid>.<devid>``."""
        return self.vifname or f"vif{domid}.{devid}"


def random_mac(randbytes: Callable[[int], bytes] = secrets.token_bytes) -> str:
    """A MAC in Xen's OUI as libxl makes one: ``00:16:3e`` then three random
    octets, the top bit of the first cleared."""
    r = randbytes(3)
    return format_mac(XEN_OUI + bytes([r[0] & 0x7F, r[1], r[2]]))


def format_mac(octets: bytes) -> str:
    return ":".join(f"{b:02x}" for b in octets)


def parse_rate(text: str) -> VifRate:
    """``10Mb/s@20ms`` -> VifRate(25000, 20000); raises ValueError."""
    rate, at, interval = text.partition("@")
    if not rate:
        raise ValueError(f"no rate in {text!r} (want RATE/s[@INTERVAL], e.g. 10Mb/s or 1MB/s@20ms)")
    m = _RATE.match(rate)
    if not m:
        raise ValueError(f"invalid rate {rate!r} (want a number, an optional K, M or G, then B/s "
                         "for bytes or b/s for bits, e.g. 10Mb/s)")
    n = int(m.group(1))
    if n == 0 or n > _UINT32_MAX:
        raise ValueError(f"rate {rate!r} is zero or overflows")
    bytes_per_sec = n * _RATE_MULT[m.group(2)]
    if m.group(3) == "b":
        bytes_per_sec //= 8
    usecs = DEFAULT_RATE_INTERVAL_USECS
    if at:
        mi = _INTERVAL.match(interval)
        if not mi:
            raise ValueError(f"invalid replenishment interval {interval!r} (want a number with s, ms "
                             "or us, e.g. 20ms)")
        usecs = int(mi.group(1))
        if usecs == 0 or usecs > _UINT32_MAX:
            raise ValueError(f"replenishment interval {interval!r} is zero or overflows")
        usecs *= {"": 1_000_000, "m": 1000, "u": 1}[mi.group(2)]
        if usecs > _UINT32_MAX:
            raise ValueError(f"replenishment interval {interval!r} overflows")
    return VifRate(bytes_per_sec * usecs // 1_000_000, usecs)


def _ifname_ok(name: str) -> bool:
    # Linux's dev_valid_name: 1..15 bytes, not "." or "..", no '/', ':' or space.
    return (0 < len(name.encode()) <= 15 and name not in (".", "..")
            and not any(c in "/:" or c.isspace() for c in name))


class _Parser:
    def __init__(self, spec: str, randbytes: Callable[[int], bytes]):
        self.spec = spec
        self.randbytes = randbytes
        self.values: dict[str, str] = {}
        self.trusted: bool | None = None

    def fail(self, reason: str) -> VifSpecError:
        return VifSpecError(self.spec, reason)

    def set(self, key: str, value: str) -> None:
        if key in self.values:
            raise self.fail(f"{key} specified twice ({self.values[key]!r}, then {value!r})")
        self.values[key] = value

    def parse(self) -> VifSpec:
        for raw in self.spec.split(","):
            tok = raw.strip()
            if not tok:
                continue
            if tok in _FLAGS:
                trusted = tok == "trusted"
                if self.trusted is not None:
                    raise self.fail("both trusted and untrusted" if self.trusted != trusted
                                    else f"{tok} specified twice")
                self.trusted = trusted
                continue
            key, eq, value = tok.partition("=")
            key, value = key.strip(), value.strip()
            if not eq:
                raise self.fail(f"bad parameter {tok!r} (want key=value, or the flag trusted or untrusted)")
            if not _KEY.match(key):
                raise self.fail(f"bad parameter {tok!r}")
            if key in _XL_ONLY or key.startswith("colo_"):
                raise self.fail(f"xl option {key!r} is not supported by xmp")
            if key not in _KEYS:
                guess = difflib.get_close_matches(key, _KEYS + _FLAGS, n=1)
                hint = f" (did you mean {guess[0]!r}?)" if guess else ""
                raise self.fail(f"unknown key {key!r}{hint}")
            if key == "netdev":      # xl: "deprecated, please use gatewaydev"
                key = "gatewaydev"
            self.set(key, value)
        return self.build()

    def mac(self) -> tuple[str, bool]:
        text = self.values.get("mac", "")
        if not text:
            return random_mac(self.randbytes), True
        m = _MAC.match(text)
        if not m:
            raise self.fail(f"bad mac {text!r} (want six hex octets separated by colons, "
                            "e.g. 00:16:3e:12:34:56)")
        octets = bytes(int(g, 16) for g in m.groups())
        if octets == bytes(6):   # libxl's "default" MAC: make one up
            return random_mac(self.randbytes), True
        if octets[0] & 1:
            raise self.fail(f"mac {text!r} is a multicast address (the first octet is odd); "
                            "a vif needs a unicast one")
        return format_mac(octets), False

    def number(self, key: str, lo: int, hi: int) -> int | None:
        text = self.values.get(key, "")
        if not text:
            return None
        if not _DIGITS.match(text) or not lo <= int(text) <= hi:
            raise self.fail(f"{key} {text!r} is not a number from {lo} to {hi}")
        return int(text)

    def build(self) -> VifSpec:
        v = self.values
        mac, generated = self.mac()

        vtype = v.get("type") or "vif"
        if vtype == "ioemu":
            raise self.fail("type 'ioemu' is an emulated NIC, which only HVM guests have; "
                            "xmp's guests are PV: use type=vif")
        if vtype != "vif":
            raise self.fail(f"unknown type {vtype!r} (vif, or ioemu for HVM guests)")

        ips = tuple(v.get("ip", "").split())
        for addr in ips:
            try:
                ipaddress.ip_interface(addr)
            except ValueError:
                raise self.fail(f"bad ip {addr!r} (want IPv4 or IPv6 addresses, optionally with "
                                "/prefix, separated by spaces)") from None

        vifname = v.get("vifname") or None
        if vifname is not None and not _ifname_ok(vifname):
            raise self.fail(f"vifname {vifname!r} is not an interface name (1 to 15 characters, "
                            "no '/', ':' or spaces)")

        rate = None
        if v.get("rate"):
            try:
                rate = parse_rate(v["rate"])
            except ValueError as e:
                raise self.fail(str(e)) from None

        mtu = self.number("mtu", MTU_MIN, MTU_MAX)
        return VifSpec(mac=mac, bridge=v.get("bridge") or DEFAULT_BRIDGE, ip=ips, type=vtype,
                       model=v.get("model") or None, vifname=vifname,
                       script=v.get("script") or DEFAULT_SCRIPT, backend=v.get("backend") or None,
                       rate=rate, mtu=DEFAULT_MTU if mtu is None else mtu,
                       devid=self.number("devid", 0, 2**31 - 1), gatewaydev=v.get("gatewaydev") or None,
                       trusted=self.trusted, mac_generated=generated)


def parse_vifspec(spec: str, *, randbytes: Callable[[int], bytes] = secrets.token_bytes) -> VifSpec:
    """Parse one xl ``vif=`` entry; raises :class:`VifSpecError`.
    ``randbytes(n)`` supplies the random MAC's octets (pass
    ``random.Random(seed).randbytes`` for a repeatable one)."""
    return _Parser(spec, randbytes).parse()
