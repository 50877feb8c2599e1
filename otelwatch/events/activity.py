"""The event state machine: what a session's event history says, folded event by event.

Owns `Activity` (event counts, the progress, heartbeat and retry clocks, the
open turn, open and background tool calls, whether a person is waited on) and
the one transition, `Activity.apply(event)`. Pure: no I/O, no clock; every
time comes from the events.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from otelwatch.model import Event, EventKind

__all__ = ["RECENT_EVENTS", "Activity", "OpenTool"]


@dataclass(frozen=True)
class OpenTool:
    tool_id: str
    tool: str
    since: float


RECENT_EVENTS = 20


@dataclass(frozen=True)
class Activity:
    """What a session's event history says, folded event by event (see `apply`)."""

    events: int = 0
    progress_events: int = 0  # the backoff fingerprint counts these: heartbeats alone change nothing
    malformed: int = 0
    first_event_time: float | None = None
    last_event_time: float | None = None
    last_progress_time: float | None = None
    last_heartbeat_time: float | None = None
    last_retry_time: float | None = None
    # The last announced retry, until progress settles it: when its attempt starts, how
    # long the attempt that failed before it took (the next may take as long), its number.
    retry_due: float | None = None
    retry_attempt_s: float | None = None
    retry_attempt: int | None = None
    retry_max: int | None = None
    turn_open: bool = False
    turn_opened_at: float | None = None
    # The open turn was opened (or a tool call in it started) by an own event: only such
    # a turn can count for recovery. An observed event can open a turn, never this.
    turn_own: bool = False
    open_tools: tuple[OpenTool, ...] = ()
    # Tool runs the agent moved to the background: they outlive the turn that started
    # them, so a turn's end does not close them; the agent's next list of them does.
    background_tasks: tuple[OpenTool, ...] = ()
    awaiting_input: bool = False
    recent: tuple[Event, ...] = ()

    def apply(self, event: Event, ring: int = RECENT_EVENTS) -> Activity:
        """The activity after `event`. Pure; out-of-order times never move clocks back."""
        t = event.time
        changes: dict[str, Any] = {
            "events": self.events + 1,
            "first_event_time": t if self.first_event_time is None else min(self.first_event_time, t),
            "last_event_time": _latest(self.last_event_time, t),
            "recent": (*self.recent, event)[-ring:] if ring > 0 else (),
        }
        if event.kind is EventKind.PROGRESS:
            changes["last_progress_time"] = _latest(self.last_progress_time, t)
            changes["progress_events"] = self.progress_events + 1
            if self.retry_due is not None and self.last_retry_time is not None and t >= self.last_retry_time:
                # Work moved after the retry: the call went through, nothing is announced.
                changes.update(retry_due=None, retry_attempt_s=None, retry_attempt=None, retry_max=None)
        elif event.kind is EventKind.HEARTBEAT:
            changes["last_heartbeat_time"] = _latest(self.last_heartbeat_time, t)
            if event.retry:
                changes["last_retry_time"] = _latest(self.last_retry_time, t)
                if self.last_retry_time is None or t >= self.last_retry_time:
                    changes.update(_announced_retry(self, event))

        open_tools = self.open_tools
        turn_open = self.turn_open
        turn_opened_at = self.turn_opened_at
        turn_own = self.turn_own and turn_open
        if event.turn == "open":
            turn_own = event.own or (turn_own and turn_open)
            turn_open, turn_opened_at = True, t
        if event.tool_call == "open":
            # A tool call is work in progress: if we missed the prompt that opened the
            # turn (a hook not installed, a transcript joined late), the turn is open now.
            if not turn_open:
                turn_open, turn_opened_at, turn_own = True, t, event.own
            elif event.own:
                turn_own = True  # the session's own word that it works in this turn
            tool_id = event.tool_id or f"{event.tool or 'tool'}@{t}"
            # The same call seen again (a hook and the transcript both report it) keeps the
            # time it was first seen open.
            since = min((o.since for o in open_tools if o.tool_id == tool_id), default=t)
            open_tools = (*(o for o in open_tools if o.tool_id != tool_id),
                          OpenTool(tool_id, event.tool or "", min(since, t)))
        elif event.tool_call == "close":
            open_tools = _close_tool(open_tools, event.tool_id, event.tool)
        if event.turn == "close" and (turn_opened_at is None or t >= turn_opened_at):
            # A finished turn leaves no tool call open, whatever we missed. A close older
            # than the turn's opening belongs to the turn before (hooks and transcripts
            # report the same turn edges, each in its own time): it closes nothing.
            turn_open, turn_opened_at, open_tools, turn_own = False, None, (), False
        changes.update(turn_open=turn_open, turn_opened_at=turn_opened_at, open_tools=open_tools,
                       turn_own=turn_own)
        if event.background is not None:
            known = {o.tool_id: o.since for o in self.background_tasks}
            changes["background_tasks"] = tuple(OpenTool(task, "background_task", min(known.get(task, t), t))
                                                for task in event.background)

        if event.awaiting_input is not None:
            changes["awaiting_input"] = event.awaiting_input
        elif event.kind is EventKind.PROGRESS:
            # Work moved, so nobody is being waited on any more.
            changes["awaiting_input"] = False
        return replace(self, **changes)

    def count_malformed(self, n: int = 1) -> Activity:
        return replace(self, malformed=self.malformed + n)


def _announced_retry(before: Activity, event: Event) -> dict[str, Any]:
    """The retry schedule after a retry heartbeat. The attempt that just failed began when
    the previously announced one was due or, for a first retry, at the last progress."""
    t = event.time
    began = before.retry_due if before.retry_due is not None else before.last_progress_time
    delay = event.retry_delay_s if event.retry_delay_s is not None and event.retry_delay_s > 0 else 0.0
    return {
        "retry_due": t + delay,
        "retry_attempt_s": t - began if began is not None and began <= t else None,
        "retry_attempt": event.retry_attempt,
        "retry_max": event.retry_max,
    }


def _latest(current: float | None, t: float) -> float:
    return t if current is None else max(current, t)


def _close_tool(
    open_tools: tuple[OpenTool, ...], tool_id: str | None, tool: str | None
) -> tuple[OpenTool, ...]:
    candidates = open_tools
    if tool_id is not None:
        if any(o.tool_id == tool_id for o in open_tools):
            return tuple(o for o in open_tools if o.tool_id != tool_id)
        # An id never seen opening: the same call closed a second time (a hook and the
        # transcript both report it), or one opened without an id. Only those it may close.
        candidates = tuple(o for o in open_tools if o.tool_id == f"{o.tool or 'tool'}@{o.since}")
        if not candidates:
            return open_tools
    # No id (hooks without tool_use_id): close the oldest call of that tool, else the oldest.
    for candidate in candidates:
        if tool is None or candidate.tool == tool:
            return tuple(o for o in open_tools if o is not candidate)
    return tuple(o for o in open_tools if o is not candidates[0]) if candidates else open_tools
