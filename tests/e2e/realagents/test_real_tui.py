"""Conformance: the real Claude Code TUI in tmux, turn after turn, judged by a real daemon (issue #12).

Five TUIs run at once, each in a tmux pane of its own private tmux server inside
its own network namespace, next to a fake API that takes each turn's behaviour
from the prompt (`[fake:slow]`, `[fake:never_answer]`, `[fake:tool_bash]`). A
driver thread per TUI types prompts and keys as a person would, and marks when
it did; one `otelwatch run` (interval 1 s, stall_after 30 s, default CPU
thresholds, recovery on in dry-run) watches them with zero configuration (its
HOME is the TUIs' HOME, its TMUX_TMPDIR holds their tmux sockets), two of them
also with the README's hook snippet. Each test judges one TUI's whole verdict
timeline, phase by phase: after each action the right verdict must come within
its bound and then hold until the next action; nothing is ever stuck, nothing
is ever recovered, and the session names its pane.

The module takes about 85 s of wall time (its phases, not the number of TUIs).
"""

from __future__ import annotations

import json
import os
import shutil
import sysconfig
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import pytest

from tests.e2e.realagents.harness import DAEMON_CONFIG as HEADLESS_CONFIG
from tests.e2e.realagents.harness import (
    STALL_AFTER,
    Recorder,
    Row,
    base_env,
    never_stuck_nor_recovered,
    require_real_agents,
    segments,
)
from tests.e2e.realagents.tui import INPUT_BOX, Tui, claude_env, hooks_settings, launch_tui, seed_home
from tests.support.e2e_support import Daemon, merge, start_daemon

pytestmark = [pytest.mark.real_agents, pytest.mark.timeout(240)]

PORT = 18080
INTERVAL = 1.0
STARTUP_GRACE = 3.0
# A change of verdict is due within one tick of what caused it; the recorder reads the
# API every second and the TUIs share two cores with the daemon: 3 s of slack on top.
EDGE_S = INTERVAL + 3.0
BLIP_S = 2.0 * INTERVAL  # an instant: at most two polls of the recorder
STALL_S = STALL_AFTER + EDGE_S
# The headless suite's daemon, ticking every second: TUI edges (Esc, a prompt) are fast.
# Recovery is on in dry run there too (this host may run other people's agents): a wrong
# stuck verdict shows as a recovery record within recover_after.
DAEMON_CONFIG = merge(HEADLESS_CONFIG, {"interval": INTERVAL, "probe_timeout": 0.8,
                                        "classify": {"startup_grace": STARTUP_GRACE}})

V = tuple[str, str]
IDLE: V = ("idle", "no_open_turn")
AWAITING: V = ("idle", "awaiting_input")
ACTIVE: V = ("active", "recent_progress")
STARTING: V = ("starting", "startup_grace")
TOOL: V = ("long_running", "tool_running")
ON_NETWORK: V = ("stalled", "waiting_on_network")
RETRYING: V = ("stalled", "api_retrying")
EXITED: V = ("exited", "process_exited")


# --------------------------------------------------------------------------- what a person does


# An action returns (when its phase starts, when its verdict's bound starts counting).
Action = Callable[[Tui], tuple[float, float]]


def prompt(text: str, wait: str | None = None) -> Action:
    """Type a prompt; the phase starts when it is submitted, its bound when `wait` is on screen."""
    def do(tui: Tui) -> tuple[float, float]:
        t = tui.type(text)
        if wait is None:
            return t, t
        tui.wait_screen(wait, timeout=30)
        return t, tui.mark(f"saw {wait!r}")
    return do


def keys(*names: str) -> Action:
    def do(tui: Tui) -> tuple[float, float]:
        t = tui.keys(*names)
        return t, t
    return do


def until_screen(pattern: str) -> Action:
    """The phase starts when `pattern` is on screen (what the CLI did by itself)."""
    def do(tui: Tui) -> tuple[float, float]:
        tui.wait_screen(pattern, timeout=20)
        t = tui.mark(f"saw {pattern!r}")
        return t, t
    return do


def interrupt(tui: Tui) -> tuple[float, float]:
    """Esc, then empty the input box (an interrupted prompt goes back into it)."""
    t = tui.keys("Escape", what="Esc")
    time.sleep(0.5)
    tui.keys("C-u", what="C-u (empty the input box)")
    return t, t


def ready(tui: Tui) -> tuple[float, float]:
    tui.wait_screen(INPUT_BOX, timeout=45)
    t = tui.mark("ready")
    return t, t


@dataclass(frozen=True)
class Phase:
    """After `do`, one of `want` within `within` s, then only `want` until the next phase
    (`hold` s after `do`). Before `want` is reached, the previous phase's verdicts and
    `before` are fine."""

    label: str
    do: Action
    want: frozenset[V]
    within: float
    hold: float
    before: frozenset[V] = frozenset()
    # Verdicts allowed for an instant (rows spanning at most BLIP_S) once `want` is reached:
    # the CLI really busy for a moment, not a flap.
    blip: frozenset[V] = frozenset()


def phase(label: str, do: Action, want: V | tuple[V, ...], within: float, hold: float,
          before: tuple[V, ...] = (), blip: tuple[V, ...] = ()) -> Phase:
    wants = frozenset(cast("tuple[V, ...]", want) if isinstance(want[0], tuple) else [cast(V, want)])
    return Phase(label, do, wants, within, hold, frozenset(before), frozenset(blip))


@dataclass(frozen=True)
class Case:
    name: str
    rows: str  # the rows of the table this case drives
    phases: tuple[Phase, ...]
    hooks: bool = False
    permission_prompt: bool = False  # permissions.defaultMode = "default" (the prompt is back)
    env: Mapping[str, str] = field(default_factory=dict)


# The CLI takes keys; the daemon has seen it through its startup grace.
READY = phase("ready", ready, IDLE, STARTUP_GRACE + EDGE_S, STARTUP_GRACE + 3, before=(STARTING,))


def turns(exit_at_end: bool) -> tuple[Phase, ...]:
    out = [
        READY,
        # Answered over 4 s: a turn longer than a tick is seen active, then closes.
        phase("prompt answered", prompt("[fake:slow] say hello"), ACTIVE, EDGE_S, 3),
        phase("answer done", until_screen("Hello from"), IDLE, EDGE_S, 3),
        # /clear runs a local command: Claude's session file may say busy for an instant
        # (and SessionStart fires with hooks), which is the CLI at work, not a turn hanging.
        phase("/clear", prompt("/clear"), IDLE, EDGE_S, 3, blip=(ACTIVE,)),
        # A new transcript after /clear: the next turn is seen, and its hang too.
        phase("turn after /clear, API never answers", prompt("[fake:never_answer] hang"),
              ON_NETWORK, STALL_S, STALL_AFTER + 8, before=(ACTIVE,)),
        phase("Esc while waiting on the API", interrupt, IDLE, EDGE_S, 9),
    ]
    if exit_at_end:
        out.append(phase("/exit: agent, pane and server gone", prompt("/exit"), EXITED, EDGE_S, 4))
    return tuple(out)


def permission() -> tuple[Phase, ...]:
    return (
        READY,
        phase("permission prompt open", prompt("[fake:tool_bash] run it", wait="Do you want to proceed"),
              AWAITING, EDGE_S, STALL_AFTER + 6, before=(ACTIVE,)),
        # Approved after more than stall_after: the tool runs, silent, with its child alive.
        phase("tool running after approval", keys("Enter"), TOOL, EDGE_S, 14),
        phase("Esc during the tool", interrupt, IDLE, EDGE_S, 8),
    )


ALL_CASES = (
    Case("tui-turns", "answered turn, /clear, never answers, Esc while waiting, exit (zero config)",
         turns(exit_at_end=True)),
    Case("tui-hook-turns", "the same with the README's hooks", turns(exit_at_end=True), hooks=True),
    # Attempts capped at 10 s: the retry the CLI makes after 360 s, in seconds. It writes
    # only an api-request line per attempt (no api_retry in interactive mode).
    Case("tui-retry", "the CLI retries its API call",
         (READY,
          phase("API never answers, the CLI retries", prompt("[fake:never_answer] hang"),
                (RETRYING, ON_NETWORK), STALL_S, STALL_AFTER + 14, before=(ACTIVE,)),
          phase("Esc while retrying", interrupt, IDLE, EDGE_S, 5)),
         env={"API_TIMEOUT_MS": "10000"}),
    Case("tui-permission", "permission prompt, tool after approval, Esc during the tool (zero config)",
         permission(), permission_prompt=True),
    Case("tui-hook-permission", "the same with the README's hooks", permission(), permission_prompt=True,
         hooks=True),
)
# OTELWATCH_TUI_CASES=tui-retry,tui-turns runs only those (while working on one of them).
_ONLY = {n for n in os.environ.get("OTELWATCH_TUI_CASES", "").split(",") if n}
CASES = tuple(c for c in ALL_CASES if not _ONLY or c.name in _ONLY)


# --------------------------------------------------------------------------- running them


@dataclass
class Run:
    case: Case
    tui: Tui
    marks: list[float] = field(default_factory=list)  # when each phase began
    due_from: list[float] = field(default_factory=list)  # when each phase's bound began
    error: str = ""
    done: threading.Event = field(default_factory=threading.Event)

    def drive(self) -> None:
        try:
            for ph in self.case.phases:
                t, due = ph.do(self.tui)
                self.marks.append(t)
                self.due_from.append(due)
                time.sleep(max(0.0, due + ph.hold - time.time()))
        except Exception as exc:  # shown by the test, never fatal to the other runs
            self.error = f"{type(exc).__name__}: {exc}"
        finally:
            self.done.set()


@dataclass
class Suite:
    daemon: Daemon
    runs: dict[str, Run]
    recorder: Recorder
    home: Path

    def wait(self, run: Run, timeout: float = 150.0) -> None:
        run.done.wait(timeout)
        time.sleep(INTERVAL + 1.0)  # the last phase's verdict, seen by the recorder


@pytest.fixture(scope="module")
def suite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Suite]:
    clis = require_real_agents()
    tmp = tmp_path_factory.mktemp("realtui")
    home = tmp / "home"  # the TUIs' HOME and the daemon's: where zero config looks
    # Unix socket paths are short (~107 bytes): the tmux sockets live under a short directory,
    # laid out like tmux's own default ($TMUX_TMPDIR/tmux-UID/NAME), where the daemon looks.
    sock_base = Path(tempfile.mkdtemp(prefix="owt-tui-"))
    sock_dir = sock_base / f"tmux-{os.geteuid()}"
    sock_dir.mkdir(mode=0o700)
    root = tmp / "runs"
    seed_home(home, [root / c.name / "cwd" for c in CASES])
    config = {**DAEMON_CONFIG, "sources": {**DAEMON_CONFIG["sources"],  # type: ignore[dict-item]
                                            "transcripts": {"enabled": True, "home": str(home)}}}
    daemon = start_daemon(tmp / "daemon", config, env={"HOME": str(home), "TMUX_TMPDIR": str(sock_base)})
    runs: dict[str, Run] = {}
    recorder: Recorder | None = None
    threads: list[threading.Thread] = []
    try:
        env = {**claude_env(base_env(home), PORT), "OTELWATCH_STATE_DIR": str(daemon.state_dir)}
        # The hook snippet runs `otelwatch`: where pip put it for this interpreter, first.
        env["PATH"] = os.pathsep.join([sysconfig.get_path("scripts"), env["PATH"]])
        if any(c.hooks for c in CASES) and shutil.which("otelwatch", path=env["PATH"]) is None:
            pytest.fail("`otelwatch` is not on PATH: the README's hook snippet cannot run (pip install -e .)")
        for case in CASES:
            settings: dict[str, object] = {}
            if case.permission_prompt:
                settings["permissions"] = {"defaultMode": "default"}
            if case.hooks:
                settings.update(hooks_settings())
            (root / case.name).mkdir(parents=True, exist_ok=True)
            settings_path = root / case.name / "settings.json"
            settings_path.write_text(json.dumps(settings))
            tui = launch_tui(case.name, clis.claude, root, home=home, sock_dir=sock_dir, port=PORT,
                             args=["--settings", str(settings_path)], env={**env, **case.env}, lifetime=300)
            runs[case.name] = Run(case, tui)
            time.sleep(0.5)  # the CLIs rewrite the shared ~/.claude.json at start: not all at once
        recorder = Recorder(daemon.sessions, [r.tui.launched for r in runs.values()]).start()
        for run in runs.values():
            thread = threading.Thread(target=run.drive, name=f"drive-{run.case.name}", daemon=True)
            thread.start()
            threads.append(thread)
        yield Suite(daemon, runs, recorder, home)
    finally:
        if recorder is not None:
            recorder.stop()
        for run in runs.values():
            run.tui.kill()
        for thread in threads:
            thread.join(timeout=5)
        daemon.stop()
        shutil.rmtree(sock_base, ignore_errors=True)


# --------------------------------------------------------------------------- judging


def judge(run: Run, rows: list[Row], end: float) -> list[str]:
    """What is wrong with one TUI's timeline (empty: every phase conforms)."""
    problems: list[str] = []
    t0 = run.tui.launched.started
    if run.error:
        problems.append(f"driver: {run.error}")
    if not rows:
        return [*problems, "the daemon never listed a session for this TUI"]
    marks = run.marks
    for i, (ph, start) in enumerate(zip(run.case.phases, marks, strict=False)):
        stop = marks[i + 1] if i + 1 < len(marks) else end
        mine = [r for r in rows if start <= r.t < stop]
        prev = run.case.phases[i - 1].want if i else frozenset()
        hit = next((r for r in mine if (r.state, r.reason) in ph.want), None)
        want = " or ".join(f"{s}/{r}" for s, r in sorted(ph.want))
        due = run.due_from[i]
        if hit is None or hit.t > due + ph.within:
            seen = sorted({f"{r.state}/{r.reason}" for r in mine})
            problems.append(f"[{ph.label}] not {want} within {ph.within:g}s of {due - t0:.1f}s "
                            f"({'first at ' + format(hit.t - t0, '.1f') + 's' if hit else 'never'}; seen {seen})")
            continue
        # A phase's allowed blip (the CLI busy for an instant) may come before the verdict the
        # phase wants is first seen (the state before was that verdict already) or after it.
        blips = [r for r in mine if (r.state, r.reason) in ph.blip]
        brief = bool(blips) and blips[-1].t - blips[0].t <= BLIP_S
        early = [r for r in mine if r.t < hit.t and (r.state, r.reason) not in (prev | ph.before | ph.want)
                 and not (brief and (r.state, r.reason) in ph.blip)]
        if early:
            problems.append(f"[{ph.label}] {early[0].state}/{early[0].reason} at {early[0].t - t0:.1f}s "
                            f"before {want}")
        left = [r for r in mine if r.t > hit.t and (r.state, r.reason) not in ph.want
                and not (brief and (r.state, r.reason) in ph.blip)]
        if left:
            problems.append(f"[{ph.label}] left {want} for {left[0].state}/{left[0].reason} at "
                            f"{left[0].t - t0:.1f}s")
    problems.extend(never_stuck_nor_recovered(rows, t0, "a person is the next step"))
    want_rt = ("tmux", run.tui.target)
    first = rows[0].t
    # Once /exit is typed the pane may close a tick before the process is seen gone: the
    # pane is owed until then.
    exiting = next((at for ph, at in zip(run.case.phases, marks, strict=False) if EXITED in ph.want), end)
    wrong_rt = [r for r in rows if r.state != "exited" and first + EDGE_S < r.t < exiting and r.runtime != want_rt]
    if wrong_rt:
        problems.append(f"runtime {wrong_rt[0].runtime} at {wrong_rt[0].t - t0:.1f}s, not the pane {want_rt}")
    return problems


def timeline(run: Run, rows: list[Row]) -> str:
    t0 = run.tui.launched.started
    lines = [f"{run.case.name} ({run.case.rows}); hooks={run.case.hooks}", "phases (time since launch):"]
    for ph, t in zip(run.case.phases, run.marks, strict=False):
        lines.append(f"  {t - t0:6.1f}s  {ph.label} -> {' or '.join(sorted('/'.join(w) for w in ph.want))}")
    lines += ["verdict timeline:", *segments(rows, t0)]
    lines += ["driver marks:", *(f"  {t - t0:6.1f}s {what}" for t, what in run.tui.marks)]
    return "\n".join(lines)


@pytest.mark.parametrize("name", [c.name for c in CASES])
def test_tui_timeline(suite: Suite, name: str) -> None:
    run = suite.runs[name]
    suite.wait(run)
    rows = suite.recorder.rows[name]
    problems = judge(run, rows, end=time.time())
    doubles = [(t, ids) for t, ids in suite.recorder.ids_at_once[name] if len(ids) > 1]
    if doubles:
        problems.append(f"one TUI listed as {len(doubles[0][1])} live sessions: {list(doubles[0][1])}")
    report = timeline(run, rows)
    listed = [s for s in suite.daemon.sessions() if s["session_id"] in run.tui.launched.session_ids]
    for snap in listed:  # what the daemon last folded, as a person debugging this reads it
        t0 = run.tui.launched.started
        report += f"\nlast events of {snap['session_id']} ({snap['state']}/{snap['reason']}):\n" + "\n".join(
            f"  {e['time'] - t0:6.1f}s {e['type']:<22} {e['kind']:<9} {e.get('source', '')} "
            f"{e.get('turn') or ''} {'retry' if e.get('retry') else ''} {e.get('detail', '')}"
            for e in snap.get("recent_events", []))
    if run.case.hooks:
        # Claude runs its hooks inside its own process tree: the hook socket finds the
        # session's root among each hook's ancestors, so every hook event is own (issue 19).
        hooked = [e for snap in listed for e in snap.get("recent_events", []) if e.get("source") == "hook"]
        observed = [e["type"] for e in hooked if not e.get("own")]
        if observed:
            problems.append(f"hook events not own: {observed}")
    print(report)
    assert not problems, ("\n".join(problems) + "\n\n" + report + "\n\nscreen:\n" + run.tui.screen()
                          + f"\n\ndaemon log:\n{suite.daemon.log_tail()}")
