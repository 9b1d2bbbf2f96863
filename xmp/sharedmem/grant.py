"""Grant tables, v1 (``xen/include/public/grant_table.h``).

A domain shares a page by writing an entry in its own grant table::

    struct grant_entry_v1 { u16 flags; u16 domid; u32 frame; }   /* 8 bytes */

``domid`` is the grantee, ``frame`` the granter's pfn.  Flag bits: type in
bits 0-1 (``GTF_permit_access`` = 1), ``GTF_readonly`` (bit 2, set by the
granter), ``GTF_reading``/``GTF_writing`` (bits 3/4, set by the hypervisor
while a mapping is live).  Refs 0-7 are reserved; 0 is the console page and
1 the xenstore page, filled in by the domain builder.

Two halves, as in Xen:

* :class:`GrantTable` -- the granting domain's side: grant, end access
  (refused while mapped: revocation is cooperative), make read-only.
* :class:`ActiveGrants` -- the hypervisor's private "active entries" for one
  granting domain: pin counts behind ``map``/``unmap``/``copy``.  The check
  (permit bit, grantee domid, read-only respected) and the in-use bits are
  one compare-and-swap on the 32-bit ``flags|domid`` word, in C.
"""

from __future__ import annotations

import errno
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from xmp.errors import GNTST_NAMES, GrantError, HypercallError, LocalError
from xmp.sharedmem._ffi import ffi, lib
from xmp.sharedmem.page import PAGE_SIZE

GRANT_ENTRY_SIZE = 8
ENTRIES_PER_FRAME = PAGE_SIZE // GRANT_ENTRY_SIZE  # 512
GNTTAB_NR_RESERVED_ENTRIES = 8
GNTTAB_RESERVED_CONSOLE = 0
GNTTAB_RESERVED_XENSTORE = 1

GTF_invalid = 0
GTF_permit_access = 1
GTF_type_mask = 3
GTF_readonly = 1 << 2
GTF_reading = 1 << 3
GTF_writing = 1 << 4

GNTST_okay = 0
GNTST_bad_domain = -2
GNTST_bad_gntref = -3
GNTST_permission_denied = -8
GNTST_bad_page = -9
GNTST_bad_copy_arg = -10


def gntst_name(status: int) -> str:
    return GNTST_NAMES.get(status, f"GNTST({status})")


def _table(buf):
    mem = ffi.from_buffer("uint8_t[]", buf, require_writable=True)
    if len(mem) % GRANT_ENTRY_SIZE or int(ffi.cast("uintptr_t", mem)) % 8:
        raise LocalError("grant table memory must be 8-byte aligned whole entries")
    return mem, ffi.cast("xmp_grant_entry_t *", mem), len(mem) // GRANT_ENTRY_SIZE


class GrantTable:
    """The granting domain's own table (the memory it writes itself)."""

    def __init__(self, buf, domid: int):
        self._mem, self._tab, self.nr_entries = _table(buf)
        self.domid = domid
        # Refs never handed out yet are counted, not listed (64 frames are
        # 32768 refs: a list of them cost milliseconds per domain); refs
        # given back are kept for reuse, most recent first.
        self._next_fresh = GNTTAB_NR_RESERVED_ENTRIES
        self._free: list[int] = []
        self._free_set: set[int] = set()
        self._deferred: list[int] = []  # ended while still mapped: see end_foreign_access_later

    def grant_access(self, ref: int, domid: int, frame: int, readonly: bool = False) -> None:
        """Fill ``ref``: domid and frame, a barrier, then the flags."""
        self._check_ref(ref)
        lib.xmp_gnttab_grant(self._tab, ref, domid, frame, int(readonly))

    def grant_foreign_access(self, domid: int, frame: int, readonly: bool = False) -> int:
        """Pick a free ref (never a reserved one), grant it, return it."""
        if self._free:
            ref = self._free.pop()
            self._free_set.discard(ref)
        elif self._next_fresh < self.nr_entries:
            ref = self._next_fresh
            self._next_fresh += 1
        else:
            raise HypercallError(errno.ENOSPC, "grant_foreign_access",
                                 f"all {self.nr_entries} grant entries in use")
        self.grant_access(ref, domid, frame, readonly)
        return ref

    def end_foreign_access(self, ref: int) -> None:
        """Revoke ``ref``.  Refused (EBUSY) while the grantee has it mapped:
        Xen never pulls a page from under a live mapping."""
        self._check_ref(ref)
        if lib.xmp_gnttab_end_access(self._tab, ref) != 0:
            raise HypercallError(errno.EBUSY, "end_foreign_access", f"gref {ref} is mapped")
        if GNTTAB_NR_RESERVED_ENTRIES <= ref < self._next_fresh and ref not in self._free_set:
            self._free.append(ref)
            self._free_set.add(ref)

    def end_foreign_access_later(self, ref: int) -> None:
        """End access now if nobody maps ``ref``; otherwise keep it and try
        again at every later call (Linux defers gnttab_end_foreign_access the
        same way): a backend that died still holding it lets go eventually."""
        self._deferred.append(ref)
        self.retry_deferred()

    def deferred_refs(self) -> frozenset[int]:
        """Refs whose end is still waiting for their grantee to unmap them."""
        return frozenset(self._deferred)

    def retry_deferred(self) -> None:
        still = []
        for ref in self._deferred:
            try:
                self.end_foreign_access(ref)
            except HypercallError:
                still.append(ref)
        self._deferred = still

    def make_readonly(self, ref: int) -> None:
        self._check_ref(ref)
        if lib.xmp_gnttab_make_readonly(self._tab, ref) != 0:
            raise HypercallError(errno.EBUSY, "make_readonly", f"gref {ref} is mapped writable")

    def entry(self, ref: int) -> tuple[int, int, int]:
        """(flags, domid, frame) of ``ref``, for inspection."""
        self._check_ref(ref)
        word = lib.xmp_load32(ffi.cast("uint32_t *", self._mem + ref * GRANT_ENTRY_SIZE))
        frame = lib.xmp_load32(ffi.cast("uint32_t *", self._mem + ref * GRANT_ENTRY_SIZE + 4))
        return word & 0xFFFF, word >> 16, frame

    def _check_ref(self, ref: int) -> None:
        if not 0 <= ref < self.nr_entries:
            raise LocalError(f"gref {ref} outside a table of {self.nr_entries} entries")

    def release(self) -> None:
        ffi.release(self._mem)


@dataclass(frozen=True)
class CopyPtr:
    """One side of a grant copy: ``gref`` in ``table`` (another domain's
    page, checked) or, with ``table`` None, ``frame`` of the caller's own
    memory ``mem``."""

    mem: object
    offset: int
    gref: int | None = None
    frame: int | None = None
    table: ActiveGrants | None = None


class ActiveGrants:
    """The hypervisor's bookkeeping for the grants of one domain.

    ``table_buf`` is that domain's grant table; ``mem`` (optional) is its
    RAM, needed only for :func:`grant_copy`.
    """

    def __init__(self, table_buf, granter: int, mem=None):
        self._mem, self._tab, self.nr_entries = _table(table_buf)
        self.granter = granter
        self._act = ffi.gc(lib.xmp_active_new(self.nr_entries), lib.xmp_active_free)
        if self._act == ffi.NULL:
            raise MemoryError("active grant table")
        self._ram = None if mem is None else ffi.from_buffer("uint8_t[]", mem, require_writable=True)
        # With the granter's memory known, a grant naming a frame outside it is GNTST_bad_page.
        self._frame_limit = 1 << 32 if self._ram is None else len(self._ram) // PAGE_SIZE

    def map_grant_ref(self, refs, mapper: int, readonly: bool = False) -> list[int]:
        """Check and pin every ref for ``mapper``; return their frames.
        All or nothing: on the first failure the pins taken are dropped and
        GrantError names the ref and the GNTST status."""
        n = len(refs)
        c_refs = ffi.new("uint32_t[]", list(refs))
        frames = ffi.new("uint32_t[]", n)
        statuses = ffi.new("int16_t[]", n)
        done = lib.xmp_gnttab_map(self._tab, self.nr_entries, self._act, c_refs, n, mapper,
                                  int(readonly), self._frame_limit, frames, statuses)
        if done != n:
            lib.xmp_gnttab_unmap(self._tab, self._act, c_refs, done, int(readonly))
            raise GrantError(self.granter, refs[done], statuses[done])
        return list(frames)

    def unmap_grant_ref(self, refs, readonly: bool = False) -> None:
        c_refs = ffi.new("uint32_t[]", list(refs))
        lib.xmp_gnttab_unmap(self._tab, self._act, c_refs, len(refs), int(readonly))

    def pins(self, ref: int) -> tuple[int, int]:
        """(readers, writers) currently pinning ``ref``."""
        return (lib.xmp_active_pins(self._act, ref, 0), lib.xmp_active_pins(self._act, ref, 1))

    def release(self) -> None:
        ffi.release(self._mem)
        if self._ram is not None:
            ffi.release(self._ram)


def grant_copy(src: CopyPtr, dst: CopyPtr, length: int, caller: int) -> None:
    """GNTTABOP_copy of one segment; neither side may cross a page."""
    if length < 0 or src.offset < 0 or dst.offset < 0:
        raise GrantError(caller, src.gref or 0, GNTST_bad_copy_arg, "grant_copy")
    keep = []

    def side(p: CopyPtr):
        c = ffi.new("xmp_copy_ptr_t *")
        if p.table is not None:
            if p.table._ram is None:
                raise LocalError(f"dom{p.table.granter}'s memory is needed for a grant copy")
            c.mem, c.mem_len = p.table._ram, len(p.table._ram)
            c.tab, c.nr, c.act, c.ref = p.table._tab, p.table.nr_entries, p.table._act, p.gref
        else:
            mem = ffi.from_buffer("uint8_t[]", p.mem, require_writable=True)
            keep.append(mem)
            c.mem, c.mem_len, c.tab, c.ref = mem, len(mem), ffi.NULL, p.frame
        c.offset = p.offset
        return c

    st = lib.xmp_gnttab_copy(side(src), side(dst), length, caller)
    for m in keep:
        ffi.release(m)
    if st != GNTST_okay:
        bad = src if src.table is not None else dst
        granter = bad.table.granter if bad.table is not None else caller
        raise GrantError(granter, bad.gref if bad.gref is not None else -1, st, "grant_copy")


class CopyBatch:
    """The segments of one GNTTABOP_copy, filled in place and done by one
    call into C: the cost of a grant copy was the Python around each
    segment, not the copy.  A side is a grant (``gref`` in ``table``,
    checked against the caller) or a ``frame`` of the caller's own memory
    (``table`` is then the caller's own, for its RAM)."""

    def __init__(self, n: int) -> None:
        self._src = ffi.new("xmp_copy_ptr_t[]", max(n, 1))
        self._dst = ffi.new("xmp_copy_ptr_t[]", max(n, 1))
        self._len = ffi.new("uint32_t[]", max(n, 1))
        self._index: list[int] = []            # batch slot -> segment
        self.status = [GNTST_okay] * n

    @staticmethod
    def _side(c, table: ActiveGrants, offset: int, gref: int | None, frame: int | None) -> None:
        if table._ram is None:
            raise LocalError(f"dom{table.granter}'s memory is needed for a grant copy")
        c.mem, c.mem_len, c.offset = table._ram, len(table._ram), offset
        if gref is not None:
            c.tab, c.nr, c.act, c.ref = table._tab, table.nr_entries, table._act, gref
        else:
            c.tab, c.ref = ffi.NULL, frame

    def add(self, segment: int, src: tuple, dst: tuple, length: int) -> None:
        """Segment ``segment``: ``src``/``dst`` are (table, offset, gref, frame)."""
        i = len(self._index)
        self._side(self._src[i], *src)
        self._side(self._dst[i], *dst)
        self._len[i] = length
        self._index.append(segment)

    def fail(self, segment: int, status: int) -> None:
        self.status[segment] = status

    def run(self, caller: int) -> list[int]:
        n = len(self._index)
        if n:
            st = ffi.new("int16_t[]", n)
            lib.xmp_gnttab_copy_batch(self._src, self._dst, self._len, st, n, caller)
            for i, segment in enumerate(self._index):
                self.status[segment] = st[i]
        return self.status


# -- GNTTABOP_copy from records in the caller's memory ---------------------

# struct gnttab_copy (grant_table.h, x86_64): source and dest
# {union {u32 ref; u64 gmfn}; u16 domid; u16 offset}, then u16 len,
# u16 flags, s16 status.  Packed by the caller, read once by the supervisor.
GNTTAB_COPY = struct.Struct("<QHH4xQHH4xHHh2x")
GNTTAB_COPY_STATUS = 36  # the status field's offset in a record
GNTCOPY_source_gref = 1
GNTCOPY_dest_gref = 2


def copy_records(own: ActiveGrants, caller: int, offset: int, count: int,
                 grants_of: Callable[[int], ActiveGrants | None]) -> Any:
    """GNTTABOP_copy of the ``count`` records at byte ``offset`` of the
    caller's memory (``own``: the caller's grants, built with its RAM).
    The records are copied out once (the caller may rewrite them meanwhile:
    nothing is read twice), checked and run in C, and each status is
    written back into its record, as Xen does.  ``grants_of(domid)`` is the
    ActiveGrants of a domain a record names, None if there is none
    (GNTST_bad_domain).  The caller checks the range lies in its memory."""
    if own._ram is None:
        raise LocalError(f"dom{caller}'s memory is needed for a grant copy")
    size = count * GNTTAB_COPY.size
    if count <= 0 or offset < 0 or offset + size > len(own._ram):
        raise LocalError(f"{count} copy records at {offset} leave dom{caller}'s memory")
    ops = ffi.new("xmp_gnttab_copy_t[]", count)
    ffi.memmove(ops, own._ram + offset, size)
    ids = ffi.new("uint16_t[]", 2 * count)
    k = lib.xmp_gnttab_copy_domids(ops, count, caller, ids, 2 * count)
    doms = ffi.new("xmp_copy_dom_t[]", k + 1)
    _copy_dom(doms[0], caller, own)
    n = 1
    for i in range(k):
        other = grants_of(ids[i])
        if other is not None and other._ram is not None:
            _copy_dom(doms[n], ids[i], other)
            n += 1
    lib.xmp_gnttab_copy_ops(ops, count, caller, doms, n)
    lib.xmp_gnttab_copy_status_out(own._ram + offset, ops, count)
    return ops  # the records as run, statuses in: what log-dirty marks from


def _copy_dom(c, domid: int, grants: ActiveGrants) -> None:
    assert grants._ram is not None
    c.domid, c.mem, c.mem_len = domid, grants._ram, len(grants._ram)
    c.tab, c.nr, c.act = grants._tab, grants.nr_entries, grants._act


def unpack_copy_records(buf) -> list[dict]:
    """Records as GNTTABOP_copy's JSON segments (for inspection and fakes):
    ``{"source": {"ref" | "frame", "domid", "offset"}, "dest": ..., "len"}``."""
    out = []
    for sptr, sdom, soff, dptr, ddom, doff, length, flags, _ in GNTTAB_COPY.iter_unpack(buf):
        src = {"ref" if flags & GNTCOPY_source_gref else "frame": sptr, "domid": sdom, "offset": soff}
        dst = {"ref" if flags & GNTCOPY_dest_gref else "frame": dptr, "domid": ddom, "offset": doff}
        out.append({"source": src, "dest": dst, "len": length})
    return out
