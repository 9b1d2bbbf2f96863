"""The toolstack's side of xenstore, inside the supervisor.

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
from dataclasses import dataclass
from pathlib import Path

from xmp.errors import LocalError, RemoteProtocolError
from xmp.startinfo import CONSOLE_PFN, XENSTORE_PFN
from xmp.xenstore.wire import XENSTORE_PAYLOAD_MAX, Packet, PacketParser, XsType

Done = Callable[[list[str]], None]  # told the batch's error replies (none: all went through)

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


@dataclass
class Device:
    """A split device the toolstack made (so it can move it to a restarted backend)."""

    front: int
    back_name: str
    back_domid: int
    devtype: str
    devid: int
    back_keys: dict[str, str]
    front_keys: dict[str, str]


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


class Toolstack:
    """The supervisor's asynchronous xenstore connection."""

    def __init__(self, path: Path, log: Callable[[str], None],
                 want_write: Callable[[bool], None] = lambda _on: None):
        self.path = path
        self.log = log
        self.want_write = want_write  # the supervisor's loop: tell me when the socket can take more
        self.sock: socket.socket | None = None
        self.parser = PacketParser()
        self.pending: dict[int, str] = {}
        self.next_id = 1
        self.outbuf = bytearray()
        # Batches whose sender waits for every reply: req_id -> batch, batch = [ids left, errors, done]
        self.waiting: dict[int, list] = {}

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
        """Queue ``reqs``; ``done`` is called once every reply is in, with
        the errors among them (or the connection's loss)."""
        for op, payload in reqs:  # xenstored drops a connection that sends more: ours serves every domain
            if len(payload) > XENSTORE_PAYLOAD_MAX:
                path = payload.split(b"\0")[0].decode(errors="replace")
                raise LocalError(f"{what}: {op.name} {path[:80]}: {len(payload)} bytes, more than "
                                 f"xenstore's {XENSTORE_PAYLOAD_MAX}")
        if self.sock is None:
            self.log(f"xenstore unavailable: {what} not done")
            if done is not None:
                done([f"{what}: xenstore unavailable"])
            return
        data = bytearray()
        batch: list = [set(), [], done]
        for op, payload in reqs:
            req_id = self.next_id
            self.next_id = (self.next_id + 1) & 0xFFFFFFFF or 1
            path = payload.split(b"\0")[0].decode(errors="replace")
            self.pending[req_id] = f"{what}: {op.name} {path}"
            if done is not None:
                batch[0].add(req_id)
                self.waiting[req_id] = batch
            data += Packet(int(op), req_id, 0, payload).encode()
        self.outbuf += data
        if done is not None and not reqs:
            done([])
        self.flush()

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
            what = self.pending.pop(pkt.req_id, None)
            error = None
            if pkt.type == XsType.ERROR and what is not None:
                error = f"xenstore {what}: {pkt.payload.rstrip(bytes(1)).decode(errors='replace')}"
                self.log(error)
            batch = self.waiting.pop(pkt.req_id, None)
            if batch is not None:
                batch[0].discard(pkt.req_id)
                if error:
                    batch[1].append(error)
                if not batch[0]:
                    batch[2](batch[1])

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        self.outbuf.clear()
        batches = {id(b): b for b in self.waiting.values()}.values()
        self.waiting.clear()
        for batch in batches:  # nobody will answer them now
            batch[2]([*batch[1], "xenstored's connection was lost before it answered"])
