"""Log-dirty tracking of a domain's RAM: the OS side of Xen's
XEN_DOMCTL_SHADOW_OP_{ENABLE_LOGDIRTY,CLEAN,PEEK,OFF}.

Two trackers with one interface (``clean``/``peek`` a window of pfns into a
Xen dirty bitmap, ``mark`` a pfn the hypervisor itself wrote, ``close``):

* :class:`UffdTracker` -- userfaultfd write-protect in asynchronous mode
  over the *guest process's own* mapping of its RAM, scanned and re-armed
  with PAGEMAP_SCAN on ``/proc/PID/pagemap`` (logdirty.c has the theory).
  A userfaultfd acts on the address space of the process that created it,
  so the guest's boot code creates one (:func:`guest_uffd`, before its
  kernel runs) and the supervisor takes a duplicate with pidfd_getfd; the
  RAM's address is read from ``/proc/PID/maps`` by the RAM's inode, never
  from anything the guest says.  A guest that unmaps or replaces that
  mapping makes the scan fail (PM_SCAN_CHECK_WPASYNC): every populated page
  is then reported dirty, and the tracker says it broke.  The guest keeps
  its own reference to the userfaultfd, so a hostile guest can re-protect
  pages it wrote and hide those writes -- from its own migration only: the
  stale pages are its own, on the destination (no other domain's memory is
  reachable this way).  Hashing is the tracker a guest cannot fool.
  The uffd is user-mode-only, which any process may make; what needs root
  (CAP_SYS_PTRACE) is the supervisor's access to a non-dumpable guest
  (``/proc/PID/maps`` and ``pagemap``, pidfd_getfd): without it
  :func:`open_tracker` falls back to hashing and says why.
* :class:`HashTracker` -- a 64-bit hash per populated page, compared with
  the last round's, over the supervisor's own mapping: it sees every
  writer, at the cost of reading all of RAM per round.

Writes the guest's mapping does not see -- dom0 writing through a grant
mapping, the hypervisor's grant copies -- are ``mark``-ed by the
hypervisor, as Xen calls paging_mark_dirty on those paths.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from xmp.errors import LocalError
from xmp.sharedmem._ffi import ffi, lib
from xmp.sharedmem.shm import PAGE_SIZE

UFFD_LINK = "anon_inode:[userfaultfd]"


def bitmap_size(nr_pfns: int) -> int:
    return (nr_pfns + 7) // 8


def bitmap_pfns(bitmap: bytes | bytearray, first: int = 0) -> list[int]:
    """The pfns set in a Xen dirty bitmap whose bit 0 is ``first``."""
    out = []
    for i, byte in enumerate(bitmap):
        while byte:
            low = byte & -byte
            out.append(first + i * 8 + low.bit_length() - 1)
            byte ^= low
    return out


def guest_uffd() -> int:
    """Run by a domain process before its kernel: a userfaultfd of its own
    address space for the hypervisor to take, or -errno when this host
    refuses one (the hypervisor then hashes)."""
    return lib.xmp_uffd_open()


def find_mapping(pid: int, inode: int) -> tuple[int, int]:
    """(start, length) of ``pid``'s one mapping of the shm object ``inode``
    from offset 0; LocalError if it has none or more than one (a second
    mapping would be written untracked)."""
    found = []
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            fields = line.split()
            if len(fields) >= 5 and fields[4] == str(inode):
                lo, hi = (int(x, 16) for x in fields[0].split("-"))
                found.append((lo, hi - lo, int(fields[2], 16)))
    if len(found) != 1 or found[0][2] != 0:
        raise LocalError(f"process {pid} maps its RAM {len(found)} times, not once from offset 0")
    return found[0][0], found[0][1]


def find_uffd(pid: int) -> int:
    """The descriptor number of a userfaultfd in ``pid`` (LocalError if none)."""
    base = f"/proc/{pid}/fd"
    for name in os.listdir(base):
        try:
            if os.readlink(f"{base}/{name}") == UFFD_LINK:
                return int(name)
        except OSError:
            continue
    raise LocalError(f"process {pid} holds no userfaultfd")


class Tracker:
    kind = ""
    broken: str | None = None  # why it stopped tracking (every page is then dirty)

    def __init__(self, nr_pfns: int, populated: Sequence[int]):
        self.nr_pfns = nr_pfns
        self.populated = populated
        self.marked = bytearray(bitmap_size(nr_pfns))

    def mark(self, pfn: int) -> None:
        if 0 <= pfn < self.nr_pfns:
            self.marked[pfn >> 3] |= 1 << (pfn & 7)

    def _window(self, first: int, count: int | None) -> int:
        count = self.nr_pfns - first if count is None else count
        if first < 0 or count < 0 or first + count > self.nr_pfns:
            raise LocalError(f"pfns {first}..{first + count} outside 0..{self.nr_pfns}")
        return count

    def _scan(self, first: int, count: int, clean: bool, bitmap: bytearray) -> None:
        raise NotImplementedError

    def scan(self, first: int = 0, count: int | None = None, *, clean: bool) -> bytearray:
        """The dirty bitmap of pfns [first, first+count); ``clean`` starts
        the next round for those pfns (CLEAN), else it only looks (PEEK)."""
        count = self._window(first, count)
        bitmap = bytearray(bitmap_size(count))
        if self.broken is None:
            self._scan(first, count, clean, bitmap)
        if self.broken is not None:
            for pfn in range(first, first + count):
                if self.populated[pfn]:
                    bitmap[(pfn - first) >> 3] |= 1 << ((pfn - first) & 7)
        # the hypervisor's own marks, shifted into this window
        for pfn in bitmap_pfns(self.marked[first >> 3:bitmap_size(first + count)], first & ~7):
            if first <= pfn < first + count:
                bitmap[(pfn - first) >> 3] |= 1 << ((pfn - first) & 7)
                if clean:
                    self.marked[pfn >> 3] &= ~(1 << (pfn & 7)) & 0xFF
        return bitmap

    def close(self) -> None:
        pass


class HashTracker(Tracker):
    kind = "hash"

    def __init__(self, ram_map, nr_pfns: int, populated: bytearray):
        super().__init__(nr_pfns, populated)
        self._mem = ffi.from_buffer(ram_map)
        self._populated = ffi.from_buffer(populated)
        self._hashes = ffi.new("uint64_t[]", nr_pfns)
        scratch = bytearray(bitmap_size(nr_pfns))
        lib.xmp_hash_scan(self._mem, self._populated, 0, nr_pfns, self._hashes, 1, ffi.from_buffer(scratch))

    def _scan(self, first: int, count: int, clean: bool, bitmap: bytearray) -> None:
        lib.xmp_hash_scan(self._mem, self._populated, first, count, self._hashes, int(clean),
                          ffi.from_buffer(bitmap))

    def close(self) -> None:
        if self._mem is not None:  # the RAM cannot be unmapped while we export it
            ffi.release(self._mem)
            ffi.release(self._populated)
        self._mem = self._populated = self._hashes = None


class UffdTracker(Tracker):
    kind = "userfaultfd"

    def __init__(self, pid: int, ram_fd: int, nr_pfns: int, populated: bytearray):
        super().__init__(nr_pfns, populated)
        self.uffd = self.pagemap = -1
        self.pid, self.inode = pid, os.fstat(ram_fd).st_ino
        self.start, length = find_mapping(pid, self.inode)
        if length != nr_pfns * PAGE_SIZE:
            raise LocalError(f"process {pid} maps {length} bytes of its RAM, not {nr_pfns * PAGE_SIZE}")
        theirs = find_uffd(pid)
        self.uffd = lib.xmp_pidfd_getfd(pid, theirs)
        if self.uffd < 0:
            raise OSError(-self.uffd, f"pidfd_getfd of process {pid}'s userfaultfd")
        try:
            self.pagemap = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            os.close(self.uffd)
            raise
        rc = lib.xmp_uffd_wp_start(self.uffd, self.start, length)
        if rc:
            self.close()
            raise OSError(-rc, "registering the guest's RAM for userfaultfd write-protect")

    def _scan(self, first: int, count: int, clean: bool, bitmap: bytearray) -> None:
        # A new mapping elsewhere is not armed, and a scan of the old range
        # (a hole now) would find nothing: look first (a few hundred lines).
        where: tuple[int, int] | str
        try:
            where = find_mapping(self.pid, self.inode)
        except (OSError, LocalError) as exc:
            where = str(exc)
        if where != (self.start, self.nr_pfns * PAGE_SIZE):
            self.broken = f"the guest's RAM mapping moved or went: {where}"
            return
        rc = lib.xmp_logdirty_scan(self.pagemap, self.start + first * PAGE_SIZE, count, int(clean),
                                   ffi.from_buffer(bitmap))
        if rc < 0:
            self.broken = f"PAGEMAP_SCAN failed: {os.strerror(-rc)} (the guest's RAM mapping changed?)"

    def close(self) -> None:
        if self.uffd >= 0:
            # the guest keeps its own reference: disarm the range, or a later
            # enable would find it still registered
            lib.xmp_uffd_wp_stop(self.uffd, self.start, self.nr_pfns * PAGE_SIZE)
        for fd in (self.pagemap, self.uffd):
            if fd >= 0:
                os.close(fd)
        self.pagemap = self.uffd = -1


def open_tracker(pid: int | None, ram_fd: int, ram_map, nr_pfns: int, populated: bytearray,
                 prefer: str = "userfaultfd") -> tuple[Tracker, str | None]:
    """The best tracker this host allows for the domain, and why it is not
    the userfaultfd one (None when it is)."""
    why = "page hashing asked for"
    if prefer == "userfaultfd":
        if pid is None:
            why = "the domain has no process"
        else:
            try:
                return UffdTracker(pid, ram_fd, nr_pfns, populated), None
            except (OSError, LocalError) as exc:
                why = f"userfaultfd unavailable: {exc}"
    return HashTracker(ram_map, nr_pfns, populated), why
