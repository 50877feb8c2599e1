"""Recovery needs an own turn (issue 19), as properties over random histories.

Pure policy level: the session's events are folded by the real `Activity`, its turn is
judged by the real `Tracked.own_turn` and `reacted`, each tick goes through the real
`policy.step`. The samples are built (no /proc here: tests/test_trust_boundaries.py runs
each stimulus against real processes) and the verdict is forced to stuck/no_activity,
the one recoverable state, in every tick: the worst case, where every other gate is
as open as an attacker could make it.

- An idle interactive session, whatever observed events (HTTP, the spool, events naming
  its PID) and outsider stimuli (connections, input that burns CPU, forks, SIGSTOP and
  SIGCONT) come in whatever order, is never recovered.
- A headless session that keeps being stimulated (a stimulus or an observed event at
  least every 2 s against recover_after 3 s) is never recovered either: an outsider can
  make a session look alive, never make it look hung.
- The positive side: whatever observed noise came before, a session whose own event
  opened its turn and that then truly hangs is recovered, every time.
"""

from __future__ import annotations

from dataclasses import replace

from hypothesis import given, settings
from hypothesis import strategies as st

from otelwatch.events.activity import Activity
from otelwatch.model import Event, EventKind, Mode, SessionSpec, TreeSample
from otelwatch.recovery.policy import SessionView, Window, step
from otelwatch.sessions.table import Tracked
from tests.support.recovery_builders import CT, PID, T0, UID, config, context, make_view, proc

RECOVER_AFTER = 3.0
CTX = context(config(recover_after=RECOVER_AFTER, max_per_hour=1000))

# What anyone may send: each opens, closes or moves a turn or a tool call; none is own.
OBSERVED = [
    Event(0.0, "UserPromptSubmit", turn="open", awaiting_input=False, source="http"),
    Event(0.0, "turn_start", turn="open", source="hook"),
    Event(0.0, "PreToolUse", tool="Bash", tool_id="t1", tool_call="open", source="http"),
    Event(0.0, "PostToolUse", tool="Bash", tool_id="t1", tool_call="close", source="hook"),
    Event(0.0, "assistant", source="hook"),
    Event(0.0, "Notification", kind=EventKind.HEARTBEAT, source="http"),
    Event(0.0, "Stop", turn="close", source="http"),
]
STIMULI = ["quiet", "connect", "cpu", "fork", "sigstop", "sigcont"]


def tracked(mode: Mode) -> Tracked:
    return Tracked(key="s1", spec=SessionSpec(session_id="s1", pid=PID, agent="claude-code", mode=mode),
                   started_at=T0)


def view_of(t: float, tr: Tracked, *, cpu: float, cpu_s: float, tcp: int, children: int,
            stopped: bool) -> SessionView:
    kids = [proc(PID + 1 + i, PID, ct=CT + 1 + i, cpu_s=0.0) for i in range(children)]
    v = make_view(t, cpu=cpu, cpu_s=cpu_s, tcp=tcp, events=tr.activity.events, children=kids,
                  root_status="T" if stopped else "S")
    sample: TreeSample = v.sample
    tr.samples.append(sample)
    # The gate under test is the own turn: the attacker is granted the old "reaction".
    return replace(v, own_turn=tr.own_turn(), reacted=True)


@st.composite
def noise(draw: st.DrawFn, every: float | None = None) -> list[tuple[float, str, Event | None]]:
    """(dt, stimulus, observed event or None) per tick; with `every`, something happens
    at least that often."""
    out = []
    quiet_for = 0.0
    for _ in range(draw(st.integers(1, 60))):
        dt = draw(st.sampled_from([0.5, 1.0, 1.0, 1.0]))
        stimulus = draw(st.sampled_from(STIMULI))
        event = draw(st.one_of(st.none(), st.sampled_from(OBSERVED)))
        quiet_for += dt
        if every is not None and quiet_for >= every and stimulus not in ("connect", "cpu", "fork") and event is None:
            stimulus = draw(st.sampled_from(STIMULI[1:4]))
        if stimulus in ("connect", "cpu", "fork") or event is not None:
            quiet_for = 0.0  # (SIGCONT shows nothing; a stopped tree blocks recovery on its own)
        out.append((dt, stimulus, event))
    return out


def run(tr: Tracked, history: list[tuple[float, str, Event | None]], t: float = T0,
        window: Window | None = None, cpu_s: float = 1.0, stopped: bool = False) -> tuple[list[bool], float,
                                                                                         Window | None, float]:
    acts = []
    for dt, stimulus, event in history:
        t += dt
        if event is not None:
            tr.activity = tr.activity.apply(replace(event, time=t))
        cpu, tcp, children = 0.0, 0, 0
        if stimulus == "cpu":
            cpu, cpu_s = 80.0, cpu_s + 0.8
        elif stimulus == "connect":
            tcp = 1
        elif stimulus == "fork":
            children = 1
        elif stimulus == "sigstop":
            stopped = True
        elif stimulus == "sigcont":
            stopped = False
        v = view_of(t, tr, cpu=cpu, cpu_s=cpu_s, tcp=tcp, children=children, stopped=stopped)
        window, decision = step(window, v, t, CTX)
        acts.append(decision.act)
        if decision.act:
            window = None
    return acts, t, window, cpu_s


@settings(max_examples=80, deadline=None)
@given(noise())
def test_observed_events_and_outsider_stimuli_never_recover_an_idle_interactive_session(
        history: list[tuple[float, str, Event | None]]) -> None:
    tr = tracked(Mode.INTERACTIVE)
    # Then a long quiet tail: had anything opened the gate, the window completes here.
    tail: list[tuple[float, str, Event | None]] = [(1.0, "quiet", None)] * int(RECOVER_AFTER + 3)
    acts, *_ = run(tr, [*history, *tail])
    assert not any(acts)
    assert not tr.activity.turn_own


@settings(max_examples=50, deadline=None)
@given(noise(every=2.0))
def test_a_stimulated_headless_session_is_never_recovered(history: list[tuple[float, str, Event | None]]) -> None:
    tr = tracked(Mode.HEADLESS)
    acts, *_ = run(tr, history)
    assert not any(acts)


@settings(max_examples=50, deadline=None)
@given(noise(), st.sampled_from(["transcript", "session", "exec", "hook"]))
def test_an_own_turn_that_truly_hangs_is_recovered_every_time(
        history: list[tuple[float, str, Event | None]], source: str) -> None:
    tr = tracked(Mode.INTERACTIVE)
    _, t, _, cpu_s = run(tr, history)
    # The session's own event opens the turn (then the tree is whole again, running, quiet).
    t += 1.0
    tr.activity = tr.activity.apply(Event(t, "user", turn="open", source=source, own=True))
    assert tr.own_turn()
    quiet: list[tuple[float, str, Event | None]] = [(1.0, "quiet", None)] * int(RECOVER_AFTER + 3)
    acts, *_ = run(tr, quiet, t=t, window=None, cpu_s=cpu_s, stopped=False)
    assert any(acts)


def test_an_observed_turn_start_never_makes_a_turn_own() -> None:
    a = Activity()
    for event in OBSERVED:
        a = a.apply(replace(event, time=1.0))
        assert not a.turn_own
    own = a.apply(Event(2.0, "user", turn="open", own=True))
    assert own.turn_open and own.turn_own
    # Observed noise inside an own turn keeps it own; its close ends it.
    noisy = own.apply(Event(3.0, "turn_start", turn="open", source="http"))
    assert noisy.turn_own
    assert not noisy.apply(Event(4.0, "Stop", turn="close", source="http")).turn_own
    # An own tool call inside an observed turn is the session's word that it works.
    observed = Activity().apply(Event(1.0, "turn_start", turn="open", source="http"))
    assert not observed.turn_own
    assert observed.apply(Event(2.0, "tool_use", tool_call="open", tool_id="x", own=True)).turn_own
    assert UID  # the builders' user: allowed by CTX
