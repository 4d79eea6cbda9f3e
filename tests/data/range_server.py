"""A loopback HTTP server for one archive: the stand-in for a public download in data tests."""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class RangeServer(ThreadingHTTPServer):
    """Serves one file at /<name>, honouring ``Range: bytes=N-``; records the Range headers it saw."""

    def __init__(self, payload: bytes, *, honour_range: bool = True) -> None:
        super().__init__(("127.0.0.1", 0), RangeHandler)
        self.payload = payload
        self.honour_range = honour_range
        self.ranges: list[str | None] = []


class RangeHandler(BaseHTTPRequestHandler):
    server: RangeServer

    def do_GET(self) -> None:
        if not self.path.endswith(".zip"):
            self.send_error(404)
            return
        payload = self.server.payload
        header = self.headers.get("Range")
        self.server.ranges.append(header)
        match = re.fullmatch(r"bytes=(\d+)-", header or "")
        if match and self.server.honour_range:
            start = int(match.group(1))
            if start >= len(payload):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(payload)}")
                self.end_headers()
                return
            body = payload[start:]
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(payload) - 1}/{len(payload)}")
        else:
            body = payload
            self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # keep test output clean
        pass


def serve(payload: bytes, *, honour_range: bool = True) -> Iterator[RangeServer]:
    """Serve ``payload`` on 127.0.0.1 (a free port) for the caller's ``for``/``yield from`` block."""
    server = RangeServer(payload, honour_range=honour_range)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def url_of(server: RangeServer, name: str = "cats.zip") -> str:
    return f"http://127.0.0.1:{server.server_address[1]}/datasets/{name}"
