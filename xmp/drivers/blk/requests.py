"""What a blkfront operation is made of, sans I/O: a :class:`BlkIO` (one
read, write, flush or discard as the caller sees it), the ring requests it
is split into (:class:`Part`), and the runs of pool pages they hold
(:class:`Extents`)."""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from xmp.drivers.blk.protocol import PAGE_SIZE, BlkifOp, BlkifStatus
from xmp.errors import LocalError, XmpError


class BlockIOError(XmpError):
    """The backend answered a request with an error status."""

    def __init__(self, op: str, sector: int, status: int):
        self.op = op
        self.sector = sector
        self.status = status
        super().__init__(op, sector, status)

    def __str__(self) -> str:
        try:
            name = BlkifStatus(self.status).name
        except ValueError:
            name = str(self.status)
        return f"vbd {self.op} at sector {self.sector}: {name}"


class BlkIO:
    """One submitted operation: ``done`` once every request of it is
    answered; :meth:`result` gives a READ's bytes or raises the first error."""

    def __init__(self, op: BlkifOp, sector: int, nbytes: int, data) -> None:
        self.op = op
        self.sector = sector
        self.nbytes = nbytes
        self.data = data          # WRITE: the bytes written
        self.chunks: dict[int, bytes] = {}  # READ: what each request brought, by offset
        self.left = 0             # requests not yet answered
        self.error: BlockIOError | None = None
        self.cancelled = False

    @property
    def done(self) -> bool:
        return self.left == 0

    def result(self) -> bytes | None:
        if not self.done:
            raise LocalError(f"vbd {self.op.name.lower()} at sector {self.sector} is still in flight")
        if self.error is not None:
            raise self.error
        if self.op != BlkifOp.READ:
            return None
        if len(self.chunks) == 1:
            return next(iter(self.chunks.values()))  # no second copy
        return b"".join(self.chunks[k] for k in sorted(self.chunks))


@dataclass(eq=False)
class Part:
    """One ring request of a BlkIO."""

    io: BlkIO
    op: BlkifOp
    sector: int
    amount: int                   # READ/WRITE: bytes; DISCARD: sectors
    offset: int = 0               # into io.data
    id: int = 0
    extent: int | None = None     # first pool page, while it holds one
    indirect: int | None = None   # its indirect page, while it holds one
    grefs: list[int] = field(default_factory=list)  # per-request grants (not persistent)
    queue: object = None          # the _FrontQueue it was issued on

    @property
    def pages(self) -> int:
        return -(-self.amount // PAGE_SIZE) if self.op in (BlkifOp.READ, BlkifOp.WRITE) else 0


class Extents:
    """First-fit allocator of runs of pool pages; frees merge."""

    def __init__(self, n: int) -> None:
        self.free: list[tuple[int, int]] = [(0, n)]  # (start, length), sorted

    def alloc(self, n: int) -> int | None:
        for i, (start, length) in enumerate(self.free):
            if length >= n:
                if length == n:
                    del self.free[i]
                else:
                    self.free[i] = (start + n, length - n)
                return start
        return None

    def release(self, start: int, n: int) -> None:
        i = bisect.bisect(self.free, (start, n))
        if i < len(self.free) and self.free[i][0] == start + n:
            n += self.free.pop(i)[1]
        if i > 0 and sum(self.free[i - 1]) == start:
            start, n = self.free[i - 1][0], self.free[i - 1][1] + n
            del self.free[i - 1]
            i -= 1
        self.free.insert(i, (start, n))
