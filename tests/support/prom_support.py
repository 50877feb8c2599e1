"""A real Prometheus for tests: started on a free loopback port with a temp
config and data dir, scraping the given targets every second; queried through
its HTTP API; always stopped at teardown.

    prom = start_prometheus(tmp_path, ["127.0.0.1:9464"])
    try:
        prom.wait_for("up == 1")
        prom.query('otelwatch_sessions{state="stuck"}')
    finally:
        prom.stop()

`MetricsServer` serves the exposition of any `(accept) -> (body, content_type)`
for tests that have no daemon (see tests/e2e/test_prometheus_real.py).
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from tests.support.procs import free_port, require_binary

SCRAPE_INTERVAL = "1s"


@dataclass
class PromHandle:
    url: str
    process: subprocess.Popen[bytes]
    workdir: Path
    log_path: Path
    _stopped: bool = field(default=False, repr=False)

    def api(self, path: str, **params: str) -> Any:
        query = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}{path}?{query}", timeout=5) as resp:
            payload = json.loads(resp.read())
        if payload.get("status") != "success":
            raise AssertionError(f"Prometheus API error for {path} {params}: {payload}")
        return payload["data"]

    def query(self, promql: str) -> list[dict[str, Any]]:
        """Instant query; each item is {"metric": {labels}, "value": [ts, "str"]}."""
        data = self.api("/api/v1/query", query=promql)
        result = data["result"]
        return result if isinstance(result, list) else [result]

    def value(self, promql: str) -> float | None:
        """The value of a query that returns one series (None when empty)."""
        result = self.query(promql)
        if not result:
            return None
        if len(result) > 1:
            raise AssertionError(f"{promql} returned {len(result)} series: {result}")
        return float(result[0]["value"][1])

    def wait_for(self, promql: str, timeout: float = 20.0) -> list[dict[str, Any]]:
        """Poll until the query returns at least one series; fail with Prometheus's log."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                result = self.query(promql)
            except (urllib.error.URLError, OSError):
                result = []
            if result:
                return result
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"no result for {promql!r} within {timeout} s; targets: {self.targets()}; "
                    f"log tail: {self.log_tail()}")
            if self.process.poll() is not None:
                raise AssertionError(f"prometheus exited: {self.log_tail()}")
            time.sleep(0.2)

    def targets(self) -> Any:
        try:
            data = self.api("/api/v1/targets")
        except (urllib.error.URLError, OSError, AssertionError) as exc:
            return f"<unavailable: {exc}>"
        return [(t.get("scrapeUrl"), t.get("health"), t.get("lastError"))
                for t in data.get("activeTargets", [])]

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=5)


def start_prometheus(tmp_path: Path, targets: Sequence[str], startup_timeout: float = 20.0) -> PromHandle:
    """Start Prometheus scraping `targets` ("host:port", path /metrics) every second."""
    binary = require_binary("prometheus")
    workdir = Path(tmp_path) / f"prometheus-{free_port()}"
    (workdir / "data").mkdir(parents=True)
    lines = [
        "global:",
        f"  scrape_interval: {SCRAPE_INTERVAL}",
        f"  scrape_timeout: {SCRAPE_INTERVAL}",
        "scrape_configs:",
        "  - job_name: otelwatch",
        "    static_configs:",
        f"      - targets: {json.dumps(list(targets))}",
    ]
    config = workdir / "prometheus.yml"
    config.write_text("\n".join(lines) + "\n")
    port = free_port()
    log_path = workdir / "prometheus.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}", "--web.enable-lifecycle",
             "--storage.tsdb.retention.time=1h"],
            stdout=log, stderr=subprocess.STDOUT, cwd=workdir, start_new_session=True)
    handle = PromHandle(f"http://127.0.0.1:{port}", process, workdir, log_path)
    deadline = time.monotonic() + startup_timeout
    while True:
        try:
            with urllib.request.urlopen(f"{handle.url}/-/ready", timeout=2) as resp:
                if resp.status == 200:
                    return handle
        except (urllib.error.URLError, OSError):
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            tail = handle.log_tail()
            handle.stop()
            raise AssertionError(f"prometheus did not become ready: {tail}")
        time.sleep(0.1)


class MetricsServer:
    """Serves `exposition(accept) -> (body, content_type)` at GET /metrics on loopback."""

    def __init__(self, exposition: Callable[[str], tuple[bytes, str]], host: str = "127.0.0.1") -> None:
        expose = exposition

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path.split("?")[0] != "/metrics":
                    self.send_error(404)
                    return
                body, content_type = expose(self.headers.get("Accept", ""))
                self.send_response(200)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # quiet test output
                pass

        self.server = ThreadingHTTPServer((host, 0), Handler)
        self.server.daemon_threads = True
        self.target = f"{host}:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(5)
