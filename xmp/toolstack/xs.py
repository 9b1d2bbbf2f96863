"""The toolstack's side of xenstore: the trees libxl writes, and its
connection to dom0's xenstored.

When the supervisor builds a domain it writes the domain's standard tree
(as libxl does, ``docs/misc/xenstore-paths.pandoc``) and INTRODUCEs it to
xenstored; when the domain goes it RELEASEs it and removes the tree.  The
connection is dom0's xenstored socket, and it is asynchronous: requests
are written and the replies read from the supervisor's own loop, because
xenstored answering an INTRODUCE needs hypercalls the supervisor serves --
waiting for the reply inline would deadlock.  A reply that is an error is
logged (dmesg), never dropped silently.

Permissions follow libxl: the domain's directory is dom0's and readable by
the guest (``n0 r<domid>``); the parts a guest writes -- ``control/shutdown``
and ``control/feature-*``, ``data``, ``device``, ``drivers``, ``feature``,
``attr``, ``error`` -- are the guest's (``n<domid>``).
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path

from xmp.errors import LocalError, RemoteProtocolError
from xmp.startinfo import CONSOLE_PFN, XENSTORE_PFN
from xmp.xenstore.wire import XENSTORE_PAYLOAD_MAX, Packet, PacketParser, XsType

GUEST_OWNED_DIRS = ("data", "device", "drivers", "feature", "attr", "error")
GUEST_OWNED_CONTROL = ("shutdown", "feature-poweroff", "feature-reboot", "feature-suspend", "sysrq")


def _z(*parts: str) -> bytes:
    return b"".join(p.encode() + b"\0" for p in parts)


def domain_tree(domid: int, name: str, uuid: str, memory_kb: int, maxmem_kb: int, vcpus: int,
                maxvcpus: int, console_port: int, store_port: int,
                quota: dict[str, int] | None = None) -> list[tuple[XsType, bytes]]:
    """The requests that create a guest's tree and introduce it."""
    base = f"/local/domain/{domid}"
    vm = f"/vm/{uuid}"
    ro = ("n0", f"r{domid}")
    rw = (f"n{domid}",)
    reqs: list[tuple[XsType, bytes]] = [
        (XsType.MKDIR, _z(base)), (XsType.SET_PERMS, _z(base, *ro)),
        (XsType.MKDIR, _z(vm)), (XsType.SET_PERMS, _z(vm, *ro)),
        (XsType.WRITE, _z(f"{vm}/name") + name.encode()),
        (XsType.WRITE, _z(f"{vm}/uuid") + uuid.encode()),
        (XsType.WRITE, _z(f"{base}/name") + name.encode()),
        (XsType.WRITE, _z(f"{base}/domid") + str(domid).encode()),
        (XsType.WRITE, _z(f"{base}/vm") + vm.encode()),
        (XsType.WRITE, _z(f"{base}/memory/target") + str(memory_kb).encode()),
        (XsType.WRITE, _z(f"{base}/memory/static-max") + str(maxmem_kb).encode()),
        (XsType.WRITE, _z(f"{base}/memory/videoram") + b"0"),  # libxl's video_memkb: PV and PVH have none
        (XsType.WRITE, _z(f"{base}/console/ring-ref") + str(CONSOLE_PFN).encode()),
        (XsType.WRITE, _z(f"{base}/console/port") + str(console_port).encode()),
        (XsType.WRITE, _z(f"{base}/console/type") + b"xenconsoled"),
        (XsType.WRITE, _z(f"{base}/store/ring-ref") + str(XENSTORE_PFN).encode()),
        (XsType.WRITE, _z(f"{base}/store/port") + str(store_port).encode()),
    ]
    for cpu in range(maxvcpus):
        state = b"online" if cpu < vcpus else b"offline"
        reqs.append((XsType.WRITE, _z(f"{base}/cpu/{cpu}/availability") + state))
    for key in GUEST_OWNED_CONTROL:
        path = f"{base}/control/{key}"
        reqs += [(XsType.WRITE, _z(path)), (XsType.SET_PERMS, _z(path, *rw))]
    for sub in GUEST_OWNED_DIRS:
        reqs += [(XsType.MKDIR, _z(f"{base}/{sub}")), (XsType.SET_PERMS, _z(f"{base}/{sub}", *rw))]
    for qname, value in (quota or {}).items():  # xl.cfg xenstore_quota, before the domain is introduced
        reqs.append((XsType.CONTROL, _z("quota-set", str(domid), qname, str(value))))
    reqs.append((XsType.INTRODUCE, _z(str(domid), str(XENSTORE_PFN), str(store_port))))
    return reqs


def device_tree(front: int, back: int, devtype: str, devid: int, back_keys: dict[str, str] | None = None,
                front_keys: dict[str, str] | None = None) -> list[tuple[XsType, bytes]]:
    """The two directories of a split device, as libxl__device_generic_add
    writes them: each owned by its end and readable by the other; both ends
    start Initialising, the backend ``online``.

    libxl writes them in one transaction; these requests go one by one, so
    their order is what keeps either end from acting on half a directory:
    the frontend's directory first (a backend acts as soon as its own
    appears), and in each directory ``state`` last (a bus takes up a device
    once its ``state`` exists)."""
    return (_frontend_dir(front, back, devtype, devid, front_keys)
            + _backend_dir(front, back, devtype, devid, back_keys))


def move_backend_tree(front: int, back: int, devtype: str, devid: int,
                      back_keys: dict[str, str] | None = None) -> list[tuple[XsType, bytes]]:
    """A device's backend moved to domain ``back`` (its domain restarted with
    a new id): the new backend directory, complete, then the frontend's
    pointers to it -- the frontend's own keys stay as they are, and it
    starts over with the new backend when ``backend`` changes."""
    fpath = f"/local/domain/{front}/device/{devtype}/{devid}"
    return _backend_dir(front, back, devtype, devid, back_keys) + [
        (XsType.WRITE, _z(f"{fpath}/backend-id") + str(back).encode()),
        (XsType.WRITE, _z(f"{fpath}/backend") + _backend_path(front, back, devtype, devid).encode())]


def _backend_path(front: int, back: int, devtype: str, devid: int) -> str:
    return f"/local/domain/{back}/backend/{devtype}/{front}/{devid}"


def _frontend_dir(front: int, back: int, devtype: str, devid: int,
                  front_keys: dict[str, str] | None) -> list[tuple[XsType, bytes]]:
    fpath = f"/local/domain/{front}/device/{devtype}/{devid}"
    keys = {"backend": _backend_path(front, back, devtype, devid), "backend-id": str(back),
            **(front_keys or {}), "state": "1"}
    return _directory(fpath, [f"n{front}", f"r{back}"], keys)


def _backend_dir(front: int, back: int, devtype: str, devid: int,
                 back_keys: dict[str, str] | None) -> list[tuple[XsType, bytes]]:
    fpath = f"/local/domain/{front}/device/{devtype}/{devid}"
    keys = {"frontend": fpath, "frontend-id": str(front), "online": "1", **(back_keys or {}), "state": "1"}
    return _directory(_backend_path(front, back, devtype, devid), [f"n{back}", f"r{front}"], keys)


def _directory(path: str, perms: list[str], keys: dict[str, str]) -> list[tuple[XsType, bytes]]:
    """mkdir, perms (its nodes inherit them), then the keys in order."""
    return [(XsType.MKDIR, _z(path)), (XsType.SET_PERMS, _z(path, *perms)),
            *[(XsType.WRITE, _z(f"{path}/{key}") + value.encode()) for key, value in keys.items()]]


def dom0_tree() -> list[tuple[XsType, bytes]]:
    return [(XsType.WRITE, _z("/local/domain/0/name") + b"Domain-0"),
            (XsType.WRITE, _z("/local/domain/0/domid") + b"0")]


def teardown_tree(domid: int, uuid: str) -> list[tuple[XsType, bytes]]:
    return [(XsType.RELEASE, _z(str(domid))), (XsType.RM, _z(f"/local/domain/{domid}")),
            (XsType.RM, _z(f"/vm/{uuid}"))]


Done = Callable[[list[Packet]], None]  # every reply of one send(), in order (ERROR ones included)


class XsConnection:
    """The toolstack's asynchronous xenstore connection: requests are
    written when the socket takes them, replies are read from the
    supervisor's loop and handed to the sender's ``done``; watch events to
    the callback of their token."""

    def __init__(self, path: Path, log: Callable[[str], None],
                 want_write: Callable[[bool], None] = lambda _on: None,
                 on_close: Callable[[socket.socket], None] = lambda _sock: None):
        self.path = path
        self.log = log
        self.want_write = want_write  # the supervisor's loop: tell me when the socket can take more
        self.on_close = on_close      # ... and to forget the socket before it is closed
        self.sock: socket.socket | None = None
        self.parser = PacketParser()
        self.pending: dict[int, tuple[str, _Batch | None]] = {}
        self.watches: dict[str, Callable[[str], None]] = {}
        self.next_id = 1
        self.outbuf = bytearray()

    def connect(self) -> bool:
        if self.sock is not None:
            return True
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(str(self.path))
        except OSError:
            sock.close()
            return False
        sock.setblocking(False)  # never block the supervisor (see flush)
        self.sock = sock
        return True

    def send(self, reqs: list[tuple[XsType, bytes]], what: str, done: Done | None = None) -> None:
        """Send ``reqs``; ``done`` gets their replies once all are in.  An
        error reply is logged (and handed to ``done``), never dropped.  A
        request larger than xenstore's payload is refused (LocalError) and
        nothing of the batch is sent: xenstored would drop this connection,
        which serves every domain."""
        for op, payload in reqs:
            if len(payload) > XENSTORE_PAYLOAD_MAX:
                path = payload.split(b"\0")[0].decode(errors="replace")
                raise LocalError(f"{what}: {op.name} {path[:80]}: {len(payload)} bytes, more than "
                                 f"xenstore's {XENSTORE_PAYLOAD_MAX}")
        if self.sock is None:
            self.log(f"xenstore unavailable: {what} not done")
            if done is not None:
                done([Packet(int(XsType.ERROR), 0, 0, b"ENOTCONN\0")] * len(reqs))
            return
        batch = _Batch(len(reqs), done) if done is not None else None
        data = bytearray()
        for op, payload in reqs:
            req_id = self.next_id
            self.next_id = (self.next_id + 1) & 0xFFFFFFFF or 1
            path = payload.split(b"\0")[0].decode(errors="replace")
            self.pending[req_id] = (f"{what}: {op.name} {path}", batch)
            if batch is not None:
                batch.ids.append(req_id)
            data += Packet(int(op), req_id, 0, payload).encode()
        self.outbuf += data
        self.flush()
        if batch is not None and not reqs:
            batch.finish()

    def watch(self, path: str, token: str, fired: Callable[[str], None]) -> None:
        """XS_WATCH; ``fired(path)`` for each event (the first at once)."""
        self.watches[token] = fired
        self.send([(XsType.WATCH, _z(path, token))], f"watching {path}")

    def unwatch(self, path: str, token: str) -> None:
        if self.watches.pop(token, None) is not None:
            self.send([(XsType.UNWATCH, _z(path, token))], f"unwatching {path}")

    def flush(self) -> None:
        """Write what the socket takes now; the rest waits for the loop to say
        it is writable.  Blocking here could deadlock: xenstored answering an
        INTRODUCE makes hypercalls that only this (then stuck) loop serves."""
        while self.outbuf and self.sock is not None:
            try:
                n = self.sock.send(self.outbuf)
            except BlockingIOError:
                break
            except OSError as exc:
                self.log(f"xenstore connection lost ({exc}): {len(self.outbuf)} bytes of requests not sent")
                self.close()
                return
            del self.outbuf[:n]
        self.want_write(bool(self.outbuf))

    def write(self, path: str, value: str, what: str) -> None:
        self.send([(XsType.WRITE, _z(path) + value.encode())], what)

    def readable(self) -> None:
        """Take the replies that arrived; report the ones that are errors."""
        assert self.sock is not None
        try:
            data = self.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.log("xenstored closed the toolstack's connection")
            self.close()
            return
        try:
            packets = self.parser.feed(data)
        except RemoteProtocolError as exc:
            self.log(f"xenstored sent garbage: {exc}")
            self.close()
            return
        for pkt in packets:
            if pkt.type == XsType.WATCH_EVENT:
                path, _, token = pkt.payload.rstrip(b"\0").partition(b"\0")
                fired = self.watches.get(token.decode(errors="replace"))
                if fired is not None:
                    fired(path.decode(errors="replace"))
                continue
            what, batch = self.pending.pop(pkt.req_id, (None, None))
            if pkt.type == XsType.ERROR and what is not None:
                self.log(f"xenstore {what}: {pkt.payload.rstrip(bytes(1)).decode(errors='replace')}")
            if batch is not None:
                batch.reply(pkt)

    def close(self) -> None:
        if self.sock is not None:
            self.on_close(self.sock)
            self.sock.close()
            self.sock = None
        self.outbuf.clear()
        # Whoever waits on an answer hears that none will come.
        for _what, batch in self.pending.values():
            if batch is not None:
                batch.reply(Packet(int(XsType.ERROR), 0, 0, b"ENOTCONN\0"))
        self.pending.clear()


class _Batch:
    """The replies of one send(), gathered for its ``done``."""

    def __init__(self, n: int, done: Done):
        self.n, self.done = n, done
        self.ids: list[int] = []
        self.replies: list[Packet] = []

    def reply(self, pkt: Packet) -> None:
        self.replies.append(pkt)
        if len(self.replies) == self.n:
            self.finish()

    def finish(self) -> None:
        done, self.done = self.done, None  # type: ignore[assignment]
        if done is not None:
            done(self.replies)
