"""ProcessMatcher: what a process runs, user patterns, and a live scan of real processes.

The live test builds fake agents laid out like the real installs: a copy of
/bin/sleep at `node_modules/@anthropic-ai/claude-code/bin/claude` is a native
`claude`, and Python scripts at `.../@openai/codex/bin/codex.js` or
`claude-code-router/dist/cli.js` run by a program named `node` (a symlink to
this Python) are node scripts. The corpus of command lines is in
test_discovery_corpus.py.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest

from otelwatch.config import DEFAULT_AGENTS
from otelwatch.model import Mode, SessionSpec
from otelwatch.probe.proctable import ProcessTableReader
from otelwatch.sources.processes import ProcessMatcher, program_of
from tests.support.procs import Spawner, require_binary, wait_for

NOT_SELF = -1  # tests' agents are children of pytest; do not exclude pytest's descendants

# Starts the argvs in $CHILDREN (a JSON list), says "ready", then waits to be killed.
SPAWNER = """\
import json, os, subprocess, sys, time
for argv in json.loads(os.environ.pop("CHILDREN", "[]")):
    subprocess.Popen(argv)
print("ready", flush=True)
time.sleep(120)
"""


def test_program_of_interpreters() -> None:
    p = program_of("node", ["node", "--max-old-space-size=4096", "-r", "dotenv/config",
                            "/usr/lib/node_modules/@openai/codex/bin/codex.js", "exec", "hi"])
    assert (p.script, p.package, p.args) == ("/usr/lib/node_modules/@openai/codex/bin/codex.js", "@openai/codex",
                                             ("exec", "hi"))
    assert program_of("python3", ["python3", "-u", "-X", "dev", "-m", "aider", "--yes"]).module == "aider"
    assert program_of("bun", ["bun", "run", "/x/node_modules/pkg/cli.ts"]).package == "pkg"
    assert program_of("node", ["node", "/x/node_modules/.bin/claude"]).package is None  # a shim: named by its file
    # Inline code and shells running a command line name no script.
    for argv in (["python3", "-c", "import claude"], ["bash", "-lc", "claude"], ["sh", "-c", "claude -p x"],
                 ["node", "-e", "1"], ["python3"]):
        p = program_of(argv[0], argv)
        assert p.interpreted and p.script is None and p.module is None, argv
    # A binary's arguments are never its name; comm counts (a shebang script, an exec).
    p = program_of("vim", ["/usr/bin/vim", "claude"])
    assert (p.exe, p.script, p.interpreted, p.names) == ("vim", None, False, ("vim",))
    assert program_of("node", ["node", "/home/u/src/my-agent/dist/cli.js"]).names == (
        "node", "cli.js", "cli", "my-agent")


def test_builtin_names_and_labels() -> None:
    m = ProcessMatcher(DEFAULT_AGENTS, self_pid=NOT_SELF)
    assert m.match("claude", ["claude"]) == "claude-code"
    assert m.match("codex", ["/opt/codex/codex", "exec", "x"]) == "codex"
    assert m.match("claude", ["claude", "mcp", "serve"]) is None
    assert ProcessMatcher(["claude-code"], self_pid=NOT_SELF).match("claude", ["claude"]) == "claude-code"
    # Only the built-ins configured are recognised.
    assert ProcessMatcher(["codex"], self_pid=NOT_SELF).match("claude", ["claude"]) is None


def test_user_patterns_are_anchored() -> None:
    plain = ProcessMatcher(["my-agent"], self_pid=NOT_SELF)
    assert plain.match("my-agent", ["/opt/bin/my-agent", "--fast"]) == "my-agent"
    assert plain.match("node", ["node", "/home/u/src/my-agent/dist/cli.js"]) == "my-agent"
    assert plain.match("node", ["node", "/srv/node_modules/@acme/my-agent/index.js"]) == "my-agent"
    assert plain.match("python3", ["python3", "my-agent.py"]) == "my-agent"
    for comm, argv in [("my-agent-monitor", ["my-agent-monitor"]), ("vim", ["vim", "my-agent"]),
                       ("python3", ["python3", "check-my-agent.py"])]:
        assert plain.match(comm, argv) is None, argv
    # A plain name is literal: the dot is not "any character".
    assert ProcessMatcher(["a.b"], self_pid=NOT_SELF).match("axb", ["axb"]) is None

    regex = ProcessMatcher([r"my-?agent\d*"], self_pid=NOT_SELF)
    assert regex.match("myagent7", ["myagent7"]) == "myagent7"
    assert regex.match("myagent7x", ["myagent7x"]) is None
    assert ProcessMatcher([r"claude|cursor-agent"], self_pid=NOT_SELF).match("claude", ["claude"]) == "claude-code"


def test_cmdline_patterns_search_the_whole_command_line() -> None:
    m = ProcessMatcher([r"cmdline:--role[= ]worker"], self_pid=NOT_SELF)
    assert m.match("python3", ["python3", "/srv/bot/run.py", "--role", "worker"]) == "run"
    assert m.match("python3", ["python3", "/srv/bot/run.py", "--role", "boss"]) is None
    named = ProcessMatcher([r"cmdline:\bbots/(?P<agent>\w+)\.py\b"], self_pid=NOT_SELF)
    assert named.match("python3", ["python3", "/srv/bots/triage.py"]) == "triage"
    # Patterns are tried in order: the first that matches names the agent.
    both = ProcessMatcher([r"cmdline:--as-(?P<agent>\w+)", "claude"], self_pid=NOT_SELF)
    assert both.match("claude", ["claude", "--as-reviewer"]) == "reviewer"
    assert both.match("claude", ["claude"]) == "claude-code"


@pytest.mark.parametrize("pattern, error", [
    ("", "non-empty"),
    (".*", "every process"),
    ("a*", "every process"),
    ("cmdline:", "every process"),
    ("cmdline:x?", "every process"),
    ("(unclosed", "bad regular expression"),
    ("cmdline:[z-a]", "bad regular expression"),
])
def test_bad_patterns_are_refused_by_index(pattern: str, error: str) -> None:
    with pytest.raises(ValueError, match=rf"sources\.processes\.match\[1\]: .*{error}"):
        ProcessMatcher(["claude", pattern], self_pid=NOT_SELF)


def sessions_in(matcher: ProcessMatcher, roots: list[int]) -> list[SessionSpec]:
    """Specs inside the trees of `roots` (other agents on the host are ignored)."""
    table = ProcessTableReader().read()
    ours = {pid for r in roots for pid in (r, *table.descendants(r))}
    return [s for s in matcher.scan(table) if s.pid in ours]


def test_live_scan_finds_exactly_the_agents(spawn: Spawner, tmp_path: Path) -> None:
    bash, sleep = require_binary("bash"), require_binary("sleep")
    node = tmp_path / "bin" / "node"
    vim = tmp_path / "bin" / "vim"  # a program named vim, run on a file named CLAUDE.md
    node.parent.mkdir()
    node.symlink_to(sys.executable)
    vim.symlink_to(sys.executable)
    nm = tmp_path / "lib" / "node_modules"

    def binary(rel: str) -> str:
        path = nm / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(sleep, path)
        return str(path)

    def script(path: Path) -> str:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(SPAWNER)
        return str(path)

    claude = binary("@anthropic-ai/claude-code/bin/claude")
    codex = binary("@openai/codex/node_modules/@openai/codex-linux-x64/vendor/x86_64-unknown-linux-musl/codex/codex")
    claude_cli = script(nm / "@anthropic-ai/claude-code/cli.js")
    codex_js = script(nm / "@openai/codex/bin/codex.js")
    router = script(tmp_path / "claude-code-router" / "dist" / "cli.js")
    orchestrator = script(tmp_path / "orchestrate.py")
    check = script(tmp_path / "check_codex.py")
    claude_md = script(tmp_path / "CLAUDE.md")
    monitor, mcp = binary("claude-monitor/claude-monitor"), binary("codex-mcp-server/codex-mcp-server")

    def run(*argv: str, children: list[list[str]] | None = None) -> int:
        env = {**os.environ, "CHILDREN": json.dumps(children or [])}
        return spawn(*argv, fake=False, ready=argv[-1] != "60", env=env).pid

    orch = run(sys.executable, orchestrator, children=[[claude, "60"]])
    rout = run(str(node), router, "start", children=[[claude, "60"]])
    wrapper = run(str(node), codex_js, "exec", "--json", "hi", children=[[codex, "60"]])
    agent = run(str(node), claude_cli, children=[[bash, "-c", f"{claude} 60; true"]])
    others = [run(monitor, "60"), run(sys.executable, check), run(mcp, "60"), run(str(vim), claude_md)]
    roots = [orch, rout, wrapper, agent, *others]

    def settled() -> bool:
        table = ProcessTableReader().read()
        procs = [table.get(p) for r in roots for p in (r, *table.descendants(r))]
        comms = [p.comm for p in procs if p is not None]
        return len(comms) == 13 and comms.count("claude") == 3 and comms.count("codex") == 1

    wait_for(settled)
    table = ProcessTableReader().read()
    specs = sessions_in(ProcessMatcher(DEFAULT_AGENTS, self_pid=NOT_SELF), roots)
    got = {(s.pid, s.agent, s.mode) for s in specs}
    assert got == {
        (table.children(orch)[0], "claude-code", Mode.INTERACTIVE),  # an orchestrator's agent is its own session
        (table.children(rout)[0], "claude-code", Mode.INTERACTIVE),  # so is a router's
        (wrapper, "codex", Mode.HEADLESS),  # node wrapper + native codex: one session
        (agent, "claude-code", Mode.INTERACTIVE),  # claude -> bash -> claude: one session
    }
    assert table.get(agent) is not None and table.get(agent).comm == "node"  # type: ignore[union-attr]


def test_never_matches_itself_or_its_children(spawn: Spawner, tmp_path: Path) -> None:
    claude = tmp_path / "claude"
    shutil.copy(require_binary("sleep"), claude)
    proc = spawn(str(claude), "60", fake=False)
    wait_for(lambda: (info := ProcessTableReader().read().get(proc.pid)) and info.comm == "claude")
    assert sessions_in(ProcessMatcher(["claude"], self_pid=NOT_SELF), [proc.pid])
    # The same agent, seen by a matcher that runs as our process: it is our child.
    assert sessions_in(ProcessMatcher(["claude"], self_pid=os.getpid()), [proc.pid]) == []
    # And the agent process itself as the matcher's own process.
    assert sessions_in(ProcessMatcher(["claude"], self_pid=proc.pid), [proc.pid]) == []
