"""The toolstack's log-dirty API (libxc's xc_shadow_control, as a
migration source uses it): switch a domain's log-dirty mode on, read and
clean its dirty bitmap round after round, switch it off.

The toolstack runs in the supervisor's process, so this calls the
supervisor's shadow_op (:class:`xmp.hv.logdirty.LogDirtyOps`) directly --
the same code dom0 reaches through ``domctl/shadow_op``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from xmp.hv.domain import Domain
from xmp.hv.logdirty import SHADOW_OP_MAX_PAGES
from xmp.sharedmem.logdirty import bitmap_pfns


class ShadowOps(Protocol):
    def logdirty_enable(self, dom: Domain, prefer: str = ...) -> str: ...
    def logdirty_scan(self, dom: Domain, first: int = ..., count: int | None = ...,
                      clean: bool = ...) -> bytearray: ...
    def logdirty_disable(self, dom: Domain) -> None: ...


@dataclass(frozen=True)
class DirtyRound:
    """One CLEAN (or PEEK) of the whole domain."""

    bitmap: bytes      # Xen's layout: bit (pfn & 7) of byte pfn >> 3
    nr_pfns: int

    @property
    def pfns(self) -> list[int]:
        return bitmap_pfns(self.bitmap)

    @property
    def count(self) -> int:
        return sum(bin(b).count("1") for b in self.bitmap)


class DirtyLog:
    """A domain's log-dirty mode while the object lives (a context manager):
    ``clean()`` is the dirty set since the last clean (or since enabling)."""

    def __init__(self, hv: ShadowOps, dom: Domain, prefer: str = "userfaultfd"):
        self.hv, self.dom = hv, dom
        self.tracker = hv.logdirty_enable(dom, prefer)  # "userfaultfd" or "hash"

    def _round(self, clean: bool) -> DirtyRound:
        n = self.dom.max_pages
        out = bytearray()
        # windows of a whole number of bytes, so they concatenate bit-exactly
        for first in range(0, n, SHADOW_OP_MAX_PAGES):
            out += self.hv.logdirty_scan(self.dom, first, min(SHADOW_OP_MAX_PAGES, n - first), clean=clean)
        return DirtyRound(bytes(out), n)

    def clean(self) -> DirtyRound:
        return self._round(True)

    def peek(self) -> DirtyRound:
        return self._round(False)

    def close(self) -> None:
        self.hv.logdirty_disable(self.dom)

    def __enter__(self) -> DirtyLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
