"""The network driver's part of the toolstack (libxl's ``libxl_nic.c``):
an xl vif spec becomes the two xenstore directories of a vif.

A vif without ``devid=`` gets its index in the domain's ``vif`` list, or,
hot-plugged, the next free devid (libxl__device_nextid).  The device is
named by its MAC, so ``xmp network-detach DOM MAC`` works as xl's does.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from xmp.devices import DeviceSpec
from xmp.drivers.net import tap
from xmp.drivers.net.spec import VifSpec, parse_vifspec
from xmp.errors import XmpError
from xmp.reaper import REAPER

LIST_HEADER = (f"{'Idx':<3} {'BE':<2} {'Mac Addr.':<17} {'handle':<6} {'state':<5} {'evt-ch':<6} "
               f"{'tx-':>5}/{'rx-ring-ref':<11} BE-path")
LIST_KEYS = ("backend-id", "mac", "handle", "state", "event-channel", "event-channel-tx",
             "tx-ring-ref", "rx-ring-ref", "backend")


def parse(text: str) -> VifSpec:
    return parse_vifspec(text)


def pinned(text: str) -> str:
    """The spec with a MAC: a random one is chosen once, when the config is
    read, so the guest keeps it across reboots (as xl writes it into the
    domain's config) and its network namespace is made with it."""
    spec = parse_vifspec(text)
    if not spec.mac_generated:
        return text
    rest = [p for p in text.split(",") if p.strip() and not p.strip().startswith("mac")]
    return ", ".join([*(p.strip() for p in rest), f"mac={spec.mac}"])


def indexed(spec: VifSpec, index: int) -> VifSpec:
    """The spec with its default devid: its place in the list."""
    return spec if spec.devid is not None else dataclasses.replace(spec, devid=index)


def name_of(spec: VifSpec) -> str:
    return spec.mac


def devid_of(name: str) -> int:
    """A vif by its devid; a MAC is matched by the device manager."""
    if not name.isdigit():
        raise XmpError(f"a vif is named by its devid or its MAC, not {name!r}")
    return int(name)


# Bridges made by this supervisor (name -> ifindex): removed when it stops,
# and by its reaper should it be killed (xmp.reaper).
_made_bridges: dict[str, int] = {}


def _ensure_bridge(name: str) -> None:
    index = tap.ensure_bridge(name)
    if index is not None:
        _made_bridges[name] = index
        REAPER.made(index, name)


def device(spec: VifSpec, base: Path) -> DeviceSpec:
    """The vif's keys, as libxl writes them.  As root, a ``vif-bridge``
    vif served by dom0 has its bridge made here if the host has none of
    that name (the backend only puts its TAP on it), removed when this host
    stops."""
    in_dom0 = spec.backend in (None, "Domain-0", "0")  # a driver domain holds no privilege: its switch
    if spec.script == "vif-bridge" and in_dom0 and tap.privileged() and spec.bridge not in _made_bridges:
        try:
            _ensure_bridge(spec.bridge)
        except OSError as exc:
            raise XmpError(f"vif {spec.mac}: cannot make bridge {spec.bridge}: {exc}") from None
    devid = spec.devid or 0
    back = {"mac": spec.mac, "bridge": spec.bridge, "script": spec.script, "handle": str(devid),
            "mtu": str(spec.mtu), "type": "vif"}
    if spec.ip:
        back["ip"] = " ".join(spec.ip)
    if spec.vifname:
        back["vifname"] = spec.vifname
    if spec.rate is not None:
        back["rate"] = spec.rate.xenstore()
    front = {"mac": spec.mac, "handle": str(devid), "mtu": str(spec.mtu)}
    if spec.ip:
        front["ip"] = " ".join(spec.ip)  # xmp's guests configure eth0 from it (no DHCP)
    return DeviceSpec(devid, spec.mac, spec.backend, back_keys=back, front_keys=front)


def hotplug(front, dev: DeviceSpec) -> None:
    """A vif hot-plugged into a guest with a network namespace of its own
    (jailed, as root) gets the TAP ``ethN`` its TCP/IP stack needs, as a
    boot-time vif gets it from the jail's hook: made here in the guest's
    namespace (the guest holds no capability by now) with the vif's MAC,
    MTU and ``ip=``, persistent and owned by the guest's uid, so that
    :func:`xmp.drivers.net.stack.start` attaches to it with one TUNSETIFF.
    It goes with the guest's namespace."""
    pid = getattr(front, "pid", None)
    if pid is None or not tap.privileged():
        return
    try:
        if not _own_netns(pid) or front.cfg.driver_domain:
            return  # dom0 or a driver domain: no stack of its own to feed
        with open(f"/proc/{pid}/status") as f:
            ids = {k: int(v.split()[0]) for k, _, v in (line.partition(":") for line in f)
                   if k in ("Uid", "Gid")}
    except (OSError, ValueError):
        return  # gone meanwhile: the attach fails on its own
    keys = dev.front_keys
    name = f"eth{dev.devid}"

    def make() -> None:
        if tap.present(name):
            return  # made at its boot already (a restored or migrated guest's config has it)
        tap.make_owned_tap(name, ids["Uid"], ids["Gid"])
        tap.configure(name, mac=keys["mac"], mtu=int(keys.get("mtu", "1500")),
                      addresses=keys.get("ip", "").split())

    try:
        tap.in_netns(pid, make)
    except OSError as exc:
        raise XmpError(f"vif {dev.name}: cannot make {name} in the guest's network namespace: "
                       f"{exc}") from None


def unplug(front, dev: DeviceSpec) -> None:
    """The vif is gone from a guest with a namespace of its own: its TAP
    ``ethN`` there goes too (the guest's stack sees its descriptor fail),
    so a later vif of that devid gets a fresh one."""
    pid = getattr(front, "pid", None)
    if pid is None or not tap.privileged():
        return
    name = f"eth{dev.devid}"
    try:
        if _own_netns(pid) and not front.cfg.driver_domain:
            tap.in_netns(pid, lambda: tap.remove_named(name))
    except OSError:
        pass  # the guest (and its namespace) went meanwhile


def _own_netns(pid: int) -> bool:
    return os.stat(f"/proc/{pid}/ns/net").st_ino != os.stat("/proc/self/ns/net").st_ino


def join_backend(back, dev: DeviceSpec) -> None:
    """A ``vif-bridge`` vif served by a network driver domain (as root: it
    has a network namespace of its own and CAP_NET_ADMIN there, so its TAPs
    go on a bridge of its own): that bridge is joined to the host's bridge
    of the same name -- made here if missing -- by a veth pair, ``<bridge>.d<domid>``
    on the host, so the host and dom0's guests reach the guests behind it.
    Once per bridge and driver domain; the pair goes with the domain."""
    pid = getattr(back, "pid", None)
    keys = dev.back_keys
    if pid is None or back.domid == 0 or keys.get("script") != "vif-bridge" or not tap.privileged():
        return
    bridge = keys["bridge"]
    outer = f"{bridge[:9]}.d{back.domid}"[:15]
    try:
        if not _own_netns(pid) or tap.exists(outer):
            return
        _ensure_bridge(bridge)
        tap.veth_join(outer, bridge, pid)
    except OSError as exc:
        raise XmpError(f"vif {dev.name}: cannot join bridge {bridge} of dom{back.domid} to the host's: "
                       f"{exc}") from None


def host_open(host) -> list[str]:
    """Make the ``[host] bridges`` with the host's address on each (root
    only: otherwise the vifs meet in netback's switch and the host has no
    way in); returns what to log."""
    if not host.bridges:
        return []
    if not tap.privileged():
        return [f"network: not root: bridges {', '.join(host.bridges)} not made; vifs on them meet "
                "in netback's learning switch, unreachable from the host"]
    out = []
    for name, address in host.bridges.items():
        _ensure_bridge(name)
        tap.set_address(name, address)
        out.append(f"network: bridge {name} with the host at {address}")
    return out


def host_close() -> None:
    """Remove the bridges this host made (their TAPs went with their backends)."""
    while _made_bridges:
        name, index = _made_bridges.popitem()
        tap.remove_link(index, name)
        REAPER.removed(index, name)


def list_row(devid: int, front: dict[str, str]) -> str:
    """One line of xl network-list (split channels show the tx one)."""
    evtch = front.get("event-channel", front.get("event-channel-tx", "-1"))
    return (f"{devid:<3} {front.get('backend-id', '-'):<2} {front.get('mac', '-'):<17} "
            f"{front.get('handle', '-'):<6} {front.get('state', '-'):<5} {evtch:<6} "
            f"{front.get('tx-ring-ref', '-1'):>5}/{front.get('rx-ring-ref', '-1'):<11} "
            f"{front.get('backend', '-')}")
