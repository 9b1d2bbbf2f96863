"""The domain's view of the hypervisor: hypercalls with Xen's names, plus
the event-channel fast path.

Sending on a port needs no round trip once the peer is known: the first
notify goes through the supervisor (``event_channel_op/send``), whose
reply names the peer's port and vCPU and hands over, once per peer, our
doorbell into it and its wake page read-only -- never its event object;
later notifies ring the doorbell directly (see xmp.sharedmem.evtchn).  A
stale cache after the peer closes can at worst raise a spurious event,
which every handler tolerates.

The other way round, the doorbells our peers ring us through reach us when
the supervisor says the set changed: our event loop's scan calls
:meth:`Xen.refresh_doorbells`, which fetches the new ones.
"""

from __future__ import annotations

import errno
import os
import threading
from dataclasses import dataclass, field
from typing import Any

from xmp.domid import DOMID_SELF
from xmp.errors import HypercallError
from xmp.hypercall import MAX_FDS, Channel
from xmp.sharedmem.evtchn import Doorbell, EventChannels
from xmp.sharedmem.shm import PAGE_SIZE, ShmObject


@dataclass
class GrantMapping:
    """Pages of another domain mapped after map_grant_ref (dom0 only).

    Each run of consecutive frames is one mmap (``maps``), so pages the
    granter holds side by side -- a multi-page ring, a data buffer -- are
    one buffer here too (:meth:`contiguous`); ``pages[i]`` is ref i's page."""

    handle: int
    granter: int
    refs: list[int]
    readonly: bool = False   # mapped PROT_READ through a read-only descriptor
    pages: list = field(default_factory=list)
    maps: list = field(default_factory=list)
    where: list[tuple[int, int]] = field(default_factory=list)  # page i: (index in maps, page in it)

    def contiguous(self) -> memoryview | None:
        """All the pages as one buffer, or None when they are not one run."""
        if len(self.maps) != 1:
            return None
        return memoryview(self.maps[0])


class Xen:
    def __init__(self, channel: Channel, domid: int, evt: EventChannels):
        self.ch = channel
        self.domid = domid
        self.evt = evt
        # peer domid -> (our doorbell into it, its wake page, the sender's face)
        self._peers: dict[int, tuple[ShmObject, ShmObject, Doorbell]] = {}
        self._route: dict[int, tuple[EventChannels | Doorbell, int, int]] = {}
        evt.refresh = self.refresh_doorbells
        # (granter, writable) -> its RAM's descriptor of that kind: read-only
        # maps go through an O_RDONLY one, so they can never be made writable
        self._foreign: dict[tuple[int, bool], ShmObject] = {}
        self._port_peer: dict[int, int] = {}
        self._ipis: set[int] = set()   # our own IPI ports: raised in our own shared_info
        # dom0's services call from more than one thread: the caches are shared
        self._lock = threading.RLock()
        self._live_granters: set[int] = set()

    def call(self, op: str, cmd: str = "", **args: Any) -> Any:
        return self.ch.call(op, cmd, **args)

    # -- event channels ------------------------------------------------------

    def alloc_unbound(self, remote_dom: int, dom: int = DOMID_SELF) -> int:
        return self.call("event_channel_op", "alloc_unbound", dom=dom, remote_dom=remote_dom)

    def bind_interdomain(self, remote_dom: int, remote_port: int) -> int:
        ret, fds = self.ch.call_with_fds("event_channel_op", "bind_interdomain", remote_dom=remote_dom,
                                         remote_port=remote_port, have_evt=remote_dom in self._peers)
        self._learn(ret, fds)
        return ret["port"]

    def bind_virq(self, virq: int, vcpu: int = 0) -> int:
        return self.call("event_channel_op", "bind_virq", virq=virq, vcpu=vcpu)

    def bind_ipi(self, vcpu: int = 0) -> int:
        port = self.call("event_channel_op", "bind_ipi", vcpu=vcpu)
        self._ipis.add(port)
        return port

    def bind_vcpu(self, port: int, vcpu: int) -> None:
        """EVTCHNOP_bind_vcpu: deliver ``port`` to ``vcpu`` from now on."""
        self.call("event_channel_op", "bind_vcpu", port=port, vcpu=vcpu)

    def close(self, port: int) -> None:
        self._ipis.discard(port)
        self._route.pop(port, None)
        self._port_peer.pop(port, None)
        self.call("event_channel_op", "close", port=port)

    def status(self, port: int, dom: int = DOMID_SELF) -> dict:
        return self.call("event_channel_op", "status", port=port, dom=dom)

    def unmask(self, port: int, vcpu: int = 0) -> None:
        self.evt.unmask(port, vcpu)  # our own shared_info: no hypercall needed

    def notify(self, port: int) -> None:
        # Under the lock: another thread of this domain (dom0's xenstored
        # socket thread, xenconsoled) may forget the peer and unmap its
        # event page meanwhile -- sending into it then would fault.
        with self._lock:
            if port in self._ipis:  # EVTCHNOP_send on an IPI: no round trip needed
                self.evt.send(port)
                return
            route = self._route.get(port)
            if route is not None:
                evt, remote_port, vcpu = route
                evt.send(remote_port, vcpu)
                return
        ret, fds = self.ch.call_with_fds("event_channel_op", "send", port=port,
                                         have_evt=self._peer_of_port(port) in self._peers)
        if ret:
            self._learn(ret, fds)

    def _peer_of_port(self, port: int) -> int:
        return self._port_peer.get(port, -1)

    def _learn(self, info: dict, fds: list[int]) -> None:
        with self._lock:
            self._learn_locked(info, fds)

    def _learn_locked(self, info: dict, fds: list[int]) -> None:
        remote = info["remote_dom"]
        if len(fds) == 2 and remote not in self._peers and remote != self.domid:
            db, wake = ShmObject.from_fd(fds[0]), ShmObject.from_fd(fds[1])
            try:
                self._peers[remote] = (db, wake, Doorbell(db.map(), wake.map(writable=False)))
            except BaseException:
                db.close()
                wake.close()
                raise
        else:
            for fd in fds:  # we hold them already (another thread asked too): keep those
                os.close(fd)
        evt: EventChannels | Doorbell
        if remote == self.domid:
            evt = self.evt
        elif remote in self._peers:
            evt = self._peers[remote][2]
        else:
            return  # the peer has not sealed its wake page yet: the slow path, for now
        self._route[info["port"]] = (evt, info["remote_port"], info["remote_vcpu"])
        self._port_peer[info["port"]] = remote

    def refresh_doorbells(self) -> None:
        """Fetch the doorbells peers ring us through that we lack, and let
        go of those of peers that have gone.  Called by our event loop's
        scan when the supervisor says the set changed."""
        while True:
            have = self.evt.doorbell_senders()
            with self._lock:
                peers = sorted(set(self._peers) | self._live_granters | {d for d, _ in self._foreign})
            ret, fds = self.ch.call_with_fds("event_channel_op", "doorbells", have=have, peers=peers)
            if not isinstance(ret, dict):
                for fd in fds:
                    os.close(fd)
                return
            for sender, fd in zip(ret["new"], fds, strict=False):
                obj = ShmObject.from_fd(fd)
                self.evt.attach_doorbell(sender, obj.map(), closer=obj.close)
            for fd in fds[len(ret["new"]):]:
                os.close(fd)
            # The hypervisor drops a sender's doorbells only when it destroys it
            # (and then bumps the generation of every domain that rang it or was
            # rung by it): what we hold of a dead peer goes -- its doorbell into
            # us, ours into it and its wake page, its RAM once nothing maps it.
            for peer in (set(have) - set(ret["senders"])) | set(ret.get("gone", ())):
                self.forget_domain(peer)
            if len(ret["new"]) < MAX_FDS:  # else there may be more
                return

    def forget_domain(self, domid: int) -> None:
        """Drop what we hold of a domain that has gone."""
        with self._lock:
            self._forget_locked(domid)

    def _forget_locked(self, domid: int) -> None:
        self._live_granters.discard(domid)
        for port in [p for p, peer in self._port_peer.items() if peer == domid]:
            self._route.pop(port, None)
            del self._port_peer[port]
        peer = self._peers.pop(domid, None)
        if peer is not None:
            _close_peer(peer)
        self.evt.detach_doorbell(domid)  # closed once our loop has let go of it
        for key in [(domid, False), (domid, True)]:
            obj = self._foreign.get(key)
            if obj is not None and not obj._maps:  # another service may still map pages of it
                del self._foreign[key]
                obj.close()

    # -- grant tables ----------------------------------------------------------

    def map_grant_ref(self, granter: int, refs: list[int], readonly: bool = False) -> GrantMapping:
        key = (granter, not readonly)
        for _ in range(3):
            ret, fds = self.ch.call_with_fds("grant_table_op", "map_grant_ref", dom=granter, refs=list(refs),
                                             readonly=readonly, have_ram=key in self._foreign)
            with self._lock:
                self._live_granters.add(granter)
                for fd in fds:
                    if key in self._foreign:  # another thread got it meanwhile: keep that one
                        os.close(fd)
                    else:
                        self._foreign[key] = ShmObject.from_fd(fd)
                if key in self._foreign:
                    return self._map_frames(ret, granter, refs, readonly, self._foreign[key])
            # We said we held its RAM, and another thread forgot the granter
            # meanwhile (xenstored releasing it as xenconsoled takes its last
            # words): give the grant back and ask again, descriptor included.
            self.call("grant_table_op", "unmap_grant_ref", handle=ret["handle"])
        raise HypercallError(errno.ESRCH, "map_grant_ref", f"dom{granter} keeps being forgotten meanwhile")

    def _map_frames(self, ret: dict, granter: int, refs: list[int], readonly: bool,
                    obj: ShmObject) -> GrantMapping:
        """mmap the frames the hypervisor named (lock held)."""
        frames = ret["frames"]
        maps: list = []
        pages: list = []
        where: list[tuple[int, int]] = []
        i = 0
        while i < len(frames):
            n = 1
            while i + n < len(frames) and frames[i + n] == frames[i] + n:
                n += 1
            m = obj.map(frames[i], n, writable=not readonly)
            where += [(len(maps), k) for k in range(n)]
            maps.append(m)
            pages += [m] if n == 1 else [memoryview(m)[k * PAGE_SIZE:(k + 1) * PAGE_SIZE]
                                         for k in range(n)]
            i += n
        return GrantMapping(ret["handle"], granter, list(refs), readonly, pages, maps, where)

    def unmap_grant_ref(self, mapping: GrantMapping) -> None:
        with self._lock:
            key = (mapping.granter, not mapping.readonly)
            obj = self._foreign.get(key)
            for page in mapping.pages:
                if isinstance(page, memoryview):
                    page.release()
            for m in mapping.maps:
                if obj is not None and m in obj._maps:
                    obj._maps.remove(m)
                m.close()
            if obj is not None and not obj._maps and mapping.granter not in self._live_granters:
                del self._foreign[key]  # forgotten already: its last mapping is gone
                obj.close()
        mapping.pages.clear()
        mapping.maps.clear()
        mapping.where.clear()
        self.call("grant_table_op", "unmap_grant_ref", handle=mapping.handle)

    def grant_copy(self, ops: list[dict]) -> list[int]:
        return self.call("grant_table_op", "copy", ops=ops)

    def grant_copy_records(self, pfn: int, count: int) -> None:
        """GNTTABOP_copy of ``count`` struct gnttab_copy records at our
        ``pfn`` (:data:`xmp.sharedmem.grant.GNTTAB_COPY`); the statuses
        come back in the records."""
        self.call("grant_table_op", "copy", frame=pfn, count=count)

    def setup_table(self, nr_frames: int) -> list[int]:
        return self.call("grant_table_op", "setup_table", nr_frames=nr_frames)

    def query_size(self) -> dict:
        return self.call("grant_table_op", "query_size")

    # -- memory, scheduling, time, console -------------------------------------

    def decrease_reservation(self, pfns: list[int]) -> int:
        return self.call("memory_op", "decrease_reservation", extent_start=list(pfns))

    def populate_physmap(self, pfns: list[int]) -> int:
        return self.call("memory_op", "populate_physmap", extent_start=list(pfns))

    def current_reservation(self) -> int:
        return self.call("memory_op", "current_reservation")

    def maximum_reservation(self) -> int:
        return self.call("memory_op", "maximum_reservation")

    def set_timer_op(self, deadline_ns: int, vcpu: int = 0) -> None:
        self.call("set_timer_op", timeout=deadline_ns, vcpu=vcpu)

    def shutdown(self, reason: str) -> None:
        self.call("sched_op", "shutdown", reason=reason)

    def sched_yield(self) -> None:
        self.call("sched_op", "yield")

    def console_io(self, text: str) -> None:
        self.call("console_io", "write", data=text)

    def xen_version(self) -> dict:
        return self.call("xen_version")

    def domctl(self, cmd: str, **args: Any) -> Any:
        return self.call("domctl", cmd, **args)


def _close_peer(peer: tuple[ShmObject, ShmObject, Doorbell]) -> None:
    db, wake, face = peer
    face.release()
    db.close()
    wake.close()
