"""Table-driven tests of the pure classifier: every state and reason, with the
evidence a person would see. Time is a number; nothing sleeps.

The builders (proc, tree, history, acts, info) live in classify_builders.py.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import pytest

from otelwatch.classify.rules import classify, retry_holds, retry_phrase
from otelwatch.classify.window import WORK_CPU_PERCENT, tree_progress_time, window_samples, work_cpu_percent
from otelwatch.config import ClassifyConfig
from otelwatch.events.activity import Activity
from otelwatch.model import REASONS_BY_STATE, EventKind, Mode, Reason, SampleStatus, SessionInfo, State, TreeSample
from tests.support.classify_builders import (
    CFG,
    INTERVAL,
    NOW,
    ROOT,
    SILENT,
    WATCH,
    acts,
    ev,
    hb,
    history,
    info,
    proc,
    tree,
)


@dataclass
class Case:
    name: str
    state: State
    reason: Reason
    samples: list[TreeSample]
    activity: Activity = SILENT
    info: SessionInfo = field(default_factory=info)
    watch_since: float = WATCH
    now: float = NOW
    check: Callable[[dict[str, Any]], bool] | None = None


sleep_child = proc(5001, name="sleep")

CASES = [
    Case(
        "process gone",
        State.EXITED,
        Reason.PROCESS_EXITED,
        [*history(60), tree(NOW + 1, status=SampleStatus.VANISHED)],
        now=NOW + 1,
    ),
    Case(
        "zombie root, tmux pane still alive",
        State.EXITED,
        Reason.RUNTIME_ALIVE_PROCESS_DEAD,
        [*history(60), tree(NOW + 1, status=SampleStatus.ZOMBIE)],
        info=info(runtime_alive=True),
        now=NOW + 1,
    ),
    Case(
        "vanished even during startup grace and with fresh progress",
        State.EXITED,
        Reason.PROCESS_EXITED,
        [tree(NOW, status=SampleStatus.VANISHED)],
        activity=acts(ev(NOW - 1)),
        info=info(started_at=NOW - 5, runtime_alive=False),
    ),
    Case(
        "young session, no events yet",
        State.STARTING,
        Reason.STARTUP_GRACE,
        history(10),
        activity=Activity(),
        info=info(started_at=NOW - 10),
    ),
    Case(
        "progress a minute ago",
        State.ACTIVE,
        Reason.RECENT_PROGRESS,
        history(),
        activity=acts(ev(NOW - 3000, turn="open"), ev(NOW - 60)),
    ),
    Case(
        "interactive, turn closed, zero everything for hours",
        State.IDLE,
        Reason.NO_OPEN_TURN,
        history(3600),
        activity=acts(ev(NOW - 6 * 3600, turn="open"), ev(NOW - 5 * 3600, "result", turn="close")),
        info=info(Mode.INTERACTIVE, started_at=NOW - 7 * 3600),
    ),
    Case(
        "interactive, never a turn, discovered without events",
        State.IDLE,
        Reason.NO_OPEN_TURN,
        history(),
        activity=Activity(),
        info=info(Mode.INTERACTIVE, events=False),
    ),
    Case(
        "headless, permission prompt open for an hour",
        State.IDLE,
        Reason.AWAITING_INPUT,
        history(3600),
        activity=acts(
            ev(NOW - 5000, turn="open"),
            ev(NOW - 3600, "Notification", kind=EventKind.HEARTBEAT, awaiting_input=True),
        ),
    ),
    Case(
        "headless, root stopped with Ctrl-Z for an hour",
        State.IDLE,
        Reason.AWAITING_INPUT,
        history(root_status="T"),
        check=lambda e: "stopped" in e["detail"],
    ),
    Case(
        "headless, silent, zero TCP, zero CPU, no children",
        State.STUCK,
        Reason.NO_ACTIVITY,
        history(cpu=0.1),
        check=lambda e: e["tcp_window_max"] == 0
        and e["cpu_window_max"] == 0.1
        and e["samples_in_window"] == 31
        and e["working_children"] == []
        and e["heartbeat_age_s"] is None
        and e["sample_status"] == "ok",
    ),
    Case(
        "interactive mid-turn, silent, zero everything",
        State.STUCK,
        Reason.NO_ACTIVITY,
        history(),
        activity=acts(ev(NOW - 2000, "UserPromptSubmit", turn="open"), ev(NOW - 1000)),
        info=info(Mode.INTERACTIVE),
    ),
    Case(
        "no event source, tree idle for 20 minutes",
        State.STUCK,
        Reason.NO_ACTIVITY,
        history(2400, at=lambda t: {"cpu": 30.0} if t <= NOW - 1200 else {}),
        activity=Activity(),
        info=info(events=False),
    ),
    Case(
        "no event source, CPU two minutes ago",
        State.ACTIVE,
        Reason.RECENT_PROGRESS,
        history(at=lambda t: {"cpu": 30.0} if t == NOW - 120 else {}),
        activity=Activity(),
        info=info(events=False),
    ),
    Case(
        "no event source, writing bytes slowly at low CPU",
        State.ACTIVE,
        Reason.RECENT_PROGRESS,
        history(at=lambda t: {"write": int(t // 60)}),
        activity=Activity(),
        info=info(events=False),
    ),
    Case(
        "sleeping on one ESTABLISHED socket",
        State.STALLED,
        Reason.WAITING_ON_NETWORK,
        history(tcp={"ESTABLISHED": 1}),
        check=lambda e: e["tcp"] == {"ESTABLISHED": 1} and e["tcp_window_max"] == 1,
    ),
    Case(
        "socket closed a minute ago, still within the window",
        State.STALLED,
        Reason.WAITING_ON_NETWORK,
        history(at=lambda t: {"tcp": {"CLOSE_WAIT": 1}} if t < NOW - 60 else {}),
    ),
    Case(
        "busy at 95% CPU, no TCP",
        State.STALLED,
        Reason.CPU_SPIN,
        history(cpu=95.0),
        check=lambda e: e["cpu_percent"] == 95.0 and e["tcp_window_max"] == 0,
    ),
    Case(
        "busy with a socket open is spinning, not sleeping on it",
        State.STALLED,
        Reason.CPU_SPIN,
        history(cpu=80.0, tcp={"ESTABLISHED": 2}),
    ),
    Case(
        "busy at the spin bar in most samples, mean at the bar",
        State.STALLED,
        Reason.CPU_SPIN,
        history(at=lambda t: {"cpu": 90.0} if int(t) % 30 else {"cpu": 10.0}),
        check=lambda e: "window mean" in e["detail"],
    ),
    Case(
        "a loop starved by other work: 20% CPU, but runnable all the time and never asleep",
        State.STALLED,
        Reason.CPU_SPIN,
        history(cpu=20.0, demand=98.0, awake_since=NOW - 2000),
        check=lambda e: e["cpu_window_mean"] == 20.0 and e["cpu_demand_window_mean"] == 98.0
        and "waiting for one" in e["detail"] and "got 20.0%" in e["detail"] and "never went to sleep" in e["detail"],
    ),
    Case(
        "a loop that gets a slice now and then: its wait is credited when it runs, 20% and 180% "
        "in turn, 100% over the window (measured at 2-4% usage on CI): a spin",
        State.STALLED,
        Reason.CPU_SPIN,
        history(cpu=3.0, awake_since=NOW - 2000,
                at=lambda t: {"demand": 180.0} if int(t) % 20 else {"demand": 20.0}),
        check=lambda e: e["cpu_demand_window_mean"] >= 90.0,
    ),
    Case(
        "a TUI drawing a spinner on a busy host: runnable nearly all the time (98% demand at "
        "20% CPU, as the real Gemini and opencode TUIs read), but it goes to sleep between "
        "frames: not a spin",
        State.STALLED,
        Reason.TOOL_CALL_WITHOUT_PROGRESS,
        history(cpu=20.0, demand=98.0, awake_since=None),
        check=lambda e: e["cpu_demand_window_mean"] == 98.0 and "not spinning" in e["detail"],
    ),
    Case(
        "the same TUI with its request open: sleeping on the socket, not spinning",
        State.STALLED,
        Reason.WAITING_ON_NETWORK,
        history(cpu=20.0, demand=98.0, tcp={"ESTABLISHED": 1}),
    ),
    Case(
        "starved, and awake only since the middle of the window: not a spin yet",
        State.STALLED,
        Reason.TOOL_CALL_WITHOUT_PROGRESS,
        history(cpu=20.0, demand=98.0, awake_since=NOW - 100),
    ),
    Case(
        "a spinner that wakes now and then, its demand uneven (20% and 100%, 60% over the "
        "window): not a spin",
        State.STALLED,
        Reason.TOOL_CALL_WITHOUT_PROGRESS,
        history(cpu=15.0, awake_since=NOW - 2000,
                at=lambda t: {"demand": 100.0} if int(t) % 20 else {"demand": 20.0}),
    ),
    Case(
        "20% CPU and no run-queue wait: between the thresholds, not a spin",
        State.STALLED,
        Reason.TOOL_CALL_WITHOUT_PROGRESS,
        history(cpu=20.0, demand=20.5),
    ),
    Case(
        "a TUI spinner waking on a busy host: 15% CPU, runnable 60% of the time: not a spin",
        State.STALLED,
        Reason.TOOL_CALL_WITHOUT_PROGRESS,
        history(cpu=15.0, demand=60.0),
    ),
    Case(
        "demand unknown (psutil backend): the spin rule reads usage",
        State.STALLED,
        Reason.TOOL_CALL_WITHOUT_PROGRESS,
        history(cpu=20.0, demand=None),
        check=lambda e: e["cpu_demand_window_mean"] == 20.0,
    ),
    # Between the two thresholds: neither spinning nor stuck. The reason comes from
    # the other evidence; with none, work outside the event stream.
    Case(
        "one CPU burst in the window, idle now: not a spin",
        State.STALLED,
        Reason.TOOL_CALL_WITHOUT_PROGRESS,
        history(at=lambda t: {"cpu": 90.0} if t == NOW - 200 else {}),
        check=lambda e: e["cpu_window_max"] == 90.0 and e["cpu_percent"] == 0.0 and "not spinning" in e["detail"],
    ),
    Case(
        "spinning in under half the window: not sustained",
        State.STALLED,
        Reason.TOOL_CALL_WITHOUT_PROGRESS,
        history(at=lambda t: {"cpu": 100.0} if t >= NOW - 100 else {}),
    ),
    Case(
        "idle-CLI noise (0-3% single samples), no TCP, no children",
        State.STALLED,
        Reason.TOOL_CALL_WITHOUT_PROGRESS,
        history(at=lambda t: {"cpu": (0.2, 0.0, 2.6, 0.4, 0.1)[int(t // INTERVAL) % 5]}),
        check=lambda e: e["cpu_window_max"] == 2.6 and "not spinning" in e["detail"],
    ),
    Case(
        "30% CPU all along, no TCP: between the thresholds",
        State.STALLED,
        Reason.TOOL_CALL_WITHOUT_PROGRESS,
        history(cpu=30.0),
    ),
    Case(
        "30% CPU all along with a socket open: network, not a spin",
        State.STALLED,
        Reason.WAITING_ON_NETWORK,
        history(cpu=30.0, tcp={"ESTABLISHED": 1}),
    ),
    Case(
        "idle-CLI noise with a socket open is waiting on the network",
        State.STALLED,
        Reason.WAITING_ON_NETWORK,
        history(tcp={"ESTABLISHED": 1}, at=lambda t: {"cpu": 2.6} if t == NOW - 50 else {"cpu": 0.3}),
    ),
    Case(
        "a child on a CPU under the threshold",
        State.STALLED,
        Reason.TOOL_CALL_WITHOUT_PROGRESS,
        history(cpu=0.5, children=[proc(5002, status="R", cpu=0.5, name="make")]),
        check=lambda e: e["working_children"] == [5002] and e["children"] == 1,
    ),
    Case(
        "a child blocked in the kernel (D)",
        State.STALLED,
        Reason.TOOL_CALL_WITHOUT_PROGRESS,
        history(children=[proc(5003, status="D", name="cp")]),
        check=lambda e: e["working_children"] == [5003] and "D" in e["detail"],
    ),
    Case(
        "children coming and going at low CPU",
        State.STALLED,
        Reason.TOOL_CALL_WITHOUT_PROGRESS,
        history(at=lambda t: {"children": [proc(int(t) % 10_000 + 6000, name="sleep")]}),
    ),
    Case(
        "read bytes moving at low CPU, agent silent",
        State.STALLED,
        Reason.TOOL_CALL_WITHOUT_PROGRESS,
        history(at=lambda t: {"read": int(t)}),
    ),
    Case(
        "API retry heartbeats, no progress, connections dropped between attempts",
        State.STALLED,
        Reason.API_RETRYING,
        history(at=lambda t: {"tcp": {"SYN_SENT": 1}} if t == NOW - 100 else {}),
        activity=acts(
            ev(NOW - 3000, turn="open"),
            ev(NOW - 1200),
            *(hb(NOW - 250 + 40 * i, "system/api_retry", retry=True) for i in range(6)),
        ),
        check=lambda e: e["heartbeat_age_s"] == 50.0,
    ),
    Case(
        "announced retry not yet due, last heartbeat older than stall_after",
        State.STALLED,
        Reason.API_RETRYING,
        history(),
        activity=acts(
            ev(NOW - 3000, turn="open"),
            ev(NOW - 1200),
            hb(NOW - 400, "api_retry", retry=True, retry_attempt=6, retry_max=10, retry_delay_s=450.0),
        ),
        check=lambda e: e["retry"]
        == {"attempt": 6, "max_retries": 10, "next_in_s": 50.0, "text": "attempt 6/10, next in 50 s"}
        and e["detail"] == "attempt 6/10, next in 50 s",
    ),
    Case(
        "announced retry whose attempt sits on an open connection: waiting on the network",
        State.STALLED,
        Reason.WAITING_ON_NETWORK,
        history(tcp={"ESTABLISHED": 1}),
        activity=acts(
            ev(NOW - 3000, turn="open"),
            ev(NOW - 1200),
            hb(NOW - 100, "api_retry", retry=True, retry_attempt=2, retry_max=10, retry_delay_s=0.6),
        ),
        check=lambda e: e["retry"]["text"] == "attempt 2/10 started 99 s ago" and "TCP open" in e["detail"],
    ),
    Case(
        "API retries inside an open tool call (sub-agent)",
        State.STALLED,
        Reason.API_RETRYING,
        history(children=[sleep_child]),
        activity=acts(
            ev(NOW - 1200, tool_call="open", tool="Task", tool_id="t1"),
            hb(NOW - 30, "system/api_retry", retry=True),
        ),
    ),
    Case(
        "tool open 20 minutes with a live child",
        State.LONG_RUNNING,
        Reason.TOOL_RUNNING,
        history(children=[sleep_child]),
        activity=acts(ev(NOW - 3000, turn="open"), ev(NOW - 1200, tool_call="open", tool="Bash", tool_id="b1")),
        check=lambda e: e["open_tools"] == [{"tool": "Bash", "age_s": 1200.0}] and e["children"] == 1,
    ),
    Case(
        "tool open 20 minutes, no child but TCP (a curl inside the agent)",
        State.LONG_RUNNING,
        Reason.TOOL_RUNNING,
        history(tcp={"ESTABLISHED": 1}),
        activity=acts(ev(NOW - 1200, tool_call="open", tool="WebFetch", tool_id="w1")),
    ),
    Case(
        "tool open beyond tool_stall_after, child alive",
        State.STALLED,
        Reason.TOOL_CALL_WITHOUT_PROGRESS,
        history(children=[sleep_child]),
        activity=acts(ev(NOW - 2000, tool_call="open", tool="Bash", tool_id="b1")),
    ),
    Case(
        "tool open, tree shows no life at all",
        State.STALLED,
        Reason.TOOL_CALL_WITHOUT_PROGRESS,
        history(),
        activity=acts(ev(NOW - 600, tool_call="open", tool="Bash", tool_id="b1")),
    ),
    Case(
        "tool_progress heartbeats every 30 s for an old tool call",
        State.LONG_RUNNING,
        Reason.TOOL_RUNNING,
        history(),
        activity=acts(
            ev(NOW - 5000, tool_call="open", tool="Bash", tool_id="b1"),
            *(hb(NOW - 30 * i) for i in range(10, -1, -1)),
        ),
        check=lambda e: e["heartbeat_age_s"] == 0.0,
    ),
    Case(
        "a heartbeat with no known tool call",
        State.LONG_RUNNING,
        Reason.TOOL_RUNNING,
        history(),
        activity=acts(ev(NOW - 1200), hb(NOW - 100, "ping")),
    ),
    Case(
        "one access-denied sample in the window",
        State.STALLED,
        Reason.ACCESS_DENIED,
        history(at=lambda t: {"status": SampleStatus.ACCESS_DENIED} if t == NOW - 100 else {}),
    ),
    Case(
        "socket table unreadable for the whole window",
        State.STALLED,
        Reason.ACCESS_DENIED,
        history(unknown_tcp=True),
        check=lambda e: e["tcp"] is None and e["tcp_window_max"] is None,
    ),
    Case(
        "CPU rate unknown in the window",
        State.STALLED,
        Reason.ACCESS_DENIED,
        history(at=lambda t: {"cpu": None} if t == NOW - 150 else {}),
    ),
    Case(
        "latest probe timed out",
        State.STALLED,
        Reason.PROBE_TIMEOUT,
        [*history(), tree(NOW + 10, status=SampleStatus.PROBE_TIMEOUT)],
        now=NOW + 10,
        check=lambda e: e["sample_status"] == "probe_timeout",
    ),
    Case(
        "a probe timeout earlier in the window",
        State.STALLED,
        Reason.PROBE_TIMEOUT,
        history(at=lambda t: {"status": SampleStatus.PROBE_TIMEOUT} if t == NOW - 100 else {}),
    ),
    Case(
        "no samples at all (no pid known yet)",
        State.STALLED,
        Reason.INSUFFICIENT_SAMPLES,
        [],
        check=lambda e: e["samples_in_window"] == 0
        and e["detail"] == "no known samples in the 300 s window: need at least 2 covering 150 s",
    ),
    Case(
        "a single sample in the window",
        State.STALLED,
        Reason.INSUFFICIENT_SAMPLES,
        [tree(NOW)],
    ),
    Case(
        "samples cover only the last minute of the window",
        State.STALLED,
        Reason.INSUFFICIENT_SAMPLES,
        history(60),
        check=lambda e: e["detail"] == "7 known samples cover 60 s of the 300 s window: need at least 2 covering 150 s",
    ),
    Case(
        "the first sight of the process (no CPU rate yet) is not unreadable data",
        State.STALLED,
        Reason.INSUFFICIENT_SAMPLES,
        history(300, at=lambda t: {"cpu": None} if t == NOW - 300 else {}),
        info=info(started_at=NOW - 300),
        check=lambda e: "first seen inside the window" in e["detail"],
    ),
    Case(
        "a CPU rate missing later than the first sight is unreadable",
        State.STALLED,
        Reason.ACCESS_DENIED,
        history(300, at=lambda t: {"cpu": None} if t in (NOW - 300, NOW - 100) else {}),
        info=info(started_at=NOW - 300),
    ),
    Case(
        "after a two-hour suspend the gap is still silence, but no proof of idleness",
        State.STALLED,
        Reason.INSUFFICIENT_SAMPLES,
        [*history(600, now=NOW - 7200), *history(60)],
        watch_since=NOW - 60,
        check=lambda e: e["silence_s"] == 1200.0,  # since the session's start, not since watch_since
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_table(case: Case) -> None:
    v = classify(CFG, case.info, case.samples, case.activity, case.now, case.watch_since)
    assert (v.state, v.reason) == (case.state, case.reason), v.evidence
    assert v.reason in REASONS_BY_STATE[v.state]
    # Evidence is small, JSON-serialisable and always has the same keys.
    text = json.dumps(v.evidence)
    assert len(text) < 2000
    for key in (
        "silence_s",
        "cpu_percent",
        "cpu_window_max",
        "tcp",
        "tcp_window_max",
        "children",
        "working_children",
        "open_tools",
        "heartbeat_age_s",
        "sample_status",
        "samples_in_window",
    ):
        assert key in v.evidence, key
    assert v.evidence["silence_s"] == round(v.silence_s, 1)
    if case.check is not None:
        assert case.check(dict(v.evidence)), v.evidence


def test_every_state_and_reason_is_reached() -> None:
    reached = {(c.state, c.reason) for c in CASES}
    expected = {(s, r) for s, reasons in REASONS_BY_STATE.items() for r in reasons}
    assert expected <= reached, expected - reached


def test_silence_counts_from_the_later_of_progress_and_start() -> None:
    a = acts(ev(NOW - 1000))
    assert classify(CFG, info(), history(), a, NOW, WATCH).silence_s == 1000.0
    # A gap in our own watching (restart, late tick) does not reset it (issue #20).
    assert classify(CFG, info(), history(), a, NOW, NOW - 200).silence_s == 1000.0
    assert classify(CFG, info(started_at=NOW - 100), history(), a, NOW, WATCH).silence_s == 100.0
    # An event stamped in the future (clock skew) is not negative silence.
    assert classify(CFG, info(), history(), acts(ev(NOW + 50)), NOW, WATCH).silence_s == 0.0


def test_suspend_gap_then_stuck_once_watched_for_stall_after() -> None:
    """The watch window restarts after a gap; it turns stuck only once the
    watchdog has itself watched a whole stall_after, and the silence it reports
    is the agent's whole silence (the gap included: issue #20)."""
    resumed = NOW - 290
    samples = [*history(600, now=resumed - 7200), *history(290)]
    a = acts(ev(resumed - 9000))
    v = classify(CFG, info(), samples, a, NOW, resumed)
    assert (v.state, v.reason) == (State.STALLED, Reason.INSUFFICIENT_SAMPLES)
    later = [*samples, *history(20, now=NOW + 20)[1:]]
    v = classify(CFG, info(), later, a, NOW + 20, resumed)
    assert (v.state, v.reason) == (State.STUCK, Reason.NO_ACTIVITY)
    assert v.silence_s == pytest.approx(9310.0)


def test_old_tool_age_does_not_count_unwatched_time() -> None:
    """A tool call opened before a suspend: its silent allowance counts from
    when we resumed watching, like silence."""
    a = acts(ev(NOW - 5000, tool_call="open", tool="Bash", tool_id="b1"))
    samples = history(children=[sleep_child])
    assert classify(CFG, info(), samples, a, NOW, NOW - 400).state is State.LONG_RUNNING
    assert classify(CFG, info(), samples, a, NOW, WATCH).reason is Reason.TOOL_CALL_WITHOUT_PROGRESS


def test_stale_heartbeats_and_overdue_retries_do_not_save_a_silent_session() -> None:
    # A retry's next attempt may last as long as the attempt before it (from the last
    # progress, 20 s here), then stall_after of silence is allowed: overdue at NOW - 30.
    a = acts(ev(NOW - 370), hb(NOW - 400), hb(NOW - 350, "system/api_retry", retry=True))
    v = classify(CFG, info(), history(), a, NOW, WATCH)
    assert (v.state, v.reason) == (State.STUCK, Reason.NO_ACTIVITY)
    assert v.evidence["heartbeat_age_s"] == 350.0
    # The same retry 31 s later is still within its allowance.
    assert classify(CFG, info(), history(now=NOW - 31), a, NOW - 31, WATCH).reason is Reason.API_RETRYING
    # An announced delay moves the attempt (and its allowance) later; the attempt's
    # own expected length is capped at MAX_ATTEMPT_S (the first attempt here: 1650 s).
    delayed = acts(ev(NOW - 2000), hb(NOW - 950, "api_retry", retry=True, retry_delay_s=40.0))
    assert retry_holds(delayed, NOW - 11, CFG.stall_after)  # 950 - 40 - 600 - 300 = 10 s short
    assert classify(CFG, info(), history(now=NOW - 11), delayed, NOW - 11, WATCH).reason is Reason.API_RETRYING
    assert not retry_holds(delayed, NOW - 10, CFG.stall_after)
    assert classify(CFG, info(), history(), delayed, NOW, WATCH).state is State.STUCK
    # Progress after a retry settles it: the retry schedule is cleared.
    settled = delayed.apply(ev(NOW - 900))
    assert settled.retry_due is None and settled.last_retry_time == NOW - 950
    assert not retry_holds(settled, NOW - 600, CFG.stall_after)


def test_turn_closed_clears_open_tools_and_means_idle() -> None:
    a = acts(
        ev(NOW - 3000, "UserPromptSubmit", turn="open"),
        ev(NOW - 2900, "PreToolUse", tool_call="open", tool="Bash"),
        ev(NOW - 2800, "Stop", turn="close"),
    )
    v = classify(CFG, info(Mode.INTERACTIVE), history(), a, NOW, WATCH)
    assert (v.state, v.reason) == (State.IDLE, Reason.NO_OPEN_TURN)
    assert v.evidence["open_tools"] == []


def test_samples_before_watch_since_are_not_evidence() -> None:
    assert window_samples(history(100), NOW - 50) == tuple(history(50))
    assert window_samples([], NOW) == ()


def test_tree_progress_time() -> None:
    thr = work_cpu_percent(CFG)
    assert thr == WORK_CPU_PERCENT == 5.0
    assert tree_progress_time([], thr) is None
    assert tree_progress_time(history(100), thr) is None
    assert tree_progress_time(history(100, at=lambda t: {"cpu": 5.0} if t == NOW - 40 else {}), thr) == NOW - 40
    # Idle noise of a waiting CLI (0-3%, a TUI spinner 2-4%) is not work.
    noise = history(100, at=lambda t: {"cpu": (0.4, 1.0, 2.6, 3.9)[int(t // INTERVAL) % 4]})
    assert tree_progress_time(noise, thr) is None
    # Counters and child sets count only between readable (OK) samples.
    io = [tree(NOW - 20, read=5), tree(NOW - 10, status=SampleStatus.PROBE_TIMEOUT), tree(NOW, read=9)]
    assert tree_progress_time(io, thr) == NOW
    same = [tree(NOW - 20, read=5), tree(NOW - 10, read=None), tree(NOW, read=5)]
    assert tree_progress_time(same, thr) is None
    spawned = [tree(NOW - 20), tree(NOW - 10, children=[sleep_child]), tree(NOW, children=[sleep_child])]
    assert tree_progress_time(spawned, thr) == NOW - 10
    # A partial (access-denied) read missing a child is not a change.
    partial = [
        tree(NOW - 20, children=[sleep_child]),
        tree(NOW - 10, status=SampleStatus.ACCESS_DENIED),
        tree(NOW, children=[sleep_child]),
    ]
    assert tree_progress_time(partial, thr) is None


def test_cpu_thresholds_are_inclusive() -> None:
    """At `cpu_idle_percent` is not zero (never stuck); at `cpu_spin_percent`,
    sustained, is spinning; between them is neither."""
    at_thr = history(cpu=CFG.cpu_idle_percent)
    v = classify(CFG, info(), at_thr, SILENT, NOW, WATCH)
    assert (v.state, v.reason) == (State.STALLED, Reason.TOOL_CALL_WITHOUT_PROGRESS)
    below = history(cpu=CFG.cpu_idle_percent - 0.01)
    assert classify(CFG, info(), below, SILENT, NOW, WATCH).state is State.STUCK
    at_spin = history(cpu=CFG.cpu_spin_percent)
    assert classify(CFG, info(), at_spin, SILENT, NOW, WATCH).reason is Reason.CPU_SPIN
    under_spin = history(cpu=CFG.cpu_spin_percent - 0.01)
    assert classify(CFG, info(), under_spin, SILENT, NOW, WATCH).reason is Reason.TOOL_CALL_WITHOUT_PROGRESS
    # A spin bar under the idle bar is raised to it: spinning is never less than "not zero".
    cfg = ClassifyConfig(stall_after=300.0, cpu_idle_percent=5.0, cpu_spin_percent=2.0)
    assert classify(cfg, info(), history(cpu=3.0), SILENT, NOW, WATCH).state is State.STUCK
    assert classify(cfg, info(), history(cpu=5.0), SILENT, NOW, WATCH).reason is Reason.CPU_SPIN


def test_one_clock_tick_in_a_short_interval_is_noise_not_work() -> None:
    """At a 0.5 s interval, 10 ms of accounted CPU reads as 2%: one such sample in an
    otherwise idle window must not turn a hung session into cpu_spin; two ticks do."""
    cfg = ClassifyConfig(startup_grace=1, stall_after=3, cpu_idle_percent=1.0)
    start = NOW - 100

    def run(blip: float) -> State:
        samples = history(5.0, interval=0.5, at=lambda t: {"cpu": blip} if abs(t - (NOW - 2.0)) < 1e-6 else {})
        return classify(cfg, info(started_at=start), samples, acts(ev(NOW - 50, "assistant")), NOW, start).state

    assert run(2.0) is State.STUCK  # one tick (2%) in 0.5 s
    assert run(4.0) is State.STALLED  # two ticks: real work
    # At the default 5 s interval a tick is 0.2%: anything at the 1% threshold is not zero.
    samples = history(600.0, interval=5.0, at=lambda t: {"cpu": 1.0} if abs(t - (NOW - 100)) < 1e-6 else {})
    assert classify(CFG, info(), samples, SILENT, NOW, WATCH).reason is Reason.TOOL_CALL_WITHOUT_PROGRESS
    # One tick in every short interval is a process that keeps using CPU: not zero.
    steady = history(5.0, interval=0.5, at=lambda t: {"cpu": 2.0})
    assert classify(cfg, info(started_at=start), steady, acts(ev(NOW - 50)), NOW, start).state is State.STALLED


# --------------------------------------------------------------------------- real agents, replayed
#
# The signatures measured on the real CLIs (Claude Code 2.1.330 against a local fake
# API; Codex blackholed in a network namespace; see /work/shared/REAL_AGENTS.md),
# replayed tick by tick the way the daemon runs the classifier: a 5 s interval,
# default CPU thresholds, stall_after 30 s; stream lines parsed by the real parser
# and dated when a tick reads them; the sample history trimmed like the daemon's;
# the previous verdict passed back in; reports through the real backoff.

REAL = ClassifyConfig(startup_grace=30.0, stall_after=30.0)  # cpu 1% / 50%, repeats 60 s .. 3600 s
TICK = 5.0
FIRST_TICK = 2.0  # the daemon first sees the process 2 s after it started
CLAUDE_DELAYS_MS = (600, 1200, 2300, 4400, 9000, 17800, 35200, 38100, 39600, 36400)  # measured schedule
CODEX_CHILD = proc(5200, name="codex")


def idle_cli_cpu(r: float) -> float:
    """A healthy CLI waiting on something: 0-0.4% of a core, with a timer/GC blip of
    1-2.6% in about one sample in six, and the measured 2.2% blip at 127 s."""
    if r == 127.0:
        return 2.2
    x = (int(r) * 2654435761) % 1000 / 1000.0  # deterministic, well spread
    return round(1.0 + 1.6 * x, 1) if int(r) % 6 == 1 else round(0.4 * x, 2)


def retry_line(attempt: int, delay_ms: int) -> dict[str, Any]:
    return {"type": "system", "subtype": "api_retry", "attempt": attempt, "max_retries": 10,
            "retry_delay_ms": delay_ms, "error_status": None, "error": "unknown"}


INIT = {"type": "system", "subtype": "init", "session_id": "s", "model": "m"}
FAILED = {"type": "result", "subtype": "error_during_execution", "is_error": True}


def attempts(first_start: float, lasting: float, count: int) -> tuple[list[tuple[float, dict[str, Any]]], float]:
    """Claude's retry loop: each attempt fails `lasting` s after it starts and announces
    the next with the measured delay; after `count` attempts it gives up (error result).
    Returns the lines and when the CLI exits."""
    lines: list[tuple[float, dict[str, Any]]] = []
    start = first_start
    for k in range(1, count):
        fail = start + lasting
        lines.append((fail, retry_line(k, CLAUDE_DELAYS_MS[k - 1])))
        start = fail + CLAUDE_DELAYS_MS[k - 1] / 1000.0
    end = start + lasting
    lines.append((end, FAILED))
    return lines, end + 0.05


@dataclass(frozen=True)
class Signature:
    sample: Callable[[float], TreeSample]  # seconds since start -> the tree at that tick (time set later)
    lines: Sequence[tuple[float, dict[str, Any]]] = ()  # (seconds since start, stream-json object)
    exit_at: float | None = None
    events: bool = True  # the session has an event source


def replay(
    sig: Signature, until: float, cfg: ClassifyConfig = REAL, *, hysteresis: bool = True
) -> tuple[list[tuple[float, State, Reason]], list[float]]:
    """The verdict timeline [(seconds since start, state, reason) at each change] and
    the times a report is made, from FIRST_TICK to `until` or the session's exit.
    hysteresis=False never passes the previous verdict in."""
    from otelwatch.classify.backoff import fingerprint, next_report
    from otelwatch.events.lines import parse_events

    t0 = NOW
    lines = sorted(sig.lines, key=lambda x: x[0])
    samples: list[TreeSample] = []
    activity = Activity()
    previous = None
    schedule = None
    timeline: list[tuple[float, State, Reason]] = []
    reports: list[float] = []
    session = info(started_at=t0 + FIRST_TICK, events=sig.events)
    r = FIRST_TICK
    while r <= until:
        now = t0 + r
        while lines and lines[0][0] <= r:
            for e in parse_events(json.dumps(lines.pop(0)[1]).encode(), now, "stream") or ():
                activity = activity.apply(e)
        if sig.exit_at is not None and r >= sig.exit_at:
            sample = TreeSample(time=now, status=SampleStatus.VANISHED, root=ROOT)
        else:
            sample = replace(sig.sample(r), time=now)
            if not samples:  # the first sight: no CPU rate yet
                sample = replace(sample, cpu_percent=None,
                                 processes=tuple(replace(p, cpu_percent=None) for p in sample.processes))
        samples.append(sample)
        horizon = now - (cfg.stall_after + 3 * TICK)
        while len(samples) > 2 and samples[1].time < horizon:
            samples.pop(0)
        v = classify(cfg, session, samples, activity, now, t0, previous if hysteresis else None)
        if previous is None or (v.state, v.reason) != (previous.state, previous.reason):
            timeline.append((r, v.state, v.reason))
        schedule, due = next_report(schedule, fingerprint(v, activity, sample), v.state, now, cfg)
        if due:
            reports.append(r)
        previous = v
        if v.state is State.EXITED:
            break
        r += TICK
    return timeline, reports


def backoff_times(first: float, until: float, base: float = 60.0) -> list[float]:
    """The report times of one unchanged stalled condition: first, +base, +2 base, ..."""
    out, t, gap = [], first, base
    while t <= until:
        out.append(t)
        t, gap = t + gap, gap * 2
    return out


def _net_tree(r: float, lasting: float) -> TreeSample:
    """One ESTABLISHED connection to the API; the tick just after each abort catches
    the reconnect with no socket; ~20% CPU for the first 5 s, then idle-CLI noise."""
    aborted = r > lasting and (r - 1.0) % lasting < TICK
    return tree(0.0, cpu=20.0 if r < 7 else idle_cli_cpu(r), tcp={} if aborted else {"ESTABLISHED": 1})


NEVER_ANSWERS = Signature(
    sample=lambda r: _net_tree(r, 360.0),
    lines=[(1.0, INIT), *attempts(1.0, 360.0, 11)[0]],
)
_partial, _partial_exit = attempts(3.0, 300.0, 4)
PARTIAL_STREAM = Signature(
    sample=lambda r: _net_tree(r, 300.0),
    lines=[(1.0, INIT), (3.0, {"type": "assistant", "message": {"content": [{"type": "text", "text": "Let"}]}}),
           *_partial],
    exit_at=_partial_exit,
)
_drops, _drops_exit = attempts(1.0, 0.001, 11)
DROPS = Signature(
    # ~0% CPU, and each attempt lasts ~1 ms: no socket is ever seen. Zero everything:
    # only the announced retries keep it from stuck.
    sample=lambda r: tree(0.0, cpu=0.1 if int(r) % 3 else 0.3, tcp={}),
    lines=[(0.8, INIT), *_drops],
    exit_at=_drops_exit,
)
_bash = [proc(5101, name="bash"), proc(5102, name="sleep")]
LONG_BASH = Signature(
    sample=lambda r: tree(0.0, cpu=0.2 + (int(r) % 9) / 10.0, tcp={"ESTABLISHED": 1} if r < 300 else {},
                          children=_bash if 3.5 <= r < 603.0 else ()),
    lines=[
        (1.0, INIT),
        (3.0, {"type": "assistant", "message": {"content": [
            {"type": "tool_use", "id": "toolu_1", "name": "Bash", "input": {"command": "sleep 600"}}]}}),
        *((33.0 + 30 * k, {"type": "tool_progress", "tool_use_id": "toolu_1", "tool_name": "Bash",
                           "elapsed_time_seconds": 30 * (k + 1)}) for k in range(19)),
        (603.2, {"type": "user", "message": {"content": [{"type": "tool_result", "tool_use_id": "toolu_1"}]}}),
        (605.0, {"type": "assistant", "message": {"content": [{"type": "text", "text": "done"}],
                                                  "stop_reason": "end_turn"}}),
        (605.5, {"type": "result", "subtype": "success", "is_error": False}),
    ],
    exit_at=606.0,
)
# Codex found by process discovery, no event source: a node wrapper (the root) and
# the native codex child; ~40% CPU while it starts, then it sits on a blackholed socket
# at 0-1% (single samples at 1-2.6% included).
CODEX_BLACKHOLED = Signature(
    sample=lambda r: tree(0.0, cpu=40.0 if r <= 12 else idle_cli_cpu(r),
                          tcp={"ESTABLISHED": 1} if r >= 10 else {}, children=[CODEX_CHILD]),
    events=False,
)


def test_replay_never_answering_api() -> None:
    """Accepts, reads, never answers; each attempt aborted after 360 s and retried on a
    new connection. waiting_on_network once stall_after has passed, and no change
    after: CPU blips, reconnects and the announced retries (each new attempt sits on
    its connection again) change nothing; the retry is in the evidence."""
    timeline, reports = replay(NEVER_ANSWERS, 1500.0)
    assert timeline == [
        (2.0, State.STARTING, Reason.STARTUP_GRACE),
        (32.0, State.STALLED, Reason.WAITING_ON_NETWORK),
    ]
    assert reports == backoff_times(32.0, 1500.0) == [32.0, 92.0, 212.0, 452.0, 932.0]


def test_replay_partial_stream() -> None:
    """Headers and part of the stream, then silence; the CLI's byte-stream idle abort
    (300 s) retries three times, then gives up and exits 1."""
    timeline, _ = replay(PARTIAL_STREAM, 1500.0)
    assert timeline == [
        (2.0, State.STARTING, Reason.STARTUP_GRACE),
        (32.0, State.ACTIVE, Reason.RECENT_PROGRESS),
        (37.0, State.STALLED, Reason.WAITING_ON_NETWORK),  # last output at 3 s: within stall_after + a tick
        (1212.0, State.EXITED, Reason.PROCESS_EXITED),
    ]


def test_replay_connection_drops_with_the_real_retry_schedule() -> None:
    """Every connection dropped: eleven attempts of ~1 ms, delays 0.6 s .. 40 s. Once the
    delays exceed stall_after the session is still api_retrying, never stuck: each
    announced attempt is awaited. Reports follow the backoff alone."""
    timeline, reports = replay(DROPS, 400.0)
    assert timeline == [
        (2.0, State.STARTING, Reason.STARTUP_GRACE),
        (32.0, State.STALLED, Reason.API_RETRYING),
        (187.0, State.EXITED, Reason.PROCESS_EXITED),
    ]
    assert reports == [32.0, 92.0]


def test_replay_long_bash_tool() -> None:
    """`sleep 600` in a Bash tool with tool_progress every 30 s: long_running throughout."""
    timeline, reports = replay(LONG_BASH, 700.0)
    assert timeline == [
        (2.0, State.STARTING, Reason.STARTUP_GRACE),
        (32.0, State.ACTIVE, Reason.RECENT_PROGRESS),
        (37.0, State.LONG_RUNNING, Reason.TOOL_RUNNING),
        (607.0, State.EXITED, Reason.PROCESS_EXITED),
    ]
    assert reports == []


def test_replay_blackholed_codex_without_event_source() -> None:
    """Idle noise is not progress: the discovered Codex turns stalled/waiting_on_network
    stall_after past its last real work and stays so; 10 minutes of it make exactly
    the backoff's reports."""
    timeline, reports = replay(CODEX_BLACKHOLED, 42.0 + 600.0)
    assert timeline == [
        (2.0, State.STARTING, Reason.STARTUP_GRACE),
        (32.0, State.ACTIVE, Reason.RECENT_PROGRESS),
        (42.0, State.STALLED, Reason.WAITING_ON_NETWORK),  # work last seen at 12 s
    ]
    assert reports == backoff_times(42.0, 642.0) == [42.0, 102.0, 222.0, 462.0]


def test_replay_idle_cli_with_no_socket_and_no_events() -> None:
    """Low CPU, no TCP, no children, no events (with the default stall_after): not
    stuck, since its CPU is not zero, and one reason throughout."""
    sig = Signature(sample=lambda r: tree(0.0, cpu=idle_cli_cpu(r)), lines=[(1.0, INIT)])
    timeline, reports = replay(sig, 1800.0, ClassifyConfig(startup_grace=30.0, stall_after=300.0))
    assert timeline == [
        (2.0, State.STARTING, Reason.STARTUP_GRACE),
        (32.0, State.ACTIVE, Reason.RECENT_PROGRESS),
        (302.0, State.STALLED, Reason.TOOL_CALL_WITHOUT_PROGRESS),
    ]
    assert reports == backoff_times(302.0, 1800.0)


@pytest.mark.parametrize("sig", [NEVER_ANSWERS, PARTIAL_STREAM, DROPS, LONG_BASH, CODEX_BLACKHOLED],
                         ids=["never-answers", "partial-stream", "drops", "long-bash", "codex-blackholed"])
def test_replay_states_do_not_depend_on_hysteresis(sig: Signature) -> None:
    """The previous verdict only steadies a stalled reason: the states and the times
    they change are the same without it."""
    def states(timeline: list[tuple[float, State, Reason]]) -> list[tuple[float, State]]:
        out: list[tuple[float, State]] = []
        for r, state, _ in timeline:
            if not out or out[-1][1] is not state:
                out.append((r, state))
        return out

    with_h, _ = replay(sig, 1300.0)
    without, _ = replay(sig, 1300.0, hysteresis=False)
    assert states(with_h) == states(without)
    assert State.STUCK not in {state for _, state, _ in without}


def test_retry_phrase() -> None:
    a = Activity(last_retry_time=NOW - 17.8, retry_due=NOW, retry_attempt=6, retry_max=10)
    assert retry_phrase(a, NOW - 17.8) == "attempt 6/10, next in 18 s"
    assert retry_phrase(a, NOW - 0.5) == "attempt 6/10, next in <1 s"
    assert retry_phrase(a, NOW + 40.2) == "attempt 6/10 started 40 s ago"
    assert retry_phrase(Activity(retry_due=NOW), NOW - 10) == "next attempt in 10 s"
    assert retry_phrase(Activity(retry_attempt=3), NOW) == "attempt 3"
    assert retry_phrase(Activity(), NOW) == ""


# Claude Code 2.1.330 moves a Bash call past its 120 s timeout to the background, ends
# the turn (tool_result, assistant, result) and keeps running until the task is done.
BACKGROUNDED_BASH = Signature(
    sample=lambda r: tree(0.0, cpu=0.2 + (int(r) % 9) / 10.0, tcp={"ESTABLISHED": 1} if r < 420 else {},
                          children=_bash if 3.5 <= r < 603.0 else ()),
    lines=[
        (1.0, INIT),
        (3.0, {"type": "assistant", "message": {"content": [
            {"type": "tool_use", "id": "toolu_1", "name": "Bash", "input": {"command": "sleep 600"}}]}}),
        (4.0, {"type": "system", "subtype": "task_started", "task_id": "b87", "tool_use_id": "toolu_1",
               "is_backgrounded": False, "task_type": "local_bash"}),
        *((33.0 + 30 * k, {"type": "tool_progress", "tool_use_id": "toolu_1", "tool_name": "Bash",
                           "elapsed_time_seconds": 30 * (k + 1)}) for k in range(4)),
        (121.0, {"type": "system", "subtype": "background_tasks_changed",
                 "tasks": [{"task_id": "b87", "task_type": "local_bash"}]}),
        (121.0, {"type": "system", "subtype": "task_updated", "task_id": "b87", "patch": {"is_backgrounded": True}}),
        (121.1, {"type": "user", "message": {"content": [{"type": "tool_result", "tool_use_id": "toolu_1",
                                                          "content": "moved to the background (ID: b87)"}]}}),
        (121.1, {"type": "assistant", "message": {"content": [{"type": "text", "text": "started"}],
                                                  "stop_reason": "end_turn"}}),
        (121.1, {"type": "result", "subtype": "success", "is_error": False}),
        (603.1, {"type": "system", "subtype": "background_tasks_changed", "tasks": []}),
    ],
    exit_at=605.0,
)


def test_replay_bash_moved_to_the_background() -> None:
    """The turn ends but the task runs on with its processes: long_running, not
    stalled/waiting_on_network (measured on the real CLI: 2.1.330 backgrounds at 121 s)."""
    timeline, reports = replay(BACKGROUNDED_BASH, 690.0)
    assert timeline == [
        (2.0, State.STARTING, Reason.STARTUP_GRACE),
        (32.0, State.ACTIVE, Reason.RECENT_PROGRESS),
        (37.0, State.LONG_RUNNING, Reason.TOOL_RUNNING),
        (122.0, State.ACTIVE, Reason.RECENT_PROGRESS),  # the turn's end is progress
        (152.0, State.LONG_RUNNING, Reason.TOOL_RUNNING),  # was stalled/waiting_on_network at 157 s
        (607.0, State.EXITED, Reason.PROCESS_EXITED),
    ]
    assert reports == []


def test_background_task_list_replaces_and_keeps_first_seen() -> None:
    from otelwatch.events.lines import parse_line
    first = parse_line(b'{"type":"system","subtype":"background_tasks_changed","tasks":[{"task_id":"a"}]}',
                       NOW - 100, "stream")
    second = parse_line(b'{"type":"system","subtype":"background_tasks_changed",'
                        b'"tasks":[{"task_id":"a"},{"task_id":"b"}]}', NOW - 50, "stream")
    assert first is not None and second is not None and first.background == ("a",)
    a = acts(ev(NOW - 200, "result", turn="close")).apply(first).apply(second)
    assert [(o.tool_id, o.since) for o in a.background_tasks] == [("a", NOW - 100), ("b", NOW - 50)]
    assert a.last_progress_time == NOW - 200  # where the agent stands, not progress
    assert acts(ev(NOW - 10, "Stop", turn="close")).background_tasks == ()


def test_blind_is_not_idle() -> None:
    """Issue #20: turn information that could not be read is never a closed turn."""
    from dataclasses import replace as _replace

    blind = _replace(info(Mode.INTERACTIVE, events=False), turns_visible=False)
    # Nothing in the window: unknown, never idle (and never stuck).
    v = classify(CFG, blind, history(), acts(), NOW, WATCH)
    assert (v.state, v.reason) == (State.STALLED, Reason.ACCESS_DENIED)
    assert "could not be read" in v.evidence["detail"]
    # CPU (a TUI draws) is no progress either, and a socket is no proof of a turn.
    for samples in (history(cpu=8.0), history(tcp={"ESTABLISHED": 1})):
        v = classify(CFG, blind, samples, acts(), NOW, WATCH)
        assert (v.state, v.reason) == (State.STALLED, Reason.ACCESS_DENIED)
    # Seen, the same session at its input box is idle.
    assert classify(CFG, info(Mode.INTERACTIVE, events=False), history(), acts(), NOW, WATCH).state is State.IDLE
    # A blind headless session is judged by its tree, and never stuck.
    headless = _replace(info(events=False), turns_visible=False)
    v = classify(CFG, headless, history(), acts(), NOW, WATCH)
    assert (v.state, v.reason) == (State.STALLED, Reason.ACCESS_DENIED)
    assert classify(CFG, info(events=False), history(), acts(), NOW, WATCH).state is State.STUCK
