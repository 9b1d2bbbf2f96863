"""Linux TAP devices and bridges, over netlink (pyroute2), never a shell.

A TAP is made non-persistent with TUNSETIFF on ``/dev/net/tun``: it exists
exactly as long as its descriptor, so a backend that dies -- SIGKILL
included -- leaves no interface behind.  A bridge xmp had to create is
removed when the last port xmp put on it leaves; one that existed already
(the host's ``xenbr0``) is left alone, as Xen's vif-bridge script does.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct

TUNSETIFF = 0x400454CA
TUNSETPERSIST = 0x400454CB
TUNSETOWNER = 0x400454CC
TUNSETGROUP = 0x400454CE
CLONE_NEWNET = 0x40000000
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
CAP_NET_ADMIN = 12


def privileged() -> bool:
    """Whether this process may make network devices (CAP_NET_ADMIN in
    its effective set) and has /dev/net/tun."""
    try:
        with open("/proc/self/status") as f:
            caps = next(int(line.split()[1], 16) for line in f if line.startswith("CapEff:"))
    except (OSError, StopIteration, ValueError):
        return False
    return bool(caps & (1 << CAP_NET_ADMIN)) and os.path.exists("/dev/net/tun")


def open_tun() -> int:
    """A non-blocking ``/dev/net/tun`` descriptor, not yet a TAP: the network
    namespace it was opened in is the one its TAP will be in."""
    return os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)


def set_iff(fd: int, name: str) -> None:
    """TUNSETIFF: make ``fd`` TAP ``name`` -- a new one, or an existing
    persistent one this process's uid owns (no capability needed then)."""
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", name.encode(), IFF_TAP | IFF_NO_PI))


def open_tap(name: str) -> int:
    """A non-blocking descriptor of a new TAP ``name`` (no packet info header)."""
    fd = open_tun()
    try:
        set_iff(fd, name)
    except BaseException:
        os.close(fd)
        raise
    return fd


def in_netns(pid: int, fn):
    """``fn()`` run in process ``pid``'s network namespace, on a thread of
    its own (setns moves only the calling thread, which then ends)."""
    import ctypes
    import threading

    libc = ctypes.CDLL(None, use_errno=True)
    out: dict = {}

    def run() -> None:
        try:
            fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns into the network namespace of {pid}: {os.strerror(err)}")
            finally:
                os.close(fd)
            out["value"] = fn()
        except BaseException as exc:  # re-raised by the caller's thread
            out["error"] = exc

    t = threading.Thread(target=run, name=f"netns-{pid}")
    t.start()
    t.join()
    if "error" in out:
        raise out["error"]
    return out.get("value")


def make_owned_tap(name: str, uid: int, gid: int) -> None:
    """A persistent TAP ``name`` in this thread's namespace that process
    of ``uid`` may attach to with TUNSETIFF, no capability needed (it goes
    with its namespace)."""
    fd = open_tap(name)
    try:
        fcntl.ioctl(fd, TUNSETOWNER, uid)
        fcntl.ioctl(fd, TUNSETGROUP, gid)
        fcntl.ioctl(fd, TUNSETPERSIST, 1)
    finally:
        os.close(fd)


def _ipr():
    from pyroute2 import IPRoute  # imported late: only TAP mode needs it

    return IPRoute()


def _index(ipr, name: str) -> int | None:
    found = ipr.link_lookup(ifname=name)
    return found[0] if found else None


def ensure_bridge(bridge: str) -> int | None:
    """Make ``bridge`` (up) unless it exists; its ifindex if made here."""
    with _ipr() as ipr:
        if _index(ipr, bridge) is not None:
            return None
        try:
            ipr.link("add", ifname=bridge, kind="bridge")
        except Exception as exc:
            if getattr(exc, "code", None) == errno.EEXIST:
                return None
            raise OSError(getattr(exc, "code", errno.EIO), str(exc)) from None
        br = _index(ipr, bridge)
        if br is None:
            raise OSError(errno.ENODEV, f"bridge {bridge} vanished as it was made")
        ipr.link("set", index=br, state="up")
        return br


def remove_link(index: int, name: str) -> None:
    """Delete link ``index`` if it is still ``name`` (not a later namesake)."""
    with _ipr() as ipr:
        if _index(ipr, name) == index:
            try:
                ipr.link("del", index=index)
            except Exception:  # gone meanwhile
                pass


def remove_named(name: str) -> bool:
    """Delete link ``name`` of this thread's namespace; whether there was one."""
    with _ipr() as ipr:
        idx = _index(ipr, name)
        if idx is None:
            return False
        ipr.link("del", index=idx)
        return True


def present(name: str) -> bool:
    """Whether this thread's namespace has link ``name`` (asked over netlink:
    /sys/class/net shows the namespace sysfs was mounted in)."""
    with _ipr() as ipr:
        return _index(ipr, name) is not None


def attach(name: str, bridge: str, mtu: int) -> None:
    """Put TAP ``name`` on ``bridge`` and bring it up (vif-bridge's job);
    the bridge must exist (the toolstack makes a missing one)."""
    with _ipr() as ipr:
        br = _index(ipr, bridge)
        if br is None:
            raise OSError(errno.ENODEV, f"no bridge {bridge}")
        idx = _index(ipr, name)
        if idx is None:
            raise OSError(errno.ENODEV, f"TAP {name} vanished")
        ipr.link("set", index=idx, mtu=mtu)
        ipr.link("set", index=idx, master=br, state="up")


def set_address(name: str, address: str) -> None:
    """Give interface ``name`` an address (``10.0.0.1/24``) and bring it up."""
    addr, _, prefix = address.partition("/")
    with _ipr() as ipr:
        idx = _index(ipr, name)
        if idx is None:
            raise OSError(errno.ENODEV, f"no interface {name}")
        try:
            ipr.addr("add", index=idx, address=addr, prefixlen=int(prefix or 24))
        except Exception as exc:
            if getattr(exc, "code", None) != errno.EEXIST:  # there already: fine
                raise
        ipr.link("set", index=idx, state="up")


def configure(name: str, *, mac: str, mtu: int, addresses: list[str], gateway: str | None = None) -> None:
    """Set up interface ``name`` in this thread's network namespace: its
    MAC and MTU, its addresses, up; ``lo`` up; a default route if given."""
    with _ipr() as ipr:
        lo = _index(ipr, "lo")
        if lo is not None:
            ipr.link("set", index=lo, state="up")
        idx = _index(ipr, name)
        if idx is None:
            raise OSError(errno.ENODEV, f"no interface {name}")
        ipr.link("set", index=idx, address=mac, mtu=mtu)
        for address in addresses:
            addr, _, prefix = address.partition("/")
            ipr.addr("add", index=idx, address=addr, prefixlen=int(prefix or (24 if ":" not in addr else 64)))
        ipr.link("set", index=idx, state="up")
        if gateway:
            ipr.route("add", dst="default", gateway=gateway)


def uplink_name(bridge: str) -> str:
    """A driver domain's end of the veth joining its ``bridge`` to the host's."""
    return f"up-{bridge}"[:15]


def veth_join(outer: str, bridge: str, pid: int) -> None:
    """Join ``bridge`` of this namespace to the bridge of that name in
    process ``pid``'s namespace by a veth pair: ``outer`` here, its peer
    there (:func:`uplink_name`).  The pair goes when that namespace does."""
    import secrets

    temp = f"xj{secrets.token_hex(6)}"  # the peer's name while it is still here
    with _ipr() as ipr:
        br = _index(ipr, bridge)
        if br is None:
            raise OSError(errno.ENODEV, f"no bridge {bridge}")
        ipr.link("add", ifname=outer, kind="veth", peer={"ifname": temp})
        try:
            inner = _index(ipr, temp)
            if inner is None:
                raise OSError(errno.ENODEV, f"veth peer {temp} vanished")
            ipr.link("set", index=inner, net_ns_pid=pid)
        except BaseException:
            idx = _index(ipr, outer)
            if idx is not None:
                ipr.link("del", index=idx)
            raise
        outer_idx = _index(ipr, outer)
        ipr.link("set", index=outer_idx, master=br, state="up")

    def inside() -> None:
        ensure_bridge(bridge)
        with _ipr() as ipr:
            idx = _index(ipr, temp)
            if idx is None:
                raise OSError(errno.ENODEV, f"veth peer {temp} did not arrive")
            ipr.link("set", index=idx, ifname=uplink_name(bridge))
            ipr.link("set", index=idx, master=_index(ipr, bridge), state="up")

    in_netns(pid, inside)


def exists(name: str) -> bool:
    return os.path.isdir(f"/sys/class/net/{name}")
