"""Which of the Watcher's reports a person hears about, as one thread per incident.

Pure apart from the optional /proc look-ups in `Context` (owner and working
directory of a pid, when the reports do not carry them); time is passed in.
`notify.Notifier` feeds every report here on the loop thread and delivers what
comes out.

An incident is one stretch of a session being stalled or stuck. It gives:

- **open**: its first stalled/stuck report that passes the filters. A report
  whose reason is provisional (`insufficient_samples`: too little history to
  tell) is held for at most `notify.settle` seconds; a settled report in that
  time is sent instead, an incident that ends in that time sends nothing at all,
  and one still unsettled at the deadline is sent as it is;
- **repeat** / **update**: each later report (already backed off by the
  classifier: `repeat_base`, 2x, 4x ... `repeat_max`), `update` when the state or
  reason changed;
- **resolved**: one all-clear when it ends, if anything was sent for it: back to
  active/idle/long_running/starting, recovered by otelwatch (a recovery that
  terminated or killed it), exited, or no longer tracked.

Filters (`agents`, `users`, `cwd`, and `states` or `min_state`, `reasons`) decide
which reports are sent; an incident none of whose reports passed sends no
all-clear either. State changes below stalled that `min_state`/`states` let
through (e.g. "waiting for you": idle) and recovery steps and session ends
(`recovery`, `session_end`) are sent as before, in the incident's thread when
one is open.
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import pwd
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from otelwatch.config import NOTIFY_STATES, NotifyConfig
from otelwatch.sessions.report import human_duration

__all__ = ["PROVISIONAL_REASONS", "Context", "Threads", "cwd_matches", "message_text", "where", "who"]

SEVERITY = {state: rank for rank, state in enumerate(NOTIFY_STATES)}  # idle < ... < stuck
INCIDENT_STATES = frozenset({"stalled", "stuck"})
REPORT_EVENTS = frozenset({"session.stalled", "session.stuck"})
RECOVERY_EVENTS = frozenset({"recovery.requested", "recovery.completed"})
RESOLVING_STATES = frozenset({"active", "idle", "long_running", "starting"})
RECOVERED_STATUSES = frozenset({"terminated", "killed"})
PROVISIONAL_REASONS = frozenset({"insufficient_samples"})
CONTEXT_KEYS = ("name", "cwd", "user", "runtime", "pid")
PHASE_WORDS = {"open": "OPEN", "repeat": "STILL", "update": "CHANGED", "resolved": "ALL CLEAR", "test": "TEST"}


def cwd_matches(cwd: str, patterns: tuple[str, ...]) -> bool:
    """Whether `cwd` is under one of `patterns`: a glob (`*`, `?`, `[`) matches the whole
    path (`*` crosses `/`), anything else is a directory prefix on a path boundary."""
    for pattern in patterns:
        if any(c in pattern for c in "*?["):
            if fnmatch.fnmatchcase(cwd, pattern):
                return True
        else:
            base = pattern.rstrip("/") or "/"
            if cwd == base or cwd.startswith(base if base.endswith("/") else base + "/"):
                return True
    return False


class Context:
    """The names of each session (name, cwd, user, runtime, pid) as the reports gave them,
    with the owner and directory of its pid read from /proc when they did not."""

    def __init__(self, proc: bool = True, proc_root: str = "/proc") -> None:
        self._by_session: dict[str, dict[str, Any]] = {}
        self._proc = proc
        self._root = proc_root

    def update(self, report: Mapping[str, Any]) -> dict[str, Any]:
        sid = str(report.get("session_id") or "")
        ctx = self._by_session.setdefault(sid, {})
        for key in CONTEXT_KEYS:
            value = report.get(key)
            if value not in (None, "", {}):
                ctx[key] = value
        pid = ctx.get("pid")
        if self._proc and isinstance(pid, int) and pid > 0:
            if "user" not in ctx:
                try:
                    uid = os.stat(f"{self._root}/{pid}").st_uid
                    ctx["user"] = pwd.getpwuid(uid).pw_name
                except (OSError, KeyError):
                    pass
            if "cwd" not in ctx:
                with contextlib.suppress(OSError):
                    ctx["cwd"] = os.readlink(f"{self._root}/{pid}/cwd")[:1024]
        return dict(ctx)

    def forget(self, session_id: str) -> None:
        self._by_session.pop(session_id, None)


@dataclass
class Incident:
    number: int
    session_id: str
    opened_at: float
    state: str
    reason: str
    notified: int = 0  # messages sent in this incident
    last_sent: tuple[str, str] | None = None
    held: dict[str, Any] | None = None  # the first message, waiting for a settled reason
    held_until: float = 0.0
    first: tuple[str, str] | None = None  # state/reason of the first message sent

    @property
    def id(self) -> str:
        return f"{self.session_id}#{self.number}"


@dataclass
class Threads:
    """Incident threads of every session; `observe` and `due` return the notifications to send.

    A notification is the report (with the session's names) plus `incident`:
    `{"id", "phase", "opened_at", "message", "first_state", "first_reason"}` (and
    `resolution` for the all-clear), so a receiver can thread them.
    """

    cfg: NotifyConfig
    context: Context = field(default_factory=Context)
    _open: dict[str, Incident] = field(default_factory=dict)
    _count: dict[str, int] = field(default_factory=dict)

    # ------------------------------------------------------------------ filters

    def session_passes(self, ctx: Mapping[str, Any], agent: str) -> bool:
        cfg = self.cfg
        if cfg.agents and agent not in cfg.agents:
            return False
        if cfg.users and str(ctx.get("user") or "") not in cfg.users:
            return False  # an owner we cannot tell is not one of them
        return not cfg.cwd or (isinstance(ctx.get("cwd"), str) and cwd_matches(ctx["cwd"], cfg.cwd))

    def state_passes(self, state: str) -> bool:
        if self.cfg.states:
            return state in self.cfg.states
        return SEVERITY.get(state, -1) >= SEVERITY[self.cfg.min_state]

    def report_passes(self, report: Mapping[str, Any]) -> bool:
        return self.state_passes(str(report.get("state", ""))) and (
            not self.cfg.reasons or str(report.get("reason", "")) in self.cfg.reasons)

    # ------------------------------------------------------------------ events

    def observe(self, report: Mapping[str, Any], now: float) -> list[dict[str, Any]]:
        """The notifications `report` (one Watcher subscriber call) gives rise to."""
        event = str(report.get("event", ""))
        sid = str(report.get("session_id") or "")
        ctx = self.context.update(report)
        full = {**report, **{k: v for k, v in ctx.items() if report.get(k) in (None, "", {})}}
        passes = self.session_passes(ctx, str(report.get("agent", "")))
        out: list[dict[str, Any]] = []
        if event in REPORT_EVENTS:
            out += self._report(sid, full, passes, now)
        elif event == "session.state":
            out += self._state(sid, full, passes, now)
        elif event in RECOVERY_EVENTS:
            out += self._recovery(sid, full, passes, now)
        elif event == "session.end":
            incident = self._open.pop(sid, None)
            if incident is not None:
                out += self._resolve(incident, full, "no longer tracked", now)
            if self.cfg.session_end and passes:
                out.append(full)
            self.context.forget(sid)  # memory stays bounded by the live sessions
            self._count.pop(sid, None)
        return out

    def due(self, now: float) -> list[dict[str, Any]]:
        """Held first messages whose `settle` time is up: sent as they are."""
        out = []
        for incident in self._open.values():
            if incident.held is not None and now >= incident.held_until:
                held, incident.held = incident.held, None
                held = {**held, "unsettled_after_s": round(self.cfg.settle, 1)}
                out.append(self._send(incident, held, "open", now))
        return out

    def next_deadline(self) -> float | None:
        times = [i.held_until for i in self._open.values() if i.held is not None]
        return min(times) if times else None

    def open_incidents(self) -> int:
        return len(self._open)

    # ------------------------------------------------------------------ internals

    def _report(self, sid: str, report: dict[str, Any], passes: bool, now: float) -> list[dict[str, Any]]:
        state, reason = str(report.get("state", "")), str(report.get("reason", ""))
        incident = self._open.get(sid)
        if incident is None:
            self._count[sid] = number = self._count.get(sid, 0) + 1
            incident = self._open[sid] = Incident(number, sid, now, state, reason)
        incident.state, incident.reason = state, reason
        if not passes or not self.report_passes(report):
            return []
        if incident.notified == 0:
            if reason in PROVISIONAL_REASONS and self.cfg.settle > 0:
                if incident.held is None:
                    incident.held_until = now + self.cfg.settle
                incident.held = report
                return []
            incident.held = None
            return [self._send(incident, report, "open", now)]
        phase = "repeat" if incident.last_sent == (state, reason) else "update"
        return [self._send(incident, report, phase, now)]

    def _state(self, sid: str, report: dict[str, Any], passes: bool, now: float) -> list[dict[str, Any]]:
        state = str(report.get("state", ""))
        incident = self._open.get(sid)
        if incident is not None and (state in RESOLVING_STATES or state == "exited"):
            del self._open[sid]
            how = "exited" if state == "exited" else f"back to {state}"
            resolved = self._resolve(incident, report, how, now)
            if resolved:
                return resolved  # the all-clear says it: one message, not two
        # Entering stalled or stuck is said by its report, which is backed off.
        if state in INCIDENT_STATES or not passes or not self.state_passes(state):
            return []
        return [report]

    def _recovery(self, sid: str, report: dict[str, Any], passes: bool, now: float) -> list[dict[str, Any]]:
        incident = self._open.get(sid)
        status = str(report.get("status") or "")
        if (report.get("event") == "recovery.completed" and status in RECOVERED_STATUSES
                and incident is not None):
            del self._open[sid]
            resolved = self._resolve(incident, report, f"recovered by otelwatch ({status})", now)
            if resolved:
                return resolved
        if not (self.cfg.recovery and passes):
            return []
        if incident is not None and incident.notified:
            return [self._tag(incident, report, "recovery", now)]
        return [report]

    def _resolve(self, incident: Incident, report: Mapping[str, Any], how: str,
                 now: float) -> list[dict[str, Any]]:
        if not incident.notified or not self.cfg.all_clear:
            return []  # nothing was sent (filtered, or held and never settled): nothing to clear
        message = self._tag(incident, report, "resolved", now)
        message["incident"]["resolution"] = how
        message["incident"]["duration_s"] = round(max(0.0, now - incident.opened_at), 1)
        return [message]

    def _send(self, incident: Incident, report: Mapping[str, Any], phase: str, now: float) -> dict[str, Any]:
        state, reason = str(report.get("state", "")), str(report.get("reason", ""))
        incident.last_sent = (state, reason)
        if incident.first is None:
            incident.first = (state, reason)
        return self._tag(incident, report, phase, now)

    def _tag(self, incident: Incident, report: Mapping[str, Any], phase: str, now: float) -> dict[str, Any]:
        incident.notified += 1
        first = incident.first or (incident.state, incident.reason)
        return {**report, "incident": {
            "id": incident.id, "phase": phase, "opened_at": incident.opened_at, "message": incident.notified,
            "first_state": first[0], "first_reason": first[1],
            "age_s": round(max(0.0, now - incident.opened_at), 1),
        }}


# --------------------------------------------------------------------------- text


def _human(seconds: float | None) -> str:
    return "?" if seconds is None else human_duration(seconds)


def who(m: Mapping[str, Any]) -> str:
    """`"work-0b" (claude-code, alice)`: the agent's own name for the session, else its id."""
    name = m.get("name")
    agent = m.get("agent") or "unknown agent"
    user = f", {m['user']}" if m.get("user") else ""
    head = f'"{name}"' if name else str(m.get("session_id") or "?")
    return f"{head} ({agent}{user})"


def where(m: Mapping[str, Any]) -> str:
    """Second line: directory, pane and how to attach, the session id when a name stood for it."""
    parts = []
    if m.get("cwd"):
        parts.append(f"dir {m['cwd']}")
    runtime = m.get("runtime")
    if isinstance(runtime, Mapping) and runtime.get("target"):
        pane = f"{runtime.get('kind') or 'pane'} {runtime['target']}"
        if runtime.get("attach"):
            pane += f" (attach: {runtime['attach']})"
        parts.append(pane)
    if m.get("pid"):
        parts.append(f"pid {m['pid']}")
    if m.get("name"):
        parts.append(f"session {m.get('session_id')}")
    return " · ".join(parts)


def message_text(m: Mapping[str, Any], host: str = "") -> str:
    """What a person reads of an incident's notification: a headline with its phase and
    thread, then where the session is (directory, pane and the command to attach)."""
    incident = m.get("incident")
    at = f" on {host}" if host else ""
    if not isinstance(incident, Mapping):
        head = f"otelwatch{at}: {m.get('event')} for {who(m)}"
    else:
        phase = str(incident.get("phase"))
        word = PHASE_WORDS.get(phase, phase.upper())
        verdict = f"{m.get('state')}/{m.get('reason')}"
        first = f"{incident.get('first_state')}/{incident.get('first_reason')}"
        if phase == "resolved":
            head = (f"otelwatch{at}: {word}: {who(m)} {incident.get('resolution')} after "
                    f"{_human(incident.get('duration_s'))} (incident {incident.get('id')}, was {first})")
        elif phase == "recovery":
            step = m.get("step") or str(m.get("event", "")).split(".", 1)[-1]
            status = f": {m['status']}" if m.get("status") else ""
            head = f"otelwatch{at}: RECOVERY {step}{status} for {who(m)} (incident {incident.get('id')})"
        else:
            since = "" if phase in ("open", "test") else f" for {_human(incident.get('age_s'))}"
            was = f" (was {first})" if phase == "update" else ""
            settle = (f" (not settled after {_human(m['unsettled_after_s'])})" if m.get("unsettled_after_s")
                      else "")
            head = (f"otelwatch{at}: {word}: {who(m)} is {verdict}{since}{was}{settle}: {m.get('summary', '')}"
                    f" [incident {incident.get('id')}, message {incident.get('message')}]")
    tail = where(m)
    return f"{head}\n{tail}" if tail else head
