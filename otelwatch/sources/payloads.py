"""Parsing one event payload (a hook's JSON, or `{"type", "tool"}`) into an Event.

Shared by `otelwatch hook`/`otelwatch event` (which spool it) and the daemon's
`POST /api/events` (which queues it). Pure: no I/O, time passed in. Imported on
every hook call, so it imports only `model` and `events`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from otelwatch.events.lines import hook_event
from otelwatch.model import Event, EventKind

__all__ = ["payload_to_event"]

# `otelwatch event SESSION TYPE` types beyond the hook event names.
_SIMPLE_TYPES: Mapping[str, dict[str, Any]] = {
    "progress": {},
    "heartbeat": {"kind": EventKind.HEARTBEAT},
    "retry": {"kind": EventKind.HEARTBEAT, "retry": True},
    "api_retry": {"kind": EventKind.HEARTBEAT, "retry": True},
    "waiting": {"kind": EventKind.HEARTBEAT, "awaiting_input": True},
    "awaiting_input": {"kind": EventKind.HEARTBEAT, "awaiting_input": True},
    "turn_start": {"turn": "open", "awaiting_input": False},
    "turn_end": {"turn": "close"},
    "tool_start": {"tool_call": "open"},
    "tool_end": {"tool_call": "close"},
}
_HOOK_NAMES = frozenset({
    "UserPromptSubmit", "PreToolUse", "PostToolUse", "PostToolUseFailure", "PermissionRequest",
    "Notification", "Stop", "SubagentStop", "SessionStart", "SessionEnd", "PreCompact", "PostCompact",
})


def payload_to_event(payload: Mapping[str, Any], now: float, source: str) -> Event:
    """The event of a hook payload or an `{"type": ..., "tool": ...}` object.

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
        return hook_event(payload, t, source)
    typ = payload.get("type")
    if not isinstance(typ, str) or not typ.strip():
        raise ValueError("event payload needs a non-empty string 'hook_event_name' or 'type'")
    typ = typ.strip()[:64]
    tool = payload.get("tool") if isinstance(payload.get("tool"), str) else None
    tool_id = payload.get("tool_id") if isinstance(payload.get("tool_id"), str) else None
    if typ in _HOOK_NAMES:
        fields = {"hook_event_name": typ, "tool_name": tool, "tool_use_id": tool_id}
        for key in ("notification_type", "message"):
            if isinstance(payload.get(key), str):
                fields[key] = payload[key]
        return hook_event(fields, t, source)
    extra = dict(_SIMPLE_TYPES.get(typ, {}))
    detail = payload["detail"] if isinstance(payload.get("detail"), str) else ""
    return Event(time=t, type=typ, tool=tool, tool_id=tool_id, source=source, detail=detail[:120], **extra)
