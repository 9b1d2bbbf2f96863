"""Two OS processes talk over a Xen ring, the way a guest talks to dom0.

The "guest" (a spawned process) is the frontend: it puts numbered requests
on a ring.h ring in shared memory and kicks dom0's event channel; "dom0"
(this process) is the backend: it answers each request with its bytes
inverted and kicks back.  Both sides check every byte they receive.  The
shared memory reaches the guest only as a descriptor over a Unix socket.

    python examples/ring_demo.py [--messages N] [--ring-page-order K]
"""

from __future__ import annotations

import argparse
import struct
import sys
import time

from xmp.sharedmem.evtchn import Wake
from xmp.sharedmem.shm import ShmNamespace
from xmp.testing import LINK_PORT, LinkLayout, SharedLink, spawn_peer

MSG = 64
BATCH = 64


def payload(first: int, count: int) -> bytes:
    return b"".join(struct.pack("<Q", i) * (MSG // 8) for i in range(first, first + count))


def invert(data: bytes) -> bytes:
    return (int.from_bytes(data, "little") ^ ((1 << (8 * len(data))) - 1)).to_bytes(len(data), "little")


def guest(link: SharedLink, total: int) -> None:
    ring = link.front_ring(MSG, MSG)
    sent = done = 0
    t0 = time.perf_counter()
    while done < total:
        if sent < total:
            k = ring.put_requests(payload(sent, min(BATCH, total - sent, ring.free_requests())))
            sent += k
            if k and ring.push_requests_and_check_notify():
                link.back_ev.send(LINK_PORT)
        rsps = ring.get_responses()
        if rsps:
            n = len(rsps) // MSG
            if rsps != invert(payload(done, n)):
                print(f"guest: FAILED: response {done}..{done + n} does not match", flush=True)
                sys.exit(1)
            done += n
        elif not ring.final_check_for_responses() and (sent == total or not ring.free_requests()):
            link.front_ev.wait(timeout=1.0)
            link.front_ev.scan()
    dt = time.perf_counter() - t0
    print(f"guest: {total} round trips in {dt:.2f} s ({total / dt / 1e6:.2f} M/s), every byte checked",
          flush=True)


def dom0(link: SharedLink, total: int) -> int:
    ring = link.back_ring(MSG, MSG)
    seen = 0
    while seen < total:
        reqs = ring.get_requests()
        if reqs:
            n = len(reqs) // MSG
            if reqs != payload(seen, n):
                print(f"dom0: FAILED: request {seen}..{seen + n} does not match", flush=True)
                return 1
            seen += n
            ring.put_responses(invert(reqs))
            if ring.push_responses_and_check_notify():
                link.front_ev.send(LINK_PORT)
        elif not ring.final_check_for_requests():
            if link.back_ev.wait(timeout=1.0) == Wake.SHUTDOWN:
                return 1
            link.back_ev.scan()
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--messages", type=int, default=1_000_000)
    ap.add_argument("--ring-page-order", type=int, default=2)
    args = ap.parse_args(argv)
    if args.messages < 1:
        ap.error("--messages must be at least 1")
    link = SharedLink.create(ShmNamespace(), LinkLayout(ring_page_order=args.ring_page_order))
    try:
        proc = spawn_peer(link, guest, args.messages)
        rc = dom0(link, args.messages)
        proc.join(30)
        if proc.is_alive():
            proc.kill()
            proc.join()
        rc = rc or proc.exitcode or 0
    finally:
        link.close()
    print(f"ring-demo: {'OK' if rc == 0 else 'FAILED'} {args.messages} requests and responses "
          f"over a {link.layout.ring_pages}-page ring", flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
