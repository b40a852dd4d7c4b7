"""A small threaded HTTP server that serves one file with Range support.

Stands in for the control plane's artifact endpoint in the staging tests and the
storage benchmark. It checks a bearer token and can misbehave on purpose: drop the
connection part-way, flip a byte, claim the file is shorter than it is, or ignore
Range headers. `python -m tests.dataplane.storage.range_server FILE` serves FILE from a
separate process (the benchmark does this so the server does not share its GIL) and
prints the URL.
"""

from __future__ import annotations

import os
import re
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

_RANGE = re.compile(r"bytes=(\d+)-(\d*)")


class RangeServer:
    """Serve `path` at `url`; attributes switch on the faults, `requests` logs Range headers."""

    def __init__(self, path: Path, *, token: str | None = None, host: str = "127.0.0.1") -> None:
        self.path = path
        self.token = token
        self.honor_range = True
        self.truncate_to: int | None = None
        self.drop_after: int | None = None  # next response only
        self.fail_with: int | None = None  # next response only: this HTTP status, no body
        self.corrupt_offset: int | None = None
        self.corrupt_times = 0
        self.requests: list[str | None] = []
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer((host, 0), self._handler_class())
        self._httpd.daemon_threads = True
        self.url = f"http://{host}:{self._httpd.server_address[1]}/artifact.bin"

    def start(self) -> RangeServer:
        threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        ).start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> RangeServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def serve_forever(self) -> None:
        self._httpd.serve_forever()

    def _plan(self, range_header: str | None) -> dict[str, Any]:
        """Decide one response under the lock, consuming one-shot faults."""
        with self._lock:
            self.requests.append(range_header)
            size = self.path.stat().st_size if self.truncate_to is None else self.truncate_to
            drop, self.drop_after = self.drop_after, None
            fail, self.fail_with = self.fail_with, None
            start, end, status = 0, size - 1, 200
            match = _RANGE.fullmatch(range_header or "") if self.honor_range else None
            if match:
                start = int(match[1])
                end = min(int(match[2]) if match[2] else size - 1, size - 1)
                status = 206 if start < size else 416
            corrupt = None
            if (
                status != 416
                and self.corrupt_times > 0
                and self.corrupt_offset is not None
                and start <= self.corrupt_offset <= end
            ):
                corrupt = self.corrupt_offset
                self.corrupt_times -= 1
            return {
                "size": size,
                "start": start,
                "end": end,
                "status": status,
                "drop": drop,
                "fail": fail,
                "corrupt": corrupt,
            }

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                if server.token and self.headers.get("Authorization") != f"Bearer {server.token}":
                    self.send_response(401)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                plan = server._plan(self.headers.get("Range"))
                if plan["fail"] is not None:
                    self.send_response(plan["fail"])
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                start, end, size = plan["start"], plan["end"], plan["size"]
                self.send_response(plan["status"])
                if plan["status"] == 416:
                    self.send_header("Content-Range", f"bytes */{size}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                length = end - start + 1
                if plan["status"] == 206:
                    self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
                self.send_header("Content-Length", str(length))
                self.send_header("Accept-Ranges", "bytes")
                self.end_headers()
                if plan["drop"] is not None or plan["corrupt"] is not None:
                    self._send_faulty(start, length, plan["drop"], plan["corrupt"])
                    return
                with open(server.path, "rb") as f:
                    self.connection.sendfile(f, offset=start, count=length)

            def _send_faulty(
                self, start: int, length: int, drop: int | None, corrupt: int | None
            ) -> None:
                with open(server.path, "rb") as f:
                    data = bytearray(os.pread(f.fileno(), length, start))
                if corrupt is not None:
                    data[corrupt - start] ^= 0xFF
                if drop is not None:
                    self.wfile.write(data[:drop])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                self.wfile.write(data)

        return Handler


def main(argv: list[str]) -> int:
    server = RangeServer(Path(argv[0]), token=argv[1] if len(argv) > 1 else None)
    print(server.url, flush=True)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
