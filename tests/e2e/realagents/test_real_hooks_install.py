"""`otelwatch hooks install claude` against the real Claude Code: the settings it writes are
read by the CLI, every otelwatch hook fires through the absolute path with no `otelwatch`
on PATH, and the user's own hook beside them still fires.

Claude Code runs headless (`claude -p`) next to the fake API in its own network
namespace (netns.py), asking for one Bash tool call (`tool_bash`).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.realagents.harness import (
    FAKE_PORT,
    REPO,
    Expect,
    Launched,
    Scenario,
    base_env,
    launch_in_netns,
    require_real_agents,
)

pytestmark = pytest.mark.real_agents


def test_installed_hooks_fire_in_the_real_cli(tmp_path: Path) -> None:
    clis = require_real_agents()
    home, state = tmp_path / "home", tmp_path / "state"
    (home / ".claude").mkdir(parents=True)
    audit = tmp_path / "audit.log"
    settings = home / ".claude" / "settings.json"
    # The user's own settings, with a hook of their own on PreToolUse.
    theirs: dict[str, Any] = {"env": {"OTW_HOP_MARK": "1"}, "hooks": {"PreToolUse": [{"matcher": "Bash", "hooks": [
        {"type": "command", "command": f"cat >> {audit}"}]}]}}
    settings.write_text(json.dumps(theirs, indent=2) + "\n")
    env = {**base_env(home), "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-m", "otelwatch", "hooks", "install", "claude"], capture_output=True,
                       text=True, env={**env, "OTELWATCH_STATE_DIR": str(state)}, cwd=REPO, timeout=60, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    installed = json.loads(settings.read_text())
    assert installed["env"] == theirs["env"] and installed["hooks"]["PreToolUse"][0] == theirs["hooks"]["PreToolUse"][0]

    scenario = Scenario("hooks-install", "claude", "tool_bash", Expect(rc=0), tool_command="echo hooked")
    workdir = tmp_path / "run"
    (workdir / "cwd").mkdir(parents=True)
    claude_env = {
        **env,
        "PATH": "/usr/local/bin:/usr/bin:/bin",  # no otelwatch here: the absolute path must carry it
        "ANTHROPIC_BASE_URL": f"http://127.0.0.1:{FAKE_PORT}",
        "ANTHROPIC_API_KEY": "sk-ant-otelwatch-tests-dummy",
        "DISABLE_TELEMETRY": "1", "DISABLE_AUTOUPDATER": "1", "DISABLE_ERROR_REPORTING": "1",
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
        "OTELWATCH_STATE_DIR": str(state),
    }
    argv = [clis.claude, "-p", "otelwatch-realagents hooks-install: run it", "--output-format", "stream-json",
            "--verbose", "--allowedTools", "Bash"]
    server = ["--api", "anthropic", "--behaviour", "tool_bash", "--port", str(FAKE_PORT),
              "--tool-command", scenario.tool_command, "--stream-seconds", "0", "--log", str(workdir / "api.log")]
    info = workdir / "info.json"
    proc = launch_in_netns(argv, server_args=server, env=claude_env, cwd=workdir / "cwd",
                           stderr_path=workdir / "stderr", info_path=info)
    run = Launched(scenario, proc, workdir, info)
    try:
        deadline = time.monotonic() + 120
        while run.rc is None and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        run.kill()
    stderr = run.stderr_tail()
    assert run.rc == 0, stderr
    assert "not found" not in stderr and "hook failed" not in stderr.lower(), stderr
    spools = list((state / "events").glob("*.jsonl"))
    assert len(spools) == 1, spools
    records = [json.loads(line) for line in spools[0].read_text().splitlines()]
    types = [rec["type"] for rec in records]
    print(f"\nhook records from the real CLI: {types}")
    for name in ("SessionStart", "UserPromptSubmit", "PreToolUse", "PostToolUse", "Stop", "SessionEnd"):
        assert name in types, (name, types)
    pre = next(rec for rec in records if rec["type"] == "PreToolUse")
    assert pre["tool"] == "Bash" and pre["tool_call"] == "open" and pre["agent"] == "claude-code"
    assert audit.exists() and '"tool_name":"Bash"' in audit.read_text().replace(" ", "")  # theirs fired too
