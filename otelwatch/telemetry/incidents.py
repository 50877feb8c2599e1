"""Incident spans: one span per stalled/stuck episode of a session.

A span opens when a session first turns stalled or stuck, carries the latest
diagnostics as attributes, gets one event per repeat report and recovery
step, and ends when the session is active/idle/long_running/starting again,
exits, is recovered, or leaves the snapshot. At most one span per session is
open, so memory is bounded by the number of live sessions. This module must
never touch /proc; it reads only the snapshots it is given.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer

from otelwatch.model import PROBLEM_STATES, RecoveryStatus, RecoveryStep, SessionSnapshot, State

SPAN_NAME = "otelwatch.incident"

RESOLVING_STATES = frozenset({State.ACTIVE, State.IDLE, State.LONG_RUNNING, State.STARTING})
# A dry run changes nothing, so the incident goes on.
_NOT_AN_END = frozenset({RecoveryStatus.DRY_RUN})
_FAILED = frozenset({RecoveryStatus.UNKILLABLE, RecoveryStatus.FAILED})


def _ns(t: float) -> int:
    return int(t * 1e9)


def _scalar(value: Any) -> Any:
    """Span attribute values must be primitives: others become JSON text."""
    if isinstance(value, (bool, int, float, str)):
        return value
    enum_value = getattr(value, "value", None)
    if isinstance(enum_value, (str, int)):
        return enum_value
    try:
        return json.dumps(value, default=str, separators=(",", ":"))
    except (TypeError, ValueError):
        return str(value)


def snapshot_attributes(snap: SessionSnapshot) -> dict[str, Any]:
    """The diagnostics an incident span carries, from the latest snapshot."""
    attrs: dict[str, Any] = {
        "session.id": snap.session_id,
        "agent": snap.agent,
        "state": snap.state.value,
        "reason": snap.reason.value,
        "silence_s": round(float(snap.silence_s), 3),
        "rss_bytes": int(snap.rss_bytes),
        "threads": int(snap.threads),
        "children": len(snap.children),
        "sample_status": snap.sample_status.value,
    }
    if snap.tcp is not None:  # unknown (unreadable) is left out, never 0
        attrs["tcp.total"] = int(sum(snap.tcp.values()))
    if snap.pid is not None:
        attrs["process.pid"] = snap.pid
    if snap.cpu_percent is not None:
        attrs["cpu.utilization"] = round(snap.cpu_percent / 100.0, 4)
    if snap.open_fds is not None:
        attrs["open_fds"] = int(snap.open_fds)
    if snap.last_event_age_s is not None:
        attrs["last_event_age_s"] = round(float(snap.last_event_age_s), 3)
    for tcp_state, count in (snap.tcp or {}).items():
        attrs[f"tcp.{tcp_state}"] = int(count)
    return attrs


class Incidents:
    """Open incident spans by session id."""

    def __init__(self, tracer: Tracer, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock  # the watcher's wall clock, for spans that carry no time of their own
        self._tracer = tracer
        self._open: dict[str, Span] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._open)

    def is_open(self, session_id: str) -> bool:
        return session_id in self._open

    def open(self, snap: SessionSnapshot) -> Span:
        """The session's open span, started now if there is none."""
        with self._lock:
            span = self._open.get(snap.session_id)
            if span is None:
                start = snap.state_since if snap.state_since > 0 else self._clock()
                span = self._tracer.start_span(
                    SPAN_NAME, kind=SpanKind.INTERNAL, attributes=snapshot_attributes(snap),
                    start_time=_ns(start))
                self._open[snap.session_id] = span
                return span
        span.set_attributes(snapshot_attributes(snap))
        return span

    def transition(self, snap: SessionSnapshot, old_state: State | None) -> None:
        if snap.state in PROBLEM_STATES:
            fresh = not self.is_open(snap.session_id)
            span = self.open(snap)
            if not fresh:
                span.add_event("state_change", {
                    "from": "" if old_state is None else old_state.value,
                    "state": snap.state.value, "reason": snap.reason.value,
                }, timestamp=_ns(snap.state_since or self._clock()))
        elif snap.state in RESOLVING_STATES:
            self.end(snap.session_id, "resolved", snap, snap.state_since)
        elif snap.state is State.EXITED:
            self.end(snap.session_id, "exited", snap, snap.state_since)

    def report(self, snap: SessionSnapshot, report: Mapping[str, Any], t: float) -> None:
        span = self.open(snap)
        attrs = {"state": snap.state.value, "reason": snap.reason.value,
                 "silence_s": round(float(snap.silence_s), 3)}
        for key, value in report.items():
            if value is not None and str(key) not in attrs:
                attrs[str(key)] = _scalar(value)
        span.add_event("report", attrs, timestamp=_ns(t))

    def recovery_step(self, step: RecoveryStep) -> None:
        with self._lock:
            span = self._open.get(step.session_id)
            if span is None:
                # e.g. a restarted daemon resuming an escalation: record it anyway.
                span = self._tracer.start_span(
                    SPAN_NAME, attributes={"session.id": step.session_id, "agent": step.agent,
                                           "process.pid": step.pid},
                    start_time=_ns(step.time))
                self._open[step.session_id] = span
        attrs = {k: _scalar(v) for k, v in step.to_json().items() if k not in ("time",)}
        span.add_event(f"recovery.{step.step}", attrs, timestamp=_ns(step.time))
        if step.step == "completed" and step.status is not None and step.status not in _NOT_AN_END:
            span.set_attribute("recovery.status", step.status.value)
            if step.status in _FAILED:
                span.set_status(Status(StatusCode.ERROR, f"recovery {step.status.value}"))
            self.end(step.session_id, "recovered", None, step.time)

    def end(self, session_id: str, outcome: str, snap: SessionSnapshot | None = None,
            t: float | None = None) -> bool:
        with self._lock:
            span = self._open.pop(session_id, None)
        if span is None:
            return False
        if snap is not None:
            span.set_attributes({"final.state": snap.state.value, "final.reason": snap.reason.value})
        span.set_attribute("outcome", outcome)
        end = t if t is not None and t > 0 else self._clock()
        span.end(end_time=_ns(end))
        return True

    def end_missing(self, snapshots: Sequence[SessionSnapshot], t: float) -> int:
        """End spans of sessions no longer in the snapshot (they left without an end)."""
        if not self._open:  # the usual tick
            return 0
        present = {s.session_id for s in snapshots}
        gone = [sid for sid in list(self._open) if sid not in present]
        for sid in gone:
            self.end(sid, "gone", None, t)
        return len(gone)

    def end_all(self, outcome: str = "shutdown") -> None:
        for sid in list(self._open):
            self.end(sid, outcome)
