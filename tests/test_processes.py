"""ProcessMatcher against real processes in the real process table.

A real `node .../claude-code/cli.js` is not installed here, so the agent is a
Python script at `<tmp>/lib/node_modules/@anthropic-ai/claude-code/cli.js`:
python counts as an interpreter exactly like node, so the same rule (a
generic entry point is named by its package directory) is exercised. A
second variant runs it with argv[0] set to "node" via bash's `exec -a`.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from procs import Spawner, require_binary, wait_for

from otelwatch.config import DEFAULT_AGENTS
from otelwatch.model import Mode
from otelwatch.proctable import ProcessTableReader
from otelwatch.sources.processes import ProcessMatcher, process_names

AGENT_SCRIPT = """\
import subprocess, sys, time
if "--child" not in sys.argv:
    # A Bash-tool-like subtree: another process that matches, and an unrelated one.
    subprocess.Popen([sys.executable, __file__, "--child"])
    subprocess.Popen(["sleep", "60"])
print("ready", flush=True)
time.sleep(60)
"""

NOT_SELF = -1  # tests' agents are children of pytest; do not exclude pytest's descendants


@pytest.fixture
def cli_js(tmp_path: Path) -> Path:
    pkg = tmp_path / "lib" / "node_modules" / "@anthropic-ai" / "claude-code"
    pkg.mkdir(parents=True)
    script = pkg / "cli.js"
    script.write_text(AGENT_SCRIPT)
    return script


def sessions_for(matcher: ProcessMatcher, root_pid: int) -> list:
    """Specs whose root is root_pid or inside its tree (other agents on the host are ignored)."""
    table = ProcessTableReader().read()
    tree = {root_pid, *table.descendants(root_pid)}
    return [s for s in matcher.scan(table) if s.pid in tree]


def test_names_of_interpreted_agents() -> None:
    assert "claude-code" in process_names(
        "node", ["node", "/usr/lib/node_modules/@anthropic-ai/claude-code/cli.js", "-p", "x"])
    assert "codex" in process_names("node", ["node", "/usr/local/bin/codex", "exec", "hi"])
    assert "aider" in process_names("python3", ["/usr/bin/python3", "-u", "/home/u/.local/bin/aider"])
    assert "aider" in process_names("python3", ["python3", "-m", "aider", "--yes"])
    # Arguments of non-interpreters and inline code never name the process.
    assert process_names("grep", ["grep", "claude", "notes.md"]) == ["grep"]
    assert not any("claude" in n for n in process_names("python3", ["python3", "-c", "print('claude')"]))
    assert not any("claude" in n for n in process_names("vim", ["vim", "claude.md"]))


def test_matcher_on_names() -> None:
    m = ProcessMatcher(DEFAULT_AGENTS, self_pid=NOT_SELF)
    assert m.match("claude", ["claude"]) == "claude-code"
    assert m.match("codex", ["/opt/codex/codex", "exec", "x"]) == "codex"
    assert m.match("grep", ["grep", "claude"]) is None
    assert m.match("bash", ["bash", "-c", "claude -p hi"]) is None  # the shell is not the agent
    assert ProcessMatcher([r"my-?agent\d*"], self_pid=NOT_SELF).match("myagent7", ["myagent7"]) == "myagent7"


def test_interpreted_agent_tree_is_one_session(spawn: Spawner, cli_js: Path) -> None:
    proc = spawn(sys.executable, str(cli_js), "-p", "do it", fake=False, ready=True)
    matcher = ProcessMatcher(DEFAULT_AGENTS, self_pid=NOT_SELF)
    table = ProcessTableReader().read()
    wait_for(lambda: len(ProcessTableReader().read().descendants(proc.pid)) >= 2)
    specs = sessions_for(matcher, proc.pid)
    assert [s.pid for s in specs] == [proc.pid], "the matching child belongs to its agent root"
    spec = specs[0]
    info = table.get(proc.pid)
    assert info is not None
    assert spec.agent == "claude-code" and spec.source == "process" and spec.mode is Mode.HEADLESS
    assert spec.session_id == f"claude-code-{proc.pid}-{int(info.create_time)}"
    assert spec.create_time == info.create_time


def test_argv0_node_and_interactive_mode(spawn: Spawner, cli_js: Path) -> None:
    bash = require_binary("bash")
    # With argv[0] "node", Python cannot find its own prefix from argv[0]: tell it.
    env = {**os.environ, "PYTHONHOME": sys.base_prefix}
    proc = spawn(bash, "-c", f'exec -a node "{sys.executable}" "{cli_js}"', fake=False, ready=True, env=env)
    specs = sessions_for(ProcessMatcher(["claude"], self_pid=NOT_SELF), proc.pid)
    assert [s.pid for s in specs] == [proc.pid]
    assert ProcessTableReader().read().cmdline(proc.pid)[0] == "node"
    assert specs[0].mode is Mode.INTERACTIVE


def test_unrelated_process_with_agent_word_in_args_not_matched(spawn: Spawner) -> None:
    proc = spawn("sh", "-c", "sleep 30; true", "claude", fake=False)
    wait_for(lambda: ProcessTableReader().read().descendants(proc.pid))
    assert sessions_for(ProcessMatcher(DEFAULT_AGENTS, self_pid=NOT_SELF), proc.pid) == []


def test_never_matches_itself_or_its_children(spawn: Spawner, cli_js: Path) -> None:
    proc = spawn(sys.executable, str(cli_js), fake=False, ready=True)
    assert sessions_for(ProcessMatcher(["claude"], self_pid=NOT_SELF), proc.pid)
    # The same agent, seen by a matcher that runs as our process: it is our child.
    assert sessions_for(ProcessMatcher(["claude"], self_pid=os.getpid()), proc.pid) == []
    # And the agent process itself as the matcher's own process.
    assert sessions_for(ProcessMatcher(["claude"], self_pid=proc.pid), proc.pid) == []
