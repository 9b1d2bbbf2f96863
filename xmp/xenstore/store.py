"""The xenstore tree: nodes, permissions, paths and transactions.

Theory of operation (after tools/xenstored/{core,transaction}.c):

* The store is a flat map ``path -> Node``.  A node holds its value, its
  permission list and the ordered names of its children (so adding or
  removing a child *modifies the parent*, as in C xenstored, which is what
  makes DIRECTORY_PART generation counts and transaction conflicts work).
* Every modification stamps the node with a fresh, store-wide generation
  number.  A transaction records, for each node it touches first, the
  generation it saw (or NO_GENERATION for a missing node); its writes go to
  a private overlay.  At commit every recorded generation must still match
  the global store, else the commit fails with EAGAIN -- the conflict rule
  of C xenstored's finalize_transaction().
* Permissions are ``(letter, domid)`` pairs, letters n/r/w/b.  The first
  entry names the owner (full access) and its letter is what any domain not
  listed gets.  Privileged connections bypass all checks.
* The special nodes ``@introduceDomain`` and ``@releaseDomain`` live in the
  same map (outside the tree).  They are owned by dom0 with no access for
  anyone else, which is how XSA-115 keeps their watch events away from
  unprivileged domains.

Everything here is pure data; the request semantics live in server.py.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, replace

from xmp.xenstore.wire import XENSTORE_ABS_PATH_MAX, XENSTORE_REL_PATH_MAX

PERM_NONE = 0
PERM_READ = 1
PERM_WRITE = 2
PERM_OWNER = 4
PERM_ALL = PERM_READ | PERM_WRITE | PERM_OWNER

LETTER_BITS = {"n": PERM_NONE, "r": PERM_READ, "w": PERM_WRITE, "b": PERM_READ | PERM_WRITE}

NO_GENERATION = -1
SPECIAL_NODES = ("@introduceDomain", "@releaseDomain")

# Sizes C xenstored charges a node with (struct node_hdr, struct xs_permissions).
NODE_HDR_SIZE = 16
PERM_SIZE = 8

_VALID_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-/_@")

Perm = tuple[str, int]


class StoreError(Exception):
    """A request fails with this xsd_errors name (never escapes the server)."""

    def __init__(self, errno_name: str):
        super().__init__(errno_name)
        self.errno_name = errno_name


@dataclass(frozen=True)
class Node:
    value: bytes = b""
    perms: tuple[Perm, ...] = (("n", 0),)
    children: tuple[str, ...] = ()
    generation: int = 0

    @property
    def owner(self) -> int:
        return self.perms[0][1]

    def children_bytes(self) -> bytes:
        return b"".join(c.encode() + b"\0" for c in self.children)

    def acc_size(self) -> int:
        """The size C xenstored checks against the node-size quota
        (calc_node_acc_size: header, permissions, data, children)."""
        childlen = sum(len(c) + 1 for c in self.children)
        return NODE_HDR_SIZE + PERM_SIZE * len(self.perms) + len(self.value) + childlen


# -- paths -----------------------------------------------------------------


def domain_path(domid: int) -> str:
    return f"/local/domain/{domid}"


def canonicalize(path: str, domid: int, *, privileged: bool, allow_special: bool = False,
                 path_max: int = XENSTORE_REL_PATH_MAX) -> str:
    """Resolve and validate a request path, or raise StoreError("EINVAL").

    Mirrors canonicalize() in core.c: characters ``[A-Za-z0-9-/_@]`` only,
    ``@`` first only where special nodes are allowed, relative paths under
    /local/domain/<domid>, no trailing or doubled slash.  Lengths: at most
    XENSTORE_ABS_PATH_MAX in all; for unprivileged callers the part below
    /local/domain/<id>/ is also limited to the path-max quota (2048).
    """
    if not path or not _VALID_CHARS.issuperset(path):
        raise StoreError("EINVAL")
    if path[0] == "@":
        if not allow_special:
            raise StoreError("EINVAL")
        name = path
    elif path[0] != "/":
        name = f"{domain_path(domid)}/{path}"
    else:
        name = path
    if (name.endswith("/") and name != "/") or "//" in name:
        raise StoreError("EINVAL")
    if len(name) > XENSTORE_ABS_PATH_MAX:
        raise StoreError("EINVAL")
    if not privileged and len(name) - _local_offset(name) > path_max:
        raise StoreError("EINVAL")
    return name


def _local_offset(name: str) -> int:
    """Length of a leading "/local/domain/<id>/" (sscanf %5u in core.c)."""
    prefix = "/local/domain/"
    if not name.startswith(prefix):
        return 0
    rest = name[len(prefix):]
    digits = 0
    while digits < len(rest) and digits < 5 and rest[digits].isdigit():
        digits += 1
    if digits == 0 or digits >= len(rest) or rest[digits] != "/":
        return 0
    return len(prefix) + digits + 1


def parent_of(path: str) -> str:
    """get_parent() in core.c: "/" for top-level nodes and special nodes."""
    cut = path.rfind("/", 1)
    return path[:cut] if cut > 0 else "/"


def basename(path: str) -> str:
    return path[path.rfind("/") + 1:]


def child_path(parent: str, name: str) -> str:
    return f"/{name}" if parent == "/" else f"{parent}/{name}"


def is_child(child: str, parent: str) -> bool:
    """True if ``child`` is ``parent`` or below it (watch.c is_child)."""
    if parent == "/":
        return True
    if not child.startswith(parent):
        return False
    return len(child) == len(parent) or child[len(parent)] == "/"


# -- permissions -------------------------------------------------------------


def parse_perms(strings: list[str]) -> tuple[Perm, ...]:
    """``["b0", "r5"]`` to ``(("b", 0), ("r", 5))``; StoreError("EINVAL") if bad."""
    perms = []
    for s in strings:
        if len(s) < 2 or s[0] not in LETTER_BITS or not s[1:].isdigit() or not s[1:].isascii():
            raise StoreError("EINVAL")
        domid = int(s[1:])
        if domid > 0xFFFF:
            raise StoreError("EINVAL")
        perms.append((s[0], domid))
    if not perms:
        raise StoreError("EINVAL")
    return tuple(perms)


def perms_to_bytes(perms: tuple[Perm, ...]) -> bytes:
    return b"".join(f"{letter}{domid}".encode() + b"\0" for letter, domid in perms)


def perm_for(perms: tuple[Perm, ...], domid: int, *, privileged: bool, target: int | None = None) -> int:
    """What a connection may do with a node (perm_for_conn in core.c)."""
    if privileged or perms[0][1] == domid or (target is not None and perms[0][1] == target):
        return PERM_ALL
    for letter, who in perms[1:]:
        if who == domid or (target is not None and who == target):
            return LETTER_BITS[letter]
    return LETTER_BITS[perms[0][0]]


# -- the store and its transactions -----------------------------------------


@dataclass
class Transaction:
    """One open transaction of a connection (struct transaction)."""

    id: int
    domid: int
    overlay: dict[str, Node | None] = field(default_factory=dict)
    accessed: dict[str, int] = field(default_factory=dict)
    first_perms: dict[str, tuple[Perm, ...] | None] = field(default_factory=dict)
    # What the transaction read first: later reads see this copy, not the
    # global node (C xenstored copies read nodes into the transaction).
    snapshot: dict[str, Node | None] = field(default_factory=dict)
    # Watch events to fire at commit: path -> exact.  Non-exact wins.
    watch_queue: dict[str, bool] = field(default_factory=dict)
    owned_delta: Counter[int] = field(default_factory=Counter)
    node_created: bool = False


class Store:
    """The global tree plus per-domain node counts (owner-accounted)."""

    def __init__(self) -> None:
        self.generation = 0
        self.nodes: dict[str, Node] = {}
        self.owned: Counter[int] = Counter()
        # The layout C xenstored starts with (setup_structure in core.c).
        self._init("/", ("tool",))
        self._init("/tool", ("xenstored",))
        self._init("/tool/xenstored", ())
        for special in SPECIAL_NODES:
            self._init(special, ())

    def _init(self, path: str, children: tuple[str, ...]) -> None:
        self.put(path, Node(children=children))

    def next_generation(self) -> int:
        self.generation += 1
        return self.generation

    def put(self, path: str, node: Node) -> None:
        """Write to the global tree, stamping a new generation."""
        old = self.nodes.get(path)
        if old is not None:
            self.owned[old.owner] -= 1
        self.owned[node.owner] += 1
        self.nodes[path] = replace(node, generation=self.next_generation())

    def delete(self, path: str) -> None:
        old = self.nodes.pop(path, None)
        if old is not None:
            self.owned[old.owner] -= 1
            self.next_generation()

    def commit(self, tx: Transaction) -> list[str]:
        """Apply ``tx`` or raise StoreError("EAGAIN").  Returns the paths it
        changed, in the order the transaction first touched them."""
        for path, seen in tx.accessed.items():
            node = self.nodes.get(path)
            if (node.generation if node is not None else NO_GENERATION) != seen:
                raise StoreError("EAGAIN")
        for path, new in tx.overlay.items():
            if new is None:
                self.delete(path)
            else:
                self.put(path, new)
        return list(tx.overlay)


class View:
    """The store as one request sees it: global, or through a transaction."""

    def __init__(self, store: Store, tx: Transaction | None = None, *, tx_nodes_max: int | None = None):
        self.store = store
        self.tx = tx
        self.tx_nodes_max = tx_nodes_max

    def _touch(self, path: str) -> None:
        tx = self.tx
        if tx is None or path in tx.accessed:
            return
        if self.tx_nodes_max is not None and len(tx.accessed) + 1 > self.tx_nodes_max:
            raise StoreError("ENOSPC")
        node = self.store.nodes.get(path)
        tx.accessed[path] = node.generation if node is not None else NO_GENERATION
        tx.first_perms[path] = node.perms if node is not None else None
        tx.snapshot[path] = node

    def get(self, path: str) -> Node | None:
        self._touch(path)
        if self.tx is not None:
            if path in self.tx.overlay:
                return self.tx.overlay[path]
            return self.tx.snapshot[path]
        return self.store.nodes.get(path)

    def put(self, path: str, node: Node) -> None:
        if self.tx is None:
            self.store.put(path, node)
            return
        old = self.get(path)
        if old is not None:
            self.tx.owned_delta[old.owner] -= 1
        else:
            self.tx.node_created = True
        self.tx.owned_delta[node.owner] += 1
        self.tx.overlay[path] = replace(node, generation=self.store.next_generation())

    def delete(self, path: str) -> None:
        if self.tx is None:
            self.store.delete(path)
            return
        old = self.get(path)
        if old is not None:
            self.tx.owned_delta[old.owner] -= 1
        self.tx.overlay[path] = None

    def owned(self, domid: int) -> int:
        count = self.store.owned[domid]
        if self.tx is not None:
            count += self.tx.owned_delta[domid]
        return count

    def subtree(self, path: str) -> list[tuple[str, Node]]:
        """``path`` and everything below it, children before parents."""
        out: list[tuple[str, Node]] = []
        node = self.get(path)
        if node is None:
            return out
        stack: list[tuple[str, Node, bool]] = [(path, node, False)]
        while stack:
            p, n, expanded = stack.pop()
            if expanded:
                out.append((p, n))
                continue
            stack.append((p, n, True))
            for name in reversed(n.children):
                cp = child_path(p, name)
                cn = self.get(cp)
                if cn is not None:
                    stack.append((cp, cn, False))
        return out
