"""The pure recovery policy: every gate, one at a time, with a fake clock (no sleeps)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import replace

import pytest

from otelwatch.config import Config, RecoveryConfig
from otelwatch.model import ProcessIdentity, Reason, SampleStatus, State, same_process
from otelwatch.recovery.policy import (
    Decision,
    PolicyContext,
    SessionView,
    Window,
    step,
)
from tests.support.recovery_builders import CT, PID, SELF, T0, config, context, make_view, proc


def run(views: Iterable[SessionView], ctx: PolicyContext, recent: Sequence[float] = (),
        window: Window | None = None) -> tuple[Window | None, Decision]:
    decision: Decision | None = None
    for v in views:
        window, decision = step(window, v, v.sample.time, ctx, recent)
    assert decision is not None
    return window, decision


def ticks(n: int, dt: float = 1.0, **kw: object) -> list[SessionView]:
    return [make_view(T0 + i * dt, **kw) for i in range(n)]  # type: ignore[arg-type]


def failed(decision: Decision) -> set[str]:
    return {g.name for g in decision.failed}


# --------------------------------------------------------------------------- the happy path


def test_acts_only_after_recover_after_of_observed_quiet_ticks() -> None:
    ctx = context()
    _, early = run(ticks(10), ctx)  # 9 s of a 10 s window
    assert not early.act and failed(early) == {"window"}
    _, due = run(ticks(11), ctx)  # exactly 10 s
    assert due.act, due.summary()
    assert due.reason == "no_activity" and due.kind == "stuck"
    assert due.window is not None and due.window.ticks == 11


def test_default_recover_after_is_the_effective_one() -> None:
    ctx = context(config(recover_after=None))
    assert ctx.recover_after == 300.0  # max(300, 3 x stall_after=5)
    assert context(Config(recovery=RecoveryConfig(enabled=True))).recover_after == 900.0


def test_a_session_that_is_not_stuck_is_judged_by_its_verdict_alone() -> None:
    # The per-tick path of every healthy session: no other gate is computed (nor could
    # matter), and no window is kept.
    ctx = context(config(protect=("x",)))
    w, d = run(ticks(3, state=State.ACTIVE, reason=Reason.RECENT_PROGRESS, uid=None, cmd=()), ctx)
    assert not d.act and w is None and d.window is None
    assert [g.name for g in d.gates] == ["verdict"] and d.kind == "" and d.reason == ""


def test_one_tick_is_never_a_window() -> None:
    ctx = context(recover_after=0.0)
    _, d = run(ticks(1), ctx)
    assert not d.act and "window" in failed(d)


# --------------------------------------------------------------------------- each gate


@pytest.mark.parametrize(
    ("last", "gate"),
    [
        ({"state": State.STALLED, "reason": Reason.CPU_SPIN}, "verdict"),
        ({"state": State.STALLED, "reason": Reason.WAITING_ON_NETWORK}, "verdict"),
        ({"state": State.LONG_RUNNING, "reason": Reason.TOOL_RUNNING}, "verdict"),
        ({"state": State.IDLE, "reason": Reason.NO_OPEN_TURN}, "verdict"),
        ({"state": State.ACTIVE, "reason": Reason.RECENT_PROGRESS}, "verdict"),
        ({"tcp": 1}, "tcp"),
        ({"tcp": None}, "tcp"),
        ({"cpu": 1.0}, "cpu"),
        ({"cpu": None}, "cpu"),
        ({"status": SampleStatus.PROBE_TIMEOUT}, "sample"),
        ({"status": SampleStatus.ACCESS_DENIED}, "sample"),
        ({"status": SampleStatus.ZOMBIE}, "sample"),
        ({"root_status": "T"}, "not_stopped"),
        ({"root_status": "t"}, "not_stopped"),
    ],
)
def test_a_failing_tick_gate_on_the_last_tick_prevents_recovery(last: dict[str, object], gate: str) -> None:
    ctx = context()
    views = [*ticks(11)[:-1], make_view(T0 + 10, **last)]  # type: ignore[arg-type]
    window, d = run(views, ctx)
    assert not d.act
    assert gate in failed(d)
    assert window is None  # and the window starts again


def test_a_failing_tick_gate_anywhere_in_the_window_restarts_it() -> None:
    ctx = context()
    views = ticks(21)
    views[5] = make_view(T0 + 5, cpu=3.0)
    _, d = run(views[:16], ctx)  # 10 s after the first tick, but only 10 since the bad one
    assert not d.act and failed(d) == {"window"}
    _, d = run(views[:17], ctx)
    assert d.act


def test_cpu_over_the_window_counts_even_when_each_sample_says_idle() -> None:
    # Each sample claims 0.0 %, but cumulative CPU grew 0.5 s in 10 s: 5 %.
    ctx = context()
    views = [make_view(T0 + i, cpu_s=1.0 + 0.05 * i) for i in range(11)]
    _, d = run(views, ctx)
    assert not d.act and failed(d) == {"cpu_window"}


@pytest.mark.parametrize(
    "change",
    [
        {"events": 6},
        {"ct": CT + 1.0},
        {"children": (proc(5000, PID, cmd=("sh", "-c", "x")),)},
    ],
    ids=["new-event", "pid-reused", "new-child"],
)
def test_any_change_inside_the_window_starts_it_again(change: dict[str, object]) -> None:
    ctx = context()
    views = [*ticks(10), *(make_view(T0 + i, **change) for i in range(10, 21))]  # type: ignore[arg-type]
    _, d = run(views[:20], ctx)  # 19 s after the first tick, 9 s after the change
    assert not d.act and failed(d) == {"window"}
    _, d = run(views, ctx)
    assert d.act


def test_a_gap_between_observations_is_not_evidence() -> None:
    ctx = context()
    views = [make_view(T0), make_view(T0 + 1), make_view(T0 + 9), make_view(T0 + 10)]  # 8 s gap > 3 s
    _, d = run(views, ctx)
    assert not d.act and failed(d) == {"window"}
    views = [make_view(T0 + 10), make_view(T0 + 9)]  # the clock went back
    w, _ = run(views, ctx)
    assert w is not None and w.ticks == 1


def test_pid1_self_and_ancestors_are_never_recovered() -> None:
    ctx = context()
    assert failed(run(ticks(11, pid=1), ctx)[1]) == {"not_pid1"}
    assert failed(run(ticks(11, pid=SELF), ctx)[1]) == {"not_self"}
    assert failed(run(ticks(11, pid=50), ctx)[1]) == {"not_ancestor"}
    assert failed(run(ticks(11), context(self_ancestors=frozenset({PID})))[1]) == {"not_ancestor"}
    child_self = (proc(SELF, PID),)
    assert "not_self" in failed(run(ticks(11, children=child_self), ctx)[1])


def test_protect_matches_root_and_descendants_and_unknown_is_refused() -> None:
    ctx = context(config(protect=("important-build",)))
    assert run(ticks(11), ctx)[1].act
    assert failed(run(ticks(11, cmd=("node", "important-build.js")), ctx)[1]) == {"not_protected"}
    child = (proc(5000, PID, cmd=("make", "important-build")),)
    assert failed(run(ticks(11, children=child), ctx)[1]) == {"not_protected"}
    unknown = (proc(5000, PID, cmd=()),)
    assert failed(run(ticks(11, children=unknown), ctx)[1]) == {"not_protected"}
    zombie = (proc(5000, PID, cmd=(), status="Z"),)
    assert run(ticks(11, children=zombie), ctx)[1].act


def test_owner_must_be_known_and_allowed_for_the_whole_tree() -> None:
    ctx = context()
    assert failed(run(ticks(11, uid=None), ctx)[1]) == {"owner_allowed"}
    assert failed(run(ticks(11, uid=0), ctx)[1]) == {"owner_allowed"}
    root_child = (proc(5000, PID, uid=0),)
    assert failed(run(ticks(11, children=root_child), ctx)[1]) == {"owner_allowed"}


def test_disabled_never_acts() -> None:
    d = run(ticks(30), context(config(enabled=False)))[1]
    assert not d.act and failed(d) == {"enabled"}


def test_rate_limit_counts_the_rolling_hour() -> None:
    ctx = context(config(max_per_hour=2))
    now = T0 + 10
    d = run(ticks(11), ctx, recent=[now - 100, now - 200])[1]
    assert not d.act and failed(d) == {"rate_limit"}
    assert run(ticks(11), ctx, recent=[now - 100, now - 3601])[1].act
    # A recovery stamped in the future (the clock went back) still counts.
    assert not run(ticks(11), ctx, recent=[now + 500, now - 1])[1].act
    assert not run(ticks(11), context(config(max_per_hour=0)))[1].act


def test_given_up_identity_is_not_retried() -> None:
    ctx = context()
    window = None
    d = None
    for v in ticks(11):
        window, d = step(window, v, v.sample.time, ctx, (), [ProcessIdentity(PID, CT)])
    assert d is not None and failed(d) == {"not_given_up"}


def test_waiting_on_network_extension_is_off_by_default_and_on_when_set() -> None:
    net = {"state": State.STALLED, "reason": Reason.WAITING_ON_NETWORK, "tcp": 1}
    assert context().network_after == 0.0
    assert not run(ticks(100, **net), context())[1].act  # type: ignore[arg-type]
    ctx = context(config(waiting_on_network_after=30.0))
    assert not run(ticks(30, **net), ctx)[1].act  # type: ignore[arg-type]
    d = run(ticks(31, **net), ctx)[1]  # type: ignore[arg-type]
    assert d.act and d.reason == "waiting_on_network"
    # Still needs idle CPU and known TCP.
    assert not run([*ticks(30, **net), make_view(T0 + 30, **{**net, "cpu": 50.0})], ctx)[1].act  # type: ignore[arg-type]
    assert not run([*ticks(30, **net), make_view(T0 + 30, **{**net, "tcp": None})], ctx)[1].act  # type: ignore[arg-type]


def test_resume_needs_two_quiet_ticks_of_the_same_identity() -> None:
    ctx = context()
    me = ProcessIdentity(PID, CT)
    w, d = step(None, make_view(T0), T0, ctx, resume=me)
    assert not d.act
    w, d = step(w, make_view(T0 + 1), T0 + 1, ctx, resume=me)
    assert d.act, d.summary()
    # Not for another identity, and the rate limit was already paid.
    w2, d2 = step(None, make_view(T0), T0, ctx, resume=ProcessIdentity(PID, CT + 5))
    _, d2 = step(w2, make_view(T0 + 1), T0 + 1, ctx, resume=ProcessIdentity(PID, CT + 5))
    assert not d2.act and "identity" in failed(d2)
    _, d3 = step(w, make_view(T0 + 2), T0 + 2, replace(ctx, max_per_hour=0), resume=me)
    assert d3.act


def test_same_process_tolerates_float_noise_not_another_tick() -> None:
    a = ProcessIdentity(10, 1000.0)
    assert same_process(a, ProcessIdentity(10, 1000.0 + 1e-9))
    assert not same_process(a, ProcessIdentity(10, 1000.01))
    assert not same_process(a, ProcessIdentity(11, 1000.0))
    assert not same_process(a, None)


def test_summary_names_failing_gates() -> None:
    d = run(ticks(11, cpu=50.0), context())[1]
    assert "cpu=FAIL" in d.summary() and "50.00%" in d.summary()


@pytest.mark.parametrize(
    "blip",
    [{"ct": CT + 1.0}, {"children": (proc(5000, PID, cpu_s=0.0),)}, {"pid": PID + 1}],
    ids=["identity", "tree", "pid"],
)
def test_a_one_tick_blip_of_another_process_or_tree_restarts_the_window(blip: dict[str, object]) -> None:
    # The decision-time gates alone would not see a blip that has reverted by then.
    ctx = context()
    views = ticks(21)
    views[5] = make_view(T0 + 5, **blip)  # type: ignore[arg-type]
    _, d = run(views[:16], ctx)  # 15 s after the first tick, only 9 s since the blip
    assert not d.act and failed(d) == {"window"}
    assert run(views[:17], ctx)[1].act


def test_one_missed_tick_breaks_the_window() -> None:
    # The daemon skips sessions whose probe failed; that tick must not count as quiet.
    ctx = context()
    assert ctx.max_gap == 1.5
    views = [v for i, v in enumerate(ticks(25)) if i != 8]
    _, d = run(views[:20], ctx)  # 20 s after the first tick, 11 s after the missed one
    assert d.act
    _, d = run(views[:11], ctx)  # 11 s after the first tick, but across the gap
    assert not d.act and failed(d) == {"window"}
