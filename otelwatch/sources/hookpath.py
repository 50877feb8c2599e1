"""The hook path: everything `otelwatch hook` and `otelwatch event` need, on the standard library alone.

Agents run a hook on every prompt and tool call, so its cost is paid thousands of
times a day. This module turns a hook payload into the spool record the daemon
reads (`sources.spool`), finds the agent's PID and appends the record, importing
nothing from the rest of the package: no dataclasses, enums, config parsing,
psutil or OpenTelemetry (`python -X importtime -m otelwatch hook claude` shows
only `json`, `select` and this module). It is the one implementation of:

- `hook_fields` and `payload_fields`: the event a payload stands for, as the
  keyword arguments of `model.Event` (kind as its string value); `events.hook_event`
  and `sources.payloads.payload_to_event` build their Events from these;
- `event_json`: the JSON form of that event, equal to `Event.to_json()`;
- `safe_name` and `append_records`: spool file names and the single O_APPEND write
  (re-exported by `sources.spool`).

`spool_dir` and `read_stat` repeat, for the no-config case only, what
`config.default_paths` and `proctable.read_proc` compute; tests/test_hook_fast.py
holds them equal.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping

TYPE_CHECKING = False  # typing costs milliseconds to import; the checkers read this as true
if TYPE_CHECKING:
    from typing import Any

__all__ = [
    "AGENT_NAMES",
    "MAX_RECORD_BYTES",
    "SHELLS",
    "agent_pid",
    "append_records",
    "event_json",
    "hook_fields",
    "make_record",
    "opt_str",
    "payload_fields",
    "pid_identity",
    "read_stat",
    "safe_name",
    "send",
    "short",
    "socket_message",
    "socket_paths",
    "spool_dir",
    "state_dir",
    "str_or_empty",
]

PROGRESS = "progress"  # model.EventKind values
HEARTBEAT = "heartbeat"
DETAIL_CHARS = 120  # diagnostics keep a short excerpt, not the agent's output (events/lines.py too)
MAX_RECORD_BYTES = 4096  # one record; longer details are cut so the append stays one small write
AGENT_NAMES = {"claude": "claude-code"}  # the hook's argument -> the agent label sessions get
SHELLS = frozenset({"sh", "bash", "dash", "zsh", "fish", "ksh", "mksh", "busybox"})
WAITING_NOTIFICATIONS = frozenset({"permission_prompt", "idle_prompt", "elicitation_dialog"})
WAITING_PHRASES = ("needs your permission", "waiting for your input", "needs your approval")
_SAFE = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")
# `otelwatch event SESSION TYPE` types beyond the hook event names.
SIMPLE_TYPES: Mapping[str, dict[str, Any]] = {
    "progress": {},
    "heartbeat": {"kind": HEARTBEAT},
    "retry": {"kind": HEARTBEAT, "retry": True},
    "api_retry": {"kind": HEARTBEAT, "retry": True},
    "waiting": {"kind": HEARTBEAT, "awaiting_input": True},
    "awaiting_input": {"kind": HEARTBEAT, "awaiting_input": True},
    "turn_start": {"turn": "open", "awaiting_input": False},
    "turn_end": {"turn": "close"},
    "tool_start": {"tool_call": "open"},
    "tool_end": {"tool_call": "close"},
}
HOOK_NAMES = frozenset({
    "UserPromptSubmit", "PreToolUse", "PostToolUse", "PostToolUseFailure", "PermissionRequest",
    "Notification", "Stop", "SubagentStop", "SessionStart", "SessionEnd", "PreCompact", "PostCompact",
})


# --------------------------------------------------------------------------- payload -> event


def str_or_empty(value: object) -> str:
    return value if isinstance(value, str) else ""


def opt_str(value: object) -> str | None:
    return value[:200] if isinstance(value, str) and value else None


def short(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= DETAIL_CHARS else text[: DETAIL_CHARS - 1] + "…"


def hook_fields(payload: Mapping[str, Any]) -> dict[str, Any]:
    """The event of a Claude Code hook payload (`hook_event_name` plus its fields), as
    `Event` keyword arguments without time and source; `kind` is "progress" or "heartbeat".

    UserPromptSubmit opens a turn, Stop closes it; PreToolUse opens a tool call
    that PostToolUse / PostToolUseFailure close (by tool_use_id when given).
    SubagentStop ends a subagent, not the main turn. Notification and
    PermissionRequest are heartbeats; when they mean a person is asked
    something they set awaiting_input.
    """
    name = str(payload.get("hook_event_name"))[:64]
    tool = opt_str(payload.get("tool_name"))
    tool_id = opt_str(payload.get("tool_use_id"))
    if name == "UserPromptSubmit":
        return {"type": name, "turn": "open", "awaiting_input": False}
    if name == "PreToolUse":
        return {"type": name, "tool": tool, "tool_id": tool_id, "tool_call": "open"}
    if name in ("PostToolUse", "PostToolUseFailure"):
        return {"type": name, "tool": tool, "tool_id": tool_id, "tool_call": "close"}
    if name in ("Stop", "SessionEnd"):
        return {"type": name, "turn": "close", "detail": str_or_empty(payload.get("reason"))}
    if name == "PermissionRequest":
        return {"type": name, "kind": HEARTBEAT, "tool": tool, "awaiting_input": True}
    if name == "Notification":
        ntype = str_or_empty(payload.get("notification_type"))
        message = str_or_empty(payload.get("message"))
        waiting = ntype in WAITING_NOTIFICATIONS or (
            not ntype and any(p in message.lower() for p in WAITING_PHRASES)
        )
        return {"type": name, "kind": HEARTBEAT, "awaiting_input": True if waiting else None,
                "detail": ntype or short(message)}
    # SessionStart, SubagentStop, PreCompact, PostCompact and future hooks: work moved.
    return {"type": name, "tool": tool, "tool_id": tool_id}


def payload_fields(payload: Mapping[str, Any], now: float) -> tuple[float, dict[str, Any]]:
    """(time, Event keyword arguments) of a hook payload or an `{"type": ..., "tool": ...}` object.

    Accepts Claude Code hook payloads (`hook_event_name`) and simple events
    (`type`: progress, heartbeat, retry, waiting, turn_start, turn_end,
    tool_start, tool_end, a hook event name, or any other name: progress).
    A payload's own `time` is used when it is not in the future. Raises
    ValueError saying what is wrong when neither field is usable.
    """
    if not isinstance(payload, Mapping):
        raise ValueError("event payload must be a JSON object")
    t = now
    ptime = payload.get("time")
    if isinstance(ptime, (int, float)) and not isinstance(ptime, bool) and ptime == ptime:
        t = min(float(ptime), now)
    if isinstance(payload.get("hook_event_name"), str) and payload["hook_event_name"]:
        return t, hook_fields(payload)
    typ = payload.get("type")
    if not isinstance(typ, str) or not typ.strip():
        raise ValueError("event payload needs a non-empty string 'hook_event_name' or 'type'")
    typ = typ.strip()[:64]
    tool = payload.get("tool") if isinstance(payload.get("tool"), str) else None
    tool_id = payload.get("tool_id") if isinstance(payload.get("tool_id"), str) else None
    if typ in HOOK_NAMES:
        fields = {"hook_event_name": typ, "tool_name": tool, "tool_use_id": tool_id}
        for key in ("notification_type", "message"):
            if isinstance(payload.get(key), str):
                fields[key] = payload[key]
        return t, hook_fields(fields)
    detail = payload["detail"] if isinstance(payload.get("detail"), str) else ""
    return t, {"type": typ, "tool": tool, "tool_id": tool_id, "detail": detail[:120], **SIMPLE_TYPES.get(typ, {})}


def event_json(t: float, fields: Mapping[str, Any], source: str) -> dict[str, Any]:
    """What `Event(time=t, source=source, **fields).to_json()` gives, without building the Event."""
    out: dict[str, Any] = {"time": t, "type": fields["type"], "kind": fields.get("kind", PROGRESS)}
    for key in ("tool", "tool_id", "turn", "tool_call", "awaiting_input", "retry_attempt", "retry_max",
                "retry_delay_s", "detail"):
        value = fields.get(key)
        if value not in (None, ""):
            out[key] = value
    if fields.get("retry"):
        out["retry"] = True
    if fields.get("background") is not None:
        out["background"] = list(fields["background"])
    if source:
        out["source"] = source
    return out


# --------------------------------------------------------------------------- where, and who


def state_dir(environ: Mapping[str, str]) -> str:
    """`config.default_paths(Config(), environ).state_dir`: hooks read no config file."""
    if environ.get("OTELWATCH_STATE_DIR"):
        return environ["OTELWATCH_STATE_DIR"]
    if environ.get("XDG_STATE_HOME"):
        return os.path.join(environ["XDG_STATE_HOME"], "otelwatch")
    return os.path.join(environ.get("HOME") or os.path.expanduser("~"), ".local", "state", "otelwatch")


def spool_dir(environ: Mapping[str, str]) -> str:
    """`config.default_paths(Config(), environ).spool_dir`."""
    return os.path.join(state_dir(environ), "events")


def _boot_time() -> float:
    with open("/proc/stat", "rb") as fh:
        for line in fh:
            if line.startswith(b"btime "):
                return float(line.split()[1])
    raise OSError("no btime in /proc/stat")


def read_stat(pid: int, boot_time: float) -> tuple[str, int, float, int] | None:
    """(comm, ppid, create_time, start ticks since boot) of a process from /proc/PID/stat,
    as `proctable.read_proc` computes them; None when it does not exist."""
    try:
        fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY | os.O_CLOEXEC)
    except (FileNotFoundError, ProcessLookupError):
        return None
    try:
        data = os.read(fd, 4096)
    finally:
        os.close(fd)
    head, _, rest = data.rpartition(b")")
    f = rest.split()
    try:
        ticks = int(f[19])
        return (head.partition(b"(")[2].decode("utf-8", "replace"), int(f[1]),
                boot_time + ticks / os.sysconf("SC_CLK_TCK"), ticks)
    except (IndexError, ValueError):
        return None


def agent_pid(start: int | None = None) -> tuple[int | None, float | None]:
    """(pid, create_time) of the first non-shell ancestor, starting at our parent.

    One /proc/PID/stat read per step: psutil would cost more to import than the
    whole hook may take.
    """
    pid = os.getppid() if start is None else start
    try:
        boot = _boot_time()
        for _ in range(16):
            info = read_stat(pid, boot)
            if info is None:
                break
            comm, ppid, create_time, _ticks = info
            if comm not in SHELLS or ppid <= 1:
                return pid, round(create_time, 2)
            pid = ppid
        else:
            return None, None
    except OSError:
        pass
    return (pid if pid > 1 else None), None


def pid_identity(pid: int) -> tuple[float, int] | None:
    """(create_time rounded as spool records keep it, start ticks since boot) of the
    process holding `pid` now. The ticks are what the daemon compares: unlike
    create_time (computed with this moment's btime) they do not move when the wall
    clock steps."""
    try:
        info = read_stat(pid, _boot_time())
    except OSError:
        return None
    return (round(info[2], 2), info[3]) if info is not None else None


# --------------------------------------------------------------------------- the hook socket
# The client side of sources/hook_socket.py (which says why a socket): a daemon that
# finds the hook inside the session's process tree takes its events as the session's own.

SOCKET_NAME = "hook.sock"
MAX_MESSAGE = 64 << 10
# What of a payload the socket carries (the daemon parses it as POST does); a tool's
# output is left out, so that every message stays small.
SOCKET_KEYS = ("session_id", "hook_event_name", "tool_name", "tool_use_id", "notification_type", "message",
               "reason", "type", "tool", "tool_id")


def socket_paths(state: str | os.PathLike[str], environ: Mapping[str, str]) -> list[str]:
    """Where a hook looks for the daemon: OTELWATCH_HOOK_SOCKET, its user's state
    directory, then the system daemon's (/run/otelwatch)."""
    out = [environ["OTELWATCH_HOOK_SOCKET"]] if environ.get("OTELWATCH_HOOK_SOCKET") else []
    return [*out, os.path.join(state, SOCKET_NAME), os.path.join("/run/otelwatch", SOCKET_NAME)]


def send(paths: Iterable[str | os.PathLike[str]], message: Mapping[str, Any], timeout: float = 1.0) -> bool:
    """Deliver one message to the first daemon socket that answers `ok`; False when none did."""
    import stat

    data = json.dumps(message, separators=(",", ":")).encode("utf-8", "replace")
    if len(data) > MAX_MESSAGE:
        return False
    me = os.geteuid()
    for path in paths:
        try:
            st = os.lstat(path)
        except OSError:
            continue
        if not stat.S_ISSOCK(st.st_mode) or st.st_uid not in (me, 0):
            continue  # only a daemon of our own user or root hears our events
        import socket  # only once a daemon's socket is there: no daemon, no cost

        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(timeout)
                sock.connect(os.fspath(path))
                sock.sendall(data)
                sock.shutdown(socket.SHUT_WR)
                if sock.recv(16).startswith(b"ok"):
                    return True
        except OSError:
            continue
    return False


def socket_message(session_id: str, payload: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a payload the socket carries: scalars of SOCKET_KEYS, strings cut at 500."""
    message = {k: (v[:500] if isinstance(v, str) else v) for k in SOCKET_KEYS
               if isinstance(v := payload.get(k), (str, int, float)) and not isinstance(v, bool)}
    message["session_id"] = session_id
    return message


# --------------------------------------------------------------------------- the spool


def safe_name(session_id: str) -> str:
    """A file-name stem for a session id: no separators, no leading dot, bounded length.

    Ids that needed changing get a hash suffix so two ids cannot share a file.
    """
    clean = "".join(c if c in _SAFE else "_" for c in session_id[:120]).replace("..", "_").lstrip(".")
    if clean == session_id and clean:
        return clean
    import zlib  # only for ids that need it

    digest = f"{zlib.crc32(session_id.encode('utf-8', 'surrogatepass')):08x}"
    return f"{clean or 'session'}-{digest}"


def make_record(event: Mapping[str, Any], session_id: str, *, pid: int | None = None, agent: str | None = None,
                create_time: float | None = None, start_ticks: int | None = None) -> dict[str, Any]:
    """A spool record: `{"otelwatch": 1, "session_id", [pid, create_time, start_ticks, agent]}`
    plus the event's JSON."""
    record: dict[str, Any] = {"otelwatch": 1, "session_id": session_id}
    if pid is not None:
        record["pid"] = pid
    if create_time is not None:
        record["create_time"] = create_time
    if start_ticks is not None:
        record["start_ticks"] = start_ticks  # what the daemon compares (create_time: older readers)
    if agent:
        record["agent"] = agent
    record.update(event)
    return record


def append_records(directory: str | os.PathLike[str], session_id: str, records: Iterable[Mapping[str, Any]]) -> str:
    """Append records to the session's spool file in one write; returns its path. Raises OSError."""
    lines = [_encode(rec) for rec in records]
    path = os.path.join(directory, f"{safe_name(session_id)}.jsonl")
    if not lines:
        return path
    data = memoryview(b"".join(lines))
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except FileNotFoundError:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        while data:  # short only on a full disk: finish the line rather than leave half
            data = data[os.write(fd, data):]
    finally:
        os.close(fd)
    return path


def _encode(rec: Mapping[str, Any]) -> bytes:
    # "replace": a payload's JSON may hold lone surrogates ("\ud800"), which UTF-8 cannot carry.
    line = json.dumps(rec, separators=(",", ":"), ensure_ascii=False).encode("utf-8", "replace")
    if len(line) > MAX_RECORD_BYTES:
        rec = {k: v for k, v in rec.items() if k != "detail"}
        line = json.dumps(rec, separators=(",", ":"), ensure_ascii=False).encode("utf-8", "replace")
    return line + b"\n"
