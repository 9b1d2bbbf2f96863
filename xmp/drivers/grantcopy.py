"""A back ring and data movers for driver domains: grant copy only.

Only dom0 maps grants; a driver domain reaches a frontend's memory only
through GNTTABOP_copy (the hypervisor answers EPERM when it asks to map a
grant), as Xen's untrusted backends do.  So its ring cannot be a pointer
into shared memory; it is the frontend's granted ring pages seen through
copies.

:class:`CopyBackRing` has :class:`xmp.sharedmem.ring.BackRing`'s interface
and ``io/ring.h`` semantics, but every access to the shared ring is a list
of ops handed to an injected *copier* (sans-I/O: tests pass a copier over a
bytearray, a live backend passes a :class:`GrantCopier`)::

    ("in", offset, length)  -> the bytes read
    ("out", offset, data)   -> None

``offset`` is a byte offset in the ring (header at 0, slots from 64).  The
ops of one call run in order, which is the barrier: response slots are
written before ``rsp_prod``, and ``rsp_prod`` before ``rsp_event`` is read
(xen_wmb / xen_mb of RING_PUSH_RESPONSES_AND_CHECK_NOTIFY).  No op crosses a
4096-byte page, because each ring page is a separate grant.

Copier calls are batched: ``get_requests`` makes at most two (read
``req_prod``, then every new slot), ``push_responses_and_check_notify``
exactly one, ``final_check_for_requests`` at most one.  Responses are kept
privately until the push writes them.  The shared page is never trusted: a
value enters only through an "in" op, is parsed once, and a ``req_prod``
claiming more than a ring's worth raises :class:`RemoteProtocolError`.

:func:`copy_from_grants` / :func:`copy_to_grants` move a request's data
between the frontend's granted pages and the backend's own bounce pages.

Every copy goes to the hypervisor as Xen's GNTTABOP_copy does: a
:class:`CopyList` of ``struct gnttab_copy`` records in the backend's own
pages, named by pfn -- no per-segment JSON either way, and the hypervisor
reads and runs them in C (a 1 MiB request is one call of 256 records).
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from typing import Any

from xmp.domid import DOMID_SELF
from xmp.errors import GNTST_NAMES, GrantError, LocalError, RemoteProtocolError, RingFull
from xmp.sharedmem.grant import GNTTAB_COPY, GNTTAB_COPY_STATUS, GNTCOPY_dest_gref, GNTCOPY_source_gref
from xmp.sharedmem.ring import HEADER_SIZE, REQ_EVENT, REQ_PROD, RSP_EVENT, RSP_PROD, ring_nr_ents
from xmp.sharedmem.shm import PAGE_SIZE

M32 = 0xFFFFFFFF
MAX_COPY_OPS = 512  # GNTTABOP_copy segments per hypercall, as xmp's hypervisor allows

CopyOp = tuple[str, int, "int | bytes"]
Copier = Callable[[list[CopyOp]], list["bytes | None"]]

_U32 = struct.Struct("<I")


def _pieces(offset: int, length: int) -> list[tuple[int, int]]:
    """(offset, length) pieces of a byte range, none crossing a page."""
    out = []
    end = offset + length
    while offset < end:
        n = min(end, (offset // PAGE_SIZE + 1) * PAGE_SIZE) - offset
        out.append((offset, n))
        offset += n
    return out


class CopyBackRing:
    """The backend's view of a ring it may only copy to and from.

    ``nbytes`` is the ring's size (``4096 << ring-page-order``).  With
    ``resume=True`` a backend taking over a live ring starts from the
    published ``rsp_prod``, as :class:`BackRing` does.
    """

    def __init__(self, copier: Copier, nbytes: int, req_size: int, rsp_size: int, *,
                 resume: bool = False):
        if nbytes <= 0 or nbytes % PAGE_SIZE:
            raise LocalError(f"a ring of {nbytes} bytes is not a whole number of pages")
        self._copier = copier
        self.nbytes = nbytes
        self.req_size = req_size
        self.rsp_size = rsp_size
        self.slot_size = max(req_size, rsp_size)
        self.nr_ents = ring_nr_ents(nbytes, self.slot_size)
        self.copies = 0
        self._req_cons = self._rsp_prod_pvt = self._rsp_pushed = 0
        if resume:
            (raw,) = self._copy([("in", RSP_PROD, 4)])
            assert raw is not None
            self._req_cons = self._rsp_prod_pvt = self._rsp_pushed = _U32.unpack(raw)[0]
        # The last req_prod we read and accepted: lets the final check answer
        # "work to do" without a copy when it already knows there is some.
        self._req_prod_seen = self._req_cons
        self._unpushed = bytearray()  # responses rsp_pushed .. rsp_prod_pvt, rsp_size each

    # -- indices ----------------------------------------------------------

    @property
    def req_cons(self) -> int:
        return self._req_cons

    @property
    def rsp_prod_pvt(self) -> int:
        return self._rsp_prod_pvt

    def pending_responses(self) -> int:
        """Requests consumed but not yet answered (room for responses)."""
        return (self._req_cons - self._rsp_prod_pvt) & M32

    # -- the copier -------------------------------------------------------

    def _copy(self, ops: list[CopyOp]) -> list[bytes | None]:
        self.copies += 1
        got = self._copier(ops)
        if len(got) != len(ops):
            raise LocalError(f"copier answered {len(got)} results for {len(ops)} ops")
        for (kind, _, arg), res in zip(ops, got, strict=True):
            if kind == "in" and (not isinstance(res, bytes | bytearray) or len(res) != arg):
                raise LocalError("copier returned a short read")
        return got

    def _slot_offset(self, idx: int) -> int:
        return HEADER_SIZE + (idx & (self.nr_ents - 1)) * self.slot_size

    def _accept_req_prod(self, raw: bytes | None) -> int:
        """Parse a req_prod we read, once; RING_REQUEST_PROD_OVERFLOW is the
        frontend's fault.  Returns the requests waiting (RING_UNCONSUMED_REQUESTS)."""
        assert raw is not None
        req_prod = _U32.unpack(raw)[0]
        if (req_prod - self._rsp_prod_pvt) & M32 > self.nr_ents:
            raise RemoteProtocolError(
                f"bad frontend: its producer index claims more than the ring's {self.nr_ents} slots")
        self._req_prod_seen = req_prod
        return self._known_requests()

    def _known_requests(self) -> int:
        reqs = (self._req_prod_seen - self._req_cons) & M32
        room = self.nr_ents - ((self._req_cons - self._rsp_prod_pvt) & M32)
        return min(reqs, room)

    # -- requests ---------------------------------------------------------

    def unconsumed_requests(self) -> int:
        (raw,) = self._copy([("in", REQ_PROD, 4)])
        return self._accept_req_prod(raw)

    def get_requests(self, max_msgs: int | None = None) -> bytes:
        """Copy out and consume up to ``max_msgs`` requests, packed."""
        limit = self.nr_ents if max_msgs is None else min(max_msgs, self.nr_ents)
        n = min(self.unconsumed_requests(), max(limit, 0))
        if n == 0:
            return b""
        # One run up to the end of the slots, one after the wrap; each run is
        # read as a span (the gaps when req_size < slot_size are read too).
        first = self._req_cons & (self.nr_ents - 1)
        runs = [(first, min(n, self.nr_ents - first))]
        if runs[0][1] < n:
            runs.append((0, n - runs[0][1]))
        ops: list[CopyOp] = []
        spans = []
        for idx, k in runs:
            start = HEADER_SIZE + idx * self.slot_size
            pieces = _pieces(start, (k - 1) * self.slot_size + self.req_size)
            ops += [("in", off, ln) for off, ln in pieces]
            spans.append((k, len(pieces)))
        got = self._copy(ops)
        out = bytearray()
        at = 0
        for k, npieces in spans:
            span = b"".join(r for r in got[at:at + npieces] if r is not None)
            at += npieces
            for i in range(k):
                out += span[i * self.slot_size:i * self.slot_size + self.req_size]
        self._req_cons = (self._req_cons + n) & M32
        return bytes(out)

    def get_request(self) -> bytes | None:
        return self.get_requests(1) or None

    def final_check_for_requests(self) -> bool:
        """RING_FINAL_CHECK_FOR_REQUESTS: True if requests are waiting;
        otherwise arms req_event = req_cons + 1 and looks again.  With no work
        already known it arms before its only look (one copy instead of two);
        the answer is the same, and a stray req_event at or below req_prod
        only means "no notify needed", which the caller then acts on."""
        if self._known_requests():
            return True
        _, raw = self._copy([("out", REQ_EVENT, _U32.pack((self._req_cons + 1) & M32)),
                             ("in", REQ_PROD, 4)])
        return self._accept_req_prod(raw) > 0

    def set_req_event(self, value: int) -> None:
        self._copy([("out", REQ_EVENT, _U32.pack(value & M32))])

    # -- responses --------------------------------------------------------

    def put_response(self, msg) -> None:
        """Queue one response (padded to the response size); RingFull if
        every consumed request is already answered."""
        if len(msg) > self.rsp_size:
            raise LocalError(f"message of {len(msg)} bytes exceeds the {self.rsp_size}-byte slot")
        if not self.pending_responses():
            raise RingFull(f"ring full ({self.nr_ents} slots)")
        self._unpushed += bytes(msg).ljust(self.rsp_size, b"\0")
        self._rsp_prod_pvt = (self._rsp_prod_pvt + 1) & M32

    def put_responses(self, data) -> int:
        """Queue as many whole responses from ``data`` as fit; return that count."""
        count, rem = divmod(len(data), self.rsp_size)
        if rem:
            raise LocalError(f"{len(data)} bytes is not a whole number of {self.rsp_size}-byte messages")
        n = min(count, self.pending_responses())
        self._unpushed += bytes(memoryview(data)[:n * self.rsp_size])
        self._rsp_prod_pvt = (self._rsp_prod_pvt + n) & M32
        return n

    def push_responses_and_check_notify(self) -> bool:
        """RING_PUSH_RESPONSES_AND_CHECK_NOTIFY in one copy: the slots, then
        rsp_prod, then a read of rsp_event; notify iff rsp_event lies in
        (old, new]."""
        chunks: list[tuple[int, bytes]] = []
        for i in range(len(self._unpushed) // self.rsp_size):
            off = self._slot_offset(self._rsp_pushed + i)
            data = bytes(self._unpushed[i * self.rsp_size:(i + 1) * self.rsp_size])
            if chunks and chunks[-1][0] + len(chunks[-1][1]) == off:
                chunks[-1] = (chunks[-1][0], chunks[-1][1] + data)  # adjacent slots: one op
            else:
                chunks.append((off, data))
        ops: list[CopyOp] = []
        for off, data in chunks:
            for poff, ln in _pieces(off, len(data)):
                ops.append(("out", poff, data[poff - off:poff - off + ln]))
        old, new = self._rsp_pushed, self._rsp_prod_pvt
        ops += [("out", RSP_PROD, _U32.pack(new)), ("in", RSP_EVENT, 4)]
        raw = self._copy(ops)[-1]
        assert raw is not None
        self._unpushed.clear()
        self._rsp_pushed = new
        rsp_event = _U32.unpack(raw)[0]
        return (new - rsp_event) & M32 < (new - old) & M32

    def release(self) -> None:
        """Nothing is mapped; kept for BackRing's interface."""


# -- the real copier -----------------------------------------------------


def bounce_pages_for(nbytes: int) -> int:
    """Bounce pages that let any single CopyBackRing copy of an ``nbytes``
    ring go in one grant_copy (all slots plus the header words).  Fewer
    works too: GrantCopier then splits a copy into several calls, in order."""
    return nbytes // PAGE_SIZE + 1


class _Bounce:
    """Own pages ``pfn .. pfn + pages - 1`` handed out as a byte cursor,
    never across a page; reset after each hypercall."""

    def __init__(self, pfn: int, pages: int):
        if pages < 1:
            raise LocalError("grant copy needs at least one bounce page")
        self.pfn, self.pages = pfn, pages
        self.used = 0

    def take(self, length: int) -> tuple[int, int, int]:
        """Up to ``length`` bytes of the next free bounce space: (pfn, offset, n)."""
        page, off = divmod(self.used, PAGE_SIZE)
        n = min(length, PAGE_SIZE - off)
        self.used += n
        return self.pfn + page, off, n

    @property
    def full(self) -> bool:
        return self.used >= self.pages * PAGE_SIZE


COPY_LIST_PAGES = -(-MAX_COPY_OPS * GNTTAB_COPY.size // PAGE_SIZE)
_STATUS_STEP = GNTTAB_COPY.size // 2  # int16s per record


class CopyList:
    """One GNTTABOP_copy being filled: up to :data:`MAX_COPY_OPS` records in
    :data:`COPY_LIST_PAGES` pages of our own memory, taken from the kernel
    (given back by :meth:`release`).  Each segment moves ``length`` bytes
    between a grant of ``granter``'s and our own frame ``pfn``."""

    def __init__(self, kernel: Any):
        self.kernel = kernel
        self.pfn = kernel.alloc_pages(COPY_LIST_PAGES)
        self._buf = memoryview(kernel.memory)[self.pfn * PAGE_SIZE:(self.pfn + COPY_LIST_PAGES) * PAGE_SIZE]
        self.n = 0
        self.calls = 0

    def __len__(self) -> int:
        return self.n

    @property
    def full(self) -> bool:
        return self.n == MAX_COPY_OPS

    def copy_in(self, granter: int, gref: int, offset: int, pfn: int, boff: int, length: int) -> None:
        """Their ``gref`` at ``offset`` into our ``pfn`` at ``boff``."""
        GNTTAB_COPY.pack_into(self._buf, self.n * GNTTAB_COPY.size, gref, granter, offset,
                              pfn, DOMID_SELF, boff, length, GNTCOPY_source_gref, 0)
        self.n += 1

    def copy_out(self, pfn: int, boff: int, granter: int, gref: int, offset: int, length: int) -> None:
        """Our ``pfn`` at ``boff`` into their ``gref`` at ``offset``."""
        GNTTAB_COPY.pack_into(self._buf, self.n * GNTTAB_COPY.size, pfn, DOMID_SELF, boff,
                              gref, granter, offset, length, GNTCOPY_dest_gref, 0)
        self.n += 1

    def run(self) -> list[int]:
        """Issue the records (one hypercall) and start afresh; their
        statuses, in order (0 is GNTST_okay)."""
        n, self.n = self.n, 0
        if not n:
            return []
        self.calls += 1
        self.kernel.xen.grant_copy_records(self.pfn, n)
        return self._buf[:n * GNTTAB_COPY.size].cast("h")[GNTTAB_COPY_STATUS // 2::_STATUS_STEP].tolist()

    def release(self) -> None:
        self._buf.release()
        self.kernel.free_pages(self.pfn, COPY_LIST_PAGES)


class GrantCopier:
    """A :class:`CopyBackRing` copier for a live domain: one GNTTABOP_copy
    per call when the bounce pages hold it (see :func:`bounce_pages_for`),
    else several, issued in op order, each through ``ops``.  ``grefs[i]``
    grants ring page i."""

    def __init__(self, kernel: Any, granter: int, grefs: Sequence[int], bounce_pfn: int,
                 bounce_pages: int, ops: CopyList):
        self.kernel = kernel
        self.granter = granter
        self.grefs = list(grefs)
        self._bounce = _Bounce(bounce_pfn, bounce_pages)
        self._ops = ops

    def _check(self, op: CopyOp) -> int:
        """An op's length, once it is known to lie within one ring page."""
        kind, offset, arg = op
        if kind == "in" and isinstance(arg, int):
            length = arg
        elif kind == "out" and isinstance(arg, bytes | bytearray | memoryview):
            length = len(arg)
        else:
            raise LocalError(f"bad copy op {kind!r}")
        page, poff = divmod(offset, PAGE_SIZE)
        if offset < 0 or length < 0 or poff + length > PAGE_SIZE or page >= len(self.grefs):
            raise LocalError(f"copy op at ring offset {offset} of {length} bytes crosses a page "
                             f"or leaves the {len(self.grefs)}-page ring")
        return length

    def __call__(self, ops: list[CopyOp]) -> list[bytes | None]:
        results: list[list[bytes] | None] = [[] if kind == "in" else None for kind, _, _ in ops]
        batch = self._ops
        # per record of the batch: (op index, bounce pfn, bounce offset, length, ring page)
        where: list[tuple[int, int, int, int, int]] = []
        bounce = self._bounce
        bounce.used = 0

        def flush() -> None:
            statuses = batch.run()
            for (_, _, _, _, page), st in zip(where, statuses, strict=True):
                if st:
                    raise RemoteProtocolError(
                        f"bad frontend: grant copy of ring page {page} (gref {self.grefs[page]}) "
                        f"failed: status {GNTST_NAMES.get(st, st)}")
            for i, pfn, off, n, _ in where:
                res = results[i]
                if res is not None:
                    res.append(bytes(self.kernel.page(pfn)[off:off + n]))
            where.clear()
            bounce.used = 0

        lengths = [self._check(op) for op in ops]  # all of them before any is issued
        for i, ((kind, offset, arg), length) in enumerate(zip(ops, lengths, strict=True)):
            page, poff = divmod(offset, PAGE_SIZE)
            done = 0
            while done < length:
                if batch.full or bounce.full:
                    flush()
                pfn, boff, n = bounce.take(length - done)
                if kind == "in":
                    batch.copy_in(self.granter, self.grefs[page], poff + done, pfn, boff, n)
                else:
                    self.kernel.page(pfn)[boff:boff + n] = arg[done:done + n]  # type: ignore[index]
                    batch.copy_out(pfn, boff, self.granter, self.grefs[page], poff + done, n)
                where.append((i, pfn, boff, n, page))
                done += n
        if len(batch):
            flush()
        return [None if r is None else b"".join(r) for r in results]


# -- request data: the frontend's segments through bounce pages ------------


def _layout(segs: Sequence[tuple[int, int, int]], bounce_pfn: int,
            bounce_pages: int) -> list[tuple[int, int]]:
    """Where each segment's data lives in the bounce pages: (pfn, offset),
    packed in order, a segment never split across a bounce page."""
    out = []
    page = off = 0
    for gref, offset, length in segs:
        if offset < 0 or length < 0 or offset + length > PAGE_SIZE:
            raise LocalError(f"segment of gref {gref} at {offset}+{length} crosses a page")
        if off + length > PAGE_SIZE:
            page, off = page + 1, 0
        if page >= bounce_pages:
            raise LocalError(f"{len(segs)} segments need more than {bounce_pages} bounce pages")
        out.append((bounce_pfn + page, off))
        off += length
    return out


def bounce_views(kernel: Any, segs: Sequence[tuple[int, int, int]], bounce_pfn: int,
                 bounce_pages: int) -> list[memoryview]:
    """The bounce memory for ``segs`` (``(gref, offset, length)``, each within
    one page), one view per segment, in the layout both copies use.  Valid
    until the bounce pages are used again."""
    return [kernel.page(pfn)[off:off + length]
            for (_, _, length), (pfn, off) in zip(segs, _layout(segs, bounce_pfn, bounce_pages),
                                                  strict=True)]


def _copy_segments(kernel: Any, granter: int, segs: Sequence[tuple[int, int, int]],
                   bounce_pfn: int, bounce_pages: int, ops: CopyList, *, to_grants: bool) -> None:
    layout = _layout(segs, bounce_pfn, bounce_pages)
    for at in range(0, len(segs), MAX_COPY_OPS):
        chunk = segs[at:at + MAX_COPY_OPS]
        for (gref, offset, length), (pfn, off) in zip(chunk, layout[at:at + MAX_COPY_OPS], strict=True):
            if to_grants:
                ops.copy_out(pfn, off, granter, gref, offset, length)
            else:
                ops.copy_in(granter, gref, offset, pfn, off, length)
        for (gref, _, _), st in zip(chunk, ops.run(), strict=True):
            if st:
                raise GrantError(granter, gref, st, "grant_copy")


def copy_from_grants(kernel: Any, granter: int, segs: Sequence[tuple[int, int, int]],
                     bounce_pfn: int, bounce_pages: int, ops: CopyList) -> list[memoryview]:
    """Copy each ``(gref, offset, length)`` of ``granter``'s into our bounce
    pages (a WRITE request's data); returns the views :func:`bounce_views`
    gives.  GrantError names the first gref that failed."""
    _copy_segments(kernel, granter, segs, bounce_pfn, bounce_pages, ops, to_grants=False)
    return bounce_views(kernel, segs, bounce_pfn, bounce_pages)


def copy_to_grants(kernel: Any, granter: int, segs: Sequence[tuple[int, int, int]],
                   bounce_pfn: int, bounce_pages: int, ops: CopyList) -> None:
    """Copy the data the caller placed in :func:`bounce_views` into each
    ``(gref, offset, length)`` of ``granter``'s (a READ request's data)."""
    _copy_segments(kernel, granter, segs, bounce_pfn, bounce_pages, ops, to_grants=True)
