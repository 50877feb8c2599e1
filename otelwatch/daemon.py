"""The collector loop that wires the flow: sources -> probe -> classify -> act -> export.

`Watcher` is both the daemon's engine and the public Python API for host
applications that spawn agents themselves: `track()` a PID, `feed()` it event
lines, read `sessions()`, `subscribe()` to reports. Only the loop thread mutates
session state; other threads (HTTP, API callers) hand events over through a
queue (`sources.inbox`), so one tick sees one consistent world.

`tick()` reads top to bottom: clocks and lag -> the process table -> sources
(`sources.hub`, merged by `sessions.SessionTable`) -> the inbox -> event files
-> sample each session (the probe) -> classify each (`lifecycle`: verdict,
reports, end) -> act (`recovery`) -> publish (snapshots, telemetry). This module
only wires those parts and guards them; the per-session logic lives in them.

The loop never dies of one session: every per-session step is guarded, and an
error becomes a counted, logged probe error for that session only.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import IO, TYPE_CHECKING, Any

from otelwatch.classify.lateness import is_late_tick
from otelwatch.config import Config, Paths, default_paths
from otelwatch.model import STEADY_STATES, Event, Mode, ProcessIdentity, SessionSnapshot, SessionSpec
from otelwatch.probe.backends import probe_backend
from otelwatch.probe.own_connections import without_own_connections
from otelwatch.probe.proctable import ProcessTable
from otelwatch.recovery import Recovery
from otelwatch.sessions.lifecycle import Effects, Lifecycle, add_sample, record_step, recovery_view
from otelwatch.sessions.memory import SessionMemory
from otelwatch.sessions.names import refresh_names
from otelwatch.sessions.table import SessionTable, Tracked
from otelwatch.sessions.visibility import BLIND_TURNS, FIX, capability_gaps
from otelwatch.sources.hub import Sources
from otelwatch.sources.inbox import INBOX_DRAIN_PER_TICK, INBOX_MAX, INBOX_MAX_HTTP, Inbox
from otelwatch.sources.spool import spool_path

if TYPE_CHECKING:  # the OpenTelemetry SDK is imported only when Telemetry is built
    from otelwatch.sources.otlp import OtlpReceiver
    from otelwatch.telemetry import TelemetrySink

__all__ = ["INBOX_DRAIN_PER_TICK", "INBOX_MAX", "INBOX_MAX_HTTP", "Subscriber", "Watcher"]

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
        # [probe] backend: /proc + netlink (Linux) or psutil (portable); same samples either way.
        self._reader, self._prober = probe_backend(self.cfg.probe.backend, proc_root, clock=clock)
        if telemetry is None:
            from otelwatch.telemetry import Telemetry

            telemetry = Telemetry(self.cfg, environ=environ, log_stream=log_stream, clock=clock)
        self.telemetry: TelemetrySink = telemetry
        # One boot time for every identity the daemon compares (see ProcessTableReader).
        self.recovery = Recovery(self.cfg, self.paths.recovery_state, clock=clock, proc_root=proc_root,
                                 boot_time=self._reader.boot_time)
        self._sources = Sources(self.cfg, self.paths, self.telemetry, boot_time=self._reader.boot_time)
        self._lifecycle = Lifecycle(self.cfg.classify, Effects(
            transitioned=lambda snap, old: self._tell("on_transition", self.telemetry.on_transition, snap, old),
            # Not guarded: a failing report fails this session's tick (counted as "classify").
            reported=lambda snap, report: self.telemetry.on_report(snap, report),
            ended=lambda snap, summary: self._tell("on_session_end", self.telemetry.on_session_end, snap, summary),
            emit=self._emit, release=self._release, runtime_alive=self._sources.runtime_target_alive,
            wchan=self._prober.wchan, stderr_tail=self._sources.stderr_tail,
        ))
        self._sessions = SessionTable(on_end=self._lifecycle.end, on_rekey=self._prober.forget, log=self._log)
        self._explicit: dict[str, SessionSpec] = {}  # track() calls from the Python API
        self._inbox = Inbox(clock, lambda: self._probe_problem("inbox", timeout=False))
        # The agents' own OpenTelemetry in ([sources.otlp]); the HTTP listener routes /v1/* to it.
        self.otlp: OtlpReceiver | None = _otlp_receiver(self.cfg, self.telemetry, clock, proc_root)
        # otelwatch's own listening ports (HttpServer adds them): with [sources.otlp] on, an
        # agent's connection to them is not its network (own_connections.py).
        self.own_ports: set[int] = set()
        self._subscribers: list[Subscriber] = []
        self._snapshots: tuple[SessionSnapshot, ...] = ()
        self._snap_lock = threading.Lock()

        # What this daemon knew of each live session, kept across its restarts (session_memory.py).
        self._memory = SessionMemory(self.paths.state_dir / "sessions.json")
        self._memory_loaded = False
        self._blind_warned: set[int | None] = set()  # owners already told their sessions are blind

        self._watch_since = clock()
        self._last_tick_mono: float | None = None
        self._last_tick_boot: float | None = None
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
        self._inbox.feed(session_id, line, json_only)

    def add_event(self, session_id: str, event: Event, pid: int | None = None) -> None:
        self._inbox.add_event(session_id, event, pid)  # as feed(): dropped and counted when full

    def post_event(self, payload: Any, uid: int | None = None) -> list[str]:
        """Hook payloads or `{"session_id", "type", "tool"}` objects from POST /api/events:
        one object or a list of them, queued all or none. Returns their session ids.

        Raises ValueError naming what is wrong (and which item of a list), and
        queue.Full, counted as probe error kind "inbox", when queuing them would take
        the inbox past INBOX_MAX_HTTP."""
        return self._inbox.post(payload, uid)

    @property
    def boot_time(self) -> float:
        """The one boot time every process identity of this daemon is computed with."""
        return self._reader.boot_time

    def hook_event(self, payload: Any, tree: tuple[ProcessIdentity, ...], uid: int) -> bool:
        """A hook's payload from the hook socket, with the processes it was checked to run
        under (`sources.hook_socket`); thread-safe. Returns whether it was queued."""
        return self._inbox.hook(payload, tree, uid)

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
        out: dict[str, Any] = {"ok": ok, "ticks": self._ticks, "sessions": len(self._snapshots),
                               "last_tick_age_s": None if age is None else round(age, 3)}
        if self.otlp is not None:
            out["otlp"] = self.otlp.health()
        return out

    def start(self) -> Watcher:
        if self._thread is None:
            self._sources.check()
            self._warn_blind_at_start()
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
        try:
            self._memory.save(self._sessions.values(), self._clock(), force=True)
        except Exception as exc:  # the parts below must still be shut down
            self._log("memory.error", {"error": repr(exc)}, "error")
        for part in (self._prober, self.recovery, *((self.otlp,) if self.otlp is not None else ()), self.telemetry):
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
        boot, now = self._boottime(), self._clock()
        self._check_lag(boot, now)
        table = self._reader.read()  # one process table for the whole tick
        self._refresh_sources(table, now)
        self._drain_inbox(now)
        if self.otlp is not None:
            try:
                self.otlp.drain(self._sessions, table, now)
            except Exception as exc:  # a source's failure, never the tick's
                self._probe_problem("source_otlp", timeout=False)
                self._log("source.error", {"source": "otlp", "error": repr(exc)}, "error")
        self._sources.poll_tails(self._sessions, now)
        self._sources.judge_turns(self._sessions)
        self._sample(table, now)
        refresh_names(self._sessions.values(), table, now, self._prober.cwd)
        for tracked in self._sessions.values():
            try:
                self._lifecycle.classify(tracked, now, self._watch_since)
            except Exception as exc:  # one session's failure is that session's only
                self._probe_problem("classify", timeout=False)
                self._log("session.error", {"session_id": tracked.key, "error": repr(exc)}, "error")
        self._act(now)
        self._publish(now)
        self._warn_blind()
        if not self._memory.save(self._sessions.values(), now) and self._memory.problem:
            self._log("memory.error", {"path": str(self._memory.path), "error": self._memory.problem}, "warning")
            self._memory.problem = ""
        self._ticks += 1
        self._last_tick_boot = boot
        self._last_tick_mono = self._monotonic()
        self._tell("on_tick", self.telemetry.on_tick, self._last_tick_mono - t0)
        return self.sessions()

    def _check_lag(self, boot: float, now: float) -> None:
        if self._last_tick_boot is not None and is_late_tick(
            self._last_tick_boot + self.cfg.interval, boot, self.cfg.interval
        ):
            # The watchdog's own lag is not the agent's silence: windows start again.
            self._watch_since = now
            self.recovery.restart_windows(now)
            self._log("tick.late", {"late_by_s": round(boot - self._last_tick_boot - self.cfg.interval, 3)},
                      "warning")

    # ------------------------------------------------------------------ sources and events

    def _refresh_sources(self, table: ProcessTable, now: float) -> None:
        specs, spool_events = self._sources.scan(table, now, self._sessions.agent_pids())
        specs.extend(self._explicit.values())
        self._sessions.merge(specs, table, now, registry_ok=self._sources.registry_ok)
        if not self._memory_loaded:
            self._memory_loaded = True
            taken = self._memory.load(now)
            if self._memory.problem:
                self._log("memory.refused", {"path": str(self._memory.path), "detail": self._memory.problem},
                          "warning")
                self._memory.problem = ""
            elif taken:
                self._log("memory.loaded", {"path": str(self._memory.path), "sessions": taken})
        self._memory.restore(self._sessions.values())
        for sid, events in spool_events.items():
            own = self._own_spool(sid)
            for event in events:
                self._sessions.deliver(sid, replace(event, own=True) if own else event, None)
        self._sessions.apply_panes(self._sources.panes)
        self._sources.match_transcripts(self._sessions, table, now, self._prober.cwd)

    def _own_spool(self, sid: str) -> bool:
        """Whether `sid`'s spool file is its registry entry's own events file (the exec
        wrapper's stream): then its records are own events; any other spool record
        (hooks, `otelwatch event`) is observed (sources/spool.py says why)."""
        tracked = self._sessions.get(sid)
        return (tracked is not None and tracked.spec.source in ("registry", "exec")
                and tracked.spec.events_path == str(spool_path(self.paths.spool_dir, sid)))
    def _warn_blind_at_start(self) -> None:
        """What this daemon cannot see of other users' sessions, said once at start with the fix."""
        gaps = capability_gaps() if os.geteuid() != 0 else []
        transcripts_off = not self.cfg.sources.transcripts.enabled
        if gaps or transcripts_off:
            why = []
            if gaps:
                why.append(f"running as uid {os.geteuid()} without {' and '.join(gaps)}: other users' "
                           "agents' turns and sockets cannot be read")
            if transcripts_off:
                why.append("[sources.transcripts] enabled = false: Claude Code's and Codex's turns are not read")
            self._log("daemon.blind", {"detail": "; ".join(why), "fix": FIX}, "warning")

    def _warn_blind(self) -> None:
        """Once per owner, when a session of theirs is first seen blind (visibility.py)."""
        for snap in self._snapshots:
            vis = snap.visibility
            if snap.uid in self._blind_warned or not snap.live:
                continue
            if vis.get("turns") in BLIND_TURNS or vis.get("sockets") == "denied":
                self._blind_warned.add(snap.uid)
                self._log("session.blind", {
                    "session_id": snap.session_id, "pid": snap.pid, "user": snap.user, "uid": snap.uid,
                    "turns": vis.get("turns"), "sockets": vis.get("sockets"),
                    "detail": "this user's sessions are partly unreadable: never shown idle, numbers that "
                              "could not be read are null", "fix": FIX}, "warning")

    def _drain_inbox(self, now: float) -> None:
        self._inbox.drain(self._sessions, now)

    # ------------------------------------------------------------------ probe

    def _sample(self, table: ProcessTable, now: float) -> None:
        targets: dict[str, ProcessIdentity | int] = {}
        steady: set[str] = set()  # not judged on their sockets: may reuse an FD scan (fdmemo.py)
        for t in self._sessions.values():
            if t.ended_at is None and t.spec.pid is not None:
                targets[t.key] = t.identity or t.spec.pid
                if t.verdict is not None and t.verdict.state in STEADY_STATES:
                    steady.add(t.key)
        if not targets:
            return
        samples = self._prober.sample(table, targets, self.cfg.probe_timeout, steady=steady)
        for kind, what in self._prober.take_problems():
            self._probe_problem(kind, timeout=(what == "timeout"))
        horizon = now - (self.cfg.classify.stall_after + 3 * self.cfg.interval)
        for key, sample in samples.items():
            found = self._sessions.get(key)
            if found is not None:
                if self.otlp is not None and self.own_ports:
                    sample = without_own_connections(sample, self.own_ports)
                add_sample(found, sample, horizon)

    def _release(self, tracked: Tracked) -> None:
        """An ended session lets go of the table's, the probe's, recovery's and the sources' state."""
        self._sessions.record_end(tracked)
        self._sources.release(tracked)
        self._prober.forget(tracked.key)
        self.recovery.session_ended(tracked.key)
        if self._sources.transcripts is not None and tracked.spec.pid is not None:
            try:
                self._sources.transcripts.release(tracked.spec.pid)
            except Exception as exc:  # the session still ends; counted like a failing source
                self._probe_problem("source_transcripts", timeout=False)
                self._log("source.error", {"source": "transcripts", "session_id": tracked.key,
                                           "error": repr(exc)}, "error")

    # ------------------------------------------------------------------ act

    def _act(self, now: float) -> None:
        # Recovery off (the default): no views to build; steps can still be drained (none).
        for tracked in self._sessions.values() if self.cfg.recovery.enabled else ():
            view = recovery_view(tracked, self.cfg.classify)
            if view is None:
                continue
            try:
                self.recovery.observe(view, now)
            except Exception as exc:
                self._log("recovery.error", {"session_id": tracked.key, "error": repr(exc)}, "error")
        for step in self.recovery.drain():
            owner = self._sessions.find(step.session_id)
            if owner is not None:
                record_step(owner, step)
            self._tell("on_recovery_step", self.telemetry.on_recovery_step, step)
            self._emit({"event": f"recovery.{step.step}", **step.to_json()})

    # ------------------------------------------------------------------ export

    def _publish(self, now: float) -> None:
        retention = self.cfg.classify.exited_retention
        self._sessions.expire(now, retention)
        for tracked in self._sessions.take_forgotten():
            self._sources.close_feed(tracked)
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


def _otlp_receiver(cfg: Config, telemetry: TelemetrySink, clock: Callable[[], float],
                   proc_root: str) -> OtlpReceiver | None:
    """The OTLP receiver [sources.otlp] asks for (with its forwarder), or None when it is off."""
    o = cfg.sources.otlp
    if not o.enabled:
        return None
    from otelwatch.sources.otlp import OtlpReceiver
    from otelwatch.sources.otlp_forward import Forwarder

    def failed(signal: str, n: int) -> None:
        count = getattr(telemetry, "count_export_failure", None)
        if count is not None:
            for _ in range(n):
                count(f"agent_{signal}")

    forwarder = Forwarder(o.forward, timeout=o.forward_timeout, queue_bytes=o.forward_queue_bytes,
                          failed=failed) if o.forward else None
    return OtlpReceiver(forwarder=forwarder, queue_max=o.queue, clock=clock, proc_root=proc_root,
                        usage_counter=getattr(telemetry, "on_agent_usage", None))


def _boottime_clock(fallback: Callable[[], float]) -> Callable[[], float]:
    clock_id = getattr(time, "CLOCK_BOOTTIME", None)
    if clock_id is None and sys.platform == "darwin":  # pragma: no cover - untested on macOS
        # There CLOCK_MONOTONIC counts sleep; time.monotonic (mach_absolute_time) does not.
        clock_id = getattr(time, "CLOCK_MONOTONIC", None)
    if clock_id is None:  # pragma: no cover - neither Linux nor macOS
        return fallback
    return lambda: time.clock_gettime(clock_id)

