"""Property tests of the classifier over random histories.

The guarantee that matters most: `stuck` (the only recoverable state) is never
returned unless every sample of the window proves idleness and nothing else
(heartbeat, progress, open tool, person waited on) speaks against it.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from otelwatch.classify.rules import MAX_ATTEMPT_S, classify, retry_holds
from otelwatch.classify.window import SampleWindow, window_samples
from otelwatch.config import ClassifyConfig
from otelwatch.events.activity import Activity
from otelwatch.model import REASONS_BY_STATE, Event, Mode, Reason, SampleStatus, SessionInfo, State, TreeSample, Verdict
from tests.support.classify_builders import NOW, ROOT_PID, acts, ev, hb, info, proc, tree

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Zero-ish values first: hypothesis shrinks toward the first element, and a
# bias toward idleness makes `stuck` reachable so the properties bite.
CPU = st.sampled_from([0.0, 0.0, 0.0, 0.4, 0.99, 1.0, 25.0, None])
TCP: st.SearchStrategy[dict[str, int] | None] = st.sampled_from(
    [{}, {}, {}, {"ESTABLISHED": 0}, {"ESTABLISHED": 1}, {"CLOSE_WAIT": 2}, None]
)
STATUS = st.sampled_from(
    [SampleStatus.OK] * 12 + [SampleStatus.ACCESS_DENIED, SampleStatus.PROBE_TIMEOUT]
)
CHILD_STATUS = st.sampled_from(["S", "S", "S", "R", "D", "T"])
CFGS = st.builds(
    ClassifyConfig,
    startup_grace=st.sampled_from([0.0, 30.0]),
    stall_after=st.sampled_from([60.0, 300.0]),
    tool_stall_after=st.sampled_from([120.0, 1800.0]),
    cpu_idle_percent=st.sampled_from([1.0, 0.5]),
    cpu_spin_percent=st.sampled_from([50.0, 20.0, 0.8]),
)
# Any previous verdict, however unlikely: hysteresis must never make anything stuck.
PREVIOUS = st.one_of(
    st.none(),
    st.sampled_from([(s, r) for s, reasons in REASONS_BY_STATE.items() for r in reasons]).map(
        lambda sr: Verdict(sr[0], sr[1], 0.0)
    ),
)


@st.composite
def samples_st(draw: st.DrawFn) -> list[TreeSample]:
    """A history where each sample is clean idle or, with a per-history
    probability, noisy (random CPU, TCP, status, children). Mostly idle
    histories are what makes `stuck` reachable, so the properties bite."""
    n = draw(st.integers(0, 40))
    interval = draw(st.sampled_from([5.0, 10.0, 30.0]))
    noise_pct = draw(st.sampled_from([0, 0, 2, 10, 50]))
    idle_children = draw(st.integers(0, 1))
    out = []
    for i in range(n):
        t = NOW - (n - 1 - i) * interval
        if draw(st.integers(0, 99)) >= noise_pct:
            kids = [proc(5000 + k) for k in range(idle_children)]
            out.append(tree(t, cpu=draw(st.sampled_from([0.0, 0.3])), children=kids, read=100))
            continue
        children = [
            proc(5000 + k, status=draw(CHILD_STATUS), cpu=draw(CPU)) for k in range(draw(st.integers(0, 2)))
        ]
        tcp = draw(TCP)
        out.append(
            tree(
                t,
                status=draw(STATUS),
                cpu=draw(CPU),
                tcp=tcp,
                unknown_tcp=tcp is None,
                root_status=draw(st.sampled_from(["S", "S", "S", "R", "D", "T"])),
                children=children,
                read=draw(st.sampled_from([None, 100, 100, 200])),
            )
        )
    if out and draw(st.integers(0, 9)) == 0:
        out[-1] = tree(out[-1].time, status=draw(st.sampled_from([SampleStatus.VANISHED, SampleStatus.ZOMBIE])))
    return out


@st.composite
def activity_st(draw: st.DrawFn) -> Activity:
    """Random event histories through the real fold (Activity.apply)."""
    events: list[Event] = []
    for _ in range(draw(st.integers(0, 8))):
        t = NOW - draw(st.floats(0, 5000, allow_nan=False))
        kind = draw(st.sampled_from(["progress", "heartbeat", "retry", "scheduled_retry", "turn_open",
                                     "turn_close", "tool_open", "tool_close", "prompt", "answered"]))
        if kind == "progress":
            events.append(ev(t))
        elif kind == "heartbeat":
            events.append(hb(t))
        elif kind == "retry":
            events.append(hb(t, "system/api_retry", retry=True))
        elif kind == "scheduled_retry":
            events.append(hb(t, "api_retry", retry=True, retry_attempt=draw(st.integers(1, 10)), retry_max=10,
                             retry_delay_s=draw(st.sampled_from([0.6, 17.8, 40.0, 400.0]))))
        elif kind == "turn_open":
            events.append(ev(t, "UserPromptSubmit", turn="open"))
        elif kind == "turn_close":
            events.append(ev(t, "Stop", turn="close"))
        elif kind == "tool_open":
            events.append(ev(t, "PreToolUse", tool="Bash", tool_call="open"))
        elif kind == "tool_close":
            events.append(ev(t, "PostToolUse", tool="Bash", tool_call="close"))
        elif kind == "prompt":
            events.append(hb(t, "Notification", awaiting_input=True))
        else:
            events.append(hb(t, "Notification", awaiting_input=False))
    return acts(*events)


INFOS = st.builds(
    SessionInfo,
    mode=st.sampled_from([Mode.HEADLESS, Mode.INTERACTIVE]),
    started_at=st.floats(NOW - 6000, NOW + 10, allow_nan=False),
    has_event_source=st.booleans(),
    runtime_alive=st.sampled_from([None, True, False]),
)
WATCH = st.floats(NOW - 6000, NOW, allow_nan=False)


def _working(s: TreeSample, thr: float) -> bool:
    return any(p.status in ("R", "D") or (p.cpu_percent is not None and p.cpu_percent >= thr) for p in s.processes)


@SETTINGS
@given(cfg=CFGS, session=INFOS, samples=samples_st(), activity=activity_st(), watch_since=WATCH,
       previous=PREVIOUS)
def test_classifier_invariants(
    cfg: ClassifyConfig,
    session: SessionInfo,
    samples: list[TreeSample],
    activity: Activity,
    watch_since: float,
    previous: Verdict | None,
) -> None:
    v = classify(cfg, session, samples, activity, NOW, watch_since, previous)
    thr = cfg.cpu_idle_percent
    # The incremental window (here fed the whole history at once, the daemon's first
    # tick) gives exactly the full recomputation's verdict: test_classify_incremental
    # feeds it tick by tick.
    window = SampleWindow()
    window.sync_for(cfg, samples)
    assert classify(cfg, session, samples, activity, NOW, watch_since, previous, window=window) == v
    # The previous verdict may steady a stalled reason, never change the state.
    assert v.state is classify(cfg, session, samples, activity, NOW, watch_since).state

    # The reason always belongs to its state; the evidence always serialises.
    assert v.reason in REASONS_BY_STATE[v.state]
    json.dumps(v.evidence)

    # Silence counts from the last progress, never before the session's start; a gap in
    # our own watching (watch_since) does not reset it (issue #20).
    progress = activity.last_progress_time if session.has_event_source else None
    if session.has_event_source:
        expected = NOW - max(progress if progress is not None else -math.inf, session.started_at)
        assert math.isclose(v.silence_s, max(0.0, expected), abs_tol=1e-6)
    assert 0.0 <= v.silence_s <= max(0.0, NOW - session.started_at) + 1e-6

    # Nobody's idle session is ever called stalled or stuck.
    if session.mode is Mode.INTERACTIVE and not activity.turn_open and v.state is not State.EXITED:
        assert v.state not in (State.STALLED, State.STUCK)
    if activity.awaiting_input and v.state is not State.EXITED:
        assert v.state in (State.IDLE, State.STARTING)

    if v.state is not State.STUCK:
        return
    # Stuck: every gate of the contract holds.
    window = window_samples(samples, max(NOW - cfg.stall_after, watch_since))
    assert len(window) >= 2
    assert samples[-1].alive
    assert samples[-1].processes[0].status not in ("T", "t")  # stopped by a person: idle
    assert NOW - session.started_at >= cfg.startup_grace
    assert NOW - watch_since >= cfg.stall_after  # watched a whole stall_after since any gap
    assert v.silence_s >= cfg.stall_after
    if session.has_event_source and activity.last_progress_time is not None:
        assert NOW - activity.last_progress_time >= cfg.stall_after
    for t in (activity.last_heartbeat_time, activity.last_retry_time):
        assert t is None or NOW - t >= cfg.stall_after
    # An announced retry is over: its attempt was due, and overdue by its expected length.
    if activity.retry_due is not None:
        assert activity.retry_due + min(activity.retry_attempt_s or 0.0, MAX_ATTEMPT_S) + cfg.stall_after <= NOW
    assert not activity.open_tools
    assert not activity.awaiting_input
    assert session.mode is Mode.HEADLESS or activity.turn_open
    for s in window:
        assert s.status is SampleStatus.OK
        assert s.cpu_percent is not None and s.cpu_percent < thr
        assert s.tcp_total == 0
        assert not _working(s, thr)


# --------------------------------------------------------------------------- one bad sample

IDLE_CFG = ClassifyConfig(stall_after=300.0, cpu_idle_percent=1.0)
SILENT = acts(ev(NOW - 5000, turn="open"), ev(NOW - 1000))


def _idle_history(n: int = 40, interval: float = 10.0) -> list[TreeSample]:
    return [tree(NOW - (n - 1 - i) * interval, cpu=0.2) for i in range(n)]


def _spoil(s: TreeSample, how: str) -> TreeSample:
    if how == "tcp":
        return replace(s, tcp={"ESTABLISHED": 1})
    if how == "cpu":
        return replace(s, cpu_percent=IDLE_CFG.cpu_idle_percent)
    if how == "cpu_unknown":
        return replace(s, cpu_percent=None)
    if how == "tcp_unknown":
        return replace(s, tcp=None)
    if how == "access_denied":
        return replace(s, status=SampleStatus.ACCESS_DENIED)
    if how == "probe_timeout":
        return tree(s.time, status=SampleStatus.PROBE_TIMEOUT)
    if how == "child_running":
        return replace(s, processes=(*s.processes, proc(7000, status="R", cpu=0.0)), children=1)
    if how == "child_blocked":
        return replace(s, processes=(*s.processes, proc(7000, status="D", cpu=0.0)), children=1)
    if how == "root_running":
        root = replace(s.processes[0], status="R")
        return replace(s, processes=(root, *s.processes[1:]))
    if how == "io":
        return replace(s, read_bytes=(s.read_bytes or 0) + 4096)
    raise AssertionError(how)


SPOILS = ["tcp", "cpu", "cpu_unknown", "tcp_unknown", "access_denied", "probe_timeout",
          "child_running", "child_blocked", "root_running", "io"]


def test_idle_history_is_stuck() -> None:
    """The baseline of the property below: without the spoiled sample it is stuck."""
    v = classify(IDLE_CFG, info(), _idle_history(), SILENT, NOW, NOW - 6000)
    assert v.state is State.STUCK


@SETTINGS
@given(how=st.sampled_from(SPOILS), age=st.floats(0, 300, allow_nan=False), events=st.booleans())
@example(how="io", age=300.0, events=True)  # the change lands on the window's first sample
@example(how="child_running", age=300.0, events=True)
def test_one_bad_sample_in_the_window_prevents_stuck(how: str, age: float, events: bool) -> None:
    """Any single sample of the window with TCP, CPU at the threshold, unknown
    data, a non-OK status or a working process keeps the session out of stuck."""
    samples = _idle_history()
    idx = min(range(len(samples)), key=lambda i: abs(samples[i].time - (NOW - age)))
    samples[idx] = _spoil(samples[idx], how)
    if how == "io":
        # Counters are cumulative: 0 before the spoiled sample, the new value after.
        samples = [replace(s, read_bytes=0 if i < idx else 4096) for i, s in enumerate(samples)]
    activity = SILENT if events else Activity()
    v = classify(IDLE_CFG, info(events=events), samples, activity, NOW, NOW - 6000)
    assert v.state is not State.STUCK, (how, samples[idx], v)
    assert v.state in (State.STALLED, State.ACTIVE)


@SETTINGS
@given(
    hb_age=st.floats(0, 299.9, allow_nan=False),
    retry=st.booleans(),
    tool=st.booleans(),
)
def test_fresh_heartbeat_is_never_stuck(hb_age: float, retry: bool, tool: bool) -> None:
    events: list[Any] = [ev(NOW - 5000, turn="open")]
    if tool:
        events.append(ev(NOW - 4000, "PreToolUse", tool="Bash", tool_call="open"))
    events += [ev(NOW - 1000), hb(NOW - hb_age, retry=retry)]
    v = classify(IDLE_CFG, info(), _idle_history(), acts(*events), NOW, NOW - 6000)
    assert v.state in (State.LONG_RUNNING, State.STALLED)
    assert v.state is State.LONG_RUNNING or v.reason.value in ("api_retrying", "tool_call_without_progress")


@SETTINGS
@given(gap_end=st.floats(NOW - 299.0, NOW, allow_nan=False), progress_age=st.floats(300, 50_000, allow_nan=False))
def test_time_before_watch_since_is_silence_but_never_proof(gap_end: float, progress_age: float) -> None:
    """However recent the resumed watch, a session with no progress is never active
    after it (its silence is the agent's, gap included: issue #20), and never stuck
    before the watchdog has watched a whole stall_after again."""
    samples = [s for s in _idle_history(200) if s.time >= gap_end or s.time < gap_end - 3600]
    activity = acts(ev(NOW - 6000, turn="open"), ev(NOW - progress_age))
    v = classify(IDLE_CFG, info(started_at=NOW - 60_000), samples, activity, NOW, gap_end)
    assert (v.state, v.reason) == (State.STALLED, Reason.INSUFFICIENT_SAMPLES)
    assert v.silence_s == pytest.approx(min(progress_age, 6000.0))  # the turn's start is progress too


def test_root_pid_is_the_tree_root() -> None:
    # Guard for the helpers the properties rely on.
    s = tree(NOW, children=[proc(5000)])
    assert s.root is not None and s.root.pid == ROOT_PID and s.processes[0].identity == s.root


# --------------------------------------------------------------------------- hysteresis

# Steady stalled conditions: (the samples' shape, the reason they give).
BASES: dict[str, tuple[dict[str, Any], Reason]] = {
    "network": ({"tcp": {"ESTABLISHED": 1}, "cpu": 0.2}, Reason.WAITING_ON_NETWORK),
    "spin": ({"cpu": 95.0}, Reason.CPU_SPIN),
    "spin_with_socket": ({"cpu": 95.0, "tcp": {"ESTABLISHED": 1}}, Reason.CPU_SPIN),
    "low_cpu": ({"cpu": 2.0}, Reason.TOOL_CALL_WITHOUT_PROGRESS),
    "working_child": ({"children": [proc(5100, status="R", cpu=0.4)]}, Reason.TOOL_CALL_WITHOUT_PROGRESS),
    "unreadable_sockets": ({"unknown_tcp": True}, Reason.ACCESS_DENIED),
    "timeouts": ({"status": SampleStatus.PROBE_TIMEOUT}, Reason.PROBE_TIMEOUT),
}
BLIPS = [*SPOILS, "idle", "spin", "low_cpu", "spin_with_socket"]


def _blip(s: TreeSample, how: str) -> TreeSample:
    if how == "idle":
        return tree(s.time)
    if how == "spin":
        return tree(s.time, cpu=100.0)
    if how == "low_cpu":
        return tree(s.time, cpu=2.6)
    if how == "spin_with_socket":
        return tree(s.time, cpu=100.0, tcp={"ESTABLISHED": 3})
    if s.status is not SampleStatus.OK:
        s = tree(s.time, cpu=0.2)  # spoil a readable sample (a timeout has nothing to spoil)
    return _spoil(s, how)


@SETTINGS
@given(
    base=st.sampled_from(sorted(BASES)),
    how=st.sampled_from(BLIPS),
    timing=st.sampled_from([(30.0, 5.0), (60.0, 10.0), (300.0, 10.0)]),
)
@example(base="timeouts", how="io", timing=(30.0, 5.0))
@example(base="network", how="spin_with_socket", timing=(30.0, 5.0))
def test_a_single_sample_blip_never_changes_a_stalled_reason(base: str, how: str, timing: tuple[float, float]) -> None:
    """A stalled session whose evidence is steady keeps its reason, tick after tick,
    while one different sample enters the window, crosses it and leaves it. (With an
    event source: without one, a busy sample is progress and makes it active.)"""
    stall_after, interval = timing
    cfg = ClassifyConfig(stall_after=stall_after, cpu_idle_percent=1.0, cpu_spin_percent=50.0)
    shape, expected = BASES[base]
    session = info(started_at=NOW - 100_000)
    activity = SILENT
    n = int(2 * stall_after // interval)
    samples = [tree(NOW - (n - i) * interval, read=100, **shape) for i in range(n + 1)]
    previous = classify(cfg, session, samples, activity, NOW, NOW - 100_000)
    assert (previous.state, previous.reason) == (State.STALLED, expected), previous.evidence
    blip_at = NOW + interval
    t = NOW
    while t <= blip_at + stall_after + 2 * interval:
        t += interval
        sample = tree(t, read=100, **shape)
        samples.append(_blip(sample, how) if t == blip_at else sample)
        v = classify(cfg, session, samples, activity, t, NOW - 100_000, previous)
        assert (v.state, v.reason) == (State.STALLED, expected), (t - blip_at, v.evidence)
        previous = v


def test_a_reason_changes_once_the_new_evidence_holds() -> None:
    """The other side of hysteresis: a socket that opens for good takes over from
    low-CPU work once it holds over most of the window, and the reason of a finished
    spin changes once no spinning sample is left in the window."""
    cfg = ClassifyConfig(stall_after=60.0)
    session, since = info(started_at=NOW - 100_000), NOW - 100_000

    def run(first: dict[str, Any], then: dict[str, Any]) -> list[tuple[float, Reason]]:
        samples = [tree(NOW - 120 + 10 * i, **first) for i in range(13)]
        previous = classify(cfg, session, samples, SILENT, NOW, since)
        changes = [(0.0, previous.reason)]
        for k in range(1, 12):
            samples.append(tree(NOW + 10 * k, **then))
            v = classify(cfg, session, samples, SILENT, NOW + 10 * k, since, previous)
            if v.reason is not previous.reason:
                changes.append((10.0 * k, v.reason))
            previous = v
        return changes

    # Window of 7 samples: the socket holds over it from its 4th sample on.
    assert run({"cpu": 2.0}, {"cpu": 2.0, "tcp": {"ESTABLISHED": 1}}) == [
        (0.0, Reason.TOOL_CALL_WITHOUT_PROGRESS), (40.0, Reason.WAITING_ON_NETWORK)]
    # The spin stops; the reason holds until the last spinning sample has left the window.
    assert run({"cpu": 95.0, "tcp": {"ESTABLISHED": 1}}, {"cpu": 0.2, "tcp": {"ESTABLISHED": 1}}) == [
        (0.0, Reason.CPU_SPIN), (70.0, Reason.WAITING_ON_NETWORK)]


# --------------------------------------------------------------------------- announced retries


@SETTINGS
@given(
    delays=st.lists(st.floats(0.0, 120.0, allow_nan=False), min_size=1, max_size=10),
    lasting=st.floats(0.001, 400.0, allow_nan=False),
    stall_after=st.sampled_from([30.0, 300.0]),
    lag=st.floats(0.0, 10.0, allow_nan=False),
    at=st.floats(0.0, 1.0, allow_nan=False),
    tool=st.booleans(),
)
def test_never_stuck_while_an_announced_retry_is_not_overdue(
    delays: list[float], lasting: float, stall_after: float, lag: float, at: float, tool: bool
) -> None:
    """A retry loop (each attempt lasting `lasting` s, announced delays, lines seen up to
    `lag` s late) over an otherwise idle tree: from the last retry until its attempt is
    due and has run as long as the one before, the session is stalled/api_retrying,
    never stuck; some time after that, it is stuck (so the property bites)."""
    cfg = ClassifyConfig(stall_after=stall_after, cpu_idle_percent=1.0)
    events: list[Event] = [ev(NOW - 50_000, turn="open")]
    if tool:
        events.append(ev(NOW - 49_000, "PreToolUse", tool="Task", tool_call="open"))
    start = NOW - 40_000.0  # the first attempt
    events.append(ev(start))
    for k, delay in enumerate(delays, 1):
        fail = start + lasting
        events.append(hb(fail + lag, "api_retry", retry=True, retry_attempt=k, retry_max=10, retry_delay_s=delay))
        start = fail + lag + delay
    activity = acts(*events)
    assert activity.retry_due is not None and activity.last_retry_time is not None
    overdue = activity.retry_due + min(activity.retry_attempt_s or 0.0, MAX_ATTEMPT_S)
    now = activity.last_retry_time + at * (overdue - activity.last_retry_time)
    samples = [tree(now - 400 + 10 * i) for i in range(41)]
    session = info(started_at=NOW - 60_000)
    v = classify(cfg, session, samples, activity, now, NOW - 60_000)
    assert retry_holds(activity, now, stall_after)
    if now - (activity.last_progress_time or 0.0) >= stall_after:
        assert (v.state, v.reason) == (State.STALLED, Reason.API_RETRYING), v.evidence
    else:
        assert v.state is not State.STUCK
    later = overdue + stall_after + 1.0
    samples = [tree(later - 400 + 10 * i) for i in range(41)]
    v = classify(cfg, session, samples, activity, later, NOW - 60_000)
    assert v.state is (State.STALLED if tool else State.STUCK), v
