"""Gemini CLI, opencode and aider next to their fake APIs: homes, environments and argv.

Owns what each of the three CLIs needs to run one turn against
`tests.e2e.realagents.fakeapi` (`--api gemini` / `--api chat`) with nothing of the
developer's and no vendor host: its settings file in a test HOME, its
environment, and its argv headless or as a TUI. `launch_other` starts a
headless run (stdout piped, as harness.launch does for Claude Code and Codex);
`launch_other_tui` starts the TUI in a private tmux server (tui.py's runner).
Also the helpers both conformance modules share: waiting until a first opencode
has migrated its database, leaving the watchdog's own lag out of a timeline, and
keeping every timeline in a file (OTELWATCH_REAL_TIMELINES).

What it must never do: run a CLI outside a network namespace of its own (every
launch goes through harness.launch_in_netns), or write outside the test HOME
and working directory it is given.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from tests.e2e.realagents.harness import (
    FAKE_PORT,
    Expect,
    Launched,
    Row,
    Scenario,
    agents_dir,
    base_env,
    launch_in_netns,
)

if TYPE_CHECKING:
    from tests.e2e.realagents.tui import Tui

__all__ = [
    "AGENTS",
    "OtherClis",
    "agent_env",
    "headless_argv",
    "keep_timeline",
    "launch_other",
    "launch_other_tui",
    "require_other_agents",
    "seed_other_home",
    "tui_argv",
    "wait_opencode_db",
    "watchdog_lag",
]

AGENTS = ("gemini", "opencode", "aider")
API = {"gemini": "gemini", "opencode": "chat", "aider": "chat"}
MODEL = "fake-model"
KEY = "sk-otelwatch-tests-dummy"
GEMINI_MODEL = "gemini-2.5-flash"  # named: no routing side call before each turn


@dataclass(frozen=True)
class OtherClis:
    gemini: str  # gemini.js, run with node
    opencode: str  # the native binary
    aider: str  # the venv's script


def require_other_agents() -> OtherClis:
    """The three CLIs as scripts/install-real-agents left them; skips locally / fails on CI otherwise."""
    from tests.e2e.realagents.harness import _unavailable

    base = agents_dir() / "bin"
    for name in AGENTS:
        if not (base / name).exists():
            _unavailable(f"no {name} at {base / name} (run scripts/install-real-agents)")
    if shutil.which("node") is None:
        _unavailable("node is not installed (Gemini CLI needs it)")
    return OtherClis(str(base / "gemini"), str(base / "opencode"), str(base / "aider"))


def seed_other_home(home: Path, port: int = FAKE_PORT) -> None:
    """Each CLI's settings in `home` as a user would have them, pointed at the fake API."""
    gem = home / ".gemini"
    gem.mkdir(parents=True, exist_ok=True)
    # Without a selected auth type the CLI exits 41 before any call.
    (gem / "settings.json").write_text(json.dumps({
        # Folder trust off: else headless exits 55 and the TUI opens a trust dialog first.
        "security": {"auth": {"selectedType": "gemini-api-key"}, "folderTrust": {"enabled": False}},
        "privacy": {"usageStatisticsEnabled": False},
        # The current names: older ones (disableAutoUpdate, disableUpdateNag) make every CLI
        # rewrite this file as it starts, and one starting meanwhile reads it empty and exits 52.
        "general": {"enableAutoUpdate": False, "enableAutoUpdateNotification": False},
        "telemetry": {"enabled": False},
    }, indent=2))
    oc = home / ".config" / "opencode"
    oc.mkdir(parents=True, exist_ok=True)
    (oc / "opencode.json").write_text(json.dumps({
        "provider": {"fake": {
            "npm": "@ai-sdk/openai-compatible", "name": "otelwatch fake",
            "options": {"baseURL": f"http://127.0.0.1:{port}/v1", "apiKey": KEY},
            "models": {MODEL: {"name": "fake model"}}}},
        "model": f"fake/{MODEL}",
        "autoupdate": False,
        "share": "disabled",
        "permission": {"bash": "allow", "edit": "allow"},
    }, indent=2))


def agent_env(agent: str, home: Path, port: int = FAKE_PORT) -> dict[str, str]:
    env = base_env(home)
    if agent == "gemini":
        env.update({"GOOGLE_GEMINI_BASE_URL": f"http://127.0.0.1:{port}", "GEMINI_API_KEY": KEY})
    elif agent == "opencode":
        env.update({"OPENCODE_DISABLE_MODELS_FETCH": "1", "OPENCODE_DISABLE_AUTOUPDATE": "1"})
    else:
        env.update({"OPENAI_API_BASE": f"http://127.0.0.1:{port}/v1", "OPENAI_API_KEY": KEY,
                    "LITELLM_LOCAL_MODEL_COST_MAP": "True"})
    return env


AIDER_FLAGS = ("--model", f"openai/{MODEL}", "--no-git", "--yes-always", "--no-check-update",
               "--no-show-model-warnings", "--analytics-disable", "--no-show-release-notes", "--no-pretty")


def headless_argv(agent: str, clis: OtherClis, prompt: str) -> list[str]:
    if agent == "gemini":
        return ["node", clis.gemini, "-m", GEMINI_MODEL, "-p", prompt, "--yolo", "-o", "stream-json"]
    if agent == "opencode":
        return [clis.opencode, "run", "--format", "json", prompt]
    return [clis.aider, *AIDER_FLAGS, "--message", prompt]


def tui_argv(agent: str, clis: OtherClis, prompt: str | None = None) -> list[str]:
    """The TUI, empty or with a first prompt (aider has no such flag: type it)."""
    if agent == "gemini":
        return ["node", clis.gemini, "-m", GEMINI_MODEL, "--yolo", *(("-i", prompt) if prompt else ())]
    if agent == "opencode":
        return [clis.opencode, *(("--prompt", prompt) if prompt else ())]
    return [clis.aider, *(a for a in AIDER_FLAGS if a != "--no-pretty")]


@dataclass(frozen=True)
class OtherScenario:
    name: str
    agent: str
    behaviour: str
    expect: Expect
    tool_command: str = "sleep 600"
    prompt: str = ""
    env: Mapping[str, str] = field(default_factory=dict)
    cli_args: Sequence[str] = ()
    stream_seconds: float = 0.0  # spread a normal answer over this long (seen active before it exits)

    def text(self) -> str:
        return self.prompt or f"otelwatch-realagents {self.name}: say hello"


def launch_other(sc: OtherScenario, clis: OtherClis, root: Path, *, home: Path) -> Launched:
    """Start one headless scenario, bare (zero config), with `home` as its HOME."""
    workdir = root / sc.name
    cwd = workdir / sc.name  # Gemini CLI names its project directory after the cwd's basename
    cwd.mkdir(parents=True, exist_ok=True)
    server = ["--api", API[sc.agent], "--behaviour", sc.behaviour, "--port", str(FAKE_PORT),
              "--tool-command", sc.tool_command, "--stream-seconds", str(sc.stream_seconds),
              "--log", str(workdir / "api.log")]
    env = {**agent_env(sc.agent, home), **sc.env}
    argv = [*headless_argv(sc.agent, clis, sc.text()), *sc.cli_args]
    info = workdir / "info.json"
    proc = launch_in_netns(argv, server_args=server, env=env, cwd=cwd, stderr_path=workdir / "stderr",
                           info_path=info)
    scenario = Scenario(sc.name, sc.agent, sc.behaviour, expect=sc.expect, wrapped=False,
                        tool_command=sc.tool_command)
    return Launched(scenario, proc, workdir, info)


def launch_other_tui(name: str, agent: str, clis: OtherClis, root: Path, *, home: Path, sock_dir: Path,
                     behaviour: str, prompt: str | None = None, tool_command: str = "sleep 600",
                     port: int = FAKE_PORT, lifetime: float = 600.0) -> Tui:
    """The agent's TUI in tmux session `name` (socket `sock_dir/name`), beside its fake API in a
    network namespace of its own; `prompt` goes on the command line where the TUI takes one."""
    from tests.e2e.realagents.tui import TMUX_CONF, Tui

    workdir = root / name
    cwd = workdir / name  # Gemini CLI names its project directory after the cwd's basename
    cwd.mkdir(parents=True, exist_ok=True)
    socket = str(sock_dir / name)
    conf = workdir / "tmux.conf"
    conf.write_text(TMUX_CONF)
    server = ["--api", API[agent], "--behaviour", behaviour, "--port", str(port), "--tool-command", tool_command,
              "--log", str(workdir / "api.log"), "--lifetime", str(lifetime)]
    argv = [sys.executable, "-m", "tests.e2e.realagents.tui", "--socket", socket, "--name", name, "--conf", str(conf),
            "--lifetime", str(lifetime), "--", *tui_argv(agent, clis, prompt)]
    info = workdir / "info.json"
    env = {**agent_env(agent, home, port), "TERM": "xterm-256color", "COLORTERM": "truecolor"}
    proc = launch_in_netns(argv, server_args=server, env=env, cwd=cwd, stderr_path=workdir / "stderr",
                           info_path=info)
    scenario = Scenario(name, agent, behaviour, expect=Expect(), wrapped=False, tool_command=tool_command)
    return Tui(name, socket, home, cwd, Launched(scenario, proc, workdir, info))


def wait_opencode_db(home: Path, timeout: float = 90.0) -> bool:
    """Until the first opencode has created its database (its schema complete and steady for 2 s).

    Several opencode processes starting at once on a fresh HOME race on the schema migration
    (`Failed query: CREATE TABLE ...`, exit 1): the others start once one has migrated it, as
    they would on a machine where opencode has run before. Read-only, never a lock the agent waits on."""
    import sqlite3

    db = home / ".local" / "share" / "opencode" / "opencode.db"
    deadline = time.monotonic() + timeout
    last: tuple[str, ...] = ()
    steady_since = time.monotonic()
    while time.monotonic() < deadline:
        tables: tuple[str, ...] = ()
        if db.exists():
            try:
                with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=0.5)) as conn:
                    tables = tuple(sorted(r[0] for r in conn.execute(
                        "select name from sqlite_master where type = 'table'")))
            except sqlite3.Error:
                tables = ()
        if tables != last:
            last, steady_since = tables, time.monotonic()
        elif "part" in tables and "session" in tables and time.monotonic() - steady_since >= 2.0:
            return True
        time.sleep(0.3)
    return False


def keep_timeline(name: str, problems: Sequence[str], report: str) -> None:
    """OTELWATCH_REAL_TIMELINES=FILE: append every case's verdict and timeline there (for notes and reports)."""
    path = os.environ.get("OTELWATCH_REAL_TIMELINES")
    if path:
        with open(path, "a") as fh:
            fh.write(f"== {name}: {'FAIL ' + '; '.join(problems) if problems else 'pass'}\n{report}\n")


def watchdog_lag(rows: Sequence[Row]) -> tuple[int, list[Row]]:
    """(how many, the rest): rows whose verdict is the watchdog's own lag (`probe_timeout`: the
    daemon could not sample in time on a loaded box), which says nothing about the agent and is
    left out of a timeline's judgement (it is never `stuck`, which is judged on all rows)."""
    rest = [r for r in rows if r.reason != "probe_timeout"]
    return len(rows) - len(rest), rest
