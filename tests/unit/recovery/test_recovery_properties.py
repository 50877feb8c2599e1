"""Property: over random histories of views, the pure policy requests recovery exactly
when an independent re-statement of every gate says it may, never when any gate fails."""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from otelwatch.model import Reason, SampleStatus, State
from otelwatch.recovery.policy import RATE_WINDOW, SessionView, Window, step
from tests.support.recovery_builders import CT, PID, SELF, T0, UID, config, context, make_view, proc

RECOVER_AFTER = 3.0
IDLE = 1.0
MAX_GAP = 1.5  # 1.5 x interval (1 s)
PROTECTED = ("bash", "deploy-prod")


@dataclass(frozen=True)
class Tick:
    dt: float
    restart: bool  # restart_windows() before this observation
    view: SessionView


# A history is mostly quiet stuck ticks, so that windows do complete. Per tick, at most
# one transient thing differs (one tick of CPU, an event, a probe timeout...). Who the
# process is (pid, create time, owner, cmdline, children) changes rarely and then sticks,
# so windows also complete for processes that must be refused.
_TRANSIENT: list[tuple[str, tuple[object, ...]]] = [
    ("verdict", ((State.STALLED, Reason.CPU_SPIN), (State.IDLE, Reason.NO_OPEN_TURN),
                 (State.LONG_RUNNING, Reason.TOOL_RUNNING), (State.STALLED, Reason.WAITING_ON_NETWORK))),
    ("events", (1,)),
    ("cpu_step", (0.001, 0.2, -1.0)),
    ("tcp", (None, 1)),
    ("cpu", (None, 0.5, 5.0)),
    ("status", (SampleStatus.PROBE_TIMEOUT, SampleStatus.ZOMBIE)),
    ("root_status", ("T",)),
]
_STICKY: list[tuple[str, tuple[object, ...]]] = [
    ("child", (None, proc(5000, PID), proc(5000, PID, cpu_s=0.0), proc(5000, PID, cpu_s=0.0, ct=CT + 2),
               proc(5000, PID, cmd=PROTECTED), proc(5000, PID, uid=0), proc(5000, PID, uid=None),
               proc(SELF, PID), proc(5001, PID, status="T"), proc(5002, PID, cmd=()),
               proc(5003, PID, cmd=(), status="Z"))),
    ("pid", (PID, 1, SELF, 50)),
    ("ct", (CT, CT + 1.0)),
    ("uid", (UID, None, 0)),
    ("cmd", (("node", "agent"), PROTECTED, ())),
]


@st.composite
def histories(draw: st.DrawFn) -> list[tuple[float, bool, SessionView]]:
    n = draw(st.integers(1, 40))
    t = T0
    events = 0
    cpu_s = 1.0
    sticky: dict[str, object] = {}
    out = []
    for _ in range(n):
        t += draw(st.sampled_from([1.0, 1.0, 1.0, 0.5, MAX_GAP, MAX_GAP + 0.5, -0.5]))
        restart = draw(st.integers(0, 30)) == 0
        which = draw(st.integers(0, 4 * len(_TRANSIENT) + len(_STICKY)))
        bad: dict[str, object] = {}
        if which < len(_TRANSIENT):
            key, values = _TRANSIENT[which]
            bad[key] = draw(st.sampled_from(values))
        elif which < len(_TRANSIENT) + len(_STICKY):
            key, values = _STICKY[which - len(_TRANSIENT)]
            sticky[key] = draw(st.sampled_from(values))
        events += int(bad.pop("events", 0))  # type: ignore[call-overload]
        step_cpu = float(bad.pop("cpu_step", 0.0))  # type: ignore[arg-type]
        cpu_s = 0.1 if step_cpu < 0 else cpu_s + step_cpu
        verdict: tuple[State, Reason] = bad.pop("verdict", (State.STUCK, Reason.NO_ACTIVITY))  # type: ignore[assignment]
        state, reason = verdict
        kw = {**sticky, **bad}
        child = kw.pop("child", None)
        view = make_view(t, state=state, reason=reason, cpu_s=cpu_s, events=events,
                         children=() if child is None else (child,), **kw)  # type: ignore[arg-type]
        out.append((t, restart, view))
    return out


# --------------------------------------------------------------------------- the oracle
# Written from DESIGN.md's gate list, independently of policy.py's incremental code.


def tick_ok(v: SessionView) -> bool:
    s = v.sample
    return (
        v.verdict.state is State.STUCK
        and s.status is SampleStatus.OK
        and s.root == v.identity
        and s.tcp is not None and sum(s.tcp.values()) == 0
        and s.cpu_percent is not None and s.cpu_percent < IDLE
        and all(p.status not in ("T", "t") for p in s.processes)
    )


def static_ok(v: SessionView, *, enabled: bool, protect: bool) -> bool:
    pids = {p.pid for p in v.sample.processes} | {v.identity.pid}
    if not enabled or min(pids) <= 1 or SELF in pids or pids & {50, 60}:
        return False
    if v.uid != UID or any(p.uid not in (None, UID) for p in v.sample.processes):
        return False
    if protect:
        for argv, status in [(v.cmdline, "S")] + [(p.cmdline, p.status) for p in v.sample.processes[1:]]:
            if not argv and status != "Z":
                return False
            if "deploy-prod" in " ".join(argv):
                return False
    return True


def oracle(hist: list[tuple[float, bool, SessionView]], i: int, acted: list[int], *, enabled: bool,
           protect: bool, max_per_hour: int) -> bool:
    t_i, _, v_i = hist[i]
    if not tick_ok(v_i) or not static_ok(v_i, enabled=enabled, protect=protect):
        return False
    if sum(1 for k in acted if hist[k][0] > t_i - RATE_WINDOW) >= max_per_hour:
        return False
    tree = {p.identity for p in v_i.sample.processes}
    j = i
    while j > 0:  # extend the window back while nothing moved
        t_prev, _, v_prev = hist[j - 1]
        t_j, restart_j, v_j = hist[j]
        if restart_j or (j - 1) in acted:
            break
        if not (0 <= t_j - t_prev <= MAX_GAP):
            break
        if v_prev.sample.cpu_seconds > v_j.sample.cpu_seconds:
            break
        if not tick_ok(v_prev) or v_prev.identity != v_i.identity or v_prev.events != v_i.events:
            break
        if {p.identity for p in v_prev.sample.processes} != tree:
            break
        j -= 1
    t_j, _, v_j = hist[j]
    duration = t_i - t_j
    if j == i or duration < RECOVER_AFTER:
        return False
    return 100.0 * (v_i.sample.cpu_seconds - v_j.sample.cpu_seconds) / duration < IDLE


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(hist=histories(), enabled=st.booleans() | st.just(True), protect=st.booleans(),
       max_per_hour=st.sampled_from([0, 1, 2, 6]))
def test_policy_acts_exactly_when_every_gate_holds(
    hist: list[tuple[float, bool, SessionView]], enabled: bool, protect: bool, max_per_hour: int
) -> None:
    cfg = config(enabled=enabled, recover_after=RECOVER_AFTER, max_per_hour=max_per_hour,
                 protect=("deploy-prod",) if protect else ())
    ctx = context(cfg)
    window: Window | None = None
    recent: list[float] = []
    acted: list[int] = []
    for i, (t, restart, view) in enumerate(hist):
        if restart:
            window = None
        window, decision = step(window, view, t, ctx, recent)
        expected = oracle(hist, i, acted, enabled=enabled, protect=protect, max_per_hour=max_per_hour)
        assert decision.act == expected, (i, decision.summary())
        if decision.act:
            assert not decision.failed
            recent.append(t)
            acted.append(i)
            window = None
    event(f"recoveries: {min(len(acted), 2)}")


def test_the_generator_does_produce_recoveries() -> None:
    # Guard against a vacuous property: a quiet history must be recovered.
    ctx = context(config(recover_after=RECOVER_AFTER))
    window: Window | None = None
    acts = 0
    for i in range(5):
        v = make_view(T0 + i)
        window, d = step(window, v, v.sample.time, ctx)
        if d.act:
            acts += 1
            window = None  # as Recovery does after a decision
    assert acts == 1
