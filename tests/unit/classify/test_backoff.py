"""The report backoff (first report, then base, 2x, 4x ... capped; reset on any
fingerprint change; cleared when the session leaves stalled/stuck), the
fingerprint, and the late-tick rule. Pure: time is a number."""

from __future__ import annotations

import itertools
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from otelwatch.classify.backoff import ReportSchedule, fingerprint, next_report
from otelwatch.classify.lateness import LATE_TICK_MIN_S, is_late_tick
from otelwatch.config import ClassifyConfig
from otelwatch.events.activity import Activity
from otelwatch.model import Event, EventKind, Reason, SampleStatus, State, Verdict
from tests.support.classify_builders import NOW, acts, ev, proc, tree

CFG = ClassifyConfig(repeat_base=60.0, repeat_max=600.0)
FP: tuple[Any, ...] = (State.STUCK, Reason.NO_ACTIVITY, 7, frozenset())


def run(
    ticks: list[float], fp_at: dict[float, tuple[Any, ...]] | None = None, state: State = State.STUCK
) -> list[float]:
    """Feed ticks through next_report; return the times a report was made."""
    schedule: ReportSchedule | None = None
    reported = []
    fp = FP
    for t in ticks:
        if fp_at and t in fp_at:
            fp = fp_at[t]
        schedule, report = next_report(schedule, fp, state, t, CFG)
        if report:
            reported.append(t)
    return reported


def test_reports_back_off_doubling_to_the_cap() -> None:
    ticks = [float(t) for t in range(0, 4000, 5)]
    reported = run(ticks)
    gaps = [b - a for a, b in itertools.pairwise(reported)]
    assert reported[0] == 0.0
    assert gaps[:5] == [60.0, 120.0, 240.0, 480.0, 600.0]
    assert set(gaps[4:]) == {600.0}


def test_fingerprint_change_reports_at_once_and_resets() -> None:
    ticks = [float(t) for t in range(0, 1000, 5)]
    changed: tuple[Any, ...] = (State.STUCK, Reason.NO_ACTIVITY, 8, frozenset())
    reported = run(ticks, {500.0: changed})
    # 0, 60, 180, 420 under the first fingerprint; 500 at once; then 560, 680 ...
    assert reported == [0.0, 60.0, 180.0, 420.0, 500.0, 560.0, 680.0, 920.0]


def test_leaving_stalled_or_stuck_clears_the_schedule() -> None:
    schedule, report = next_report(None, FP, State.STALLED, 0.0, CFG)
    assert report and schedule is not None and schedule.reports == 1
    for state in (State.ACTIVE, State.IDLE, State.LONG_RUNNING, State.STARTING, State.EXITED):
        assert next_report(schedule, FP, state, 10.0, CFG) == (None, False)
    # Coming back reports at once.
    assert next_report(None, FP, State.STALLED, 11.0, CFG)[1] is True


def test_late_tick_does_not_burst() -> None:
    schedule, _ = next_report(None, FP, State.STUCK, 0.0, CFG)
    schedule, report = next_report(schedule, FP, State.STUCK, 5000.0, CFG)
    assert report and schedule is not None
    assert schedule.next_due == 5120.0 and schedule.reports == 2
    assert next_report(schedule, FP, State.STUCK, 5005.0, CFG) == (schedule, False)


def test_clock_stepped_back_still_reports() -> None:
    schedule, _ = next_report(None, FP, State.STUCK, 10_000.0, CFG)
    assert schedule is not None
    same, report = next_report(schedule, FP, State.STUCK, 10_030.0, CFG)
    assert not report and same == schedule
    stepped, report = next_report(schedule, FP, State.STUCK, 9_000.0, CFG)
    assert report and stepped is not None and stepped.next_due == 9_120.0


def test_base_above_max_is_capped() -> None:
    cfg = ClassifyConfig(repeat_base=120.0, repeat_max=100.0)
    schedule, _ = next_report(None, FP, State.STUCK, 0.0, cfg)
    assert schedule is not None and schedule.interval == 100.0


@settings(max_examples=200, deadline=None)
@given(
    steps=st.lists(st.floats(0.5, 400.0, allow_nan=False), min_size=1, max_size=80),
    changes=st.lists(st.booleans(), min_size=80, max_size=80),
    base=st.sampled_from([1.0, 30.0, 60.0]),
    cap_factor=st.sampled_from([1, 3, 16]),
)
def test_backoff_property(steps: list[float], changes: list[bool], base: float, cap_factor: int) -> None:
    """Within one fingerprint, the gap between reports is at least the current
    interval, intervals double up to the cap, and a report comes at the first
    tick at or after it is due; any fingerprint change reports at once with
    the interval back to base."""
    cfg = ClassifyConfig(repeat_base=base, repeat_max=base * cap_factor)
    t = 0.0
    fp_n = 0
    schedule: ReportSchedule | None = None
    last_report = None
    expected_interval = base
    for step, change in zip(steps, changes[: len(steps)], strict=True):
        t += step
        if change:
            fp_n += 1
        fp: tuple[Any, ...] = (State.STALLED, Reason.CPU_SPIN, fp_n, frozenset())
        prev = schedule
        schedule, report = next_report(schedule, fp, State.STALLED, t, cfg)
        assert schedule is not None and schedule.fingerprint == fp
        if prev is None or prev.fingerprint != fp:
            assert report and schedule.interval == base and schedule.reports == 1
            expected_interval = base
        elif t >= prev.next_due:
            assert report
            assert last_report is not None and t - last_report >= expected_interval
            expected_interval = min(expected_interval * 2, cfg.repeat_max)
            assert schedule.interval == expected_interval
            assert schedule.reports == prev.reports + 1
        else:
            assert not report and schedule == prev
        assert base <= schedule.interval <= cfg.repeat_max
        if report:
            last_report = t
            assert schedule.next_due == t + schedule.interval


def test_fingerprint_fields() -> None:
    child = proc(5001)
    sample = tree(NOW, children=[child])
    activity = acts(ev(NOW - 10), ev(NOW - 5))
    v = Verdict(State.STALLED, Reason.WAITING_ON_NETWORK, 400.0)
    fp = fingerprint(v, activity, sample)
    assert fp == (State.STALLED, Reason.WAITING_ON_NETWORK, 2, frozenset({child.identity}))
    # The root is not a child; a new event, a new child or another reason changes it.
    assert fingerprint(v, activity, tree(NOW))[3] == frozenset()
    assert fingerprint(v, activity.apply(ev(NOW)), sample) != fp
    reused = proc(5001, create=child.create_time + 1)  # same pid, another process
    assert fingerprint(v, activity, tree(NOW, children=[reused])) != fp
    assert fingerprint(Verdict(State.STALLED, Reason.CPU_SPIN, 400.0), activity, sample) != fp
    assert fingerprint(v, Activity(), None) == (State.STALLED, Reason.WAITING_ON_NETWORK, 0, frozenset())
    assert fingerprint(v, activity, tree(NOW, status=SampleStatus.PROBE_TIMEOUT))[3] == frozenset()


def test_is_late_tick() -> None:
    # Interval 5: late beyond max(10, 10) s.
    assert not is_late_tick(100.0, 105.0, 5.0)
    assert not is_late_tick(100.0, 110.0, 5.0)
    assert is_late_tick(100.0, 110.5, 5.0)
    assert is_late_tick(100.0, 100.0 + 3600, 5.0)  # a suspend
    # Sub-second intervals: the floor keeps scheduling noise from counting.
    assert not is_late_tick(100.0, 100.0 + LATE_TICK_MIN_S - 0.1, 0.2)
    # Long intervals: two intervals of slack.
    assert not is_late_tick(100.0, 210.0, 60.0)
    assert is_late_tick(100.0, 221.0, 60.0)
    # Early (clock stepped back) is not late.
    assert not is_late_tick(100.0, 50.0, 5.0)


def test_retries_and_their_countdown_do_not_reset_the_backoff() -> None:
    """An api_retrying session gets a heartbeat per retry and a countdown in its
    evidence every tick: neither is in the fingerprint, so its reports back off."""
    activity = acts(ev(NOW - 100))
    schedule: ReportSchedule | None = None
    reported = []
    for k in range(120):  # 10 minutes of 5 s ticks, a retry line every 40 s
        t = NOW + 5.0 * k
        if k % 8 == 0:
            activity = activity.apply(Event(time=t, type="api_retry", kind=EventKind.HEARTBEAT, retry=True,
                                            retry_attempt=k // 8 + 1, retry_max=10, retry_delay_s=35.0))
        v = Verdict(State.STALLED, Reason.API_RETRYING, t - NOW + 100,
                    {"retry": {"next_in_s": (activity.retry_due or t) - t}})
        schedule, report = next_report(schedule, fingerprint(v, activity, tree(t)), v.state, t, CFG)
        if report:
            reported.append(t - NOW)
    assert reported == [0.0, 60.0, 180.0, 420.0]
