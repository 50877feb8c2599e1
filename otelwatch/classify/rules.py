"""The verdict: a pure classifier of one session, and the backoff of its reports.

Owns: turning (config, session info, recent tree samples, event activity, now,
and the session's previous verdict) into a `Verdict` (state + reason +
evidence): the two CPU bars (`cpu_idle_percent` is the zero of the stuck gate,
`cpu_spin_percent` sustained over the window is a spin, between them is
neither), the stalled reason read from the whole window with hysteresis, and
liveness while an announced API retry is not overdue. Also the fingerprint and
schedule that back off repeated stalled/stuck reports, and the rule that
decides whether a collector tick came so late that the watchdog itself was
not watching.

Must never: do I/O, read a clock, or import os, time, psutil or an exporter.
Time is always passed in as a number (wall-clock seconds). Every function here
is deterministic, so its tests need no sleeps.

The one rule above all others: `stuck` is the only state recovery may act on,
so a false `stuck` can kill a working session. Every doubt (unknown data, too
few samples, any sign of work, any heartbeat) resolves to something else.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from otelwatch.classify.tooltree import tool_processes
from otelwatch.config import ClassifyConfig
from otelwatch.model import (
    CPU_TICK_SECONDS,
    PROBLEM_STATES,
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
    "MAX_ATTEMPT_S",
    "MIN_WINDOW_SAMPLES",
    "WORK_CPU_PERCENT",
    "ReportSchedule",
    "SampleWindow",
    "classify",
    "fingerprint",
    "is_late_tick",
    "next_report",
    "retry_holds",
    "retry_phrase",
    "tree_progress_time",
    "window_samples",
    "work_cpu_percent",
]

# A stuck verdict needs at least this many fully known samples in its window:
# one sample is a snapshot, not a history.
MIN_WINDOW_SAMPLES = 2

# Process states that mean "doing something": R is on (or queued for) a CPU,
# D is blocked inside the kernel (disk, NFS, FUSE). Neither is provable idleness.
_RUNNING = "R"
_BLOCKED = "D"
_STOPPED = frozenset({"T", "t"})  # job-control stop / tracing stop

# A tick later than this floor is always scheduling noise, never a suspend:
# see is_late_tick.
LATE_TICK_MIN_S = 10.0

# Keep evidence small: it goes into every report, span and /api/sessions entry.
_MAX_LISTED = 10


# --------------------------------------------------------------------------- classify


# Work, for a session with no event source (its progress clock is its tree's activity):
# CPU at or above this percent of one core. Measured idle noise of healthy waiting CLIs
# is 0-3% in single samples (timers, GC) and 2-4% for an interactive TUI's spinner; a
# model response being parsed or a build runs at 80-110%. 5% is clearly above the
# noise and far below any real work. Never under cpu_idle_percent, never over the spin bar.
WORK_CPU_PERCENT = 5.0

# An API attempt is expected to last as long as the attempt before it took to fail
# (the CLIs abort attempts on fixed timers: 360 s for a silent API and 300 s for an
# idle byte stream in Claude Code, ~1 ms for a refused connection), but never longer
# than this: Claude Code's request timeout is 600 s, Codex's stream idle timeout 300 s.
MAX_ATTEMPT_S = 600.0

# Reasons read from the window of samples, in the order they win when several hold over
# the window: a busy process is spinning even with a socket open; what we could read
# says more than what we could not.
_WINDOW_REASONS = (
    Reason.CPU_SPIN,
    Reason.WAITING_ON_NETWORK,
    Reason.TOOL_CALL_WITHOUT_PROGRESS,
    Reason.PROBE_TIMEOUT,
    Reason.ACCESS_DENIED,
)


def classify(
    cfg: ClassifyConfig,
    info: SessionInfo,
    samples: Sequence[TreeSample],
    activity: Activity,
    now: float,
    watch_since: float,
    previous: Verdict | None = None,
    window: SampleWindow | None = None,
) -> Verdict:
    """Classify one session at `now`.

    `samples` are this session's recent tree samples, oldest first, all of the
    same root identity; may be empty (not probed yet, or no pid known). The first
    of them is taken as the first sight of the process (a CPU rate of None there is
    no rate yet, not unreadable data): pass the whole history the caller keeps.
    `watch_since` is when the watchdog last started watching continuously
    (daemon start, or the end of a gap in its own ticking): samples before it
    are never used as evidence of idleness (the window restarts), but silence
    still counts from the last progress (a restart or a pause forgets nothing).
    `previous` is this session's verdict of the tick before: a stalled reason is kept while its evidence is still in the
    window and no stronger reason holds over it (hysteresis); it never delays
    a change of state. `window` is this session's `SampleWindow`, when the caller
    keeps one: the same verdict at a per-tick cost of what changed since the last
    tick (it is brought up to date with `samples` here).
    """
    thr = cfg.cpu_idle_percent
    spin = max(cfg.cpu_spin_percent, thr)
    latest = samples[-1] if samples else None

    if window is not None:
        window.sync(samples, thr, spin, work_cpu_percent(cfg))
        if not window.usable:
            window = None
    if info.has_event_source:
        progress = activity.last_progress_time
        if info.infer_tools and info.mode is Mode.HEADLESS and info.before_first_turn and not activity.turn_open:
            # A headless run's records speak of its turn; before its prompt (startup: aider
            # fetching model metadata, Gemini CLI relaunching) its process tree's work counts too.
            tree = window.progress_time() if window is not None else \
                tree_progress_time(samples, work_cpu_percent(cfg))
            if tree is not None and (progress is None or tree > progress):
                progress = tree
    else:
        tree = window.progress_time() if window is not None else tree_progress_time(samples, work_cpu_percent(cfg))
        # A progress time carried over a daemon restart (the state file) counts too.
        progress = tree if activity.last_progress_time is None else max(_or(tree), activity.last_progress_time)
    # The clock of silence starts at the later of the last progress and the session's
    # start (its process's start when known). A gap in our own watching (a restart, a
    # late tick) does not reset it: it restarts the window of samples (below), which is
    # what a stuck verdict and recovery need, and a silent agent stays silent.
    silence = max(0.0, now - max(_or(progress), info.started_at))
    start = max(now - cfg.stall_after, watch_since)
    if window is not None:
        facts = window.facts(start, latest)
    else:
        # The last readable sample before the window lets a change at the window's
        # first sample (counters, child set) count: that change happened inside it.
        before = _last_ok_before(samples, start)
        first_sight = samples[0] if samples and samples[0].cpu_percent is None else None
        facts = _Facts.of(window_samples(samples, start), before, latest, thr, spin, first_sight)
    hb_age = None if activity.last_heartbeat_time is None else now - activity.last_heartbeat_time
    hb_fresh = hb_age is not None and hb_age < cfg.stall_after
    retry_live = retry_holds(activity, now, cfg.stall_after)

    def verdict(state: State, reason: Reason, detail: str = "") -> Verdict:
        evidence = _evidence(silence, latest, facts, activity, now, hb_age, detail)
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
        if info.turns_visible:
            return verdict(State.IDLE, Reason.NO_OPEN_TURN)
        # Blind is not idle: its turn could not be read, and its process alone proves
        # neither idleness nor progress (measured on Claude Code's TUI: at its input box
        # and on a turn the API never answers alike, it draws at 2-10% CPU, so CPU is no
        # progress; a socket may be a keep-alive). Unknown, said as such.
        return verdict(State.STALLED, Reason.ACCESS_DENIED, _blind_detail(facts))

    # 4. Work moved recently (or we have not watched long enough to say otherwise).
    if silence < cfg.stall_after:
        return verdict(State.ACTIVE, Reason.RECENT_PROGRESS)

    held = previous.reason if previous is not None and previous.state is State.STALLED else None

    # 5./6. Heartbeats: the agent's loop is alive, so never stuck. Retries come
    #    first, also with a tool open: a retry whose attempt is not overdue is
    #    newer than the last progress (progress settles a retry), so the agent (or
    #    a sub-agent inside that tool) is failing to reach its API, which is worth
    #    a report; calling it long_running would hide it. An attempt sitting on an
    #    open connection (a socket over most of the window; once so, until the
    #    window has none) is waiting on the network, retry or not: the API that
    #    never answers keeps that one reason across its aborted attempts.
    if retry_live:
        if facts.holds(Reason.WAITING_ON_NETWORK) or (
            held is Reason.WAITING_ON_NETWORK and facts.support[Reason.WAITING_ON_NETWORK] > 0
        ):
            return verdict(State.STALLED, Reason.WAITING_ON_NETWORK, facts.detail(Reason.WAITING_ON_NETWORK))
        return verdict(State.STALLED, Reason.API_RETRYING, retry_phrase(activity, now))

    # Calls still open, and tool runs the agent moved to the background (they outlive
    # their turn: a headless Claude Code ends its turn and waits for them).
    tools = (*activity.open_tools, *activity.background_tasks)
    if tools:
        # A tool reporting progress (tool_progress heartbeats) is a long run.
        if hb_fresh:
            return verdict(State.LONG_RUNNING, Reason.TOOL_RUNNING)
        # The tool may run silently for tool_stall_after while its tree lives.
        # Its age, like silence, does not count time we were not watching.
        oldest = min(t.since for t in tools)
        tool_age = now - max(oldest, watch_since)
        if tool_age < cfg.tool_stall_after and (facts.tree_alive or _unread_children(latest, samples)):
            return verdict(State.LONG_RUNNING, Reason.TOOL_RUNNING)
        # An open tool call is never stuck: a hung tool deserves a person's look
        # (and a report), not an automatic kill of the agent around it.
        return verdict(State.STALLED, Reason.TOOL_CALL_WITHOUT_PROGRESS)

    # A tool the agent's records do not show until it ends (Gemini CLI, aider's /run,
    # Claude Code's background work): a child started inside the turn, alive (tooltree.py).
    running = tool_processes(_last_readable(samples), activity.turn_opened_at if activity.turn_open else None) \
        if info.infer_tools else ()
    if running:
        first = running[0]
        tool_age = now - max(first.create_time, watch_since)
        what = f"{first.name} (pid {first.pid}) started in the turn, alive {round(now - first.create_time)} s"
        if tool_age < cfg.tool_stall_after:
            return verdict(State.LONG_RUNNING, Reason.TOOL_RUNNING, what)
        return verdict(State.STALLED, Reason.TOOL_CALL_WITHOUT_PROGRESS, what)

    if hb_fresh:
        # Some other heartbeat (tool progress, SSE ping, hook notification) with
        # no open call we know of: its loop lives, so treat it like a tool run.
        return verdict(State.LONG_RUNNING, Reason.TOOL_RUNNING)

    # 7. What the window of samples shows. Anything but proven idleness is stalled:
    #    unknown is never zero (an unreadable or timed-out sample), and neither is
    #    any CPU at or above cpu_idle_percent, a socket, or a process working.
    reason = facts.reason(held)
    if reason is Reason.TOOL_CALL_WITHOUT_PROGRESS and _tui_spinner_on_network(info, facts):
        # A TUI's spinner (Gemini CLI and opencode spin at 17-30% waiting on a turn) is not
        # work: with nothing else moving, the waiting turn is judged by its sockets.
        reason = Reason.WAITING_ON_NETWORK
    if reason is not None:
        return verdict(State.STALLED, reason, facts.detail(reason))
    # Turn information we could not read (heartbeats, a turn, a prompt): nothing proves
    # idleness, so never stuck and never idle.
    if not info.turns_visible:
        return verdict(State.STALLED, Reason.ACCESS_DENIED, "turn information could not be read")

    # Too little evidence to prove idleness (no pid known yet, history lost, the
    # first sight of the process still in the window, samples covering under half
    # the window): nothing says it works, but nothing proves it does not.
    # Nor before the watchdog itself has watched a whole stall_after since its last gap
    # (a restart, a late tick): the silence is real, the proof of idleness is not yet.
    if not facts.enough(now, cfg.stall_after) or now - watch_since < cfg.stall_after:
        return verdict(
            State.STALLED,
            Reason.INSUFFICIENT_SAMPLES,
            facts.missing(now, cfg.stall_after),
        )

    # 8. Processing, silent and heartbeat-free for stall_after, and every sample
    #    of the window proves zero TCP, CPU under the threshold, and no process
    #    working: the one recoverable state.
    return verdict(State.STUCK, Reason.NO_ACTIVITY)


def _blind_detail(facts: _Facts) -> str:
    tcp = "TCP unreadable" if facts.tcp_max is None else f"up to {facts.tcp_max} TCP connections"
    cpu = "" if facts.cpu_mean is None else f", CPU mean {_r(facts.cpu_mean, 1)}%"
    return f"turn information could not be read; its processes show {tcp}{cpu}"


def _last_readable(samples: Sequence[TreeSample]) -> TreeSample | None:
    """The latest sample whose processes were read: a probe timeout or an unreadable tick
    does not make a running tool disappear (a vanished root ends the session before this)."""
    for s in reversed(samples[-_READABLE_LOOKBACK:]):
        if s.status is SampleStatus.OK:
            return s
        if not s.alive:
            return None
    return None


_READABLE_LOOKBACK = 64


def _unread_children(latest: TreeSample | None, samples: Sequence[TreeSample]) -> bool:
    """The latest sample could not be read, and the last one that could had children:
    an unreadable tick says nothing about the tool's processes, so they still count."""
    if latest is None or latest.status is SampleStatus.OK:
        return False
    readable = _last_readable(samples)
    return readable is not None and readable.children > 0


def _tui_spinner_on_network(info: SessionInfo, facts: _Facts) -> bool:
    """An interactive session whose only sign of work in the window is its own CPU (no
    working child, nothing blocked, no I/O, no child coming or going), with TCP open in
    some of it: a spinner over an API call that is being retried."""
    return (info.mode is Mode.INTERACTIVE and facts.support[Reason.WAITING_ON_NETWORK] > 0
            and not facts.working_children and not facts.blocked_pids and not facts.io_changed
            and not facts.children_changed)


def work_cpu_percent(cfg: ClassifyConfig) -> float:
    """The CPU percent that counts as work on the no-event-source progress clock."""
    return min(max(WORK_CPU_PERCENT, cfg.cpu_idle_percent), max(cfg.cpu_spin_percent, cfg.cpu_idle_percent))


def retry_holds(activity: Activity, now: float, stall_after: float) -> bool:
    """Whether the last announced API retry still explains the silence at `now`.

    The agent said when its next attempt starts (`retry_due`); that attempt may take
    as long as the one before it took to fail (capped at MAX_ATTEMPT_S); after it
    should have ended, the agent gets stall_after to say something, like after any
    heartbeat (which also absorbs a tick of delay in seeing the line). A retry with
    no schedule holds for stall_after, like any heartbeat. Progress after the retry
    settles it (the fold clears `retry_due`).
    """
    t = activity.last_retry_time
    if t is None:
        return False
    due = t if activity.retry_due is None else max(t, activity.retry_due)
    attempt = min(activity.retry_attempt_s or 0.0, MAX_ATTEMPT_S)
    return now < due + attempt + stall_after


def retry_phrase(activity: Activity, now: float) -> str:
    """ "attempt 6/10, next in 18 s" (before the announced attempt starts) or
    "attempt 6/10 started 40 s ago" (after): the retry schedule as a person reads it."""
    if activity.retry_attempt is None and activity.retry_due is None:
        return ""
    what = "attempt" if activity.retry_attempt is None else f"attempt {activity.retry_attempt}"
    if activity.retry_attempt is not None and activity.retry_max is not None:
        what += f"/{activity.retry_max}"
    if activity.retry_due is None:
        return what
    left = activity.retry_due - now
    if left > 0:
        when = f"in {round(left)} s" if left >= 1 else "in <1 s"
        return f"{what}, next {when}" if activity.retry_attempt is not None else f"next attempt {when}"
    return f"{what} started {round(-left)} s ago"


def window_samples(samples: Sequence[TreeSample], start: float) -> tuple[TreeSample, ...]:
    """The samples at or after `start` (the later of now - stall_after and watch_since)."""
    return tuple(s for s in samples if s.time >= start)


def tree_progress_time(samples: Sequence[TreeSample], work_percent: float) -> float | None:
    """For a session with no event source: when its tree last showed work.

    Work is CPU at/above `work_percent` (see WORK_CPU_PERCENT: idle noise of a
    waiting CLI is not work) and more than one clock tick's worth, read/write
    byte counters changing, or the set of child processes changing. TCP alone is
    not work (a hung socket is exactly what we want to see as silence). Byte
    counters and child sets are compared only between consecutive fully readable
    (OK) samples: a partial read is not a change.
    """
    last: float | None = None
    prev_ok: TreeSample | None = None
    prev_children: frozenset[tuple[int, float]] = frozenset()
    prev_time: float | None = None
    for s in samples:
        floor = _tick_floor(prev_time, s.time)
        worked = s.cpu_percent is not None and s.cpu_percent >= work_percent and s.cpu_percent > floor
        if s.status is SampleStatus.OK:
            children = _child_ids(s)
            if prev_ok is not None and (_io_changed(prev_ok, s) or prev_children != children):
                worked = True
            prev_ok, prev_children = s, children
        if worked:
            last = s.time if last is None else max(last, s.time)
        prev_time = s.time
    return last


def _last_ok_before(samples: Sequence[TreeSample], start: float) -> list[TreeSample]:
    for s in reversed(samples):
        if s.time < start and s.status is SampleStatus.OK:
            return [s]
    return []


@dataclass(frozen=True)
class _Facts:
    """What the window of samples proves, computed once in one pass over it.

    `support` counts, per window reason, the samples of the window that show its
    evidence: a probe timeout, unreadable data, CPU at the spin bar, an open socket,
    work (any CPU at or above cpu_idle_percent, a process on a CPU or blocked in
    the kernel, I/O moving, children coming or going). A reason holds over the
    window when most of its samples support it (spinning also needs the window's
    mean CPU at the bar): one sample never does, in a window of three or more.
    """

    size: int
    known: int  # OK samples with known CPU rate and TCP
    earliest_known: float | None
    first_sight_in_window: bool
    support: Mapping[Reason, int]
    spin_mean: bool  # the window's mean CPU demand is at or above the spin bar
    cpu_latest: float | None
    cpu_max: float | None
    cpu_mean: float | None
    tcp_max: int | None
    running_pids: tuple[int, ...]
    blocked_pids: tuple[int, ...]
    working_children: tuple[int, ...]
    io_changed: bool
    children_changed: bool
    tree_alive: bool  # for an open tool: children alive, CPU or TCP in the window
    demand_mean: float | None = None  # the window's mean CPU demand (usage where unknown)

    @staticmethod
    def of(
        window: Sequence[TreeSample],
        before: Sequence[TreeSample],
        latest: TreeSample | None,
        thr: float,
        spin: float,
        first_sight: TreeSample | None,
    ) -> _Facts:
        # One clock tick of CPU accounting in a short interval reads as a rate at or
        # above the threshold (10 ms in 0.5 s = 2%): a single sample counts as CPU
        # work only when it holds more than one tick's worth, unless the window's
        # mean says the process keeps using that little all the time.
        cpus = [s.cpu_percent for s in window if s.cpu_percent is not None]
        cpu_mean = math.fsum(cpus) / len(cpus) if cpus else None
        demands = [d for s in window if (d := _demand(s)) is not None]
        demand_mean = math.fsum(demands) / len(demands) if demands else None
        mean_busy = cpu_mean is not None and cpu_mean >= thr
        timeouts = denied = spins = nets = works = known = 0
        earliest_known: float | None = None
        tcp_max: int | None = None
        running: dict[int, None] = {}
        blocked: dict[int, None] = {}
        working_children: dict[int, None] = {}
        io_changed = children_changed = cpu_busy_any = False
        prev_ok = before[-1] if before else None
        prev_children = _child_ids(prev_ok) if prev_ok is not None else frozenset()
        prev_time = prev_ok.time if prev_ok is not None else None
        for s in window:
            floor = _tick_floor(prev_time, s.time)
            prev_time = s.time
            if s.status is SampleStatus.PROBE_TIMEOUT:
                timeouts += 1
                continue
            if s.status not in (SampleStatus.OK, SampleStatus.ACCESS_DENIED):
                continue  # vanished / zombie: only ever the latest, handled before the window
            cpu = s.cpu_percent
            # The first sight of a process has no CPU rate yet: not unreadable, just not
            # evidence (it never counts as known, so it can never prove idleness).
            no_rate_yet = cpu is None and s is first_sight
            if s.status is SampleStatus.ACCESS_DENIED or s.tcp is None or (cpu is None and not no_rate_yet):
                denied += 1
            elif cpu is not None:
                known += 1
                if earliest_known is None:
                    earliest_known = s.time
            busy_cpu = cpu is not None and cpu >= thr and (cpu > floor or mean_busy)
            worked = busy_cpu
            cpu_busy_any = cpu_busy_any or busy_cpu
            demand = _demand(s)
            if demand is not None and demand >= spin and demand > floor:
                spins += 1
            tcp = s.tcp_total
            if tcp is not None:
                tcp_max = tcp if tcp_max is None else max(tcp_max, tcp)
                if tcp > 0:
                    nets += 1
            root_pid = s.root.pid if s.root is not None else None
            for p in s.processes:
                busy = p.cpu_percent is not None and p.cpu_percent >= thr and p.cpu_percent > floor
                if p.status == _RUNNING or busy:
                    running[p.pid] = None
                    worked = True
                if p.status == _BLOCKED:
                    blocked[p.pid] = None
                    worked = True
                if (p.status in (_RUNNING, _BLOCKED) or busy) and p.pid != root_pid:
                    working_children[p.pid] = None
            if s.status is SampleStatus.OK:
                children = _child_ids(s)
                if prev_ok is not None:
                    if _io_changed(prev_ok, s):
                        io_changed = worked = True
                    if children != prev_children:
                        children_changed = worked = True
                prev_ok, prev_children = s, children
            if worked:
                works += 1
        tcp_seen = nets > 0
        children_now = latest is not None and latest.alive and latest.children > 0
        return _Facts(
            size=len(window),
            known=known,
            earliest_known=earliest_known,
            first_sight_in_window=first_sight is not None and any(s is first_sight for s in window),
            support={
                Reason.CPU_SPIN: spins,
                Reason.WAITING_ON_NETWORK: nets,
                Reason.TOOL_CALL_WITHOUT_PROGRESS: works,
                Reason.PROBE_TIMEOUT: timeouts,
                Reason.ACCESS_DENIED: denied,
            },
            spin_mean=demand_mean is not None and demand_mean >= spin,
            cpu_latest=latest.cpu_percent if latest is not None else None,
            cpu_max=max(cpus) if cpus else None,
            cpu_mean=cpu_mean,
            demand_mean=demand_mean,
            tcp_max=tcp_max,
            running_pids=tuple(running),
            blocked_pids=tuple(blocked),
            working_children=tuple(working_children),
            io_changed=io_changed,
            children_changed=children_changed,
            tree_alive=children_now or cpu_busy_any or tcp_seen,
        )

    def holds(self, reason: Reason) -> bool:
        """Whether `reason`'s evidence holds over the window: most of its samples."""
        if reason is Reason.CPU_SPIN and not self.spin_mean:
            return False
        return 2 * self.support[reason] > self.size

    def reason(self, held: Reason | None) -> Reason | None:
        """The stalled reason the window shows; None when it shows nothing but idleness.

        With hysteresis: the reason `held` (the session's stalled reason at the tick
        before) stays while any of its evidence is in the window, unless a reason
        ahead of it holds over the window. So a reason changes only when the new
        evidence holds over the window or the old evidence has left it entirely,
        never on one sample. Without a held reason: the first reason that holds
        over the window, else the one with the most evidence (spinning only ever
        when it holds: one busy sample is not a loop).
        """
        if held is not None and self.support.get(held, 0) == 0:
            held = None
        for r in _WINDOW_REASONS:
            if r is held or self.holds(r):
                return r
        weak = [r for r in _WINDOW_REASONS if r is not Reason.CPU_SPIN]
        best = max(weak, key=lambda r: self.support[r])  # the first of equals wins
        return best if self.support[best] > 0 else None

    def enough(self, now: float, stall_after: float) -> bool:
        """Whether the known samples can prove idleness over the window: at least
        MIN_WINDOW_SAMPLES of them, the earliest covering at least half of it (a
        history that starts a tick ago proves nothing about the last five minutes),
        and no first sight of the process in it (whose CPU before it is unknown)."""
        return (
            self.known >= MIN_WINDOW_SAMPLES
            and self.earliest_known is not None
            and self.earliest_known <= now - stall_after / 2.0
            and not self.first_sight_in_window
        )

    def missing(self, now: float, stall_after: float) -> str:
        """What `enough` lacks, for a person: how many known samples cover how much of
        the window, against what proving idleness needs."""
        need = f"need at least {MIN_WINDOW_SAMPLES} covering {_secs(stall_after / 2.0)}"
        if self.known == 0 or self.earliest_known is None:
            text = f"no known samples in the {_secs(stall_after)} window: {need}"
        else:
            covered = max(0.0, now - self.earliest_known)
            text = (f"{self.known} known sample{'s' if self.known != 1 else ''} cover {_secs(covered)} "
                    f"of the {_secs(stall_after)} window: {need}")
        if self.first_sight_in_window:
            text += "; the process was first seen inside the window (its CPU before that is unknown)"
        return text

    def detail(self, reason: Reason) -> str:
        """What a person reads next to the reason: the evidence behind it."""
        n = self.support[reason]
        if reason is Reason.PROBE_TIMEOUT:
            return f"{n} probe timeouts in window"
        if reason is Reason.ACCESS_DENIED:
            return f"{n} unreadable samples in window"
        if reason is Reason.CPU_SPIN:
            if self.demand_mean is not None and self.demand_mean != self.cpu_mean:
                return (f"CPU demand (on a CPU or waiting for one) at the spin bar in {n} of {self.size} "
                        f"samples, window mean {_r(self.demand_mean, 1)}% (got {_r(self.cpu_mean, 1)}%)")
            return f"CPU at the spin bar in {n} of {self.size} samples, window mean {_r(self.cpu_mean, 1)}%"
        if reason is Reason.WAITING_ON_NETWORK:
            return f"TCP open in {n} of {self.size} samples"
        parts = []
        if self.blocked_pids:
            parts.append(f"blocked in kernel (D): {_pids(self.blocked_pids)}")
        if self.working_children:
            parts.append(f"working children: {_pids(self.working_children)}")
        elif self.running_pids:
            parts.append(f"on CPU (R): {_pids(self.running_pids)}")
        if self.io_changed:
            parts.append("read/write bytes changed")
        if self.children_changed:
            parts.append("child processes changed")
        if self.cpu_max is not None and not self.working_children:
            # The agent's own process is awake but not spinning: timers, GC, or a tool
            # it runs in-process. Work outside its event stream, like a silent tool call.
            parts.append(f"CPU up to {_r(self.cpu_max, 1)}%, window mean {_r(self.cpu_mean, 1)}% (not spinning)")
        return "; ".join(parts)


def _secs(x: float) -> str:
    return f"{round(x, 1):g} s"


def _demand(s: TreeSample) -> float | None:
    """What the spin rule reads: the tree's CPU demand (on a CPU or runnable on a run
    queue), so a loop starved by other work still reads as one; its usage where the
    demand is not known."""
    d = s.cpu_demand_percent
    return s.cpu_percent if d is None else d


def _pids(pids: Sequence[int]) -> str:
    return ",".join(map(str, pids[:_MAX_LISTED]))


def _tick_floor(prev_time: float | None, t: float) -> float:
    """The CPU percent that 1.5 clock ticks make over the interval since the previous
    sample. A rate at or under it may be one tick of accounting noise. A sample with no
    predecessor gets no floor (counted as work: the safe side)."""
    if prev_time is None or t <= prev_time:
        return 0.0
    return 150.0 * CPU_TICK_SECONDS / (t - prev_time)


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
        "cpu_window_mean": _r(facts.cpu_mean),
        "cpu_demand_window_mean": _r(facts.demand_mean),
        "tcp": None if latest is None or latest.tcp is None else dict(latest.tcp),
        "tcp_window_max": facts.tcp_max,
        "children": latest.children if latest is not None else 0,
        "working_children": list(facts.working_children[:_MAX_LISTED]),
        "open_tools": [
            {"tool": t.tool, "age_s": _r(now - t.since, 1)}
            for t in (*activity.open_tools, *activity.background_tasks)[:_MAX_LISTED]
        ],
        "heartbeat_age_s": _r(hb_age, 1),
        "sample_status": latest.status.value if latest is not None else None,
        "samples_in_window": facts.size,
    }
    if activity.retry_due is not None or activity.retry_attempt is not None:
        ev["retry"] = {
            "attempt": activity.retry_attempt,
            "max_retries": activity.retry_max,
            "next_in_s": None if activity.retry_due is None else _r(activity.retry_due - now, 1),
            "text": retry_phrase(activity, now),
        }
    if detail:
        ev["detail"] = detail
    return ev


# --------------------------------------------------------------------------- incremental window


# Every finite double is an integer multiple of 2**-1074: CPU rates summed as integers
# in that unit are exact, so the running mean is the same float as math.fsum's.
_EXACT_SHIFT = 1074
_EXACT_UNIT = 1 << _EXACT_SHIFT


def _exact(x: float) -> int:
    n, d = x.as_integer_ratio()
    return n << (_EXACT_SHIFT - d.bit_length() + 1)


class _Mark:
    """What one sample adds to `_Facts`, given the sample before it (its tick floor)
    and the readable sample before it (I/O and child-set changes)."""

    __slots__ = ("blocked", "busy", "busy_mean", "children", "denied", "io", "net", "running", "spin",
                 "timeout", "work", "work_mean", "working")

    def __init__(self) -> None:
        self.timeout = self.denied = self.spin = self.net = 0
        self.busy = self.busy_mean = self.work = self.work_mean = self.io = self.children = 0
        # (pid, position in the sample): the window lists pids in order of first sight
        self.running: tuple[tuple[int, int], ...] = ()
        self.blocked: tuple[tuple[int, int], ...] = ()
        self.working: tuple[tuple[int, int], ...] = ()


_COUNTS = ("timeout", "denied", "spin", "net", "busy", "busy_mean", "work", "work_mean", "io", "children")
_NO_MARK = _Mark()


def _same_mark(a: _Mark, b: _Mark) -> bool:
    # Spelled out: a generator over __slots__ cost more than the rest of _push.
    return (a.timeout == b.timeout and a.denied == b.denied and a.spin == b.spin and a.net == b.net
            and a.busy == b.busy and a.busy_mean == b.busy_mean and a.work == b.work
            and a.work_mean == b.work_mean and a.io == b.io and a.children == b.children
            and a.running == b.running and a.blocked == b.blocked and a.working == b.working)


def _mark(
    s: TreeSample,
    prev_time: float | None,
    prev_ok: TreeSample | None,
    prev_children: frozenset[tuple[int, float]],
    children: frozenset[tuple[int, float]] | None,
    first_sight: bool,
    thr: float,
    spin: float,
) -> _Mark:
    """One sample's share of `_Facts.of`, the same rules sample by sample. "_mean"
    variants hold when the window's mean CPU is at the threshold (known only later)."""
    m = _Mark()
    if s.status is SampleStatus.PROBE_TIMEOUT:
        m.timeout = 1
        return m
    if s.status not in (SampleStatus.OK, SampleStatus.ACCESS_DENIED):
        return m
    floor = _tick_floor(prev_time, s.time)
    cpu = s.cpu_percent
    no_rate_yet = cpu is None and first_sight
    if s.status is SampleStatus.ACCESS_DENIED or s.tcp is None or (cpu is None and not no_rate_yet):
        m.denied = 1
    over = cpu is not None and cpu >= thr
    m.busy_mean = int(over)
    m.busy = int(over and cpu is not None and cpu > floor)
    demand = _demand(s)
    if demand is not None and demand >= spin and demand > floor:
        m.spin = 1
    tcp = s.tcp_total
    if tcp is not None and tcp > 0:
        m.net = 1
    worked = False
    root_pid = s.root.pid if s.root is not None else None
    running: list[tuple[int, int]] = []
    blocked: list[tuple[int, int]] = []
    working: list[tuple[int, int]] = []
    for i, p in enumerate(s.processes):
        busy = p.cpu_percent is not None and p.cpu_percent >= thr and p.cpu_percent > floor
        if p.status == _RUNNING or busy:
            running.append((p.pid, i))
            worked = True
        if p.status == _BLOCKED:
            blocked.append((p.pid, i))
            worked = True
        if (p.status in (_RUNNING, _BLOCKED) or busy) and p.pid != root_pid:
            working.append((p.pid, i))
    m.running, m.blocked, m.working = tuple(running), tuple(blocked), tuple(working)
    if s.status is SampleStatus.OK and prev_ok is not None:
        if _io_changed(prev_ok, s):
            m.io = 1
            worked = True
        if children != prev_children:
            m.children = 1
            worked = True
    m.work = int(worked or bool(m.busy))
    m.work_mean = int(worked or bool(m.busy_mean))
    return m


def _progress_mark(
    s: TreeSample,
    prev_time: float | None,
    prev_ok: TreeSample | None,
    prev_children: frozenset[tuple[int, float]],
    children: frozenset[tuple[int, float]] | None,
    work_percent: float,
) -> bool:
    """One sample's share of `tree_progress_time`: whether it shows work."""
    floor = _tick_floor(prev_time, s.time)
    cpu = s.cpu_percent
    if cpu is not None and cpu >= work_percent and cpu > floor:
        return True
    return s.status is SampleStatus.OK and prev_ok is not None and (
        _io_changed(prev_ok, s) or prev_children != children
    )


class _Rec:
    __slots__ = ("children", "inverted", "mark", "odd", "progress", "sample", "seq", "time")

    def __init__(self, seq: int, sample: TreeSample, children: frozenset[tuple[int, float]] | None,
                 mark: _Mark, progress: bool, inverted: bool, odd: bool) -> None:
        self.seq, self.sample, self.time, self.children = seq, sample, sample.time, children
        self.mark, self.progress, self.inverted, self.odd = mark, progress, inverted, odd


_NO_CHILDREN: frozenset[tuple[int, float]] = frozenset()


class SampleWindow:
    """One session's window aggregates, kept up to date one sample at a time.

    `classify(..., window=w)` gives the same verdict as without it (the property test
    `test_classify_incremental` compares them on random streams), at a per-tick cost
    of the samples added and dropped since the last tick instead of the whole window:
    running counts per window reason, an exact running CPU sum, expiring maxima,
    the earliest known sample, the samples whose work is already known.

    Mutable, on purpose: an immutable value handed back each tick would copy the
    window's state every tick, which is the cost this exists to remove. One per
    session, owned by the caller's loop thread; pass it the same history `classify`
    gets (the caller only appends samples and drops the oldest; anything else, or a
    history out of time order or with non-finite numbers, makes `classify` fall back
    to the full recomputation, which stays the reference).

    Every sample's share is computed once, against the sample before it. Only two
    samples of a window see something else: its first (whose tick floor and readable
    predecessor are the last readable sample before the window) and its first
    readable one (whose predecessor is that same sample); both are recomputed each
    tick, as are the history's first and first readable samples for the progress clock.
    """

    def __init__(self) -> None:
        self._params: tuple[float, float, float] | None = None
        self._reset()

    def _reset(self) -> None:
        self._recs: deque[_Rec] = deque()
        self._next = 0
        self._inverted = 0  # samples older than the one before them
        self._odd = 0  # samples with a non-finite time or CPU rate
        self._last_ok: _Rec | None = None
        self._ok: deque[_Rec] = deque()  # readable samples of the history
        self._progress: deque[_Rec] = deque()  # samples that showed work (progress clock)
        self._clear_window()

    def _clear_window(self) -> None:
        self._lo = self._recs[0].seq if self._recs else self._next
        self._start = -math.inf
        self._before: _Rec | None = None
        self._counts = dict.fromkeys(_COUNTS, 0)
        self._cpu_sum = 0
        self._cpu_n = 0
        self._demand_sum = 0
        self._demand_n = 0
        self._cpu_max: deque[tuple[int, float]] = deque()
        self._tcp_max: deque[tuple[int, int]] = deque()
        self._known: deque[_Rec] = deque()
        self._ok_in: deque[_Rec] = deque()
        self._pids: tuple[dict[int, deque[tuple[int, int]]], ...] = ({}, {}, {})

    # ------------------------------------------------------------------ feeding

    def sync(self, samples: Sequence[TreeSample], thr: float, spin: float, work: float) -> None:
        """Catch up with the caller's history: drop what it dropped, add what it added."""
        if self._params != (thr, spin, work):
            self._params = (thr, spin, work)
            self._reset()
        recs = self._recs
        n = len(samples)
        if recs and n and recs[0].sample is not samples[0]:
            while recs and recs[0].sample is not samples[0]:
                self._drop()
        k = len(recs)
        if k > n or (k and recs[-1].sample is not samples[k - 1]):
            self._reset()
            k = 0
        for i in range(k, n):
            self._push(samples[i])

    def _push(self, s: TreeSample) -> None:
        thr, spin, work = self._params or (0.0, 0.0, 0.0)
        recs = self._recs
        prev = recs[-1] if recs else None
        prev_time = prev.time if prev is not None else None
        ok = s.status is SampleStatus.OK
        children = _child_ids(s) if ok else None
        last_ok = self._last_ok
        prev_ok = last_ok.sample if last_ok is not None else None
        prev_children = last_ok.children or _NO_CHILDREN if last_ok is not None else _NO_CHILDREN
        mark = _mark(s, prev_time, prev_ok, prev_children, children, False, thr, spin)
        progress = _progress_mark(s, prev_time, prev_ok, prev_children, children, work)
        # A quiet tree gives the same share and child set tick after tick: keep one object
        # (marks are never changed once made), not one per sample of the window.
        if last_ok is not None and children is not None and children == last_ok.children:
            children = last_ok.children
        if prev is not None and _same_mark(prev.mark, mark):
            mark = prev.mark
        inverted = prev is not None and not s.time >= prev.time
        odd = not math.isfinite(s.time) or (s.cpu_percent is not None and not math.isfinite(s.cpu_percent)) or (
            s.cpu_demand_percent is not None and not math.isfinite(s.cpu_demand_percent))
        rec = _Rec(self._next, s, children, mark, progress, inverted, odd)
        self._next += 1
        recs.append(rec)
        self._inverted += inverted
        self._odd += odd
        if ok:
            self._last_ok = rec
            self._ok.append(rec)
        if progress:
            self._progress.append(rec)
        self._enter(rec)

    def _drop(self) -> None:
        rec = self._recs.popleft()
        if rec.seq >= self._lo:
            self._leave(rec)
        if rec is self._before:
            self._before = None
        if rec is self._last_ok:
            self._last_ok = None
        if self._ok and self._ok[0] is rec:
            self._ok.popleft()
        if self._progress and self._progress[0] is rec:
            self._progress.popleft()
        self._inverted -= rec.inverted
        self._odd -= rec.odd
        if self._recs and self._recs[0].inverted:
            # the new first sample has no predecessor any more: no inversion to count
            self._recs[0].inverted = False
            self._inverted -= 1

    def _enter(self, rec: _Rec) -> None:
        m, c = rec.mark, self._counts
        for k in _COUNTS:
            c[k] += getattr(m, k)
        s = rec.sample
        cpu = s.cpu_percent
        demand = _demand(s)
        if demand is not None and math.isfinite(demand):
            self._demand_sum += _exact(demand)
            self._demand_n += 1
        if cpu is not None and math.isfinite(cpu):
            self._cpu_sum += _exact(cpu)
            self._cpu_n += 1
            q = self._cpu_max
            while q and q[-1][1] <= cpu:
                q.pop()
            q.append((rec.seq, cpu))
        if s.status in (SampleStatus.OK, SampleStatus.ACCESS_DENIED):
            tcp = s.tcp_total
            if tcp is not None:
                t = self._tcp_max
                while t and t[-1][1] <= tcp:
                    t.pop()
                t.append((rec.seq, tcp))
            if s.status is SampleStatus.OK:
                self._ok_in.append(rec)
            if _is_known(s):
                self._known.append(rec)
        for index, pids in zip(self._pids, (m.running, m.blocked, m.working), strict=True):
            for pid, pos in pids:
                occ = index.get(pid)
                if occ is None:
                    occ = index[pid] = deque()
                occ.append((rec.seq, pos))

    def _leave(self, rec: _Rec) -> None:
        """`rec` (the window's first sample) leaves the window."""
        m, c = rec.mark, self._counts
        for k in _COUNTS:
            c[k] -= getattr(m, k)
        cpu = rec.sample.cpu_percent
        demand = _demand(rec.sample)
        if demand is not None and math.isfinite(demand):
            self._demand_sum -= _exact(demand)
            self._demand_n -= 1
        if cpu is not None and math.isfinite(cpu):
            self._cpu_sum -= _exact(cpu)
            self._cpu_n -= 1
        for q in (self._cpu_max, self._tcp_max):
            if q and q[0][0] == rec.seq:
                q.popleft()
        for d in (self._known, self._ok_in):
            if d and d[0] is rec:
                d.popleft()
        for index, pids in zip(self._pids, (m.running, m.blocked, m.working), strict=True):
            for pid, _ in pids:
                occ = index[pid]
                occ.popleft()
                if not occ:
                    del index[pid]
        self._lo = rec.seq + 1

    def _rec(self, seq: int) -> _Rec:
        return self._recs[seq - self._recs[0].seq]

    # ------------------------------------------------------------------ reading

    @property
    def usable(self) -> bool:
        """False: the history is out of time order or holds non-finite numbers, and
        only the full recomputation is known to read it right."""
        return not self._inverted and not self._odd

    def facts(self, start: float, latest: TreeSample | None) -> _Facts:
        """`_Facts.of` for the window of samples at or after `start` (after `sync`)."""
        thr, spin, _ = self._params or (0.0, 0.0, 0.0)
        if start < self._start:  # the window grew back (clock stepped back): start over
            self._clear_window()
            for rec in self._recs:
                self._enter(rec)
        self._start = start
        while self._lo < self._next:
            rec = self._rec(self._lo)
            if rec.time >= start:
                break
            if rec.sample.status is SampleStatus.OK:
                self._before = rec
            self._leave(rec)
        size = self._next - self._lo
        before = self._before
        counts = dict(self._counts)
        first_marks: tuple[_Mark, _Mark] = (_NO_MARK, _NO_MARK)
        first = self._rec(self._lo) if size else None
        if first is not None:
            # The window's first sample: its floor and readable predecessor are `before`'s.
            b_sample = before.sample if before is not None else None
            b_children = (before.children or _NO_CHILDREN) if before is not None else _NO_CHILDREN
            sight = first is self._recs[0] and first.sample.cpu_percent is None
            new1 = _mark(first.sample, before.time if before is not None else None, b_sample, b_children,
                         first.children, sight, thr, spin)
            _swap(counts, first.mark, new1)
            first_marks = (first.mark, new1)
            ok1 = self._ok_in[0] if self._ok_in else None
            if ok1 is not None and ok1 is not first:
                new2 = _mark(ok1.sample, self._rec(ok1.seq - 1).time, b_sample, b_children,
                             ok1.children, False, thr, spin)
                _swap(counts, ok1.mark, new2)
        cpu_mean = (self._cpu_sum / _EXACT_UNIT) / self._cpu_n if self._cpu_n else None
        demand_mean = (self._demand_sum / _EXACT_UNIT) / self._demand_n if self._demand_n else None
        mean_busy = cpu_mean is not None and cpu_mean >= thr
        works = counts["work_mean"] if mean_busy else counts["work"]
        busy_any = (counts["busy_mean"] if mean_busy else counts["busy"]) > 0
        children_now = latest is not None and latest.alive and latest.children > 0
        new = first_marks[1]
        running, blocked, working = (
            _first_seen(index, self._lo, new_pids)
            for index, new_pids in zip(self._pids, (new.running, new.blocked, new.working), strict=True)
        )
        return _Facts(
            size=size,
            known=len(self._known),
            earliest_known=self._known[0].time if self._known else None,
            first_sight_in_window=first is not None and first is self._recs[0] and first.sample.cpu_percent is None,
            support={
                Reason.CPU_SPIN: counts["spin"],
                Reason.WAITING_ON_NETWORK: counts["net"],
                Reason.TOOL_CALL_WITHOUT_PROGRESS: works,
                Reason.PROBE_TIMEOUT: counts["timeout"],
                Reason.ACCESS_DENIED: counts["denied"],
            },
            spin_mean=demand_mean is not None and demand_mean >= spin,
            cpu_latest=latest.cpu_percent if latest is not None else None,
            cpu_max=self._cpu_max[0][1] if self._cpu_max else None,
            cpu_mean=cpu_mean,
            demand_mean=demand_mean,
            tcp_max=self._tcp_max[0][1] if self._tcp_max else None,
            running_pids=running,
            blocked_pids=blocked,
            working_children=working,
            io_changed=counts["io"] > 0,
            children_changed=counts["children"] > 0,
            tree_alive=children_now or busy_any or counts["net"] > 0,
        )

    def progress_time(self) -> float | None:
        """`tree_progress_time` of the whole history (after `sync`)."""
        if not self._recs:
            return None
        work = self._params[2] if self._params else 0.0
        head = self._recs[0]
        ok1 = self._ok[0] if self._ok else None
        last: float | None = None
        for rec in reversed(self._progress):
            if rec is not head and rec is not ok1:
                last = rec.time
                break
        # The history's first sample has no predecessor; its first readable one none readable.
        if _progress_mark(head.sample, None, None, _NO_CHILDREN, head.children, work):
            last = head.time if last is None else max(last, head.time)
        if ok1 is not None and ok1 is not head:
            prev_time = self._rec(ok1.seq - 1).time
            if _progress_mark(ok1.sample, prev_time, None, _NO_CHILDREN, ok1.children, work):
                last = ok1.time if last is None else max(last, ok1.time)
        return last


def _is_known(s: TreeSample) -> bool:
    """`_Facts.of`'s known sample: readable (OK), with a CPU rate and TCP counts."""
    return s.status is SampleStatus.OK and s.tcp is not None and s.cpu_percent is not None


def _swap(counts: dict[str, int], old: _Mark, new: _Mark) -> None:
    for k in _COUNTS:
        counts[k] += getattr(new, k) - getattr(old, k)


def _first_seen(
    index: Mapping[int, deque[tuple[int, int]]], lo: int, first: tuple[tuple[int, int], ...]
) -> tuple[int, ...]:
    """The pids of the window in order of first sight, the window's first sample
    contributing `first` (its recomputed share) instead of what it stored."""
    if not index and not first:
        return ()
    keyed = [((lo, pos), pid) for pid, pos in first]
    mine = {pid for pid, _ in first}
    for pid, occ in index.items():
        if pid in mine:
            continue
        at = occ[0]
        if at[0] == lo:  # listed by the first sample's stored share only
            if len(occ) < 2:
                continue
            at = occ[1]
        keyed.append((at, pid))
    keyed.sort()
    return tuple(pid for _, pid in keyed)


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
    if state not in PROBLEM_STATES:
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
    `watch_since` to `actual` so the gap never counts as evidence of idleness
    (the windows that gate stuck and recovery start again; silence does not).

    Late means more than max(2 intervals, LATE_TICK_MIN_S) after `expected`.
    Two intervals absorb one slow tick (a probe may take probe_timeout); the
    10 s floor keeps a loaded CI box with a sub-second interval from restarting
    the windows all the time, and costs little: silence is judged in minutes.
    Pass wall-clock or CLOCK_BOOTTIME times: CLOCK_MONOTONIC (time.monotonic)
    stops during suspend on Linux and would hide exactly the gap to detect.
    """
    return actual - expected > max(2.0 * interval, LATE_TICK_MIN_S)
