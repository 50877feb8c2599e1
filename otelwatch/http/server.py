"""The daemon's HTTP listener: /metrics, /healthz, /api/sessions, POST /api/events.

Owns the listener's lifecycle, its worker threads, the endpoints (`_App`) and
its counted, rate-limited log. The selector thread that owns every client
socket is `http_front.Front`; the checks decided on a request head, and who may
POST, are `http_policy`.

Trust boundary: it binds loopback by default and nothing it serves can cause a
signal; POST /api/events can only add events (make a session
look alive), never start a recovery. Handlers read the watcher's last snapshot;
they never touch /proc. It must never let a client hold the collector loop:
no unbounded thread, buffer, queue or file descriptor per client.

Who can reach it: any local user, and any web page in the user's browser. So:

- Cross-site and DNS rebinding: the `Host` header must name loopback (or the
  configured listen host with `http.allow_remote`; any host when that host is a
  wildcard address), else 421; a request carrying an `Origin` that is not a
  loopback origin is refused (403); POST needs `Content-Type: application/json`
  (415), which a page can send cross-origin only after a CORS preflight, and
  preflights are refused (OPTIONS: 405, no CORS headers).
- Connections: one selector thread accepts and reads; a connection costs a file
  descriptor, not a thread, until its whole request (head and body) is in,
  which must happen within `http.request_timeout` (idle keep-alive connections
  close after it too). At most `http.max_connections` are open; past it the
  oldest idle one (nothing of a request sent), or else the oldest request still
  incomplete after a second, makes room; only when neither exists does the
  newcomer get 503. Complete requests go to two worker threads, which never touch a socket:
  the selector thread writes the answers too, so a client that does not read
  holds no worker. The soft RLIMIT_NOFILE is raised toward the hard limit and a
  reserve of descriptors is kept free for the loop: accepting pauses when the
  descriptor numbers reach it.
- Bodies: at most 1 MiB and 1,000 events per request; the watcher's inbox is
  bounded (429 when full).

Client errors are answered and logged as one line per kind and reason per
minute (counted on `otelwatch.probe.errors`, kinds `http_*`), never a traceback.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import queue
import resource
import socket
import threading
import time
from collections.abc import Callable, Mapping
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import parse_qs, unquote, urlsplit

from otelwatch.config import HttpConfig
from otelwatch.http.front import Front, Reporter, Request, Response, Work, encode, error_response, json_response
from otelwatch.http.policy import MAX_BODY_BYTES, OTLP_PATHS, HostPolicy, is_loopback_name, parse_head, refusal
from otelwatch.sources.trust import resolve_users

if TYPE_CHECKING:
    from otelwatch.config import Config
    from otelwatch.model import SessionSnapshot


class ServerTelemetry(Protocol):
    """The counters and log the listener reports refusals to."""

    def on_probe_problem(self, kind: str, timeout: bool) -> None: ...

    def log(self, event: str, fields: Mapping[str, Any], level: str = "info") -> None: ...


class SessionService(Protocol):
    """What the listener needs of the collector: the daemon's `Watcher` is one, a test
    double another. `cfg` and `telemetry` may be absent on a double (no uid check, no
    counting)."""

    @property
    def cfg(self) -> Config: ...

    @property
    def telemetry(self) -> ServerTelemetry: ...

    def sessions(self) -> list[SessionSnapshot]: ...

    def session(self, session_id: str) -> SessionSnapshot | None: ...

    def health(self) -> dict[str, Any]: ...

    def post_event(self, payload: Any, uid: int | None = None) -> list[str]: ...


__all__ = ["MAX_BODY_BYTES", "MAX_EVENTS_PER_REQUEST", "HostPolicy", "HttpServer", "ServerTelemetry",
           "SessionService", "fd_budget", "parse_head", "refusal"]

MAX_EVENTS_PER_REQUEST = 1000
# Handlers see complete requests and never wait on a client, so two keep up; more would
# only take the GIL from the loop (parsing a 1 MiB body holds it for milliseconds).
WORKERS = 2
FD_TARGET = 8192  # the soft RLIMIT_NOFILE is raised toward the hard limit, up to this
FD_RESERVE_MIN = 64  # descriptors kept free for the loop (probes, exporters, spool)
LOG_EVERY_S = 60.0


# --------------------------------------------------------------------------- the endpoints


class _App:
    """Routes a complete, already admitted request to the watcher. Never raises."""

    def __init__(self, watcher: SessionService, metrics: Callable[[str], tuple[bytes, str]] | None,
                 report: Reporter) -> None:
        self.watcher = watcher
        self.metrics = metrics
        self.report = report

    def handle(self, req: Request) -> Response:
        try:
            return self._post(req) if req.method == "POST" else self._get(req)
        except Exception as exc:  # a bug answers 500 and one log line, never a dead worker
            self.report("http_internal", "http.error", "handler failed", req.peer, error=repr(exc)[:300])
            return error_response(HTTPStatus.INTERNAL_SERVER_ERROR, "internal error; see the daemon's log")

    def _get(self, req: Request) -> Response:
        path = urlsplit(req.target).path.rstrip("/") or "/"
        watcher = self.watcher
        if path == "/metrics":
            if self.metrics is None:
                return error_response(HTTPStatus.NOT_FOUND, "the Prometheus exporter is disabled")
            body, content_type = self.metrics(req.headers.get("Accept", ""))
            return Response(HTTPStatus.OK, body, content_type)
        if path == "/healthz":
            health = watcher.health()
            return json_response(HTTPStatus.OK if health["ok"] else HTTPStatus.SERVICE_UNAVAILABLE, health)
        if path == "/api/sessions":
            user = parse_qs(urlsplit(req.target).query).get("user", [""])[-1]
            return json_response(HTTPStatus.OK, [s.to_json() for s in watcher.sessions()
                                                 if not user or user in (s.user, str(s.uid))])
        if path.startswith("/api/sessions/"):
            session_id = unquote(path[len("/api/sessions/"):])
            snap = watcher.session(session_id)
            if snap is None:
                return error_response(HTTPStatus.NOT_FOUND, f"no session {session_id!r}")
            return json_response(HTTPStatus.OK, snap.to_json())
        if path == "/":
            return json_response(HTTPStatus.OK,
                                 {"endpoints": ["/metrics", "/healthz", "/api/sessions", "POST /api/events"]})
        return error_response(HTTPStatus.NOT_FOUND, f"no such endpoint {path!r}")

    def _post(self, req: Request) -> Response:
        path = urlsplit(req.target).path.rstrip("/")
        otlp = getattr(self.watcher, "otlp", None)
        if path in OTLP_PATHS and otlp is not None:
            # The agents' own OpenTelemetry ([sources.otlp]): decoded, queued, answered at once.
            status, body, media = otlp.handle(path[len("/v1/"):], req.body, req.headers.get("Content-Type") or "",
                                              req.headers.get("Content-Encoding") or "", req.peer_socket)
            if status >= 400:
                self.report("http_client", "http.client_error", "bad OTLP request", req.peer, status=int(status))
            return Response(status, body, media)
        if path != "/api/events":
            return error_response(HTTPStatus.NOT_FOUND, f"no such endpoint {path!r}")
        try:
            payload = json.loads(req.body)
        except RecursionError:
            return self._clienterror_response(req, HTTPStatus.BAD_REQUEST, "JSON nested too deeply")
        except (ValueError, UnicodeDecodeError) as exc:
            return self._clienterror_response(req, HTTPStatus.BAD_REQUEST, "body is not JSON", f": {exc}")
        count = len(payload) if isinstance(payload, list) else 1
        if count > MAX_EVENTS_PER_REQUEST:
            return self._clienterror_response(req, HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                                      f"at most {MAX_EVENTS_PER_REQUEST} events per request", f", got {count}")
        try:
            sessions = self.watcher.post_event(payload, uid=req.uid)
        except PermissionError as exc:  # naming another user's process (DESIGN "Users are walls")
            return self._clienterror_response(req, HTTPStatus.FORBIDDEN, "event names another user's process",
                                              f": {exc}")
        except queue.Full as exc:  # counted by the watcher (kind "inbox"); logged here
            self.report(None, "http.refused", "event inbox full", req.peer)
            retry = str(max(1, math.ceil(self.watcher.cfg.interval)))
            return json_response(HTTPStatus.TOO_MANY_REQUESTS, {"error": str(exc)}, (("Retry-After", retry),))
        except ValueError as exc:
            return self._clienterror_response(req, HTTPStatus.BAD_REQUEST, "bad event", f": {exc}")
        return json_response(HTTPStatus.ACCEPTED, {"accepted": len(sessions), "sessions": sorted(set(sessions))})

    def _clienterror_response(self, req: Request, status: int, reason: str, detail: str = "") -> Response:
        self.report("http_client", "http.client_error", reason, req.peer, status=int(status))
        return error_response(status, reason + detail)


# --------------------------------------------------------------------------- the listener


def fd_budget(max_connections: int) -> tuple[int, int]:
    """(connection cap, descriptor ceiling) for this process.

    Raises the soft RLIMIT_NOFILE toward the hard limit (up to FD_TARGET), keeps a
    reserve of an eighth of it (at least FD_RESERVE_MIN) for the loop, and caps
    connections under what is left after the descriptors open now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = FD_TARGET if hard == resource.RLIM_INFINITY else min(hard, FD_TARGET)
    if soft != resource.RLIM_INFINITY and soft < target:
        with contextlib.suppress(OSError, ValueError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
    if soft == resource.RLIM_INFINITY:
        soft = FD_TARGET
    ceiling = soft - max(FD_RESERVE_MIN, soft // 8)
    try:
        in_use = len(os.listdir("/proc/self/fd"))
    except OSError:
        in_use = 32
    return max(1, min(max_connections, ceiling - in_use)), ceiling


class HttpServer:
    """Serves in background threads (one selector thread, a few workers); `shutdown()` is idempotent."""

    def __init__(self, host: str, port: int, watcher: SessionService,
                 metrics: Callable[[str], tuple[bytes, str]] | None, *, http: HttpConfig | None = None) -> None:
        http = http or watcher.cfg.http
        self._remote = not is_loopback_name(host)
        # Who may POST events on a loopback listener (None: no check, e.g. a Watcher
        # without config in a test double). Remote listeners (`http.allow_remote`)
        # cannot know a peer's uid; whoever opts in to one accepts that.
        cfg = getattr(watcher, "cfg", None)
        writers: frozenset[int] | None = (
            None if cfg is None else frozenset({os.geteuid(), 0}) | resolve_users(cfg.recovery.users))
        self.max_connections, fd_ceiling = fd_budget(http.max_connections)
        self._telemetry = getattr(watcher, "telemetry", None)
        self._log_lock = threading.Lock()
        self._logged: dict[tuple[str, str], tuple[float, int]] = {}
        self._app = _App(watcher, metrics, self._report)

        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._listen = socket.create_server((host, port), family=family, backlog=4096)
        self._listen.setblocking(False)
        own_ports = getattr(watcher, "own_ports", None)
        if isinstance(own_ports, set):
            own_ports.add(int(self._listen.getsockname()[1]))
        self._work: queue.SimpleQueue[Work | None] = queue.SimpleQueue()
        self._front = Front(self._listen, hosts=HostPolicy.for_listen(host, http.allow_remote),
                            timeout=float(http.request_timeout), max_connections=self.max_connections,
                            fd_ceiling=fd_ceiling, writers=None if self._remote else writers,
                            submit=self._work.put, report=self._report,
                            otlp=getattr(watcher, "otlp", None) is not None)
        self._stopped = False
        self._front_thread = threading.Thread(target=self._front.serve, name="otelwatch-http", daemon=True)
        self._workers = [threading.Thread(target=self._work_loop, name=f"otelwatch-http-{n}", daemon=True)
                         for n in range(min(WORKERS, self.max_connections))]

    @property
    def port(self) -> int:
        return int(self._listen.getsockname()[1])

    @property
    def url(self) -> str:
        host = str(self._listen.getsockname()[0])
        return f"http://[{host}]:{self.port}" if ":" in host else f"http://{host}:{self.port}"

    def start(self) -> HttpServer:
        if self._remote:
            # Loud on purpose: http.allow_remote opens POST /api/events to the network.
            self._log("http.remote_listener", {
                "listen": self.url, "message": "listening beyond loopback (http.allow_remote): any host that can "
                "reach this port can read sessions and post events"}, "warning")
        self._front_thread.start()
        for worker in self._workers:
            worker.start()
        return self

    def shutdown(self, timeout: float = 2.0) -> None:
        if self._stopped:
            return
        self._stopped = True
        self._front.stopping = True
        deadline = time.monotonic() + timeout
        self._front.wake()
        for _ in self._workers:
            self._work.put(None)
        for thread in (self._front_thread, *self._workers):
            if thread.is_alive():
                thread.join(max(0.0, deadline - time.monotonic()))
        self._front.close()

    # ------------------------------------------------------------------ workers

    def _work_loop(self) -> None:
        while True:
            item = self._work.get()
            if item is None:
                return
            conn, request, head = item
            keep = head.keep_alive and not self._front.stopping
            try:
                data = encode(self._app.handle(request), head_only=head.method == "HEAD", close=not keep)
            except Exception as exc:  # _App.handle does not raise; encode might, on a bug
                keep = False
                self._report("http_internal", "http.error", "worker failed", conn.peer, error=repr(exc)[:300])
                data = encode(error_response(HTTPStatus.INTERNAL_SERVER_ERROR, "internal error"), close=True)
            self._front.give_back(conn, keep, data)

    # ------------------------------------------------------------------ reporting

    def _report(self, kind: str | None, event: str, reason: str, peer: str, **fields: Any) -> None:
        """Count (when `kind` is given) every time; log one line per event and reason per
        LOG_EVERY_S, saying how many were not logged since. Never raises."""
        if kind is not None and self._telemetry is not None:
            with contextlib.suppress(Exception):
                self._telemetry.on_probe_problem(kind, False)
        now = time.monotonic()
        with self._log_lock:
            last, skipped = self._logged.get((event, reason), (-math.inf, 0))
            if now - last < LOG_EVERY_S:
                self._logged[(event, reason)] = (last, skipped + 1)
                return
            self._logged[(event, reason)] = (now, 0)
        self._log(event, {"reason": reason, "peer": peer, **fields, "not_logged_since_last": skipped},
                  "warning" if kind != "http_internal" else "error")

    def _log(self, event: str, fields: Mapping[str, Any], level: str) -> None:
        try:
            self._telemetry.log(event, fields, level)  # type: ignore[union-attr]
        except Exception:
            with contextlib.suppress(Exception):
                import sys

                print(f"otelwatch: {event} {json.dumps(dict(fields), default=str)}", file=sys.stderr)
