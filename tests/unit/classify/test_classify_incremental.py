"""The incremental classifier (`SampleWindow`) against the full recomputation.

`classify(..., window=w)` must return exactly the verdict of `classify(...)`:
same state, reason, silence and evidence, on every tick of any stream the
daemon can produce (samples appended, the oldest dropped, the clock jumping
forward or back, watching restarting, unreadable and timed-out samples, children
coming and going). The full recomputation (`WindowFacts.of`, `tree_progress_time`)
is the reference.
"""

from __future__ import annotations

from collections import deque

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from otelwatch.classify.rules import classify
from otelwatch.classify.window import (
    SampleWindow,
    WindowFacts,
    last_ok_before,
    tree_progress_time,
    window_samples,
    work_cpu_percent,
)
from otelwatch.config import ClassifyConfig
from otelwatch.model import SampleStatus, TreeSample, Verdict
from tests.support.classify_builders import NOW, ROOT_PID, SILENT, acts, info, proc, tree

# Values around the thresholds and the tick floor (1.5 ticks: 3% over 0.5 s, 0.15% over 10 s).
CPU = st.sampled_from([0.0, 0.0, 0.1, 0.3, 0.5, 1.0, 2.0, 3.0, 3.5, 5.0, 25.0, 60.0, 0.1 + 0.2, None])
# CPU demand (usage + run-queue wait) where schedstat is read; None where it is not.
DEMAND = st.sampled_from([None, None, None, 0.0, 3.0, 30.0, 60.0, 99.5, 99.5, 180.0])  # 180: wait credited late
STEP = st.sampled_from([0.5, 1.0, 1.0, 1.0, 5.0, 10.0, 0.0, 90.0, -3.0])  # 0: same time; <0: clock back
KIND = st.sampled_from(["idle"] * 6 + ["noisy"] * 3 + ["timeout", "denied", "vanished"])
CFGS = st.builds(
    ClassifyConfig,
    startup_grace=st.just(0.0),
    stall_after=st.sampled_from([5.0, 20.0, 60.0]),
    cpu_idle_percent=st.sampled_from([1.0, 0.5]),
    cpu_spin_percent=st.sampled_from([50.0, 20.0, 0.8]),
)


@st.composite
def stream_st(draw: st.DrawFn) -> list[tuple[float, TreeSample, int, bool]]:
    """(now, sample, samples to drop from the front, watching restarts) per tick."""
    out: list[tuple[float, TreeSample, int, bool]] = []
    t = NOW - 500.0
    read = 100
    for i in range(draw(st.integers(1, 60))):
        t += draw(STEP)
        kind = draw(KIND)
        if kind == "timeout":
            s = tree(t, status=SampleStatus.PROBE_TIMEOUT)
        elif kind == "vanished":
            s = tree(t, status=SampleStatus.VANISHED)
        else:
            if draw(st.integers(0, 4)) == 0:
                read += draw(st.integers(0, 2))
            kids = [
                proc(5000 + k, status=draw(st.sampled_from(["S", "S", "R", "D"])), cpu=draw(CPU),
                     create=1_699_999_000.0 + k + draw(st.integers(0, 1)))
                for k in draw(st.sampled_from([[], [], [0], [1], [0, 1]]))
            ]
            tcp = draw(st.sampled_from([{}, {}, {"ESTABLISHED": 2}, None]))
            s = tree(
                t,
                status=SampleStatus.ACCESS_DENIED if kind == "denied" else SampleStatus.OK,
                cpu=None if i == 0 and draw(st.booleans()) else draw(CPU) if kind == "noisy" else 0.0,
                tcp=tcp,
                unknown_tcp=tcp is None,
                root_status=draw(st.sampled_from(["S", "S", "R"])) if kind == "noisy" else "S",
                children=kids if kind == "noisy" else [],
                read=draw(st.sampled_from([read, read, None])),
                demand=draw(DEMAND) if kind == "noisy" else None,
                # a loop since long ago, since just now, or a process that slept
                awake_since=draw(st.sampled_from([None, None, NOW - 1000.0, t - 1.0, t])) if kind == "noisy" else None,
            )
        now = t + draw(st.sampled_from([0.0, 0.0, 0.3, -1.0]))
        out.append((now, s, draw(st.sampled_from([0] * 8 + [1, 2])), draw(st.integers(0, 15)) == 0))
    return out


def _reference_facts(cfg: ClassifyConfig, samples: tuple[TreeSample, ...], start: float) -> WindowFacts:
    thr = cfg.cpu_idle_percent
    spin = max(cfg.cpu_spin_percent, thr)
    first_sight = samples[0] if samples and samples[0].cpu_percent is None else None
    latest = samples[-1] if samples else None
    return WindowFacts.of(window_samples(samples, start), last_ok_before(samples, start), latest, thr, spin,
                     first_sight)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cfg=CFGS, stream=stream_st(), events=st.booleans(), retain=st.integers(2, 80))
def test_incremental_facts_and_verdicts_equal_the_full_recomputation(
    cfg: ClassifyConfig, stream: list[tuple[float, TreeSample, int, bool]], events: bool, retain: int
) -> None:
    window = SampleWindow()
    history: deque[TreeSample] = deque()
    watch_since = NOW - 600.0
    previous: Verdict | None = None
    session = info(events=events, started_at=NOW - 1000.0)
    activity = SILENT if events else acts()
    for now, sample, drop, restart in stream:
        if restart:
            watch_since = now
        history.append(sample)
        for _ in range(min(drop, len(history) - 1)):
            history.popleft()
        while len(history) > retain:
            history.popleft()
        samples = tuple(history)
        full = classify(cfg, session, samples, activity, now, watch_since, previous)
        window.sync_for(cfg, samples)
        fast = classify(cfg, session, samples, activity, now, watch_since, previous, window=window)
        assert fast == full
        if window.usable:
            start = max(now - cfg.stall_after, watch_since)
            assert window.facts(start, samples[-1]) == _reference_facts(cfg, samples, start)
            assert window.progress_time() == tree_progress_time(samples, work_cpu_percent(cfg))
        previous = full


def test_a_steady_stream_uses_the_window_and_matches() -> None:
    """Sorted, finite history: the window is used (no fallback), and a change at the
    window's first sample (its I/O counter moved since the sample before the window)
    counts exactly as in the full recomputation."""
    cfg = ClassifyConfig(startup_grace=0.0, stall_after=30.0)
    window = SampleWindow()
    history: deque[TreeSample] = deque()
    session = info(events=False, started_at=NOW - 1000.0)
    for i in range(120):
        t = NOW - 120 + i
        history.append(tree(t, cpu=0.0, read=100 + (i == 80)))
        samples = tuple(history)
        full = classify(cfg, session, samples, acts(), t, NOW - 1000.0)
        window.sync_for(cfg, samples)
        fast = classify(cfg, session, samples, acts(), t, NOW - 1000.0, window=window)
        assert window.usable
        assert fast == full
    assert full.evidence["samples_in_window"] == 31
    assert window.progress_time() == NOW - 120 + 81  # the change back to 100 at i = 81
    assert full.state.value == "stuck"


def test_an_out_of_order_history_falls_back_to_the_full_recomputation() -> None:
    cfg = ClassifyConfig(startup_grace=0.0, stall_after=30.0)
    window = SampleWindow()
    samples = (tree(NOW - 10), tree(NOW - 20, children=[proc(ROOT_PID + 1, status="R")]), tree(NOW))
    full = classify(cfg, info(), samples, SILENT, NOW, NOW - 1000.0)
    window.sync_for(cfg, samples)
    assert classify(cfg, info(), samples, SILENT, NOW, NOW - 1000.0, window=window) == full
    assert not window.usable
