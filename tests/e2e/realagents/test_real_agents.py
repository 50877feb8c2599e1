"""Conformance: the real Claude Code and Codex CLIs, hung on purpose by fake APIs, judged by a real daemon.

All scenarios run at once against one `otelwatch run` (the module takes about
two minutes of wall time): each CLI in its own network namespace next to its
fake API; Claude Code under `otelwatch exec` as a user would wrap it, Codex (and
one Claude Code) bare, so the daemon must find them and their transcripts with
no configuration.
The recorder reads `/api/sessions` every second; each test judges one
scenario's whole verdict timeline against its target (REAL_AGENTS.md) and
prints that timeline, the CLI's stdout and the fake API's log when it fails.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.e2e.realagents.harness import (
    DAEMON_CONFIG,
    Expect,
    Launched,
    Recorder,
    Scenario,
    check,
    cpu_tcp_summary,
    describe,
    launch,
    namespace_tcp,
    require_real_agents,
)
from tests.support.e2e_support import Daemon, start_daemon

# Long enough to see each verdict settle (stall_after 30 s after the CLI's last
# progress, ~8 s into the run when seven CLIs start at once on two cores) and then
# hold for a minute; the drop scenario exits at ~75 s. Longer runs: set the variable.
OBSERVE_S = float(os.environ.get("OTELWATCH_REAL_AGENTS_OBSERVE", "105"))

pytestmark = [pytest.mark.real_agents, pytest.mark.timeout(OBSERVE_S + 120)]

# A command Claude Code runs as a long Bash tool. It refuses `sleep N` on its own
# ("Blocked: standalone sleep"), so the long tool is a Python sleep.
LONG_TOOL = "python3 -c 'import time; time.sleep(600)'"

SCENARIOS = (
    # The answer streams for 20 s so that 5 s ticks see the session active before it exits.
    Scenario("claude-normal", "claude", "normal", stream_seconds=20,
             expect=Expect(seen=("active", "recent_progress"), final=("exited", "process_exited"), rc=0)),
    Scenario("claude-never-answer", "claude", "never_answer",
             expect=Expect(settle=("stalled", "waiting_on_network"), tcp={"ESTABLISHED": 1})),
    Scenario("claude-partial", "claude", "partial_then_silence",
             expect=Expect(settle=("stalled", "waiting_on_network"), tcp={"ESTABLISHED": 1})),
    Scenario("claude-long-tool", "claude", "tool_bash", tool_command=LONG_TOOL, cli_args=("--allowedTools", "Bash"),
             expect=Expect(settle=("long_running", "tool_running"))),
    # 7 retries: attempts after 0.6, 1, 2, 4.5, 9.6, 17, 33 s, error result and exit 1 ~68 s after init.
    Scenario("claude-drop", "claude", "drop", env={"CLAUDE_CODE_MAX_RETRIES": "7"},
             expect=Expect(settle=("stalled", "api_retrying"), final=("exited", "process_exited"), rc=1)),
    Scenario("codex-never-answer", "codex", "never_answer",
             expect=Expect(settle=("stalled", "waiting_on_network"), tcp={"ESTABLISHED": 1})),
    # Most people do not wrap Claude Code: found by name, its transcript (which records each
    # retry as `system/api_error` with `retryInMs`) is all the daemon has.
    Scenario("claude-drop-zero-config", "claude", "drop", env={"CLAUDE_CODE_MAX_RETRIES": "7"}, wrapped=False,
             expect=Expect(settle=("stalled", "api_retrying"), final=("exited", "process_exited"), rc=1)),
)
UNWRAPPED = [s.name for s in SCENARIOS if s.agent == "codex" or not s.wrapped]


@dataclass
class Conformance:
    daemon: Daemon
    runs: dict[str, Launched]
    recorder: Recorder
    home: Path
    started: float
    end: float
    _done: threading.Event

    def wait(self) -> None:
        """Block until the observation window is over (every test judges the whole window)."""
        self._done.wait(max(0.0, self.end - time.time()))
        self._done.set()


@pytest.fixture(scope="module")
def conformance(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Conformance]:
    clis = require_real_agents()
    tmp = tmp_path_factory.mktemp("realagents")
    home = tmp / "home"  # the daemon's HOME, and the bare CLIs': where zero config looks for transcripts
    home.mkdir()
    daemon = start_daemon(tmp / "daemon", DAEMON_CONFIG, env={"HOME": str(home)})
    runs: dict[str, Launched] = {}
    recorder: Recorder | None = None
    try:
        started = time.time()
        for scenario in SCENARIOS:
            runs[scenario.name] = launch(scenario, clis, tmp / "runs", state_dir=daemon.state_dir,
                                         registry_dir=daemon.registry, shared_home=home)
        recorder = Recorder(daemon.sessions, runs.values()).start()
        yield Conformance(daemon, runs, recorder, home, started, started + OBSERVE_S, threading.Event())
    finally:
        if recorder is not None:
            recorder.stop()
        for run in runs.values():
            run.kill()
        daemon.stop()


@pytest.mark.parametrize("name", [s.name for s in SCENARIOS])
def test_verdict_timeline(conformance: Conformance, name: str) -> None:
    conformance.wait()
    run = conformance.runs[name]
    rows = conformance.recorder.rows[name]
    problems = check(run, rows, conformance.recorder.ids_at_once[name], observed_until=conformance.end)
    report = describe(run, rows, conformance.recorder)
    print(f"{report}\n{cpu_tcp_summary(rows)}")
    assert not problems, "\n".join(problems) + "\n\n" + report + f"\n\ndaemon log:\n{conformance.daemon.log_tail()}"


def test_one_session_per_cli_and_no_companions(conformance: Conformance) -> None:
    """Each CLI is one session on its root process (claude; Codex's node wrapper), never
    the netns runner, the fake API, otelwatch exec, Codex's native child or a tool's children."""
    conformance.wait()
    problems = []
    for name, run in conformance.runs.items():
        rows = conformance.recorder.rows[name]
        root = run.agent_root()
        ids = sorted({r.session_id for r in rows})
        pids = sorted({r.pid for r in rows if r.pid is not None})
        if root is not None and pids != [root]:
            problems.append(f"{name}: sessions on pids {pids}, the CLI's root is {root} (ids {ids})")
        if len(ids) > 1:
            problems.append(f"{name}: listed under {len(ids)} ids over the run: {ids}")
    assert not problems, "\n".join(problems)


def test_tcp_counts_are_the_agents_own(conformance: Conformance) -> None:
    """The agents' sockets live in their own namespaces, where the fake API's end of the
    connection and its listener sit beside the agent's: the daemon must count only the
    agent's own socket (1 ESTABLISHED), not the namespace's table (2 ESTABLISHED + LISTEN)."""
    conformance.wait()
    checked = 0
    for name, run in conformance.runs.items():
        want = run.scenario.expect.tcp
        root = run.agent_root()
        rows = conformance.recorder.rows[name]
        if want is None or root is None or not rows or rows[-1].state == "exited":
            continue
        whole = namespace_tcp(root)
        assert whole.get("ESTABLISHED", 0) >= 2 and whole.get("LISTEN", 0) >= 1, (name, whole)
        assert dict(rows[-1].tcp) == dict(want), (name, rows[-1].tcp, whole)
        checked += 1
    assert checked >= 2, "no scenario held its connection open to the end of the window"


@pytest.mark.parametrize("name", UNWRAPPED)
def test_zero_config_finds_the_transcript(conformance: Conformance, name: str) -> None:
    """A CLI that is neither wrapped nor registered is found by process discovery, and
    its transcript (~/.codex/sessions/..., ~/.claude/projects/...) becomes its event stream."""
    conformance.wait()
    run = conformance.runs[name]
    rows = conformance.recorder.rows[name]
    assert rows, describe(run, rows, conformance.recorder)
    agent = "codex" if run.scenario.agent == "codex" else "claude-code"
    assert {r.source for r in rows} == {"process"}, {r.source for r in rows}
    pattern = ".codex/sessions/*/*/*/rollout-*.jsonl" if agent == "codex" else ".claude/projects/*/*.jsonl"
    transcripts = sorted(conformance.home.glob(pattern))
    assert transcripts, f"{name} wrote no transcript matching ~/{pattern}"
    # Events only come from the transcript: nothing else feeds a discovered session.
    assert max(r.events for r in rows) > 0, f"{name}: no events, so its transcript was not matched ({transcripts})"
