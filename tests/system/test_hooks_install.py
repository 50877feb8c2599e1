"""`otelwatch hooks install|uninstall claude` on real settings files."""

from __future__ import annotations

import fcntl
import io
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from otelwatch.commands.hooks_install import HOOK_EVENTS, hook_command, hooks_main, is_ours
from tests.support.procs import REPO

CMD = "/opt/venv/bin/otelwatch hook claude"
THEIRS: dict[str, Any] = {
    "model": "opus",
    "permissions": {"allow": ["Bash(npm test)"]},
    "hooks": {
        "PreToolUse": [{"matcher": "Bash", "hooks": [{"type": "command", "command": "/usr/local/bin/audit-bash"}]}],
        "Stop": [{"hooks": [{"type": "command", "command": "notify-send done"}]}],
    },
}


def write_settings(path: Path, data: object) -> bytes:
    # Claude Code writes its settings as 2-space JSON, which is what the installer writes back.
    raw = (json.dumps(data, indent=2) + "\n").encode()
    path.write_bytes(raw)
    return raw


def run(action: str, path: Path, tmp_path: Path, *extra: str, command: str = CMD) -> tuple[int, str]:
    out = io.StringIO()
    env = {"HOME": str(tmp_path), "OTELWATCH_STATE_DIR": str(tmp_path / "state"), "PATH": os.environ["PATH"]}
    rc = hooks_main(action, "claude", settings=str(path), dry_run="--dry-run" in extra, environ=env,
                    command=command, out=out)
    return rc, out.getvalue()


def our_handlers(settings: dict) -> dict[str, list[str]]:
    return {event: [h["command"] for g in groups for h in g["hooks"] if is_ours(h)]
            for event, groups in settings.get("hooks", {}).items()}


def test_install_keeps_everything_else_twice_is_once_and_uninstall_is_exact(tmp_path: Path) -> None:
    path = tmp_path / "settings.json"
    original = write_settings(path, THEIRS)

    rc, out = run("install", path, tmp_path)
    assert rc == 0
    assert f"+            \"command\": \"{CMD}\"," in out and "(before)" in out and "(after)" in out
    after = json.loads(path.read_text())
    assert after["model"] == "opus" and after["permissions"] == THEIRS["permissions"]
    # Their own hooks are still there, first, untouched.
    assert after["hooks"]["PreToolUse"][0] == THEIRS["hooks"]["PreToolUse"][0]
    assert after["hooks"]["Stop"][0] == THEIRS["hooks"]["Stop"][0]
    assert our_handlers(after) == {event: [CMD] for event, _ in HOOK_EVENTS} | {"PreToolUse": [CMD], "Stop": [CMD]}
    assert {g.get("matcher") for g in after["hooks"]["PostToolUse"]} == {"*"}
    assert (tmp_path / "settings.json.otelwatch-backup").read_bytes() == original
    once = path.read_bytes()

    rc, out = run("install", path, tmp_path)
    assert rc == 0 and "already installed; nothing to change" in out and "+" not in out.split("\n")[0]
    assert path.read_bytes() == once

    rc, out = run("uninstall", path, tmp_path)
    assert rc == 0 and "removed (9 change(s))" in out
    assert path.read_bytes() == original
    rc, out = run("uninstall", path, tmp_path)
    assert rc == 0 and "not installed; nothing to change" in out and path.read_bytes() == original


def test_dry_run_writes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "settings.json"
    original = write_settings(path, THEIRS)
    before = path.stat()
    rc, out = run("install", path, tmp_path, "--dry-run")
    assert rc == 0 and "dry run:" in out and f'"command": "{CMD}"' in out
    assert path.read_bytes() == original and path.stat().st_mtime_ns == before.st_mtime_ns
    assert sorted(p.name for p in tmp_path.iterdir()) == ["settings.json"]  # no backup, no temp file


def test_a_bare_otelwatch_hook_is_pointed_at_the_absolute_path(tmp_path: Path) -> None:
    path = tmp_path / "settings.json"
    write_settings(path, {"hooks": {"Stop": [{"hooks": [{"type": "command", "command": "otelwatch hook claude"}]}]}})
    rc, out = run("install", path, tmp_path)
    assert rc == 0 and "\"command\": \"otelwatch hook claude\"" in out
    stop = json.loads(path.read_text())["hooks"]["Stop"]
    assert stop == [{"hooks": [{"type": "command", "command": CMD}]}]  # in place, not a second handler


def test_new_file_symlink_mode_and_claude_config_dir(tmp_path: Path) -> None:
    conf = tmp_path / "claude-conf"
    conf.mkdir()
    dotfiles = tmp_path / "dotfiles.json"
    write_settings(dotfiles, {"theme": "dark"})
    os.chmod(dotfiles, 0o640)
    (conf / "settings.json").symlink_to(dotfiles)
    out = io.StringIO()
    env = {"HOME": str(tmp_path), "CLAUDE_CONFIG_DIR": str(conf), "OTELWATCH_STATE_DIR": str(tmp_path / "s"),
           "PATH": os.environ["PATH"]}
    assert hooks_main("install", "claude", environ=env, command=CMD, out=out) == 0
    assert (conf / "settings.json").is_symlink()  # written through the link, which stays
    assert json.loads(dotfiles.read_text())["theme"] == "dark" and dotfiles.stat().st_mode & 0o777 == 0o640
    fresh = tmp_path / "new" / "settings.json"
    rc, _ = run("install", fresh, tmp_path)
    assert rc == 0 and set(json.loads(fresh.read_text())) == {"hooks"}
    assert fresh.stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"hooks": []}', '{"hooks": {"Stop": {}}}'])
def test_a_file_it_cannot_read_is_left_alone(tmp_path: Path, content: str) -> None:
    path = tmp_path / "settings.json"
    path.write_text(content)
    rc, out = run("install", path, tmp_path)
    assert rc == 2 and "nothing changed" in out and path.read_text() == content


def test_it_says_whether_a_daemon_will_see_the_events(tmp_path: Path) -> None:
    path = tmp_path / "settings.json"
    write_settings(path, {})
    rc, out = run("install", path, tmp_path, "--dry-run")
    state = tmp_path / "state"
    # Other daemons on this host (of other tests) use other state directories: named as such.
    assert rc == 0 and (f"no otelwatch daemon is running with state directory {state}" in out
                        or f"not use {state} (pid " in out), out
    assert "ok: a daemon" not in out
    # A daemon holds its state directory's lock while it runs: hold it as one would.
    (tmp_path / "state").mkdir()
    fd = os.open(tmp_path / "state" / "otelwatch.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        rc, out = run("install", path, tmp_path, "--dry-run")
        assert f"ok: a daemon is running with state directory {tmp_path / 'state'}" in out
    finally:
        os.close(fd)


def test_the_installed_command_runs_without_otelwatch_on_path(tmp_path: Path) -> None:
    # Through the real CLI, as a person runs it; then the command it wrote, run by a shell as
    # Claude Code runs hooks, with a PATH that has no otelwatch on it.
    path = tmp_path / "settings.json"
    write_settings(path, THEIRS)
    env = {**os.environ, "PYTHONPATH": str(REPO), "HOME": str(tmp_path), "OTELWATCH_STATE_DIR": str(tmp_path / "st")}
    r = subprocess.run([sys.executable, "-m", "otelwatch", "hooks", "install", "claude", "--settings", str(path)],
                       capture_output=True, env=env, cwd=REPO, timeout=60, check=False, text=True)
    assert r.returncode == 0, r.stderr
    command = json.loads(path.read_text())["hooks"]["UserPromptSubmit"][0]["hooks"][0]["command"]
    assert command == hook_command() and os.path.isabs(shlex.split(command)[0])
    payload = json.dumps({"session_id": "inst-1", "hook_event_name": "UserPromptSubmit"}).encode()
    hook_env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "OTELWATCH_STATE_DIR": str(tmp_path / "st")}
    done = subprocess.run(["/bin/sh", "-c", command], input=payload, capture_output=True, env=hook_env,
                          timeout=60, check=False)
    assert done.returncode == 0 and done.stdout == b"", done.stderr
    [record] = [json.loads(line) for line in (tmp_path / "st" / "events" / "inst-1.jsonl").read_text().splitlines()]
    assert record["type"] == "UserPromptSubmit" and record["turn"] == "open"
