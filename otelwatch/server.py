"""The daemon's HTTP listener: /metrics, /healthz, /api/sessions, POST /api/events.

Trust boundary: it binds loopback by default and nothing it serves can cause a
signal. POST /api/events can only add events (make a session look alive), never
start a recovery. Handlers read the watcher's last snapshot; they never touch /proc.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

if TYPE_CHECKING:
    from otelwatch.daemon import Watcher

MAX_BODY_BYTES = 1 << 20


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], watcher: Watcher,
                 metrics: Callable[[str], tuple[bytes, str]] | None) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)
        self.watcher = watcher
        self.metrics = metrics


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass  # access logs would drown the reports; errors are answered, not logged

    def _send(self, status: int, body: bytes, content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, obj: Any) -> None:
        self._send(status, json.dumps(obj, default=str).encode() + b"\n")

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        path = urlsplit(self.path).path.rstrip("/") or "/"
        watcher = self.server.watcher
        if path == "/metrics":
            if self.server.metrics is None:
                self._json(HTTPStatus.NOT_FOUND, {"error": "the Prometheus exporter is disabled"})
                return
            body, content_type = self.server.metrics(self.headers.get("Accept", ""))
            self._send(HTTPStatus.OK, body, content_type)
        elif path == "/healthz":
            health = watcher.health()
            self._json(HTTPStatus.OK if health["ok"] else HTTPStatus.SERVICE_UNAVAILABLE, health)
        elif path == "/api/sessions":
            self._json(HTTPStatus.OK, [s.to_json() for s in watcher.sessions()])
        elif path.startswith("/api/sessions/"):
            session_id = unquote(path[len("/api/sessions/"):])
            snap = watcher.session(session_id)
            if snap is None:
                self._json(HTTPStatus.NOT_FOUND, {"error": f"no session {session_id!r}"})
            else:
                self._json(HTTPStatus.OK, snap.to_json())
        elif path == "/":
            self._json(HTTPStatus.OK, {"endpoints": ["/metrics", "/healthz", "/api/sessions", "POST /api/events"]})
        else:
            self._json(HTTPStatus.NOT_FOUND, {"error": f"no such endpoint {path!r}"})

    def do_POST(self) -> None:
        path = urlsplit(self.path).path.rstrip("/")
        if path != "/api/events":
            self._json(HTTPStatus.NOT_FOUND, {"error": f"no such endpoint {path!r}"})
            return
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            length = -1
        if length < 0 or length > MAX_BODY_BYTES:
            self.close_connection = True
            self._json(HTTPStatus.REQUEST_ENTITY_TOO_LARGE if length > 0 else HTTPStatus.BAD_REQUEST,
                       {"error": f"body must have a Content-Length of at most {MAX_BODY_BYTES} bytes"})
            return
        body = self.rfile.read(length)
        try:
            payload = json.loads(body)
        except (ValueError, UnicodeDecodeError) as exc:
            self._json(HTTPStatus.BAD_REQUEST, {"error": f"body is not JSON: {exc}"})
            return
        payloads = payload if isinstance(payload, list) else [payload]
        try:
            accepted = [self.server.watcher.post_event(p) for p in payloads]
        except ValueError as exc:
            self._json(HTTPStatus.BAD_REQUEST, {"error": str(exc)})
            return
        self._json(HTTPStatus.ACCEPTED, {"accepted": len(accepted), "sessions": sorted(set(accepted))})


class HttpServer:
    """Serves in a background thread; `shutdown()` is idempotent."""

    def __init__(self, host: str, port: int, watcher: Watcher,
                 metrics: Callable[[str], tuple[bytes, str]] | None) -> None:
        self._server = _Server((host, port), watcher, metrics)
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="otelwatch-http", daemon=True)
        self._stopped = False

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        host = str(self._server.server_address[0])
        return f"http://[{host}]:{self.port}" if ":" in host else f"http://{host}:{self.port}"

    def start(self) -> HttpServer:
        self._thread.start()
        return self

    def shutdown(self, timeout: float = 2.0) -> None:
        if self._stopped:
            return
        self._stopped = True
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join(timeout)
        self._server.server_close()
