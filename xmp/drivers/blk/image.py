"""The image file's side of blkback: moving a request's bytes with one
``preadv``/``pwritev`` (retrying short ones), and discarding."""

from __future__ import annotations

import os

from xmp.sharedmem._ffi import lib

DISCARD_GRANULARITY = 4096
_ZEROS = bytes(DISCARD_GRANULARITY)


def discard(fd: int, start: int, length: int) -> None:
    """BLKIF_OP_DISCARD on the image: whole granules punched out (they read
    as zeros and cost nothing), the partial edges written with zeros."""
    end = start + length
    lo = -(-start // DISCARD_GRANULARITY) * DISCARD_GRANULARITY
    hi = end // DISCARD_GRANULARITY * DISCARD_GRANULARITY
    if lo < hi:
        if lib.xmp_punch_hole(fd, lo, hi - lo) != 0:
            zero(fd, lo, hi - lo)  # no hole punching here: zeroes read back all the same
        zero(fd, start, lo - start)
        zero(fd, hi, end - hi)
    else:
        zero(fd, start, length)


def zero(fd: int, offset: int, length: int) -> None:
    """Write ``length`` zero bytes at ``offset``."""
    while length > 0:
        n = os.pwrite(fd, _ZEROS[:min(length, len(_ZEROS))], offset)
        if n <= 0:
            raise OSError("short write while zeroing")
        offset += n
        length -= n


def transfer(fd: int, views: list[memoryview], offset: int, write: bool, total: int) -> None:
    """All ``total`` bytes of ``views`` to (``write``) or from the image at
    ``offset``, retrying short transfers; a read past the end of the file reads zeros."""
    n = os.pwritev(fd, views, offset) if write else os.preadv(fd, views, offset)
    if n == total:
        return  # the usual case, in one system call
    done = max(n, 0)
    extra: list[memoryview] = []
    try:
        while done < total:
            rest: list[memoryview] = []
            skip = done
            for v in views:
                if skip >= len(v):
                    skip -= len(v)
                    continue
                part = v[skip:] if skip else v
                if skip:
                    extra.append(part)
                rest.append(part)
                skip = 0
            n = os.pwritev(fd, rest, offset + done) if write else os.preadv(fd, rest, offset + done)
            if n <= 0:
                if write:
                    raise OSError("short write to the image")
                for part in rest:  # the image shrank under us: past its end is zeros
                    part[:] = bytes(len(part))
                return
            done += n
    finally:
        for part in extra:
            part.release()
