"""Runs recoveries: per-session windows, escalation workers, recorded steps, state persistence.

`Recovery` is what the daemon calls, once per tick per live session
(`observe`). The pure policy (`policy.py`) decides; the actuator
(`actuator.py`) does the I/O. This module owns the wiring between them: the
per-session windows, the escalation workers, the recorded `RecoveryStep`s and
the state file's contents.

Escalation design: one short-lived worker thread per escalation, so `observe`
never waits for a grace period or a command. The worker re-checks, just before
each signal, that no new event arrived (from the latest view `observe` saw)
and re-identifies every process from /proc; then SIGTERM, a wait of `grace`
polling for exit, SIGKILL to what is left, and a short verify wait. Each step is
written to the state file before the next one starts, so a restart never
forgets an escalation. After a restart an entry is continued only when
`observe` sees the same identity stuck again, with every gate holding over two
consecutive ticks; an entry whose process is gone or whose PID was reused is
closed without any signal.

It never signals anything itself and never acts on a session that `observe`
has not just shown to pass every gate.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Any

from otelwatch.config import Config
from otelwatch.model import EscalationStep, ProcessIdentity, RecoveryStatus, RecoveryStep
from otelwatch.recovery.actuator import (
    GONE_STATES,
    Guard,
    ProcView,
    StateStore,
    ancestors_of,
    resolve_users,
    run_command,
    send_signal,
    substitute,
    wait_gone,
)
from otelwatch.recovery.policy import (
    RATE_WINDOW,
    Decision,
    PolicyContext,
    SessionView,
    Window,
    same_identity,
    step,
    tick_gates,
)
from otelwatch.recovery.state import GIVEN_UP_KEEP, Escalation, StateCorrupt, StateFile

__all__ = ["TRANSITIONS", "Recovery", "transition"]

log = logging.getLogger("otelwatch.recovery")

HISTORY_STEPS = 50  # per session, for /api/sessions
HISTORY_SESSIONS = 256  # sessions whose history is kept after they ended

# The escalation's state machine: the steps that may follow each step. A signal escalation
# runs requested -> sigterm -> sigkill, a command one requested -> command; any step ends
# in completed (the outcome). Resumed escalations re-enter at the step the state file names.
TRANSITIONS: Mapping[EscalationStep, frozenset[EscalationStep]] = {
    EscalationStep.REQUESTED: frozenset({EscalationStep.SIGTERM, EscalationStep.COMMAND, EscalationStep.COMPLETED}),
    EscalationStep.SIGTERM: frozenset({EscalationStep.SIGKILL, EscalationStep.COMPLETED}),
    EscalationStep.SIGKILL: frozenset({EscalationStep.COMPLETED}),
    EscalationStep.COMMAND: frozenset({EscalationStep.COMPLETED}),
    EscalationStep.COMPLETED: frozenset(),
}


def transition(current: str, to: EscalationStep) -> EscalationStep:
    """The step after `current` when `to` is taken; ValueError for a step out of order
    (a SIGKILL before any SIGTERM, a second SIGTERM): that is a bug, never an action."""
    here = EscalationStep(current)
    if to not in TRANSITIONS[here]:
        raise ValueError(f"escalation step {to.value} cannot follow {here.value}")
    return to


# (status, detail, give_up) from a worker; None: interrupted by shutdown, resume later.
_Outcome = tuple[RecoveryStatus, str, bool] | None


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
        self._cfg = cfg
        self._r = cfg.recovery
        self._clock = clock
        self._verify_timeout = verify_timeout
        self._poll = poll_interval
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
            if resume is not None and not same_identity(resume.identity, view.identity):
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
                plan = (f"would run {substitute(self._r.command, self._values(esc))}"
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
        outcome: _Outcome = None
        try:
            self._persist()  # the decision is on disk before the first signal
            outcome = self._do_command(esc) if esc.action == "command" else self._do_signal(esc)
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

    def _quiet(self, esc: Escalation, *, strict: bool) -> str:
        """Why acting now would be wrong ("" when it is not), from the latest view.
        Before the first signal the verdict must still qualify (strict); before SIGKILL
        only a new event holds it back: a process busy in its SIGTERM handler past
        `grace` is what SIGKILL is for."""
        with self._lock:
            view = self._latest.get(esc.session_id)
        if view is None:
            if not self._procs.alive(esc.identity):
                return ""  # it ended because the root exited; what is left of the snapshot goes
            # The daemon stopped tracking it while it still runs (a removed registry
            # file, say): without fresh evidence nothing more is done to it.
            return "the session is no longer tracked"
        if view.events != esc.events:
            return f"{view.events - esc.events} new event(s) since the decision"
        if strict:
            kind, gates = tick_gates(view, self._ctx)
            failing = [g.name for g in gates if not g.ok]
            if kind != esc.kind or failing:
                return (f"verdict is now {view.verdict.state.value}/{view.verdict.reason.value}"
                        + (f", failing {failing}" if failing else ""))
        return ""

    def _refusal(self, esc: Escalation, before: str) -> _Outcome:
        """Why the first action must not happen (None: go ahead): the latest view must
        still qualify, and /proc must show the decided process alive, same identity."""
        why = self._quiet(esc, strict=True)
        if why:
            return RecoveryStatus.FAILED, f"aborted before {before}: {why}", False
        info = self._procs.read(esc.identity.pid)
        if info is None or info.state in GONE_STATES:
            return RecoveryStatus.VANISHED, f"the process was gone before {before}", False
        if not same_identity(info.identity, esc.identity):
            return (RecoveryStatus.IDENTITY_CHANGED,
                    f"pid {esc.identity.pid} now belongs to a process started at {info.create_time:.2f} "
                    f"(expected {esc.identity.create_time:.2f}); nothing signalled", False)
        return None

    def _do_signal(self, esc: Escalation) -> _Outcome:
        grace = self._r.grace
        if esc.step == EscalationStep.REQUESTED:
            if self._stop.is_set():
                return None
            refused = self._refusal(esc, "any signal")
            if refused is not None:
                return refused
            res = send_signal(signal.SIGTERM, esc.identity, esc.pgid, esc.snapshot, self._procs,
                              self._guard)
            if res.group is None and not res.signalled:
                if not self._procs.alive(esc.identity) and not res.denied:
                    return RecoveryStatus.VANISHED, "gone before SIGTERM reached it", False
                return RecoveryStatus.FAILED, f"SIGTERM not delivered: {res.describe()}", True
            self._advance(esc, EscalationStep.SIGTERM, res.describe())
            wait = grace
        else:  # resumed after a restart at "sigterm" or "sigkill": the grace is counted from disk
            wait = max(0.0, min(grace, esc.time + grace - self._clock()))
        left = wait_gone(esc.snapshot, wait, self._procs, self._stop, self._poll)
        if not left:
            if esc.step == EscalationStep.SIGKILL:
                return RecoveryStatus.KILLED, "gone after SIGKILL (sent before a restart)", False
            return RecoveryStatus.TERMINATED, f"exited within {grace:g} s of SIGTERM", False
        if self._stop.is_set():
            return None
        why = self._quiet(esc, strict=False)
        if why:
            return RecoveryStatus.FAILED, f"SIGKILL withheld: {why}", False
        res = send_signal(signal.SIGKILL, esc.identity, esc.pgid, esc.snapshot, self._procs,
                          self._guard)
        self._advance(esc, EscalationStep.SIGKILL, res.describe())
        left = wait_gone(esc.snapshot, self._verify_timeout, self._procs, self._stop, self._poll)
        if not left:
            return RecoveryStatus.KILLED, f"needed SIGKILL after {grace:g} s", False
        if self._stop.is_set():
            return None
        pids = [i.pid for i in left]
        if res.denied:
            return RecoveryStatus.FAILED, f"SIGKILL denied; still running: {pids}", True
        states = {i.pid: getattr(self._procs.read(i.pid), "state", "gone") for i in left}
        return (RecoveryStatus.UNKILLABLE,
                f"still there {self._verify_timeout:g} s after SIGKILL: {states}", True)

    def _do_command(self, esc: Escalation) -> _Outcome:
        if self._stop.is_set():
            return None
        refused = self._refusal(esc, "the command")
        if refused is not None:
            return refused
        why = self._guard.refuse(esc.identity.pid)
        if why:
            return RecoveryStatus.FAILED, f"refused: {why}", True
        argv = substitute(self._r.command, self._values(esc))
        self._advance(esc, EscalationStep.COMMAND, repr(argv))
        result = run_command(argv, self._r.command_timeout, self._stop)
        if result.returncode is None:
            if self._stop.is_set():
                return None
            return RecoveryStatus.FAILED, f"command {result.detail}", True
        if result.returncode != 0:
            return RecoveryStatus.FAILED, f"command {result.detail}", True
        # Exit 0 only says the command ran; the status says what happened to the session.
        left = wait_gone([esc.identity], self._r.grace, self._procs, self._stop, self._poll)
        if not left:
            return RecoveryStatus.TERMINATED, f"command {result.detail}; the process is gone", False
        if self._stop.is_set():
            return None
        return (RecoveryStatus.FAILED,
                f"command {result.detail} but the process is still running after {self._r.grace:g} s",
                True)

    def _advance(self, esc: Escalation, step_name: EscalationStep, detail: str) -> None:
        now = self._clock()
        with self._lock:
            esc.step, esc.time = transition(esc.step, step_name), now
            self._record(esc, step_name, now, detail=detail)
        self._persist()

    @staticmethod
    def _values(esc: Escalation) -> dict[str, str]:
        return {"pid": str(esc.identity.pid), "pgid": str(esc.pgid), "session_id": esc.session_id}

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
        reused = not gone and info is not None and not same_identity(info.identity, esc.identity)
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
                parsed.append(StateFile.parse(data, now))
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
                    "recoveries": list(self._recent),
                    "escalations": escalations,
                    "given_up": [[i.pid, i.create_time] for i in self._given_up],
                }
            self._store.save(data)

