"""Which requests the daemon's HTTP listener serves: head parsing and the checks against misuse.

Owns reading a request head (`parse_head`) and the refusals decided on it
before any body is read (`refusal`): a `Host` that does not name this listener
(DNS rebinding), a method other than GET/HEAD/POST (CORS preflights included),
a cross-origin `Origin`, a POST without `Content-Type: application/json` or a
`Content-Length`, a body over MAX_BODY_BYTES; and `foreign_writer`, the check
of which local user sent a POST (the kernel's word, not the client's).

Pure but for `foreign_writer`'s read of /proc/net/tcp{,6}. Must never read a
socket, answer a client or log: the listener (`server.py`) does that.
"""

from __future__ import annotations

import http.client
import io
import ipaddress
import socket
from collections.abc import Collection
from dataclasses import dataclass
from email.message import Message
from http import HTTPStatus
from typing import NamedTuple
from urllib.parse import urlsplit

from otelwatch.probe.procfs import tcp_peer_socket

__all__ = ["CHUNKED", "MAX_BODY_BYTES", "MAX_HEAD_BYTES", "OTLP_PATHS", "Head", "HeadError", "HostPolicy",
           "Writer", "foreign_writer", "is_loopback_name", "parse_head", "refusal", "writer_of"]

MAX_BODY_BYTES = 1 << 20
CHUNKED = -2  # Head.length of a `Transfer-Encoding: chunked` body (only on OTLP paths)
# The agents' own OpenTelemetry (sources/otlp.py): the only paths that take protobuf or
# chunked bodies, and only when [sources.otlp] is on.
OTLP_PATHS = frozenset({"/v1/logs", "/v1/metrics", "/v1/traces"})
_OTLP_MEDIA = frozenset({"application/json", "application/x-protobuf", "application/protobuf"})
MAX_HEAD_BYTES = 16 << 10  # request line and headers
_WILDCARDS = frozenset({"", "0.0.0.0", "::"})


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
    length: int  # of the body; CHUNKED for a chunked body
    keep_alive: bool
    expect_continue: bool

    @property
    def chunked(self) -> bool:
        return self.length == CHUNKED


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
    lengths = {v.strip() for v in headers.get_all("Content-Length") or ()}
    if len(lengths) > 1 or not all(v.isdigit() for v in lengths):
        raise HeadError(HTTPStatus.BAD_REQUEST, "malformed Content-Length")
    length = int(lengths.pop()) if lengths else -1
    if headers.get("Transfer-Encoding") is not None:
        codings = [c.strip().lower() for c in ",".join(headers.get_all("Transfer-Encoding") or ()).split(",")]
        if codings != ["chunked"] or length >= 0 or urlsplit(target).path.rstrip("/") not in OTLP_PATHS:
            raise HeadError(HTTPStatus.LENGTH_REQUIRED, "chunked bodies are not accepted; send a Content-Length")
        length = CHUNKED
    tokens = {t.strip().lower() for t in (headers.get("Connection") or "").split(",")}
    return Head(method=method, target=target, version=version, headers=headers, length=length,
                keep_alive=version == "HTTP/1.1" and "close" not in tokens,
                expect_continue=(headers.get("Expect") or "").strip().lower() == "100-continue")


def refusal(head: Head, hosts: HostPolicy, otlp: bool = False) -> tuple[int, str] | None:
    """(status, why) when the request must not be served; None when it may.

    Decided on the head alone, before any body is read. With `otlp` ([sources.otlp]
    on), POSTs to OTLP_PATHS may also be protobuf and chunked."""
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
        if otlp and urlsplit(head.target).path.rstrip("/") in OTLP_PATHS:
            if media not in _OTLP_MEDIA:
                return (HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
                        "OTLP needs Content-Type: application/x-protobuf or application/json")
        elif media != "application/json":
            return HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "POST needs Content-Type: application/json"
        elif head.chunked:
            return HTTPStatus.LENGTH_REQUIRED, "chunked bodies are not accepted; send a Content-Length"
        if head.length < 0 and not head.chunked:
            return HTTPStatus.LENGTH_REQUIRED, "POST needs a Content-Length"
    if head.length > MAX_BODY_BYTES:
        return HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"body larger than {MAX_BODY_BYTES} bytes"
    return None


def foreign_writer(sock: socket.socket, writers: Collection[int]) -> str:
    """Why a POST on this loopback connection is refused for who sent it; "" when it is not."""
    return writer_of(sock, writers).why


class Writer(NamedTuple):
    why: str  # why a POST is refused for who sent it; "" when it is not
    uid: int  # the sending user; -1: nobody can tell
    peer_socket: tuple[int, int] | None  # (uid, socket inode) of the client's end; None: not found


def writer_of(sock: socket.socket, writers: Collection[int]) -> Writer:
    """Why a POST on this loopback connection is refused for who sent it; "" when it is not.

    Events can open turns, so only otelwatch's own user, root and the
    `recovery.users` (`writers`) may add them: the kernel says which uid owns the
    client's end of the connection (as identd would). Not found (the client is
    gone, or /proc hides it) fails closed. Returns the reason (or ""), the uid and the client socket (`Writer`)."""
    try:
        entry = tcp_peer_socket(sock.getpeername()[:2], sock.getsockname()[:2])
    except OSError:
        entry = None
    uid = None if entry is None else entry[0]
    if uid is None:
        return Writer("cannot tell which user sent this request", -1, None)
    if uid not in writers:
        return Writer(f"uid {uid} may not post events (allowed: otelwatch's user, root, recovery.users)", uid, entry)
    return Writer("", uid, entry)
