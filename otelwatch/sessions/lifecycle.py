"""What happens to one session on a tick after it is probed: its samples, verdict, reports and end.

`Lifecycle` takes one session's loop-side record (`sessions.Tracked`) through a
tick: the new sample joins its window (`add_sample`), `classify` gives it a
verdict (and with it `state_since`, the stall count, the longest silence, the
snapshot the outside sees and, on a change of state, a transition), a
stalled/stuck report when the backoff schedule says one is due, and its end (one
summary). `recovery_view` is what recovery judges of it; `record_step` keeps
recovery's steps on it.

Everything it causes outside the record goes through `Effects`: a few callables
the daemon wires to telemetry, subscribers, the probe, the sources, the session
table and recovery. So it is tested with built samples and no processes.

Must never read a clock (time comes in as `now`), touch /proc or a file, or send
anything itself; and it runs on the loop thread only, as the record it mutates is
the loop's.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from otelwatch.classify.backoff import fingerprint, next_report
from otelwatch.classify.rules import classify
from otelwatch.classify.window import SampleWindow, work_cpu_percent
from otelwatch.config import ClassifyConfig
from otelwatch.events.activity import Activity
from otelwatch.model import (
    PROBLEM_STATES,
    EscalationStep,
    EventKind,
    Reason,
    RecoveryStep,
    SampleStatus,
    SessionInfo,
    SessionSnapshot,
    SessionSpec,
    State,
    TreeSample,
)
from otelwatch.recovery.policy import SessionView
from otelwatch.sessions.report import build_report, session_summary
from otelwatch.sessions.table import Tracked, snapshot_of
from otelwatch.sessions.visibility import BLIND_TURNS

__all__ = ["INFER_TOOL_AGENTS", "LAST_REPORT_KEYS", "RECOVERIES_KEPT", "Effects", "Lifecycle", "add_sample",
           "infers_tools", "record_step", "recovery_view"]

# What SessionSnapshot.last_report keeps of a report: the evidence a person drills into.
LAST_REPORT_KEYS = ("event", "state", "reason", "summary", "root", "children", "connections",
                    "open_tools", "stderr_tail", "repeat")
RECOVERIES_KEPT = 50  # recovery steps listed per session


@dataclass(frozen=True)
class Effects:
    """What a session's lifecycle does beyond its own record, wired by the daemon.

    `transitioned` and `ended` (telemetry) and `emit` (subscribers) must not raise:
    the daemon counts and logs their failures. An exception from `reported`
    (telemetry's report) or the lookups fails this session's tick only, which the
    daemon counts as a classify error."""

    transitioned: Callable[[SessionSnapshot, State | None], None]  # after a change of state
    reported: Callable[[SessionSnapshot, Mapping[str, Any]], None]  # a stalled/stuck report
    ended: Callable[[SessionSnapshot, Mapping[str, Any]], None]  # the summary of an ended session
    emit: Callable[[Mapping[str, Any]], None]  # to subscribers: transitions, reports, summaries
    release: Callable[[Tracked], None]  # an ended session's hold on the table, probe, recovery, sources
    runtime_alive: Callable[[SessionSpec], bool | None]  # its tmux pane, asked afresh once it died
    wchan: Callable[[int], str | None]  # where a process waits in the kernel (for a report)
    stderr_tail: Callable[[SessionSpec], str]  # the last lines it wrote to stderr (for a report)


def add_sample(tracked: Tracked, sample: TreeSample, horizon: float) -> None:
    """Append this tick's sample and drop the oldest while the next one is older than
    `horizon` too: the window keeps one sample from before it (its start) and at least
    two in all. The first sample with a root binds the session's identity."""
    if tracked.identity is None and sample.root is not None:
        tracked.identity = sample.root
    tracked.samples.append(sample)
    while len(tracked.samples) > 2 and tracked.samples[1].time < horizon:
        tracked.samples.popleft()


# Agents whose records show a tool call only when it ends, or not at all (see tooltree.py).
INFER_TOOL_AGENTS = frozenset({"gemini", "aider", "opencode"})
# Claude Code's session-file statuses while it works in the background after its turn:
# Agent-tool subagents ("busy") and run_in_background shells ("shell").
_CLAUDE_BACKGROUND = frozenset({"busy", "shell"})


def infers_tools(tracked: Tracked) -> bool:
    """Whether a tool at work is looked for in this session's process tree."""
    claude = tracked.claude
    return tracked.spec.agent in INFER_TOOL_AGENTS or (claude is not None and claude.status in _CLAUDE_BACKGROUND)


def _turn_opened_since(activity: Activity, events_before: int | None) -> bool:
    """Whether a turn opened among the events that arrived since the count `events_before`
    (and is closed again: a turn still open keeps the session out of idle anyway)."""
    if events_before is None or activity.turn_open:
        return False
    new = activity.events - events_before
    if new <= 0:
        return False
    # A prompt (progress), not a turn reopened by a retry announcement or a status line.
    return any(e.turn == "open" and e.kind is EventKind.PROGRESS for e in activity.recent[-new:])


def recovery_view(tracked: Tracked, cfg: ClassifyConfig) -> SessionView | None:
    """What recovery judges of a live session with a usable sample; None for any other."""
    sample, verdict = tracked.latest, tracked.verdict
    if (tracked.ended_at is not None or sample is None or verdict is None or sample.root is None
            or sample.status is not SampleStatus.OK or not sample.processes):
        return None
    root = sample.processes[0]
    return SessionView(
        session_id=tracked.key, agent=tracked.spec.agent, identity=sample.root, pgid=root.pgid,
        uid=root.uid, cmdline=root.cmdline, verdict=verdict, sample=sample,
        events=tracked.activity.events, reacted=tracked.reacted(work_cpu_percent(cfg)),
        own_turn=tracked.own_turn(),
    )


def record_step(tracked: Tracked, step: RecoveryStep) -> None:
    """Keep a recovery step on its session (the last RECOVERIES_KEPT)."""
    tracked.recoveries.append(step)
    del tracked.recoveries[:-RECOVERIES_KEPT]
    if tracked.snapshot is not None:
        # Escalations finish on their own thread, often after the process was
        # already seen gone: the listing must still show the outcome.
        tracked.snapshot = replace(tracked.snapshot, recoveries=tuple(tracked.recoveries))


class Lifecycle:
    """Verdicts, reports and ends of the sessions of one loop. Holds each live
    session's incremental window aggregates (`classify.SampleWindow`)."""

    def __init__(self, cfg: ClassifyConfig, effects: Effects) -> None:
        self.cfg = cfg
        self.effects = effects
        # By the identity of the Tracked (which a re-key keeps); dropped when it ends.
        self._windows: dict[int, tuple[Tracked, SampleWindow]] = {}
        self._events_seen: dict[int, int] = {}  # its event count at the previous tick
        self._turned: set[int] = set()  # sessions that have opened a turn

    def classify(self, tracked: Tracked, now: float, watch_since: float) -> None:
        """This tick's verdict for a session, with what follows from it: a transition,
        a report when one is due, its end when it exited or was untracked."""
        old = tracked.verdict.state if tracked.verdict else None
        if tracked.ended_at is not None:
            return
        if tracked.untracked and (tracked.latest is None or tracked.latest.alive):
            # Its registration was removed while the process lives: tracking ends now
            # (summary line, series gone); it did not exit, so it is not listed as exited.
            self.end(tracked, now)
            tracked.dropped = True
            return
        latest = tracked.latest
        if latest is not None and not latest.alive:
            # Asked afresh when the process is found dead (the session ends on this tick): an
            # agent that took its pane and tmux server with it left no live runtime behind.
            fresh = self.effects.runtime_alive(tracked.spec)
            if fresh is not None:
                tracked.spec = replace(tracked.spec, runtime_alive=fresh)
        info = SessionInfo(
            mode=tracked.spec.mode,
            started_at=tracked.started_at,
            # a tailed file or the spool (exec wrapper, hooks), or events fed by the API
            has_event_source=tracked.spec.events_path is not None or tracked.activity.events > 0,
            runtime_alive=tracked.spec.runtime_alive,
            turns_visible=tracked.turns not in BLIND_TURNS,
            infer_tools=infers_tools(tracked),
            before_first_turn=self._before_first_turn(tracked),
        )
        held = self._windows.get(id(tracked))
        if held is None or held[0] is not tracked:
            held = self._windows[id(tracked)] = (tracked, SampleWindow())
        samples = tuple(tracked.samples)
        held[1].sync_for(self.cfg, samples)
        verdict = classify(self.cfg, info, samples, tracked.activity, now,
                           watch_since, previous=tracked.verdict, window=held[1])
        if verdict.state is State.EXITED and self._short_lived_helper(tracked, now):
            # A discovered process that lived less than startup_grace (a `claude` helper
            # run for a moment): never a session, so no summary and no exited row.
            tracked.ended_at = now
            self._windows.pop(id(tracked), None)
            self._events_seen.pop(id(tracked), None)
            self._turned.discard(id(tracked))
            self.effects.release(tracked)
            tracked.dropped = True
            return
        seen_events, self._events_seen[id(tracked)] = self._events_seen.get(id(tracked)), tracked.activity.events
        if old is not None and old is not State.ACTIVE and verdict.state is State.IDLE \
                and _turn_opened_since(tracked.activity, seen_events):
            # A turn that opened and closed between two ticks was work all the same: it
            # counts once as active (a transition, the state counter) before the idle.
            tracked.verdict = replace(verdict, state=State.ACTIVE, reason=Reason.RECENT_PROGRESS)
            tracked.state_since = now
            tracked.snapshot = snapshot_of(tracked, now)
            self.effects.transitioned(tracked.snapshot, old)
            self.effects.emit({"event": "session.state", "session_id": tracked.key, "agent": tracked.spec.agent,
                               "state": State.ACTIVE.value, "reason": Reason.RECENT_PROGRESS.value,
                               "previous": old.value, "detail": "a turn opened and closed within one tick"})
            old = State.ACTIVE
        tracked.verdict = verdict
        if verdict.state is not old:
            tracked.state_since = now
            if verdict.state in PROBLEM_STATES:
                tracked.stalls += 1
        if verdict.state is not State.EXITED:
            tracked.longest_silence = max(tracked.longest_silence, verdict.silence_s)
        tracked.snapshot = snapshot_of(tracked, now)
        if verdict.state is not old:
            # Before the report: entering stalled/stuck opens the incident span its events go on.
            self.effects.transitioned(tracked.snapshot, old)
            self.effects.emit({"event": "session.state", "session_id": tracked.key, "agent": tracked.spec.agent,
                               "state": verdict.state.value, "reason": verdict.reason.value,
                               "previous": None if old is None else old.value})
        self._maybe_report(tracked, now)
        if verdict.state is State.EXITED:
            self.end(tracked, now)

    def _short_lived_helper(self, tracked: Tracked, now: float) -> bool:
        old = tracked.verdict
        return (tracked.spec.source in ("process", "tmux") and tracked.identity is not None
                and (old is None or old.state is State.STARTING)
                and now - tracked.identity.create_time < self.cfg.startup_grace + 1.0)
    def _before_first_turn(self, tracked: Tracked) -> bool:
        """Whether no turn has opened yet in this session (remembered once one has)."""
        key = id(tracked)
        if key in self._turned:
            return False
        activity = tracked.activity
        if activity.turn_open or any(e.turn == "open" for e in activity.recent):
            self._turned.add(key)
            return False
        return True

    def _maybe_report(self, tracked: Tracked, now: float) -> None:
        verdict = tracked.verdict
        assert verdict is not None and tracked.snapshot is not None
        fp = fingerprint(verdict, tracked.activity, tracked.latest)
        schedule, due = next_report(tracked.schedule, fp, verdict.state, now, self.cfg)
        tracked.schedule = schedule
        if not due or schedule is None:
            return
        wchans = {p.pid: w for p in (tracked.latest.processes if tracked.latest else ())
                  if (w := self.effects.wchan(p.pid)) is not None}
        report = build_report(
            tracked.snapshot, tracked.latest, tracked.activity,
            repeat=schedule.reports - 1, next_in_s=schedule.next_due - now, wchans=wchans,
            stderr_tail=self.effects.stderr_tail(tracked.spec),
        )
        # Kept on the snapshot (and so in every later one) so /api/sessions and `otelwatch
        # top` show where each process waits without an HTTP handler touching /proc.
        tracked.snapshot = replace(tracked.snapshot, last_report={"time": now, **{
            k: report[k] for k in LAST_REPORT_KEYS if k in report}})
        self.effects.reported(tracked.snapshot, report)
        self.effects.emit(report)

    def end(self, tracked: Tracked, now: float) -> None:
        """A session ends: one summary line; it stays listed for exited_retention."""
        tracked.ended_at = now
        self._windows.pop(id(tracked), None)
        self._events_seen.pop(id(tracked), None)
        self._turned.discard(id(tracked))
        self.effects.release(tracked)
        snap = tracked.snapshot or snapshot_of(tracked, now)
        summary = session_summary(snap, ended_at=now, longest_silence_s=tracked.longest_silence,
                                  stalls=tracked.stalls,
                                  # requested, not completed: the completion of a recovery
                                  # that ended the session is recorded just after its end
                                  recoveries=sum(1 for r in tracked.recoveries
                                                 if r.step == EscalationStep.REQUESTED))
        self.effects.ended(snap, summary)
        self.effects.emit(summary)
