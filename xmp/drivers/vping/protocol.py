"""vping's wire format: one-page ring of 64-byte slots.

    request   u64 id, u8 data[56]
    response  u64 id, u8 data[56]   (data reversed)

xenstore: backend ``feature-echo = 1``; frontend ``ring-ref``, ``event-channel``.
"""

from __future__ import annotations

import struct

SLOT = 64
DATA = SLOT - 8
HEADER = struct.Struct("<Q")


def request(req_id: int, data: bytes) -> bytes:
    return HEADER.pack(req_id) + data[:DATA].ljust(DATA, b"\0")


def answer(req: bytes) -> bytes:
    """The backend's response to one request (copied out of the ring already)."""
    return req[:8] + req[8:][::-1]
