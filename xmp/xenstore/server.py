"""The xenstore server: ``handle(conn, request)`` -> replies, events, actions.

Sans-I/O, after tools/xenstored (core.c, domain.c, watch.c, transaction.c)
and docs/misc/xenstore.txt.  The transport (daemon) owns sockets, ring
pages and event channels; it feeds whole :class:`Packet` objects to
:meth:`XenStore.handle`, drains :meth:`Connection.take` for every connection
in :meth:`XenStore.dirty`, and carries out the returned actions:

* :class:`Introduce` -- map the domain's ring page, bind its port, then call
  :meth:`XenStore.connect` for it;
* :class:`Release` -- unmap and unbind (the server has already forgotten
  the domain);
* :class:`Close` -- close that connection.

Order of checks for a request, as process_message() in core.c: unknown
type -> ENOSYS; privileged-only type from an unprivileged caller -> EACCES;
unknown tx_id (except for WATCH/UNWATCH, which ignore it) -> ENOENT; then
the operation itself.

Defences against a hostile domain (quotas as C xenstored's defaults):
nodes owned, node size, permissions per node, watches, transactions,
nodes touched per transaction, path length -- and XSA-326: a connection
that does not read its replies stops being read (``wants_requests()``) once
it has ``outstanding`` replies or ``output_bytes`` of output queued, and
watch events that would push it over ``output_bytes`` are dropped.
"""

from __future__ import annotations

import collections
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from xmp.domid import DOMID_FIRST_RESERVED, DOMID_SELF
from xmp.xenstore.store import (
    PERM_OWNER,
    PERM_READ,
    PERM_WRITE,
    SPECIAL_NODES,
    Node,
    Perm,
    Store,
    StoreError,
    Transaction,
    View,
    basename,
    canonicalize,
    domain_path,
    is_child,
    parent_of,
    parse_perms,
    perm_for,
    perms_to_bytes,
)
from xmp.xenstore.wire import (
    XENSTORE_PAYLOAD_MAX,
    XSD_ERRORS,
    Packet,
    XsType,
    decode_str,
    error_packet,
    watch_event,
)

__all__ = ["Action", "Close", "Connection", "Introduce", "Quota", "Release", "XenStore"]


# -- configuration and actions ----------------------------------------------


@dataclass
class Quota:
    """Per-domain limits (C xenstored's defaults).  Privileged connections
    are exempt, as in domain_max_chk()."""

    nodes: int = 1000            # nodes owned by the domain      -> ENOSPC
    node_size: int = 2048        # calc_node_acc_size of one node -> ENOSPC
    watches: int = 128           #                                -> E2BIG
    transactions: int = 10       # open at once                   -> ENOSPC
    outstanding: int = 20        # replies queued, unread: stop reading requests
    perms: int = 5               # entries in one SET_PERMS       -> ENOSPC
    output_bytes: int = 64 * 1024  # queued output (XSA-326): drop events, stop reading
    transaction_nodes: int = 1024  # nodes touched by one transaction -> ENOSPC
    path_max: int = 2048         # path length below /local/domain/<id>/ -> EINVAL


@dataclass(frozen=True)
class Introduce:
    domid: int
    mfn: int
    port: int


@dataclass(frozen=True)
class Release:
    domid: int


@dataclass(frozen=True, eq=False)
class Close:
    conn: Connection


Action = Introduce | Release | Close


@dataclass(frozen=True)
class Watch:
    path: str          # canonical (absolute or @special)
    token: str
    prefix_len: int    # stripped from event paths of a relative watch


# -- connections ---------------------------------------------------------------


class Connection:
    """One client: a dom0 socket or a domain's ring.

    ``out`` holds encoded packets (the first one possibly partly taken)
    waiting for the transport; ``out_bytes`` is their total size.
    """

    def __init__(self, conn_id: int, domid: int, privileged: bool, quota: Quota):
        self.id = conn_id
        self.domid = domid
        self.privileged = privileged
        self.quota = quota
        self.out: collections.deque[bytes] = collections.deque()
        self.out_bytes = 0
        self.closed = False
        self.dropped_events = 0
        self.watches: list[Watch] = []
        self.transactions: dict[int, Transaction] = {}
        self._next_tx_id = 1
        self._is_event: collections.deque[bool] = collections.deque()
        self._head_started = False
        self._outstanding = 0

    def __repr__(self) -> str:
        kind = "priv" if self.privileged else "dom"
        return f"<Connection {self.id} {kind} domid={self.domid}>"

    @property
    def outstanding(self) -> int:
        """Replies queued and not yet wholly taken by the transport."""
        return self._outstanding

    def wants_requests(self) -> bool:
        """False while too many replies wait unread (domain_can_read in
        domain.c): the transport must not read this peer's requests."""
        if self.closed:
            return False
        if self.privileged:
            return True
        return self._outstanding < self.quota.outstanding and self.out_bytes < self.quota.output_bytes

    def take(self, max_bytes: int) -> bytes:
        """Remove and return up to ``max_bytes`` of queued output."""
        chunks: list[bytes] = []
        room = max_bytes
        while self.out and room > 0:
            head = self.out[0]
            if len(head) <= room:
                chunks.append(head)
                room -= len(head)
                self.out.popleft()
                if not self._is_event.popleft():
                    self._outstanding -= 1
                self._head_started = False
            else:
                chunks.append(head[:room])
                self.out[0] = head[room:]
                self._head_started = True
                room = 0
        data = b"".join(chunks)
        self.out_bytes -= len(data)
        return data

    def _queue(self, pkt: Packet, is_event: bool) -> None:
        raw = pkt.encode()
        self.out.append(raw)
        self._is_event.append(is_event)
        self.out_bytes += len(raw)
        if not is_event:
            self._outstanding += 1

    def _queue_event(self, pkt: Packet, special: bool) -> bool:
        """send_event() in core.c: drop an event identical to one still
        wholly queued (not for @specials), or one over the output cap."""
        raw = pkt.encode()
        if not special:
            for i, (queued, ev) in enumerate(zip(self.out, self._is_event, strict=True)):
                if ev and queued == raw and not (i == 0 and self._head_started):
                    return False
        if not self.privileged and self.out_bytes + len(raw) > self.quota.output_bytes:
            self.dropped_events += 1
            return False
        self._queue(pkt, True)
        return True

    def _reset_output(self) -> None:
        self.out.clear()
        self._is_event.clear()
        self.out_bytes = 0
        self._outstanding = 0
        self._head_started = False


# -- the server ------------------------------------------------------------------


@dataclass
class _Event:
    path: str
    exact: bool
    node: Node | None = None          # the node as it was (for deletions)
    parent: Node | None = None
    old_perms: tuple[Perm, ...] | None = None


@dataclass
class _Request:
    conn: Connection
    pkt: Packet
    view: View
    tx: Transaction | None
    events: list[_Event] = field(default_factory=list)
    actions: list[Action] = field(default_factory=list)


_Handler = Callable[["XenStore", _Request], bytes]

# XS_FLAG_PRIV / XS_FLAG_NOTID of wire_funcs[] in core.c.
_PRIV_ONLY = frozenset({
    XsType.CONTROL, XsType.INTRODUCE, XsType.RELEASE, XsType.IS_DOMAIN_INTRODUCED,
    XsType.RESUME, XsType.SET_TARGET,
})
_NO_TX = frozenset({XsType.WATCH, XsType.UNWATCH})


class XenStore:
    """The whole daemon state: store, connections, watches, domains."""

    def __init__(self, quota: Quota | None = None, quota_overrides: dict[int, Quota] | None = None,
                 domain_exists: Callable[[int], bool] | None = None):
        self.quota = quota if quota is not None else Quota()
        # Asked before a domain is introduced (the daemon asks the hypervisor,
        # getdomaininfo); None: every domid exists (the pure store's tests).
        self.domain_exists = domain_exists
        self.quota_overrides = dict(quota_overrides or {})
        self.store = Store()
        self.connections: dict[int, Connection] = {}
        self.introduced: set[int] = set()
        self.targets: dict[int, int] = {}
        self._ids = itertools.count(1)
        self._dirty: set[Connection] = set()

    # -- connection management --------------------------------------------

    def quota_for(self, domid: int) -> Quota:
        return self.quota_overrides.get(domid, self.quota)

    def connect(self, domid: int, privileged: bool = False) -> Connection:
        conn = Connection(next(self._ids), domid, privileged, self.quota_for(domid))
        self.connections[conn.id] = conn
        return conn

    def disconnect(self, conn: Connection) -> None:
        """Forget ``conn``: its watches, transactions and queued output."""
        conn.watches.clear()
        conn.transactions.clear()
        conn._reset_output()
        conn.closed = True
        self.connections.pop(conn.id, None)
        self._dirty.discard(conn)

    def dirty(self) -> set[Connection]:
        out, self._dirty = self._dirty, set()
        return {c for c in out if not c.closed}

    def is_introduced(self, domid: int) -> bool:
        return domid == 0 or domid in self.introduced

    def release_domain(self, domid: int) -> list[Connection]:
        """RELEASE, or the domain died: drop its connections (watches first,
        so deleting its nodes fires nothing at it), delete the nodes it
        owns, strip it from every permission list (XSA-322: a later domain
        reusing the domid must not inherit them), fire @releaseDomain.
        Returns the connections dropped; the transport closes them."""
        dropped = [c for c in self.connections.values() if c.domid == domid and not c.privileged]
        for conn in dropped:
            self.disconnect(conn)
        was_introduced = domid in self.introduced
        self.introduced.discard(domid)
        self.targets.pop(domid, None)
        for d in [d for d, t in self.targets.items() if t == domid]:
            del self.targets[d]
        events = self._remove_domain_from_tree(domid)
        self._fire(None, events)
        if was_introduced:
            self._fire_special("@releaseDomain")
        return dropped

    def _remove_domain_from_tree(self, domid: int) -> list[_Event]:
        """domain_tree_remove() + the XSA-322 permission clean-up."""
        store = self.store
        view = View(store)
        events: list[_Event] = []
        for path in sorted(store.nodes):
            node = store.nodes.get(path)
            if node is None or path == "/":
                continue
            if node.owner == domid and path not in SPECIAL_NODES:
                events.extend(self._rm_subtree(view, path))
                continue
            kept = _strip_perms(node.perms, domid)
            if kept != node.perms:
                store.put(path, replace(node, perms=kept))
        # Open transactions must not commit stale perms naming it either.
        for conn in self.connections.values():
            for tx in conn.transactions.values():
                for path, n in tx.overlay.items():
                    if n is not None:
                        kept = _strip_perms(n.perms, domid)
                        if kept != n.perms:
                            tx.overlay[path] = replace(n, perms=kept)
        return events

    # -- request dispatch ---------------------------------------------------

    def handle(self, conn: Connection, pkt: Packet) -> list[Action]:
        """Process one request from ``conn``.  Replies and watch events go to
        the connections' ``out`` queues; actions for the transport return."""
        if conn.closed:
            return []
        if len(pkt.payload) > XENSTORE_PAYLOAD_MAX:
            # The parser never yields this; a transport that does is broken.
            self.disconnect(conn)
            return [Close(conn)]
        try:
            mtype = XsType(pkt.type)
        except ValueError:
            self._reply_error(conn, pkt, "ENOSYS")
            return []
        handler = _HANDLERS.get(mtype)
        if handler is None:
            self._reply_error(conn, pkt, "ENOSYS")
            return []
        if mtype in _PRIV_ONLY and not conn.privileged:
            self._reply_error(conn, pkt, "EACCES")
            return []
        tx: Transaction | None = None
        if mtype not in _NO_TX and pkt.tx_id != 0:
            tx = conn.transactions.get(pkt.tx_id)
            if tx is None:
                self._reply_error(conn, pkt, "ENOENT")
                return []
        quota = self.quota_for(conn.domid)
        view = View(self.store, tx, tx_nodes_max=None if conn.privileged else quota.transaction_nodes)
        req = _Request(conn, pkt, view, tx)
        try:
            payload = handler(self, req)
        except StoreError as e:
            self._reply_error(conn, pkt, e.errno_name)
            return req.actions
        # C xenstored queues watch events before the reply (fire_watches()
        # precedes send_ack()), except WATCH's own first event.
        self._fire(conn, req.events, queue_in=req.tx)
        if len(payload) > XENSTORE_PAYLOAD_MAX:
            self._reply_error(conn, pkt, "E2BIG")
        elif not conn.closed:
            conn._queue(Packet(pkt.type, pkt.req_id, pkt.tx_id, payload), False)
            self._dirty.add(conn)
        if mtype is XsType.WATCH and not conn.closed:
            # Fire once straight away, after the OK (do_watch in watch.c).
            w = conn.watches[-1]
            self._send_event(conn, w.path[w.prefix_len:], w.token)
        return req.actions

    def _reply_error(self, conn: Connection, pkt: Packet, name: str) -> None:
        if name not in XSD_ERRORS:
            name = "EINVAL"  # send_error(): untranslatable errnos become EINVAL
        conn._queue(error_packet(pkt, name), False)
        self._dirty.add(conn)

    # -- helpers used by the handlers ------------------------------------------

    def _perm(self, conn: Connection | None, perms: tuple[Perm, ...]) -> int:
        if conn is None:
            return perm_for(perms, 0, privileged=True)
        return perm_for(perms, conn.domid, privileged=conn.privileged, target=self.targets.get(conn.domid))

    def _canon(self, req: _Request, path: str, allow_special: bool = False) -> str:
        conn = req.conn
        return canonicalize(path, conn.domid, privileged=conn.privileged, allow_special=allow_special,
                            path_max=self.quota_for(conn.domid).path_max)

    def _get(self, req: _Request, name: str, perm: int) -> Node:
        """get_node() + errno_from_parents(): EACCES without ``perm``; for
        a missing node ENOENT only if the nearest ancestor grants ``perm``,
        so a node's existence does not leak to those who cannot see it."""
        node = req.view.get(name)
        if node is not None:
            if self._perm(req.conn, node.perms) & perm == perm:
                return node
            raise StoreError("EACCES")
        p = name
        ancestor: Node | None = None
        while p != "/":
            p = parent_of(p)
            ancestor = req.view.get(p)
            if ancestor is not None:
                break
        if ancestor is not None and self._perm(req.conn, ancestor.perms) & perm:
            raise StoreError("ENOENT")
        raise StoreError("EACCES")

    def _check_size(self, req: _Request, node: Node) -> None:
        if not req.conn.privileged and node.acc_size() > self.quota_for(req.conn.domid).node_size:
            raise StoreError("ENOSPC")

    def _create(self, req: _Request, name: str, value: bytes) -> Node:
        """create_node(): make ``name`` and its missing parents, which inherit
        their parent's permissions; an unprivileged creator owns them."""
        conn, view = req.conn, req.view
        missing = [name]
        p = name
        while True:
            p = parent_of(p)
            ancestor = view.get(p)
            if ancestor is not None:
                break
            missing.append(p)
        assert ancestor is not None  # "/" always exists
        if not conn.privileged:
            if view.owned(conn.domid) + len(missing) > self.quota_for(conn.domid).nodes:
                raise StoreError("ENOSPC")
        writes: list[tuple[str, Node]] = []
        parent_name, parent = p, ancestor
        for path in reversed(missing):
            parent = replace(parent, children=(*parent.children, basename(path)))
            writes.append((parent_name, parent))
            perms = parent.perms
            if not conn.privileged:
                perms = ((perms[0][0], conn.domid), *perms[1:])
            parent_name, parent = path, Node(perms=perms)
        node = replace(parent, value=value)
        writes.append((name, node))
        # Only the existing ancestor and the new leaf can be large.
        for _, n in (writes[0], writes[-1]):
            self._check_size(req, n)
        for path, n in writes:
            view.put(path, n)
        return node

    def _rm_subtree(self, view: View, name: str) -> list[_Event]:
        """rm_node(): delete ``name`` and below, unlink it from its parent.
        Events as delnode_sub(): exact ones for the nodes below, a subtree
        one for ``name`` itself, each judged by the node's own perms."""
        events: list[_Event] = []
        parent_name = parent_of(name)
        parent = view.get(parent_name)
        nodes = dict(view.subtree(name))
        for path, node in nodes.items():
            view.delete(path)
            up = nodes.get(parent_of(path), parent)
            events.append(_Event(path, exact=path != name, node=node, parent=up))
        if parent is not None:
            base = basename(name)
            view.put(parent_name, replace(parent, children=tuple(c for c in parent.children if c != base)))
        return events

    # -- watches ------------------------------------------------------------

    def _watch_permitted(self, conn: Connection, ev: _Event) -> bool:
        """watch_permitted() in watch.c: the node or its parent readable
        (or the node's old permissions, for a permission change)."""
        if ev.old_perms is not None and self._perm(conn, ev.old_perms) & PERM_READ:
            return True
        node = ev.node if ev.node is not None else self.store.nodes.get(ev.path)
        if node is None:
            return False
        if self._perm(conn, node.perms) & PERM_READ:
            return True
        if ev.path in SPECIAL_NODES:
            return False
        parent = ev.parent if ev.parent is not None else self.store.nodes.get(parent_of(ev.path))
        return parent is not None and bool(self._perm(conn, parent.perms) & PERM_READ)

    def _fire(self, origin: Connection | None, events: list[_Event],
              queue_in: Transaction | None = None) -> None:
        if queue_in is not None:
            for ev in events:
                # queue_watches(): a non-exact event replaces an exact one.
                queue_in.watch_queue[ev.path] = queue_in.watch_queue.get(ev.path, True) and ev.exact
            return
        for ev in events:
            for conn in list(self.connections.values()):
                if not conn.watches or not self._watch_permitted(conn, ev):
                    continue
                for w in conn.watches:
                    hit = ev.path == w.path if ev.exact else is_child(ev.path, w.path)
                    if hit:
                        self._send_event(conn, ev.path[w.prefix_len:], w.token)

    def _fire_special(self, name: str) -> None:
        self._fire(None, [_Event(name, exact=True)])

    def _send_event(self, conn: Connection, path: str, token: str) -> None:
        pkt = watch_event(path, token)
        if len(pkt.payload) > XENSTORE_PAYLOAD_MAX:
            return
        if conn._queue_event(pkt, special=path.startswith("@")):
            self._dirty.add(conn)

    # -- operations -----------------------------------------------------------

    def _read(self, req: _Request) -> bytes:
        return self._get(req, self._canon(req, _onearg(req.pkt)), PERM_READ).value

    def _directory(self, req: _Request) -> bytes:
        return self._get(req, self._canon(req, _onearg(req.pkt)), PERM_READ).children_bytes()

    def _directory_part(self, req: _Request) -> bytes:
        args = _strings(req.pkt.payload)
        if len(args) != 2:
            raise StoreError("EINVAL")
        node = self._get(req, self._canon(req, args[0]), PERM_READ)
        offset = _parse_uint(args[1])
        children = node.children_bytes()
        gen = str(node.generation).encode() + b"\0"
        if offset >= len(children):
            return gen + b"\0"
        # send_directory_part(): whole names only, the list ends with "\0".
        maxlen = XENSTORE_PAYLOAD_MAX - len(gen) - 1
        length = 0
        pos = offset
        while True:
            end = children.index(b"\0", pos)
            if length + (end - pos) >= maxlen:
                break
            length += end - pos + 1
            pos = end + 1
            if offset + length == len(children):
                break
        data = gen + children[offset:offset + length]
        if offset + length == len(children):
            data += b"\0"
        return data

    def _write(self, req: _Request) -> bytes:
        payload = req.pkt.payload
        nul = payload.find(b"\0")
        if nul < 0:
            raise StoreError("EINVAL")
        name = self._canon(req, decode_str(payload[:nul]))
        value = payload[nul + 1:]
        try:
            node = self._get(req, name, PERM_WRITE)
        except StoreError as e:
            if e.errno_name != "ENOENT":
                raise
            node = self._create(req, name, value)
        else:
            node = replace(node, value=value)
            self._check_size(req, node)
            req.view.put(name, node)
        req.events.append(_Event(name, exact=False))
        return b"OK\0"

    def _mkdir(self, req: _Request) -> bytes:
        name = self._canon(req, _onearg(req.pkt))
        try:
            self._get(req, name, PERM_WRITE)
        except StoreError as e:
            if e.errno_name != "ENOENT":
                raise
            self._create(req, name, b"")
            req.events.append(_Event(name, exact=False))
        return b"OK\0"

    def _rm(self, req: _Request) -> bytes:
        name = self._canon(req, _onearg(req.pkt))
        try:
            self._get(req, name, PERM_WRITE)
        except StoreError as e:
            if e.errno_name == "ENOENT" and req.view.get(parent_of(name)) is not None:
                return b"OK\0"
            raise
        if name == "/":
            raise StoreError("EINVAL")
        req.events.extend(self._rm_subtree(req.view, name))
        return b"OK\0"

    def _get_perms(self, req: _Request) -> bytes:
        name = self._canon(req, _onearg(req.pkt), allow_special=True)
        return perms_to_bytes(self._get(req, name, PERM_READ).perms)

    def _set_perms(self, req: _Request) -> bytes:
        args = _strings(req.pkt.payload)
        if len(args) < 2:
            raise StoreError("EINVAL")
        conn = req.conn
        if not conn.privileged and len(args) - 1 > self.quota_for(conn.domid).perms:
            raise StoreError("ENOSPC")
        perms = parse_perms(args[1:])
        name = self._canon(req, args[0], allow_special=True)
        node = self._get(req, name, PERM_WRITE | PERM_OWNER)
        if not conn.privileged and perms[0][1] != node.owner:
            # C answers EPERM, which is not in xsd_errors: the wire says EINVAL.
            raise StoreError("EPERM")
        new = replace(node, perms=perms)
        self._check_size(req, new)
        req.view.put(name, new)
        req.events.append(_Event(name, exact=False, old_perms=node.perms))
        return b"OK\0"

    def _watch(self, req: _Request) -> bytes:
        args = _strings(req.pkt.payload)
        if len(args) != 2:
            raise StoreError("EINVAL")
        conn = req.conn
        relative = not args[0].startswith(("/", "@"))
        path = self._canon(req, args[0], allow_special=True)
        token = args[1]
        if any(w.path == path and w.token == token for w in conn.watches):
            raise StoreError("EEXIST")
        if not conn.privileged and self._count(conn.domid, lambda c: len(c.watches)) >= conn.quota.watches:
            raise StoreError("E2BIG")
        prefix = len(domain_path(conn.domid)) + 1 if relative else 0
        conn.watches.append(Watch(path, token, prefix))
        return b"OK\0"

    def _unwatch(self, req: _Request) -> bytes:
        args = _strings(req.pkt.payload)
        if len(args) != 2:
            raise StoreError("EINVAL")
        path = self._canon(req, args[0], allow_special=True)
        for i, w in enumerate(req.conn.watches):
            if w.path == path and w.token == args[1]:
                del req.conn.watches[i]
                return b"OK\0"
        raise StoreError("ENOENT")

    def _reset_watches(self, req: _Request) -> bytes:
        req.conn.watches.clear()
        req.conn.transactions.clear()
        return b"OK\0"

    def _count(self, domid: int, what: Callable[[Connection], int]) -> int:
        return sum(what(c) for c in self.connections.values() if c.domid == domid and not c.privileged)

    def _transaction_start(self, req: _Request) -> bytes:
        conn = req.conn
        if req.tx is not None:
            raise StoreError("EBUSY")  # no nested transactions
        if not conn.privileged and (
            self._count(conn.domid, lambda c: len(c.transactions)) >= conn.quota.transactions
        ):
            raise StoreError("ENOSPC")
        tx_id = conn._next_tx_id
        while tx_id == 0 or tx_id in conn.transactions:
            tx_id = (tx_id + 1) & 0xFFFFFFFF
        conn._next_tx_id = (tx_id + 1) & 0xFFFFFFFF
        conn.transactions[tx_id] = Transaction(tx_id, conn.domid)
        return f"{tx_id}".encode() + b"\0"

    def _transaction_end(self, req: _Request) -> bytes:
        arg = _onearg(req.pkt)
        if arg not in ("T", "F"):
            raise StoreError("EINVAL")
        tx = req.tx
        if tx is None:
            raise StoreError("ENOENT")
        conn = req.conn
        del conn.transactions[tx.id]
        req.tx = None
        if arg == "F":
            return b"OK\0"
        if tx.node_created and not conn.privileged:
            if self.store.owned[conn.domid] + tx.owned_delta[conn.domid] > conn.quota.nodes:
                raise StoreError("ENOSPC")
        self.store.commit(tx)  # EAGAIN on conflict
        # Watch events of the transaction fire now, judged by the committed
        # nodes or the permissions the transaction first saw.
        req.events.extend(
            _Event(path, exact=exact, old_perms=tx.first_perms.get(path))
            for path, exact in tx.watch_queue.items()
        )
        return b"OK\0"

    def _introduce(self, req: _Request) -> bytes:
        args = _strings(req.pkt.payload)
        if len(args) < 3:
            raise StoreError("EINVAL")
        domid = _parse_domid(args[0])
        mfn = _parse_int(args[1])
        port = _parse_int(args[2])
        if domid == 0 or domid >= DOMID_FIRST_RESERVED or port <= 0:
            raise StoreError("EINVAL")
        if domid not in self.introduced and self.domain_exists is not None and not self.domain_exists(domid):
            # C xenstored fails here when mapping the page of a domain that
            # does not exist (the grant map's GNTST_bad_domain is EINVAL from
            # Linux's gntdev); we ask the hypervisor first, and answer the same.
            raise StoreError("EINVAL")
        if domid in self.introduced:
            # Re-introduction (resume, reconnect): domain_conn_reset() -- the
            # connection stays, its watches, transactions and output go.
            for conn in self.connections.values():
                if conn.domid == domid and not conn.privileged:
                    conn.watches.clear()
                    conn.transactions.clear()
                    conn._reset_output()
        else:
            self.introduced.add(domid)
            req.events.append(_Event("@introduceDomain", exact=True))
        req.actions.append(Introduce(domid, mfn, port))
        return b"OK\0"

    def _onearg_domain(self, req: _Request) -> int:
        domid = _parse_domid(_onearg(req.pkt))
        if domid == 0:
            raise StoreError("EINVAL")
        if domid not in self.introduced:
            raise StoreError("ENOENT")
        return domid

    def _release(self, req: _Request) -> bytes:
        domid = self._onearg_domain(req)
        self.release_domain(domid)  # its connections are gone: no Close needed
        req.actions.append(Release(domid))
        return b"OK\0"

    def _resume(self, req: _Request) -> bytes:
        self._onearg_domain(req)
        return b"OK\0"

    def _get_domain_path(self, req: _Request) -> bytes:
        return domain_path(_parse_domid(_onearg(req.pkt))).encode() + b"\0"

    def _is_domain_introduced(self, req: _Request) -> bytes:
        domid = _parse_domid(_onearg(req.pkt))
        return b"T\0" if domid == DOMID_SELF or self.is_introduced(domid) else b"F\0"

    def _set_target(self, req: _Request) -> bytes:
        args = _strings(req.pkt.payload)
        if len(args) < 2:
            raise StoreError("EINVAL")
        domid, tdomid = _parse_domid(args[0]), _parse_domid(args[1])
        for d in (domid, tdomid):
            if not self.is_introduced(d):
                raise StoreError("ENOENT")
        self.targets[domid] = tdomid
        return b"OK\0"

    def _quota_set(self, domid_text: str, name: str, value_text: str) -> bytes:
        """CONTROL quota-set <domid> <quota> <value>: one domain's own limit
        (the topology's xenstore_quota, sent by the toolstack)."""
        field_name = QUOTA_NAMES.get(name)
        value = _parse_uint(value_text)
        if field_name is None or value < 1:
            raise StoreError("EINVAL")
        domid = _parse_domid(domid_text)
        quota = replace(self.quota_for(domid), **{field_name: value})
        self.quota_overrides[domid] = quota
        for conn in self.connections.values():
            if conn.domid == domid:
                conn.quota = quota
        return b"OK\0"

    def _control(self, req: _Request) -> bytes:
        args = _strings(req.pkt.payload)
        if not args:
            raise StoreError("EINVAL")
        cmd, params = args[0], args[1:]
        if cmd == "check" and not params:
            return b"OK\0"
        if cmd == "print" and len(params) == 1:
            return b"OK\0"
        if cmd == "log" and len(params) == 1 and params[0] in ("on", "off"):
            return b"OK\0"
        if cmd == "quota-set" and len(params) == 3:
            return self._quota_set(*params)
        if cmd == "help" and not params:
            text = ("check\nlog [on|off]\nprint <string>\nquota [<domid>]\n"
                    "quota-set <domid> <quota> <value>\nhelp\n")
            return text.encode() + b"\0"
        if cmd == "quota" and len(params) <= 1:
            if not params:
                q = self.quota
                text = "Quota settings:\n" + "".join(
                    f"{name:<17}: {getattr(q, name):8d}\n" for name in Quota.__dataclass_fields__
                )
                return text.encode() + b"\0"
            domid = _parse_domid(params[0])
            limit = self.quota_for(domid)
            text = (
                f"Domain {domid}:\n"
                f"{'nodes':<17}: {self.store.owned[domid]:8d} of {limit.nodes}\n"
                f"{'watches':<17}: {self._count(domid, lambda c: len(c.watches)):8d}\n"
                f"{'transactions':<17}: {self._count(domid, lambda c: len(c.transactions)):8d}\n"
            )
            return text.encode() + b"\0"
        raise StoreError("EINVAL")


# CONTROL quota-set names (C xenstored's) -> Quota fields
QUOTA_NAMES = {"nodes": "nodes", "node-size": "node_size", "watches": "watches",
               "transactions": "transactions", "outstanding": "outstanding", "permissions": "perms",
               "transaction-nodes": "transaction_nodes"}


def _strip_perms(perms: tuple[Perm, ...], domid: int) -> tuple[Perm, ...]:
    return (perms[0], *(p for p in perms[1:] if p[1] != domid))


# -- payload parsing ---------------------------------------------------------


def _strings(payload: bytes) -> list[str]:
    """get_strings(): the NUL-terminated strings; a tail without NUL is ignored."""
    parts = payload.split(b"\0")
    return [decode_str(p) for p in parts[:-1]]


def _onearg(pkt: Packet) -> str:
    """onearg(): exactly one string, NUL-terminated, nothing after it."""
    payload = pkt.payload
    if not payload or payload.find(b"\0") != len(payload) - 1:
        raise StoreError("EINVAL")
    return decode_str(payload[:-1])


def _parse_int(text: str) -> int:
    body = text[1:] if text[:1] == "-" else text
    if not body or not body.isascii() or not body.isdigit():
        raise StoreError("EINVAL")
    return int(text)


def _parse_uint(text: str) -> int:
    if not text or not text.isascii() or not text.isdigit():
        raise StoreError("EINVAL")
    return int(text)


def _parse_domid(text: str) -> int:
    domid = _parse_uint(text)
    if domid > 0xFFFF:
        raise StoreError("EINVAL")
    return domid


_HANDLERS: dict[XsType, _Handler] = {
    XsType.CONTROL: XenStore._control,
    XsType.DIRECTORY: XenStore._directory,
    XsType.READ: XenStore._read,
    XsType.GET_PERMS: XenStore._get_perms,
    XsType.WATCH: XenStore._watch,
    XsType.UNWATCH: XenStore._unwatch,
    XsType.TRANSACTION_START: XenStore._transaction_start,
    XsType.TRANSACTION_END: XenStore._transaction_end,
    XsType.INTRODUCE: XenStore._introduce,
    XsType.RELEASE: XenStore._release,
    XsType.GET_DOMAIN_PATH: XenStore._get_domain_path,
    XsType.WRITE: XenStore._write,
    XsType.MKDIR: XenStore._mkdir,
    XsType.RM: XenStore._rm,
    XsType.SET_PERMS: XenStore._set_perms,
    XsType.IS_DOMAIN_INTRODUCED: XenStore._is_domain_introduced,
    XsType.RESUME: XenStore._resume,
    XsType.SET_TARGET: XenStore._set_target,
    XsType.RESET_WATCHES: XenStore._reset_watches,
    XsType.DIRECTORY_PART: XenStore._directory_part,
    # WATCH_EVENT and ERROR are never requests; GET/SET_FEATURE and
    # GET/SET_QUOTA have no handler in C xenstored: all answer ENOSYS.
}

