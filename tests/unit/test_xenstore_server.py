"""xenstore server conformance, as tables of (connection, tx, request, reply).

Every scenario runs its rows in order against one XenStore with a
privileged dom0 socket ("dom0") and two introduced domains ("dom1",
"dom2"), each owning /local/domain/<id> with no access for others.  The
expected replies follow docs/misc/xenstore.txt and what C xenstored
(tools/xenstored) answers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xmp.xenstore.server import Close, Introduce, Quota, Release, XenStore
from xmp.xenstore.store import Node
from xmp.xenstore.wire import XENSTORE_PAYLOAD_MAX, Packet, PacketParser, XsType

T = XsType


# -- the table runner ------------------------------------------------------------


@dataclass(frozen=True)
class E:
    """An ERROR reply carrying this errno name."""

    name: str


@dataclass(frozen=True)
class Bind:
    """The reply is a transaction id: remember it under this label."""

    label: str


@dataclass(frozen=True)
class R:
    """Request row: ``conn`` sends ``type``/``payload`` in transaction ``tx``
    (0, or a label bound by Bind) and gets ``expect`` back (bytes: the
    same type with this payload; E: an error; Bind: a transaction id)."""

    conn: str
    type: int
    payload: bytes
    expect: bytes | E | Bind
    tx: int | str = 0
    actions: list | None = None


@dataclass(frozen=True)
class Ev:
    """The watch events ``conn`` received since the last Ev row for it."""

    conn: str
    events: list[tuple[str, str]]


@dataclass
class Harness:
    xs: XenStore
    conns: dict = field(default_factory=dict)
    parsers: dict = field(default_factory=dict)
    events: dict = field(default_factory=dict)
    tx: dict = field(default_factory=dict)
    req_id: int = 100

    @classmethod
    def make(cls, **kw) -> Harness:
        h = cls(XenStore(**kw))
        h.add("dom0", 0, privileged=True)
        for domid in (1, 2):
            h.request("dom0", T.INTRODUCE, f"{domid}\0{4096 + domid}\0{domid}\0".encode())
            h.add(f"dom{domid}", domid)
            h.run([R("dom0", T.MKDIR, f"/local/domain/{domid}\0".encode(), b"OK\0"),
                   R("dom0", T.SET_PERMS, f"/local/domain/{domid}\0n{domid}\0".encode(), b"OK\0")])
        h.collect()
        h.events = {name: [] for name in h.conns}
        return h

    def add(self, name: str, domid: int, privileged: bool = False):
        self.conns[name] = self.xs.connect(domid, privileged=privileged)
        self.parsers[name] = PacketParser()
        self.events[name] = []
        return self.conns[name]

    def collect(self) -> dict[str, list[Packet]]:
        """Take every connection's output; watch events go to self.events."""
        replies: dict[str, list[Packet]] = {}
        for name, conn in self.conns.items():
            for pkt in self.parsers[name].feed(conn.take(1 << 30)):
                if pkt.type == T.WATCH_EVENT:
                    path, token, rest = pkt.payload.split(b"\0")
                    assert rest == b""
                    self.events[name].append((path.decode(), token.decode()))
                else:
                    replies.setdefault(name, []).append(pkt)
        return replies

    def request(self, name: str, mtype: int, payload: bytes, tx_id: int = 0):
        self.req_id += 1
        pkt = Packet(mtype, self.req_id, tx_id, payload)
        actions = self.xs.handle(self.conns[name], pkt)
        replies = self.collect().get(name, [])
        assert len(replies) == 1, replies
        (reply,) = replies
        assert (reply.req_id, reply.tx_id) == (pkt.req_id, pkt.tx_id)
        return reply, actions

    def run(self, rows) -> None:
        for i, row in enumerate(rows):
            if isinstance(row, Ev):
                got, self.events[row.conn] = self.events[row.conn], []
                assert got == row.events, f"row {i}: {row}"
                continue
            tx_id = self.tx[row.tx] if isinstance(row.tx, str) else row.tx
            reply, actions = self.request(row.conn, row.type, row.payload, tx_id)
            if isinstance(row.expect, E):
                assert (reply.type, reply.payload) == (T.ERROR, row.expect.name.encode() + b"\0"), \
                    f"row {i}: {row} -> {reply}"
            elif isinstance(row.expect, Bind):
                assert reply.type == row.type and reply.payload.endswith(b"\0"), f"row {i}: {reply}"
                self.tx[row.expect.label] = int(reply.payload[:-1])
            else:
                assert (reply.type, reply.payload) == (row.type, row.expect), f"row {i}: {row} -> {reply}"
            if row.actions is not None:
                assert actions == row.actions, f"row {i}: {actions}"


OK = b"OK\0"


def s(*parts: str) -> bytes:
    """NUL-terminate each part: s("a", "b") == b"a\\0b\\0"."""
    return b"".join(p.encode() + b"\0" for p in parts)


# -- scenarios ----------------------------------------------------------------------

BASIC = [
    R("dom0", T.READ, s("/"), b""),
    R("dom0", T.DIRECTORY, s("/"), s("tool", "local")),
    R("dom0", T.WRITE, b"/a/b/c\0v", OK),
    R("dom0", T.READ, s("/a/b/c"), b"v"),
    R("dom0", T.READ, s("/a/b"), b""),  # parents made with empty values
    R("dom0", T.DIRECTORY, s("/a"), s("b")),
    R("dom0", T.DIRECTORY, s("/a/b/c"), b""),
    R("dom0", T.WRITE, b"/a/b\0keep", OK),
    R("dom0", T.MKDIR, s("/a/b"), OK),  # existing: value left alone
    R("dom0", T.READ, s("/a/b"), b"keep"),
    R("dom0", T.MKDIR, s("/m/n"), OK),
    R("dom0", T.DIRECTORY, s("/m"), s("n")),
    R("dom0", T.WRITE, b"/bin\0a\0b\0", OK),  # values are binary
    R("dom0", T.READ, s("/bin"), b"a\0b\0"),
    R("dom0", T.WRITE, b"/empty\0", OK),
    R("dom0", T.READ, s("/empty"), b""),
    R("dom0", T.RM, s("/a/b"), OK),  # the whole subtree
    R("dom0", T.READ, s("/a/b/c"), E("ENOENT")),
    R("dom0", T.DIRECTORY, s("/a"), b""),
    R("dom0", T.RM, s("/a/b"), OK),  # missing, but its parent exists
    R("dom0", T.RM, s("/zz/yy"), E("ENOENT")),  # parent missing too
    R("dom0", T.RM, s("/"), E("EINVAL")),
    R("dom0", T.WRITE, b"rel\0x", OK),  # relative: under /local/domain/0
    R("dom0", T.READ, s("/local/domain/0/rel"), b"x"),
    R("dom1", T.WRITE, b"data/k\0v1", OK),
    R("dom1", T.READ, s("/local/domain/1/data/k"), b"v1"),
    R("dom1", T.READ, s("data/k"), b"v1"),
    R("dom1", T.GET_DOMAIN_PATH, s("7"), s("/local/domain/7")),
    R("dom0", T.GET_DOMAIN_PATH, s("0"), s("/local/domain/0")),
    R("dom0", T.GET_DOMAIN_PATH, s("abc"), E("EINVAL")),
    R("dom0", T.READ, s("/nothere"), E("ENOENT")),
]

PERMISSIONS = [
    R("dom0", T.WRITE, b"/p/node\0v", OK),
    R("dom0", T.GET_PERMS, s("/p/node"), s("n0")),  # dom0 owns, default none
    R("dom1", T.READ, s("/p/node"), E("EACCES")),  # default letter n
    R("dom0", T.SET_PERMS, s("/p/node", "n0", "r1", "w2"), OK),
    R("dom1", T.READ, s("/p/node"), b"v"),  # r: read ...
    R("dom1", T.WRITE, b"/p/node\0x", E("EACCES")),  # ... not write
    R("dom2", T.READ, s("/p/node"), E("EACCES")),  # w: write ...
    R("dom2", T.WRITE, b"/p/node\0w2", OK),  # ... not read
    R("dom0", T.READ, s("/p/node"), b"w2"),
    R("dom1", T.GET_PERMS, s("/p/node"), s("n0", "r1", "w2")),
    R("dom2", T.GET_PERMS, s("/p/node"), E("EACCES")),
    # A missing node: ENOENT only if the nearest ancestor grants the access.
    R("dom1", T.READ, s("/p/node/missing"), E("ENOENT")),
    R("dom2", T.READ, s("/p/node/missing"), E("EACCES")),
    R("dom1", T.WRITE, b"/p/node/new\0x", E("EACCES")),
    R("dom1", T.RM, s("/p/node/missing"), E("EACCES")),
    # Default letter r for every domain not listed.
    R("dom0", T.WRITE, b"/p/def\0d", OK),
    R("dom0", T.SET_PERMS, s("/p/def", "r0"), OK),
    R("dom1", T.READ, s("/p/def"), b"d"),
    R("dom2", T.READ, s("/p/def"), b"d"),
    R("dom2", T.WRITE, b"/p/def\0no", E("EACCES")),
    # An explicit entry beats the default: n for dom2 while others read.
    R("dom0", T.SET_PERMS, s("/p/def", "r0", "n2"), OK),
    R("dom2", T.READ, s("/p/def"), E("EACCES")),
    R("dom1", T.READ, s("/p/def"), b"d"),
    # b = read and write.
    R("dom0", T.WRITE, b"/p/both\0b", OK),
    R("dom0", T.SET_PERMS, s("/p/both", "n0", "b1"), OK),
    R("dom1", T.WRITE, b"/p/both\0b1", OK),
    R("dom1", T.READ, s("/p/both"), b"b1"),
    # ... but b does not make dom1 the owner: no SET_PERMS.
    R("dom1", T.SET_PERMS, s("/p/both", "n0", "b1", "r2"), E("EACCES")),
    # The owner has full access whatever the letters say.
    R("dom0", T.WRITE, b"/p/own\0o", OK),
    R("dom0", T.SET_PERMS, s("/p/own", "n1"), OK),
    R("dom1", T.READ, s("/p/own"), b"o"),
    R("dom1", T.WRITE, b"/p/own\0o1", OK),
    R("dom1", T.SET_PERMS, s("/p/own", "n1", "r2"), OK),  # the owner may set perms
    R("dom2", T.READ, s("/p/own"), b"o1"),
    R("dom2", T.SET_PERMS, s("/p/own", "n2"), E("EACCES")),  # a non-owner may not
    # Only the privileged may change the owner (C: EPERM, not in xsd_errors
    # so it goes out as EINVAL).
    R("dom1", T.SET_PERMS, s("/p/own", "n2"), E("EINVAL")),
    R("dom1", T.GET_PERMS, s("/p/own"), s("n1", "r2")),
    R("dom0", T.SET_PERMS, s("/p/own", "b2"), OK),  # privileged bypass
    R("dom1", T.READ, s("/p/own"), b"o1"),  # now default b for all
    R("dom0", T.SET_PERMS, s("/p/own", "n2"), OK),
    R("dom1", T.READ, s("/p/own"), E("EACCES")),
    R("dom0", T.READ, s("/p/own"), b"o1"),  # privileged bypass
    R("dom0", T.WRITE, b"/p/own\0z", OK),
    # Inheritance: new nodes copy their parent's perms; an unprivileged
    # creator becomes the owner, a privileged one does not.
    R("dom1", T.WRITE, b"data/x/y\0v", OK),
    R("dom1", T.GET_PERMS, s("data/x"), s("n1")),
    R("dom1", T.GET_PERMS, s("data/x/y"), s("n1")),
    R("dom0", T.WRITE, b"/local/domain/1/bydom0\0v", OK),
    R("dom0", T.GET_PERMS, s("/local/domain/1/bydom0"), s("n1")),
    R("dom0", T.MKDIR, s("/shared"), OK),
    R("dom0", T.SET_PERMS, s("/shared", "r0", "b1", "n2"), OK),
    R("dom1", T.WRITE, b"/shared/mine/leaf\0v", OK),
    R("dom0", T.GET_PERMS, s("/shared/mine"), s("r1", "b1", "n2")),
    R("dom0", T.GET_PERMS, s("/shared/mine/leaf"), s("r1", "b1", "n2")),
    R("dom2", T.READ, s("/shared/mine/leaf"), E("EACCES")),
    R("dom2", T.WRITE, b"/shared/x\0v", E("EACCES")),
    # Special nodes: dom0's, no access for others.
    R("dom0", T.GET_PERMS, s("@introduceDomain"), s("n0")),
    R("dom1", T.GET_PERMS, s("@releaseDomain"), E("EACCES")),
    R("dom0", T.READ, s("@introduceDomain"), E("EINVAL")),  # only perms ops take @paths
    # Malformed permission lists.
    R("dom0", T.SET_PERMS, s("/p/node", "x5"), E("EINVAL")),
    R("dom0", T.SET_PERMS, s("/p/node", "r"), E("EINVAL")),
    R("dom0", T.SET_PERMS, s("/p/node", "r1x"), E("EINVAL")),
    R("dom0", T.SET_PERMS, s("/p/node"), E("EINVAL")),
    R("dom0", T.SET_PERMS, b"/p/node\0r1", E("EINVAL")),  # missing NUL: only one string
    R("dom0", T.SET_PERMS, s("/p/nothere", "n0"), E("ENOENT")),
]

TRANSACTIONS = [
    R("dom1", T.TRANSACTION_START, b"\0", Bind("t1")),
    R("dom1", T.WRITE, b"data/a\0in-tx", OK, tx="t1"),
    R("dom1", T.READ, s("data/a"), b"in-tx", tx="t1"),
    R("dom1", T.READ, s("data/a"), E("ENOENT")),  # isolation: invisible outside
    R("dom0", T.READ, s("/local/domain/1/data/a"), E("ENOENT")),
    R("dom1", T.TRANSACTION_END, s("T"), OK, tx="t1"),
    R("dom1", T.READ, s("data/a"), b"in-tx"),
    R("dom1", T.READ, s("data/a"), E("ENOENT"), tx="t1"),  # gone after END
    # Conflict: a node read in the transaction changed outside it.
    R("dom1", T.TRANSACTION_START, b"\0", Bind("t2")),
    R("dom1", T.READ, s("data/a"), b"in-tx", tx="t2"),
    R("dom0", T.WRITE, b"/local/domain/1/data/a\0outside", OK),
    R("dom1", T.READ, s("data/a"), b"in-tx", tx="t2"),  # still its own view
    R("dom1", T.WRITE, b"data/b\0x", OK, tx="t2"),
    R("dom1", T.TRANSACTION_END, s("T"), E("EAGAIN"), tx="t2"),
    R("dom1", T.READ, s("data/b"), E("ENOENT")),
    R("dom1", T.READ, s("data/a"), b"outside"),
    R("dom1", T.TRANSACTION_END, s("T"), E("ENOENT"), tx="t2"),  # EAGAIN ended it
    # Conflict on a node created outside after the transaction saw it missing.
    R("dom1", T.TRANSACTION_START, b"\0", Bind("t3")),
    R("dom1", T.READ, s("data/new"), E("ENOENT"), tx="t3"),
    R("dom1", T.WRITE, b"data/new\0mine", OK),
    R("dom1", T.WRITE, b"data/other\0x", OK, tx="t3"),
    R("dom1", T.TRANSACTION_END, s("T"), E("EAGAIN"), tx="t3"),
    # Conflict on a written node changed outside.
    R("dom1", T.TRANSACTION_START, b"\0", Bind("t3b")),
    R("dom1", T.WRITE, b"data/new\0tx", OK, tx="t3b"),
    R("dom2", T.WRITE, b"scratch\0x", OK),  # unrelated: no conflict from this
    R("dom0", T.WRITE, b"/local/domain/1/data/new\0dom0", OK),
    R("dom1", T.TRANSACTION_END, s("T"), E("EAGAIN"), tx="t3b"),
    R("dom1", T.READ, s("data/new"), b"dom0"),
    # No conflict when outside changes touch nothing the transaction used.
    R("dom1", T.TRANSACTION_START, b"\0", Bind("t4")),
    R("dom1", T.READ, s("data/a"), b"outside", tx="t4"),
    R("dom0", T.WRITE, b"/elsewhere\0x", OK),
    R("dom1", T.WRITE, b"data/a\0t4", OK, tx="t4"),
    R("dom1", T.TRANSACTION_END, s("T"), OK, tx="t4"),
    R("dom1", T.READ, s("data/a"), b"t4"),
    # Abort.
    R("dom1", T.TRANSACTION_START, b"\0", Bind("t5")),
    R("dom1", T.WRITE, b"data/c\0x", OK, tx="t5"),
    R("dom1", T.RM, s("data/a"), OK, tx="t5"),
    R("dom1", T.READ, s("data/a"), E("ENOENT"), tx="t5"),
    R("dom1", T.TRANSACTION_END, s("F"), OK, tx="t5"),
    R("dom1", T.READ, s("data/c"), E("ENOENT")),
    R("dom1", T.READ, s("data/a"), b"t4"),
    # Bad transaction ids and arguments.
    R("dom1", T.READ, s("data/a"), E("ENOENT"), tx=99),
    R("dom1", T.WRITE, b"data/a\0x", E("ENOENT"), tx=0xDEADBEEF),
    R("dom1", T.TRANSACTION_END, s("T"), E("ENOENT")),  # tx_id 0
    R("dom1", T.TRANSACTION_START, b"\0", Bind("t6")),
    R("dom1", T.TRANSACTION_START, b"\0", E("EBUSY"), tx="t6"),  # no nesting
    R("dom1", T.TRANSACTION_END, s("X"), E("EINVAL"), tx="t6"),
    R("dom1", T.TRANSACTION_END, b"T", E("EINVAL"), tx="t6"),  # missing NUL
    R("dom2", T.READ, s("scratch"), E("ENOENT"), tx="t6"),  # ids are per connection
    R("dom1", T.TRANSACTION_END, s("F"), OK, tx="t6"),
    # Watch events of a transaction fire at commit, not before; none on abort.
    R("dom2", T.WATCH, s("/local/domain/1", "w"), OK),
    R("dom0", T.SET_PERMS, s("/local/domain/1", "n1", "r2"), OK),
    R("dom0", T.SET_PERMS, s("/local/domain/1/data", "n1", "r2"), OK),
    Ev("dom2", [("/local/domain/1", "w"), ("/local/domain/1", "w"), ("/local/domain/1/data", "w")]),
    R("dom1", T.TRANSACTION_START, b"\0", Bind("t7")),
    R("dom1", T.WRITE, b"data/d\0x", OK, tx="t7"),
    Ev("dom2", []),
    R("dom1", T.TRANSACTION_END, s("T"), OK, tx="t7"),
    Ev("dom2", [("/local/domain/1/data/d", "w")]),
    R("dom1", T.TRANSACTION_START, b"\0", Bind("t8")),
    R("dom1", T.WRITE, b"data/e\0x", OK, tx="t8"),
    R("dom1", T.TRANSACTION_END, s("F"), OK, tx="t8"),
    Ev("dom2", []),
    # RESET_WATCHES drops transactions too.
    R("dom1", T.TRANSACTION_START, b"\0", Bind("t9")),
    R("dom1", T.RESET_WATCHES, b"", OK),
    R("dom1", T.READ, s("data/d"), E("ENOENT"), tx="t9"),
]

WATCHES = [
    R("dom0", T.WATCH, s("/w", "tok"), OK),
    Ev("dom0", [("/w", "tok")]),  # fires once at once, even for a missing node
    R("dom0", T.WRITE, b"/w/x/y\0v", OK),
    Ev("dom0", [("/w/x/y", "tok")]),  # the whole subtree
    R("dom0", T.WRITE, b"/wother\0v", OK),  # a sibling with a common prefix
    Ev("dom0", []),
    R("dom0", T.WATCH, s("/w", "tok"), E("EEXIST")),
    R("dom0", T.WATCH, s("/w", "tok2"), OK),
    Ev("dom0", [("/w", "tok2")]),
    R("dom0", T.SET_PERMS, s("/w/x", "n0", "r1"), OK),  # perms change fires
    Ev("dom0", [("/w/x", "tok"), ("/w/x", "tok2")]),
    R("dom0", T.UNWATCH, s("/w", "tok"), OK),
    R("dom0", T.UNWATCH, s("/w", "tok"), E("ENOENT")),
    R("dom0", T.UNWATCH, s("/w", "tok2"), OK),
    R("dom0", T.WRITE, b"/w/x\0v2", OK),
    Ev("dom0", []),
    # Relative watches get relative event paths.
    R("dom1", T.WATCH, s("data", "rel"), OK),
    Ev("dom1", [("data", "rel")]),
    R("dom0", T.WRITE, b"/local/domain/1/data/q\0v", OK),
    Ev("dom1", [("data/q", "rel")]),
    R("dom1", T.UNWATCH, s("data", "rel"), OK),
    # WATCH ignores tx_id.
    R("dom1", T.WATCH, s("/local/domain/1/data", "abs"), OK, tx=12345),
    Ev("dom1", [("/local/domain/1/data", "abs")]),
    R("dom1", T.UNWATCH, s("/local/domain/1/data", "abs"), OK, tx=12345),
    # Events only for nodes the watcher can read (or whose parent it can).
    R("dom0", T.MKDIR, s("/pw"), OK),
    R("dom0", T.SET_PERMS, s("/pw", "n0", "r1"), OK),
    R("dom1", T.WATCH, s("/pw", "t"), OK),
    R("dom2", T.WATCH, s("/pw", "t"), OK),
    Ev("dom1", [("/pw", "t")]),
    Ev("dom2", [("/pw", "t")]),
    R("dom0", T.WRITE, b"/pw/x\0v", OK),
    Ev("dom1", [("/pw/x", "t")]),
    Ev("dom2", []),
    R("dom0", T.SET_PERMS, s("/pw/x", "n0"), OK),  # readable before: still told
    Ev("dom1", [("/pw/x", "t")]),
    R("dom0", T.WRITE, b"/pw/x\0v2", OK),  # unreadable node, readable parent
    Ev("dom1", [("/pw/x", "t")]),
    R("dom0", T.WRITE, b"/pw/x/y\0v", OK),  # neither node nor parent readable
    Ev("dom1", []),
    R("dom1", T.UNWATCH, s("/pw", "t"), OK),
    # RM: an event for the removed node on watches above it, exact events
    # for each node removed below it.
    R("dom0", T.WRITE, b"/r/a/b\0v", OK),
    R("dom0", T.WATCH, s("/r", "top"), OK),
    R("dom0", T.WATCH, s("/r/a/b", "leaf"), OK),
    R("dom0", T.WATCH, s("/r/a/b/c", "below"), OK),
    Ev("dom0", [("/r", "top"), ("/r/a/b", "leaf"), ("/r/a/b/c", "below")]),
    R("dom0", T.RM, s("/r/a"), OK),
    Ev("dom0", [("/r/a/b", "leaf"), ("/r/a", "top")]),
    R("dom0", T.RM, s("/r/a"), OK),  # nothing removed: no event
    Ev("dom0", []),
    # A mkdir of an existing node changes nothing: no event.
    R("dom0", T.MKDIR, s("/r"), OK),
    Ev("dom0", []),
    # XSA-115: @introduceDomain/@releaseDomain only for privileged watchers
    # (the first, immediate event still goes to anyone who asks).
    R("dom0", T.WATCH, s("@introduceDomain", "i"), OK),
    R("dom0", T.WATCH, s("@releaseDomain", "r"), OK),
    R("dom1", T.WATCH, s("@introduceDomain", "i"), OK),
    R("dom1", T.WATCH, s("@releaseDomain", "r"), OK),
    Ev("dom0", [("@introduceDomain", "i"), ("@releaseDomain", "r")]),
    Ev("dom1", [("@introduceDomain", "i"), ("@releaseDomain", "r")]),
    R("dom0", T.INTRODUCE, s("3", "9999", "5"), OK, actions=[Introduce(3, 9999, 5)]),
    Ev("dom0", [("@introduceDomain", "i")]),
    Ev("dom1", []),
    R("dom0", T.RELEASE, s("3"), OK, actions=[Release(3)]),
    Ev("dom0", [("@releaseDomain", "r")]),
    Ev("dom1", []),
    # A watch on / sees everything but the specials.
    R("dom0", T.WATCH, s("/", "all"), OK),
    Ev("dom0", [("/", "all")]),
    R("dom0", T.INTRODUCE, s("4", "1", "5"), OK),
    Ev("dom0", [("@introduceDomain", "i")]),
    R("dom2", T.WRITE, b"z\0v", OK),
    Ev("dom0", [("/local/domain/2/z", "all")]),
    # RESET_WATCHES forgets them all.
    R("dom0", T.RESET_WATCHES, b"", OK),
    R("dom0", T.WRITE, b"/w/x\0v3", OK),
    Ev("dom0", []),
    # Malformed watch requests.
    R("dom0", T.WATCH, s("/w"), E("EINVAL")),
    R("dom0", T.WATCH, b"/w\0tok", E("EINVAL")),
    R("dom0", T.WATCH, s("/w", "t", "extra"), E("EINVAL")),
    R("dom0", T.WATCH, s("/w//x", "t"), E("EINVAL")),
    R("dom0", T.WATCH, s("/w/", "t"), E("EINVAL")),
    R("dom0", T.UNWATCH, s("/w"), E("EINVAL")),
]

DOMAINS = [
    R("dom1", T.INTRODUCE, s("3", "1", "5"), E("EACCES")),
    R("dom0", T.INTRODUCE, s("3", "1"), E("EINVAL")),
    R("dom0", T.INTRODUCE, s("3", "1", "0"), E("EINVAL")),  # port must be > 0
    R("dom0", T.INTRODUCE, s("x", "1", "5"), E("EINVAL")),
    R("dom0", T.INTRODUCE, s("0", "1", "5"), E("EINVAL")),
    R("dom0", T.INTRODUCE, s("32752", "1", "5"), E("EINVAL")),  # DOMID_SELF
    R("dom0", T.IS_DOMAIN_INTRODUCED, s("3"), s("F")),
    R("dom0", T.INTRODUCE, s("3", "-5", "7"), OK, actions=[Introduce(3, -5, 7)]),
    R("dom0", T.IS_DOMAIN_INTRODUCED, s("3"), s("T")),
    R("dom0", T.IS_DOMAIN_INTRODUCED, s("1"), s("T")),
    R("dom0", T.IS_DOMAIN_INTRODUCED, s("0"), s("T")),
    R("dom0", T.IS_DOMAIN_INTRODUCED, s("32752"), s("T")),  # DOMID_SELF
    R("dom0", T.IS_DOMAIN_INTRODUCED, s("4"), s("F")),
    R("dom0", T.IS_DOMAIN_INTRODUCED, s("four"), E("EINVAL")),
    R("dom1", T.IS_DOMAIN_INTRODUCED, s("3"), E("EACCES")),
    R("dom0", T.RESUME, s("3"), OK),
    R("dom0", T.RESUME, s("9"), E("ENOENT")),
    R("dom1", T.RESUME, s("3"), E("EACCES")),
    R("dom0", T.SET_TARGET, s("3", "1"), OK),
    R("dom0", T.SET_TARGET, s("3", "9"), E("ENOENT")),
    R("dom0", T.SET_TARGET, s("3"), E("EINVAL")),
    R("dom1", T.SET_TARGET, s("1", "2"), E("EACCES")),
    R("dom0", T.RELEASE, s("3"), OK, actions=[Release(3)]),
    R("dom0", T.IS_DOMAIN_INTRODUCED, s("3"), s("F")),
    R("dom0", T.RELEASE, s("3"), E("ENOENT")),
    R("dom0", T.RELEASE, s("0"), E("EINVAL")),
    R("dom0", T.RELEASE, s("abc"), E("EINVAL")),
    R("dom0", T.RELEASE, b"3", E("EINVAL")),
    R("dom1", T.RELEASE, s("2"), E("EACCES")),
    R("dom0", T.CONTROL, s("print", "hello"), OK),
    R("dom0", T.CONTROL, s("check"), OK),
    R("dom0", T.CONTROL, s("bogus"), E("EINVAL")),
    R("dom0", T.CONTROL, b"", E("EINVAL")),
    R("dom1", T.CONTROL, s("print", "x"), E("EACCES")),
]

HOSTILE = [
    R("dom1", T.READ, b"/local/domain/1", E("EINVAL")),  # no NUL
    R("dom1", T.READ, b"/local/domain/1\0extra", E("EINVAL")),
    R("dom1", T.READ, b"", E("EINVAL")),
    R("dom1", T.READ, b"\0", E("EINVAL")),  # empty path
    R("dom1", T.READ, s("/local/domain/1/a b"), E("EINVAL")),
    R("dom1", T.READ, s("/local/domain/1/a.b"), E("EINVAL")),  # '.' is not allowed
    R("dom1", T.READ, s("/local/domain/1/"), E("EINVAL")),
    R("dom1", T.READ, s("/local//domain"), E("EINVAL")),
    R("dom1", T.READ, s("@foo"), E("EINVAL")),
    R("dom1", T.READ, "/local/domain/1/é\0".encode(), E("EINVAL")),
    R("dom1", T.WRITE, b"data/x", E("EINVAL")),  # no NUL after the path
    R("dom1", T.MKDIR, b"data/x", E("EINVAL")),
    R("dom1", T.RM, s("data/x", "y"), E("EINVAL")),
    R("dom1", T.DIRECTORY, b"", E("EINVAL")),
    R("dom1", T.GET_PERMS, b"x\0\0", E("EINVAL")),
    R("dom1", T.DIRECTORY_PART, s("data"), E("EINVAL")),  # no offset
    R("dom1", T.DIRECTORY_PART, s("/local/domain/1", "x"), E("EINVAL")),
    R("dom1", 20, s("x"), E("ENOSYS")),  # XS_RESTRICT, removed
    R("dom1", 99, b"", E("ENOSYS")),
    R("dom1", 0xFFFF, b"", E("ENOSYS")),  # XS_INVALID
    R("dom1", T.WATCH_EVENT, s("/a", "b"), E("ENOSYS")),
    R("dom1", T.ERROR, s("EINVAL"), E("ENOSYS")),
    R("dom1", T.GET_FEATURE, b"", E("ENOSYS")),
    R("dom0", T.SET_FEATURE, b"", E("ENOSYS")),
    R("dom0", T.GET_QUOTA, b"", E("ENOSYS")),
    R("dom0", T.SET_QUOTA, b"", E("ENOSYS")),
    # Path lengths: 3072 absolute in all; 2048 below /local/domain/<id>/
    # for unprivileged callers.
    R("dom0", T.WRITE, b"/" + b"a" * 3071 + b"\0v", OK),
    R("dom0", T.READ, b"/" + b"a" * 3072 + b"\0", E("EINVAL")),
    R("dom1", T.WRITE, b"a" * 1000 + b"/" + b"b" * 1047 + b"\0v", OK),  # 2048
    R("dom1", T.WRITE, b"c" * 2048 + b"\0v", E("ENOSPC")),  # fits path_max, not node_size
    R("dom1", T.READ, b"a" * 2049 + b"\0", E("EINVAL")),
    R("dom1", T.READ, b"/local/domain/1/" + b"a" * 2049 + b"\0", E("EINVAL")),
    R("dom0", T.READ, b"/local/domain/1/" + b"a" * 2049 + b"\0", E("ENOENT")),
]

SCENARIOS = {
    "basic": BASIC,
    "permissions": PERMISSIONS,
    "transactions": TRANSACTIONS,
    "watches": WATCHES,
    "domains": DOMAINS,
    "hostile": HOSTILE,
}


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_scenario(name):
    Harness.make().run(SCENARIOS[name])


# -- quotas ---------------------------------------------------------------------------

SMALL = Quota(nodes=4, node_size=100, watches=2, transactions=2, perms=2, transaction_nodes=8)

QUOTAS = [
    # dom1 owns /local/domain/1 already: three more nodes, then ENOSPC.
    R("dom1", T.WRITE, b"a\0v", OK),
    R("dom1", T.WRITE, b"b/c\0v", OK),
    R("dom1", T.WRITE, b"d\0v", E("ENOSPC")),
    R("dom1", T.MKDIR, s("e"), E("ENOSPC")),
    R("dom1", T.WRITE, b"a\0overwrite is fine", OK),
    R("dom2", T.WRITE, b"a\0v", OK),  # others are unaffected
    R("dom2", T.WRITE, b"b/c/d/e/f\0v", OK),
    R("dom0", T.WRITE, b"/x/y/z\0v", OK),  # so is the privileged
    R("dom1", T.RM, s("b"), OK),  # freeing nodes makes room again
    R("dom1", T.WRITE, b"d\0v", OK),
    # Node size (header 16 + 8 per perm + data + children): 100 for dom1.
    R("dom1", T.WRITE, b"a\0" + b"x" * 76, OK),
    R("dom1", T.WRITE, b"a\0" + b"x" * 77, E("ENOSPC")),
    R("dom2", T.WRITE, b"a\0" + b"x" * 2000, OK),
    R("dom0", T.WRITE, b"/local/domain/1/a\0" + b"x" * 3000, OK),
    # Permissions per node.
    R("dom1", T.SET_PERMS, s("d", "n1", "r2", "r0"), E("ENOSPC")),
    R("dom1", T.SET_PERMS, s("d", "n1", "r2"), OK),
    R("dom2", T.SET_PERMS, s("a", "n2", "r1", "r0", "w3"), OK),
    # Watches.
    R("dom1", T.WATCH, s("a", "1"), OK),
    R("dom1", T.WATCH, s("a", "2"), OK),
    R("dom1", T.WATCH, s("a", "3"), E("E2BIG")),
    R("dom2", T.WATCH, s("a", "1"), OK),
    R("dom2", T.WATCH, s("a", "2"), OK),
    R("dom2", T.WATCH, s("a", "3"), OK),
    R("dom1", T.UNWATCH, s("a", "1"), OK),
    R("dom1", T.WATCH, s("a", "3"), OK),
    # Transactions.
    R("dom1", T.TRANSACTION_START, b"\0", Bind("t1")),
    R("dom1", T.TRANSACTION_START, b"\0", Bind("t2")),
    R("dom1", T.TRANSACTION_START, b"\0", E("ENOSPC")),
    R("dom2", T.TRANSACTION_START, b"\0", Bind("u1")),
    R("dom2", T.TRANSACTION_START, b"\0", Bind("u2")),
    R("dom2", T.TRANSACTION_START, b"\0", Bind("u3")),
    R("dom1", T.TRANSACTION_END, s("F"), OK, tx="t2"),
    R("dom1", T.TRANSACTION_START, b"\0", Bind("t3")),
    # Node quota inside a transaction, checked again at commit.
    R("dom1", T.WRITE, b"e\0v", OK),  # owns 4 again
    R("dom1", T.WRITE, b"n1\0v", E("ENOSPC"), tx="t1"),
    R("dom1", T.RM, s("d"), OK, tx="t1"),
    R("dom1", T.WRITE, b"n1\0v", OK, tx="t1"),
    R("dom1", T.TRANSACTION_END, s("T"), OK, tx="t1"),
    R("dom1", T.READ, s("n1"), b"v"),
    # Nodes touched by one transaction.
    R("dom1", T.READ, s("n1"), b"v", tx="t3"),
    *[R("dom1", T.READ, s(f"missing{i}"), E("ENOENT"), tx="t3") for i in range(6)],
    R("dom1", T.READ, s("missing6"), E("ENOSPC"), tx="t3"),
]


def test_quotas_per_domain():
    Harness.make(quota_overrides={1: SMALL}).run(QUOTAS)


def test_default_quotas_are_c_xenstored_defaults():
    q = Quota()
    assert (q.nodes, q.node_size, q.watches, q.transactions, q.outstanding, q.perms) == (
        1000, 2048, 128, 10, 20, 5)


def test_node_quota_default_counts_owned_nodes():
    h = Harness.make(quota=Quota(nodes=3))
    h.run([R("dom1", T.WRITE, b"a/b\0v", OK), R("dom1", T.WRITE, b"c\0v", E("ENOSPC")),
           R("dom2", T.WRITE, b"c/d\0v", OK), R("dom0", T.WRITE, b"/x/y/z/w\0v", OK)])


# -- SET_TARGET ----------------------------------------------------------------------


def test_set_target_gives_access_to_the_targets_nodes():
    h = Harness.make()
    h.run([R("dom0", T.INTRODUCE, s("3", "1", "5"), OK)])
    h.add("dom3", 3)
    h.run([
        R("dom1", T.WRITE, b"priv\0secret", OK),
        R("dom3", T.READ, s("/local/domain/1/priv"), E("EACCES")),
        R("dom0", T.WRITE, b"/grant\0g", OK),
        R("dom0", T.SET_PERMS, s("/grant", "n0", "r1"), OK),
        R("dom3", T.READ, s("/grant"), E("EACCES")),
        R("dom0", T.SET_TARGET, s("3", "1"), OK),
        R("dom3", T.READ, s("/local/domain/1/priv"), b"secret"),  # dom1's nodes
        R("dom3", T.WRITE, b"/local/domain/1/priv\0by3", OK),
        R("dom3", T.READ, s("/grant"), b"g"),  # and dom1's grants
        R("dom3", T.READ, s("/local/domain/2"), E("EACCES")),
    ])


# -- XSA-322: a released domain's permissions do not pass to its successor ---------


def test_xsa322_release_removes_the_domains_nodes_and_permissions():
    h = Harness.make()
    h.run([
        R("dom0", T.WRITE, b"/x322\0v", OK),
        R("dom0", T.SET_PERMS, s("/x322", "n0", "r2", "r1"), OK),
        R("dom0", T.MKDIR, s("/own2"), OK),
        R("dom0", T.SET_PERMS, s("/own2", "n2", "r1"), OK),
        R("dom0", T.SET_PERMS, s("@releaseDomain", "n0", "r2"), OK),
        R("dom2", T.READ, s("/x322"), b"v"),
        R("dom0", T.WATCH, s("/own2", "o"), OK),
        R("dom0", T.WATCH, s("@releaseDomain", "r"), OK),
        Ev("dom0", [("/own2", "o"), ("@releaseDomain", "r")]),
        R("dom0", T.RELEASE, s("2"), OK, actions=[Release(2)]),
        Ev("dom0", [("/own2", "o"), ("@releaseDomain", "r")]),
        R("dom0", T.READ, s("/own2"), E("ENOENT")),  # nodes it owned are gone
        R("dom0", T.READ, s("/local/domain/2"), E("ENOENT")),
        R("dom0", T.GET_PERMS, s("/x322"), s("n0", "r1")),  # and so are its grants
        R("dom0", T.GET_PERMS, s("@releaseDomain"), s("n0")),
        R("dom0", T.INTRODUCE, s("2", "1", "9"), OK),
    ])
    assert h.conns["dom2"].closed
    h.add("dom2", 2)  # a new domain reusing domid 2
    h.run([R("dom2", T.READ, s("/x322"), E("EACCES")),
           R("dom1", T.READ, s("/x322"), b"v")])


def test_xsa322_open_transactions_do_not_resurrect_permissions():
    h = Harness.make()
    h.run([
        R("dom0", T.TRANSACTION_START, b"\0", Bind("t")),
        R("dom0", T.WRITE, b"/fresh\0v", OK, tx="t"),
        R("dom0", T.SET_PERMS, s("/fresh", "n0", "r2"), OK, tx="t"),
        R("dom0", T.RELEASE, s("2"), OK),
        R("dom0", T.TRANSACTION_END, s("T"), OK, tx="t"),
        R("dom0", T.GET_PERMS, s("/fresh"), s("n0")),
    ])


def test_release_domain_from_the_transport_drops_its_connection():
    h = Harness.make()
    dom1 = h.conns["dom1"]
    h.run([R("dom1", T.WATCH, s("data", "x"), OK), R("dom1", T.TRANSACTION_START, b"\0", Bind("t")),
           R("dom0", T.WATCH, s("@releaseDomain", "r"), OK)])
    dropped = h.xs.release_domain(1)
    assert dropped == [dom1] and dom1.closed and not dom1.watches and not dom1.transactions
    assert dom1 not in h.xs.dirty() and not dom1.wants_requests()
    h.collect()
    assert ("@releaseDomain", "r") in h.events["dom0"]
    assert h.xs.handle(dom1, Packet(T.READ, 1, 0, s("/"))) == []
    h.run([R("dom0", T.IS_DOMAIN_INTRODUCED, s("1"), s("F"))])


def test_reintroduce_resets_the_connection_without_an_event():
    h = Harness.make()
    h.run([R("dom1", T.WATCH, s("data", "x"), OK),
           R("dom0", T.WATCH, s("@introduceDomain", "i"), OK),
           Ev("dom0", [("@introduceDomain", "i")]),
           R("dom0", T.INTRODUCE, s("1", "1", "8"), OK, actions=[Introduce(1, 1, 8)]),
           Ev("dom0", [])])
    assert h.conns["dom1"].watches == [] and not h.conns["dom1"].closed


# -- XSA-326: a connection that never reads --------------------------------------------


def test_xsa326_watch_events_are_dropped_beyond_the_output_cap():
    q = Quota(output_bytes=4096)
    xs = XenStore(quota_overrides={1: q})
    dom0 = xs.connect(0, privileged=True)
    xs.handle(dom0, Packet(T.INTRODUCE, 1, 0, s("1", "1", "1")))
    dom1 = xs.connect(1)
    xs.handle(dom0, Packet(T.SET_PERMS, 2, 0, s("/", "r0")))
    xs.handle(dom1, Packet(T.WATCH, 3, 0, s("/flood", "t")))
    dom0_watch = xs.handle(dom0, Packet(T.WATCH, 4, 0, s("/flood", "t")))
    assert dom0_watch == []
    for i in range(500):
        xs.handle(dom0, Packet(T.WRITE, 10 + i, 0, f"/flood/n{i}\0v".encode()))
        assert dom1.out_bytes <= q.output_bytes
    assert dom1.dropped_events > 0 and dom1.out_bytes > q.output_bytes - 64
    # Replies are never dropped; past the cap the transport stops reading it.
    xs.handle(dom0, Packet(T.WRITE, 9, 0, b"/big\0" + b"x" * 3000))
    xs.handle(dom1, Packet(T.READ, 9, 0, s("/big")))
    assert dom1.out_bytes > q.output_bytes and not dom1.wants_requests()
    # The privileged watcher got them all.
    assert dom0.dropped_events == 0
    events = [p for p in PacketParser().feed(dom0.take(1 << 30)) if p.type == T.WATCH_EVENT]
    assert len(events) == 501
    # Draining reopens it.
    assert PacketParser().feed(dom1.take(1 << 30))[-1] == Packet(T.READ, 9, 0, b"x" * 3000)
    assert dom1.wants_requests() and dom1.out_bytes == 0


def test_xsa326_identical_queued_events_are_not_duplicated():
    h = Harness.make()
    h.run([R("dom0", T.WATCH, s("/d", "t"), OK)])
    dom0 = h.conns["dom0"]
    dom0.take(1 << 30)
    h.events["dom0"].clear()
    for i in range(5):
        h.xs.handle(dom0, Packet(T.WRITE, 50 + i, 0, b"/d\0v"))
    pkts = PacketParser().feed(dom0.take(1 << 30))
    assert [p.type for p in pkts].count(T.WATCH_EVENT) == 1
    assert [p.type for p in pkts].count(T.WRITE) == 5


def test_xsa326_outstanding_replies_stop_requests():
    h = Harness.make()
    dom1 = h.conns["dom1"]
    for i in range(20):
        assert dom1.wants_requests()
        h.xs.handle(dom1, Packet(T.READ, i, 0, s("/local/domain/1")))
    assert dom1.outstanding == 20 and not dom1.wants_requests()
    one = dom1.take(10)  # part of a reply is not the whole of it
    assert len(one) == 10 and not dom1.wants_requests()
    dom1.take(dom1.out_bytes - (len(dom1.out[-1])))
    assert dom1.outstanding == 1 and dom1.wants_requests()
    dom0 = h.conns["dom0"]
    for i in range(50):
        h.xs.handle(dom0, Packet(T.READ, i, 0, s("/")))
    assert dom0.wants_requests()  # the privileged are not limited


def test_take_splits_packets_and_keeps_order():
    h = Harness.make()
    dom1 = h.conns["dom1"]
    pkts = [Packet(T.WRITE, i, 0, f"k{i}\0v{i}".encode()) for i in range(5)]
    for p in pkts:
        h.xs.handle(dom1, p)
    assert dom1 in h.xs.dirty() and h.xs.dirty() == set()
    total = dom1.out_bytes
    stream = b""
    while dom1.out:
        stream += dom1.take(7)
    assert len(stream) == total and dom1.out_bytes == 0
    got = PacketParser().feed(stream)
    assert [(p.type, p.req_id, p.payload) for p in got] == [(T.WRITE, i, OK) for i in range(5)]


# -- DIRECTORY_PART and oversized replies --------------------------------------------


def test_directory_part_pages_a_long_directory():
    h = Harness.make()
    names = [f"child-{i:03d}-" + "x" * 40 for i in range(150)]
    dom0 = h.conns["dom0"]
    for i, n in enumerate(names):
        h.xs.handle(dom0, Packet(T.MKDIR, i, 0, s(f"/big/{n}")))
    h.collect()
    reply, _ = h.request("dom0", T.DIRECTORY, s("/big"))
    assert (reply.type, reply.payload) == (T.ERROR, b"E2BIG\0")  # > XENSTORE_PAYLOAD_MAX
    got: list[str] = []
    gens = set()
    offset = 0
    while True:
        reply, _ = h.request("dom0", T.DIRECTORY_PART, s("/big", str(offset)))
        assert reply.type == T.DIRECTORY_PART and len(reply.payload) <= XENSTORE_PAYLOAD_MAX
        gen, _, rest = reply.payload.partition(b"\0")
        gens.add(gen)
        if rest.endswith(b"\0\0") or rest == b"\0":
            got += [x.decode() for x in rest[:-1].split(b"\0")[:-1]]
            break
        part = [x.decode() for x in rest.split(b"\0")[:-1]]
        got += part
        offset += sum(len(x) + 1 for x in part)
    assert got == names and len(gens) == 1
    reply, _ = h.request("dom0", T.DIRECTORY_PART, s("/big", "999999"))
    assert reply.payload == gen + b"\0\0"
    h.request("dom0", T.WRITE, b"/big/new\0v")  # adding a child changes the generation
    reply, _ = h.request("dom0", T.DIRECTORY_PART, s("/big", "0"))
    assert reply.payload.partition(b"\0")[0] != gen


# -- hostile input never breaks the server --------------------------------------------


@settings(max_examples=300, deadline=None)
@given(mtype=st.integers(0, 30), payload=st.binary(max_size=64), tx_id=st.sampled_from([0, 1, 7, 2**32 - 1]),
       who=st.sampled_from(["dom1", "dom2"]))
def test_any_request_gets_exactly_one_reply(mtype, payload, tx_id, who):
    h = Harness.make()
    h.run([R("dom1", T.TRANSACTION_START, b"\0", Bind("t"))])
    reply, actions = h.request(who, mtype, payload, tx_id)
    assert reply.type in (mtype, T.ERROR)
    if reply.type == T.ERROR:
        assert reply.payload[:-1].decode() in {
            "EINVAL", "EACCES", "EEXIST", "ENOENT", "ENOSPC", "ENOSYS", "EBUSY", "EAGAIN", "E2BIG"}
    assert not any(isinstance(a, (Introduce, Release, Close)) for a in actions)
    # The store's invariants hold: every child listed exists, every node
    # but the root and the specials is listed by its parent.
    nodes: dict[str, Node] = h.xs.store.nodes
    for path, node in nodes.items():
        for c in node.children:
            assert (f"{path}/{c}" if path != "/" else f"/{c}") in nodes
        if path.startswith("/") and path != "/":
            parent = path.rsplit("/", 1)[0] or "/"
            assert path.rsplit("/", 1)[1] in nodes[parent].children


def test_quota_set_overrides_one_domains_limit():
    """CONTROL quota-set <domid> <quota> <value>: what the toolstack sends for
    a topology's xenstore_quota; only that domain's limit changes."""
    from xmp.errors import XenStoreError
    from xmp.testing import store_client
    from xmp.xenstore.server import XenStore
    from xmp.xenstore.wire import XsType

    store = XenStore()
    tool = store_client(store, 0, privileged=True)
    for domid in (1, 2):
        tool.mkdir(f"/local/domain/{domid}/data")
        tool.set_perms(f"/local/domain/{domid}/data", [f"n{domid}"])
    tool.request(XsType.CONTROL, b"quota-set\x001\x00nodes\x005\x00")
    one, two = store_client(store, 1), store_client(store, 2)
    written = 0
    with pytest.raises(XenStoreError) as exc:
        for i in range(10):
            one.write(f"data/n{i}", "x")
            written += 1
    assert exc.value.errno == "ENOSPC" and written == 4  # data itself is dom1's fifth node
    for i in range(10):
        two.write(f"data/n{i}", "x")  # dom2 keeps the default
    for bad in (b"quota-set\x001\x00nodez\x005\x00", b"quota-set\x001\x00nodes\x00-1\x00"):
        with pytest.raises(XenStoreError) as exc:
            tool.request(XsType.CONTROL, bad)
        assert exc.value.errno == "EINVAL"
    with pytest.raises(XenStoreError) as exc:  # not for guests
        one.request(XsType.CONTROL, b"quota-set\x001\x00nodes\x00999\x00")
    assert exc.value.errno == "EACCES"


def test_introduce_asks_whether_the_domain_exists():
    """INTRODUCE of a domid the hypervisor does not know is refused (EINVAL,
    as C xenstored's failed map_interface), nothing is introduced and no
    @introduceDomain fires; a re-introduction does not ask again."""
    asked: list[int] = []

    def exists(domid: int) -> bool:
        asked.append(domid)
        return domid == 5

    xs = XenStore(domain_exists=exists)
    dom0 = xs.connect(0, privileged=True)
    xs.handle(dom0, Packet(T.WATCH, 1, 0, b"@introduceDomain\0t\0"))
    dom0.take(1 << 30)
    actions = xs.handle(dom0, Packet(T.INTRODUCE, 2, 0, b"7\x002\x005\0"))
    reply = PacketParser().feed(dom0.take(1 << 30))
    assert [(p.type, p.payload) for p in reply] == [(T.ERROR, b"EINVAL\0")]
    assert actions == [] and not xs.is_introduced(7)
    actions = xs.handle(dom0, Packet(T.INTRODUCE, 3, 0, b"5\x002\x005\0"))
    assert actions == [Introduce(5, 2, 5)] and xs.is_introduced(5)
    kinds = [p.type for p in PacketParser().feed(dom0.take(1 << 30))]
    assert sorted(kinds) == sorted([T.INTRODUCE, T.WATCH_EVENT])
    xs.handle(dom0, Packet(T.INTRODUCE, 4, 0, b"5\x002\x005\0"))
    assert asked == [7, 5]
