"""What the daemon drives: when a recovery starts, its worker, its recorded steps, the state file.

`Recovery` is called once per tick per live session (`observe`). The pure policy
(`policy.py`) decides; `escalation.py` takes a started recovery through its
steps on its own short-lived worker thread, so `observe` never waits for a grace
period or a command; the actuator (`actuator.py`) does the I/O. This module owns
the wiring between them: the per-session windows, the rate budget, the workers,
the recorded `RecoveryStep`s and the state file's contents.

Each step is written to the state file before the next one starts. After a
restart an entry is continued only when `observe` sees the same identity stuck
again, with every gate holding over two consecutive ticks; an entry whose
process is gone or whose PID was reused is closed without any signal.

It never signals anything itself and never acts on a session that `observe`
has not just shown to pass every gate.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

from otelwatch.config import Config
from otelwatch.model import EscalationStep, ProcessIdentity, RecoveryStatus, RecoveryStep, same_process
from otelwatch.recovery.actuator import (
    GONE_STATES,
    Guard,
    ProcView,
    StateStore,
    ancestors_of,
    resolve_users,
    substitute,
)
from otelwatch.recovery.escalation import Escalator, Outcome, command_values, transition
from otelwatch.recovery.policy import RATE_WINDOW, Decision, PolicyContext, SessionView, Window, step
from otelwatch.recovery.state import GIVEN_UP_KEEP, Escalation, StateCorrupt, StateFile

__all__ = ["HISTORY_SESSIONS", "HISTORY_STEPS", "Recovery"]

log = logging.getLogger("otelwatch.recovery")

HISTORY_STEPS = 50  # per session, for /api/sessions
HISTORY_SESSIONS = 256  # sessions whose history is kept after they ended


class Recovery:
    """The opt-in actuator the daemon drives. Thread-safe; `observe` never blocks on I/O
    beyond one /proc/PID/stat read when a stale entry is closed."""

    def __init__(
        self,
        cfg: Config,
        state_path: Path,
        *,
        self_pid: int | None = None,
        clock: Callable[[], float] = time.time,
        allowed_uids: Collection[int] | None = None,
        proc_root: str = "/proc",
        boot_time: float | None = None,
        verify_timeout: float = 2.0,
        poll_interval: float = 0.05,
    ) -> None:
        self._r = cfg.recovery
        self._clock = clock
        self._self_pid = os.getpid() if self_pid is None else self_pid
        # Re-identified by the probe's backend, with its boot time: identities compare exactly.
        self._procs = ProcView(proc_root, boot_time, cfg.probe.backend)
        ancestors = ancestors_of(self._self_pid, proc_root, cfg.probe.backend)
        allowed = frozenset(allowed_uids) if allowed_uids is not None else resolve_users(self._r.users)
        self._ctx = PolicyContext.from_config(cfg, self_pid=self._self_pid, allowed_uids=allowed,
                                              self_ancestors=ancestors)
        self._guard = Guard(self._self_pid, ancestors, allowed)
        self._store = StateStore(Path(state_path))
        # Lock order: _persist_lock before _lock, never the other way round.
        self._lock = threading.Lock()
        self._persist_lock = threading.Lock()
        self._stop = threading.Event()
        self._closed = False
        self._windows: dict[str, Window] = {}
        self._latest: dict[str, SessionView] = {}
        self._decisions: dict[str, Decision] = {}
        self._workers: dict[str, threading.Thread] = {}
        self._escalations: dict[str, Escalation] = {}  # in flight, or interrupted by shutdown
        self._resumable: dict[str, Escalation] = {}  # from the state file, waiting for the gates
        self._recent: list[float] = []  # decision times, rolling hour
        self._given_up: list[ProcessIdentity] = []
        self._pending: list[RecoveryStep] = []
        self._history: OrderedDict[str, list[RecoveryStep]] = OrderedDict()
        self._escalator = Escalator(self._r, self._ctx, self._procs, self._guard, stop=self._stop, clock=clock,
                                    verify_timeout=verify_timeout, poll=poll_interval,
                                    latest=self._latest_view, advance=self._advance)
        if self._r.enabled:
            self._load()

    # ----------------------------------------------------------------- daemon API

    def observe(self, view: SessionView, now: float) -> None:
        """One tick of one live session. Decides; a recovery runs on its own worker."""
        if not self._r.enabled:
            return
        sid = view.session_id
        persist = False
        with self._lock:
            if self._closed:
                return
            self._latest[sid] = view
            if sid in self._workers:
                return
            resume = self._resumable.get(sid)
            if resume is not None and not same_process(resume.identity, view.identity):
                # The session now points at another process: the entry is for a process
                # that is gone or not ours to judge any more. Close it, signal nothing.
                del self._resumable[sid]
                self._settle(resume, "the session moved to another process")
                resume, persist = None, True
            window, decision = step(self._windows.get(sid), view, now, self._ctx, self._recent,
                                    self._given_up, resume=None if resume is None else resume.identity)
            self._decisions[sid] = decision
            if not decision.act:
                if window is None:
                    self._windows.pop(sid, None)
                else:
                    self._windows[sid] = window
            else:
                self._windows.pop(sid, None)
                persist = self._start(view, decision, now, resume) or persist
        if persist:
            self._persist()

    def restart_windows(self, now: float) -> None:
        """The loop ticked late: the gap is the watchdog's lag, not the agent's silence."""
        with self._lock:
            self._windows.clear()

    def session_ended(self, session_id: str) -> None:
        """The daemon stopped tracking the session. A running escalation finishes on its
        own (it verifies against /proc); a resumable one is closed."""
        with self._lock:
            self._windows.pop(session_id, None)
            self._latest.pop(session_id, None)
            self._decisions.pop(session_id, None)
            esc = self._resumable.pop(session_id, None)
            if esc is not None:
                self._settle(esc, "the session ended before the escalation could continue")
        if esc is not None:
            self._persist()

    def drain(self) -> list[RecoveryStep]:
        """Steps recorded since the last drain, oldest first."""
        with self._lock:
            out, self._pending = self._pending, []
        return out

    def history(self, session_id: str) -> list[RecoveryStep]:
        with self._lock:
            return list(self._history.get(session_id, ()))

    def last_decision(self, session_id: str) -> Decision | None:
        """The gates as evaluated at the session's last observed tick (diagnostics)."""
        with self._lock:
            return self._decisions.get(session_id)

    def shutdown(self, timeout: float = 2.0) -> None:
        """Stop waiting workers (their escalations stay in the state file, to be resumed
        after every gate holds again) and write the state file. Safe to call twice."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            workers = list(self._workers.values())
        self._stop.set()
        deadline = time.monotonic() + timeout
        for worker in workers:
            worker.join(max(0.0, deadline - time.monotonic()))
        if self._r.enabled:
            self._persist()

    # ----------------------------------------------------------------- decisions

    def _start(self, view: SessionView, decision: Decision, now: float,
               resume: Escalation | None) -> bool:
        """Begin a recovery the policy allowed. Called with _lock held. Returns whether
        the state file must be written by the caller (after releasing the lock)."""
        sid = view.session_id
        if resume is not None:
            del self._resumable[sid]
            esc = resume
            esc.events = view.events  # the count restarted with the daemon
            log.info("recovery of %s (pid %d) resumes after a restart at step %s",
                     sid, esc.identity.pid, esc.step)
        else:
            snapshot = tuple(p.identity for p in view.sample.processes)
            esc = Escalation(sid, view.agent, self._r.action, decision.reason, decision.kind,
                              view.identity, view.pgid, snapshot, EscalationStep.REQUESTED, now, now, view.events)
            self._recent = [t for t in self._recent if t > now - RATE_WINDOW]
            self._recent.append(now)
            w = decision.window
            evidence = "" if w is None else (
                f"{decision.kind} for {w.duration:.1f} s over {w.ticks} ticks, "
                f"tree cpu {w.cpu_percent or 0.0:.2f}%, tcp {view.sample.tcp_total}, "
                f"pids {[i.pid for i in snapshot]}")
            self._record(esc, EscalationStep.REQUESTED, now, reason=decision.reason, detail=evidence)
            if self._r.dry_run:
                plan = (f"would run {substitute(self._r.command, command_values(esc))}"
                        if esc.action == "command"
                        else f"would signal pgid {esc.pgid} and pids {[i.pid for i in snapshot]}")
                self._record(esc, EscalationStep.COMPLETED, now, status=RecoveryStatus.DRY_RUN, duration_s=0.0,
                             detail=f"{plan}; gates: {decision.summary()}")
                return True
        self._escalations[sid] = esc
        worker = threading.Thread(target=self._run, args=(esc,), name=f"otelwatch-recovery-{sid}",
                                  daemon=True)
        self._workers[sid] = worker
        worker.start()
        return False

    # ----------------------------------------------------------------- workers

    def _run(self, esc: Escalation) -> None:
        outcome: Outcome = None
        try:
            self._persist()  # the decision is on disk before the first signal
            outcome = self._escalator.run(esc)
        except Exception as exc:  # a worker must never die silently mid-escalation
            log.exception("recovery of %s failed", esc.session_id)
            outcome = (RecoveryStatus.FAILED, f"internal error: {exc!r}", True)
        finally:
            with self._lock:
                self._workers.pop(esc.session_id, None)
                if outcome is not None:
                    status, detail, give_up = outcome
                    self._escalations.pop(esc.session_id, None)
                    self._record(esc, EscalationStep.COMPLETED, self._clock(), status=status, detail=detail,
                                 duration_s=max(0.0, self._clock() - esc.requested_at))
                    if give_up:
                        self._given_up = [*self._given_up, esc.identity][-GIVEN_UP_KEEP:]
            self._persist()

    def _latest_view(self, session_id: str) -> SessionView | None:
        with self._lock:
            return self._latest.get(session_id)

    def _advance(self, esc: Escalation, step_name: EscalationStep, detail: str) -> None:
        now = self._clock()
        with self._lock:
            esc.step, esc.time = transition(esc.step, step_name), now
            self._record(esc, step_name, now, detail=detail)
        self._persist()

    # ----------------------------------------------------------------- records and state

    def _record(self, esc: Escalation, step_name: str, t: float, *, reason: str = "",
                status: RecoveryStatus | None = None, duration_s: float | None = None,
                detail: str = "") -> None:
        """Called with _lock held."""
        rec = RecoveryStep(esc.session_id, esc.agent, esc.action, step_name, t, esc.identity.pid,
                           reason=reason or esc.reason, status=status, duration_s=duration_s,
                           detail=detail)
        self._pending.append(rec)
        steps = self._history.setdefault(esc.session_id, [])
        steps.append(rec)
        del steps[:-HISTORY_STEPS]
        self._history.move_to_end(esc.session_id)
        while len(self._history) > HISTORY_SESSIONS:
            self._history.popitem(last=False)
        log.debug("recovery %s %s pid %d: %s %s", esc.session_id, step_name, esc.identity.pid,
                  status or "", detail)

    def _settle(self, esc: Escalation, why: str) -> None:
        """Close an entry from the state file that will not be continued. Nothing is
        signalled: the status says what became of the process. Called with _lock held."""
        info = self._procs.read(esc.identity.pid)
        gone = info is None or info.state in GONE_STATES
        reused = not gone and info is not None and not same_process(info.identity, esc.identity)
        if gone or reused:
            status = {EscalationStep.REQUESTED: RecoveryStatus.IDENTITY_CHANGED if reused else RecoveryStatus.VANISHED,
                      EscalationStep.SIGTERM: RecoveryStatus.TERMINATED,
                      EscalationStep.COMMAND: RecoveryStatus.TERMINATED,
                      EscalationStep.SIGKILL: RecoveryStatus.KILLED}[EscalationStep(esc.step)]
            detail = (f"pid reused while otelwatch was down; nothing signalled after step {esc.step}"
                      if reused else f"gone after step {esc.step}")
        else:
            status, detail = RecoveryStatus.FAILED, f"{why}; abandoned after step {esc.step}"
        now = self._clock()
        self._record(esc, EscalationStep.COMPLETED, now, status=status, detail=detail,
                     duration_s=max(0.0, now - esc.requested_at))

    def _load(self) -> None:
        """Read the state file. A value of the wrong type or out of range makes the whole
        file corrupt: it is moved aside (`<file>.corrupt-<time>`, one warning naming the
        value) and the daemon starts with an empty state, which can only delay a recovery,
        never cause one."""
        now = self._clock()
        parsed: list[StateFile] = []

        def check(data: dict[str, Any]) -> str:
            try:
                parsed.append(StateFile.parse(data, now, boot_time=self._procs.boot_time))
            except StateCorrupt as exc:
                return f"has a bad value: {exc}"
            return ""

        self._store.load(check)
        state = parsed[0] if parsed else StateFile([], [], [])
        dropped = False
        with self._lock:
            self._recent, self._given_up = state.recent, state.given_up
            for esc in state.escalations:
                if self._procs.alive(esc.identity):
                    self._resumable[esc.session_id] = esc
                else:
                    # Gone or PID reused: never acted on again.
                    self._settle(esc, "gone while otelwatch was down")
                    dropped = True
        if dropped:
            self._persist()

    def _persist(self) -> None:
        if not self._r.enabled:
            return
        with self._persist_lock:
            with self._lock:
                escalations = [e.to_json() for e in (*self._escalations.values(),
                                                     *self._resumable.values())]
                data = {
                    "version": 1,
                    # Every create_time here is this boot time + the process's start in clock
                    # ticks since boot; a later daemon shifts them onto its own boot time, so
                    # identities compare as start ticks even after the wall clock stepped.
                    "boot_time": self._procs.boot_time,
                    "recoveries": list(self._recent),
                    "escalations": escalations,
                    "given_up": [[i.pid, i.create_time] for i in self._given_up],
                }
            self._store.save(data)
