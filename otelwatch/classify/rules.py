"""The verdict: a pure classifier of one session.

Owns: turning (config, session info, recent tree samples, event activity, now,
and the session's previous verdict) into a `Verdict` (state + reason +
evidence): the two CPU bars (`cpu_idle_percent` is the zero of the stuck gate,
`cpu_spin_percent` sustained over the window is a spin, between them is
neither), the stalled reason read from the whole window with hysteresis, and
liveness while an announced API retry is not overdue. What the window's samples
prove is `window.py`'s; the backoff of reports is `backoff.py`'s; late ticks
are `lateness.py`'s; a tool seen in the process tree is `tooltree.py`'s.

Must never: do I/O, read a clock, or import os, time, psutil or an exporter.
Time is always passed in as a number (wall-clock seconds). Every function here
is deterministic, so its tests need no sleeps.

The one rule above all others: `stuck` is the only state recovery may act on,
so a false `stuck` can kill a working session. Every doubt (unknown data, too
few samples, any sign of work, any heartbeat) resolves to something else.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from otelwatch.classify.tooltree import tool_processes
from otelwatch.classify.window import (
    MAX_LISTED,
    SampleWindow,
    WindowFacts,
    last_ok_before,
    or_zero,
    rounded,
    stopped_root,
    tree_progress_time,
    window_samples,
    work_cpu_percent,
)
from otelwatch.config import ClassifyConfig
from otelwatch.events.activity import Activity
from otelwatch.model import Mode, Reason, SampleStatus, SessionInfo, State, TreeSample, Verdict

__all__ = [
    "MAX_ATTEMPT_S",
    "classify",
    "retry_holds",
    "retry_phrase",
    "work_cpu_percent",
]


# --------------------------------------------------------------------------- classify



# An API attempt is expected to last as long as the attempt before it took to fail
# (the CLIs abort attempts on fixed timers: 360 s for a silent API and 300 s for an
# idle byte stream in Claude Code, ~1 ms for a refused connection), but never longer
# than this: Claude Code's request timeout is 600 s, Codex's stream idle timeout 300 s.
MAX_ATTEMPT_S = 600.0


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
    tick. The caller brings it up to date first (`window.sync_for(cfg, samples)`);
    this function only reads it, and changes none of its arguments.
    """
    thr = cfg.cpu_idle_percent
    spin = max(cfg.cpu_spin_percent, thr)
    latest = samples[-1] if samples else None

    if window is not None and not window.usable:
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
        progress = tree if activity.last_progress_time is None else max(or_zero(tree), activity.last_progress_time)
    # The clock of silence starts at the later of the last progress and the session's
    # start (its process's start when known). A gap in our own watching (a restart, a
    # late tick) does not reset it: it restarts the window of samples (below), which is
    # what a stuck verdict and recovery need, and a silent agent stays silent.
    silence = max(0.0, now - max(or_zero(progress), info.started_at))
    start = max(now - cfg.stall_after, watch_since)
    if window is not None:
        facts = window.facts(start, latest)
    else:
        # The last readable sample before the window lets a change at the window's
        # first sample (counters, child set) count: that change happened inside it.
        before = last_ok_before(samples, start)
        first_sight = samples[0] if samples and samples[0].cpu_percent is None else None
        facts = WindowFacts.of(window_samples(samples, start), before, latest, thr, spin, first_sight)
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
    if stopped_root(latest):
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
        if tool_age < cfg.tool_stall_after and (facts.tree_alive or _tool_unread(latest, samples, oldest)):
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


def _blind_detail(facts: WindowFacts) -> str:
    tcp = "TCP unreadable" if facts.tcp_max is None else f"up to {facts.tcp_max} TCP connections"
    cpu = "" if facts.cpu_mean is None else f", CPU mean {rounded(facts.cpu_mean, 1)}%"
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


def _tool_unread(latest: TreeSample | None, samples: Sequence[TreeSample], opened: float) -> bool:
    """The latest sample could not be read, so it says nothing about the tool's processes:
    they still count when the last readable sample had children, or, after a probe timeout,
    when no sample has been read since the call `opened` (measured: aider's `/run` on a
    loaded box, the probe timing out for half a minute, read stalled before its child).
    An access-denied tick read the processes, and so its children: no child is no child."""
    if latest is None or latest.status is SampleStatus.OK:
        return False
    readable = _last_readable(samples)
    if readable is not None and readable.children > 0:
        return True
    return latest.status is SampleStatus.PROBE_TIMEOUT and (readable is None or readable.time < opened)


def _tui_spinner_on_network(info: SessionInfo, facts: WindowFacts) -> bool:
    """An interactive session whose only sign of work in the window is its own CPU (no
    working child, nothing blocked, no I/O, no child coming or going), with TCP open in
    some of it: a spinner over an API call that is being retried."""
    return (info.mode is Mode.INTERACTIVE and facts.support[Reason.WAITING_ON_NETWORK] > 0
            and not facts.working_children and not facts.blocked_pids and not facts.io_changed
            and not facts.children_changed)


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


def _evidence(
    silence: float,
    latest: TreeSample | None,
    facts: WindowFacts,
    activity: Activity,
    now: float,
    hb_age: float | None,
    detail: str,
) -> dict[str, Any]:
    ev: dict[str, Any] = {
        "silence_s": rounded(silence, 1),
        "cpu_percent": rounded(facts.cpu_latest),
        "cpu_window_max": rounded(facts.cpu_max),
        "cpu_window_mean": rounded(facts.cpu_mean),
        "cpu_demand_window_mean": rounded(facts.demand_mean),
        "tcp": None if latest is None or latest.tcp is None else dict(latest.tcp),
        "tcp_window_max": facts.tcp_max,
        "children": latest.children if latest is not None else 0,
        "working_children": list(facts.working_children[:MAX_LISTED]),
        "open_tools": [
            {"tool": t.tool, "age_s": rounded(now - t.since, 1)}
            for t in (*activity.open_tools, *activity.background_tasks)[:MAX_LISTED]
        ],
        "heartbeat_age_s": rounded(hb_age, 1),
        "sample_status": latest.status.value if latest is not None else None,
        "samples_in_window": facts.size,
    }
    if activity.retry_due is not None or activity.retry_attempt is not None:
        ev["retry"] = {
            "attempt": activity.retry_attempt,
            "max_retries": activity.retry_max,
            "next_in_s": None if activity.retry_due is None else rounded(activity.retry_due - now, 1),
            "text": retry_phrase(activity, now),
        }
    if detail:
        ev["detail"] = detail
    return ev


# --------------------------------------------------------------------------- incremental window


# --------------------------------------------------------------------------- backoff


# --------------------------------------------------------------------------- lag


