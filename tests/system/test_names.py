"""Names a person recognises: a real process named like Claude Code, with a session file
shaped like the one Claude Code 2.1.330 writes, is listed by the real daemon with the
CLI's own name for the session, the process's working directory and its owner, and
`otelwatch status` shows them with the full session id. None of them is a metric label."""

from __future__ import annotations

import json
import os
import pwd
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

from otelwatch.sessions.names import printable, refresh_names
from tests.support.e2e_support import start_daemon
from tests.support.procs import REPO, Spawner, wait_for


def _claude_like(spawn: Spawner, mark: str, cwd: Path) -> int:
    # Named like the CLI on its command line and not our child (discovery leaves the host's
    # own children alone): started through a shell that exits.
    sh = spawn("sh", "-c", f"{sys.executable} -c 'import time; time.sleep(120)' claude {mark} >/dev/null 2>&1 & "
               "echo $!", fake=False, ready=True, cwd=str(cwd))
    pid = int(sh.ready_line)  # type: ignore[attr-defined]
    wait_for(lambda: mark.encode() in Path(f"/proc/{pid}/cmdline").read_bytes())
    return pid


def _session_file(home: Path, pid: int, **fields: Any) -> None:
    """~/.claude/sessions/<pid>.json with the fields Claude Code 2.1.330 writes (measured)."""
    obj = {"pid": pid, "sessionId": "0b7c1d2e-3f40-4a51-8b62-7c83d94ea5f6", "cwd": fields.pop("cwd"),
           "startedAt": 1796138813415, "procStart": "182800", "version": "2.1.330", "kind": "interactive",
           "entrypoint": "cli", "name": "work-0b", "status": "idle", "updatedAt": 1796138820879,
           "statusUpdatedAt": 1796138820879, **fields}
    path = home / ".claude" / "sessions" / f"{pid}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def test_a_claude_session_shows_its_name_directory_and_owner(tmp_path: Path, spawn: Spawner) -> None:
    mark = f"otelwatch-names-{uuid.uuid4().hex[:8]}"
    home, proj = tmp_path / "home", tmp_path / "my project"
    proj.mkdir(parents=True)
    pid = _claude_like(spawn, mark, proj)
    _session_file(home, pid, cwd=str(proj))
    daemon = start_daemon(tmp_path / "d", {"sources": {
        "processes": {"enabled": True, "match": [f"cmdline:(?P<agent>claude) {mark}"]},
        "transcripts": {"enabled": True, "home": str(home)}}})
    try:
        def named() -> dict[str, Any] | None:
            s = next((s for s in daemon.sessions() if s["pid"] == pid), None)
            return s if s and s.get("name") and s.get("cwd") and s.get("user") else None

        session: dict[str, Any] = wait_for(named, timeout=20, interval=0.2)  # type: ignore[assignment]
        assert session["name"] == "work-0b"
        assert session["cwd"] == str(proj)  # from /proc/PID/cwd: the process's own, with its space
        assert session["user"] == pwd.getpwuid(os.geteuid()).pw_name
        sid = session["session_id"]

        out = subprocess.run([sys.executable, "-m", "otelwatch", "status", "--url", daemon.url],
                             capture_output=True, text=True, timeout=30, cwd=str(REPO))
        assert out.returncode == 0, out.stderr
        header, *rows = out.stdout.splitlines()
        assert header.split()[:2] == ["SESSION", "NAME"]
        row = next(r for r in rows if r.startswith(sid + " "))  # the whole id, never cut
        assert "work-0b" in row and str(proj) in row

        metrics = daemon.metrics()
        assert "work-0b" not in metrics and str(proj) not in metrics  # never a label
    finally:
        daemon.cleanup()


class _Table:
    def __init__(self, info: Any) -> None:
        self.info = info

    def get(self, pid: int) -> Any:
        return self.info


def test_names_are_printable_and_read_only_for_the_bound_process(tmp_path: Path) -> None:
    from otelwatch.model import ProcessIdentity, SessionSpec
    from otelwatch.probe.proctable import ProcessTableReader
    from otelwatch.sessions.table import Tracked

    assert printable("work\x1b[31m-0b\n", 60) == "work?[31m-0b?" and printable("", 5) is None
    table = ProcessTableReader().read()
    me = table.get(os.getpid())
    assert me is not None
    tracked = Tracked(key="s", spec=SessionSpec("s", os.getpid()), started_at=0.0, identity=me.identity)
    reads: list[int] = []

    def cwd_of(pid: int) -> str | None:
        reads.append(pid)
        return os.readlink(f"/proc/{pid}/cwd")

    refresh_names([tracked], table, 100.0, cwd_of)
    assert tracked.cwd == os.getcwd() and reads == [os.getpid()]
    refresh_names([tracked], table, 110.0, cwd_of)
    assert reads == [os.getpid()]  # not read again before CWD_REFRESH_S
    # The pid now names another process (a reuse): its directory is not this session's.
    other = Tracked(key="t", spec=SessionSpec("t", os.getpid()), started_at=0.0,
                    identity=ProcessIdentity(os.getpid(), me.create_time - 1000.0))
    refresh_names([other], table, 100.0, cwd_of)
    assert other.cwd is None and reads == [os.getpid()]
