"""One session's lifecycle on the loop (otelwatch.sessions.lifecycle), driven with built samples:
verdicts and transitions, backed-off reports, the end and its summary, recovery's view."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from otelwatch.model import Mode, RecoveryStep, SampleStatus, SessionSnapshot, SessionSpec, State
from otelwatch.sessions.lifecycle import RECOVERIES_KEPT, Effects, Lifecycle, add_sample, record_step, recovery_view
from otelwatch.sessions.table import Tracked
from tests.support.classify_builders import CFG, NOW, ROOT, ROOT_PID, STARTED, ev, tree

INTERVAL = 10.0


@dataclass
class Seen:
    """What the lifecycle did beyond the record, in order."""

    calls: list[tuple[str, Any]] = field(default_factory=list)

    def effects(self) -> Effects:
        def add(name: str) -> Any:
            return lambda *args: self.calls.append((name, args))

        return Effects(transitioned=add("transitioned"), reported=add("reported"), ended=add("ended"),
                       emit=lambda record: self.calls.append(("emit", record)), release=add("release"),
                       runtime_alive=lambda spec: None, wchan=lambda pid: "do_select",
                       stderr_tail=lambda spec: "last words")

    def names(self) -> list[str]:
        return [name for name, _ in self.calls]

    def emitted(self) -> list[Mapping[str, Any]]:
        return [args for name, args in self.calls if name == "emit"]


def session(mode: Mode = Mode.HEADLESS, **spec: Any) -> Tracked:
    tracked = Tracked(key="s1", spec=SessionSpec("s1", ROOT_PID, agent="fake", source="api", mode=mode, **spec),
                      started_at=STARTED, state_since=STARTED)
    tracked.activity = tracked.activity.apply(ev(STARTED))
    return tracked


def run(life: Lifecycle, tracked: Tracked, start: float, end: float, **sample: Any) -> None:
    """Ticks every INTERVAL from `start` to `end` (inclusive), one sample each."""
    t = start
    while t <= end:
        add_sample(tracked, tree(t, **sample), t - (CFG.stall_after + 3 * INTERVAL))
        life.classify(tracked, t, STARTED)
        t += INTERVAL


def test_a_silent_session_turns_stuck_once_and_its_report_backs_off() -> None:
    seen = Seen()
    life = Lifecycle(CFG, seen.effects())
    tracked = session()
    run(life, tracked, STARTED + INTERVAL, STARTED + CFG.stall_after + 2 * INTERVAL)
    assert tracked.verdict is not None and tracked.verdict.state is State.STUCK
    states = [r["state"] for r in seen.emitted() if r["event"] == "session.state"]
    assert states[-1] == "stuck" and states.count("stuck") == 1 and tracked.stalls == 1
    reports = [r for r in seen.emitted() if r["event"] == "session.stuck"]
    assert len(reports) == 1 and reports[0]["repeat"] == 0  # the next one waits for repeat_base
    # The transition reaches telemetry before the report (it opens the incident span).
    assert seen.names().index("transitioned") < seen.names().index("reported")
    snap = tracked.snapshot
    assert isinstance(snap, SessionSnapshot) and snap.last_report is not None
    assert snap.last_report["stderr_tail"] == "last words" and snap.last_report["root"]["wchan"] == "do_select"
    assert tracked.state_since > STARTED and "release" not in seen.names()


def test_an_exited_session_ends_once_with_its_summary() -> None:
    seen = Seen()
    life = Lifecycle(CFG, seen.effects())
    tracked = session()
    run(life, tracked, STARTED + INTERVAL, STARTED + 3 * INTERVAL)
    add_sample(tracked, tree(NOW, status=SampleStatus.VANISHED), 0.0)
    life.classify(tracked, NOW, STARTED)
    life.classify(tracked, NOW + INTERVAL, STARTED)  # ended: nothing more happens
    assert tracked.ended_at == NOW and tracked.verdict is not None and tracked.verdict.state is State.EXITED
    assert seen.names().count("release") == 1 and seen.names().count("ended") == 1
    summary = seen.emitted()[-1]
    assert summary["event"] == "session.end" and summary["final_state"] == "exited"
    assert not tracked.dropped


def test_an_untracked_live_session_is_dropped_without_a_transition() -> None:
    seen = Seen()
    life = Lifecycle(CFG, seen.effects())
    tracked = session()
    run(life, tracked, STARTED + INTERVAL, STARTED + INTERVAL)
    before = len(seen.calls)
    tracked.untracked = True
    life.classify(tracked, STARTED + 2 * INTERVAL, STARTED)
    assert tracked.dropped and tracked.ended_at == STARTED + 2 * INTERVAL
    assert [name for name, _ in seen.calls[before:]] == ["release", "ended", "emit"]


def test_a_failing_report_fails_the_tick_but_not_the_record() -> None:
    """An exception from telemetry's report reaches the daemon's per-session guard; the
    verdict is already on the record."""
    seen = Seen()

    def broken(snap: SessionSnapshot, report: Mapping[str, Any]) -> None:
        raise RuntimeError("exporter down")

    life = Lifecycle(CFG, replace(seen.effects(), reported=broken))
    tracked = session()
    try:
        run(life, tracked, STARTED + INTERVAL, STARTED + CFG.stall_after + 2 * INTERVAL)
    except RuntimeError as exc:
        assert str(exc) == "exporter down"
    else:
        raise AssertionError("the report's failure was swallowed")
    assert tracked.verdict is not None and tracked.verdict.state is State.STUCK


def test_recovery_view_and_steps() -> None:
    tracked = session()
    assert recovery_view(tracked, CFG) is None  # nothing sampled yet
    seen = Seen()
    life = Lifecycle(CFG, seen.effects())
    run(life, tracked, STARTED + INTERVAL, STARTED + 2 * INTERVAL)
    view = recovery_view(tracked, CFG)
    assert view is not None and view.identity == ROOT and view.events == 1 and view.reacted
    for n in range(RECOVERIES_KEPT + 5):
        record_step(tracked, RecoveryStep("s1", "fake", "signal", "requested", NOW + n, ROOT_PID))
    assert len(tracked.recoveries) == RECOVERIES_KEPT and tracked.recoveries[0].time == NOW + 5
    assert tracked.snapshot is not None and len(tracked.snapshot.recoveries) == RECOVERIES_KEPT
    tracked.ended_at = NOW
    assert recovery_view(tracked, CFG) is None


def test_samples_are_trimmed_to_the_horizon_keeping_two() -> None:
    tracked = session()
    tracked.identity = None
    for n in range(10):
        add_sample(tracked, tree(NOW + n), horizon=NOW + 100)
    assert len(tracked.samples) == 2 and tracked.identity == ROOT
    add_sample(tracked, tree(NOW + 200), horizon=NOW + 5)
    assert [s.time for s in tracked.samples] == [NOW + 8, NOW + 9, NOW + 200]
    add_sample(tracked, tree(NOW + 210), horizon=NOW + 150)  # one sample before it stays: the start
    assert [s.time for s in tracked.samples] == [NOW + 9, NOW + 200, NOW + 210]
