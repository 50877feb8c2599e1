"""Turning one line of an agent's output into an `Event`: the event parser.

Owns the mapping from what agents write (Claude Code stream-json and
transcripts, Codex `exec --json` and rollout transcripts, Gemini CLI
`-o stream-json`, Claude Code hook
payloads, otelwatch's own spool records, plain text) to otelwatch's `Event`.
Pure: no I/O, no clock; the time a line was seen is passed in. It never
raises for bad input: a line it cannot use is `None` and the caller counts it
as malformed.

Shapes follow the agents' public documentation (Claude Code hooks reference
and Agent SDK message types, Codex `exec --json` events and rollout files) and
are matched leniently: an unknown `type` is still an event, because any line
proves the agent's loop is alive.

Times: a line that carries its own time (transcripts' ISO `timestamp`, spool
records' `time`) is dated by it, but never later than `seen_at`, so a skewed
or forged timestamp cannot make a session look alive in the future.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

from otelwatch.events.activity import Activity
from otelwatch.model import Event, EventKind
from otelwatch.sources.hookpath import hook_fields, opt_str, short, str_or_empty

__all__ = [
    "MAX_LINE_BYTES",
    "event_of",
    "fold",
    "hook_event",
    "parse_events",
    "parse_line",
    "parse_object",
]

MAX_LINE_BYTES = 1 << 20  # a longer line is malformed (and never buffered whole by readers)

PROGRESS = EventKind.PROGRESS
HEARTBEAT = EventKind.HEARTBEAT
_KINDS = {k.value: k for k in EventKind}

# Codex `exec --json` item types that are tool calls (open on item.started, close on item.completed).
_CODEX_TOOL_ITEMS = frozenset({"command_execution", "mcp_tool_call", "web_search", "file_change"})
# Codex rollout response items that open / close a tool call (linked by call_id).
_ROLLOUT_TOOL_OPEN = frozenset({"function_call", "custom_tool_call", "local_shell_call"})
_ROLLOUT_TOOL_CLOSE = frozenset({"function_call_output", "custom_tool_call_output"})
# Claude Code transcript lines that record its own state, not work (2.1.330): written
# after API errors and at exit, without a timestamp of their own.
_CLAUDE_BOOKKEEPING = frozenset({"last-prompt", "atis-latch", "cost-state"})
# Claude Code Notification types that mean a person is being waited on.
# Codex announces a stream retry as "Reconnecting... 2/5" (and older releases as "stream
# error: ...; retrying 2/5 in 400ms…"): the retry's number, the most it makes, the delay.
_CODEX_RETRY = re.compile(
    r"(?:reconnecting\W*|retrying\s+)(\d{1,6})\s*/\s*(\d{1,6})"
    r"(?:\s+in\s+(\d+(?:\.\d+)?)\s*(ns|µs|us|ms|s)\b)?",
    re.IGNORECASE,
)
_DURATION_UNITS = {"ns": 1e-9, "µs": 1e-6, "us": 1e-6, "ms": 1e-3, "s": 1.0}
MAX_RETRY_DELAY_S = 86_400.0  # a longer announced delay is clamped (it stays a finite time)


def parse_line(raw: bytes, seen_at: float, source: str, *, json_only: bool = True) -> Event | None:
    """The event one line stands for; None when the line is malformed.

    Malformed: over MAX_LINE_BYTES, NUL bytes (binary garbage), and with
    json_only, anything that is not a JSON object. A line holding several
    events (an assistant message with two tool calls) gives its first here;
    readers use `parse_events` to get them all.
    """
    events = parse_events(raw, seen_at, source, json_only=json_only)
    return None if events is None else events[0]


def parse_events(raw: bytes, seen_at: float, source: str, *, json_only: bool = True) -> list[Event] | None:
    """All events of one line (at least one), or None when it is malformed."""
    if len(raw) > MAX_LINE_BYTES or b"\0" in raw:
        return None
    line = raw.strip()
    if not line:
        return None
    if line[:1] == b"{":
        try:
            obj = json.loads(line)
        except (ValueError, RecursionError):
            obj = None
        if isinstance(obj, dict):
            return parse_object(obj, seen_at, source)
    if json_only:
        return None
    text = line.decode("utf-8", "replace")
    return [Event(time=seen_at, type="line", source=source, detail=short(text))]


def parse_object(obj: Mapping[str, Any], seen_at: float, source: str) -> list[Event]:
    """Events of one decoded JSON object (never empty: an unknown object is liveness)."""
    t = _event_time(obj, seen_at)
    if obj.get("otelwatch") == 1:
        return [_spool_record(obj, t, source)]
    if isinstance(obj.get("hook_event_name"), str):
        return [hook_event(obj, t, source)]
    typ = obj.get("type")
    if not isinstance(typ, str):
        return [Event(time=t, type="unknown", source=source)]
    if typ in ("assistant", "user"):
        return _claude_message(obj, typ, t, source)
    if typ == "system":
        return [_claude_system(obj, t, source)]
    if typ == "result":
        return [Event(time=t, type="result", turn="close", source=source, detail=str_or_empty(obj.get("subtype")))]
    if typ == "tool_progress":
        return [Event(time=t, type="tool_progress", kind=HEARTBEAT, tool=opt_str(obj.get("tool_name")),
                      tool_id=opt_str(obj.get("tool_use_id")), source=source)]
    if typ == "stream_event":
        inner = obj.get("event")
        inner_type = inner.get("type") if isinstance(inner, dict) else None
        # An SSE ping only shows the connection is alive; deltas are real output.
        kind = HEARTBEAT if inner_type == "ping" else PROGRESS
        return [Event(time=t, type="stream_event", kind=kind, source=source, detail=str_or_empty(inner_type))]
    if typ in ("tool_use", "tool_result", "message") or (typ == "error" and "severity" in obj):
        return [_gemini_stream(obj, typ, t, source)]
    if "." in typ or typ == "error":
        return [_codex_exec(obj, typ, t, source)]
    if typ in ("session_meta", "response_item", "event_msg", "turn_context", "compacted"):
        return [_codex_rollout(obj, typ, t, source)]
    if typ.startswith("api-request") or typ in _CLAUDE_BOOKKEEPING:
        # Claude Code's transcript logs every API attempt (api-request, its shape and blobs),
        # and keeps state lines without a timestamp: the loop at work on itself, which in a
        # retry loop is all it does. Liveness, not progress.
        return [Event(time=t, type=typ[:64], kind=HEARTBEAT, source=source)]
    # Claude transcript bookkeeping (summary, file-history-snapshot, ...) and anything else.
    # In a transcript, a line without a time of its own (mode, permission-mode, tools-used,
    # file-history-snapshot in 2.1.330) records state, not work: dated only by when it was
    # read, it must not pass for progress.
    untimed = source == "transcript" and "timestamp" not in obj
    return [Event(time=t, type=typ[:64], kind=EventKind.STATE if untimed else PROGRESS, source=source)]


def fold(activity: Activity, events: Iterable[Event]) -> Activity:
    """`activity` after applying `events` in order."""
    for event in events:
        activity = activity.apply(event)
    return activity


# --------------------------------------------------------------------------- hooks


def hook_event(payload: Mapping[str, Any], t: float, source: str) -> Event:
    """The event of a Claude Code hook payload (`hook_event_name` plus its fields): see
    `hookpath.hook_fields`, which the hook command uses without building an Event."""
    return event_of(t, hook_fields(payload), source)


def event_of(t: float, fields: Mapping[str, Any], source: str) -> Event:
    """An Event from `hookpath` keyword arguments (whose kind is the EventKind's value)."""
    kind = _KINDS[fields["kind"]] if "kind" in fields else PROGRESS
    return Event(time=t, source=source, **{**fields, "kind": kind})


# --------------------------------------------------------------------------- Claude Code


def _claude_message(obj: Mapping[str, Any], typ: str, t: float, source: str) -> list[Event]:
    message = obj.get("message")
    content: Any = message.get("content") if isinstance(message, dict) else None
    # A subagent's messages (stream-json parent_tool_use_id, transcripts' isSidechain)
    # never open or close the main turn.
    sidechain = bool(obj.get("parent_tool_use_id")) or obj.get("isSidechain") is True
    blocks = [b for b in content if isinstance(b, dict)] if isinstance(content, list) else []
    out: list[Event] = []
    if typ == "assistant":
        for b in blocks:
            if b.get("type") == "tool_use":
                out.append(Event(time=t, type="tool_use", tool=opt_str(b.get("name")),
                                 tool_id=opt_str(b.get("id")), tool_call="open", source=source))
        stop = message.get("stop_reason") if isinstance(message, dict) else None
        if stop == "end_turn" and not sidechain:
            out.append(Event(time=t, type="assistant", turn="close", source=source, detail="end_turn"))
        if not out:
            out.append(Event(time=t, type="assistant", source=source, detail=_first_text(blocks)))
        return out
    for b in blocks:
        if b.get("type") == "tool_result":
            out.append(Event(time=t, type="tool_result", tool_id=opt_str(b.get("tool_use_id")),
                             tool_call="close", source=source))
    if out:
        return out
    text = content if isinstance(content, str) else _first_text(blocks)
    if sidechain or obj.get("isMeta") is True or _is_command_echo(text):
        return [Event(time=t, type="user", source=source)]
    if text.startswith("[Request interrupted by user"):
        return [Event(time=t, type="interrupted", turn="close", source=source)]
    if text:
        return [Event(time=t, type="prompt", turn="open", awaiting_input=False, source=source)]
    return [Event(time=t, type="user", source=source)]


def _claude_system(obj: Mapping[str, Any], t: float, source: str) -> Event:
    subtype = str_or_empty(obj.get("subtype"))
    if subtype == "api_retry":
        # {"attempt": 6, "max_retries": 10, "retry_delay_ms": 17816, "error": "unknown", ...}
        return Event(time=t, type="api_retry", kind=HEARTBEAT, retry=True, source=source,
                     retry_attempt=_count(obj.get("attempt")), retry_max=_count(obj.get("max_retries")),
                     retry_delay_s=_delay(obj.get("retry_delay_ms"), 1e-3),
                     detail=short(str_or_empty(obj.get("error"))))
    if subtype == "api_error":
        # Claude Code's transcript records each retry as {"subtype": "api_error", "retryAttempt": 6,
        # "maxRetries": 10, "retryInMs": 17816, "error": {...}}: the same schedule as api_retry.
        retrying = "retryInMs" in obj or "retryAttempt" in obj
        return Event(time=t, type="api_error", kind=HEARTBEAT, retry=retrying, source=source,
                     retry_attempt=_count(obj.get("retryAttempt")), retry_max=_count(obj.get("maxRetries")),
                     retry_delay_s=_delay(obj.get("retryInMs"), 1e-3), detail=_error_text(obj.get("error")))
    if subtype == "init":
        return Event(time=t, type="init", source=source)
    if subtype == "status":  # "compacting" and similar: the loop is alive, nothing moved yet
        return Event(time=t, type="system/status", kind=HEARTBEAT, source=source)
    if subtype == "background_tasks_changed":
        # {"tasks": [{"task_id": "b87qhzozz", "task_type": "local_bash", ...}]}: the whole
        # set of the agent's background tasks. Where it stands, not work that moved.
        tasks = obj.get("tasks")
        ids = tuple(str_or_empty(task.get("task_id"))[:64] for task in tasks if isinstance(task, Mapping)
                    and str_or_empty(task.get("task_id"))) if isinstance(tasks, list) else ()
        return Event(time=t, type="system/background_tasks_changed", kind=EventKind.STATE, background=ids,
                     source=source)
    return Event(time=t, type=f"system/{subtype}"[:64] if subtype else "system", source=source)


def _is_command_echo(text: str) -> bool:
    # Transcripts record slash commands and their local output as user lines; no turn starts.
    return text.startswith(("<command-", "<local-command-", "Caveat: "))


# --------------------------------------------------------------------------- Codex


def _codex_exec(obj: Mapping[str, Any], typ: str, t: float, source: str) -> Event:
    if typ == "turn.started":
        return Event(time=t, type=typ, turn="open", source=source)
    if typ in ("turn.completed", "turn.failed"):
        return Event(time=t, type=typ, turn="close", source=source)
    if typ == "error":
        # Codex reports stream disconnects it is about to retry as error events
        # ("Reconnecting... 2/5"); a fatal error is followed by turn.failed.
        message = str_or_empty(obj.get("message"))
        return _codex_retry(typ, message, t, source)
    item = obj.get("item")
    if typ.startswith("item.") and isinstance(item, dict):
        item_type = str_or_empty(item.get("type") or item.get("item_type"))
        if item_type in _CODEX_TOOL_ITEMS and typ in ("item.started", "item.completed"):
            tool = item_type
            if item_type == "mcp_tool_call" and item.get("tool"):
                tool = f"{str_or_empty(item.get('server'))}/{str_or_empty(item.get('tool'))}".lstrip("/")
            return Event(time=t, type=typ, tool=tool[:64], tool_id=opt_str(item.get("id")),
                         tool_call="open" if typ == "item.started" else "close", source=source)
        return Event(time=t, type=typ, source=source, detail=item_type)
    return Event(time=t, type=typ[:64], source=source)


def _codex_rollout(obj: Mapping[str, Any], typ: str, t: float, source: str) -> Event:
    payload = obj.get("payload")
    if not isinstance(payload, dict):
        return Event(time=t, type=typ, source=source)
    ptype = str_or_empty(payload.get("type"))
    call_id = opt_str(payload.get("call_id"))
    if typ == "response_item":
        if ptype in _ROLLOUT_TOOL_OPEN:
            tool = opt_str(payload.get("name")) or ("shell" if ptype == "local_shell_call" else ptype)
            return Event(time=t, type=ptype, tool=tool, tool_id=call_id, tool_call="open", source=source)
        if ptype in _ROLLOUT_TOOL_CLOSE:
            return Event(time=t, type=ptype, tool_id=call_id, tool_call="close", source=source)
        return Event(time=t, type=f"response_item/{ptype}"[:64], source=source)
    if typ == "event_msg":
        if ptype in ("user_message", "task_started"):
            return Event(time=t, type=ptype, turn="open", awaiting_input=False, source=source)
        if ptype in ("task_complete", "turn_aborted"):
            return Event(time=t, type=ptype, turn="close", source=source)
        if ptype == "exec_command_begin":
            return Event(time=t, type=ptype, tool="shell", tool_id=call_id, tool_call="open", source=source)
        if ptype == "exec_command_end":
            return Event(time=t, type=ptype, tool="shell", tool_id=call_id, tool_call="close", source=source)
        if ptype == "stream_error":
            return _codex_retry(ptype, str_or_empty(payload.get("message")), t, source)
        return Event(time=t, type=f"event_msg/{ptype}"[:64], source=source)
    return Event(time=t, type=typ, source=source)


def _codex_retry(typ: str, message: str, t: float, source: str) -> Event:
    """A Codex retry heartbeat, with the retry's number, maximum and delay when the
    message says them. Newer releases name no delay: the attempt is due at once."""
    m = _CODEX_RETRY.search(message)
    attempt = retry_max = None
    delay: float | None = None
    if m is not None:
        attempt, retry_max = int(m.group(1)), int(m.group(2))
        if m.group(3) is not None:
            delay = min(float(m.group(3)) * _DURATION_UNITS[m.group(4).lower()], MAX_RETRY_DELAY_S)
    return Event(time=t, type=typ, kind=HEARTBEAT, retry=True, retry_attempt=attempt,
                 retry_max=retry_max, retry_delay_s=delay, source=source, detail=short(message))


# --------------------------------------------------------------------------- Gemini CLI


def _gemini_stream(obj: Mapping[str, Any], typ: str, t: float, source: str) -> Event:
    """Gemini CLI's `-o stream-json` (0.61.0): `tool_use` when a tool starts (`tool_id`,
    `tool_name`), `tool_result` when it ends, `message` (role user / assistant, deltas),
    `error` with a `severity` (a warning or a failed turn: not a retry announcement)."""
    if typ == "tool_use":
        return Event(time=t, type=typ, tool=opt_str(obj.get("tool_name")), tool_id=opt_str(obj.get("tool_id")),
                     tool_call="open", source=source)
    if typ == "tool_result":
        return Event(time=t, type=typ, tool_id=opt_str(obj.get("tool_id")), tool_call="close", source=source,
                     detail=str_or_empty(obj.get("status")))
    if typ == "error":
        return Event(time=t, type="error", kind=HEARTBEAT, source=source,
                     detail=short(str_or_empty(obj.get("message"))))
    if obj.get("role") == "user":
        return Event(time=t, type="prompt", turn="open", awaiting_input=False, source=source)
    return Event(time=t, type="message", source=source)


# --------------------------------------------------------------------------- otelwatch spool


def _spool_record(obj: Mapping[str, Any], t: float, source: str) -> Event:
    raw_kind = obj.get("kind")
    kind = _KINDS.get(raw_kind, PROGRESS) if isinstance(raw_kind, str) else PROGRESS
    turn = obj.get("turn") if obj.get("turn") in ("open", "close") else None
    tasks = obj.get("background")
    background = (tuple(str_or_empty(task)[:64] for task in tasks[:256] if isinstance(task, str) and task)
                  if isinstance(tasks, list) else None)
    tool_call = obj.get("tool_call") if obj.get("tool_call") in ("open", "close") else None
    awaiting = obj.get("awaiting_input")
    return Event(
        time=t,
        type=str_or_empty(obj.get("type"))[:64] or "event",
        kind=kind,
        tool=opt_str(obj.get("tool")),
        tool_id=opt_str(obj.get("tool_id")),
        turn=turn,
        tool_call=tool_call,
        awaiting_input=awaiting if isinstance(awaiting, bool) else None,
        retry=obj.get("retry") is True,
        retry_attempt=_count(obj.get("retry_attempt")),
        retry_max=_count(obj.get("retry_max")),
        retry_delay_s=_delay(obj.get("retry_delay_s"), 1.0),
        background=background,
        source=str_or_empty(obj.get("source"))[:32] or source,
        detail=short(str_or_empty(obj.get("detail"))),
    )


# --------------------------------------------------------------------------- helpers


def _event_time(obj: Mapping[str, Any], seen_at: float) -> float:
    """The line's own time when it has one, never later than when it was seen."""
    value = obj.get("time") if obj.get("otelwatch") == 1 else obj.get("timestamp")
    t: float | None = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        t = float(value)
    elif isinstance(value, str) and 10 <= len(value) <= 40:
        try:
            t = datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
        except ValueError:
            t = None
    if t is None or t != t:  # missing or NaN
        return seen_at
    return min(t, seen_at)


def _first_text(blocks: list[dict[str, Any]]) -> str:
    for b in blocks:
        if b.get("type") == "text" and isinstance(b.get("text"), str):
            return short(b["text"])
    return ""


def _delay(value: object, unit_s: float) -> float | None:
    """A retry delay in seconds from a finite, non-negative JSON number of `unit_s`
    units, at most MAX_RETRY_DELAY_S; None for anything else (bools, strings, NaN)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    x = float(value) * unit_s
    return min(x, MAX_RETRY_DELAY_S) if math.isfinite(x) and x >= 0 else None


def _count(value: object) -> int | None:
    """A non-negative JSON integer (retry numbers); None for anything else."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return None
    return min(value, 1_000_000)


def _error_text(value: object) -> str:
    """A short text for an error that is a string or an object, as the APIs nest them
    ({"status": 529, "error": {"type": "error", "error": {"type": "overloaded_error",
    "message": "Overloaded"}}}): the innermost message, else the most specific type."""
    kind = ""
    for _ in range(4):
        if isinstance(value, str):
            return short(value)
        if not isinstance(value, dict):
            break
        message, typ = value.get("message"), value.get("type")
        if isinstance(message, str) and message:
            return short(message)
        if isinstance(typ, str) and typ and typ != "error":
            kind = typ
        value = value.get("error")
    return short(kind)
