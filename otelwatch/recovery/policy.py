"""The recovery policy: pure gates deciding whether a session may be recovered now.

This module owns the decision and nothing else. It takes one `SessionView` per
tick plus the previous `Window` (`step`) and returns the next window and a
`Decision` listing every gate with its result (only the verdict gate when the
verdict is not a recoverable one: that is every healthy session every tick).
Time comes in as a number; it never reads the clock, /proc or the environment
and never sends a signal: it imports no `os`, `time` or `psutil`. The actuator
(`actuator.py`) does the I/O and asks this module before every step.

A false recovery of a working session is the worst bug otelwatch can have, so
every gate fails closed: unknown (None) CPU, TCP or owner is never "zero" or
"allowed", and any change inside the window (identity, process tree, event
count, a gap between ticks) starts the window again.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass

from otelwatch.config import Config, effective_recover_after
from otelwatch.model import (
    ProcessIdentity,
    Reason,
    SampleStatus,
    State,
    TreeSample,
    Verdict,
    same_process,
)

__all__ = [
    "KIND_NETWORK",
    "KIND_STUCK",
    "RATE_WINDOW",
    "Decision",
    "Gate",
    "PolicyContext",
    "SessionView",
    "Window",
    "recent_count",
    "step",
    "tick_gates",
]

RATE_WINDOW = 3600.0  # max_per_hour counts decisions in this rolling window
KIND_STUCK = "stuck"  # state stuck / no_activity: the default recoverable case
KIND_NETWORK = "waiting_on_network"  # opt-in extension (recovery.waiting_on_network_after)
_STOPPED = frozenset({"T", "t"})  # stopped by a person (Ctrl-Z) or traced by a debugger


@dataclass(frozen=True)
class SessionView:
    """What the daemon knows about one live session at one tick."""

    session_id: str
    agent: str
    identity: ProcessIdentity  # root pid + create_time as probed this tick
    pgid: int
    uid: int | None  # owner of the root process; None: unknown (refused)
    cmdline: tuple[str, ...]
    verdict: Verdict  # this tick's classification
    sample: TreeSample  # this tick's sample (processes with identities, cpu, tcp)
    events: int  # activity.events so far
    # DESIGN "Recovery needs an own turn": a turn-based session's open turn was opened by
    # an own event (its transcript, session file, exec wrapper, registry events file, a
    # hook checked to run in its tree). False for an idle one, and for a turn opened only
    # by observed events (HTTP, the spool, anything naming a PID). Headless sessions: True.
    own_turn: bool = True
    # An extra condition, not the wall: a turn-based session's own processes (or output) showed work after its turn
    # opened. False: only an event made it "processing", and an event alone never
    # opens the recovery gate. Headless sessions: True.
    reacted: bool = True

    @property
    def tree(self) -> frozenset[ProcessIdentity]:
        return frozenset(p.identity for p in self.sample.processes)


@dataclass(frozen=True)
class Gate:
    name: str
    ok: bool
    detail: str = ""


@dataclass(frozen=True)
class PolicyContext:
    """Everything the gates need besides the view: config and who otelwatch is."""

    enabled: bool
    recover_after: float
    network_after: float  # 0: the waiting_on_network extension is off
    cpu_idle_percent: float
    max_gap: float  # two observations further apart than this break the window
    max_per_hour: int
    protect: tuple[re.Pattern[str], ...]
    allowed_uids: frozenset[int]
    self_pid: int
    self_ancestors: frozenset[int] = frozenset()

    @classmethod
    def from_config(
        cls,
        cfg: Config,
        *,
        self_pid: int,
        allowed_uids: Collection[int],
        self_ancestors: Iterable[int] = (),
    ) -> PolicyContext:
        r = cfg.recovery
        return cls(
            enabled=r.enabled,
            recover_after=effective_recover_after(r, cfg.classify),
            network_after=r.waiting_on_network_after,
            cpu_idle_percent=cfg.classify.cpu_idle_percent,
            # One missed observation breaks the window: the daemon may skip a session
            # whose probe failed, and a tick it did not see is not evidence of silence.
            # Ticks start on a fixed schedule, so half an interval absorbs their jitter.
            max_gap=1.5 * cfg.interval,
            max_per_hour=r.max_per_hour,
            protect=tuple(re.compile(p) for p in r.protect),
            allowed_uids=frozenset(allowed_uids),
            self_pid=self_pid,
            self_ancestors=frozenset(self_ancestors),
        )


@dataclass(frozen=True)
class Window:
    """A run of consecutive observed ticks in which the tick gates held and nothing moved."""

    kind: str  # KIND_STUCK or KIND_NETWORK
    identity: ProcessIdentity
    started: float
    last: float
    ticks: int
    events: int
    tree: frozenset[ProcessIdentity]
    cpu_seconds_start: float  # tree cumulative CPU at the first tick
    cpu_seconds_last: float

    @property
    def duration(self) -> float:
        return self.last - self.started

    @property
    def cpu_percent(self) -> float | None:
        """The tree's CPU rate over the whole window (percent of one core)."""
        if self.duration <= 0:
            return None
        return 100.0 * (self.cpu_seconds_last - self.cpu_seconds_start) / self.duration


@dataclass(frozen=True)
class Decision:
    act: bool
    kind: str  # KIND_* when the verdict qualifies, else ""
    reason: str  # reason reported with recovery.requested: the verdict's reason
    gates: tuple[Gate, ...]
    window: Window | None

    @property
    def failed(self) -> tuple[Gate, ...]:
        return tuple(g for g in self.gates if not g.ok)

    def gate(self, name: str) -> Gate | None:
        return next((g for g in self.gates if g.name == name), None)

    def summary(self) -> str:
        """One line for logs: the failing gates, or every gate when all hold."""
        shown = self.failed or self.gates
        return "; ".join(f"{g.name}={'ok' if g.ok else 'FAIL'}" + (f" ({g.detail})" if g.detail else "")
                         for g in shown)


# --------------------------------------------------------------------------- tick gates


def _kind(verdict: Verdict, ctx: PolicyContext) -> str:
    if verdict.state is State.STUCK and verdict.reason is Reason.NO_ACTIVITY:
        return KIND_STUCK
    if (ctx.network_after > 0 and verdict.state is State.STALLED
            and verdict.reason is Reason.WAITING_ON_NETWORK):
        return KIND_NETWORK
    return ""


def tick_gates(view: SessionView, ctx: PolicyContext) -> tuple[str, tuple[Gate, ...]]:
    """Gates that must hold in EVERY observed tick of a window. Returns (kind, gates)."""
    v, s = view.verdict, view.sample
    kind = _kind(v, ctx)
    gates = [Gate("verdict", bool(kind), f"{v.state.value}/{v.reason.value}")]

    root = s.processes[0].identity if s.processes else None
    sample_ok = (
        s.status is SampleStatus.OK
        and same_process(s.root, view.identity)
        and same_process(root, view.identity)
    )
    gates.append(Gate("sample", sample_ok, s.status.value if s.status is not SampleStatus.OK
                      else ("" if sample_ok else "sample is of another process")))

    total = s.tcp_total
    if kind == KIND_NETWORK:
        # The extension is for sessions asleep on a socket: TCP must be known, not zero.
        gates.append(Gate("tcp", total is not None, "unknown" if total is None else f"{total} open"))
    else:
        gates.append(Gate("tcp", total == 0, "unknown" if total is None else f"{total} open"))

    cpu = s.cpu_percent
    gates.append(Gate("cpu", cpu is not None and cpu < ctx.cpu_idle_percent,
                      "unknown" if cpu is None else f"{cpu:.2f}% (idle < {ctx.cpu_idle_percent:g}%)"))

    stopped = [p.pid for p in s.processes if p.status in _STOPPED]
    gates.append(Gate("not_stopped", not stopped, f"stopped/traced: {stopped}" if stopped else ""))
    return kind, tuple(gates)


def _advance(window: Window | None, view: SessionView, now: float, ctx: PolicyContext, kind: str,
             tree: frozenset[ProcessIdentity]) -> Window:
    """The window after a tick whose tick gates all held (`kind`, `tree`: of `view`)."""
    cpu_s = view.sample.cpu_seconds
    if (
        window is None
        or window.kind != kind
        or not same_process(window.identity, view.identity)
        or window.events != view.events
        or window.tree != tree
        or now < window.last  # the clock went back: nothing before can be trusted
        or now - window.last > ctx.max_gap  # unobserved time is not evidence
        or cpu_s < window.cpu_seconds_last  # counters went back: not the same tree
    ):
        return Window(kind, view.identity, now, now, 1, view.events, tree, cpu_s, cpu_s)
    return Window(kind, window.identity, window.started, now, window.ticks + 1, window.events,
                  window.tree, window.cpu_seconds_start, cpu_s)


# --------------------------------------------------------------------------- decision


def recent_count(times: Iterable[float], now: float) -> int:
    """Recoveries in the rolling hour before `now`. Times in the future (a clock that
    went back) count too: the limit fails closed."""
    return sum(1 for t in times if t > now - RATE_WINDOW)


def _decide(
    window: Window | None,
    view: SessionView,
    now: float,
    ctx: PolicyContext,
    recent: Sequence[float],
    given_up: Collection[ProcessIdentity],
    resume: ProcessIdentity | None,
    kind: str,
    tick: tuple[Gate, ...],
    tree: frozenset[ProcessIdentity],
) -> Decision:
    """Every gate for `view` given the window that includes it (from `_advance`).

    `resume` is the identity of an escalation persisted before a restart: it is
    continued when the same identity is stuck again over two consecutive observed
    ticks with every other gate holding; the long window and the rate limit were
    already passed when it was first decided and are not required again.
    """
    gates: list[Gate] = [Gate("enabled", ctx.enabled)]
    gates.extend(tick)

    need = ctx.network_after if kind == KIND_NETWORK else ctx.recover_after
    if window is None:
        gates.append(Gate("window", False, "no quiet window"))
    elif resume is not None:
        gates.append(Gate("window", window.ticks >= 2, f"resume: {window.ticks} quiet tick(s) of 2"))
    else:
        gates.append(Gate("window", window.ticks >= 2 and window.duration >= need,
                          f"{window.duration:.1f} s of {need:g} s over {window.ticks} tick(s)"))

    rate = window.cpu_percent if window is not None else None
    if window is not None and window.ticks >= 2:
        gates.append(Gate("cpu_window", rate is not None and rate < ctx.cpu_idle_percent,
                          "unknown" if rate is None else f"{rate:.2f}% over the window"))
    else:
        gates.append(Gate("cpu_window", False, "no rate yet"))

    same = window is not None and same_process(window.identity, view.identity)
    if resume is not None:
        same = same and same_process(resume, view.identity)
    gates.append(Gate("identity", same, f"{view.identity.pid}@{view.identity.create_time:.2f}"))
    gates.append(Gate("tree", window is not None and window.tree == tree, f"{len(tree)} process(es)"))
    gates.append(Gate("events", window is not None and window.events == view.events,
                      f"{view.events} event(s)"))

    pids = {p.pid for p in view.sample.processes} | {view.identity.pid}
    low = sorted(p for p in pids if p <= 1)
    gates.append(Gate("not_pid1", not low, f"pid {low}" if low else ""))
    gates.append(Gate("not_self", ctx.self_pid not in pids, "otelwatch is in this tree"
                      if ctx.self_pid in pids else ""))
    ancestors = ctx.self_ancestors & pids
    gates.append(Gate("not_ancestor", not ancestors,
                      f"ancestors of otelwatch: {sorted(ancestors)}" if ancestors else ""))

    gates.append(Gate("own_turn", view.own_turn, "" if view.own_turn
                      else "no turn opened by the session itself (observed events never count)"))
    gates.append(Gate("reacted", view.reacted, "" if view.reacted
                      else "no work by the session's own processes since its turn opened"))
    gates.append(_protect_gate(view, ctx))
    gates.append(_owner_gate(view, ctx))

    if resume is not None:
        gates.append(Gate("rate_limit", True, "resumed escalation"))
    else:
        used = recent_count(recent, now)
        gates.append(Gate("rate_limit", used < ctx.max_per_hour,
                          f"{used} of {ctx.max_per_hour} in the last hour"))
        gone = any(same_process(view.identity, g) for g in given_up)
        gates.append(Gate("not_given_up", not gone,
                          "an earlier recovery of this process failed" if gone else ""))

    act = all(g.ok for g in gates)
    return Decision(act, kind, view.verdict.reason.value if kind else "", tuple(gates), window)


def _protect_gate(view: SessionView, ctx: PolicyContext) -> Gate:
    if not ctx.protect:
        return Gate("not_protected", True)
    lines: list[tuple[int, tuple[str, ...]]] = [(view.identity.pid, view.cmdline)]
    lines.extend((p.pid, p.cmdline) for p in view.sample.processes if p.pid != view.identity.pid)
    for pid, argv in lines:
        if not argv:
            # An unknown cmdline might be the protected one. Zombies have none and
            # can no longer do work, so they do not block.
            status = next((p.status for p in view.sample.processes if p.pid == pid), "")
            if status == "Z":
                continue
            return Gate("not_protected", False, f"cmdline of pid {pid} unknown")
        text = " ".join(argv)
        for pattern in ctx.protect:
            if pattern.search(text):
                return Gate("not_protected", False, f"pid {pid} matches {pattern.pattern!r}")
    return Gate("not_protected", True)


def _owner_gate(view: SessionView, ctx: PolicyContext) -> Gate:
    if view.uid is None:
        return Gate("owner_allowed", False, "owner unknown")
    if view.uid not in ctx.allowed_uids:
        return Gate("owner_allowed", False, f"uid {view.uid} not allowed")
    foreign = sorted({p.uid for p in view.sample.processes
                      if p.uid is not None and p.uid not in ctx.allowed_uids})
    if foreign:
        return Gate("owner_allowed", False, f"tree has processes of uid {foreign}")
    return Gate("owner_allowed", True, f"uid {view.uid}")


def step(
    window: Window | None,
    view: SessionView,
    now: float,
    ctx: PolicyContext,
    recent: Sequence[float] = (),
    given_up: Collection[ProcessIdentity] = (),
    *,
    resume: ProcessIdentity | None = None,
) -> tuple[Window | None, Decision]:
    """Observe one tick: the next window (None when this tick breaks it) and the
    decision. When the decision acts, the caller drops the window so a next recovery
    needs a whole new one."""
    kind = _kind(view.verdict, ctx)
    if not kind:
        # Every healthy session, every tick: no other gate can matter, so none is computed.
        v = view.verdict
        return None, Decision(False, "", "", (Gate("verdict", False, f"{v.state.value}/{v.reason.value}"),),
                              None)
    _, tick = tick_gates(view, ctx)
    tree = view.tree
    nxt = _advance(window, view, now, ctx, kind, tree) if all(g.ok for g in tick) else None
    return nxt, _decide(nxt, view, now, ctx, recent, given_up, resume, kind, tick, tree)
