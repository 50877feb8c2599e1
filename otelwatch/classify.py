"""The verdict: a pure classifier of one session, and the backoff of its reports.

Owns: turning (config, session info, recent tree samples, event activity, now)
into a `Verdict` (state + reason + evidence), the fingerprint and schedule that
back off repeated stalled/stuck reports, and the rule that decides whether a
collector tick came so late that the watchdog itself was not watching.

Must never: do I/O, read a clock, or import os, time, psutil or an exporter.
Time is always passed in as a number (wall-clock seconds). Every function here
is deterministic, so its tests need no sleeps.

The one rule above all others: `stuck` is the only state recovery may act on,
so a false `stuck` can kill a working session. Every doubt (unknown data, too
few samples, any sign of work, any heartbeat) resolves to something else.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from otelwatch.config import ClassifyConfig
from otelwatch.model import (
    CPU_TICK_SECONDS,
    Activity,
    Mode,
    Reason,
    SampleStatus,
    SessionInfo,
    State,
    TreeSample,
    Verdict,
)

__all__ = [
    "LATE_TICK_MIN_S",
    "MIN_WINDOW_SAMPLES",
    "REPORTED_STATES",
    "ReportSchedule",
    "classify",
    "fingerprint",
    "is_late_tick",
    "next_report",
    "tree_progress_time",
    "window_samples",
]

# A stuck verdict needs at least this many fully known samples in its window:
# one sample is a snapshot, not a history.
MIN_WINDOW_SAMPLES = 2

# Process states that mean "doing something": R is on (or queued for) a CPU,
# D is blocked inside the kernel (disk, NFS, FUSE). Neither is provable idleness.
_RUNNING = "R"
_BLOCKED = "D"
_STOPPED = frozenset({"T", "t"})  # job-control stop / tracing stop

# Only these states are reported (log line, counter, span event) and backed off.
REPORTED_STATES = frozenset({State.STALLED, State.STUCK})

# A tick later than this floor is always scheduling noise, never a suspend:
# see is_late_tick.
LATE_TICK_MIN_S = 10.0

# Keep evidence small: it goes into every report, span and /api/sessions entry.
_MAX_LISTED = 10


# --------------------------------------------------------------------------- classify


def classify(
    cfg: ClassifyConfig,
    info: SessionInfo,
    samples: Sequence[TreeSample],
    activity: Activity,
    now: float,
    watch_since: float,
) -> Verdict:
    """Classify one session at `now`.

    `samples` are this session's recent tree samples, oldest first, all of the
    same root identity; may be empty (not probed yet, or no pid known).
    `watch_since` is when the watchdog last started watching continuously
    (daemon start, or the end of a gap in its own ticking): time before it
    is never counted as the agent's silence, and samples before it are never
    used as evidence of idleness.
    """
    thr = cfg.cpu_idle_percent
    latest = samples[-1] if samples else None

    progress = activity.last_progress_time if info.has_event_source else tree_progress_time(
        samples, thr
    )
    # The clock of silence starts at the latest of: last progress, the start of
    # continuous watching (our own lag is not the agent's silence), and when we
    # first saw the session.
    silence = max(0.0, now - max(_or(progress), watch_since, info.started_at))
    start = max(now - cfg.stall_after, watch_since)
    window = window_samples(samples, start)
    # The last readable sample before the window lets a change at the window's
    # first sample (counters, child set) count: that change happened inside it.
    before = [s for s in samples if s.time < start and s.status is SampleStatus.OK][-1:]
    facts = _Facts.of(window, before, latest, thr)
    hb_age = None if activity.last_heartbeat_time is None else now - activity.last_heartbeat_time
    retry_age = None if activity.last_retry_time is None else now - activity.last_retry_time
    hb_fresh = hb_age is not None and hb_age < cfg.stall_after
    retry_fresh = retry_age is not None and retry_age < cfg.stall_after

    def verdict(state: State, reason: Reason, detail: str = "") -> Verdict:
        evidence = _evidence(silence, latest, window, facts, activity, now, hb_age, detail)
        return Verdict(state, reason, silence, evidence)

    # 1. A dead process is dead whatever its events say. The runtime (tmux pane,
    #    wrapper) outliving the agent is its own reason: the pane looks fine to a
    #    person glancing at it.
    if latest is not None and not latest.alive:
        if info.runtime_alive is True:
            return verdict(State.EXITED, Reason.RUNTIME_ALIVE_PROCESS_DEAD)
        return verdict(State.EXITED, Reason.PROCESS_EXITED)

    # 2. Too young to judge: agents spend their first seconds loading.
    if now - info.started_at < cfg.startup_grace:
        return verdict(State.STARTING, Reason.STARTUP_GRACE)

    # 3. Someone is waited on: never stalled, never stuck. A permission prompt
    #    counts in any mode; an interactive session with no turn open is waiting
    #    for its user (without an event source we never see a turn open, so such
    #    a session stays idle: we cannot tell, and idle is the harmless answer).
    if activity.awaiting_input:
        return verdict(State.IDLE, Reason.AWAITING_INPUT)
    # A root stopped by job control (Ctrl-Z, SIGSTOP) or a debugger (T/t) waits
    # for whoever stopped it to resume it: a person's decision, not a hang.
    if _stopped_root(latest):
        return verdict(State.IDLE, Reason.AWAITING_INPUT, "root process stopped (T)")
    if info.mode is Mode.INTERACTIVE and not activity.turn_open:
        return verdict(State.IDLE, Reason.NO_OPEN_TURN)

    # 4. Work moved recently (or we have not watched long enough to say otherwise).
    if silence < cfg.stall_after:
        return verdict(State.ACTIVE, Reason.RECENT_PROGRESS)

    # 5./6. Heartbeats: the agent's loop is alive, so never stuck. Retries come
    #    first, also with a tool open: a retry within stall_after is necessarily
    #    newer than the last progress (hence than any open tool call), so the
    #    agent (or a sub-agent inside that tool) is failing to reach its API,
    #    which is worth a report; calling it long_running would hide it.
    if retry_fresh:
        return verdict(State.STALLED, Reason.API_RETRYING)

    if activity.open_tools:
        # A tool reporting progress (tool_progress heartbeats) is a long run.
        if hb_fresh:
            return verdict(State.LONG_RUNNING, Reason.TOOL_RUNNING)
        # The tool may run silently for tool_stall_after while its tree lives.
        # Its age, like silence, does not count time we were not watching.
        oldest = min(t.since for t in activity.open_tools)
        tool_age = now - max(oldest, watch_since)
        if tool_age < cfg.tool_stall_after and facts.tree_alive:
            return verdict(State.LONG_RUNNING, Reason.TOOL_RUNNING)
        # An open tool call is never stuck: a hung tool deserves a person's look
        # (and a report), not an automatic kill of the agent around it.
        return verdict(State.STALLED, Reason.TOOL_CALL_WITHOUT_PROGRESS)

    if hb_fresh:
        # Some other heartbeat (tool progress, SSE ping, hook notification) with
        # no open call we know of: its loop lives, so treat it like a tool run.
        return verdict(State.LONG_RUNNING, Reason.TOOL_RUNNING)

    # 7. Unknown is never zero. The latest probe timing out means we do not know
    #    the present; an unreadable or timed-out sample anywhere in the window
    #    means we cannot prove idleness over it.
    if latest is not None and latest.status is SampleStatus.PROBE_TIMEOUT:
        return verdict(State.STALLED, Reason.PROBE_TIMEOUT)
    if facts.timeouts:
        return verdict(
            State.STALLED, Reason.PROBE_TIMEOUT, f"{facts.timeouts} probe timeouts in window"
        )
    if facts.unknown:
        return verdict(
            State.STALLED, Reason.ACCESS_DENIED, f"{facts.unknown} unreadable samples in window"
        )

    # 8. Signs of work the agent could still finish: none of these is stuck.
    #    Busy now or on average: spinning (also with TCP open: a busy process is
    #    not "sleeping on" its socket).
    if facts.cpu_latest_busy or facts.cpu_mean_busy:
        return verdict(State.STALLED, Reason.CPU_SPIN)
    if facts.tcp_seen:
        return verdict(State.STALLED, Reason.WAITING_ON_NETWORK)
    # A short burst of CPU in the window, or a process on a CPU (R) whose rate
    # stayed under the threshold: the tree is computing, just not much.
    if facts.cpu_blip or facts.running_pids:
        running = ",".join(map(str, facts.running_pids[:_MAX_LISTED]))
        return verdict(State.STALLED, Reason.CPU_SPIN, f"on CPU (R): {running}" if running else "")
    # A process blocked in the kernel (D), I/O counters moving, or processes
    # coming and going: something in the tree works outside the agent's event
    # stream, which is what a tool call without progress looks like. The
    # contract has no closer reason; the evidence names the processes.
    if facts.blocked_pids or facts.io_changed or facts.children_changed:
        return verdict(State.STALLED, Reason.TOOL_CALL_WITHOUT_PROGRESS, facts.work_detail())

    # Too little evidence to prove idleness (no pid known yet, history lost,
    # samples covering under half the window). The contract's reason for "we
    # could not read what we need" is access_denied; the detail says why.
    if not facts.enough(now, cfg.stall_after):
        return verdict(
            State.STALLED,
            Reason.ACCESS_DENIED,
            f"insufficient samples: {facts.known} known in window",
        )

    # 9. Processing, silent and heartbeat-free for stall_after, and every sample
    #    of the window proves zero TCP, CPU under the threshold, and no process
    #    working: the one recoverable state.
    return verdict(State.STUCK, Reason.NO_ACTIVITY)


def window_samples(samples: Sequence[TreeSample], start: float) -> tuple[TreeSample, ...]:
    """The samples at or after `start` (the later of now - stall_after and watch_since)."""
    return tuple(s for s in samples if s.time >= start)


def tree_progress_time(samples: Sequence[TreeSample], cpu_idle_percent: float) -> float | None:
    """For a session with no event source: when its tree last showed work.

    Work is CPU at/above the threshold, read/write byte counters changing, or
    the set of child processes changing. TCP alone is not work (a hung socket
    is exactly what we want to see as silence). Byte counters and child sets
    are compared only between consecutive fully readable (OK) samples: a partial
    read is not a change.
    """
    last: float | None = None
    prev_ok: TreeSample | None = None
    prev_children: frozenset[tuple[int, float]] = frozenset()
    for s in samples:
        worked = s.cpu_percent is not None and s.cpu_percent >= cpu_idle_percent
        if s.status is SampleStatus.OK:
            children = _child_ids(s)
            if prev_ok is not None and (_io_changed(prev_ok, s) or prev_children != children):
                worked = True
            prev_ok, prev_children = s, children
        if worked:
            last = s.time if last is None else max(last, s.time)
    return last


@dataclass(frozen=True)
class _Facts:
    """What the window of samples proves, computed once."""

    size: int
    known: int  # OK samples with known CPU rate and TCP
    earliest_known: float | None
    timeouts: int
    unknown: int  # ACCESS_DENIED samples, or OK samples with unknown CPU or TCP
    cpu_latest: float | None
    cpu_max: float | None
    cpu_latest_busy: bool
    cpu_mean_busy: bool
    cpu_blip: bool
    tcp_max: int | None
    tcp_seen: bool
    running_pids: tuple[int, ...]
    blocked_pids: tuple[int, ...]
    working_children: tuple[int, ...]
    io_changed: bool
    children_changed: bool
    tree_alive: bool  # for an open tool: children alive, CPU or TCP in the window

    @staticmethod
    def of(
        window: Sequence[TreeSample], before: Sequence[TreeSample], latest: TreeSample | None, thr: float
    ) -> _Facts:
        timeouts = sum(1 for s in window if s.status is SampleStatus.PROBE_TIMEOUT)
        readable = [s for s in window if s.status in (SampleStatus.OK, SampleStatus.ACCESS_DENIED)]
        unknown = sum(
            1
            for s in readable
            if s.status is SampleStatus.ACCESS_DENIED or s.cpu_percent is None or s.tcp is None
        )
        known = [
            s
            for s in readable
            if s.status is SampleStatus.OK and s.cpu_percent is not None and s.tcp is not None
        ]
        cpus = [s.cpu_percent for s in readable if s.cpu_percent is not None]
        tcps = [t for t in (s.tcp_total for s in readable) if t is not None]
        cpu_latest = latest.cpu_percent if latest is not None else None
        running: dict[int, None] = {}
        blocked: dict[int, None] = {}
        working_children: dict[int, None] = {}
        # One clock tick of CPU accounting in a short interval reads as a rate at or
        # above the threshold (10 ms in 0.5 s = 2%): a single sample counts as a
        # burst of work only when it holds more than one tick's worth.
        floors = _tick_floors(window, before)
        for s in readable:
            root_pid = s.root.pid if s.root is not None else None
            floor = floors.get(id(s), 0.0)
            for p in s.processes:
                is_root = p.pid == root_pid  # pids are unique within one sample
                busy = p.cpu_percent is not None and p.cpu_percent >= thr and p.cpu_percent > floor
                if p.status == _RUNNING or busy:
                    running[p.pid] = None
                if p.status == _BLOCKED:
                    blocked[p.pid] = None
                if (p.status in (_RUNNING, _BLOCKED) or busy) and not is_root:
                    working_children[p.pid] = None
        ok = [*before, *(s for s in window if s.status is SampleStatus.OK)]
        pairs = list(itertools.pairwise(ok))
        child_sets = [_child_ids(s) for s in ok]  # once per sample, not once per pair side
        cpu_busy_any = any(
            s.cpu_percent is not None and s.cpu_percent >= thr and s.cpu_percent > floors.get(id(s), 0.0)
            for s in readable
        )
        tcp_seen = any(t > 0 for t in tcps)
        children_now = latest is not None and latest.alive and latest.children > 0
        return _Facts(
            size=len(window),
            known=len(known),
            earliest_known=known[0].time if known else None,
            timeouts=timeouts,
            unknown=unknown,
            cpu_latest=cpu_latest,
            cpu_max=max(cpus) if cpus else None,
            cpu_latest_busy=cpu_latest is not None and cpu_latest >= thr,
            cpu_mean_busy=bool(cpus) and math.fsum(cpus) / len(cpus) >= thr,
            cpu_blip=cpu_busy_any,
            tcp_max=max(tcps) if tcps else None,
            tcp_seen=tcp_seen,
            running_pids=tuple(running),
            blocked_pids=tuple(blocked),
            working_children=tuple(working_children),
            io_changed=any(_io_changed(a, b) for a, b in pairs),
            children_changed=any(a != b for a, b in itertools.pairwise(child_sets)),
            tree_alive=children_now or cpu_busy_any or tcp_seen,
        )

    def enough(self, now: float, stall_after: float) -> bool:
        """Whether the known samples can prove idleness over the window: at least
        MIN_WINDOW_SAMPLES of them, the earliest covering at least half of it (a
        history that starts a tick ago proves nothing about the last five minutes)."""
        return (
            self.known >= MIN_WINDOW_SAMPLES
            and self.earliest_known is not None
            and self.earliest_known <= now - stall_after / 2.0
        )

    def work_detail(self) -> str:
        parts = []
        if self.blocked_pids:
            pids = ",".join(map(str, self.blocked_pids[:_MAX_LISTED]))
            parts.append(f"blocked in kernel (D): {pids}")
        if self.io_changed:
            parts.append("read/write bytes changed")
        if self.children_changed:
            parts.append("child processes changed")
        return "; ".join(parts)


def _tick_floors(window: Sequence[TreeSample], before: Sequence[TreeSample]) -> dict[int, float]:
    """Per sample (by id): the CPU percent that 1.5 clock ticks make over the interval
    since the previous sample. A rate at or under it may be one tick of accounting
    noise. The first sample with no predecessor gets no floor (counted as work: the
    safe side)."""
    floors: dict[int, float] = {}
    prev = before[-1] if before else None
    for s in window:
        if prev is not None and s.time > prev.time:
            floors[id(s)] = 150.0 * CPU_TICK_SECONDS / (s.time - prev.time)
        prev = s
    return floors


def _stopped_root(s: TreeSample | None) -> bool:
    if s is None or s.status is not SampleStatus.OK or not s.processes:
        return False
    root = s.processes[0]
    return root.identity == s.root and root.status in _STOPPED


def _or(t: float | None) -> float:
    return -math.inf if t is None else t


def _io_changed(a: TreeSample, b: TreeSample) -> bool:
    def moved(x: int | None, y: int | None) -> bool:
        return x is not None and y is not None and x != y

    return moved(a.read_bytes, b.read_bytes) or moved(a.write_bytes, b.write_bytes)


def _child_ids(s: TreeSample) -> frozenset[tuple[int, float]]:
    """(pid, create_time) of every process of the tree but the root. Plain tuples: this
    runs for every sample of every window, and building identities cost more than the rest."""
    root_pid = s.root.pid if s.root is not None else None
    return frozenset((p.pid, p.create_time) for p in s.processes if p.pid != root_pid)


def _r(x: float | None, digits: int = 2) -> float | None:
    if x is None or not math.isfinite(x):
        return None
    return round(x, digits)


def _evidence(
    silence: float,
    latest: TreeSample | None,
    window: Sequence[TreeSample],
    facts: _Facts,
    activity: Activity,
    now: float,
    hb_age: float | None,
    detail: str,
) -> dict[str, Any]:
    ev: dict[str, Any] = {
        "silence_s": _r(silence, 1),
        "cpu_percent": _r(facts.cpu_latest),
        "cpu_window_max": _r(facts.cpu_max),
        "tcp": None if latest is None or latest.tcp is None else dict(latest.tcp),
        "tcp_window_max": facts.tcp_max,
        "children": latest.children if latest is not None else 0,
        "working_children": list(facts.working_children[:_MAX_LISTED]),
        "open_tools": [
            {"tool": t.tool, "age_s": _r(now - t.since, 1)}
            for t in activity.open_tools[:_MAX_LISTED]
        ],
        "heartbeat_age_s": _r(hb_age, 1),
        "sample_status": latest.status.value if latest is not None else None,
        "samples_in_window": len(window),
    }
    if detail:
        ev["detail"] = detail
    return ev


# --------------------------------------------------------------------------- backoff


def fingerprint(verdict: Verdict, activity: Activity, sample: TreeSample | None) -> tuple[Any, ...]:
    """What must stay the same for a repeat report to be backed off:
    (state, reason, progress event count, child process identities).

    Progress events, not all events: an api_retrying session gets a heartbeat
    per retry, and counting those would reset the backoff on every retry line."""
    children = _child_ids(sample) if sample is not None else frozenset()
    return (verdict.state, verdict.reason, activity.progress_events, children)


@dataclass(frozen=True)
class ReportSchedule:
    """The backoff of one session's reports: `interval` is the gap before the
    next report, due at `next_due`; `reports` counts reports of this fingerprint."""

    fingerprint: tuple[Any, ...]
    next_due: float
    interval: float
    reports: int


def next_report(
    schedule: ReportSchedule | None,
    fp: tuple[Any, ...],
    state: State,
    now: float,
    cfg: ClassifyConfig,
) -> tuple[ReportSchedule | None, bool]:
    """The schedule after this tick, and whether to report now.

    Only stalled and stuck are reported: at first detection, then after
    repeat_base, 2x, 4x ... capped at repeat_max, while the fingerprint holds.
    A changed fingerprint reports at once and starts again from repeat_base;
    leaving stalled/stuck clears the schedule. Gaps count from the report
    actually made, so a late tick never causes a burst.
    """
    if state not in REPORTED_STATES:
        return None, False
    base = min(cfg.repeat_base, cfg.repeat_max)
    if schedule is None or schedule.fingerprint != fp:
        return ReportSchedule(fp, now + base, base, 1), True
    # A wall clock stepped back past the last report would otherwise silence
    # reports until it caught up; report and carry on from the new time.
    clock_stepped_back = now < schedule.next_due - schedule.interval
    if now < schedule.next_due and not clock_stepped_back:
        return schedule, False
    interval = min(max(schedule.interval * 2.0, base), cfg.repeat_max)
    return ReportSchedule(fp, now + interval, interval, schedule.reports + 1), True


# --------------------------------------------------------------------------- lag


def is_late_tick(expected: float, actual: float, interval: float) -> bool:
    """Whether a tick came so late that the watchdog was not watching (host
    suspended, daemon stopped, machine overloaded): the daemon then moves its
    `watch_since` to `actual` so the gap never counts as an agent's silence.

    Late means more than max(2 intervals, LATE_TICK_MIN_S) after `expected`.
    Two intervals absorb one slow tick (a probe may take probe_timeout); the
    10 s floor keeps a loaded CI box with a sub-second interval from restarting
    the windows all the time, and costs little: silence is judged in minutes.
    Pass wall-clock or CLOCK_BOOTTIME times: CLOCK_MONOTONIC (time.monotonic)
    stops during suspend on Linux and would hide exactly the gap to detect.
    """
    return actual - expected > max(2.0 * interval, LATE_TICK_MIN_S)
