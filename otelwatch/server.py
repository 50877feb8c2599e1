"""The daemon's HTTP listener: /metrics, /healthz, /api/sessions, POST /api/events.

Owns the listening socket, HTTP/1.1 framing, the request policy and the
listener's limits. Trust boundary: it binds loopback by default and nothing it
serves can cause a signal; POST /api/events can only add events (make a session
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
import email.utils
import errno
import http.client
import io
import ipaddress
import json
import math
import os
import queue
import resource
import selectors
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from email.message import Message
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import unquote, urlsplit

from otelwatch.config import HttpConfig
from otelwatch.procfs import tcp_peer_uid
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

    def post_event(self, payload: Any) -> list[str]: ...

__all__ = ["MAX_BODY_BYTES", "MAX_EVENTS_PER_REQUEST", "HostPolicy", "HttpServer", "ServerTelemetry",
           "SessionService", "fd_budget", "parse_head", "refusal"]

MAX_BODY_BYTES = 1 << 20
MAX_HEAD_BYTES = 16 << 10  # request line and headers
MAX_EVENTS_PER_REQUEST = 1000
# Handlers see complete requests and never wait on a client, so two keep up; more would
# only take the GIL from the loop (parsing a 1 MiB body holds it for milliseconds).
WORKERS = 2
FD_TARGET = 8192  # the soft RLIMIT_NOFILE is raised toward the hard limit, up to this
FD_RESERVE_MIN = 64  # descriptors kept free for the loop (probes, exporters, spool)
ACCEPT_BATCH = 16  # accepts per wakeup, so reads of accepted connections are not starved
SLOW_S = 1.0  # at the cap, a request still incomplete after this may be closed for a newcomer
ACCEPT_PAUSE_S = 0.25  # after EMFILE or at the descriptor reserve: let the loop have them
LINGER_S = 1.0  # after an early error answer, read (and drop) what the client still sends
LOG_EVERY_S = 60.0
_ALLOWED = "GET, HEAD, POST"
_WILDCARDS = frozenset({"", "0.0.0.0", "::"})

Reporter = Callable[..., None]


# --------------------------------------------------------------------------- policy (pure)


class HeadError(ValueError):
    """A request head that cannot be served: `status` is the answer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Head:
    method: str
    target: str
    version: str
    headers: Message
    length: int  # of the body
    keep_alive: bool
    expect_continue: bool


@dataclass(frozen=True)
class HostPolicy:
    """Which `Host` header values name this listener: loopback always; with
    `http.allow_remote` also the configured host, or any host on a wildcard address."""

    names: frozenset[str] = frozenset()
    any_host: bool = False

    @classmethod
    def for_listen(cls, host: str, allow_remote: bool) -> HostPolicy:
        host = host.strip("[]").lower()
        if not allow_remote or is_loopback_name(host):
            return cls()
        return cls(any_host=True) if host in _WILDCARDS else cls(names=frozenset({host}))

    def allows(self, host_header: str) -> bool:
        if self.any_host:
            return True
        name = _host_name(host_header)
        return name is not None and (is_loopback_name(name) or name in self.names)


def is_loopback_name(name: str) -> bool:
    """`localhost` or a loopback address (127.0.0.0/8, ::1, ::ffff:127.x)."""
    name = name.strip("[]").lower().rstrip(".")
    if name == "localhost":
        return True
    try:
        addr = ipaddress.ip_address(name)
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped.is_loopback
    return addr.is_loopback


def _host_name(value: str) -> str | None:
    """The name of a Host header value without its port; None when malformed."""
    value = value.strip().lower()
    if value.startswith("["):
        end = value.find("]")
        rest = value[end + 1:] if end > 0 else "x"
        if end < 0 or (rest and not (rest.startswith(":") and rest[1:].isdigit())):
            return None
        return value[1:end]
    name, sep, port = value.rpartition(":")
    if not sep:
        return value or None
    if ":" in name or not port.isdigit():
        return None  # a bare IPv6 literal or junk: Host needs brackets around IPv6
    return name or None


def _loopback_origin(origin: str) -> bool:
    try:
        parts = urlsplit(origin.strip())
        parts.port  # noqa: B018 - raises ValueError on a malformed port
    except ValueError:
        return False
    return (parts.scheme in ("http", "https") and parts.hostname is not None
            and is_loopback_name(parts.hostname) and parts.path in ("", "/"))


def parse_head(raw: bytes) -> Head:
    """The request line and headers (`raw` ends with the blank line). Raises HeadError."""
    line, _, rest = raw.partition(b"\r\n")
    parts = line.split(b" ")
    if len(parts) != 3:
        raise HeadError(HTTPStatus.BAD_REQUEST, "malformed request line")
    try:
        method, target, version = (p.decode("ascii") for p in parts)
    except UnicodeDecodeError:
        raise HeadError(HTTPStatus.BAD_REQUEST, "request line is not ASCII") from None
    if not (method.isascii() and method.isalpha() and method.isupper()):
        raise HeadError(HTTPStatus.BAD_REQUEST, "malformed method")
    if version not in ("HTTP/1.1", "HTTP/1.0"):
        raise HeadError(HTTPStatus.HTTP_VERSION_NOT_SUPPORTED, "only HTTP/1.0 and HTTP/1.1 are served")
    if not target.startswith("/") and not (method == "OPTIONS" and target == "*"):
        raise HeadError(HTTPStatus.BAD_REQUEST, "the request target must be a path")
    try:
        headers = http.client.parse_headers(io.BytesIO(rest))
    except http.client.HTTPException:
        raise HeadError(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "too many or too long headers") from None
    if len(headers.get_all("Host") or ()) > 1:
        raise HeadError(HTTPStatus.BAD_REQUEST, "more than one Host header")
    if headers.get("Transfer-Encoding") is not None:
        raise HeadError(HTTPStatus.LENGTH_REQUIRED, "chunked bodies are not accepted; send a Content-Length")
    lengths = {v.strip() for v in headers.get_all("Content-Length") or ()}
    if len(lengths) > 1 or not all(v.isdigit() for v in lengths):
        raise HeadError(HTTPStatus.BAD_REQUEST, "malformed Content-Length")
    length = int(lengths.pop()) if lengths else -1
    tokens = {t.strip().lower() for t in (headers.get("Connection") or "").split(",")}
    return Head(method=method, target=target, version=version, headers=headers, length=length,
                keep_alive=version == "HTTP/1.1" and "close" not in tokens,
                expect_continue=(headers.get("Expect") or "").strip().lower() == "100-continue")


def refusal(head: Head, hosts: HostPolicy) -> tuple[int, str] | None:
    """(status, why) when the request must not be served; None when it may.

    Decided on the head alone, before any body is read."""
    host = head.headers.get("Host")
    if host is not None and not hosts.allows(host):
        return HTTPStatus.MISDIRECTED_REQUEST, "Host does not name this listener (DNS rebinding?)"
    if head.method not in ("GET", "HEAD", "POST"):  # a CORS preflight (OPTIONS) included
        return HTTPStatus.METHOD_NOT_ALLOWED, "method not allowed (no CORS preflight is answered)"
    origins = head.headers.get_all("Origin") or []
    if len(origins) > 1 or any(not _loopback_origin(o) for o in origins):
        return HTTPStatus.FORBIDDEN, "cross-origin request refused"
    if head.method == "POST":
        media = (head.headers.get("Content-Type") or "").split(";", 1)[0].strip().lower()
        if media != "application/json":
            return HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "POST needs Content-Type: application/json"
        if head.length < 0:
            return HTTPStatus.LENGTH_REQUIRED, "POST needs a Content-Length"
    if head.length > MAX_BODY_BYTES:
        return HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"body larger than {MAX_BODY_BYTES} bytes"
    return None


# --------------------------------------------------------------------------- responses


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()


def json_response(status: int, obj: Any, headers: tuple[tuple[str, str], ...] = ()) -> Response:
    return Response(status, json.dumps(obj, default=str).encode() + b"\n", headers=headers)


def encode(resp: Response, *, head_only: bool = False, close: bool = False) -> bytes:
    try:
        phrase = HTTPStatus(resp.status).phrase
    except ValueError:
        phrase = ""
    lines = [f"HTTP/1.1 {resp.status} {phrase}", f"Date: {email.utils.formatdate(usegmt=True)}",
             f"Content-Type: {resp.content_type}", f"Content-Length: {len(resp.body)}",
             "Cache-Control: no-store", "X-Content-Type-Options: nosniff"]
    lines += [f"{k}: {v}" for k, v in resp.headers]
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (b"" if head_only else resp.body)


def _error(status: int, message: str) -> Response:
    extra = (("Allow", _ALLOWED),) if status == HTTPStatus.METHOD_NOT_ALLOWED else ()
    return json_response(status, {"error": message}, extra)


# --------------------------------------------------------------------------- the endpoints


@dataclass(frozen=True)
class Request:
    method: str
    target: str
    headers: Message
    body: bytes
    peer: str


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
            return _error(HTTPStatus.INTERNAL_SERVER_ERROR, "internal error; see the daemon's log")

    def _get(self, req: Request) -> Response:
        path = urlsplit(req.target).path.rstrip("/") or "/"
        watcher = self.watcher
        if path == "/metrics":
            if self.metrics is None:
                return _error(HTTPStatus.NOT_FOUND, "the Prometheus exporter is disabled")
            body, content_type = self.metrics(req.headers.get("Accept", ""))
            return Response(HTTPStatus.OK, body, content_type)
        if path == "/healthz":
            health = watcher.health()
            return json_response(HTTPStatus.OK if health["ok"] else HTTPStatus.SERVICE_UNAVAILABLE, health)
        if path == "/api/sessions":
            return json_response(HTTPStatus.OK, [s.to_json() for s in watcher.sessions()])
        if path.startswith("/api/sessions/"):
            session_id = unquote(path[len("/api/sessions/"):])
            snap = watcher.session(session_id)
            if snap is None:
                return _error(HTTPStatus.NOT_FOUND, f"no session {session_id!r}")
            return json_response(HTTPStatus.OK, snap.to_json())
        if path == "/":
            return json_response(HTTPStatus.OK,
                                 {"endpoints": ["/metrics", "/healthz", "/api/sessions", "POST /api/events"]})
        return _error(HTTPStatus.NOT_FOUND, f"no such endpoint {path!r}")

    def _post(self, req: Request) -> Response:
        path = urlsplit(req.target).path.rstrip("/")
        if path != "/api/events":
            return _error(HTTPStatus.NOT_FOUND, f"no such endpoint {path!r}")
        try:
            payload = json.loads(req.body)
        except RecursionError:
            return self._client_error(req, HTTPStatus.BAD_REQUEST, "JSON nested too deeply")
        except (ValueError, UnicodeDecodeError) as exc:
            return self._client_error(req, HTTPStatus.BAD_REQUEST, "body is not JSON", f": {exc}")
        count = len(payload) if isinstance(payload, list) else 1
        if count > MAX_EVENTS_PER_REQUEST:
            return self._client_error(req, HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                                      f"at most {MAX_EVENTS_PER_REQUEST} events per request", f", got {count}")
        try:
            sessions = self.watcher.post_event(payload)
        except queue.Full as exc:  # counted by the watcher (kind "inbox"); logged here
            self.report(None, "http.refused", "event inbox full", req.peer)
            retry = str(max(1, math.ceil(self.watcher.cfg.interval)))
            return json_response(HTTPStatus.TOO_MANY_REQUESTS, {"error": str(exc)}, (("Retry-After", retry),))
        except ValueError as exc:
            return self._client_error(req, HTTPStatus.BAD_REQUEST, "bad event", f": {exc}")
        return json_response(HTTPStatus.ACCEPTED, {"accepted": len(sessions), "sessions": sorted(set(sessions))})

    def _client_error(self, req: Request, status: int, reason: str, detail: str = "") -> Response:
        self.report("http_client", "http.client_error", reason, req.peer, status=int(status))
        return _error(status, reason + detail)


# --------------------------------------------------------------------------- the listener


class _Conn:
    """One client connection. Owned by the front thread, or by one worker while busy."""

    __slots__ = ("buf", "busy", "closing", "deadline", "head", "keep", "need", "out", "peer", "served", "sock")

    def __init__(self, sock: socket.socket, peer: str, deadline: float) -> None:
        self.sock = sock
        self.peer = peer
        self.buf = bytearray()
        self.deadline = deadline  # monotonic: the whole current request must be in by then
        self.head: Head | None = None
        self.need = 0  # bytes of the current request (head and body) once its head is parsed
        self.served = 0
        self.busy = False
        self.closing = False  # answered with an error; dropping what still comes, then closed
        self.out: memoryview | None = None  # the rest of an answer being written
        self.keep = False  # after that answer: read the next request (keep-alive) or close

    @property
    def idle(self) -> bool:
        """Nothing of a request received: closing it loses no one's work."""
        return not self.busy and self.out is None and (self.closing or (not self.buf and self.head is None))


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
        self._timeout = float(http.request_timeout)
        self._hosts = HostPolicy.for_listen(host, http.allow_remote)
        self._remote = not is_loopback_name(host)
        # Who may POST events on a loopback listener (None: no check, e.g. a Watcher
        # without config in a test double).
        cfg = getattr(watcher, "cfg", None)
        self._writers: frozenset[int] | None = (
            None if cfg is None else frozenset({os.geteuid(), 0}) | resolve_users(cfg.recovery.users))
        self.max_connections, self._fd_ceiling = fd_budget(http.max_connections)
        self._telemetry = getattr(watcher, "telemetry", None)
        self._log_lock = threading.Lock()
        self._logged: dict[tuple[str, str], tuple[float, int]] = {}
        self._app = _App(watcher, metrics, self._report)

        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._listen = socket.create_server((host, port), family=family, backlog=4096)
        self._listen.setblocking(False)
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._sel = selectors.DefaultSelector()
        self._sel.register(self._listen, selectors.EVENT_READ, "listen")
        self._sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._accept_paused_until: float | None = None
        self._conns: dict[_Conn, None] = {}  # insertion order = age order (oldest first)
        self._work: queue.SimpleQueue[tuple[_Conn, Request, Head] | None] = queue.SimpleQueue()
        self._returns: queue.SimpleQueue[tuple[_Conn, bool, bytes]] = queue.SimpleQueue()
        self._stopping = False
        self._stopped = False
        self._front = threading.Thread(target=self._serve, name="otelwatch-http", daemon=True)
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
        self._front.start()
        for worker in self._workers:
            worker.start()
        return self

    def shutdown(self, timeout: float = 2.0) -> None:
        if self._stopped:
            return
        self._stopped = True
        self._stopping = True
        deadline = time.monotonic() + timeout
        self._wake()
        for _ in self._workers:
            self._work.put(None)
        for thread in (self._front, *self._workers):
            if thread.is_alive():
                thread.join(max(0.0, deadline - time.monotonic()))
        for conn in list(self._conns):
            with contextlib.suppress(OSError):
                conn.sock.close()
        self._conns.clear()
        for closable in (self._sel, self._listen, self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                closable.close()

    # ------------------------------------------------------------------ front thread

    def _serve(self) -> None:
        while not self._stopping:
            now = time.monotonic()
            due = min((c.deadline for c in self._conns if not c.busy), default=now + 1.0)
            if self._accept_paused_until is not None:
                due = min(due, self._accept_paused_until)
            try:
                events = self._sel.select(max(0.0, min(due - now, 1.0)))
            except OSError:
                events = []
            for key, _ in events:
                try:
                    if key.data == "listen":
                        self._accept()
                    elif key.data == "wake":
                        self._take_returns()
                    elif key.data not in self._conns:
                        continue  # closed earlier in this batch (evicted for a newcomer)
                    elif key.data.out is not None:
                        self._flush(key.data)
                    else:
                        self._read(key.data)
                except Exception as exc:  # the listener must outlive any one connection
                    self._report("http_internal", "http.error", "front failed", "", error=repr(exc)[:300])
                    if isinstance(key.data, _Conn):
                        self._close(key.data)
            now = time.monotonic()
            if self._accept_paused_until is not None and now >= self._accept_paused_until:
                self._accept_paused_until = None
                with contextlib.suppress(OSError, ValueError, KeyError):
                    self._sel.register(self._listen, selectors.EVENT_READ, "listen")
            self._expire(now)
        self._take_returns()

    def _accept(self) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                sock, addr = self._listen.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    self._report("http_overload", "http.overload", "out of file descriptors", "",
                                 error=exc.strerror or str(exc))
                    self._pause_accept()
                return  # ECONNABORTED and the like: that client is gone
            peer = str(addr[0]) if isinstance(addr, tuple) else str(addr)
            if sock.fileno() >= self._fd_ceiling:
                # Descriptors are running low: the loop's probes come first.
                self._reject(sock, peer, "file descriptor reserve reached")
                self._pause_accept()
                return
            if len(self._conns) >= self.max_connections and not self._evict():
                self._reject(sock, peer, "too many connections")
                continue
            sock.setblocking(False)
            conn = _Conn(sock, peer, time.monotonic() + self._timeout)
            self._conns[conn] = None
            self._sel.register(sock, selectors.EVENT_READ, conn)

    def _pause_accept(self) -> None:
        if self._accept_paused_until is None:
            with contextlib.suppress(KeyError, ValueError):
                self._sel.unregister(self._listen)
        self._accept_paused_until = time.monotonic() + ACCEPT_PAUSE_S

    def _evict(self) -> bool:
        """Make room for a newcomer: close the oldest idle connection or else the oldest
        request still incomplete after SLOW_S (a legitimate client sends its request at once).
        Half-open and trickling connections thus cannot lock everyone else out."""
        victim = next((c for c in self._conns if c.idle), None)
        if victim is None:
            started_before = time.monotonic() + self._timeout - SLOW_S  # deadline = start + timeout
            victim = next((c for c in self._conns if not c.busy and c.deadline <= started_before), None)
        if victim is None:
            return False
        if not victim.closing:
            reason = "idle connection closed for a new one" if victim.idle else "slow request closed for a new one"
            self._report("http_overload", "http.overload", reason, victim.peer)
        self._close(victim)
        return True

    def _reject(self, sock: socket.socket, peer: str, reason: str) -> None:
        self._report("http_overload", "http.overload", reason, peer)
        with contextlib.suppress(OSError):
            sock.setblocking(False)
            with contextlib.suppress(OSError):
                sock.recv(65536)  # what already came, so that close sends FIN, not RST
            sock.send(encode(_error(HTTPStatus.SERVICE_UNAVAILABLE, reason), close=True))
        with contextlib.suppress(OSError):
            sock.close()

    def _read(self, conn: _Conn) -> None:
        try:
            data = conn.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            if not conn.closing and (conn.buf or conn.head is not None):
                self._report("http_client", "http.client_error", "connection closed mid-request", conn.peer)
            self._close(conn)
            return
        if conn.closing:
            return  # dropped: the answer is already sent
        conn.buf += data
        self._advance(conn)

    def _advance(self, conn: _Conn) -> None:
        """Frame what is buffered: refuse it, wait for more, or hand a whole request to a worker."""
        if conn.head is None:
            end = conn.buf.find(b"\r\n\r\n")
            if end < 0 or end + 4 > MAX_HEAD_BYTES:
                if len(conn.buf) > MAX_HEAD_BYTES:
                    self._refuse(conn, HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE,
                                 f"request head larger than {MAX_HEAD_BYTES} bytes")
                return
            try:
                head = parse_head(bytes(conn.buf[:end + 4]))
            except HeadError as exc:
                self._refuse(conn, exc.status, str(exc))
                return
            problem = refusal(head, self._hosts)
            if problem is not None:
                self._refuse(conn, *problem, head=head)
                return
            conn.head = head
            conn.need = end + 4 + max(0, head.length)
            if head.expect_continue and len(conn.buf) < conn.need:
                with contextlib.suppress(OSError):
                    conn.sock.send(b"HTTP/1.1 100 Continue\r\n\r\n")
        if len(conn.buf) < conn.need:
            return
        head = conn.head
        body = bytes(conn.buf[conn.need - max(0, head.length):conn.need])
        del conn.buf[:conn.need]
        conn.head, conn.need = None, 0
        if head.method == "POST":
            foreign = self._foreign_writer(conn)
            if foreign:
                self._refuse(conn, HTTPStatus.FORBIDDEN, foreign, head=head)
                return
        conn.busy = True
        self._sel.unregister(conn.sock)
        self._work.put((conn, Request(head.method, head.target, head.headers, body, conn.peer), head))

    def _foreign_writer(self, conn: _Conn) -> str:
        """Why a POST on this connection is refused for who sent it; "" when it is not.

        Events can open turns, so on a loopback listener only otelwatch's own user, root
        and the `recovery.users` may add them: the kernel says which uid owns the client's
        end of the connection (as identd would). Remote listeners (`http.allow_remote`)
        cannot know a peer's uid; whoever opts in to one accepts that. Not found (the
        client is gone, or /proc hides it) fails closed."""
        if self._remote or self._writers is None:
            return ""
        try:
            uid = tcp_peer_uid(conn.sock.getpeername()[:2], conn.sock.getsockname()[:2])
        except OSError:
            uid = None
        if uid is None:
            return "cannot tell which user sent this request"
        if uid not in self._writers:
            return f"uid {uid} may not post events (allowed: otelwatch's user, root, recovery.users)"
        return ""

    def _refuse(self, conn: _Conn, status: int, reason: str, head: Head | None = None) -> None:
        """Answer an error from the front and close, after a short linger that reads (and
        drops) what the client still sends, so it reads our answer instead of a reset."""
        if status in (HTTPStatus.FORBIDDEN, HTTPStatus.MISDIRECTED_REQUEST, HTTPStatus.METHOD_NOT_ALLOWED,
                      HTTPStatus.UNSUPPORTED_MEDIA_TYPE):
            fields: dict[str, Any] = {"status": int(status)}
            if head is not None:
                fields.update(method=head.method, host=(head.headers.get("Host") or "")[:100],
                              origin=(head.headers.get("Origin") or "")[:100])
            self._report("http_refused", "http.refused", reason, conn.peer, **fields)
        else:
            self._report("http_client", "http.client_error", reason, conn.peer, status=int(status))
        with contextlib.suppress(OSError):
            conn.sock.send(encode(_error(status, reason), head_only=head is not None and head.method == "HEAD",
                                  close=True))
            conn.sock.shutdown(socket.SHUT_WR)
        conn.closing = True
        conn.buf.clear()
        conn.head = None
        conn.deadline = min(conn.deadline, time.monotonic() + LINGER_S)

    def _expire(self, now: float) -> None:
        for conn in [c for c in self._conns if not c.busy and c.deadline <= now]:
            if conn.out is not None:
                self._report("http_client", "http.client_error", "answer not read in time", conn.peer)
            elif not conn.closing:
                if conn.buf or conn.head is not None:
                    self._refuse(conn, HTTPStatus.REQUEST_TIMEOUT,
                                 f"request not complete within {self._timeout:g} s")
                    conn.deadline = now  # no linger: it had its time
                elif conn.served == 0:
                    self._report("http_client", "http.client_error",
                                 f"connection sent nothing within {self._timeout:g} s", conn.peer)
                # else: an idle keep-alive connection; closing it is routine
            self._close(conn)

    def _close(self, conn: _Conn) -> None:
        self._conns.pop(conn, None)
        if not conn.busy:
            with contextlib.suppress(KeyError, ValueError, OSError):
                self._sel.unregister(conn.sock)
        with contextlib.suppress(OSError):
            conn.sock.close()

    def _take_returns(self) -> None:
        with contextlib.suppress(OSError):
            while self._wake_r.recv(4096):
                pass
        while True:
            try:
                conn, keep, data = self._returns.get_nowait()
            except queue.Empty:
                return
            conn.busy = False
            if self._stopping or conn not in self._conns:
                self._close(conn)
                continue
            conn.out, conn.keep = memoryview(data), keep
            conn.deadline = time.monotonic() + self._timeout  # to read the answer
            self._flush(conn)

    def _flush(self, conn: _Conn) -> None:
        """Write what is left of the answer; then read the next request or close."""
        assert conn.out is not None
        try:
            sent = conn.sock.send(conn.out)
        except BlockingIOError:
            sent = 0
        except OSError:
            self._report("http_client", "http.client_error", "connection reset", conn.peer)
            self._close(conn)
            return
        conn.out = conn.out[sent:] if sent < len(conn.out) else None
        if conn.out is not None:
            self._watch(conn, selectors.EVENT_WRITE)
            return
        if not conn.keep:
            self._close(conn)
            return
        conn.served += 1
        conn.deadline = time.monotonic() + self._timeout
        del self._conns[conn]
        self._conns[conn] = None  # the youngest again
        self._watch(conn, selectors.EVENT_READ)
        if conn.buf and conn in self._conns:  # a pipelined request already in
            self._advance(conn)

    def _watch(self, conn: _Conn, events: int) -> None:
        try:
            try:
                self._sel.modify(conn.sock, events, conn)
            except KeyError:
                self._sel.register(conn.sock, events, conn)
        except (OSError, ValueError):
            self._close(conn)

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")

    # ------------------------------------------------------------------ workers

    def _work_loop(self) -> None:
        while True:
            item = self._work.get()
            if item is None:
                return
            conn, request, head = item
            keep = head.keep_alive and not self._stopping
            try:
                data = encode(self._app.handle(request), head_only=head.method == "HEAD", close=not keep)
            except Exception as exc:  # _App.handle does not raise; encode might, on a bug
                keep = False
                self._report("http_internal", "http.error", "worker failed", conn.peer, error=repr(exc)[:300])
                data = encode(_error(HTTPStatus.INTERNAL_SERVER_ERROR, "internal error"), close=True)
            self._returns.put((conn, keep, data))
            self._wake()

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
