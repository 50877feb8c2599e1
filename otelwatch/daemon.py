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

import os
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import IO, TYPE_CHECKING, Any

from otelwatch.backends import probe_backend
from otelwatch.classify import SampleWindow, classify, fingerprint, is_late_tick, next_report, work_cpu_percent
from otelwatch.config import Config, Paths, default_paths
from otelwatch.events import parse_line
from otelwatch.model import (
    Event,
    Mode,
    ProcessIdentity,
    SampleStatus,
    SessionInfo,
    SessionSnapshot,
    SessionSpec,
    State,
)
from otelwatch.proctable import ProcessTable
from otelwatch.recovery import Recovery, SessionView
from otelwatch.report import build_report, session_summary
from otelwatch.sessions import SessionTable, Tracked, snapshot_of
from otelwatch.sources.hub import Sources
from otelwatch.sources.payloads import payload_to_event

if TYPE_CHECKING:  # the OpenTelemetry SDK is imported only when Telemetry is built
    from otelwatch.telemetry import TelemetrySink

# The inbox between API/HTTP threads and the loop is bounded, and so is the work one tick
# takes from it (the rest waits for the next tick). POST /api/events is refused (429) well
# before feed()/add_event() drop anything, so a flood on the listener cannot crowd out the
# Python API's events.
INBOX_MAX = 50_000
INBOX_MAX_HTTP = 20_000
INBOX_DRAIN_PER_TICK = 10_000
# What SessionSnapshot.last_report keeps of a report: the evidence a person drills into.
_LAST_REPORT_KEYS = ("event", "state", "reason", "summary", "root", "children", "connections",
                     "open_tools", "stderr_tail", "repeat")

Subscriber = Callable[[Mapping[str, Any]], None]


class Watcher:
    """One host's collector loop. Construct, then `start()` (background thread) or call
    `tick()` yourself; `stop()` is idempotent."""

    def __init__(
        self,
        cfg: Config | None = None,
        *,
        paths: Paths | None = None,
        telemetry: TelemetrySink | None = None,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        boottime: Callable[[], float] | None = None,
        proc_root: str = "/proc",
        environ: Mapping[str, str] | None = None,
        log_stream: IO[str] | None = None,
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
        self.telemetry: TelemetrySink = telemetry
        # One boot time for every identity the daemon compares (see ProcessTableReader).
        self.recovery = Recovery(self.cfg, self.paths.recovery_state, clock=clock, proc_root=proc_root,
                                 boot_time=self._reader.boot_time)
        self._sources = Sources(self.cfg, self.paths, self.telemetry)
        self._sessions = SessionTable(on_end=self._end, on_rekey=self._prober.forget, log=self._log)
        self._explicit: dict[str, SessionSpec] = {}  # track() calls from the Python API
        # Each live session's incremental window aggregates (classify.SampleWindow), by the
        # identity of its Tracked (which a re-key keeps); dropped when the session ends.
        self._windows: dict[int, tuple[Tracked, SampleWindow]] = {}
        self._inbox: deque[tuple[str, Event | bytes, int | None, bool]] = deque()
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
        key = self._sessions.resolve(session_id)
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
            try:
                part.shutdown(max(0.1, deadline - time.monotonic()))
            except Exception as exc:  # the other parts must still be shut down
                self._log("shutdown.error", {"part": type(part).__name__, "error": repr(exc)}, "error")
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
        self._sources.poll_tails(self._sessions, now)
        self._sample(table, now)
        for tracked in self._sessions.values():
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
        self._tell("on_tick", self.telemetry.on_tick, self._last_tick_mono - t0)
        return self.sessions()

    # ------------------------------------------------------------------ sources

    def _refresh_sources(self, table: ProcessTable, now: float) -> None:
        specs, spool_events = self._sources.scan(table, now, self._sessions.agent_pids())
        specs.extend(self._explicit.values())
        self._sessions.merge(specs, table, now, registry_ok=self._sources.registry_ok)
        for sid, events in spool_events.items():
            for event in events:
                self._sessions.deliver(sid, event, None)
        self._sessions.apply_panes(self._sources.panes)
        self._sources.match_transcripts(self._sessions, table, now, self._prober.cwd)

    # ------------------------------------------------------------------ events

    def _drain_inbox(self, now: float) -> None:
        # At most INBOX_DRAIN_PER_TICK: a flood waits for the next ticks instead of
        # stretching this one (events from POST carry their own arrival time).
        for _ in range(min(len(self._inbox), INBOX_DRAIN_PER_TICK)):
            sid, item, pid, json_only = self._inbox.popleft()
            if isinstance(item, Event):
                self._sessions.deliver(sid, item, pid)
                continue
            event = parse_line(item, now, "api", json_only=json_only)
            if event is None:
                self._sessions.count_malformed(sid)
                continue
            self._sessions.deliver(sid, event, pid)

    # ------------------------------------------------------------------ probe

    def _sample(self, table: ProcessTable, now: float) -> None:
        targets: dict[str, ProcessIdentity | int] = {}
        for tracked in self._sessions.values():
            if tracked.ended_at is None and tracked.spec.pid is not None:
                targets[tracked.key] = tracked.identity or tracked.spec.pid
        if not targets:
            return
        samples = self._prober.sample(table, targets, self.cfg.probe_timeout)
        for kind, what in self._prober.take_problems():
            self._probe_problem(kind, timeout=(what == "timeout"))
        horizon = now - (self.cfg.classify.stall_after + 3 * self.cfg.interval)
        for key, sample in samples.items():
            found = self._sessions.get(key)
            if found is None:
                continue
            tracked = found
            if tracked.identity is None and sample.root is not None:
                tracked.identity = sample.root
            tracked.samples.append(sample)
            while len(tracked.samples) > 2 and tracked.samples[1].time < horizon:
                tracked.samples.popleft()

    # ------------------------------------------------------------------ classify

    def _classify(self, tracked: Tracked, now: float) -> None:
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
        held = self._windows.get(id(tracked))
        if held is None or held[0] is not tracked:
            held = self._windows[id(tracked)] = (tracked, SampleWindow())
        verdict = classify(self.cfg.classify, info, tuple(tracked.samples), tracked.activity, now,
                           self._watch_since, previous=tracked.verdict, window=held[1])
        tracked.verdict = verdict
        if verdict.state is not old:
            tracked.state_since = now
            if verdict.state in (State.STALLED, State.STUCK):
                tracked.stalls += 1
        if verdict.state is not State.EXITED:
            tracked.longest_silence = max(tracked.longest_silence, verdict.silence_s)
        tracked.snapshot = snapshot_of(tracked, now)
        if verdict.state is not old:
            # Before the report: entering stalled/stuck opens the incident span its events go on.
            self._tell("on_transition", self.telemetry.on_transition, tracked.snapshot, old)
            self._emit({"event": "session.state", "session_id": tracked.key, "agent": tracked.spec.agent,
                        "state": verdict.state.value, "reason": verdict.reason.value,
                        "previous": None if old is None else old.value})
        self._maybe_report(tracked, now)
        if verdict.state is State.EXITED:
            self._end(tracked, now)

    def _maybe_report(self, tracked: Tracked, now: float) -> None:
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
            stderr_tail=self._sources.stderr_tail(tracked.spec),
        )
        # Kept on the snapshot (and carried by _snapshot) so /api/sessions and `otelwatch top`
        # show where each process waits without an HTTP handler touching /proc.
        tracked.snapshot = replace(tracked.snapshot, last_report={"time": now, **{
            k: report[k] for k in _LAST_REPORT_KEYS if k in report}})
        self.telemetry.on_report(tracked.snapshot, report)
        self._emit(report)

    def _end(self, tracked: Tracked, now: float) -> None:
        """A session ends: one summary line; it stays listed for exited_retention."""
        tracked.ended_at = now
        self._windows.pop(id(tracked), None)
        self._sessions.record_end(tracked)
        self._prober.forget(tracked.key)
        self.recovery.session_ended(tracked.key)
        if self._sources.transcripts is not None and tracked.spec.pid is not None:
            try:
                self._sources.transcripts.release(tracked.spec.pid)
            except Exception as exc:  # the session still ends; counted like a failing source
                self._probe_problem("source_transcripts", timeout=False)
                self._log("source.error", {"source": "transcripts", "session_id": tracked.key,
                                           "error": repr(exc)}, "error")
        snap = tracked.snapshot or snapshot_of(tracked, now)
        summary = session_summary(snap, ended_at=now, longest_silence_s=tracked.longest_silence,
                                  stalls=tracked.stalls,
                                  # requested, not completed: the completion of a recovery
                                  # that ended the session is recorded just after its end
                                  recoveries=sum(1 for r in tracked.recoveries if r.step == "requested"))
        self._tell("on_session_end", self.telemetry.on_session_end, snap, summary)
        self._emit(summary)

    # ------------------------------------------------------------------ act

    def _act(self, now: float) -> None:
        # Recovery off (the default): no views to build; steps can still be drained (none).
        for tracked in self._sessions.values() if self.cfg.recovery.enabled else ():
            sample, verdict = tracked.latest, tracked.verdict
            if (tracked.ended_at is not None or sample is None or verdict is None or sample.root is None
                    or sample.status is not SampleStatus.OK or not sample.processes):
                continue
            root = sample.processes[0]
            view = SessionView(
                session_id=tracked.key, agent=tracked.spec.agent, identity=sample.root, pgid=root.pgid,
                uid=root.uid, cmdline=root.cmdline, verdict=verdict, sample=sample,
                events=tracked.activity.events, reacted=tracked.reacted(work_cpu_percent(self.cfg.classify)),
            )
            try:
                self.recovery.observe(view, now)
            except Exception as exc:
                self._log("recovery.error", {"session_id": tracked.key, "error": repr(exc)}, "error")
        for step in self.recovery.drain():
            owner = self._sessions.find(step.session_id)
            if owner is not None:
                owner.recoveries.append(step)
                del owner.recoveries[:-50]
                if owner.snapshot is not None:
                    # Escalations finish on their own thread, often after the process
                    # was already seen gone: the listing must still show the outcome.
                    owner.snapshot = replace(owner.snapshot, recoveries=tuple(owner.recoveries))
            self._tell("on_recovery_step", self.telemetry.on_recovery_step, step)
            self._emit({"event": f"recovery.{step.step}", **step.to_json()})

    # ------------------------------------------------------------------ export

    def _publish(self, now: float) -> None:
        retention = self.cfg.classify.exited_retention
        self._sessions.expire(now, retention)
        snapshots = self._sessions.snapshots()
        with self._snap_lock:
            self._snapshots = snapshots
        try:
            self.telemetry.update(snapshots)
        except Exception as exc:
            self._log("telemetry.error", {"error": repr(exc)}, "error")

    def _emit(self, report: Mapping[str, Any]) -> None:
        for callback in list(self._subscribers):
            try:
                callback(report)
            except Exception as exc:
                self._log("subscriber.error", {"error": repr(exc)}, "error")

    def _tell(self, call: str, fn: Callable[..., None], *args: Any) -> None:
        """Hand something to telemetry: a failure there is counted (probe error kind
        "telemetry") and logged, and never reaches the loop."""
        try:
            fn(*args)
        except Exception as exc:
            self._probe_problem("telemetry", timeout=False)
            self._log("telemetry.error", {"call": call, "error": repr(exc)}, "error")

    def _probe_problem(self, kind: str, *, timeout: bool) -> None:
        try:
            self.telemetry.on_probe_problem(kind, timeout)
        except Exception as exc:  # the counter itself failed: logging is all that is left
            self._log("telemetry.error", {"call": "on_probe_problem", "kind": kind, "error": repr(exc)}, "error")

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

