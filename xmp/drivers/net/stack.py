"""A guest's own TCP/IP stack, every frame of which goes through netfront.

The guest process gets its own Linux network namespace (a stack instance
of its own, like its own kernel's) whose only interface besides ``lo`` is
``eth0``: a TAP with the vif's MAC and MTU and the ``ip=`` addresses of
its vif spec.  Netfront pumps frames between that TAP and the Xen rings:
what the guest's sockets send, the namespace's kernel writes to the TAP
and netfront puts on the tx ring; what netback delivers on the rx ring is
written to the TAP.  So a guest kernel uses plain ``socket`` calls, and
unmodified clients on the host (ping, curl, iperf3) reach it through
bridge -> TAP ``vifN.M`` -> netback -> rings -> netfront -> eth0 -- the
vif's counters prove every frame took that way.

The namespace is the guest's jail's (:mod:`xmp.hv.jail`, as root): its
network namespace hook, :func:`setup_guest_netns`, runs in the new
guest's process before it drops its privileges and makes the TAPs for
the vifs of its config; :func:`start` later connects one, and says
clearly why when there is none.  (This module is imported with netfront,
which the zygote preloads, so the hook is in place before any fork.)
The event loop stays on the guest's main thread (it pumps the rings); a
guest serving sockets does so on threads of its own (they share the
namespace).  A
reader thread takes frames from the TAP into a bounded queue and raises an
IPI port of ours; the loop sends them.  On every (re)connection of the vif
-- after a backend restart, as after a migration -- the stack announces
its addresses with a gratuitous ARP.
"""

from __future__ import annotations

import ipaddress
import os
import select
import struct
import threading
from collections import deque

from xmp.drivers.net import tap
from xmp.errors import LocalError
from xmp.hv.jail import on_guest_netns

QUEUE_MAX = 512
IFNAME = "eth0"


def garp(mac: bytes, ip: str) -> bytes:
    """A gratuitous ARP request announcing ``ip`` at ``mac``."""
    addr = ipaddress.IPv4Address(ip).packed
    return (b"\xff" * 6 + mac + b"\x08\x06"
            + struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1) + mac + addr + b"\0" * 6 + addr + b"\0" * 18)


# ethN -> (its TAP's descriptor, its addresses), made by the hook before the privileges went
_prepared: dict[str, tuple[int, list[str]]] = {}


# Unattached /dev/net/tun descriptors opened in the guest's namespace while it
# was still root, one per vif that may be hot-plugged later (see start()).
SPARE_TUNS = 4
_spare: list[int] = []


@on_guest_netns
def setup_guest_netns(domid: int, config: dict) -> list[int]:
    """The jail's network namespace hook (:func:`xmp.hv.jail.on_guest_netns`):
    in the guest's process, in its new network namespace, still root: one
    TAP ``ethN`` per vif of its config (N = devid), its MAC, MTU and
    ``ip=`` addresses set, up; and :data:`SPARE_TUNS` descriptors of
    ``/dev/net/tun`` not yet bound to a TAP, for vifs hot-plugged later
    (the toolstack makes their TAP, owned by this guest's uid).  Returns
    the descriptors (the domain keeps them); :func:`start` connects one
    to netfront."""
    from xmp.drivers.net.spec import parse_vifspec

    # Unprivileged ICMP echo sockets (what ping uses without CAP_NET_RAW) and any
    # port for its servers: in this namespace only, which is the guest's own host.
    for key, value in (("ping_group_range", "0 2147483647"), ("ip_unprivileged_port_start", "0")):
        with open(f"/proc/sys/net/ipv4/{key}", "w") as f:
            f.write(value)
    for i, text in enumerate(config.get("vif") or []):
        spec = parse_vifspec(text)
        name = f"eth{spec.devid if spec.devid is not None else i}"
        fd = tap.open_tap(name)
        addresses = list(spec.ip)
        tap.configure(name, mac=spec.mac, mtu=spec.mtu, addresses=addresses)
        _prepared[name] = (fd, addresses)
    _spare[:] = [tap.open_tun() for _ in range(SPARE_TUNS)]
    return [fd for fd, _ in _prepared.values()] + _spare


class NetStack:
    def __init__(self, kernel, nic, fd: int, addresses: list[str]):
        self.k = kernel
        self.nic = nic
        self.addresses = addresses
        self.queue: deque[bytes] = deque()
        self.dropped = 0          # frames from the stack that found the queue full
        self.garps = 0
        self.fd = fd
        self.port = kernel.xen.bind_ipi()
        kernel.loop.bind(self.port, lambda _p: self._drain())
        nic.sink = self._to_stack
        nic.on_tx_room = self._drain
        nic.on_connect.append(self.announce)
        self._reader = threading.Thread(target=self._read, name="netstack-eth0", daemon=True)
        self._reader.start()
        self.announce()

    def announce(self) -> None:
        """Gratuitous ARP for each IPv4 address (interface up, or reconnected)."""
        for address in self.addresses:
            ip = address.partition("/")[0]
            if ":" not in ip and self.nic.send(garp(self.nic.mac, ip), block=False):
                self.garps += 1

    def _to_stack(self, frame: bytes) -> None:
        try:
            os.write(self.fd, frame)
        except OSError:
            self.nic.stats.rx_dropped += 1

    def _read(self) -> None:
        poll = select.poll()
        poll.register(self.fd, select.POLLIN)
        while True:
            poll.poll()
            got = False
            while True:
                try:
                    frame = os.read(self.fd, 65536)
                except BlockingIOError:
                    break
                except OSError:
                    return
                if len(self.queue) >= QUEUE_MAX:
                    self.dropped += 1
                else:
                    self.queue.append(frame)
                    got = True
            if got:
                try:
                    self.k.xen.evt.send(self.port)
                except Exception:
                    return

    def _drain(self) -> None:
        q = self.queue
        nic = self.nic
        try:
            while q:
                if not nic.send(q[0], block=False, push=False):
                    return  # the ring is full: on_tx_room brings us back
                q.popleft()
        finally:
            nic.push()  # the burst, published at once


def start(kernel, ref: str = "eth0", timeout: float = 30.0) -> NetStack:
    """Connect this guest's TCP/IP stack (its namespace's ``ref``) to
    netfront: a boot-time vif's TAP, made by the jail's hook, or a
    hot-plugged one's, made by the toolstack at ``network-attach`` -- then
    this waits (up to ``timeout``) for the vif and attaches a spare
    descriptor to its TAP."""
    if ref in _prepared:
        fd, addresses = _prepared.pop(ref)
        return NetStack(kernel, kernel.net(ref), fd, addresses)
    if not _spare:
        why = ("xmp makes a guest's network namespace only when it runs as root (the jail's)"
               if not _prepared else f"its config has no vif for {ref} and no spare TAP descriptor is left")
        raise LocalError(f"netstack: no network namespace with {ref}: {why}")
    from xmp.drivers.net import frontend  # (it imports this module)

    nic = frontend.open(kernel, ref, timeout)  # hot-plugged: its TAP was made before its xenstore nodes
    fd = _spare.pop()
    try:
        tap.set_iff(fd, ref)
    except OSError as exc:
        _spare.append(fd)
        raise LocalError(f"netstack: cannot attach to {ref} (the toolstack makes it at network-attach, "
                         f"as root): {exc}") from None
    assert nic.dev is not None
    ip = nic.dev.xs.read_or(f"{nic.dev.nodename}/ip") or b""
    return NetStack(kernel, nic, fd, ip.decode(errors="replace").split())
