"""`otelwatch hook claude` and `otelwatch event SESSION TYPE`: record one event, fast.

Agents run these on every tool call, so they must never slow or break the
agent: they offer the event to a running daemon's hook socket
(`sources.hook_socket`, at most a second; there the daemon checks, on the
kernel's word, that the hook runs inside the session's process tree, which
makes the event the session's own), append one record to the session's spool
file (see `sources.spool`; when no daemon took the event, the record carries
it as an observed event), and exit 0 whatever happens, printing nothing on
stdout (Claude Code reads hook stdout) and at most one line on stderr. They
work when the daemon is not running. `otelwatch event --pid` names a PID and
so is observed whatever runs it: it only spools. Everything they run is in
`otelwatch.sources.hookpath` (standard library only): no model, config, psutil,
OpenTelemetry or logging, so the command costs little more than the
interpreter's own start (bench/bench_hook.py measures it).

Reading stdin is bounded by time (`STDIN_TIMEOUT_S` for the whole read) and by
memory (the first `MAX_PAYLOAD_BYTES` and the last 64 KiB are kept; the rest is
read and dropped, so the agent's write completes instead of failing with EPIPE).
A payload that is complete JSON ends the read even if the writer never closes
the pipe.

The payload rules (`hookpath.payload_fields`) are shared with the daemon's
`POST /api/events` (`sources.payloads.payload_to_event`, re-exported here lazily).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Mapping

from otelwatch.sources import hookpath
from otelwatch.sources.hookpath import SHELLS, TYPE_CHECKING, agent_pid

if TYPE_CHECKING:  # as in hookpath: no typing import at run time
    from typing import Any, BinaryIO

    from otelwatch.sources.payloads import payload_to_event

__all__ = ["MAX_PAYLOAD_BYTES", "SHELLS", "STDIN_TIMEOUT_S", "agent_pid", "event_main", "hook_main",
           "payload_to_event"]

MAX_PAYLOAD_BYTES = 4 << 20  # a PostToolUse payload carries the tool's output; we need the head
STDIN_TIMEOUT_S = 2.0  # the whole stdin read: a writer that never closes must not hold the agent
_CHUNK_BYTES = 1 << 20
_TAIL_BYTES = 64 << 10  # of a truncated payload, the head and this much of the end are searched


def __getattr__(name: str) -> Any:
    if name == "payload_to_event":  # the daemon's parser: imports the model, so only on demand
        from otelwatch.sources.payloads import payload_to_event

        return payload_to_event
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def hook_main(agent: str, stdin: BinaryIO) -> int:
    """`otelwatch hook AGENT`: record the hook payload on stdin. Always returns 0."""
    try:
        data, tail, truncated = read_stdin(stdin, time.monotonic() + STDIN_TIMEOUT_S)
        payload = _decode_payload(data, tail, truncated)
        sid = payload.get("session_id")
        if not isinstance(sid, str) or not sid:
            _warn("hook payload has no session_id; nothing recorded")
            return 0
        t, fields = hookpath.payload_fields(payload, time.time())
        _record(sid, hookpath.event_json(t, fields, "hook"), agent, None, payload)
    except Exception as exc:  # a hook must never fail the agent
        _warn(f"hook not recorded: {exc}")
    return 0


def event_main(session_id: str, type: str, *, tool: str | None = None, agent: str | None = None,
               pid: int | None = None) -> int:
    """`otelwatch event SESSION TYPE`: record one event. Always returns 0."""
    try:
        if not session_id:
            _warn("empty session id; nothing recorded")
            return 0
        simple = {"session_id": session_id, "type": type, "tool": tool}
        t, fields = hookpath.payload_fields(simple, time.time())
        # An event naming a PID is observed whatever runs it (DESIGN "Trust boundaries"):
        # only without --pid is it offered to the daemon's hook socket.
        _record(session_id, hookpath.event_json(t, fields, "event"), agent, pid, simple if pid is None else None)
    except Exception as exc:
        _warn(f"event not recorded: {exc}")
    return 0


# --------------------------------------------------------------------------- internals


def _record(session_id: str, event: Mapping[str, Any], agent: str | None, pid: int | None,
            payload: Mapping[str, Any] | None = None) -> None:
    """Deliver the event: over the daemon's hook socket when `payload` is given and a
    daemon answers (own when the daemon finds us inside the session's process tree,
    sources/hook_socket.py), and to the spool in every case: there the record carries
    the session's PID (and, when the socket took the event, `delivered`, so that it is
    not counted twice); alone it is an observed event."""
    delivered = False
    if payload is not None:
        sockets = hookpath.socket_paths(hookpath.state_dir(os.environ), os.environ)
        delivered = hookpath.send(sockets, hookpath.socket_message(session_id, payload))
    create_time = ticks = None
    if pid is None:
        pid, create_time = agent_pid()
    if pid is not None:
        # Bind the pid to the process holding it now, so that the record can never be
        # taken for a later process that reuses the PID.
        ident = hookpath.pid_identity(pid)
        if ident is not None and (create_time is None or abs(ident[0] - create_time) < 1.5):
            create_time, ticks = ident
    agent = hookpath.AGENT_NAMES.get(agent, agent) if agent else None
    record = hookpath.make_record(event, session_id, pid=pid, agent=agent, create_time=create_time,
                                  start_ticks=ticks)
    if delivered:
        record["delivered"] = True
    hookpath.append_records(hookpath.spool_dir(os.environ), session_id, [record])


def _decode_payload(data: bytes, tail: bytes, truncated: bool) -> Mapping[str, Any]:
    if not truncated:
        try:
            obj = json.loads(data)
        except ValueError:
            raise ValueError("stdin is not a JSON object") from None
        if not isinstance(obj, dict):
            raise ValueError("stdin is not a JSON object")
        return obj
    # Too big to parse whole (a huge tool output): the identifying top-level fields come
    # before it (session_id, hook_event_name, tool_name) or after it (tool_use_id).
    import re

    head = data[:_TAIL_BYTES].decode("utf-8", "replace")
    end = tail.decode("utf-8", "replace")
    out: dict[str, Any] = {}
    for key in ("session_id", "hook_event_name", "tool_name", "tool_use_id", "notification_type"):
        rx = re.compile(rf'"{key}"\s*:\s*"((?:[^"\\]|\\.){{0,256}})"')
        m = rx.search(head)
        if m is None:
            found = rx.findall(end)
            value = found[-1] if found else None
        else:
            value = m.group(1)
        if value is not None:
            out[key] = json.loads(f'"{value}"')
    return out


def read_stdin(stdin: BinaryIO, deadline: float) -> tuple[bytes, bytes, bool]:
    """(head, tail, truncated) of the payload on stdin, read until EOF, a complete JSON
    object, or `deadline` (time.monotonic()), whichever comes first.

    head is at most MAX_PAYLOAD_BYTES; past that, the rest is read and dropped
    (keeping its last _TAIL_BYTES as tail) so that the writer never sees EPIPE
    while we are within the deadline. Raises OSError only if stdin is unusable.
    """
    try:
        fd = stdin.fileno()
    except (AttributeError, OSError, ValueError):  # an in-memory stream (the Python API, tests)
        fd = -1
    head = bytearray()
    tail = b""
    truncated = False
    poller = None
    if fd >= 0:
        import select

        poller = select.poll()
        poller.register(fd, select.POLLIN)
    while True:
        if poller is not None:
            left = deadline - time.monotonic()
            if left <= 0 or not poller.poll(left * 1000):
                break  # the writer holds the pipe open: keep what came
            chunk = os.read(fd, _CHUNK_BYTES)
        else:
            if time.monotonic() > deadline:
                break
            chunk = stdin.read(_CHUNK_BYTES)
        if not chunk:
            break
        if truncated:
            tail = chunk[-_TAIL_BYTES:] if len(chunk) >= _TAIL_BYTES else (tail + chunk)[-_TAIL_BYTES:]
            continue
        room = MAX_PAYLOAD_BYTES - len(head)
        head += chunk[:room]
        if len(chunk) > room:
            truncated = True
            tail = (bytes(head[-_TAIL_BYTES:]) + chunk[room:])[-_TAIL_BYTES:]
        elif poller is not None and not poller.poll(0) and _complete_json(head):
            break  # a whole object and nothing more waiting: do not wait for EOF
    return bytes(head), tail, truncated


def _complete_json(data: bytearray) -> bool:
    """Cheap test first (an object ends with '}'), then a parse; asked only when the writer pauses."""
    if not data.rstrip().endswith(b"}"):
        return False
    try:
        json.loads(data)
    except (ValueError, RecursionError):
        return False
    return True


def _warn(message: str) -> None:
    try:
        sys.stderr.write(f"otelwatch: {message}\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass
