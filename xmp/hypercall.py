"""The hypercall channel: the ABI between a domain and the supervisor.

Each domain gets one ``SOCK_SEQPACKET`` socket pair at spawn.  The
supervisor knows the caller by the socket a message arrives on, never by
anything the message says.  One datagram is one message, UTF-8 JSON (never
pickle: a domain is not trusted to hand us code), at most
:data:`MAX_MESSAGE` bytes, optionally carrying descriptors (SCM_RIGHTS)::

    request  {"op": "event_channel_op", "cmd": "alloc_unbound", "args": {"remote_dom": 0}}
    reply    {"ret": <value>}                      success
             {"errno": 22, "detail": "..."}        failure, Xen's errno (positive)

The first message on a channel goes the other way: the supervisor's
``boot`` message, with the domain's RAM and event object descriptors.

``op`` is the Xen hypercall name; ``cmd`` its sub-operation where Xen has
one (EVTCHNOP_*, GNTTABOP_*, XENMEM_*, SCHEDOP_*, XEN_DOMCTL_*).
"""

from __future__ import annotations

import errno
import json
import os
import socket
import struct
import threading
from collections.abc import Callable, Container, Mapping
from typing import Any

from xmp.errors import DomainGone, GrantError, HypercallError, LocalError
from xmp.sharedmem.shm import recv_handles

MAX_MESSAGE = 65536
MAX_FDS = 8

# Hypercalls, by xen.h's __HYPERVISOR_* names; their sub-operations are
# whatever the hypervisor has a handler for (xmp.hv.hypercalls).
HYPERCALLS = ("domctl", "memory_op", "grant_table_op", "event_channel_op", "sched_op", "set_timer_op",
              "console_io", "xen_version", "sysctl", "hvm_op", "dm_op", "vcpu_op",
              "cpuid")  # cpuid: the instruction's trap into the hypervisor, not a hypercall
DOM0_ONLY = frozenset({"domctl", "sysctl"})
# XEN_SYSCTL_getdomaininfolist pages: a page of this many entries (names of
# 64 characters, every field at its widest) stays well inside MAX_MESSAGE.
DOMAININFO_PAGE = 64

# sched.h SHUTDOWN_* reasons
SHUTDOWN_REASONS = {"poweroff": 0, "reboot": 1, "suspend": 2, "crash": 3, "watchdog": 4,
                    "soft_reset": 5}


class MessageTooBig(LocalError):
    """A message would not fit one datagram of the channel (E2BIG)."""

    def __init__(self, size: int):
        self.size = size
        super().__init__(size)

    def __str__(self) -> str:
        return f"hypercall message of {self.size} bytes exceeds {MAX_MESSAGE}"


def encode(msg: dict[str, Any]) -> bytes:
    data = json.dumps(msg, separators=(",", ":")).encode()
    if len(data) > MAX_MESSAGE:
        raise MessageTooBig(len(data))
    return data


def domain_info_list(call: Callable[..., Any]) -> list[dict[str, Any]]:
    """Every domain's getdomaininfo record, a page at a time, as libxc's
    xc_domain_getinfolist callers loop: ``call`` is a channel's
    ``call(op, cmd, **args)``.  Ids only grow, so paging by "first id after
    the last one seen" never skips a domain that was there all along."""
    out: list[dict[str, Any]] = []
    first = 0
    while True:
        page = call("sysctl", "getdomaininfolist", first_domain=first, max_domains=DOMAININFO_PAGE)
        out += page
        if len(page) < DOMAININFO_PAGE:
            return out
        first = page[-1]["domid"] + 1


def decode_request(data: bytes, ops: Mapping[str, Container[str]]) -> tuple[str, str, dict[str, Any]]:
    """Check a request's shape against the hypercalls ``ops`` (op -> its
    sub-operations); anything malformed is EINVAL, anything unknown ENOSYS."""
    try:
        msg = json.loads(data)
    except (UnicodeDecodeError, ValueError) as exc:
        raise HypercallError(errno.EINVAL, "hypercall", f"not a JSON message: {exc}") from None
    if not isinstance(msg, dict):
        raise HypercallError(errno.EINVAL, "hypercall", "a request is a JSON object")
    op, cmd, args = msg.get("op"), msg.get("cmd", ""), msg.get("args", {})
    if not isinstance(op, str) or not isinstance(cmd, str) or not isinstance(args, dict):
        raise HypercallError(errno.EINVAL, "hypercall", "op and cmd are strings, args an object")
    if op not in ops:
        raise HypercallError(errno.ENOSYS, op, "no such hypercall")
    if cmd not in ops[op]:
        raise HypercallError(errno.ENOSYS, f"{op}/{cmd}", "no such sub-operation")
    return op, cmd, args


def arg(args: dict[str, Any], name: str, kind: type, op: str, default: Any = ...) -> Any:
    """Fetch one argument of the right type, or EINVAL naming it."""
    if name not in args:
        if default is ...:
            raise HypercallError(errno.EINVAL, op, f"missing argument {name!r}")
        return default
    value = args[name]
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise HypercallError(errno.EINVAL, op, f"argument {name!r} must be an integer")
    if kind is not int and not isinstance(value, kind):
        raise HypercallError(errno.EINVAL, op, f"argument {name!r} must be {kind.__name__}")
    return value


def int_list(args: dict[str, Any], name: str, op: str, limit: int = 4096) -> list[int]:
    value = arg(args, name, list, op)
    if len(value) > limit or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                                     for v in value):
        raise HypercallError(errno.EINVAL, op, f"argument {name!r} must be ≤{limit} non-negative integers")
    return value


class Channel:
    """The domain's end: blocking, thread-safe request/reply."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self._lock = threading.Lock()

    def recv_boot(self) -> tuple[dict[str, Any], list[int]]:
        data, fds = recv_handles(self.sock, MAX_FDS, MAX_MESSAGE)
        if not data:
            raise DomainGone(-1)
        return json.loads(data), fds

    def call_with_fds(self, op: str, cmd: str = "", **args: Any) -> tuple[Any, list[int]]:
        msg = encode({"op": op, "cmd": cmd, "args": args})
        with self._lock:
            self.sock.send(msg)
            data, fds = recv_handles(self.sock, MAX_FDS, MAX_MESSAGE)
        if not data:
            raise DomainGone(-1)
        reply = json.loads(data)
        if reply.get("errno"):
            for fd in fds:
                os.close(fd)
            if "gntst" in reply:
                raise GrantError(reply.get("domid", -1), reply.get("gref", -1), reply["gntst"], cmd or op)
            raise HypercallError(reply["errno"], f"{op}/{cmd}" if cmd else op, reply.get("detail", ""))
        return reply.get("ret"), fds

    def call(self, op: str, cmd: str = "", **args: Any) -> Any:
        ret, fds = self.call_with_fds(op, cmd, **args)
        if fds:  # a reply we did not expect descriptors on
            for fd in fds:
                os.close(fd)
        return ret

    def close(self) -> None:
        self.sock.close()


# -- who is on the other end of a Unix socket ------------------------------


def peer_pid(conn: socket.socket) -> int:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[0]


def descends_from(pid: int, ancestor: int) -> bool:
    """Is ``ancestor`` on ``pid``'s parent chain (reading /proc)?"""
    for _ in range(64):
        if pid == ancestor:
            return True
        if pid <= 1:
            return False
        try:
            with open(f"/proc/{pid}/stat") as f:
                pid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            return True  # gone or unreadable: refuse rather than guess
    return True


def from_a_domain(conn: socket.socket, zygote_pid: int) -> bool:
    """A connection made by a domain process (every domain is a child of the
    zygote) or anything it forked."""
    try:
        return descends_from(peer_pid(conn), zygote_pid)
    except OSError:
        return True
