"""A tool at work is never stuck, for every agent (otelwatch/tooltree.py and its use in
classify): process trees shaped as the real CLIs make them (Gemini CLI 0.61.0 relaunches
itself and runs `bash -c ... -> bash -> sleep`; aider's `/run` is `sh -c CMD`; MCP and
language servers live as long as the session), built samples, no clock.
"""

from __future__ import annotations

from dataclasses import replace

from otelwatch.classify.rules import classify
from otelwatch.classify.tooltree import is_helper, tool_processes
from otelwatch.model import Mode, ProcessSample, Reason, SampleStatus, SessionInfo, State, TreeSample
from tests.support.classify_builders import CFG, NOW, ROOT, ROOT_PID, STARTED, WATCH, acts, ev

GEMINI = "/opt/otelwatch-real-agents/gemini-cli/node_modules/.bin/gemini"
TURN = NOW - 1200.0  # the prompt, 20 minutes ago


def p(pid: int, ppid: int, cmdline: tuple[str, ...], create: float, status: str = "S") -> ProcessSample:
    return ProcessSample(pid=pid, ppid=ppid, create_time=create, name=cmdline[0].rpartition("/")[2][:15],
                         status=status, cpu_seconds=0.1, cpu_percent=0.0, rss_bytes=10_000_000, threads=1,
                         tcp={}, cmdline=cmdline)


ROOT_P = p(ROOT_PID, 1, ("node", GEMINI, "-p", "run sleep 120", "--yolo"), ROOT.create_time)
RELAUNCH = p(5001, ROOT_PID, ("/usr/bin/node", "--max-old-space-size=12052", GEMINI, "-p", "run sleep 120"),
             ROOT.create_time + 2)
BASH = p(5002, 5001, ("bash", "-c", "shopt -u promptvars; sleep 120"), TURN + 3)
BASH2 = p(5003, 5002, ("bash", "-c", "sleep 120"), TURN + 3)
SLEEP = p(5004, 5003, ("sleep", "120"), TURN + 3)
MCP = p(5005, 5001, ("node", "/home/u/.npm/_npx/1/node_modules/.bin/mcp-server-filesystem", "/work"), TURN + 1)
MCP_CHILD = p(5006, 5005, ("rg", "--files"), TURN + 2)


def sample(t: float, *procs: ProcessSample, tcp: int = 0) -> TreeSample:
    root = replace(ROOT_P, tcp={"ESTABLISHED": tcp} if tcp else {})
    return TreeSample(time=t, status=SampleStatus.OK, root=ROOT, processes=(root, *procs), cpu_percent=0.0,
                      tcp={"ESTABLISHED": tcp} if tcp else {}, children=len(procs), num_fds=30, threads=10)


def test_the_tool_is_what_the_agent_started_in_the_turn() -> None:
    s = sample(NOW, RELAUNCH, BASH, BASH2, SLEEP)
    assert [x.pid for x in tool_processes(s, TURN)] == [5002, 5003, 5004]
    # The relaunched agent is the agent, whatever the turn: never a tool, its children may be.
    assert [x.pid for x in tool_processes(s, None)] == [5002, 5003, 5004]
    assert tool_processes(sample(NOW, RELAUNCH), TURN) == ()
    # Started before the turn opened (a shell the TUI keeps): a helper, with what runs below it.
    assert tool_processes(s, TURN + 10) == ()
    assert len(tool_processes(s, TURN + 4)) == 3  # a second off: create times are whole-second based
    # MCP and language servers never count, whenever started; nor what they run.
    assert [x.pid for x in tool_processes(sample(NOW, RELAUNCH, MCP, MCP_CHILD, SLEEP), TURN)] == [5004]
    assert is_helper(("typescript-language-server", "--stdio")) and is_helper(("gopls",))
    assert not is_helper(("bash", "-c", "grep -r mcp src"))  # a tool's arguments are not its program
    # A zombie is no tool at work.
    assert tool_processes(sample(NOW, replace(SLEEP, status="Z", ppid=ROOT_PID)), TURN) == ()


def _window(*procs: ProcessSample, tcp: int = 0) -> list[TreeSample]:
    return [sample(NOW - 600 + 10 * i, *procs, tcp=tcp) for i in range(61)]


def _info(mode: Mode = Mode.HEADLESS, infer: bool = True, first: bool = False) -> SessionInfo:
    return SessionInfo(mode=mode, started_at=STARTED, has_event_source=True, infer_tools=infer,
                       before_first_turn=first)


def test_a_gemini_tool_call_silent_for_minutes_is_long_running_not_stuck() -> None:
    """Measured before: `gemini -p --yolo` running `sleep 120` went stuck/no_activity at 71.5 s
    (stall_after 30 s): the chat file shows the call only at its end."""
    activity = acts(ev(TURN, "prompt", turn="open"), ev(TURN + 2, "gemini"))
    samples = _window(RELAUNCH, BASH, BASH2, SLEEP)
    before = classify(CFG, _info(infer=False), samples, activity, NOW, WATCH)
    assert (before.state, before.reason) == (State.STUCK, Reason.NO_ACTIVITY)
    after = classify(CFG, _info(), samples, activity, NOW, WATCH)
    assert (after.state, after.reason) == (State.LONG_RUNNING, Reason.TOOL_RUNNING)
    assert "bash (pid 5002) started in the turn" in after.evidence["detail"]
    # A tool silent past tool_stall_after is worth a look, still never stuck.
    late = replace(CFG, tool_stall_after=600.0)
    v = classify(late, _info(), samples, activity, NOW, WATCH)
    assert (v.state, v.reason) == (State.STALLED, Reason.TOOL_CALL_WITHOUT_PROGRESS)
    # The tool ended, the agent sleeps with nothing open: stuck, as before.
    v = classify(CFG, _info(), _window(RELAUNCH), activity, NOW, WATCH)
    assert (v.state, v.reason) == (State.STUCK, Reason.NO_ACTIVITY)


def test_helpers_do_not_hide_a_hung_api_call() -> None:
    """Blackholed: the agent sits on its socket with an MCP server beside it."""
    activity = acts(ev(TURN, "prompt", turn="open"))
    v = classify(CFG, _info(), _window(RELAUNCH, MCP, tcp=1), activity, NOW, WATCH)
    assert (v.state, v.reason) == (State.STALLED, Reason.WAITING_ON_NETWORK)
    # And an interactive session with no turn open is idle whatever its children do.
    idle = acts(ev(TURN, "prompt", turn="open"), ev(TURN + 5, "gemini", turn="close"))
    v = classify(CFG, _info(Mode.INTERACTIVE), _window(RELAUNCH, BASH, SLEEP), idle, NOW, WATCH)
    assert (v.state, v.reason) == (State.IDLE, Reason.NO_OPEN_TURN)


def test_a_retry_after_a_client_abort_is_not_progress() -> None:
    """Measured before: Gemini blackholed went stalled -> active -> stalled once per 60 s client
    abort (a new connection and a CPU burst read as work with no event source). With its chat
    file as the event source, only its records move the progress clock."""
    activity = acts(ev(TURN, "prompt", turn="open"))

    def at(i: int) -> TreeSample:
        t = NOW - 600 + 10 * i
        aborting = i % 6 == 0  # every 60 s: 0 TCP, then a new attempt with a CPU burst
        s = sample(t, RELAUNCH, tcp=0 if aborting else 1)
        return replace(s, cpu_percent=35.0 if i % 6 == 1 else 0.3)

    samples = [at(i) for i in range(61)]
    v = classify(CFG, _info(), samples, activity, NOW, WATCH)
    assert (v.state, v.reason) == (State.STALLED, Reason.WAITING_ON_NETWORK)
    without_events = SessionInfo(mode=Mode.HEADLESS, started_at=STARTED, has_event_source=False)
    assert classify(CFG, without_events, samples, activity, NOW, WATCH).state is State.ACTIVE  # the old flip


def test_a_tui_spinner_is_not_work() -> None:
    """Gemini CLI's and opencode's TUIs spin at 17-30% of a core while a turn waits on the
    API: the waiting turn is judged by its sockets (between attempts it has none)."""
    activity = acts(ev(TURN, "prompt", turn="open"))

    def at(i: int) -> TreeSample:
        s = sample(NOW - 600 + 10 * i, RELAUNCH, tcp=1 if i % 3 else 0)
        return replace(s, cpu_percent=24.0, processes=(replace(s.processes[0], cpu_percent=24.0), RELAUNCH))

    samples = [at(i) for i in range(61)]
    tui = SessionInfo(mode=Mode.INTERACTIVE, started_at=STARTED, has_event_source=True, infer_tools=True)
    v = classify(CFG, tui, samples, activity, NOW, WATCH)
    assert (v.state, v.reason) == (State.STALLED, Reason.WAITING_ON_NETWORK)
    # Without any socket in the window there is nothing to wait on: not stuck either (CPU).
    quiet = [replace(s, tcp={}, processes=(replace(s.processes[0], tcp={}), RELAUNCH)) for s in samples]
    v = classify(CFG, tui, quiet, activity, NOW, WATCH)
    assert v.state is State.STALLED and v.reason is Reason.TOOL_CALL_WITHOUT_PROGRESS


def test_an_unreadable_tick_does_not_hide_the_tool() -> None:
    """Under load a probe times out now and then: the tool seen at the last readable tick
    still runs (measured: stalled/tool_call_without_progress while the probe could not read)."""
    activity = acts(ev(TURN, "prompt", turn="open"))
    samples = _window(RELAUNCH, BASH, BASH2, SLEEP)
    samples[-1] = TreeSample(time=NOW, status=SampleStatus.PROBE_TIMEOUT, root=ROOT, error="probe_timeout")
    v = classify(CFG, _info(), samples, activity, NOW, WATCH)
    assert (v.state, v.reason) == (State.LONG_RUNNING, Reason.TOOL_RUNNING)


def test_a_headless_run_before_its_prompt_is_judged_by_its_tree() -> None:
    """aider spends its startup (model metadata, repo map) before it writes its prompt: its
    history's first lines are not the last word on its work (measured: a spurious stalled)."""
    started = acts(ev(NOW - 400, "session_start", turn="close"))

    def at(i: int) -> TreeSample:
        return replace(sample(NOW - 600 + 10 * i), cpu_percent=7.0)

    samples = [at(i) for i in range(61)]
    v = classify(CFG, _info(first=True), samples, started, NOW, WATCH)
    assert v.state is State.ACTIVE
    # After its turn (given up on a dropping API, winding down) its records are the word again.
    v = classify(CFG, _info(), samples, started, NOW, WATCH)
    assert v.state is State.STALLED
    # Inside its turn only its records count.
    v = classify(CFG, _info(), samples, acts(ev(NOW - 400, "prompt", turn="open")), NOW, WATCH)
    assert v.state is State.STALLED


def test_an_open_tool_call_survives_unreadable_ticks() -> None:
    """opencode writes its tool at the start; with the probe timing out tick after tick the
    tool's processes are unknown, not gone (measured: stalled/tool_call_without_progress)."""
    activity = acts(ev(TURN, "prompt", turn="open"), ev(TURN + 1, "tool", tool="bash", tool_id="c1",
                                                        tool_call="open"))
    samples = _window(SLEEP)[:20]
    samples += [TreeSample(time=NOW - 400 + 10 * i, status=SampleStatus.PROBE_TIMEOUT, root=ROOT,
                           error="probe_timeout") for i in range(41)]
    v = classify(CFG, _info(infer=False), samples, activity, NOW, WATCH)
    assert (v.state, v.reason) == (State.LONG_RUNNING, Reason.TOOL_RUNNING)


def test_a_tool_call_not_read_since_it_opened_is_not_without_progress() -> None:
    """aider's `/run` on a loaded box: its history line opens the call, then the probe times out
    tick after tick before one reading shows the `sh -c` child (measured in CI: stalled/
    tool_call_without_progress for 3 s, then long_running once read)."""
    opened = NOW - 400  # past stall_after (its line was progress), well inside tool_stall_after
    activity = acts(ev(opened - 1, "prompt", turn="open"), ev(opened, "tool", tool="run", tool_id="r1",
                                                               tool_call="open"))
    before = [sample(NOW - 600 + 10 * i) for i in range(20)]  # read, no child: up to NOW - 410
    timeouts = [TreeSample(time=NOW - 400 + 10 * i, status=SampleStatus.PROBE_TIMEOUT, root=ROOT,
                           error="probe_timeout") for i in range(41)]
    v = classify(CFG, _info(), before + timeouts, activity, NOW, WATCH)
    assert (v.state, v.reason) == (State.LONG_RUNNING, Reason.TOOL_RUNNING)
    # Read after the call opened, with no child and nothing working: that reading stands.
    read_after = [*before, sample(NOW - 390), *timeouts[2:]]
    v = classify(CFG, _info(), read_after, activity, NOW, WATCH)
    assert (v.state, v.reason) == (State.STALLED, Reason.TOOL_CALL_WITHOUT_PROGRESS)
    # A tick whose FDs could not be read still read the processes: no child is no child.
    denied = [replace(s, status=SampleStatus.ACCESS_DENIED) for s in timeouts]
    denied = [replace(s, processes=before[-1].processes, children=0) for s in denied]
    v = classify(CFG, _info(), before + denied, activity, NOW, WATCH)
    assert (v.state, v.reason) == (State.STALLED, Reason.TOOL_CALL_WITHOUT_PROGRESS)
    # Past tool_stall_after the call is stalled, read or not.
    late = acts(ev(NOW - CFG.tool_stall_after - 60, "prompt", turn="open"),
                ev(NOW - CFG.tool_stall_after - 50, "tool", tool="run", tool_id="r1", tool_call="open"))
    v = classify(CFG, _info(), before + timeouts, late, NOW, WATCH)
    assert (v.state, v.reason) == (State.STALLED, Reason.TOOL_CALL_WITHOUT_PROGRESS)
