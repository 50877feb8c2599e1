"""The collector loop that wires the flow: sources -> probe -> classify -> act -> export.

`Watcher` is both the daemon's engine and the public Python API for host
applications that spawn agents themselves: `track()` a PID, `feed()` it event
lines, read `sessions()`, `subscribe()` to reports. Only the loop thread mutates
session state; other threads (HTTP, API callers) hand events over through a
queue, so one tick sees one consistent world.

The loop never dies of one session: every per-session step is guarded, and an
error becomes a counted, logged probe error for that session only.
"""

from __future__ import annotations

import contextlib
import fcntl
import math
import os
import signal
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from otelwatch.backends import probe_backend
from otelwatch.classify import ReportSchedule, classify, fingerprint, is_late_tick, next_report
from otelwatch.config import Config, Paths, default_paths
from otelwatch.events import fold, parse_line
from otelwatch.hooks import payload_to_event
from otelwatch.model import (
    Activity,
    Event,
    EventKind,
    Mode,
    ProcessIdentity,
    Reason,
    RecoveryStep,
    Runtime,
    SampleStatus,
    SessionInfo,
    SessionSnapshot,
    SessionSpec,
    State,
    TreeSample,
    Verdict,
)
from otelwatch.probe import same_process
from otelwatch.proctable import ProcessTable
from otelwatch.recovery import Recovery, SessionView
from otelwatch.report import build_report, children_detail, session_summary
from otelwatch.sessions import AliasMap, EndedRegistrations
from otelwatch.sources.spool import PRUNE_EVERY_S, RETENTION_S, remove_older_than
from otelwatch.sources.tail import FileTail, open_regular
from otelwatch.sources.tmux import PaneInfo
from otelwatch.sources.transcripts import ClaudeSession, fold_transcript, status_events
from otelwatch.sources.trust import untrusted_dir

# Lower wins when two sources describe the same process: an explicit registration
# (exec wrapper, registry file, API) names the session better than discovery.
SOURCE_PRIORITY = {"exec": 0, "registry": 0, "api": 0, "hook": 1, "tmux": 2, "process": 3}
PENDING_EVENTS_MAX_SESSIONS = 1000
PENDING_EVENTS_PER_SESSION = 50
# The inbox between API/HTTP threads and the loop is bounded, and so is the work one tick
# takes from it (the rest waits for the next tick). POST /api/events is refused (429) well
# before feed()/add_event() drop anything, so a flood on the listener cannot crowd out the
# Python API's events.
INBOX_MAX = 50_000
INBOX_MAX_HTTP = 20_000
INBOX_DRAIN_PER_TICK = 10_000
TRANSCRIPT_RETRY_S = 10.0  # looking again for a transcript no session file names
# Sessions whose own transcript is their event stream: found by name, or known from hooks.
_TRANSCRIPT_SOURCES = frozenset({"process", "tmux", "hook"})
# What SessionSnapshot.last_report keeps of a report: the evidence a person drills into.
_LAST_REPORT_KEYS = ("event", "state", "reason", "summary", "root", "children", "connections",
                     "open_tools", "stderr_tail", "repeat")

Subscriber = Callable[[Mapping[str, Any]], None]


@dataclass
class _Tracked:
    """Everything the loop knows about one session. Mutated only by the loop thread."""

    key: str
    spec: SessionSpec
    started_at: float
    identity: ProcessIdentity | None = None
    samples: deque[TreeSample] = field(default_factory=deque)
    activity: Activity = field(default_factory=Activity)
    tail: FileTail | None = None
    verdict: Verdict | None = None
    state_since: float = 0.0
    schedule: ReportSchedule | None = None
    stalls: int = 0
    longest_silence: float = 0.0
    recoveries: list[RecoveryStep] = field(default_factory=list)
    ended_at: float | None = None
    snapshot: SessionSnapshot | None = None
    transcript_checked_at: float = 0.0
    # Claude Code's session file for this process, as read this tick and the tick before:
    # the CLI's own word on its turn (idle, busy, waiting on its user) and its transcript.
    claude: ClaudeSession | None = None
    claude_before: ClaudeSession | None = None
    # turn_opened_at of the turn after which the session's own processes (or its own
    # output) showed work: until then a turn-based session is not recoverable, since
    # an event alone (a forged or stray turn start) must never open the recovery gate.
    reacted_turn: float | None = None
    untracked: bool = False  # its registration was removed: ends once the process is gone or at once
    dropped: bool = False  # no longer listed at all (untracked while alive)

    @property
    def latest(self) -> TreeSample | None:
        return self.samples[-1] if self.samples else None



class Watcher:
    """One host's collector loop. Construct, then `start()` (background thread) or call
    `tick()` yourself; `stop()` is idempotent."""

    def __init__(
        self,
        cfg: Config | None = None,
        *,
        paths: Paths | None = None,
        telemetry: Any | None = None,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        boottime: Callable[[], float] | None = None,
        proc_root: str = "/proc",
        environ: Mapping[str, str] | None = None,
        log_stream: Any | None = None,
    ) -> None:
        self.cfg = cfg or Config()
        self.paths = paths or default_paths(self.cfg, environ)
        self._clock = clock
        self._monotonic = monotonic
        # Lag detection needs a clock that keeps counting while the host is suspended;
        # CLOCK_MONOTONIC stops then, CLOCK_BOOTTIME does not.
        self._boottime = boottime or _boottime_clock(monotonic)
        self._proc_root = proc_root
        # [probe] backend: /proc + netlink (Linux) or psutil (portable); same samples either way.
        self._reader, self._prober = probe_backend(self.cfg.probe.backend, proc_root, clock=clock)
        if telemetry is None:
            from otelwatch.telemetry import Telemetry

            telemetry = Telemetry(self.cfg, environ=environ, log_stream=log_stream)
        self.telemetry = telemetry
        # One boot time for every identity the daemon compares (see ProcessTableReader).
        self.recovery = Recovery(self.cfg, self.paths.recovery_state, clock=clock, proc_root=proc_root,
                                 boot_time=self._reader.boot_time)
        self._sources = _Sources(self.cfg, self.paths, self.telemetry)

        self._tracked: dict[str, _Tracked] = {}
        self._aliases = AliasMap()  # other ids of a session (transcript uuid, hook id) -> key
        self._ended_registrations = EndedRegistrations()
        self._explicit: dict[str, SessionSpec] = {}  # track() calls from the Python API
        self._inbox: deque[tuple[str, Event | bytes, int | None, bool]] = deque()
        self._pending: dict[str, deque[Event]] = {}
        self._subscribers: list[Subscriber] = []
        self._snapshots: tuple[SessionSnapshot, ...] = ()
        self._snap_lock = threading.Lock()

        self._watch_since = clock()
        self._last_tick_mono: float | None = None
        self._last_tick_boot: float | None = None
        self._last_tick_wall: float | None = None
        self._ticks = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._stopped = False

    # ------------------------------------------------------------------ public API

    def track(self, pid: int, session_id: str | None = None, *, agent: str = "unknown",
              mode: Mode | str = Mode.HEADLESS, events_path: str | os.PathLike[str] | None = None,
              labels: Mapping[str, str] | None = None) -> str:
        """Watch process `pid` as a session; returns its session id. Thread-safe."""
        sid = session_id or f"{agent}-{pid}-{uuid.uuid4().hex[:8]}"
        self._explicit[sid] = SessionSpec(
            session_id=sid, pid=pid, agent=agent, source="api", mode=Mode(mode),
            events_path=os.fspath(events_path) if events_path else None, labels=dict(labels or {}),
        )
        return sid

    def untrack(self, session_id: str) -> None:
        self._explicit.pop(session_id, None)

    def feed(self, session_id: str, line: bytes | str, *, json_only: bool = True) -> None:
        """Hand one event line (stream-json, a transcript line, any JSON) to a session.

        A line that is not JSON is counted as malformed and skipped; pass
        json_only=False for agents whose output is plain text (every line is then
        progress). Thread-safe; the line is parsed on the next tick. With INBOX_MAX
        items already queued (the loop is not ticking or far behind) the line is
        dropped and counted (otelwatch.probe.errors, kind "inbox")."""
        if len(self._inbox) >= INBOX_MAX:
            self._probe_problem("inbox", timeout=False)
            return
        raw = line.encode() if isinstance(line, str) else line
        self._inbox.append((session_id, raw, None, json_only))

    def add_event(self, session_id: str, event: Event, pid: int | None = None) -> None:
        if len(self._inbox) >= INBOX_MAX:  # as feed(): dropped and counted
            self._probe_problem("inbox", timeout=False)
            return
        self._inbox.append((session_id, event, pid, True))

    def post_event(self, payload: Any) -> list[str]:
        """Hook payloads or `{"session_id", "type", "tool"}` objects from POST /api/events:
        one object or a list of them, queued all or none. Returns their session ids.

        Raises ValueError naming what is wrong (and which item of a list), and
        queue.Full, counted as probe error kind "inbox", when queuing them would take
        the inbox past INBOX_MAX_HTTP."""
        from queue import Full

        items = payload if isinstance(payload, list) else [payload]
        if len(self._inbox) + len(items) > INBOX_MAX_HTTP:
            self._probe_problem("inbox", timeout=False)
            raise Full(f"the event inbox is full ({INBOX_MAX_HTTP} events queued); retry after the next tick")
        now = self._clock()
        queued: list[tuple[str, Event, int | None, bool]] = []
        for n, item in enumerate(items):
            where = f"event {n}: " if isinstance(payload, list) else ""
            if not isinstance(item, dict):
                raise ValueError(f"{where}each event must be a JSON object")
            session_id = item.get("session_id")
            if not isinstance(session_id, str) or not session_id:
                raise ValueError(f"{where}event needs a non-empty string 'session_id'")
            try:
                # Dated when received, never by the payload: a backdated event could make a
                # session look silent for longer than it is, or date a turn before the work
                # that the recovery gate takes as the session's reaction to it.
                event = replace(payload_to_event(item, now, "http"), time=now)
            except ValueError as exc:
                raise ValueError(f"{where}{exc}") from None
            pid = item.get("pid")
            ok_pid = isinstance(pid, int) and not isinstance(pid, bool) and pid > 0
            queued.append((session_id, event, pid if ok_pid else None, True))
        self._inbox.extend(queued)
        return [item[0] for item in queued]

    def subscribe(self, callback: Subscriber) -> None:
        """`callback(report)` for every stalled/stuck report, recovery step, state change and
        session end, called on the loop thread. Exceptions are logged, never raised."""
        self._subscribers.append(callback)

    def sessions(self) -> list[SessionSnapshot]:
        with self._snap_lock:
            return list(self._snapshots)

    def session(self, session_id: str) -> SessionSnapshot | None:
        key = self._aliases.resolve(session_id)
        for snap in self.sessions():
            if snap.session_id in (session_id, key):
                return snap
        return None

    def health(self) -> dict[str, Any]:
        now = self._monotonic()
        age = None if self._last_tick_mono is None else now - self._last_tick_mono
        # 503 once the loop has not ticked for 3 intervals (DESIGN.md, Interfaces).
        ok = age is not None and age <= 3 * self.cfg.interval and not self._stopped
        return {"ok": ok, "ticks": self._ticks, "last_tick_age_s": None if age is None else round(age, 3),
                "sessions": len(self._snapshots)}

    def start(self) -> Watcher:
        if self._thread is None:
            self._sources.check()
            self._thread = threading.Thread(target=self._run, name="otelwatch-loop", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 2.0) -> None:
        """Stop the loop and release everything; safe to call twice."""
        if self._stopped:
            return
        self._stopped = True
        deadline = time.monotonic() + timeout
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(max(0.0, deadline - time.monotonic()))
        for part in (self._prober, self.recovery, self.telemetry):
            with contextlib.suppress(Exception):
                part.shutdown(max(0.1, deadline - time.monotonic()))
        self._sources.close()

    shutdown = stop

    # ------------------------------------------------------------------ the loop

    def _run(self) -> None:
        interval = self.cfg.interval
        next_at = self._monotonic()
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception as exc:  # the loop must survive anything one tick throws
                self._log("tick.error", {"error": repr(exc)}, "error")
            next_at += interval
            now = self._monotonic()
            if next_at < now:  # overran: skip missed slots rather than tick back to back
                next_at = now + interval - ((now - next_at) % interval)
            self._stop.wait(max(0.0, next_at - now))

    def tick(self) -> list[SessionSnapshot]:
        """One collector tick; returns the sessions as classified. Call from one thread only."""
        t0 = self._monotonic()
        boot = self._boottime()
        now = self._clock()
        if self._last_tick_boot is not None and is_late_tick(
            self._last_tick_boot + self.cfg.interval, boot, self.cfg.interval
        ):
            # The watchdog's own lag is not the agent's silence: windows start again.
            self._watch_since = now
            self.recovery.restart_windows(now)
            self._log("tick.late", {"late_by_s": round(boot - self._last_tick_boot - self.cfg.interval, 3)},
                      "warning")
        table = self._reader.read()

        self._refresh_sources(table, now)
        self._drain_inbox(now)
        self._poll_tails(now)
        self._sample(table, now)
        for tracked in list(self._tracked.values()):
            try:
                self._classify(tracked, now)
            except Exception as exc:
                self._probe_problem("classify", timeout=False)
                self._log("session.error", {"session_id": tracked.key, "error": repr(exc)}, "error")
        self._act(now)
        self._publish(now)
        self._ticks += 1
        self._last_tick_boot = boot
        self._last_tick_mono = self._monotonic()
        self._last_tick_wall = now
        with contextlib.suppress(Exception):
            self.telemetry.on_tick(self._last_tick_mono - t0)
        return self.sessions()

    # ------------------------------------------------------------------ sources

    def _refresh_sources(self, table: ProcessTable, now: float) -> None:
        specs, spool_events = self._sources.scan(table, now, self._agent_pids())
        specs.extend(self._explicit.values())
        seen_registered: set[str] = set()
        for spec in sorted(specs, key=lambda s: SOURCE_PRIORITY.get(s.source, 9)):
            if spec.source in ("registry", "exec", "api"):
                seen_registered.add(spec.session_id)
            self._merge_spec(spec, table, now)
        for sid, events in spool_events.items():
            for event in events:
                self._deliver(sid, event, None)
        # A removed registration ends tracking (DESIGN: "Removing the file ends tracking"),
        # judged only on a registry scan that worked: a failed read is not a removal.
        for tracked in self._tracked.values():
            source = tracked.spec.source
            judged = source == "api" or (source in ("registry", "exec") and self._sources.registry_ok)
            if judged and tracked.key not in seen_registered and tracked.ended_at is None:
                tracked.untracked = True
        # The runtime axis, re-checked every tick (not remembered): each agent names the tmux
        # pane it runs in (or ran in, while the pane outlives it); one no scan finds any more
        # is unknown again, and asked afresh if its agent dies (see _classify).
        panes = self._sources.panes  # None: tmux off, or its scan failed this tick
        for tracked in self._tracked.values() if panes is not None else ():
            spec = tracked.spec
            if tracked.ended_at is not None or spec.pid is None:
                continue
            pane = panes.get(spec.pid)  # type: ignore[union-attr]
            if pane is not None:
                runtime = Runtime("tmux", pane.target)
                if spec.runtime != runtime or spec.runtime_alive is not True:
                    tracked.spec = replace(spec, runtime=runtime, runtime_alive=True)
            elif spec.runtime_alive is True:
                tracked.spec = replace(spec, runtime_alive=None)
        self._match_transcripts(table, now)

    def _agent_pids(self) -> set[int]:
        return {t.spec.pid for t in self._tracked.values() if t.spec.pid is not None and t.ended_at is None}

    def _merge_spec(self, spec: SessionSpec, table: ProcessTable, now: float) -> None:
        tracked = self._tracked.get(spec.session_id)
        if tracked is None:
            key = self._aliases.get(spec.session_id)
            aliased = self._tracked.get(key) if key is not None else None
            # An alias only joins descriptions of the same process. One naming another
            # pid is stale or forged: it must never end or re-key the session it points at.
            if aliased is not None and (spec.pid is None or spec.pid == aliased.spec.pid):
                tracked = aliased
            elif aliased is not None:
                self._aliases.discard(spec.session_id)
        if tracked is not None and _replaces_process(spec, tracked.spec) and tracked.key == spec.session_id:
            # Re-registered under the same id with another process (an orchestrator
            # restarted its agent): the old one ends here, the new one starts clean,
            # never inheriting the old history (or its recovery window).
            if tracked.ended_at is None:
                self._end(tracked, now)
            self._forget(tracked.key)
            tracked = None
        if tracked is not None:
            if tracked.ended_at is None or spec.pid == tracked.spec.pid:
                stronger = SOURCE_PRIORITY.get(spec.source, 9) <= SOURCE_PRIORITY.get(tracked.spec.source, 9)
                tracked.spec = _merged(spec, tracked.spec) if stronger else _merged(tracked.spec, spec)
                tracked.untracked = False
            return
        if spec.pid is not None:
            for other in self._tracked.values():
                if other.spec.pid == spec.pid and other.ended_at is None and _may_be_same_process(other, spec):
                    if SOURCE_PRIORITY.get(spec.source, 9) < SOURCE_PRIORITY.get(other.spec.source, 9):
                        self._rekey(other, spec)
                    else:
                        self._aliases.add(spec.session_id, other.key)
                        other.spec = _merged(other.spec, spec)
                    return
        if spec.pid is None:
            return  # nothing to probe yet; its events wait in _pending
        if self._ended_registrations.ended(spec.session_id, spec.pid, spec.registered_at):
            return  # a registration whose process is gone stays ended (no summary every retention)
        tracked = _Tracked(key=spec.session_id, spec=spec, started_at=now, state_since=now)
        identity, reused = _bind_identity(spec, table)
        tracked.identity = identity
        self._tracked[tracked.key] = tracked
        if reused:
            # The registered process is gone and its PID belongs to a process started
            # after the registration was written: never adopt it, never signal it.
            self._log("session.pid_reused", {"session_id": spec.session_id, "pid": spec.pid,
                                             "registered_at": spec.registered_at}, "warning")
            tracked.verdict = Verdict(State.EXITED, Reason.PROCESS_EXITED, 0.0,
                                      {"detail": f"pid {spec.pid} was reused after the registration was written"})
            tracked.snapshot = self._snapshot(tracked, now)
            self._end(tracked, now)
            return
        for event in self._pending.pop(spec.session_id, ()):
            tracked.activity = tracked.activity.apply(event)

    def _rekey(self, tracked: _Tracked, spec: SessionSpec) -> None:
        """A stronger source named a session we had discovered: take its id, keep its history."""
        old_key = tracked.key
        del self._tracked[old_key]
        tracked.key = spec.session_id
        tracked.spec = _merged(spec, tracked.spec)
        self._tracked[tracked.key] = tracked
        self._aliases.rekey(old_key, tracked.key)
        self._prober.forget(old_key)

    def _match_transcripts(self, table: ProcessTable, now: float) -> None:
        locator = self._sources.transcripts
        if locator is None:
            return
        for tracked in list(self._tracked.values()):
            spec = tracked.spec
            # Sessions with no stream of their own: found by name, or known from hooks, which
            # miss what only the transcript and the CLI's session file say (interrupts,
            # /clear, tool results, retries, a permission prompt answered).
            if tracked.ended_at is not None or spec.pid is None or spec.source not in _TRANSCRIPT_SOURCES:
                continue
            try:
                session = locator.claude_session(spec.pid) if spec.agent.startswith("claude") else None
            except Exception as exc:
                self._log("transcript.error", {"session_id": tracked.key, "error": repr(exc)}, "warning")
                session = None
            tracked.claude_before, tracked.claude = tracked.claude, session
            if session is not None and session.current:
                pass  # the CLI names its transcript now (and after /clear): followed every tick, cheaply
            elif spec.events_path or now - tracked.transcript_checked_at < TRANSCRIPT_RETRY_S:
                continue
            tracked.transcript_checked_at = now
            known_cwd = session is not None and session.current and session.cwd
            cwd = None if known_cwd else self._prober.cwd(spec.pid)  # None where unknown (gone, no /proc)
            try:
                found = locator.find(spec.agent, spec.pid, cwd, tracked.started_at)
            except Exception as exc:
                self._log("transcript.error", {"session_id": tracked.key, "error": repr(exc)}, "warning")
                continue
            if found is None or spec.events_path == str(found[1]):
                continue
            transcript_id, path = found
            tracked.spec = replace(spec, events_path=str(path))
            self._aliases.add(transcript_id, tracked.key)
            for event in self._pending.pop(transcript_id, ()):
                tracked.activity = tracked.activity.apply(event)

    # ------------------------------------------------------------------ events

    def _drain_inbox(self, now: float) -> None:
        # At most INBOX_DRAIN_PER_TICK: a flood waits for the next ticks instead of
        # stretching this one (events from POST carry their own arrival time).
        for _ in range(min(len(self._inbox), INBOX_DRAIN_PER_TICK)):
            sid, item, pid, json_only = self._inbox.popleft()
            if isinstance(item, Event):
                self._deliver(sid, item, pid)
                continue
            event = parse_line(item, now, "api", json_only=json_only)
            key = self._aliases.resolve(sid)
            if event is None:
                tracked = self._tracked.get(key)
                if tracked is not None:
                    tracked.activity = tracked.activity.count_malformed()
                continue
            self._deliver(sid, event, pid)

    def _deliver(self, session_id: str, event: Event, pid: int | None) -> None:
        key = self._aliases.resolve(session_id)
        tracked = self._tracked.get(key)
        if tracked is None and pid is not None:
            tracked = next((t for t in self._tracked.values() if t.spec.pid == pid and t.ended_at is None), None)
            if tracked is not None:
                self._aliases.add(session_id, tracked.key)
        if tracked is None:
            # Not known yet (e.g. a hook fired before discovery matched its transcript):
            # keep a few, bounded, for when the session appears.
            if session_id not in self._pending and len(self._pending) >= PENDING_EVENTS_MAX_SESSIONS:
                self._pending.pop(next(iter(self._pending)))
            self._pending.setdefault(session_id, deque(maxlen=PENDING_EVENTS_PER_SESSION)).append(event)
            return
        tracked.activity = tracked.activity.apply(event)

    def _poll_tails(self, now: float) -> None:
        spool = str(self.paths.spool_dir) + os.sep
        for tracked in self._tracked.values():
            path = tracked.spec.events_path
            if path and path.startswith(spool):
                # The exec wrapper and hooks write to the spool, which the spool source
                # already reads; tailing it again would count every event twice.
                continue
            if path and (tracked.tail is None or str(tracked.tail.path) != path):
                if tracked.tail is not None:
                    tracked.tail.close()  # the agent moved on to a new transcript (/clear, /resume)
                source = "transcript" if tracked.spec.source in _TRANSCRIPT_SOURCES else "stream"
                tracked.tail = FileTail(path, source=source)
            if tracked.ended_at is not None:
                continue
            if tracked.tail is not None:
                try:
                    events, malformed = tracked.tail.poll(now)
                except Exception as exc:
                    self._probe_problem("events", timeout=False)
                    self._log("events.error", {"session_id": tracked.key, "error": repr(exc)}, "warning")
                    events, malformed = [], 0
                transcript = tracked.tail.source == "transcript"
                activity = fold_transcript(tracked.activity, events) if transcript else fold(tracked.activity, events)
                tracked.activity = activity.count_malformed(malformed) if malformed else activity
            if tracked.claude is not None:
                # After the transcript: the CLI's own word on its turn, which nothing else
                # gives for Esc or for a permission prompt answered.
                for event in status_events(tracked.claude, tracked.claude_before, tracked.activity, now):
                    tracked.activity = tracked.activity.apply(event)

    # ------------------------------------------------------------------ probe

    def _sample(self, table: ProcessTable, now: float) -> None:
        targets: dict[str, ProcessIdentity | int] = {}
        for tracked in self._tracked.values():
            if tracked.ended_at is None and tracked.spec.pid is not None:
                targets[tracked.key] = tracked.identity or tracked.spec.pid
        if not targets:
            return
        samples = self._prober.sample(table, targets, self.cfg.probe_timeout)
        for kind, what in self._prober.take_problems():
            self._probe_problem(kind, timeout=(what == "timeout"))
        horizon = now - (self.cfg.classify.stall_after + 3 * self.cfg.interval)
        for key, sample in samples.items():
            found = self._tracked.get(key)
            if found is None:
                continue
            tracked = found
            if tracked.identity is None and sample.root is not None:
                tracked.identity = sample.root
            tracked.samples.append(sample)
            while len(tracked.samples) > 2 and tracked.samples[1].time < horizon:
                tracked.samples.popleft()

    # ------------------------------------------------------------------ classify

    def _classify(self, tracked: _Tracked, now: float) -> None:
        old = tracked.verdict.state if tracked.verdict else None
        if tracked.ended_at is not None:
            return
        if tracked.untracked and (tracked.latest is None or tracked.latest.alive):
            # Its registration was removed while the process lives: tracking ends now
            # (summary line, series gone); it did not exit, so it is not listed as exited.
            self._end(tracked, now)
            tracked.dropped = True
            return
        latest = tracked.latest
        if latest is not None and not latest.alive:
            # Asked afresh when the process is found dead (the session ends on this tick): an
            # agent that took its pane and tmux server with it left no live runtime behind.
            fresh = self._sources.runtime_target_alive(tracked.spec)
            if fresh is not None:
                tracked.spec = replace(tracked.spec, runtime_alive=fresh)
        info = SessionInfo(
            mode=tracked.spec.mode,
            started_at=tracked.started_at,
            # a tailed file or the spool (exec wrapper, hooks), or events fed by the API
            has_event_source=tracked.spec.events_path is not None or tracked.activity.events > 0,
            runtime_alive=tracked.spec.runtime_alive,
        )
        verdict = classify(self.cfg.classify, info, tuple(tracked.samples), tracked.activity, now,
                           self._watch_since, previous=tracked.verdict)
        tracked.verdict = verdict
        if verdict.state is not old:
            tracked.state_since = now
            if verdict.state in (State.STALLED, State.STUCK):
                tracked.stalls += 1
        if verdict.state is not State.EXITED:
            tracked.longest_silence = max(tracked.longest_silence, verdict.silence_s)
        tracked.snapshot = self._snapshot(tracked, now)
        if verdict.state is not old:
            # Before the report: entering stalled/stuck opens the incident span its events go on.
            with contextlib.suppress(Exception):
                self.telemetry.on_transition(tracked.snapshot, old)
            self._emit({"event": "session.state", "session_id": tracked.key, "agent": tracked.spec.agent,
                        "state": verdict.state.value, "reason": verdict.reason.value,
                        "previous": None if old is None else old.value})
        self._maybe_report(tracked, now)
        if verdict.state is State.EXITED:
            self._end(tracked, now)

    def _maybe_report(self, tracked: _Tracked, now: float) -> None:
        verdict = tracked.verdict
        assert verdict is not None and tracked.snapshot is not None
        fp = fingerprint(verdict, tracked.activity, tracked.latest)
        schedule, due = next_report(tracked.schedule, fp, verdict.state, now, self.cfg.classify)
        tracked.schedule = schedule
        if not due or schedule is None:
            return
        wchans = {p.pid: w for p in (tracked.latest.processes if tracked.latest else ())
                  if (w := self._prober.wchan(p.pid)) is not None}
        report = build_report(
            tracked.snapshot, tracked.latest, tracked.activity,
            repeat=schedule.reports - 1, next_in_s=schedule.next_due - now, wchans=wchans,
            stderr_tail=_read_tail(tracked.spec.stderr_path),
        )
        # Kept on the snapshot (and carried by _snapshot) so /api/sessions and `otelwatch top`
        # show where each process waits without an HTTP handler touching /proc.
        tracked.snapshot = replace(tracked.snapshot, last_report={"time": now, **{
            k: report[k] for k in _LAST_REPORT_KEYS if k in report}})
        self.telemetry.on_report(tracked.snapshot, report)
        self._emit(report)

    def _end(self, tracked: _Tracked, now: float) -> None:
        """A session ends: one summary line; it stays listed for exited_retention."""
        tracked.ended_at = now
        if tracked.spec.source in ("registry", "hook"):
            spec = tracked.spec
            self._ended_registrations.add(spec.session_id, spec.pid, spec.registered_at)
        self._prober.forget(tracked.key)
        self.recovery.session_ended(tracked.key)
        if self._sources.transcripts is not None and tracked.spec.pid is not None:
            with contextlib.suppress(Exception):
                self._sources.transcripts.release(tracked.spec.pid)
        snap = tracked.snapshot or self._snapshot(tracked, now)
        summary = session_summary(snap, ended_at=now, longest_silence_s=tracked.longest_silence,
                                  stalls=tracked.stalls,
                                  # requested, not completed: the completion of a recovery
                                  # that ended the session is recorded just after its end
                                  recoveries=sum(1 for r in tracked.recoveries if r.step == "requested"))
        with contextlib.suppress(Exception):
            self.telemetry.on_session_end(snap, summary)
        self._emit(summary)

    # ------------------------------------------------------------------ act

    def _act(self, now: float) -> None:
        # Recovery off (the default): no views to build; steps can still be drained (none).
        for tracked in self._tracked.values() if self.cfg.recovery.enabled else ():
            sample, verdict = tracked.latest, tracked.verdict
            if (tracked.ended_at is not None or sample is None or verdict is None or sample.root is None
                    or sample.status is not SampleStatus.OK or not sample.processes):
                continue
            root = sample.processes[0]
            view = SessionView(
                session_id=tracked.key, agent=tracked.spec.agent, identity=sample.root, pgid=root.pgid,
                uid=root.uid, cmdline=root.cmdline, verdict=verdict, sample=sample,
                events=tracked.activity.events, reacted=self._reacted(tracked),
            )
            try:
                self.recovery.observe(view, now)
            except Exception as exc:
                self._log("recovery.error", {"session_id": tracked.key, "error": repr(exc)}, "error")
        for step in self.recovery.drain():
            key = self._aliases.resolve(step.session_id)
            owner = self._tracked.get(key)
            if owner is not None:
                owner.recoveries.append(step)
                del owner.recoveries[:-50]
                if owner.snapshot is not None:
                    # Escalations finish on their own thread, often after the process
                    # was already seen gone: the listing must still show the outcome.
                    owner.snapshot = replace(owner.snapshot, recoveries=tuple(owner.recoveries))
            with contextlib.suppress(Exception):
                self.telemetry.on_recovery_step(step)
            self._emit({"event": f"recovery.{step.step}", **step.to_json()})

    def _reacted(self, tracked: _Tracked) -> bool:
        """Whether a turn-based session's own processes showed work since its turn opened.

        A headless session processes from start to exit; no event moves it into
        processing, so there is nothing to prove. A turn-based one is processing only
        because a turn-opening event arrived: it is recoverable only once its processes
        (CPU, TCP, a new child) or its own output (a progress event that is not a turn
        start and did not come over HTTP) reacted after that."""
        if tracked.spec.mode is not Mode.INTERACTIVE:
            return True
        activity = tracked.activity
        opened = activity.turn_opened_at
        if not activity.turn_open or opened is None:
            return False
        if tracked.reacted_turn != opened and reaction_seen(
                tracked.samples, activity, opened, self.cfg.classify.cpu_idle_percent):
            tracked.reacted_turn = opened
        return tracked.reacted_turn == opened

    # ------------------------------------------------------------------ export

    def _snapshot(self, tracked: _Tracked, now: float) -> SessionSnapshot:
        sample = tracked.latest
        verdict = tracked.verdict
        activity = tracked.activity
        last_event = activity.last_event_time
        live = sample is not None and sample.alive
        return SessionSnapshot(
            session_id=tracked.key,
            agent=tracked.spec.agent,
            pid=tracked.spec.pid,
            state=verdict.state if verdict else State.STARTING,
            reason=verdict.reason if verdict else Reason.STARTUP_GRACE,
            state_since=tracked.state_since,
            last_event_time=last_event,
            last_event_age_s=None if last_event is None else max(0.0, now - last_event),
            silence_s=verdict.silence_s if verdict else 0.0,
            cpu_percent=sample.cpu_percent if live and sample else None,
            rss_bytes=sample.rss_bytes if live and sample else 0,
            open_fds=sample.num_fds if live and sample else None,
            threads=sample.threads if live and sample else 0,
            tcp=dict(sample.tcp or {}) if live and sample else {},
            mode=tracked.spec.mode,
            source=tracked.spec.source,
            create_time=tracked.identity.create_time if tracked.identity else None,
            started_at=tracked.started_at,
            events=activity.events,
            malformed=activity.malformed,
            labels=tracked.spec.labels,
            runtime=tracked.spec.runtime,
            children=tuple(children_detail(sample)) if live else (),
            recent_events=activity.recent,
            recoveries=tuple(tracked.recoveries),
            evidence=verdict.evidence if verdict else {},
            sample_status=sample.status if sample else SampleStatus.OK,
            last_report=tracked.snapshot.last_report if tracked.snapshot else None,
        )

    def _publish(self, now: float) -> None:
        retention = self.cfg.classify.exited_retention
        gone = [k for k, t in self._tracked.items()
                if t.dropped or (t.ended_at is not None and now - t.ended_at >= retention)]
        for key in gone:
            self._forget(key)
        snapshots = tuple(t.snapshot for t in self._tracked.values() if t.snapshot is not None)
        with self._snap_lock:
            self._snapshots = snapshots
        try:
            self.telemetry.update(snapshots)
        except Exception as exc:
            self._log("telemetry.error", {"error": repr(exc)}, "error")

    def _forget(self, key: str) -> None:
        tracked = self._tracked.pop(key, None)
        if tracked is not None and tracked.tail is not None:
            tracked.tail.close()
        self._aliases.forget(key)

    def _emit(self, report: Mapping[str, Any]) -> None:
        for callback in list(self._subscribers):
            try:
                callback(report)
            except Exception as exc:
                self._log("subscriber.error", {"error": repr(exc)}, "error")

    def _probe_problem(self, kind: str, *, timeout: bool) -> None:
        with contextlib.suppress(Exception):
            self.telemetry.on_probe_problem(kind, timeout)

    def _log(self, event: str, fields: Mapping[str, Any], level: str = "info") -> None:
        try:
            self.telemetry.log(event, fields, level)
        except Exception:  # logging must never take the loop down
            print(f"otelwatch: {event} {dict(fields)}", file=sys.stderr)


def _boottime_clock(fallback: Callable[[], float]) -> Callable[[], float]:
    clock_id = getattr(time, "CLOCK_BOOTTIME", None)
    if clock_id is None and sys.platform == "darwin":  # pragma: no cover - untested on macOS
        # There CLOCK_MONOTONIC counts sleep; time.monotonic (mach_absolute_time) does not.
        clock_id = getattr(time, "CLOCK_MONOTONIC", None)
    if clock_id is None:  # pragma: no cover - neither Linux nor macOS
        return fallback
    return lambda: time.clock_gettime(clock_id)


def _replaces_process(spec: SessionSpec, current: SessionSpec) -> bool:
    """An explicit registration (registry, exec, API) naming another pid for the same id."""
    return (spec.source in ("registry", "exec", "api") and spec.pid is not None
            and current.pid is not None and spec.pid != current.pid)


# create_time read from /proc is boot time (whole seconds) + start ticks, so it may be
# up to a second off a wall-clock file time; a little margin on top.
REGISTRATION_SKEW_S = 1.5


def _bind_identity(spec: SessionSpec, table: ProcessTable) -> tuple[ProcessIdentity | None, bool]:
    """The process a new session's pid names: (identity or None when not known yet, reused).

    A source that knows create_time names the process exactly. Otherwise the pid is
    bound to the process that holds it now only if that process already existed when
    the registration was written (`registered_at`); a process started later merely
    reuses the PID (`reused` is True): it is never this session and never signalled
    on its behalf.
    """
    assert spec.pid is not None
    if spec.create_time is not None:
        return ProcessIdentity(spec.pid, spec.create_time), False
    info = table.get(spec.pid)
    if info is None:
        return None, False  # gone already: the probe will say vanished
    if spec.registered_at is not None and info.create_time > spec.registered_at + REGISTRATION_SKEW_S:
        return None, True
    return info.identity, False


def reaction_seen(samples: Iterable[TreeSample], activity: Activity, since: float, cpu_idle_percent: float) -> bool:
    """Whether anything after `since` shows the session itself working: a sample with
    CPU at or over the idle threshold, an open TCP connection, or a child that was not
    there before; or one of its own progress events (not a turn start, not from HTTP)."""
    before: frozenset[tuple[int, float]] | None = None
    for s in samples:
        if s.status is not SampleStatus.OK:
            continue
        children = frozenset((p.pid, p.create_time) for p in s.processes[1:])
        if s.time <= since:
            before = children
            continue
        if (s.cpu_percent is not None and s.cpu_percent >= cpu_idle_percent) or (s.tcp_total or 0) > 0:
            return True
        if before is not None and children - before:
            return True
        if before is None:
            before = children
    return any(e.time > since and e.kind is EventKind.PROGRESS and e.turn != "open" and e.source != "http"
               for e in activity.recent)


def _may_be_same_process(tracked: _Tracked, spec: SessionSpec) -> bool:
    """Whether a spec for the tracked pid can be the tracked process: unknown identities
    are given the benefit of the doubt, known ones compared as the probe does."""
    if spec.create_time is None or tracked.identity is None:
        return True
    return same_process(tracked.identity, spec.create_time)


def _merged(primary: SessionSpec, other: SessionSpec) -> SessionSpec:
    """`primary` with the blanks filled from `other` (a weaker or later description)."""
    return replace(
        primary,
        agent=primary.agent if primary.agent != "unknown" else other.agent,
        events_path=primary.events_path or other.events_path,
        labels={**other.labels, **primary.labels},
        runtime=primary.runtime or other.runtime,
        runtime_alive=primary.runtime_alive if primary.runtime_alive is not None else other.runtime_alive,
        create_time=primary.create_time if primary.create_time is not None else other.create_time,
        stderr_path=primary.stderr_path or other.stderr_path,
    )


def _read_tail(path: str | None, limit: int = 4096) -> str:
    if not path:
        return ""
    try:
        with open_regular(path) as fh:  # a FIFO here must never block the loop
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - limit))
            return fh.read().decode("utf-8", "replace")
    except OSError:
        return ""


class _Sources:
    """The configured session sources behind one `scan()`; each is optional and guarded."""

    def __init__(self, cfg: Config, paths: Paths, telemetry: Any) -> None:
        from otelwatch.sources.processes import ProcessMatcher
        from otelwatch.sources.registry import RegistrySource
        from otelwatch.sources.spool import SpoolSource
        from otelwatch.sources.tmux import TmuxSource
        from otelwatch.sources.transcripts import TranscriptLocator

        s = cfg.sources
        self._telemetry = telemetry
        self.registry = RegistrySource(paths.registry_dir) if s.registry.enabled else None
        self.spool = SpoolSource(paths.spool_dir, log=lambda message: self._warn("spool", message))
        self._exec_dir = paths.state_dir / "exec"  # the exec wrapper's stderr rings
        self._pruned_at = -math.inf
        self.processes = ProcessMatcher(s.processes.match, self_pid=os.getpid()) if s.processes.enabled else None
        self.tmux = TmuxSource(timeout=s.tmux.timeout) if s.tmux.enabled else None
        self.transcripts = TranscriptLocator(paths.home) if s.transcripts.enabled else None
        self.registry_ok = False
        # agent pid -> the tmux pane it runs in (or ran in) at the last scan; None when tmux is
        # off or the last scan failed (a failed read is no news).
        self.panes: dict[int, PaneInfo] | None = None
        self._tmux_counted = (0, 0)  # tmux timeouts and errors already exported
        self._failed: set[str] = set()

    def check(self) -> None:
        """Refuse an unsafe registry directory at start (raises with a clear message)."""
        if self.registry is not None:
            self.registry.check()

    def scan(self, table: ProcessTable, now: float,
             agent_pids: Iterable[int]) -> tuple[list[SessionSpec], dict[str, list[Event]]]:
        specs: list[SessionSpec] = []
        events: dict[str, list[Event]] = {}
        self.registry_ok = False
        if self.registry is not None:
            got = self._guard("registry", lambda: self.registry.scan(now))  # type: ignore[union-attr]
            if got is not None:
                specs.extend(got)
                self.registry_ok = True
        if now - self._pruned_at >= PRUNE_EVERY_S:
            self._pruned_at = now
            remove_older_than(self._exec_dir, ".stderr", RETENTION_S, now)
        got_spool = self._guard("spool", lambda: self.spool.poll(now))
        if got_spool is not None:
            spool_specs, events, _malformed = got_spool
            specs.extend(spool_specs)
        if self.processes is not None:
            specs.extend(self._guard("processes", lambda: self.processes.scan(table)) or ())  # type: ignore[union-attr]
        if self.tmux is not None:
            pids = set(agent_pids) | {s.pid for s in specs if s.pid is not None}
            panes = self._guard("tmux", lambda: self.tmux.scan(table, pids))  # type: ignore[union-attr]
            self.panes = None if panes is None else {
                pid: pane for pane in panes
                if (pid := pane.agent_pid if pane.agent_pid is not None else pane.last_agent_pid) is not None
            }
            self._export_tmux_problems()
        return specs, events

    def _export_tmux_problems(self) -> None:
        """A tmux server that does not answer costs every tick up to its timeout: count it
        like a probe timeout (kind "tmux") so the probe-timeout alert sees it."""
        assert self.tmux is not None
        timeouts, errors = self.tmux.timeouts, self.tmux.errors
        seen_timeouts, seen_errors = self._tmux_counted
        with contextlib.suppress(Exception):
            for _ in range(timeouts - seen_timeouts):
                self._telemetry.on_probe_problem("tmux", True)
            for _ in range(errors - seen_errors):
                self._telemetry.on_probe_problem("tmux", False)
        self._tmux_counted = (timeouts, errors)

    def runtime_target_alive(self, spec: SessionSpec) -> bool | None:
        """For a session whose process is gone: does its runtime (its tmux pane) live on?
        Asked once, when the process is found dead, not every tick: the pane its agent ran
        in is asked about afresh (one call to that pane's server); a registered pane the
        scans never mapped to the agent, from the last scan. None: unknown."""
        tmux = self.tmux
        if tmux is None:
            return None
        pane = tmux.pane_of(spec.pid) if spec.pid is not None else None
        if pane is not None:
            pid = spec.pid
            assert pid is not None
            result = self._guard("tmux", lambda: tmux.recheck(pane, pid))
            return None if result is None else bool(result)
        runtime = spec.runtime
        if runtime is None or runtime.kind != "tmux" or not runtime.target:
            return None
        result = self._guard("tmux", lambda: self.tmux.pane_alive(runtime.target))  # type: ignore[union-attr]
        return None if result is None else bool(result)

    def _warn(self, source: str, message: str) -> None:
        with contextlib.suppress(Exception):
            self._telemetry.log("source.untrusted", {"source": source, "detail": message}, "warning")

    def _guard(self, name: str, fn: Callable[[], Any]) -> Any:
        try:
            result = fn()
        except Exception as exc:
            if name not in self._failed:  # log once per failing source, count every time
                self._failed.add(name)
                with contextlib.suppress(Exception):
                    self._telemetry.log("source.error", {"source": name, "error": repr(exc)}, "error")
            with contextlib.suppress(Exception):
                self._telemetry.on_probe_problem(f"source_{name}", False)
            return None
        self._failed.discard(name)
        return result

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.spool.close()


# ---------------------------------------------------------------------- `otelwatch run`


class AlreadyRunning(RuntimeError):
    pass


class StateDirRefused(RuntimeError):
    """The state directory is not safe to trust: others could write its spool or state."""


@contextlib.contextmanager
def state_dir_lock(paths: Paths) -> Any:
    """One daemon per state directory: a second one refuses to start."""
    paths.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    # The spool in it can open turns and the recovery state names PIDs: like the
    # registry directory, it must be ours and closed to everyone else.
    why = untrusted_dir(paths.state_dir, os.geteuid(), "state directory")
    if why:
        raise StateDirRefused(f"{why}; refusing it: run `chmod go-w {paths.state_dir}` or set state_dir")
    fd = os.open(paths.lock_file, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise AlreadyRunning(
                f"another otelwatch (pid {holder}) is running on state directory {paths.state_dir}"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


def run_daemon(cfg: Config) -> int:
    """`otelwatch run`: serve until SIGTERM/SIGINT. Returns the process exit code."""
    from otelwatch.server import HttpServer
    from otelwatch.sources.registry import RegistryRefused

    paths = default_paths(cfg)
    try:
        with state_dir_lock(paths):
            watcher = Watcher(cfg, paths=paths)
            try:
                watcher.start()  # refuses an unsafe registry directory before anything listens
            except RegistryRefused as exc:
                print(f"otelwatch: {exc}", file=sys.stderr)
                watcher.stop()
                return 2
            from otelwatch.notify import attach

            try:
                notifier = attach(watcher)
            except ValueError as exc:  # ConfigError: a header names an unset variable
                print(f"otelwatch: config error: {exc}", file=sys.stderr)
                watcher.stop()
                return 2
            try:
                server = HttpServer(
                    cfg.http.host, cfg.http.port, watcher,
                    watcher.telemetry.prometheus_exposition if watcher.telemetry.prometheus_enabled else None,
                ).start()
            except OSError as exc:
                print(f"otelwatch: cannot listen on {cfg.http.listen}: {exc.strerror or exc}", file=sys.stderr)
                watcher.stop()
                if notifier is not None:
                    notifier.shutdown(0.5)
                return 1
            stop = threading.Event()

            def on_signal(signum: int, frame: Any) -> None:
                stop.set()

            signal.signal(signal.SIGTERM, on_signal)
            signal.signal(signal.SIGINT, on_signal)
            watcher._log("daemon.started", {"listen": server.url, "state_dir": str(paths.state_dir),
                                            "registry_dir": str(paths.registry_dir), "pid": os.getpid()})
            while not stop.wait(0.5):
                pass
            watcher._log("daemon.stopping", {})
            server.shutdown(1.0)
            watcher.stop(1.5)
            if notifier is not None:
                notifier.shutdown(1.0)
            return 0
    except AlreadyRunning as exc:
        print(f"otelwatch: {exc}", file=sys.stderr)
        return 1
    except StateDirRefused as exc:
        print(f"otelwatch: {exc}", file=sys.stderr)
        return 2
    except PermissionError as exc:
        print(f"otelwatch: cannot use state directory {paths.state_dir}: {exc}", file=sys.stderr)
        return 1
