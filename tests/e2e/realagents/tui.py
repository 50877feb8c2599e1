"""The real Claude Code TUI in a tmux pane, in its own network namespace: `Tui`.

Owns: seeding a test HOME so that the CLI's first start asks nothing and
reaches no vendor host (onboarding done, the API key approved by its last 20
characters, the working directory trusted, the auto-mode nudge seen), starting
a tmux server on a private socket inside `unshare -n` next to the fake API
(`by_prompt`: each prompt names its API behaviour), driving the pane with
`send-keys`, reading it with `capture-pane`, reading the CLI's own session file
(`~/.claude/sessions/<pid>.json`), and ending everything it started.

Run inside the namespace as `python3 -m tests.e2e.realagents.tui --socket S --name N --
CLAUDE ARGS...` (the netns runner's command): it starts the tmux server, whose
pane runs the CLI directly (so the pane, and with it the server, ends when the
CLI does), and waits until that server is gone, at most `--lifetime` seconds.

What it must never do: run the CLI anywhere but in a namespace of its own
(see netns.py), touch the developer's own HOME or tmux servers (every tmux
call names the private socket), or leave a process behind.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["API_KEY", "Tui", "claude_env", "hooks_settings", "launch_tui", "seed_home"]

API_KEY = "sk-ant-otelwatch-tests-dummy-key-0123456789"
HOOK_EVENTS = ("UserPromptSubmit", "PreToolUse", "PostToolUse", "Notification", "Stop", "SessionStart",
               "SessionEnd")
WIDTH, HEIGHT = 160, 48
# The input box's prompt character: the CLI is at its input box and takes keys.
INPUT_BOX = re.compile(r"^\s*\u276f", re.MULTILINE)  # U+276F, the heavy angle quote
TMUX_CONF = "set -g focus-events on\nset -g history-limit 2000\nset -g status off\n"


def seed_home(home: Path, cwds: Sequence[Path]) -> None:
    """`~/.claude.json` as a person's would look after the first start: without it the CLI
    shows onboarding and key dialogs and tries to reach its vendor's hosts."""
    home.mkdir(parents=True, exist_ok=True)
    (home / ".claude").mkdir(exist_ok=True)
    state = {
        "hasCompletedOnboarding": True,
        "hasSeenAutoDefaultNudge": True,  # else `defaultMode: default` asks to switch to auto first
        "customApiKeyResponses": {"approved": [API_KEY[-20:]], "rejected": []},
        "projects": {str(c): {"hasTrustDialogAccepted": True, "allowedTools": []} for c in cwds},
    }
    (home / ".claude.json").write_text(json.dumps(state, indent=2))


def hooks_settings(command: str = "otelwatch hook claude") -> dict[str, Any]:
    """The README's hook snippet (README.md, "Claude Code hooks")."""
    hooks: dict[str, Any] = {}
    for name in HOOK_EVENTS:
        entry: dict[str, Any] = {"hooks": [{"type": "command", "command": command}]}
        if name in ("PreToolUse", "PostToolUse"):
            entry = {"matcher": "*", **entry}
        hooks[name] = [entry]
    return {"hooks": hooks}


def claude_env(base: Mapping[str, str], port: int) -> dict[str, str]:
    return {
        **base,
        "TERM": "xterm-256color",
        "ANTHROPIC_BASE_URL": f"http://127.0.0.1:{port}",
        "ANTHROPIC_API_KEY": API_KEY,
        "DISABLE_TELEMETRY": "1",
        "DISABLE_AUTOUPDATER": "1",
        "DISABLE_ERROR_REPORTING": "1",
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
    }


class Tui:
    """One CLI in one tmux pane (session `name` on the private server at `socket`)."""

    def __init__(self, name: str, socket: str, home: Path, cwd: Path, launched: Any) -> None:
        self.name = name
        self.socket = socket
        self.home = home
        self.cwd = cwd
        self.launched = launched  # harness.Launched: the netns runner's tree, its info and API log
        self.marks: list[tuple[float, str]] = []  # (time, what the driver did)

    @property
    def target(self) -> str:
        return f"{self.name}:0.0"

    def tmux(self, *args: str, check: bool = True) -> str:
        out = subprocess.run(["tmux", "-S", self.socket, *args], capture_output=True, timeout=10, check=False)
        if check and out.returncode != 0:
            raise RuntimeError(f"tmux {' '.join(args)}: {out.stderr.decode(errors='replace').strip()}")
        return out.stdout.decode("utf-8", "replace")

    def alive(self) -> bool:
        return subprocess.run(["tmux", "-S", self.socket, "has-session", "-t", self.name], capture_output=True,
                              timeout=10, check=False).returncode == 0

    def screen(self) -> str:
        return self.tmux("capture-pane", "-p", "-t", self.target, check=False)

    def pane_pid(self) -> int | None:
        with contextlib.suppress(RuntimeError, ValueError):
            return int(self.tmux("display-message", "-p", "-t", self.target, "#{pane_pid}").strip())
        return None

    def mark(self, what: str) -> float:
        t = time.time()
        self.marks.append((t, what))
        return t

    def keys(self, *keys: str, what: str = "") -> float:
        """Send keys (tmux key names: Enter, Escape, Down, C-c ...)."""
        self.tmux("send-keys", "-t", self.target, *keys)
        return self.mark(what or "keys " + " ".join(keys))

    def type(self, text: str, what: str = "") -> float:
        """Type `text` into the input box and submit it."""
        self.tmux("send-keys", "-t", self.target, "-l", text)
        time.sleep(0.3)  # the TUI takes a pasted burst as one edit; Enter apart submits it
        self.tmux("send-keys", "-t", self.target, "Enter")
        return self.mark(what or f"typed {text!r}")

    def wait_screen(self, pattern: str | re.Pattern[str], timeout: float = 20.0) -> str:
        """The screen once `pattern` is on it; raises with the screen after `timeout`."""
        rx = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        text = ""
        while time.monotonic() < deadline:
            text = self.screen()
            if rx.search(text):
                return text
            time.sleep(0.2)
        raise AssertionError(f"{self.name}: {rx.pattern!r} not on screen within {timeout:g}s:\n{text}")

    def session_file(self) -> dict[str, Any] | None:
        """The CLI's own `~/.claude/sessions/<pid>.json`, when it has written one."""
        pid = self.pane_pid()
        if pid is None:
            return None
        with contextlib.suppress(OSError, ValueError):
            obj = json.loads((self.home / ".claude" / "sessions" / f"{pid}.json").read_text())
            return obj if isinstance(obj, dict) else None
        return None

    def kill(self) -> None:
        self.tmux("kill-server", check=False)
        self.launched.kill()


def launch_tui(name: str, claude: str, root: Path, *, home: Path, sock_dir: Path, args: Sequence[str] = (),
               env: Mapping[str, str] | None = None, port: int, lifetime: float = 600.0) -> Tui:
    """Start the CLI (`claude ARGS`) in tmux session `name`, beside a by_prompt fake API, in a
    network namespace of its own. The tmux socket is `sock_dir/name` (where the daemon's
    TMUX_TMPDIR layout finds it)."""
    from tests.e2e.realagents.harness import Launched, Scenario, launch_in_netns

    workdir = root / name
    cwd = workdir / "cwd"
    cwd.mkdir(parents=True, exist_ok=True)
    socket = str(sock_dir / name)
    conf = workdir / "tmux.conf"
    conf.write_text(TMUX_CONF)
    server = ["--api", "anthropic", "--behaviour", "by_prompt", "--port", str(port), "--tool-command",
              "python3 -c 'import time; time.sleep(600)'", "--log", str(workdir / "api.log"),
              "--lifetime", str(lifetime)]
    argv = [sys.executable, "-m", "tests.e2e.realagents.tui", "--socket", socket, "--name", name, "--conf", str(conf),
            "--lifetime", str(lifetime), "--", claude, *args]
    info = workdir / "info.json"
    proc = launch_in_netns(argv, server_args=server, env=dict(env or {}), cwd=cwd,
                           stderr_path=workdir / "stderr", info_path=info)
    scenario = Scenario(name, "claude", "by_prompt", expect=None, wrapped=False)  # type: ignore[arg-type]
    return Tui(name, socket, home, cwd, Launched(scenario, proc, workdir, info))


# --------------------------------------------------------------------------- inside the namespace


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tests.e2e.realagents.tui", description="run a command in a private tmux server")
    p.add_argument("--socket", required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--conf", default="/dev/null")
    p.add_argument("--lifetime", type=float, default=600.0)
    p.add_argument("cmd", nargs=argparse.REMAINDER)
    args = p.parse_args(argv)
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        p.error("no command given (-- CMD ...)")
    tmux = ["tmux", "-S", args.socket]
    subprocess.run([*tmux, "-f", args.conf, "new-session", "-d", "-s", args.name, "-x", str(WIDTH),
                    "-y", str(HEIGHT), "--", *cmd], check=True, timeout=20, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + args.lifetime
    while time.monotonic() < deadline:
        gone = subprocess.run([*tmux, "has-session", "-t", args.name], capture_output=True, timeout=10,
                              check=False).returncode != 0
        if gone:
            return 0
        time.sleep(0.5)
    subprocess.run([*tmux, "kill-server"], capture_output=True, timeout=10, check=False)
    return 124


if __name__ == "__main__":
    sys.exit(main())
