"""An HTTP key-value server on the guest's own TCP/IP stack (standard
library only): ``GET /`` says who answers, ``GET /stats`` gives eth0's
counters (JSON), ``PUT /kv/KEY`` stores the body, ``GET /kv/KEY`` returns it.
``args.port`` (default 80)."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from xmp.drivers.net import stack


def main(kernel) -> None:
    net = stack.start(kernel)
    store: dict[str, bytes] = {}
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def _answer(self, code: int, body: bytes, kind: str = "text/plain") -> None:
            self.send_response(code)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            if self.path == "/":
                self._answer(200, f"hello from {kernel.name} (dom{kernel.domid})\n".encode())
            elif self.path == "/stats":
                self._answer(200, json.dumps(net.nic.counters()).encode(), "application/json")
            elif self.path.startswith("/kv/"):
                with lock:
                    value = store.get(self.path[4:])
                self._answer(200, value) if value is not None else self._answer(404, b"no such key\n")
            else:
                self._answer(404, b"not found\n")

        def do_PUT(self) -> None:
            if not self.path.startswith("/kv/"):
                self._answer(404, b"not found\n")
                return
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            with lock:
                store[self.path[4:]] = body
            self._answer(201, b"stored\n")

        def log_message(self, fmt: str, *args) -> None:
            pass

    server = ThreadingHTTPServer(("0.0.0.0", int(kernel.args.get("port", 80))), Handler)
    threading.Thread(target=server.serve_forever, name="httpd", daemon=True).start()
    kernel.print(f"httpd: serving on {' '.join(net.addresses) or 'no address'} port {server.server_port}")
    kernel.idle()  # the event loop pumps eth0
