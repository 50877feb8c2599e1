"""Table-driven tests of the pure classifier: every state and reason, with the
evidence a person would see. Time is a number; nothing sleeps.

The helpers here (proc, tree, history, acts, info) are also used by
test_classify_properties.py.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest

from otelwatch.classify import classify, tree_progress_time, window_samples
from otelwatch.config import ClassifyConfig
from otelwatch.model import (
    REASONS_BY_STATE,
    Activity,
    Event,
    EventKind,
    Mode,
    ProcessIdentity,
    ProcessSample,
    Reason,
    SampleStatus,
    SessionInfo,
    State,
    TreeSample,
)

CFG = ClassifyConfig(
    startup_grace=30.0,
    stall_after=300.0,
    tool_stall_after=1800.0,
    cpu_idle_percent=1.0,
    repeat_base=60.0,
    repeat_max=3600.0,
)
NOW = 1_700_000_000.0
STARTED = NOW - 4 * 3600.0  # seen four hours ago
WATCH = STARTED  # the daemon has watched all along
ROOT_PID = 4242
ROOT = ProcessIdentity(ROOT_PID, 1_699_990_000.0)
INTERVAL = 10.0


def proc(
    pid: int,
    *,
    status: str = "S",
    cpu: float | None = 0.0,
    tcp: dict[str, int] | None = None,
    create: float | None = None,
    name: str = "child",
) -> ProcessSample:
    return ProcessSample(
        pid=pid,
        ppid=ROOT_PID if pid != ROOT_PID else 1,
        create_time=create if create is not None else (ROOT.create_time if pid == ROOT_PID else 1_699_999_000.0 + pid),
        name="agent" if pid == ROOT_PID else name,
        status=status,
        cpu_seconds=12.0,
        cpu_percent=cpu,
        rss_bytes=50_000_000,
        threads=4,
        tcp={} if tcp is None else tcp,
    )


def tree(
    t: float,
    *,
    status: SampleStatus = SampleStatus.OK,
    cpu: float | None = 0.0,
    tcp: dict[str, int] | None = None,
    unknown_tcp: bool = False,
    root_status: str = "S",
    children: Sequence[ProcessSample] = (),
    read: int | None = None,
    write: int | None = None,
) -> TreeSample:
    """One tree sample: the root agent process plus `children`."""
    if status in (SampleStatus.VANISHED, SampleStatus.PROBE_TIMEOUT):
        return TreeSample(time=t, status=status, root=ROOT, error=str(status))
    tcp_map = None if unknown_tcp else ({} if tcp is None else dict(tcp))
    root = proc(ROOT_PID, status="Z" if status is SampleStatus.ZOMBIE else root_status, cpu=cpu)
    return TreeSample(
        time=t,
        status=status,
        root=ROOT,
        processes=(root, *children),
        cpu_percent=cpu,
        cpu_seconds=12.0,
        rss_bytes=50_000_000,
        threads=4 + len(children),
        num_fds=20,
        tcp=tcp_map,
        children=len(children),
        read_bytes=read,
        write_bytes=write,
    )


def history(
    span: float = 900.0,
    *,
    now: float = NOW,
    interval: float = INTERVAL,
    at: Callable[[float], dict[str, Any]] | None = None,
    **kw: Any,
) -> list[TreeSample]:
    """Samples every `interval` over the last `span` seconds up to `now`. `kw` applies
    to all of them; `at(t)` returns overrides for the sample at time t."""
    n = int(span // interval)
    out = []
    for i in range(n, -1, -1):
        t = now - i * interval
        args = dict(kw)
        if at is not None:
            args.update(at(t))
        out.append(tree(t, **args))
    return out


def ev(t: float, type_: str = "assistant", **kw: Any) -> Event:
    return Event(time=t, type=type_, **kw)


def hb(t: float, type_: str = "tool_progress", **kw: Any) -> Event:
    return Event(time=t, type=type_, kind=EventKind.HEARTBEAT, **kw)


def acts(*events: Event) -> Activity:
    a = Activity()
    for e in events:
        a = a.apply(e)
    return a


def info(
    mode: Mode = Mode.HEADLESS,
    *,
    started_at: float = STARTED,
    events: bool = True,
    runtime_alive: bool | None = None,
) -> SessionInfo:
    return SessionInfo(mode=mode, started_at=started_at, has_event_source=events, runtime_alive=runtime_alive)


# A headless run whose last progress was 20 minutes ago (well past stall_after).
SILENT = acts(ev(NOW - 3000, "system", turn="open"), ev(NOW - 1200, "assistant"))


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
        "one CPU burst in the window, idle now",
        State.STALLED,
        Reason.CPU_SPIN,
        history(at=lambda t: {"cpu": 50.0} if t == NOW - 200 else {}),
        check=lambda e: e["cpu_window_max"] == 50.0 and e["cpu_percent"] == 0.0,
    ),
    Case(
        "a child on a CPU under the threshold",
        State.STALLED,
        Reason.CPU_SPIN,
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
        "API retry heartbeats, no progress",
        State.STALLED,
        Reason.API_RETRYING,
        history(tcp={"SYN_SENT": 1}),
        activity=acts(
            ev(NOW - 3000, turn="open"),
            ev(NOW - 1200),
            *(hb(NOW - 250 + 40 * i, "system/api_retry", retry=True) for i in range(6)),
        ),
        check=lambda e: e["heartbeat_age_s"] == 50.0,
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
        Reason.ACCESS_DENIED,
        [],
        check=lambda e: e["samples_in_window"] == 0 and "insufficient" in e["detail"],
    ),
    Case(
        "a single sample in the window",
        State.STALLED,
        Reason.ACCESS_DENIED,
        [tree(NOW)],
    ),
    Case(
        "samples cover only the last minute of the window",
        State.STALLED,
        Reason.ACCESS_DENIED,
        history(60),
    ),
    Case(
        "after a two-hour suspend the gap is not silence",
        State.ACTIVE,
        Reason.RECENT_PROGRESS,
        [*history(600, now=NOW - 7200), *history(60)],
        watch_since=NOW - 60,
        check=lambda e: e["silence_s"] == 60.0,
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


def test_silence_counts_from_the_latest_of_progress_watch_and_start() -> None:
    a = acts(ev(NOW - 1000))
    assert classify(CFG, info(), history(), a, NOW, WATCH).silence_s == 1000.0
    assert classify(CFG, info(), history(), a, NOW, NOW - 200).silence_s == 200.0
    assert classify(CFG, info(started_at=NOW - 100), history(), a, NOW, WATCH).silence_s == 100.0
    # An event stamped in the future (clock skew) is not negative silence.
    assert classify(CFG, info(), history(), acts(ev(NOW + 50)), NOW, WATCH).silence_s == 0.0


def test_suspend_gap_then_stuck_once_watched_for_stall_after() -> None:
    """The watch window restarts after a gap; it turns stuck only once the
    watchdog has itself watched a whole stall_after of silence."""
    resumed = NOW - 290
    samples = [*history(600, now=resumed - 7200), *history(290)]
    a = acts(ev(resumed - 9000))
    assert classify(CFG, info(), samples, a, NOW, resumed).state is State.ACTIVE
    later = [*samples, *history(20, now=NOW + 20)[1:]]
    v = classify(CFG, info(), later, a, NOW + 20, resumed)
    assert (v.state, v.reason) == (State.STUCK, Reason.NO_ACTIVITY)
    assert v.silence_s == pytest.approx(310.0)


def test_old_tool_age_does_not_count_unwatched_time() -> None:
    """A tool call opened before a suspend: its silent allowance counts from
    when we resumed watching, like silence."""
    a = acts(ev(NOW - 5000, tool_call="open", tool="Bash", tool_id="b1"))
    samples = history(children=[sleep_child])
    assert classify(CFG, info(), samples, a, NOW, NOW - 400).state is State.LONG_RUNNING
    assert classify(CFG, info(), samples, a, NOW, WATCH).reason is Reason.TOOL_CALL_WITHOUT_PROGRESS


def test_stale_heartbeats_do_not_save_a_silent_session() -> None:
    a = acts(ev(NOW - 2000), hb(NOW - 400), hb(NOW - 350, "system/api_retry", retry=True))
    v = classify(CFG, info(), history(), a, NOW, WATCH)
    assert (v.state, v.reason) == (State.STUCK, Reason.NO_ACTIVITY)
    assert v.evidence["heartbeat_age_s"] == 350.0


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
    thr = CFG.cpu_idle_percent
    assert tree_progress_time([], thr) is None
    assert tree_progress_time(history(100), thr) is None
    assert tree_progress_time(history(100, at=lambda t: {"cpu": 1.0} if t == NOW - 40 else {}), thr) == NOW - 40
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


def test_cpu_threshold_is_inclusive() -> None:
    """At the threshold counts as busy: `cpu_idle_percent` is the bound of idleness."""
    at_thr = history(cpu=CFG.cpu_idle_percent)
    assert classify(CFG, info(), at_thr, SILENT, NOW, WATCH).reason is Reason.CPU_SPIN
    below = history(cpu=CFG.cpu_idle_percent - 0.01)
    assert classify(CFG, info(), below, SILENT, NOW, WATCH).state is State.STUCK


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
    # At the default 5 s interval a tick is 0.2%: anything at the 1% threshold is work.
    samples = history(600.0, interval=5.0, at=lambda t: {"cpu": 1.0} if abs(t - (NOW - 100)) < 1e-6 else {})
    assert classify(CFG, info(), samples, SILENT, NOW, WATCH).reason is Reason.CPU_SPIN
