"""Where a discovered agent keeps its transcripts (otelwatch/sources/agent_dirs.py): its
own CLAUDE_CONFIG_DIR, CODEX_HOME or HOME, read from a real process's environment;
never a directory another user owns; a configured home wins.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from otelwatch.sources.agent_dirs import AgentDirResolver, AgentDirs, dirs_from, read_environ
from otelwatch.sources.transcripts import TranscriptLocator
from tests.support.procs import wait_for


def test_dirs_from_the_environment() -> None:
    default = Path("/home/otelwatch")
    assert dirs_from({}, default) == AgentDirs(default / ".claude", default / ".codex")
    assert dirs_from({"HOME": "/home/ann"}, default) == AgentDirs(Path("/home/ann/.claude"),
                                                                   Path("/home/ann/.codex"))
    env = {"HOME": "/home/ann", "CLAUDE_CONFIG_DIR": "/srv/claude", "CODEX_HOME": "/srv/codex"}
    assert dirs_from(env, default) == AgentDirs(Path("/srv/claude"), Path("/srv/codex"))
    # Relative paths mean nothing to another process; untrusted ones are not followed.
    assert dirs_from({"HOME": "ann", "CLAUDE_CONFIG_DIR": ""}, default) == dirs_from({}, default)
    # A named directory that is not trusted is not looked for anywhere else (issue 19).
    assert dirs_from(env, default, trusted=lambda p: p != Path("/srv/claude")).claude is None


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], Path, Path]]:
    """A real process started with its own HOME and CLAUDE_CONFIG_DIR (a secret beside them)."""
    home, config = tmp_path / "ann", tmp_path / "claude-config"
    (config / "sessions").mkdir(parents=True)
    home.mkdir()
    env = {"PATH": os.environ["PATH"], "HOME": str(home), "CLAUDE_CONFIG_DIR": str(config),
           "ANTHROPIC_API_KEY": "sk-secret"}
    proc = subprocess.Popen(["sleep", "30"], env=env)
    try:
        # Popen returns once exec has begun; the kernel shows an empty environment until
        # exec has laid it out (a window of microseconds, often missed on an idle host).
        wait_for(Path(f"/proc/{proc.pid}/environ").read_bytes, timeout=5, interval=0.01)
        yield proc, home, config
    finally:
        proc.kill()
        proc.wait()


def test_a_process_is_followed_into_its_own_directories(
        agent: tuple[subprocess.Popen[bytes], Path, Path], tmp_path: Path) -> None:
    proc, home, config = agent
    assert read_environ(proc.pid) == {"HOME": str(home), "CLAUDE_CONFIG_DIR": str(config)}  # no secret kept
    resolver = AgentDirResolver(tmp_path / "daemon-home")
    assert resolver(proc.pid) == AgentDirs(config, home / ".codex", os.geteuid())
    # The transcript locator reads the CLI's session file where the CLI writes it.
    (config / "sessions" / f"{proc.pid}.json").write_text(json.dumps(
        {"pid": proc.pid, "sessionId": "s-ann", "cwd": "/work", "status": "idle", "statusUpdatedAt": 1}))
    session = TranscriptLocator(tmp_path / "daemon-home", resolver).claude_session(proc.pid)
    assert session is not None and session.session_id == "s-ann"
    # Without the resolver (as before) it looked in the daemon's home and found nothing.
    assert TranscriptLocator(tmp_path / "daemon-home").claude_session(proc.pid) is None
    # A configured home wins over every environment.
    assert AgentDirResolver(tmp_path / "conf", configured=True)(proc.pid) == dirs_from(
        {}, tmp_path / "conf", uid=os.geteuid())


def test_an_environment_read_mid_exec_is_read_again(tmp_path: Path) -> None:
    """A process caught in the middle of exec shows an empty environment (see the fixture
    above); taking that for "no HOME" once kept the daemon's own directories for the
    process's whole life. A fixture /proc here: the window is too short to hit on demand."""
    proc_root, home = tmp_path / "proc", tmp_path / "ann"
    (proc_root / "42").mkdir(parents=True)
    home.mkdir()
    environ = proc_root / "42" / "environ"
    environ.write_bytes(b"")
    resolver = AgentDirResolver(tmp_path / "daemon-home", proc_root=str(proc_root))
    first = resolver(42)
    assert first.claude != home / ".claude"  # nothing known of its HOME yet
    environ.write_bytes(b"PATH=/bin\0HOME=" + bytes(home) + b"\0")
    os.chown(proc_root / "42", os.geteuid(), os.getegid())
    assert resolver(42) == AgentDirs(home / ".claude", home / ".codex", os.geteuid())
    environ.write_bytes(b"HOME=/elsewhere\0")
    assert resolver(42).claude == home / ".claude"  # a complete read is kept for the process's life


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to hand a directory to another user")
def test_a_directory_another_user_owns_is_never_followed(
        agent: tuple[subprocess.Popen[bytes], Path, Path], tmp_path: Path) -> None:
    """Another local user could point their agent at someone else's directory to have
    that person's session shown as theirs: only the agent's own user may own it (here the
    agent is root's, the directories another user's; the mirror case is the same test)."""
    proc, home, config = agent
    os.chown(config, 54321, 54321)
    resolver = AgentDirResolver(tmp_path / "daemon-home")
    assert resolver(proc.pid) == AgentDirs(None, home / ".codex", 0)
    resolver.forget(proc.pid)
    os.chown(home, 54321, 54321)
    # Never the daemon's own home instead (issue 19): nothing at all.
    assert resolver(proc.pid) == AgentDirs(None, None, 0)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to start a process as another user")
def test_another_users_agent_never_gets_roots_directories(tmp_path: Path) -> None:
    """A user's agent naming root's directory (CLAUDE_CONFIG_DIR=/root/.claude) is not
    followed into it, though root owns it and a root daemon could read it."""
    config = tmp_path / "roots-claude"
    config.mkdir()
    tmp_path.chmod(0o755)
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "CLAUDE_CONFIG_DIR": str(config)}
    proc = subprocess.Popen(["sleep", "30"], env=env, user=54321, group=54321)
    try:
        resolver = AgentDirResolver(tmp_path / "daemon-home")
        for _ in range(100):  # until exec'd (before, /proc shows the parent's environment)
            if "CLAUDE_CONFIG_DIR" in read_environ(proc.pid):
                break
            time.sleep(0.02)
        assert read_environ(proc.pid)["CLAUDE_CONFIG_DIR"] == str(config)
        got = resolver(proc.pid)
        assert got.claude is None and got.uid == 54321, got
        assert got.codex is None or not str(got.codex).startswith(str(tmp_path / "daemon-home"))
    finally:
        proc.kill()
        proc.wait()


def test_unreadable_or_gone_processes_fall_back_to_the_default(tmp_path: Path) -> None:
    proc = subprocess.Popen(["true"])
    proc.wait()
    assert read_environ(proc.pid) == {}
    assert AgentDirResolver(tmp_path)(proc.pid) == AgentDirs(None, None, None)
