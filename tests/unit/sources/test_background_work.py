"""Claude Code's background work and the turns shorter than a tick.

Measured on 2.1.330 before: Agent-tool subagents run in the background by default; the
session stayed idle/no_open_turn while 4 subagents ran `bash -> sleep`, and for 4 minutes
while all of them hung on a blackholed API with 6 ESTABLISHED connections, its session
file saying `"status": "busy"` the whole time; a run_in_background Bash shows
`"status": "shell"`. A turn that completed within one tick was sometimes never `active`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from otelwatch.classify.rules import classify
from otelwatch.events.lines import fold
from otelwatch.model import Mode, ProcessSample, Reason, SessionInfo, SessionSpec, State, TreeSample
from otelwatch.sessions.lifecycle import Effects, Lifecycle, add_sample, infers_tools
from otelwatch.sessions.table import Tracked
from otelwatch.sources.transcripts import BACKGROUND_GRACE_S, ClaudeSession, status_events
from tests.support.classify_builders import CFG, NOW, ROOT_PID, STARTED, WATCH, acts, ev, tree

PROMPT = NOW - 900.0
END_TURN = PROMPT + 20.0


def cs(status: str, at: float) -> ClaudeSession:
    return ClaudeSession(pid=ROOT_PID, session_id="s", cwd="/w", status=status, status_at=at)


def _after_turn() -> Any:
    return acts(ev(PROMPT, "prompt", turn="open"), ev(PROMPT + 1, "tool_use", tool="Agent", tool_id="a1",
                                                      tool_call="open"),
                ev(END_TURN, "assistant", turn="close", detail="end_turn"))


def test_busy_after_the_turn_ended_is_background_work_until_idle() -> None:
    done = _after_turn()
    busy = cs("busy", PROMPT)  # set at the prompt, never rewritten while the subagents work
    assert status_events(busy, busy, done, now=END_TURN + 0.5) == []  # the file may lag the transcript
    reopen = status_events(busy, busy, done, now=END_TURN + BACKGROUND_GRACE_S)
    assert [(e.turn, e.kind.value, e.detail) for e in reopen] == [("open", "state", "background work")]
    working = fold(done, reopen)
    assert working.turn_open and working.turn_opened_at == PROMPT
    assert working.last_progress_time == END_TURN  # it moved no clock
    assert status_events(busy, busy, working, now=NOW) == []  # a level, applied once
    # Back at the input box: the turn ends.
    idle = fold(working, status_events(cs("idle", NOW - 5), busy, working, now=NOW))
    assert not idle.turn_open
    # A background shell says so too.
    shell = cs("shell", PROMPT)
    assert fold(done, status_events(shell, shell, done, now=NOW)).turn_open


def _p(pid: int, ppid: int, cmd: tuple[str, ...], create: float) -> ProcessSample:
    return ProcessSample(pid=pid, ppid=ppid, create_time=create, name=cmd[0], status="S", cpu_seconds=0.0,
                         cpu_percent=0.0, rss_bytes=1, threads=1, tcp={}, cmdline=cmd)


def _samples(children: tuple[ProcessSample, ...], tcp: int) -> list[TreeSample]:
    out = []
    for i in range(61):
        s = tree(NOW - 600 + 10 * i, tcp={"ESTABLISHED": tcp} if tcp else None, children=children)
        out.append(s)
    return out


def test_background_subagents_long_running_while_they_work_stalled_when_they_all_hang() -> None:
    busy = cs("busy", PROMPT)
    done = _after_turn()
    working = fold(done, status_events(busy, busy, done, now=NOW))
    tracked = Tracked(key="s", spec=SessionSpec("s", ROOT_PID, agent="claude-code", source="process",
                                                mode=Mode.INTERACTIVE), started_at=STARTED)
    tracked.claude = busy
    assert infers_tools(tracked)
    info = SessionInfo(mode=Mode.INTERACTIVE, started_at=STARTED, has_event_source=True, infer_tools=True)
    subagent_tools = tuple(x for k in range(4) for x in (
        _p(6000 + 2 * k, ROOT_PID, ("bash", "-c", "sleep 600"), PROMPT + 30 + k),
        _p(6001 + 2 * k, 6000 + 2 * k, ("sleep", "600"), PROMPT + 30 + k)))
    before = classify(CFG, info, _samples(subagent_tools, 0), done, NOW, WATCH)
    assert (before.state, before.reason) == (State.IDLE, Reason.NO_OPEN_TURN)  # what was measured
    v = classify(CFG, info, _samples(subagent_tools, 0), working, NOW, WATCH)
    assert (v.state, v.reason) == (State.LONG_RUNNING, Reason.TOOL_RUNNING)
    v = classify(CFG, info, _samples((), 6), working, NOW, WATCH)
    assert (v.state, v.reason) == (State.STALLED, Reason.WAITING_ON_NETWORK)
    # Within stall_after of its last word it is simply active.
    v = classify(CFG, info, _samples((), 6), working, END_TURN + 60, WATCH)
    assert v.state is State.ACTIVE


@dataclass
class Seen:
    transitions: list[tuple[str, str | None]] = field(default_factory=list)

    def effects(self) -> Effects:
        def transitioned(snap: Any, old: State | None) -> None:
            self.transitions.append((snap.state.value, None if old is None else old.value))

        def nothing(*args: Any) -> None:
            return None

        return Effects(transitioned=transitioned, reported=nothing, ended=nothing, emit=nothing, release=nothing,
                       runtime_alive=lambda spec: None, wchan=lambda pid: None, stderr_tail=lambda spec: "")


def test_a_turn_within_one_tick_counts_once_as_active() -> None:
    seen = Seen()
    life = Lifecycle(CFG, seen.effects())
    tracked = Tracked(key="s", spec=SessionSpec("s", ROOT_PID, agent="claude-code", source="process",
                                                mode=Mode.INTERACTIVE), started_at=STARTED, state_since=STARTED)
    tracked.activity = tracked.activity.apply(ev(STARTED, "init"))
    t = STARTED + CFG.startup_grace + 10
    for k in range(3):
        add_sample(tracked, tree(t + 10 * k), 0.0)
        life.classify(tracked, t + 10 * k, STARTED)
    assert tracked.verdict is not None and tracked.verdict.state is State.IDLE
    # Prompt and answer between two ticks.
    t += 30
    tracked.activity = fold(tracked.activity, [ev(t - 8, "prompt", turn="open"),
                                               ev(t - 6, "assistant", turn="close")])
    add_sample(tracked, tree(t), 0.0)
    life.classify(tracked, t, STARTED)
    assert seen.transitions[-2:] == [("active", "idle"), ("idle", "active")]
    assert tracked.verdict.state is State.IDLE
    # Counted once: the next quiet tick changes nothing.
    add_sample(tracked, tree(t + 10), 0.0)
    life.classify(tracked, t + 10, STARTED)
    assert seen.transitions[-2:] == [("active", "idle"), ("idle", "active")]
