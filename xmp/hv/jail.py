"""Jailing a domain process, as Firecracker's jailer does for a VMM.

A guest (domU) must reach nothing it was not given: every object it uses
(RAM, event object, hypercall channel, log) arrives as a descriptor, so it
needs no path, no peer process and no privilege.  When xmp runs as root the
zygote jails each guest between fork and kernel entry, in this order:

1. *Before the fork* (in the zygote): ``unshare(CLONE_NEWPID)``, so the
   child is init of a PID namespace of its own (it sees and can signal no
   other process); the zygote then ``setns``-es back, so its later children
   start in its namespace again.  The supervisor still SIGKILLs, SIGSTOPs and
   reads the CPU time of the domain by its host pid.
2. IPC and network namespaces of its own; then, still root and still in
   the host's mount namespace, the *network namespace hooks* run
   (:func:`on_guest_netns`: where the net driver gives a guest its TAP
   ``eth0``); then the jail's mount namespace.  Its root is an empty
   tmpfs holding read-only bind mounts of exactly what Python needs to keep
   importing -- ``sys.prefix``, ``sys.base_prefix``, the ``sys.path``
   directories (PYTHONPATH included), the directories of loaded packages that
   an import hook maps (editable installs), the loaded shared libraries'
   directories, ``/etc/ld.so.cache``, ``/dev/null``, ``/dev/urandom`` -- then
   ``pivot_root`` and the host's tree is detached.  Nothing is writable; there
   is no /dev/shm, no socket path, and /proc is the procfs of the guest's own
   PID namespace (itself only).  No network but a loopback that
   is down and what a hook put there: a Xen guest's network is netfront.
3. Its own uid and gid from ``[host] guest_uids``: base + domid when free,
   else the next free one; a uid is held by the zygote (an abstract-socket
   name, host-wide per network namespace) until it has reaped the domain, so
   two running guests never share one, across supervisors too.
   ``setgroups([])``, ``setresgid``, ``setresuid`` -- after which the process
   holds no capability; the bounding set is emptied before that.
4. ``PR_SET_NO_NEW_PRIVS`` and a seccomp filter (libseccomp through
   `pyseccomp`): a deny-list of what a guest kernel never needs and what
   opens the kernel's attack surface (ptrace, the mount family, namespaces,
   module and kexec loading, bpf, perf, keys, ...) answered with EPERM;
   ``clone3`` with ENOSYS, so libc falls back to ``clone``, whose namespace
   flags the filter can see.

Driver domains open image files by path, so they keep the host's mount
and uid; as root they get a PID namespace of their own (1. above: they
signal no other process, the supervisor included) and a network namespace
of their own, owned by a user namespace of their own (uid and gid 0 mapped
to themselves), with CAP_NET_ADMIN kept there, their only capability -- so
it reaches nothing of the host's network: a network
driver domain makes its TAPs and bridges there, as a Xen one owns its
NICs, and the toolstack joins each of its bridges to the host's of that
name by a veth pair (which goes with the namespace).  Always the seccomp
filter and no-new-privs.  A uid 0 process without capabilities
can still write root's files that have an owner write bit: a driver domain
is trusted with the host's files, as Xen's storage driver domains are
trusted with their disks.  dom0 is not jailed at all.

Without root none of 1-3 can be had (no user namespaces are used): a guest
runs as the user who runs xmp, with no capability, no-new-privs, seccomp
and non-dumpable -- it cannot read other domains' memory through /proc, but
it can signal the user's processes and write the user's files.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import socket
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from xmp.errors import XmpError
from xmp.topology import GUEST_UIDS

CLONE_NEWNS = 0x00020000
CLONE_NEWIPC = 0x08000000
CLONE_NEWNET = 0x40000000
CLONE_NEWPID = 0x20000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWTIME = 0x00000080

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
MNT_DETACH = 2
PR_CAPBSET_DROP = 24
CAP_NET_ADMIN = 12
PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 22, 2
_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "riscv64": 41, "ppc64le": 203, "s390x": 217}

# Where the new root is assembled: a directory that exists on every Linux
# host running xmp and holds nothing Python needs (covering it in our own
# mount namespace hides nothing we bind).
_STAGE = "/dev/shm"
_FILES = ("/dev/null", "/dev/urandom", "/etc/ld.so.cache")
# Threads and processes a guest may have (its own uid: the limit is its own).
NPROC_LIMIT = 512

DENIED_SYSCALLS = (
    "ptrace", "process_vm_readv", "process_vm_writev", "kcmp", "pidfd_getfd",
    "mount", "umount2", "pivot_root", "chroot", "move_mount", "open_tree", "fsopen", "fsconfig",
    "fsmount", "fspick", "mount_setattr", "unshare", "setns",
    "kexec_load", "kexec_file_load", "reboot", "init_module", "finit_module", "delete_module",
    "bpf", "perf_event_open", "userfaultfd", "keyctl", "add_key", "request_key",
    "swapon", "swapoff", "acct", "quotactl", "quotactl_fd", "settimeofday", "clock_settime",
    "clock_adjtime", "adjtimex", "sethostname", "setdomainname", "iopl", "ioperm",
    "name_to_handle_at", "open_by_handle_at", "lookup_dcookie", "vhangup", "fanotify_init",
    "io_uring_setup", "io_uring_enter", "io_uring_register", "syslog", "personality", "uselib",
)
_NS_FLAGS = (CLONE_NEWNS, CLONE_NEWIPC, CLONE_NEWNET, CLONE_NEWPID, CLONE_NEWUSER, CLONE_NEWUTS,
             CLONE_NEWCGROUP, CLONE_NEWTIME)

_libc = ctypes.CDLL(None, use_errno=True)

# setup(domid, config) -> descriptors the domain keeps; see on_guest_netns.
NetnsSetup = Callable[[int, dict], Iterable[int]]
_NETNS_SETUP: list[NetnsSetup] = []


def on_guest_netns(setup: NetnsSetup) -> NetnsSetup:
    """Register a hook run in every jailed guest between the creation of its
    network namespace and the drop of its privileges -- the one moment a
    guest's own network can be set up (a TAP ``eth0`` made and configured).

    ``setup(domid, config)`` runs in the new domain process, inside the
    guest's own network namespace, as root with every capability, still in
    the host's mount namespace (so ``/dev/net/tun`` opens); ``config`` is
    the domain's :class:`~xmp.topology.DomainConfig` as a dict.  It returns
    the descriptors the domain must keep (the zygote closes every other
    one before the kernel runs); the hook's own module keeps their numbers
    for the domain's code, which runs in the same process after the fork.
    An exception fails the domain (its log says why).  Register at import
    of a module the zygote preloads (a device class's frontend), so the
    zygote holds the hook before it forks.  Hooks run only where a guest
    has a network namespace of its own: when xmp runs as root."""
    _NETNS_SETUP.append(setup)
    return setup


class JailError(XmpError):
    """A step of jailing a domain failed; the domain must not run."""

    def __init__(self, step: str, err: int):
        self.step = step
        self.errno = err
        super().__init__(step, err)

    def __str__(self) -> str:
        return f"jail: {self.step}: {errno.errorcode.get(self.errno, self.errno)} ({os.strerror(self.errno)})"


def _check(rc: int, step: str) -> None:
    if rc != 0:
        raise JailError(step, ctypes.get_errno())


def _enc(s: str | None) -> bytes | None:
    return None if s is None else s.encode()


def _mount(src: str | None, dst: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    enc = _enc
    _check(_libc.mount(enc(src), enc(dst), enc(fstype), ctypes.c_ulong(flags), enc(data)),
           f"mount {src or fstype} on {dst}")


def unshare(flags: int) -> None:
    _check(_libc.unshare(flags), f"unshare({flags:#x})")


# -- seccomp -----------------------------------------------------------------


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def _build_filter() -> tuple[bytes | None, str]:
    """The deny-list compiled to classic BPF by libseccomp (through
    pyseccomp), or (None, why not).  Compiled once: a domain loads the bytes
    with one prctl, where libseccomp's own load would compile it again in
    every domain (0.7 ms of each creation here)."""
    try:
        import pyseccomp as sc
    except (ImportError, RuntimeError, OSError) as exc:  # RuntimeError: no libseccomp.so
        return None, f"seccomp filter not loaded: pyseccomp/libseccomp unavailable ({exc}); " \
                     "install libseccomp2 and pyseccomp"
    filt = sc.SyscallFilter(sc.ALLOW)
    denied = 0
    for name in DENIED_SYSCALLS:
        try:
            filt.add_rule(sc.ERRNO(errno.EPERM), name)
            denied += 1
        except (OSError, ValueError, RuntimeError):  # not a call of this architecture
            pass
    for flag in _NS_FLAGS:
        filt.add_rule(sc.ERRNO(errno.EPERM), "clone", sc.Arg(0, sc.MASKED_EQ, flag, flag))
    filt.add_rule(sc.ERRNO(errno.ENOSYS), "clone3")
    fd = os.memfd_create("xmp-seccomp", os.MFD_CLOEXEC)
    try:
        with os.fdopen(os.dup(fd), "wb") as f:
            filt.export_bpf(f)
        prog = os.pread(fd, 1 << 20, 0)
    finally:
        os.close(fd)
    return prog, f"seccomp: {denied} calls denied, clone without namespaces, no clone3"


def load_filter(prog: bytes) -> None:
    """Install a compiled filter (needs no-new-privs set first)."""
    buf = ctypes.create_string_buffer(prog, len(prog))
    fprog = _SockFprog(len(prog) // 8, ctypes.cast(buf, ctypes.c_void_p))
    _check(_libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0), "seccomp filter")


# -- the root of a jail --------------------------------------------------------


def _under(path: str, roots: list[str]) -> bool:
    return any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)


def _library_dirs() -> set[str]:
    dirs = set()
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                parts = line.split(None, 5)
                if len(parts) == 6 and parts[5].startswith("/") and ".so" in parts[5]:
                    dirs.add(os.path.dirname(parts[5].rstrip("\n")))
    except OSError:
        pass
    return dirs


def jail_sources() -> tuple[list[str], list[str]]:
    """(directories, files) a jailed Python needs, as real paths, outermost
    directories only.  Computed in the zygote, which has imported what the
    domains will use."""
    want = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
            *(p for p in sys.path if p), *_library_dirs()}
    for mod in list(sys.modules.values()):
        # Packages found by an import hook (an editable install maps xmp to its
        # source tree) are on no sys.path entry: their own directory is needed.
        f = getattr(mod, "__file__", None)
        if isinstance(f, str) and os.path.isabs(f):
            want.add(os.path.dirname(f))
    outer: list[str] = []  # realpath() costs a stat per component: only for the outermost
    for p in sorted(want, key=len):
        if not _under(p, outer):
            outer.append(p)
    real = sorted({os.path.realpath(p) for p in outer if os.path.isdir(p)}, key=len)
    dirs: list[str] = []
    for p in real:
        if not _under(p, dirs):
            dirs.append(p)
    files = [os.path.realpath(f) for f in _FILES if os.path.exists(f)]
    return dirs, [f for f in files if not _under(f, dirs)]


def _mkdirs(root: str, path: str) -> str:
    target = root + path
    os.makedirs(target, mode=0o755, exist_ok=True)
    return target


def _bind_ro(src: str, dst: str, dev: bool = False) -> None:
    _mount(src, dst, None, MS_BIND)
    flags = MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | (0 if dev else MS_NODEV)
    _mount(None, dst, None, flags)


def build_root(dirs: list[str], files: list[str], links: list[tuple[str, str]]) -> None:
    """In a fresh mount namespace: an empty read-only root holding only
    `dirs` and `files`, bound read-only, and the host's top-level symlinks
    (`links`: /lib -> usr/lib on merged-/usr systems, which ld.so.cache's
    paths go through); then pivot_root and the old root detached."""
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    _mount("xmp-jail", _STAGE, "tmpfs", MS_NOSUID | MS_NODEV, "size=256k,mode=0755")
    old = os.umask(0o022)
    try:
        for d in dirs:
            _bind_ro(d, _mkdirs(_STAGE, d))
        for f in files:
            _mkdirs(_STAGE, os.path.dirname(f))
            os.close(os.open(_STAGE + f, os.O_CREAT | os.O_WRONLY, 0o644))
            _bind_ro(f, _STAGE + f, dev=f.startswith("/dev/"))
        for name, target in links:
            if not os.path.lexists(_STAGE + name):
                os.symlink(target, _STAGE + name)
        _mkdirs(_STAGE, "/proc")  # where each guest mounts the procfs of its own PID namespace
    finally:
        os.umask(old)
    os.chdir(_STAGE)
    nr = _PIVOT_ROOT.get(platform.machine())
    if nr is None:
        raise JailError(f"pivot_root: unknown system call number on {platform.machine()}", errno.ENOSYS)
    # pivot_root(".", "."): the old root ends up stacked on the new one and is
    # detached at once, so no directory for it is needed.
    _check(_libc.syscall(nr, b".", b"."), "pivot_root")
    _check(_libc.umount2(b".", MNT_DETACH), "umount the host's root")
    os.chdir("/")
    _mount(None, "/", None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)


def mount_own_proc() -> None:
    """A procfs of this process's own PID namespace on the jail's /proc, in
    a mount namespace copied from the template (a dozen mounts).  The guest
    is the only process there, so /proc shows it itself and nothing else
    (``subset=pid``: not even the host-wide files such as /proc/sys, on Linux
    5.8+).  Its own /proc/self/fd is what a guest -- a hostile one too --
    can reopen its descriptors through; the wake page's seal holds there."""
    unshare(CLONE_NEWNS)
    flags = MS_NOSUID | MS_NODEV | MS_NOEXEC
    if _libc.mount(b"proc", b"/proc", b"proc", ctypes.c_ulong(flags), b"subset=pid") != 0:
        _mount("proc", "/proc", "proc", flags)  # an older kernel: no subset=


def _top_level_links() -> list[tuple[str, str]]:
    out = []
    for name in os.listdir("/"):
        path = "/" + name
        if os.path.islink(path):
            out.append((path, os.readlink(path)))
    return out


# -- uids ----------------------------------------------------------------------


def claim_uid(first: int, last: int, preferred: int) -> tuple[int, socket.socket]:
    """A uid of [first, last] no other running guest holds, and the socket
    that holds it (close it once the domain is reaped).  An abstract socket
    name is the lock: it is host-wide, and the kernel frees it when its
    holder dies, so a killed zygote leaves nothing behind."""
    span = last - first + 1
    start = (preferred - first) % span
    for i in range(span):
        uid = first + (start + i) % span
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            sock.bind(f"\0xmp-guest-uid-{uid}")
        except OSError:
            sock.close()
            continue
        return uid, sock
    raise JailError(f"every uid of {first}-{last} is held by a running guest", errno.EAGAIN)


def _map_own_ids(uid: int, gid: int) -> None:
    """In a new user namespace: map our own uid and gid (the parent's, taken
    before the unshare) to themselves -- the one mapping a process may write
    for itself (setgroups denied first, as the kernel asks then)."""
    with open("/proc/self/setgroups", "w") as f:
        f.write("deny")
    for name, own in (("uid_map", uid), ("gid_map", gid)):
        with open(f"/proc/self/{name}", "w") as f:
            f.write(f"{own} {own} 1")


def _up_loopback() -> None:
    """``lo`` up in this (new) network namespace: SIOCSIFFLAGS, no netlink."""
    import fcntl
    import struct

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        req = struct.pack("16sH22x", b"lo", 0)
        flags = struct.unpack("16sH22x", fcntl.ioctl(s, 0x8913, req))[1]  # SIOCGIFFLAGS
        fcntl.ioctl(s, 0x8914, struct.pack("16sH22x", b"lo", flags | 1))  # SIOCSIFFLAGS, IFF_UP


def drop_to(uid: int) -> None:
    """The bounding set emptied (no exec can regain a capability), the
    process limit set for this uid, then every uid and gid set to `uid`: the
    kernel clears every capability with the last root uid."""
    import resource

    for cap in range(64):
        if _libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0 and ctypes.get_errno() == errno.EINVAL:
            break
    resource.setrlimit(resource.RLIMIT_NPROC, (NPROC_LIMIT, NPROC_LIMIT))
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)


# -- the zygote's side ---------------------------------------------------------


def _template_namespace(dirs: list[str], files: list[str]) -> int:
    """A mount namespace holding the jail's root, kept alive by the
    descriptor returned.  Built once by a short-lived child (the zygote
    keeps the host's tree); every guest then enters it with one setns,
    instead of copying the host's mounts and binding everything again."""
    ready_r, ready_w = os.pipe()
    done_r, done_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            os.close(ready_r)
            os.close(done_w)
            unshare(CLONE_NEWNS)
            build_root(dirs, files, _top_level_links())
            os.write(ready_w, b"ok")
            os.read(done_r, 1)
            status = 0
        except BaseException as exc:
            os.write(ready_w, str(exc).encode()[:512])
        finally:
            os._exit(status)
    os.close(ready_w)
    os.close(done_r)
    try:
        answer = os.read(ready_r, 512)
        if answer != b"ok":
            raise JailError(f"building the jail's root: {answer.decode(errors='replace')}", errno.EIO)
        return os.open(f"/proc/{pid}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        os.close(ready_r)
        os.close(done_w)
        os.waitpid(pid, 0)


@dataclass
class Jailer:
    """Everything the zygote prepares once, and the steps it runs around
    each fork.  ``rooted``: xmp runs as root, so guests get the full jail."""

    guest_uids: tuple[int, int] = GUEST_UIDS
    rooted: bool = field(default_factory=lambda: os.geteuid() == 0)
    _filter: bytes | None = None
    _filter_note: str = ""
    _sources: tuple[list[str], list[str]] | None = None
    _root_ns: int = -1  # the template mount namespace (for _sources)
    _sources_key: tuple = ()
    _own_pidns: int = -1

    def __post_init__(self) -> None:
        self._filter, self._filter_note = _build_filter()
        if self.rooted:
            self._own_pidns = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)

    def _root_for_now(self) -> None:
        """Rebuild the template root when what Python needs changed (a
        preload imported a package from a new place)."""
        key = (tuple(sys.path), len(sys.modules))  # sources are costly to find: only after imports
        if key == self._sources_key and self._root_ns >= 0:
            return
        sources = jail_sources()
        self._sources_key = key
        if sources != self._sources or self._root_ns < 0:
            fd = _template_namespace(*sources)
            if self._root_ns >= 0:
                os.close(self._root_ns)
            self._root_ns, self._sources = fd, sources

    # before fork, in the zygote
    def prepare(self, kind: str | None, domid: int) -> tuple[int | None, socket.socket | None, bool]:
        """(uid, its lock, whether the next child gets its own PID namespace)."""
        if kind not in ("guest", "driver") or not self.rooted:
            return None, None, False
        uid, lock = None, None
        if kind == "guest":
            self._root_for_now()
            uid, lock = claim_uid(*self.guest_uids, self.guest_uids[0] + domid)
        try:
            unshare(CLONE_NEWPID)
        except JailError:
            return uid, lock, False  # a guest's uid still keeps it from signalling others
        return uid, lock, True

    # after fork, in the zygote
    def after_fork(self, pidns: bool) -> None:
        if pidns:
            _check(_libc.setns(self._own_pidns, CLONE_NEWPID), "setns back to the zygote's PID namespace")

    # after fork, in the domain
    def enter(self, kind: str | None, uid: int | None, pidns: bool, domid: int,
              config: dict) -> tuple[str, list[int]]:
        """Jail this process; (a line for the domain's log, the descriptors
        the network namespace hooks keep)."""
        notes = []
        keep: list[int] = []
        if kind == "guest" and self.rooted and uid is not None:
            unshare(CLONE_NEWIPC | CLONE_NEWNET)
            for setup in _NETNS_SETUP:
                keep.extend(setup(domid, config))
            # The shared root is read-only and no guest can mount: sharing it
            # costs nothing in isolation.  IPC and network stay per guest.
            _check(_libc.setns(self._root_ns, CLONE_NEWNS), "setns into the jail's root")
            os.chdir("/")
            if pidns:
                mount_own_proc()
            drop_to(uid)
            notes.append(f"uid {uid}, namespaces {'pid,' if pidns else ''}mnt,ipc,net, read-only root"
                         + (", /proc of itself only" if pidns else ""))
        elif kind == "guest":
            notes.append("not root: host uid and namespaces (no capabilities)")
        elif kind == "driver" and self.rooted:
            # A network driver domain owns its NICs and bridges, as in Xen: a
            # network namespace of its own, CAP_NET_ADMIN over it alone (kept_caps);
            # the toolstack joins its bridges to the host's with a veth pair.
            # Owned by a user namespace of its own (uid and gid 0 mapped to themselves):
            # CAP_NET_ADMIN then counts there only, never in the host's namespaces --
            # without it the capability would also reach the host's network (a link
            # moved in by a descriptor of /proc/1/ns/net).
            ids = os.geteuid(), os.getegid()
            unshare(CLONE_NEWUSER | CLONE_NEWNET)
            _map_own_ids(*ids)
            _up_loopback()
            own_pid = ", own PID namespace" if pidns else ""
            notes.append("driver domain: host uid and mount, own network namespace (CAP_NET_ADMIN "
                         f"there only, through a user namespace of its own){own_pid}")
        else:
            notes.append("driver domain: host uid and namespaces (no capabilities)")
        notes.append(self._filter_note)
        return "jail: " + "; ".join(notes), keep

    def kept_caps(self, kind: str | None) -> int:
        """The capabilities a jailed domain keeps (a bit per CAP_*): a
        driver domain, CAP_NET_ADMIN over the network namespace it got."""
        return 1 << CAP_NET_ADMIN if kind == "driver" and self.rooted else 0

    # last, once nothing needs a denied call any more
    def seal(self) -> None:
        if self._filter is not None:
            load_filter(self._filter)


def describe(rooted: bool | None = None) -> list[str]:
    """What isolation guests get on this installation (for ``xmp info``)."""
    rooted = os.geteuid() == 0 if rooted is None else rooted
    _, note = _build_filter()
    if rooted:
        head = ("guests: own uid (from [host] guest_uids), own pid/mount/ipc/net namespaces, "
                "read-only root of Python only, a /proc of itself only, no capabilities, no-new-privs")
    else:
        head = ("guests: not root, so no own uid or namespaces: they run as this user with no "
                "capabilities, no-new-privs, non-dumpable (they can signal this user's processes "
                "and write this user's files)")
    caps = "own pid and network namespaces, CAP_NET_ADMIN there only, " if rooted else "no capabilities, "
    drivers = "driver domains: host uid and files, " + caps + "no-new-privs, seccomp"
    return [head, note, drivers, "dom0: not jailed"]
