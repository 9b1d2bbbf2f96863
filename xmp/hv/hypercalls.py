"""Hypercall handlers: one method per (op, cmd), named ``hc_<op>_<cmd>``.

Each takes the calling domain (known by its channel) and the decoded
arguments, and returns ``(ret, fds)``.  Failures raise HypercallError with
Xen's errno, or GrantError with a GNTST status; the dispatcher turns both
into a reply and the caller alone sees them.  The supervisor's state
(domain table, host pool, timers) belongs to :class:`xmp.hypervisor.Supervisor`,
which mixes this class in.
"""

from __future__ import annotations

import base64
import binascii
import errno
import time
from collections.abc import Callable
from typing import Any

from xmp.domid import DOMID_DOM0, DOMID_SELF
from xmp.errors import GrantError, HypercallError
from xmp.hv.domain import Domain, DomState, Mapping
from xmp.hv.hvm import XEN_VERSION_MAJOR, XEN_VERSION_MINOR, HvmOps
from xmp.hv.logdirty import LogDirtyOps
from xmp.hv.vcpu import VcpuOps
from xmp.hypercall import DOMAININFO_PAGE, HYPERCALLS, MAX_FDS, SHUTDOWN_REASONS, arg, int_list
from xmp.sharedmem._ffi import lib
from xmp.sharedmem.evtchn import (
    DOORBELL_SIZE,
    VIRQ_DOM_EXC,
    PortState,
    bind_interdomain,
    close_port,
)
from xmp.sharedmem.grant import GNTTAB_COPY, ActiveGrants, CopyBatch, GNTCOPY_dest_gref, copy_records
from xmp.sharedmem.shm import PAGE_SIZE, ShmNamespace, ShmObject
from xmp.sharedmem.wakepage import reopen_readonly, wake_page_sealed

XEN_VERSION = {"major": XEN_VERSION_MAJOR, "minor": XEN_VERSION_MINOR, "extra": "-xmp",
               "capabilities": "xen-3.0-x86_64 xmp"}
Reply = tuple[Any, list[int]]
MAX_SUSPEND_CONTEXT = 16384  # bytes: a small context; the guest's state lives in its RAM
DEFERRED = object()  # a handler's "no reply now": the caller waits (a suspended guest)


class HypercallHandlers(LogDirtyOps, HvmOps, VcpuOps):
    domains: dict[int, Domain]
    HYPERCALLS: dict[str, dict[str, Callable[..., Reply]]]
    ns: ShmNamespace

    # Provided by the supervisor.
    def lookup(self, domid: int, op: str) -> Domain:
        raise NotImplementedError
    def log(self, msg: str) -> None: ...
    def console_line(self, dom: Domain, text: str, serial: bool = False) -> None: ...
    def create_domain(self, cfg_dict: dict) -> Domain:
        raise NotImplementedError
    def destroy_domain(self, dom: Domain, reason: str = "destroyed") -> None: ...
    def pause_domain(self, dom: Domain) -> None: ...
    def unpause_domain(self, dom: Domain) -> None: ...
    def domain_info(self, dom: Domain) -> dict:
        raise NotImplementedError
    def set_timer(self, dom: Domain, vcpu: int, deadline_ns: int) -> None: ...
    def shutdown_requested(self, dom: Domain, reason: str) -> None: ...
    def pool_take(self, pages: int, op: str) -> None: ...
    def pool_give(self, pages: int) -> None: ...

    def _target(self, caller: Domain, args: dict, op: str, name: str = "dom") -> Domain:
        domid = arg(args, name, int, op, DOMID_SELF)
        if domid in (DOMID_SELF, caller.domid):
            return caller
        if not caller.privileged:
            raise HypercallError(errno.EPERM, op, f"dom{caller.domid} may not act on dom{domid}")
        return self.lookup(domid, op)

    # -- domctl (dom0 only; the dispatcher enforces it) --------------------

    def hc_domctl_createdomain(self, caller: Domain, args: dict) -> Reply:
        dom = self.create_domain(arg(args, "config", dict, "createdomain"))
        return dom.domid, []

    def hc_domctl_destroydomain(self, caller: Domain, args: dict) -> Reply:
        self.destroy_domain(self.lookup(arg(args, "domid", int, "destroydomain"), "destroydomain"))
        return 0, []

    def hc_domctl_pausedomain(self, caller: Domain, args: dict) -> Reply:
        self.pause_domain(self.lookup(arg(args, "domid", int, "pausedomain"), "pausedomain"))
        return 0, []

    def hc_domctl_unpausedomain(self, caller: Domain, args: dict) -> Reply:
        self.unpause_domain(self.lookup(arg(args, "domid", int, "unpausedomain"), "unpausedomain"))
        return 0, []

    def hc_domctl_getdomaininfo(self, caller: Domain, args: dict) -> Reply:
        """One domain's record; the list is sysctl getdomaininfolist (a reply
        that grows with the domain count would outgrow the channel)."""
        domid = arg(args, "domid", int, "getdomaininfo", None)
        if domid is None:
            raise HypercallError(errno.EINVAL, "getdomaininfo",
                                 "name a domid; sysctl getdomaininfolist pages through them all")
        return self.domain_info(self.lookup(domid, "getdomaininfo")), []

    # -- sysctl (dom0 only) --------------------------------------------------

    def hc_sysctl_getdomaininfolist(self, caller: Domain, args: dict) -> Reply:
        """XEN_SYSCTL_getdomaininfolist: up to ``max_domains`` records of
        domains numbered ``first_domain`` or above, in id order."""
        op = "getdomaininfolist"
        first = arg(args, "first_domain", int, op, 0)
        count = arg(args, "max_domains", int, op, DOMAININFO_PAGE)
        if first < 0 or not 1 <= count <= DOMAININFO_PAGE:
            raise HypercallError(errno.EINVAL, op, f"first_domain >= 0, max_domains 1..{DOMAININFO_PAGE}")
        doms = sorted((d for d in self.domains.values() if d.domid >= first), key=lambda d: d.domid)[:count]
        for d in doms:
            if d.state == DomState.DYING:
                d.seen_dying = True  # dom0 lets go of it now (see reap_dying)
        return [self.domain_info(d) for d in doms], []

    def hc_domctl_max_mem(self, caller: Domain, args: dict) -> Reply:
        dom = self.lookup(arg(args, "domid", int, "max_mem"), "max_mem")
        pages = arg(args, "max_memkb", int, "max_mem") * 1024 // PAGE_SIZE
        if not dom.tot_pages <= pages <= len(dom.populated):
            raise HypercallError(errno.EINVAL, "max_mem",
                                 f"{pages} pages is below the current reservation or above maxmem")
        dom.max_pages = pages
        return 0, []

    # -- memory_op ---------------------------------------------------------

    def hc_memory_op_current_reservation(self, caller: Domain, args: dict) -> Reply:
        return self._target(caller, args, "current_reservation", "domid").tot_pages, []

    def hc_memory_op_maximum_reservation(self, caller: Domain, args: dict) -> Reply:
        return self._target(caller, args, "maximum_reservation", "domid").max_pages, []

    def hc_memory_op_decrease_reservation(self, caller: Domain, args: dict) -> Reply:
        """Ballooning out: the pages are punched out of the RAM object, so
        the host really gets them back.  A page another domain has mapped
        is not taken (Xen would keep it for the mapper; a hole here would
        pull it from under the mapping)."""
        dom = self._target(caller, args, "decrease_reservation", "domid")
        pfns = int_list(args, "extent_start", "decrease_reservation", limit=1 << 20)
        mapped = {f for d in self.domains.values() for m in d.maptrack.values()
                  if m.granter == dom.domid for f in m.frames}
        done = 0
        for pfn in pfns:
            if pfn >= len(dom.populated) or not dom.populated[pfn] or pfn < dom.reserved_pfns \
                    or pfn in mapped:
                break  # Xen stops at the first bad extent and returns the count done
            rc = lib.xmp_punch_hole(dom.ram.fd, pfn * PAGE_SIZE, PAGE_SIZE)
            if rc:
                raise HypercallError(-rc, "decrease_reservation", f"punching pfn {pfn}")
            dom.populated[pfn] = 0
            done += 1
        dom.tot_pages -= done
        self.pool_give(done)
        return done, []

    def hc_memory_op_populate_physmap(self, caller: Domain, args: dict) -> Reply:
        dom = self._target(caller, args, "populate_physmap", "domid")
        pfns = int_list(args, "extent_start", "populate_physmap", limit=1 << 20)
        fresh = [p for p in dict.fromkeys(pfns) if p < len(dom.populated) and not dom.populated[p]]
        if len(fresh) != len(set(pfns)):
            raise HypercallError(errno.EINVAL, "populate_physmap", "pfn already populated or beyond maxmem")
        if dom.tot_pages + len(fresh) > dom.max_pages:
            raise HypercallError(errno.ENOMEM, "populate_physmap",
                                 f"would exceed the domain's maximum of {dom.max_pages} pages")
        self.pool_take(len(fresh), "populate_physmap")
        for pfn in fresh:
            dom.populated[pfn] = 1
        dom.tot_pages += len(fresh)
        return len(fresh), []

    def hc_memory_op_foreign_map(self, caller: Domain, args: dict) -> Reply:
        """xmp's back end of privcmd's IOCTL_PRIVCMD_MMAPBATCH_V2: dom0 maps
        ``pfns`` of domain ``dom`` (xenforeignmemory_map).  Refused (EPERM)
        to every other domain, as /dev/xen/privcmd is dom0's.  Returns one
        errno per pfn (0, or -ENOENT: not populated, ballooned out -- that
        page is not to be mapped) and the domain's RAM descriptor, O_RDONLY
        unless ``writable``."""
        op = "foreign_map"
        if not caller.privileged:
            raise HypercallError(errno.EPERM, op,
                                 f"dom{caller.domid} may not map foreign pages (only dom0 does)")
        dom = self.lookup(arg(args, "dom", int, op), op)
        pfns = int_list(args, "pfns", op, limit=1 << 16)
        if not pfns or any(not 0 <= p < len(dom.populated) for p in pfns):
            raise HypercallError(errno.EINVAL, op,
                                 f"pfns outside dom{dom.domid}'s {len(dom.populated)} pages")
        errs = [0 if dom.populated[p] else -errno.ENOENT for p in pfns]
        fd = dom.ram.fd if arg(args, "writable", bool, op, False) else dom.ram.readonly_fd()
        return {"errs": errs}, [fd]

    # -- grant_table_op ----------------------------------------------------

    def hc_grant_table_op_setup_table(self, caller: Domain, args: dict) -> Reply:
        n = arg(args, "nr_frames", int, "setup_table")
        if not 1 <= n <= caller.cfg.max_grant_frames:
            raise HypercallError(errno.EINVAL, "setup_table",
                                 f"nr_frames {n} outside 1..{caller.cfg.max_grant_frames}")
        caller.nr_grant_frames = max(caller.nr_grant_frames, n)
        from xmp.startinfo import GNTTAB_PFN

        return [GNTTAB_PFN + i for i in range(n)], []

    def hc_grant_table_op_query_size(self, caller: Domain, args: dict) -> Reply:
        dom = self._target(caller, args, "query_size")
        return {"nr_frames": dom.nr_grant_frames, "max_nr_frames": dom.cfg.max_grant_frames}, []

    def hc_grant_table_op_map_grant_ref(self, caller: Domain, args: dict) -> Reply:
        """dom0 only, as only Xen's dom0 maps foreign pages (privcmd): check
        the grants, pin them, and hand over the granter's memory descriptor
        (once per kind) so dom0 maps exactly those frames.  A read-only map
        gets a descriptor opened O_RDONLY, so no mapping made through it can
        ever be written; the writable one comes only with a writable grant.
        Every other domain -- driver domains included -- is refused (EPERM)
        and uses grant copy: a descriptor of a guest's whole RAM must not
        reach a process that is not dom0."""
        op = "map_grant_ref"
        if not caller.privileged:
            raise HypercallError(errno.EPERM, op,
                                 f"dom{caller.domid} may not map grants (only dom0 does): use grant copy")
        granter = self.lookup(arg(args, "dom", int, op), op)
        refs = int_list(args, "refs", op, limit=1024)
        readonly = bool(arg(args, "readonly", bool, op, False))
        # The caller says whether it still holds the descriptor of this kind
        # (it may have dropped it): asking again only gets it a duplicate.
        fds = []
        if not arg(args, "have_ram", bool, op, False):
            fds = [granter.ram.readonly_fd() if readonly else granter.ram.fd]
        frames = granter.grants.map_grant_ref(refs, caller.domid, readonly)
        handle = caller.next_handle
        caller.next_handle += 1
        caller.maptrack[handle] = Mapping(granter.domid, refs, readonly, frames)
        return {"handle": handle, "frames": frames, "ram_size": granter.ram.size}, fds

    def hc_grant_table_op_unmap_grant_ref(self, caller: Domain, args: dict) -> Reply:
        handle = arg(args, "handle", int, "unmap_grant_ref")
        m = caller.maptrack.pop(handle, None)
        if m is None:
            raise HypercallError(errno.EINVAL, "unmap_grant_ref", f"no mapping with handle {handle}")
        granter = self.domains.get(m.granter)
        if granter is not None:
            self.grant_unmapped(granter, m)
        return 0, []

    def hc_grant_table_op_copy(self, caller: Domain, args: dict) -> Reply:
        """GNTTABOP_copy, in either of two forms:

        * ``frame``, ``count``: as Xen takes it, ``count`` struct gnttab_copy
          records in the caller's own memory from pfn ``frame`` on; each
          status is written into its record and the call returns 0.  Read,
          checked and run in C: the fast form.
        * ``ops``: a JSON list of segments; returns a GNTST status for each
          (checked here, then copied in order by one call into C)."""
        if "frame" in args:
            frame, count = arg(args, "frame", int, "copy"), arg(args, "count", int, "copy")
            if not 1 <= count <= 512:
                raise HypercallError(errno.EINVAL, "copy", "1 to 512 segments per call")
            if not 0 <= frame or (frame * PAGE_SIZE + count * GNTTAB_COPY.size) > caller.ram.size:
                raise HypercallError(errno.EFAULT, "copy", f"{count} records at pfn {frame} leave its memory")
            ops = copy_records(caller.grants, caller.domid, frame * PAGE_SIZE, count, self._grants_of)
            if self.logdirty_domains:
                for i in range(count):
                    o = ops[i]
                    if o.status == 0:
                        dest = o.dest.u.ref if o.flags & GNTCOPY_dest_gref else None
                        self._copied_into(caller, o.dest.domid, dest, o.dest.u.gmfn)
            return 0, []
        ops = arg(args, "ops", list, "copy")
        if len(ops) > 512:
            raise HypercallError(errno.EINVAL, "copy", "at most 512 segments per call")
        batch = CopyBatch(len(ops))
        for i, seg in enumerate(ops):
            try:
                if not isinstance(seg, dict):
                    raise ValueError("segment")
                length = seg.get("len")
                if not isinstance(length, int) or isinstance(length, bool) or not 0 <= length <= PAGE_SIZE:
                    raise ValueError("len")
                batch.add(i, self._copy_side(caller, seg.get("source")),
                          self._copy_side(caller, seg.get("dest")), length)
            except GrantError as exc:
                batch.fail(i, exc.status)
            except (HypercallError, TypeError, ValueError):
                batch.fail(i, -10)  # GNTST_bad_copy_arg
        status = batch.run(caller.domid)
        if self.logdirty_domains:
            for seg, st in zip(ops, status, strict=True):
                if st == 0:
                    d = seg["dest"]
                    self._copied_into(caller, d["domid"], d.get("ref"), d.get("frame", 0))
        return status, []

    def _grants_of(self, domid: int) -> ActiveGrants | None:
        dom = self.domains.get(domid)
        return None if dom is None else dom.grants

    def _copy_side(self, caller: Domain, side: Any) -> tuple:
        """(table, offset, gref, frame) of one side of a segment, checked."""
        if not isinstance(side, dict):
            raise ValueError("segment side")
        domid, offset = side.get("domid"), side.get("offset", 0)
        if not isinstance(domid, int) or not isinstance(offset, int) or not 0 <= offset < PAGE_SIZE:
            raise ValueError("segment side")
        if "ref" in side:
            ref = side["ref"]
            if not isinstance(ref, int) or isinstance(ref, bool) or not 0 <= ref < 1 << 32:
                raise ValueError("ref")
            owner = caller if domid in (DOMID_SELF, caller.domid) else self.domains.get(domid)
            if owner is None:
                raise GrantError(domid, ref, -2, "grant_copy")  # GNTST_bad_domain
            return owner.grants, offset, ref, None
        if domid not in (DOMID_SELF, caller.domid):
            raise GrantError(domid, -1, -8, "grant_copy")  # a frame of someone else's memory
        frame = side.get("frame")
        if not isinstance(frame, int) or isinstance(frame, bool) or not 0 <= frame < len(caller.populated):
            raise ValueError("frame")
        return caller.grants, offset, None, frame

    # -- event_channel_op --------------------------------------------------

    def hc_event_channel_op_alloc_unbound(self, caller: Domain, args: dict) -> Reply:
        dom = self._target(caller, args, "alloc_unbound")
        remote = arg(args, "remote_dom", int, "alloc_unbound")
        if remote == DOMID_SELF:
            remote = dom.domid
        if not 0 <= remote < DOMID_SELF:
            raise HypercallError(errno.EINVAL, "alloc_unbound", f"remote_dom {remote}")
        return dom.ports.alloc_unbound(remote), []

    def hc_event_channel_op_bind_interdomain(self, caller: Domain, args: dict) -> Reply:
        op = "bind_interdomain"
        remote_dom = arg(args, "remote_dom", int, op)
        remote = caller if remote_dom in (DOMID_SELF, caller.domid) else self.domains.get(remote_dom)
        if remote is None or remote.state == DomState.DYING:
            raise HypercallError(errno.ESRCH, op, f"no domain {remote_dom}")
        remote_port = arg(args, "remote_port", int, op)
        port = bind_interdomain(caller.ports, remote.ports, remote_port)
        # only the other end's doorbell may raise either port
        caller.evt.set_owner(port, remote.domid)
        remote.evt.set_owner(remote_port, caller.domid)
        caller.evt.send(port)  # Xen marks a freshly bound port pending
        return self._peer_reply(caller, port, remote, remote_port, bool(args.get("have_evt")))

    def _peer_reply(self, caller: Domain, port: int, remote: Domain, remote_port: int,
                    have_evt: bool) -> Reply:
        """What the caller needs to notify ``remote_port`` itself (the fast
        path): the peer's vCPU and, unless it has them, its doorbell into
        the peer and the peer's wake page read-only.  Never the peer's
        event object.  Until the peer has sealed its wake page (it does at
        boot) the caller gets no descriptors and keeps asking us."""
        fds: list[int] = []
        if not have_evt and remote.domid != caller.domid:
            ro = self._wake_ro(remote)
            if ro >= 0:
                fds = [self._doorbell(remote, caller).fd, ro]
        vcpu = remote.ports.get(remote_port).vcpu
        return {"port": port, "remote_dom": remote.domid, "remote_port": remote_port,
                "remote_vcpu": vcpu}, fds

    def _wake_ro(self, dom: Domain) -> int:
        """A read-only descriptor of ``dom``'s wake page once it is sealed
        (a sealed page cannot be made writable again by reopening it)."""
        if dom.wake_ro_fd < 0 and dom.wake_fd >= 0 and wake_page_sealed(dom.wake_fd):
            dom.wake_ro_fd = reopen_readonly(dom.wake_fd)
        return dom.wake_ro_fd

    def _doorbell(self, receiver: Domain, sender: Domain) -> ShmObject:
        """The doorbell ``sender`` rings ``receiver`` through, made on first
        use; the receiver is told to fetch it."""
        obj = receiver.doorbells.get(sender.domid)
        if obj is None:
            obj = ShmObject.create(self.ns, f"db{receiver.domid}-{sender.domid}", DOORBELL_SIZE)
            receiver.doorbells[sender.domid] = obj
            receiver.evt.attach_doorbell(sender.domid, obj.map())
            receiver.evt.sync(drain=True)
            receiver.evt.bump_generation()
        return obj

    def drop_doorbells(self, dom: Domain) -> None:
        """``dom`` is being destroyed: no doorbell from or to it is read any
        more; receivers are told to let go of theirs."""
        for other in self.domains.values():
            obj = other.doorbells.pop(dom.domid, None)
            if obj is not None and other is not dom:
                other.evt.detach_doorbell(dom.domid)
                other.evt.sync(drain=True)
                obj.close()
                other.evt.bump_generation()
        for sender in list(dom.doorbells):
            dom.evt.detach_doorbell(sender)
            peer = self.domains.get(sender)
            if peer is not None and peer is not dom:
                peer.evt.bump_generation()  # it rang dom: its refresh hears dom has gone
        dom.evt.sync(drain=True)
        for obj in dom.doorbells.values():
            obj.close()
        dom.doorbells.clear()

    def hc_event_channel_op_doorbells(self, caller: Domain, args: dict) -> Reply:
        """xmp's own: the doorbells the caller's peers ring it through.
        ``have`` names the senders whose doorbell it holds; the reply lists
        every live sender and brings, in ``new`` order, the ones it lacks
        (at most MAX_FDS a call: it asks again for the rest).  ``gone``:
        which of the domains named in ``peers`` (those it holds anything
        of) have been destroyed -- it may let go of them."""
        have = set(int_list(args, "have", "doorbells", limit=1 << 16))
        peers = int_list(args, "peers", "doorbells", limit=1 << 16) if "peers" in args else []
        senders = sorted(caller.doorbells)
        new = [d for d in senders if d not in have][:MAX_FDS]
        gone = sorted({d for d in peers if d not in self.domains or self.domains[d].state == DomState.DYING})
        return {"senders": senders, "new": new, "gone": gone}, [caller.doorbells[d].fd for d in new]

    def hc_event_channel_op_bind_virq(self, caller: Domain, args: dict) -> Reply:
        virq, vcpu = arg(args, "virq", int, "bind_virq"), arg(args, "vcpu", int, "bind_virq", 0)
        if not 0 <= vcpu < caller.cfg.maxvcpus:
            raise HypercallError(errno.ENOENT, "bind_virq", f"no vcpu {vcpu}")
        port = caller.ports.bind_virq(virq, vcpu)
        caller.evt.set_vcpu(port, vcpu)
        return port, []

    def hc_event_channel_op_bind_ipi(self, caller: Domain, args: dict) -> Reply:
        vcpu = arg(args, "vcpu", int, "bind_ipi", 0)
        if not 0 <= vcpu < caller.cfg.maxvcpus:
            raise HypercallError(errno.ENOENT, "bind_ipi", f"no vcpu {vcpu}")
        port = caller.ports.bind_ipi(vcpu)
        caller.evt.set_vcpu(port, vcpu)
        return port, []

    def hc_event_channel_op_close(self, caller: Domain, args: dict) -> Reply:
        port = arg(args, "port", int, "close")
        self.close_port(caller, port)
        return 0, []

    def close_port(self, dom: Domain, port: int) -> None:
        p = dom.ports.get(port, "close")
        peers = {d.domid: d.ports for d in self.domains.values()}
        close_port(dom.ports, port, peers)
        dom.evt.set_owner(port, None)
        dom.evt.set_vcpu(port, 0)
        if p.state == PortState.INTERDOMAIN:
            peer = self.domains.get(p.remote_dom)
            if peer is not None:
                peer.evt.set_owner(p.remote_port, None)  # unbound again: no doorbell raises it
                # Let it notice (handlers re-check on any event).  Clear first: a
                # sender killed between setting the pending bit and the selector
                # would otherwise leave the port pending and never delivered.
                peer.evt.clear(p.remote_port)
                peer.evt.send(p.remote_port, peer.ports.get(p.remote_port).vcpu)

    def hc_event_channel_op_status(self, caller: Domain, args: dict) -> Reply:
        dom = self._target(caller, args, "status")
        p = dom.ports.get(arg(args, "port", int, "status"), "status")
        return {"status": int(p.state), "state": p.state.name.lower(), "vcpu": p.vcpu,
                "remote_dom": p.remote_dom, "remote_port": p.remote_port, "virq": p.virq}, []

    def hc_event_channel_op_unmask(self, caller: Domain, args: dict) -> Reply:
        port = arg(args, "port", int, "unmask")
        caller.evt.unmask(port, caller.ports.get(port, "unmask").vcpu)
        return 0, []

    def hc_event_channel_op_send(self, caller: Domain, args: dict) -> Reply:
        """The slow path of a notify: deliver, and tell the caller how to do
        it itself next time."""
        port = arg(args, "port", int, "send")
        p = caller.ports.get(port, "send")
        if p.state == PortState.INTERDOMAIN:
            peer = self.domains.get(p.remote_dom)
            if peer is None:
                return None, []
            vcpu = peer.ports.get(p.remote_port).vcpu
            peer.evt.send(p.remote_port, vcpu)
            return self._peer_reply(caller, port, peer, p.remote_port, bool(args.get("have_evt")))
        if p.state == PortState.IPI:
            caller.evt.send(port, p.vcpu)
            return None, []
        if p.state == PortState.UNBOUND:
            return None, []  # Xen drops it silently
        raise HypercallError(errno.EINVAL, "send", f"port {port} is {p.state.name.lower()}")

    # -- sched_op, timers, console, version --------------------------------

    def hc_sched_op_yield(self, caller: Domain, args: dict) -> Reply:
        return 0, []

    def hc_sched_op_block(self, caller: Domain, args: dict) -> Reply:
        return 0, []  # the domain blocks on its own upcall semaphore

    def hc_sched_op_shutdown(self, caller: Domain, args: dict) -> Reply:
        reason = arg(args, "reason", str, "shutdown")
        if reason not in SHUTDOWN_REASONS:
            raise HypercallError(errno.EINVAL, "shutdown", f"reason {reason!r}")
        if reason == "suspend":
            # The guest kernel's small context (what its suspend hook returned),
            # kept as Xen keeps a suspended vCPU's context for the toolstack.
            text = arg(args, "context", str, "shutdown", "")
            try:
                context = base64.b64decode(text, validate=True)
            except (ValueError, binascii.Error):
                raise HypercallError(errno.EINVAL, "shutdown", "context is not base64") from None
            if len(context) > MAX_SUSPEND_CONTEXT:
                raise HypercallError(errno.E2BIG, "shutdown", f"a suspend context of {len(context)} bytes "
                                     f"exceeds {MAX_SUSPEND_CONTEXT}")
            caller.suspend_context = context
        self.shutdown_requested(caller, reason)
        if reason == "suspend":
            return DEFERRED, []  # the guest sleeps in this call until resume (or is saved)
        return 0, []

    def hc_set_timer_op_(self, caller: Domain, args: dict) -> Reply:
        deadline = arg(args, "timeout", int, "set_timer_op")
        vcpu = arg(args, "vcpu", int, "set_timer_op", 0)
        if not 0 <= vcpu < caller.cfg.maxvcpus or deadline < 0:
            raise HypercallError(errno.EINVAL, "set_timer_op", "bad vcpu or timeout")
        self.set_timer(caller, vcpu, deadline)
        return 0, []

    def hc_console_io_write(self, caller: Domain, args: dict) -> Reply:
        text = arg(args, "data", str, "console_io")
        self.console_line(caller, text[:4096])
        return len(text), []

    def hc_xen_version_(self, caller: Domain, args: dict) -> Reply:
        return dict(XEN_VERSION), []

    # -- dom0 notification -------------------------------------------------

    def raise_dom_exc(self) -> None:
        dom0 = self.domains.get(DOMID_DOM0)
        if dom0 is not None:
            port = dom0.ports.virq_port(VIRQ_DOM_EXC)
            if port is not None:
                dom0.evt.send(port)

    @staticmethod
    def now_ns() -> int:
        return time.monotonic_ns()


def handler_table(cls: type) -> dict[str, dict[str, Callable[..., Reply]]]:
    """Every hypercall ``cls`` serves, from its ``hc_<op>_<cmd>`` methods:
    the one list of what exists (the decoder refuses the rest, ENOSYS)."""
    table: dict[str, dict[str, Callable[..., Reply]]] = {op: {} for op in HYPERCALLS}
    for attr in dir(cls):
        if attr.startswith("hc_"):
            op = max((o for o in HYPERCALLS if attr[3:].startswith(o + "_")), key=len)
            table[op][attr[4 + len(op):]] = getattr(cls, attr)
    return table


HypercallHandlers.HYPERCALLS = handler_table(HypercallHandlers)
