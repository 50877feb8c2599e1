"""The escalation state machine: the order of a recovery's steps, and the worker that takes them.

`TRANSITIONS`/`transition` say which step may follow which (requested ->
sigterm -> sigkill, or requested -> command; any step ends in completed).
`Escalator.run` takes one escalation through them on its worker thread: it
re-checks, just before each signal, that no new event arrived (from the latest
view `Recovery.observe` saw) and re-identifies every process from /proc; then
SIGTERM, a wait of `grace` polling for exit, SIGKILL to what is left, and a
short verify wait (or, for `action = "command"`, the command and a wait for the
process to go). Each step taken is handed to `advance`, which records and
persists it before the next one starts, so a restart never forgets an escalation.

Decides nothing: it only continues what `Recovery` (`coordinator.py`) started
after every gate held, and stops at the first re-check that fails.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Mapping

from otelwatch.config import RecoveryConfig
from otelwatch.model import EscalationStep, RecoveryStatus, same_process
from otelwatch.recovery.actuator import (
    GONE_STATES,
    Guard,
    ProcView,
    run_command,
    send_signal,
    substitute,
    wait_gone,
)
from otelwatch.recovery.policy import PolicyContext, SessionView, tick_gates
from otelwatch.recovery.state import Escalation

__all__ = ["TRANSITIONS", "Escalator", "Outcome", "command_values", "transition"]

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
Outcome = tuple[RecoveryStatus, str, bool] | None


def command_values(esc: Escalation) -> dict[str, str]:
    """What `{pid}`, `{pgid}` and `{session_id}` in `recovery.command` stand for."""
    return {"pid": str(esc.identity.pid), "pgid": str(esc.pgid), "session_id": esc.session_id}


class Escalator:
    """Takes escalations through their steps, each on the worker thread `Recovery`
    started for it; holds nothing but what every escalation shares (config, the /proc
    view, the guard, the shutdown event)."""

    def __init__(self, r: RecoveryConfig, ctx: PolicyContext, procs: ProcView, guard: Guard, *,
                 stop: threading.Event, clock: Callable[[], float], verify_timeout: float, poll: float,
                 latest: Callable[[str], SessionView | None],
                 advance: Callable[[Escalation, EscalationStep, str], None]) -> None:
        self._r = r
        self._ctx = ctx
        self._procs = procs
        self._guard = guard
        self._stop = stop  # set at shutdown: a wait ends, and no further step is taken
        self._clock = clock
        self._verify_timeout = verify_timeout
        self._poll = poll
        self._latest = latest  # the session's latest view, None once it is no longer tracked
        self._advance = advance  # a step was taken: record it and persist it before the next

    def run(self, esc: Escalation) -> Outcome:
        """Continue `esc` from its current step to its outcome (None: stopped by shutdown)."""
        return self._do_command(esc) if esc.action == "command" else self._do_signal(esc)

    def _quiet(self, esc: Escalation, *, strict: bool) -> str:
        """Why acting now would be wrong ("" when it is not), from the latest view.
        Before the first signal the verdict must still qualify (strict); before SIGKILL
        only a new event holds it back: a process busy in its SIGTERM handler past
        `grace` is what SIGKILL is for."""
        view = self._latest(esc.session_id)
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

    def _refusal(self, esc: Escalation, before: str) -> Outcome:
        """Why the first action must not happen (None: go ahead): the latest view must
        still qualify, and /proc must show the decided process alive, same identity."""
        why = self._quiet(esc, strict=True)
        if why:
            return RecoveryStatus.FAILED, f"aborted before {before}: {why}", False
        info = self._procs.read(esc.identity.pid)
        if info is None or info.state in GONE_STATES:
            return RecoveryStatus.VANISHED, f"the process was gone before {before}", False
        if not same_process(info.identity, esc.identity):
            return (RecoveryStatus.IDENTITY_CHANGED,
                    f"pid {esc.identity.pid} now belongs to a process started at {info.create_time:.2f} "
                    f"(expected {esc.identity.create_time:.2f}); nothing signalled", False)
        return None

    def _do_signal(self, esc: Escalation) -> Outcome:
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

    def _do_command(self, esc: Escalation) -> Outcome:
        if self._stop.is_set():
            return None
        refused = self._refusal(esc, "the command")
        if refused is not None:
            return refused
        why = self._guard.refuse(esc.identity.pid)
        if why:
            return RecoveryStatus.FAILED, f"refused: {why}", True
        argv = substitute(self._r.command, command_values(esc))
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
