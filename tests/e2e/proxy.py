"""A reverse proxy in front of the control plane that corrupts artifact downloads on demand.

Agents pointed at it reach the control plane as usual; the first `corrupt` artifact
responses get one byte flipped on the way, as a bad link or disk would.
"""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx

HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "transfer-encoding",
    "content-length",
    "content-encoding",
    "host",
}
ARTIFACTS = "/api/v1/agent/artifacts/"


class CorruptingProxy:
    def __init__(self, upstream: str, *, corrupt: int = 1) -> None:
        self.corrupt_left = corrupt
        self.artifact_requests: list[str | None] = []  # the Range header of each
        self.corrupted = 0
        self._lock = threading.Lock()
        self._http = httpx.Client(base_url=upstream, timeout=60)
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> CorruptingProxy:
        threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        ).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._http.close()

    def _tamper(self, path: str, status: int, body: bytes, range_header: str | None) -> bytes:
        if not path.startswith(ARTIFACTS):
            return body
        with self._lock:
            self.artifact_requests.append(range_header)
            if status not in (200, 206) or not body or self.corrupt_left <= 0:
                return body
            self.corrupt_left -= 1
            self.corrupted += 1
        flipped = bytearray(body)
        flipped[len(flipped) // 2] ^= 0xFF
        return bytes(flipped)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _forward(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
                upstream = proxy._http.request(
                    self.command,
                    self.path,
                    headers=headers,
                    content=self.rfile.read(length) if length else None,
                )
                body = proxy._tamper(
                    self.path, upstream.status_code, upstream.content, self.headers.get("Range")
                )
                self.send_response(upstream.status_code)
                for key, value in upstream.headers.items():
                    if key.lower() not in HOP_BY_HOP:
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _forward

        return Handler
