"""The network benchmark's two ends (``benchmarks/bench_net.py``), over the
guest's own TCP/IP stack: ``args.role`` "server" listens on TCP and UDP
port ``args.port`` (default 5201) and reports what each test brought;
"client" waits ``args.delay`` s, then streams TCP to ``args.target`` for
``args.seconds`` s, then sends 64-byte UDP datagrams for as long.  Reports
are console lines ``netbench: {json}``.  The socket ends are plain
functions, so the benchmark runs the very same code between two network
namespaces joined by a veth pair."""

from __future__ import annotations

import json
import socket
import threading
import time

CHUNK = 64 * 1024
UDP_SIZE = 64   # bytes of payload
QUIET = 1.0     # seconds without a datagram that end a UDP test


def tcp_server(srv: socket.socket, report) -> None:
    while True:
        conn, _ = srv.accept()
        n, t0 = 0, None
        with conn:
            while chunk := conn.recv(1 << 20):
                if t0 is None:
                    t0 = time.monotonic()
                n += len(chunk)
        dt = time.monotonic() - (t0 or time.monotonic())
        report({"test": "tcp", "bytes": n, "seconds": dt, "mbit_s": n * 8 / dt / 1e6 if dt else 0.0})


def udp_server(sock: socket.socket, report) -> None:
    while True:
        sock.settimeout(None)
        sock.recv(2048)
        n, t0 = 1, time.monotonic()
        last = t0
        sock.settimeout(QUIET)
        while True:
            try:
                sock.recv(2048)
            except TimeoutError:
                break
            n += 1
            last = time.monotonic()
        dt = last - t0
        report({"test": "udp", "packets": n, "seconds": dt, "pps": n / dt if dt else 0.0})


def tcp_client(target: str, port: int, seconds: float) -> dict:
    data = bytes(CHUNK)
    n = 0
    with socket.create_connection((target, port), timeout=10) as c:
        t0 = time.monotonic()
        while time.monotonic() - t0 < seconds:
            c.sendall(data)
            n += CHUNK
    return {"test": "tcp-sent", "bytes": n}


def udp_client(target: str, port: int, seconds: float) -> dict:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    data = bytes(UDP_SIZE)
    n = 0
    t0 = time.monotonic()
    while time.monotonic() - t0 < seconds:
        for _ in range(64):
            try:
                s.sendto(data, (target, port))
                n += 1
            except OSError:  # a full queue: the datagram is lost, as on a wire
                pass
    s.close()
    return {"test": "udp-sent", "packets": n}


def servers(port: int, report) -> None:
    srv = socket.create_server(("0.0.0.0", port), backlog=4)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    udp.bind(("0.0.0.0", port))
    threading.Thread(target=tcp_server, args=(srv, report), daemon=True).start()
    threading.Thread(target=udp_server, args=(udp, report), daemon=True).start()


def main(kernel) -> None:
    from xmp.drivers.net import stack

    net = stack.start(kernel)
    port = int(kernel.args.get("port", 5201))

    def report(doc: dict) -> None:
        kernel.print("netbench: " + json.dumps({**doc, "stats": net.nic.counters()}))

    if kernel.args.get("role") == "server":
        servers(port, report)
        report({"test": "listening"})
    else:
        def client() -> None:
            time.sleep(float(kernel.args.get("delay", 1.0)))
            seconds = float(kernel.args.get("seconds", 3))
            report(tcp_client(kernel.args["target"], port, seconds))
            time.sleep(0.5)
            report(udp_client(kernel.args["target"], port, seconds))
        threading.Thread(target=client, daemon=True).start()
    kernel.idle()
