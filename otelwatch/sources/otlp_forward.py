"""Forwarding the agents' own OTLP on, unchanged, to the user's OTLP/HTTP endpoint.

Owns one thread and one bounded queue. The receiver hands over each request's
(inflated) body as it came; the thread sends them to `<endpoint>/v1/<signal>`
in batches: protobuf bodies of one signal are concatenated (a concatenation of
serialized export requests is the export request holding all their resources,
records and attributes as they were), JSON bodies merged by their top-level
list. A batch that fails (connection refused, timeout, an answer other than
2xx) is counted on `otelwatch.export.failures{signal="agent_<signal>"}` and
dropped: the agent already has its answer, and a slow or dead backend must never
hold records (memory) or the receiver (time) without bound.

Must never block `submit` (it drops, counted, when the queue is full) and never
raise into the receiver.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import threading
import time
from collections import deque
from collections.abc import Callable
from urllib.parse import urlsplit

__all__ = ["BATCH_BYTES", "QUEUE_BYTES", "Forwarder"]

QUEUE_BYTES = 32 << 20  # bodies waiting to be sent, in all
BATCH_BYTES = 1 << 20  # one upstream request
LINGER_S = 0.2  # how long the first body of a batch waits for others


class Forwarder:
    """`submit()` from any thread; one thread sends. `close()` is idempotent."""

    def __init__(self, endpoint: str, *, timeout: float = 5.0, queue_bytes: int = QUEUE_BYTES,
                 failed: Callable[[str, int], None] | None = None,
                 headers: tuple[tuple[str, str], ...] = ()) -> None:
        parts = urlsplit(endpoint)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"forward endpoint must be an http(s) URL, got {endpoint!r}")
        self._scheme = parts.scheme
        self._host = parts.hostname
        self._port = parts.port or (443 if parts.scheme == "https" else 80)
        self._base = parts.path.rstrip("/")
        self._timeout = timeout
        self._queue_bytes = queue_bytes
        self._failed = failed or (lambda signal, n: None)
        self._headers = headers
        self._items: deque[tuple[str, str, bytes]] = deque()  # (signal, media type, body)
        self._bytes = 0
        self._cond = threading.Condition()
        self._closed = False
        self._conn: http.client.HTTPConnection | None = None
        self.sent = 0  # bodies delivered upstream
        self.dropped = 0  # bodies dropped (queue full or a failed batch)
        self.failures = 0  # failed upstream requests
        self.failed_by_signal: dict[str, int] = {}
        self._thread = threading.Thread(target=self._run, name="otelwatch-otlp-forward", daemon=True)
        self._thread.start()

    @property
    def queued_bytes(self) -> int:
        return self._bytes

    def submit(self, signal: str, media: str, body: bytes) -> bool:
        """Queue one body; False (counted as a failure of `signal`) when the queue is full."""
        with self._cond:
            if self._closed or self._bytes + len(body) > self._queue_bytes:
                self.dropped += 1
                full = True
            else:
                self._items.append((signal, media, body))
                self._bytes += len(body)
                self._cond.notify()
                full = False
        if full:
            self._count(signal, 1)
        return not full

    def close(self, timeout: float = 2.0) -> None:
        """Send what is queued within `timeout`, then stop."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout)
        with contextlib.suppress(Exception):
            if self._conn is not None:
                self._conn.close()

    # ------------------------------------------------------------------ the thread

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._items and not self._closed:
                    self._cond.wait()
                if not self._items and self._closed:
                    return
                first_at = time.monotonic()
            # Give the bodies sent together by an agent (logs and metrics of one export) a moment.
            while not self._closed and time.monotonic() - first_at < LINGER_S:
                with self._cond:
                    if self._bytes >= BATCH_BYTES:
                        break
                    self._cond.wait(LINGER_S)
            batch = self._take()
            if batch is not None:
                self._send(*batch)

    def _take(self) -> tuple[str, str, list[bytes]] | None:
        with self._cond:
            if not self._items:
                return None
            signal, media, body = self._items.popleft()
            bodies, size = [body], len(body)
            while self._items:
                s2, m2, b2 = self._items[0]
                if s2 != signal or m2 != media or size + len(b2) > BATCH_BYTES:
                    break
                self._items.popleft()
                bodies.append(b2)
                size += len(b2)
            self._bytes -= size
            return signal, media, bodies

    def _send(self, signal: str, media: str, bodies: list[bytes]) -> None:
        try:
            payload = _merge(signal, media, bodies)
            status = self._post(f"{self._base}/v1/{signal}", media, payload)
            ok = 200 <= status < 300
        except Exception:
            ok = False
            with contextlib.suppress(Exception):
                if self._conn is not None:
                    self._conn.close()
            self._conn = None
        if ok:
            self.sent += len(bodies)
        else:
            self.failures += 1
            self.failed_by_signal[signal] = self.failed_by_signal.get(signal, 0) + 1
            self.dropped += len(bodies)
            self._count(signal, 1)

    def _post(self, path: str, media: str, payload: bytes) -> int:
        for attempt in (0, 1):  # a kept-alive connection the server closed: once more, afresh
            if self._conn is None:
                cls = http.client.HTTPSConnection if self._scheme == "https" else http.client.HTTPConnection
                self._conn = cls(self._host, self._port, timeout=self._timeout)
            conn = self._conn
            try:
                conn.request("POST", path, body=payload, headers={"Content-Type": media, **dict(self._headers)})
                resp = conn.getresponse()
                resp.read()
                if resp.will_close:
                    conn.close()
                    self._conn = None
                return resp.status
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                conn.close()
                self._conn = None
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def _count(self, signal: str, n: int) -> None:
        with contextlib.suppress(Exception):
            self._failed(signal, n)


def _merge(signal: str, media: str, bodies: list[bytes]) -> bytes:
    """One export request holding every body's resources as they came."""
    if len(bodies) == 1:
        return bodies[0]
    if media != "application/json":
        # Protobuf: an export request is one repeated field; concatenated messages merge.
        return b"".join(bodies)
    key = {"logs": "resourceLogs", "metrics": "resourceMetrics", "traces": "resourceSpans"}[signal]
    merged: list[object] = []
    for body in bodies:
        doc = json.loads(body)
        if isinstance(doc, dict):
            merged.extend(doc.get(key) or doc.get(_snake(key)) or [])
    return json.dumps({key: merged}, separators=(",", ":")).encode()


def _snake(camel: str) -> str:
    return "".join("_" + c.lower() if c.isupper() else c for c in camel)
