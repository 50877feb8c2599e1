"""Parsing one event payload (a hook's JSON, or `{"type", "tool"}`) into an Event.

Used by the daemon's `POST /api/events` (which queues it). The rules live in
`hookpath.payload_fields`, which `otelwatch hook`/`otelwatch event` use directly
to spool a record without importing the model. Pure: no I/O, time passed in.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from otelwatch.events.lines import event_of
from otelwatch.model import Event
from otelwatch.sources.hookpath import payload_fields

__all__ = ["payload_to_event"]


def payload_to_event(payload: Mapping[str, Any], now: float, source: str) -> Event:
    """The event of a hook payload or an `{"type": ..., "tool": ...}` object.

    Accepts Claude Code hook payloads (`hook_event_name`) and simple events
    (`type`: progress, heartbeat, retry, waiting, turn_start, turn_end,
    tool_start, tool_end, a hook event name, or any other name: progress).
    A payload's own `time` is used when it is not in the future. Raises
    ValueError saying what is wrong when neither field is usable.
    """
    t, fields = payload_fields(payload, now)
    return event_of(t, fields, source)
