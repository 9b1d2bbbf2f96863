"""An ``iperf3 -s``-like sink on the guest's own TCP/IP stack: accepts TCP
connections on ``args.port`` (default 5201), reads everything, and prints
the bytes and rate of each connection when it closes."""

from __future__ import annotations

import socket
import threading
import time

from xmp.drivers.net import stack


def main(kernel) -> None:
    stack.start(kernel)
    srv = socket.create_server(("0.0.0.0", int(kernel.args.get("port", 5201))), backlog=16)

    def take(conn: socket.socket) -> None:
        n, t0 = 0, time.monotonic()
        with conn:
            while chunk := conn.recv(1 << 16):
                n += len(chunk)
        dt = max(time.monotonic() - t0, 1e-9)
        kernel.print(f"tcpsink: {n} bytes in {dt:.3f} s ({n * 8 / dt / 1e6:.1f} Mbit/s)")

    def serve() -> None:
        while True:
            conn, _ = srv.accept()
            threading.Thread(target=take, args=(conn,), daemon=True).start()

    threading.Thread(target=serve, name="tcpsink", daemon=True).start()
    kernel.print(f"tcpsink: listening on port {srv.getsockname()[1]}")
    kernel.idle()
