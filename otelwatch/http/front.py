"""The HTTP listener's front: one selector thread that owns every client socket.

Accepts (within the connection cap and the descriptor reserve, evicting the
oldest idle or slow connection for a newcomer), reads and frames HTTP/1.1
requests, refuses what `http_policy` refuses on the head alone, enforces each
request's deadline, hands complete requests to the workers (`submit`) and writes
their answers (`give_back`), so a client that does not read holds no worker.
`Response`/`encode` are the wire format both sides use.

Must never block on a client, run a handler, or hold a connection without a
deadline. Counting and logging go through the listener's `report`.
"""

from __future__ import annotations

import contextlib
import email.utils
import errno
import json
import queue
import selectors
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from email.message import Message
from http import HTTPStatus
from typing import Any

from otelwatch.http.policy import (
    MAX_BODY_BYTES,
    MAX_HEAD_BYTES,
    Head,
    HeadError,
    HostPolicy,
    parse_head,
    refusal,
    writer_of,
)

__all__ = ["Conn", "Front", "Reporter", "Request", "Response", "Work", "encode", "error_response", "json_response"]

ACCEPT_BATCH = 16  # accepts per wakeup, so reads of accepted connections are not starved
SLOW_S = 1.0  # at the cap, a request still incomplete after this may be closed for a newcomer
ACCEPT_PAUSE_S = 0.25  # after EMFILE or at the descriptor reserve: let the loop have them
LINGER_S = 1.0  # after an early error answer, read (and drop) what the client still sends
_ALLOWED = "GET, HEAD, POST"

# report(kind or None, event, reason, peer, **fields): counted and rate-limited logging.
Reporter = Callable[..., None]
Work = tuple["Conn", "Request", Head]


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


def error_response(status: int, message: str) -> Response:
    extra = (("Allow", _ALLOWED),) if status == HTTPStatus.METHOD_NOT_ALLOWED else ()
    return json_response(status, {"error": message}, extra)


@dataclass(frozen=True)
class Request:
    method: str
    target: str
    headers: Message
    body: bytes
    peer: str
    # The local user who sent it (the kernel's word on a loopback POST); None: not asked
    # (a GET); -1: nobody can tell (a remote listener). Events naming a PID are checked
    # against it (DESIGN "Users are walls").
    uid: int | None = None
    # (uid, socket inode) of the client's end of a loopback connection, for OTLP POSTs:
    # who sent them (sources/otlp.py); None when not looked up or not found.
    peer_socket: tuple[int, int] | None = None


class Conn:
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


class Front:
    """The selector thread's state: the listening socket, every connection, the answers
    coming back from the workers. All but `give_back`, `wake` and `stopping` belong
    to the thread running `serve`."""

    def __init__(self, listen: socket.socket, *, hosts: HostPolicy, timeout: float, max_connections: int,
                 fd_ceiling: int, writers: frozenset[int] | None, submit: Callable[[Work], None],
                 report: Reporter, otlp: bool = False) -> None:
        self._listen = listen
        self._hosts = hosts
        self._timeout = timeout
        self.max_connections = max_connections
        self._fd_ceiling = fd_ceiling
        # Who may POST events (None: no check: a remote listener, or a test double).
        self._writers = writers
        self._submit = submit
        self._report = report
        self._otlp = otlp  # [sources.otlp] on: protobuf and chunked POSTs on the OTLP paths
        self.stopping = False
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._sel = selectors.DefaultSelector()
        self._sel.register(self._listen, selectors.EVENT_READ, "listen")
        self._sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._accept_paused_until: float | None = None
        self._conns: dict[Conn, None] = {}  # insertion order = age order (oldest first)
        self._returns: queue.SimpleQueue[tuple[Conn, bool, bytes]] = queue.SimpleQueue()

    def give_back(self, conn: Conn, keep: bool, data: bytes) -> None:
        """A worker's answer for `conn` (thread-safe): written by the front thread."""
        self._returns.put((conn, keep, data))
        self.wake()

    def close(self) -> None:
        """Close every socket; after the thread running `serve` has stopped."""
        for conn in list(self._conns):
            with contextlib.suppress(OSError):
                conn.sock.close()
        self._conns.clear()
        for closable in (self._sel, self._listen, self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                closable.close()

    def serve(self) -> None:
        """The thread's body: runs until `stopping` is set and `wake()` called."""
        while not self.stopping:
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
                    if isinstance(key.data, Conn):
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
            conn = Conn(sock, peer, time.monotonic() + self._timeout)
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
            sock.send(encode(error_response(HTTPStatus.SERVICE_UNAVAILABLE, reason), close=True))
        with contextlib.suppress(OSError):
            sock.close()

    def _read(self, conn: Conn) -> None:
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

    def _advance(self, conn: Conn) -> None:
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
            problem = refusal(head, self._hosts, self._otlp)
            if problem is not None:
                self._refuse(conn, *problem, head=head)
                return
            conn.head = head
            conn.need = end + 4 + max(0, head.length)
            if head.expect_continue and (head.chunked or len(conn.buf) < conn.need):
                with contextlib.suppress(OSError):
                    conn.sock.send(b"HTTP/1.1 100 Continue\r\n\r\n")
        head = conn.head
        if head.chunked:
            try:
                framed = dechunk(conn.buf, conn.need)
            except HeadError as exc:
                self._refuse(conn, exc.status, str(exc), head=head)
                return
            if framed is None:
                return
            body, end = framed
            del conn.buf[:end]
        else:
            if len(conn.buf) < conn.need:
                return
            body = bytes(conn.buf[conn.need - max(0, head.length):conn.need])
            del conn.buf[:conn.need]
        conn.head, conn.need = None, 0
        uid: int | None = None
        peer_socket = None
        if head.method == "POST":
            uid = -1
            if self._writers is not None:
                writer = writer_of(conn.sock, self._writers)
                if writer.why:
                    self._refuse(conn, HTTPStatus.FORBIDDEN, writer.why, head=head)
                    return
                uid, peer_socket = writer.uid, writer.peer_socket
        conn.busy = True
        self._sel.unregister(conn.sock)
        self._submit((conn, Request(head.method, head.target, head.headers, body, conn.peer, uid, peer_socket), head))

    def _refuse(self, conn: Conn, status: int, reason: str, head: Head | None = None) -> None:
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
            conn.sock.send(encode(error_response(status, reason), head_only=head is not None and head.method == "HEAD",
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

    def _close(self, conn: Conn) -> None:
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
            if self.stopping or conn not in self._conns:
                self._close(conn)
                continue
            conn.out, conn.keep = memoryview(data), keep
            conn.deadline = time.monotonic() + self._timeout  # to read the answer
            self._flush(conn)

    def _flush(self, conn: Conn) -> None:
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

    def _watch(self, conn: Conn, events: int) -> None:
        try:
            try:
                self._sel.modify(conn.sock, events, conn)
            except KeyError:
                self._sel.register(conn.sock, events, conn)
        except (OSError, ValueError):
            self._close(conn)

    def wake(self) -> None:
        """Interrupt the selector's wait (thread-safe)."""
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")


def dechunk(buf: bytearray, start: int) -> tuple[bytes, int] | None:
    """A `Transfer-Encoding: chunked` body that begins at `buf[start]`: (body, the offset
    just past it, trailers included), or None while it is incomplete. Raises HeadError
    for a malformed one or one larger than MAX_BODY_BYTES (the buffer never holds more
    than that plus the chunks' framing)."""
    pos = start
    parts: list[bytes] = []
    size_total = 0
    while True:
        eol = buf.find(b"\r\n", pos, pos + 1024)
        if eol < 0:
            if len(buf) - pos > 1024:
                raise HeadError(HTTPStatus.BAD_REQUEST, "malformed chunk size line")
            return None
        size_text = bytes(buf[pos:eol]).split(b";", 1)[0].strip()
        try:
            size = int(size_text, 16)
        except ValueError:
            raise HeadError(HTTPStatus.BAD_REQUEST, "malformed chunk size") from None
        if size < 0 or size_total + size > MAX_BODY_BYTES:
            raise HeadError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"body larger than {MAX_BODY_BYTES} bytes")
        pos = eol + 2
        if size == 0:
            break
        if len(buf) < pos + size + 2:
            if len(buf) - start > MAX_BODY_BYTES + (64 << 10):
                raise HeadError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"body larger than {MAX_BODY_BYTES} bytes")
            return None
        if buf[pos + size:pos + size + 2] != b"\r\n":
            raise HeadError(HTTPStatus.BAD_REQUEST, "chunk not followed by CRLF")
        parts.append(bytes(buf[pos:pos + size]))
        size_total += size
        pos += size + 2
    while True:  # trailers, up to the blank line
        eol = buf.find(b"\r\n", pos, pos + 8192)
        if eol < 0:
            if len(buf) - pos > 8192:
                raise HeadError(HTTPStatus.BAD_REQUEST, "trailers too long")
            return None
        if eol == pos:
            return b"".join(parts), eol + 2
        pos = eol + 2
