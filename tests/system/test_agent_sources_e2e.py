"""Zero config, end to end: a real daemon finds an agent process by its name, follows its own
records and judges its process tree (no mocks: real processes, /proc, files).

The agents are stand-ins with the real CLIs' names and record formats (a script named
`gemini` writing Gemini CLI 0.61.0's chat file; a script named `aider` appending aider
0.86.2's history), so the test needs neither node nor a model API; the real CLIs are
covered by tests/e2e/realagents/.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.e2e_support import Daemon, start_daemon, wait_for

# A Gemini CLI stand-in: the chat file as 0.61.0 writes it (header, prompt, the empty answer
# that asks for a tool), then the tool as a child `bash -c` -> `sleep`, which runs until the
# test ends it; the chat file says nothing more until then.
GEMINI = r"""#!PYTHON
import json, os, subprocess, sys, time
from datetime import datetime, timezone
def iso(): return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")
home = os.environ["HOME"]
project = os.path.join(home, ".gemini", "tmp", "proj")
os.makedirs(os.path.join(project, "chats"), exist_ok=True)
with open(os.path.join(project, ".project_root"), "w") as fh: fh.write(os.getcwd())
chat = os.path.join(project, "chats", "session-2026-12-07T03-52-e13699b2.jsonl")
def line(obj):
    with open(chat, "a") as fh: fh.write(json.dumps(obj) + "\n")
line({"sessionId": "e13699b2-e378-4ab7-af2d-de66d136aa64", "projectHash": "x", "startTime": iso(), "kind": "main"})
line({"id": "u1", "timestamp": iso(), "type": "user", "content": [{"text": "run sleep"}]})
time.sleep(0.5)
line({"id": "g1", "timestamp": iso(), "type": "gemini", "content": ""})
tool = subprocess.Popen(["bash", "-c", "sleep 120; true"])
print(tool.pid, flush=True)
tool.wait()
line({"id": "g1", "timestamp": iso(), "type": "gemini", "content": "",
      "toolCalls": [{"id": "t1", "name": "run_shell_command", "status": "success"}]})
time.sleep(120)
"""


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[tuple[Daemon, Path]]:
    home = tmp_path / "home"
    home.mkdir()
    # Zero config finds every agent on the host, the real-agent lane's too: on a loaded CI box
    # a dozen sessions share this daemon's probe, so it gets a second a tick, not FAST's 0.4 s.
    d = start_daemon(tmp_path / "daemon", {"interval": 1.0, "probe_timeout": 0.9,
                                           "sources": {"processes": {"enabled": True},
                                                       "transcripts": {"enabled": True}}},
                     env={"HOME": str(home)})
    try:
        yield d, home
    finally:
        d.stop()


def _session(d: Daemon, pid: int) -> dict[str, Any] | None:
    return next((s for s in d.sessions() if s["pid"] == pid), None)


def test_a_gemini_tool_call_is_long_running_then_stuck_once_it_ends(daemon: tuple[Daemon, Path],
                                                                     tmp_path: Path) -> None:
    d, home = daemon
    script = tmp_path / "bin" / "gemini"
    script.parent.mkdir()
    script.write_text(GEMINI.replace("PYTHON", sys.executable))
    script.chmod(0o755)
    cwd = tmp_path / "work"
    cwd.mkdir()
    agent = subprocess.Popen([str(script), "-p", "run sleep", "--yolo"], cwd=cwd, stdout=subprocess.PIPE,
                             env={"PATH": os.environ["PATH"], "HOME": str(home)})
    tool_pid = 0
    try:
        assert agent.stdout is not None
        tool_pid = int(agent.stdout.readline())
        seen: list[tuple[str, str]] = []

        def followed() -> bool:  # its chat file is found (looked for again every 10 s)
            s = _session(d, agent.pid)
            return s is not None and any(e["type"] == "prompt" for e in s["recent_events"])

        wait_for(followed, timeout=30, interval=0.25)

        def settled(state: str) -> bool:
            s = _session(d, agent.pid)
            if s is not None:
                seen.append((s["state"], s["reason"]))
            return s is not None and s["state"] == state

        # stall_after is 3 s: the tool's silence passes it, the tool keeps it out of stuck.
        try:
            wait_for(lambda: settled("long_running"), timeout=30, interval=0.25)
        except AssertionError:
            raise AssertionError(f"{seen[-5:]} {_session(d, agent.pid)}") from None
        s = _session(d, agent.pid)
        assert s is not None and (s["agent"], s["mode"]) == ("gemini", "headless")
        assert s["reason"] == "tool_running" and "started in the turn" in s["evidence"]["detail"]
        time.sleep(4.0)
        assert settled("long_running") and ("stuck", "no_activity") not in seen
        # The tool ends, the agent sleeps with nothing open and nothing written: stuck.
        subprocess.run(["pkill", "-P", str(tool_pid)], check=False)
        try:
            wait_for(lambda: settled("stuck"), timeout=30, interval=0.25)
        except AssertionError:
            raise AssertionError(f"{seen[-5:]} {_session(d, agent.pid)}") from None
    finally:
        agent.kill()
        agent.wait()
        if tool_pid:
            subprocess.run(["pkill", "-P", str(tool_pid)], check=False)  # the sleep this test started
            with contextlib.suppress(OSError):
                os.kill(tool_pid, signal.SIGKILL)


# An opencode stand-in: its database in WAL mode, as 1.18.33 keeps it (the session row, then
# the event log: the prompt, a bash tool part written at the tool's start), the tool a child.
OPENCODE = r"""#!PYTHON
import json, os, sqlite3, subprocess, time
data = os.path.join(os.environ["HOME"], ".local", "share", "opencode")
os.makedirs(data, exist_ok=True)
db = sqlite3.connect(os.path.join(data, "opencode.db"), isolation_level=None)
db.execute("PRAGMA journal_mode=WAL")
db.execute("CREATE TABLE session (id text PRIMARY KEY, parent_id text, directory text, "
           "time_created integer, time_updated integer)")
db.execute("CREATE TABLE event (id text PRIMARY KEY, aggregate_id text, seq integer, type text, data text)")
ms = int(time.time() * 1000)
db.execute("INSERT INTO session VALUES ('ses_x', NULL, ?, ?, ?)", (os.getcwd(), ms, ms))
def ev(seq, typ, data):
    db.execute("INSERT INTO event VALUES (?, 'ses_x', ?, ?, ?)", (f"evt_{seq}", seq, typ, json.dumps(data)))
ev(0, "session.created.1", {})
ev(1, "message.updated.1", {"info": {"id": "msg_u", "role": "user", "time": {"created": ms}}})
tool = subprocess.Popen(["sleep", "120"])
ev(2, "message.part.updated.1", {"part": {"type": "tool", "tool": "bash", "callID": "call_1",
                                          "state": {"status": "running"}}, "time": int(time.time() * 1000)})
print(tool.pid, flush=True)
tool.wait()
time.sleep(120)
"""


def test_an_opencode_tool_call_is_read_from_its_database(daemon: tuple[Daemon, Path], tmp_path: Path) -> None:
    d, home = daemon
    script = tmp_path / "bin" / "opencode"
    script.parent.mkdir()
    script.write_text(OPENCODE.replace("PYTHON", sys.executable))
    script.chmod(0o755)
    cwd = tmp_path / "work"
    cwd.mkdir()
    agent = subprocess.Popen([str(script), "run", "hi"], cwd=cwd, stdout=subprocess.PIPE,
                             env={"PATH": os.environ["PATH"], "HOME": str(home)})
    tool_pid = 0
    try:
        assert agent.stdout is not None
        tool_pid = int(agent.stdout.readline())

        def tool_from_the_database() -> bool:
            # The tree alone (a child started in the turn) makes it long_running too, before its
            # database is found on a loaded box (looked for again every 10 s): wait for the call.
            s = _session(d, agent.pid)
            return s is not None and s["state"] == "long_running" and bool(s["evidence"]["open_tools"])

        try:
            wait_for(tool_from_the_database, timeout=30, interval=0.25)
        except AssertionError:
            raise AssertionError(f"{_session(d, agent.pid)}") from None
        s = _session(d, agent.pid)
        assert s is not None and (s["agent"], s["mode"], s["reason"]) == ("opencode", "headless", "tool_running")
        assert s["evidence"]["open_tools"][0]["tool"] == "bash"  # from its start
        assert [e["type"] for e in s["recent_events"]][:2] == ["session.created.1", "prompt"]
    finally:
        agent.kill()
        agent.wait()
        if tool_pid:
            with contextlib.suppress(OSError):
                os.kill(tool_pid, signal.SIGKILL)
