"""Pings ``args.target`` (an IPv4 address) over the guest's own TCP/IP
stack with ICMP echo requests (an unprivileged ping socket): ``args.count`` (default 5), each answer
checked, then reports; ``args.forever`` keeps pinging every ``args.interval``."""

from __future__ import annotations

import os
import socket
import struct
import threading
import time

from xmp.drivers.net import stack


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    s = (s >> 16) + (s & 0xFFFF)
    s += s >> 16
    return ~s & 0xFFFF


def ping(sock: socket.socket, target: str, ident: int, seq: int, timeout: float) -> float | None:
    payload = b"xmp-netpinger %d" % seq
    head = struct.pack("!BBHHH", 8, 0, 0, ident, seq)
    packet = struct.pack("!BBHHH", 8, 0, _checksum(head + payload), ident, seq) + payload
    t0 = time.monotonic()
    sock.sendto(packet, (target, 0))
    deadline = t0 + timeout
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            data, (src, _) = sock.recvfrom(2048)
        except TimeoutError:
            return None
        kind, _, _, _, rseq = struct.unpack("!BBHHH", data[:8])  # the kernel owns the ident
        if src == target and kind == 0 and rseq == seq and data[8:] == payload:
            return time.monotonic() - t0
    return None


def main(kernel) -> None:
    stack.start(kernel)
    target = kernel.args["target"]
    count = int(kernel.args.get("count", 5))
    result: dict = {}

    def run() -> None:
        # an ICMP echo socket: no privilege needed (the stack's namespace allows them)
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP)
        ident = os.getpid() & 0xFFFF
        rtts = [ping(sock, target, ident, i, 2.0) for i in range(count)]
        ok = [r for r in rtts if r is not None]
        kernel.print(f"netpinger: {len(ok)}/{count} answers from {target}"
                     + (f", rtt {1000 * min(ok):.2f}..{1000 * max(ok):.2f} ms" if ok else ""))
        n = count
        while kernel.args.get("forever"):
            time.sleep(float(kernel.args.get("interval", 0.2)))
            got = ping(sock, target, ident, n & 0xFFFF, 2.0) is not None
            kernel.print(f"netpinger: seq {n} {'answered' if got else 'lost'}")
            n += 1
        result["done"] = True

    threading.Thread(target=run, name="netpinger", daemon=True).start()
    while not result.get("done"):  # the loop pumps eth0 meanwhile; the thread cannot wake it
        kernel.loop.run_until(lambda: result.get("done", False), 0.1)
    kernel.idle()
