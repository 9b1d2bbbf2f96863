"""Shared-memory objects whose capability is a descriptor, not a name.

Every object is created through ``posix_ipc.SharedMemory`` with ``O_CREX``,
mode 0600 and an unguessable name that starts with the owning supervisor's
prefix ``xmp.<pid>.<token>.``, and is unlinked at once: from then on only
holders of its descriptor can reach it, the descriptor travels to other
processes over a Unix socket (SCM_RIGHTS, :func:`send_handles`), and the
kernel frees the memory with its last descriptor -- so no crash of any
process can leave it behind in ``/dev/shm``.  The name exists for the few
microseconds between create and unlink; should a supervisor die exactly
then, :func:`remove_stale` (run at every start) removes names whose pid is
no longer alive.

Objects are sparse: untouched pages cost nothing.
"""

from __future__ import annotations

import mmap
import os
import re
import secrets
import socket
from collections.abc import Sequence

import posix_ipc
import psutil

from xmp.errors import LocalError
from xmp.sharedmem.page import PAGE_SIZE

SHM_DIR = "/dev/shm"
_NAME_RE = re.compile(r"^xmp\.(\d+)\.[0-9a-f]+\.")


class ShmNamespace:
    """The per-supervisor prefix under which its objects are named."""

    def __init__(self, owner_pid: int | None = None):
        self.owner_pid = os.getpid() if owner_pid is None else owner_pid
        self.prefix = f"xmp.{self.owner_pid}.{secrets.token_hex(8)}."

    def name(self, label: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", label):
            raise LocalError(f"shared-memory label {label!r}: use 1-64 of [A-Za-z0-9_-]")
        return f"/{self.prefix}{label}.{secrets.token_hex(4)}"


class ShmObject:
    """One shared-memory object, held by its descriptor."""

    def __init__(self, fd: int, size: int):
        self.fd = fd
        self.size = size
        self._maps: list[mmap.mmap] = []
        self._ro_fd = -1

    @classmethod
    def create(cls, ns: ShmNamespace, label: str, size: int) -> ShmObject:
        if size <= 0 or size % PAGE_SIZE:
            raise LocalError(f"shared-memory size {size}: must be a positive multiple of {PAGE_SIZE}")
        name = ns.name(label)
        shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=0o600, size=size)
        try:
            fd = os.dup(shm.fd)
        finally:
            shm.close_fd()
            shm.unlink()  # from here on, only descriptor holders can reach it
        return cls(fd, size)

    @classmethod
    def from_fd(cls, fd: int) -> ShmObject:
        """Adopt a descriptor received from another process."""
        return cls(fd, os.fstat(fd).st_size)

    def readonly_fd(self) -> int:
        """A descriptor of the same object opened O_RDONLY (kept, closed with
        the object): what a holder may only read through -- its mappings can
        never be made writable, not even by mprotect.  The object is unlinked,
        so it is re-opened through ``/proc/self/fd``."""
        if self._ro_fd < 0:
            self._ro_fd = os.open(f"/proc/self/fd/{self.fd}", os.O_RDONLY | os.O_CLOEXEC)
        return self._ro_fd

    def map(self, pfn: int = 0, nr_pages: int | None = None, *, writable: bool = True) -> mmap.mmap:
        """Map ``nr_pages`` pages starting at page ``pfn`` (default: all)."""
        total = self.size // PAGE_SIZE
        if nr_pages is None:
            nr_pages = total - pfn
        if pfn < 0 or nr_pages <= 0 or pfn + nr_pages > total:
            raise LocalError(f"pages {pfn}..{pfn + (nr_pages or 0)} outside an object of {total} pages")
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        m = mmap.mmap(self.fd, nr_pages * PAGE_SIZE, mmap.MAP_SHARED, prot,
                      offset=pfn * PAGE_SIZE)
        self._maps.append(m)
        return m

    def close(self) -> None:
        """Drop every mapping made through this object and the descriptor.
        Mappings still exported (a live memoryview) raise BufferError."""
        while self._maps:
            self._maps.pop().close()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self._ro_fd >= 0:
            os.close(self._ro_fd)
            self._ro_fd = -1

    def __enter__(self) -> ShmObject:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def send_handles(sock: socket.socket, payload: bytes, fds: Sequence[int]) -> None:
    """Send ``payload`` with descriptors attached (SCM_RIGHTS)."""
    socket.send_fds(sock, [payload], list(fds))


def recv_handles(sock: socket.socket, max_fds: int, bufsize: int = 65536) -> tuple[bytes, list[int]]:
    """Receive one message and the descriptors that came with it."""
    msg, fds, _flags, _addr = socket.recv_fds(sock, bufsize, max_fds)
    return msg, fds


def remove_stale(shm_dir: str = SHM_DIR) -> list[str]:
    """Unlink xmp objects whose owning supervisor is dead; return their names."""
    removed: list[str] = []
    try:
        entries = os.listdir(shm_dir)
    except FileNotFoundError:
        return removed
    for entry in entries:
        m = _NAME_RE.match(entry)
        if not m or psutil.pid_exists(int(m.group(1))):
            continue
        try:
            os.unlink(os.path.join(shm_dir, entry))
            removed.append(entry)
        except FileNotFoundError:
            pass
    return removed


def leftovers(shm_dir: str = SHM_DIR) -> list[str]:
    """Every xmp object currently named in ``/dev/shm`` (for leak checks)."""
    try:
        return sorted(e for e in os.listdir(shm_dir) if e.startswith("xmp."))
    except FileNotFoundError:
        return []
