"""A local OTLP/HTTP receiver for tests and the real-agent OTLP runs: it stores what it
gets (path, content type, body) and answers 200; `delay` makes it slow (an upstream
that keeps otelwatch's forwarder waiting)."""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = ["OtlpSink"]


class OtlpSink:
    def __init__(self, delay: float = 0.0) -> None:
        self.got: list[tuple[str, str, bytes]] = []
        self.delay = delay
        sink = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if sink.delay:
                    time.sleep(sink.delay)
                sink.got.append((self.path, self.headers.get("Content-Type", ""), body))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
