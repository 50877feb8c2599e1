"""TranscriptLocator against a fake home directory laid out like Claude Code's and Codex's."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from otelwatch.sources.transcripts import TranscriptLocator, claude_project_dirs

CWD = "/home/u/src/my.app"


def touch(path: Path, mtime: float, content: str = "{}\n") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content)
    os.utime(path, (mtime, mtime))
    return path


def test_claude_project_dir_encoding(tmp_path: Path) -> None:
    dirs = claude_project_dirs(tmp_path / ".claude", CWD)
    assert dirs[0].name == "-home-u-src-my-app"
    assert claude_project_dirs(tmp_path, "/a/b_c")[0].name == "-a-b-c"
    assert claude_project_dirs(tmp_path, "/a/b_c")[1].name == "-a-b_c"


def test_claude_most_recent_transcript_after_start_and_not_shared(tmp_path: Path) -> None:
    now = time.time()
    proj = tmp_path / ".claude" / "projects" / "-home-u-src-my-app"
    touch(proj / "old.jsonl", now - 3600)  # an earlier session of the same project
    touch(proj / "a.jsonl", now - 20)
    touch(proj / "b.jsonl", now - 10)
    touch(proj / "b" / "subagents" / "agent-x.jsonl", now)  # subagent transcripts are not sessions
    loc = TranscriptLocator(tmp_path)
    assert loc.find("claude-code", 100, CWD, started_at=now - 60) == ("b", proj / "b.jsonl")
    # Asking again for the same process gives the same answer.
    assert loc.find("claude-code", 100, CWD, started_at=now - 60) == ("b", proj / "b.jsonl")
    # A second process in the same directory does not get the same transcript.
    assert loc.find("claude-code", 200, CWD, started_at=now - 60) == ("a", proj / "a.jsonl")
    assert loc.find("claude-code", 300, CWD, started_at=now - 60) is None
    loc.release(100)
    assert loc.find("claude-code", 300, CWD, started_at=now - 60) == ("b", proj / "b.jsonl")


def test_claude_nothing_written_since_start(tmp_path: Path) -> None:
    now = time.time()
    touch(tmp_path / ".claude" / "projects" / "-home-u-src-my-app" / "old.jsonl", now - 3600)
    assert TranscriptLocator(tmp_path).find("claude-code", 1, CWD, started_at=now - 5) is None
    assert TranscriptLocator(tmp_path).find("claude-code", 1, None, started_at=now - 5) is None


def test_claude_session_file_names_the_transcript(tmp_path: Path) -> None:
    now = time.time()
    claude = tmp_path / ".claude"
    proj = claude / "projects" / "-home-u-src-my-app"
    touch(proj / "mine.jsonl", now - 30)
    touch(proj / "someone-else.jsonl", now - 30)
    sessions = claude / "sessions"
    sessions.mkdir(parents=True)
    (sessions / "4242.json").write_text(json.dumps(
        {"pid": 4242, "sessionId": "mine", "cwd": CWD, "startedAt": int((now - 60) * 1000)}))
    loc = TranscriptLocator(tmp_path)
    # cwd unknown to the caller: the session file supplies it.
    assert loc.find("claude-code", 4242, None, started_at=now - 60) == ("mine", proj / "mine.jsonl")


def test_claude_stale_session_file_loses_to_newer_transcript(tmp_path: Path) -> None:
    now = time.time()
    claude = tmp_path / ".claude"
    proj = claude / "projects" / "-home-u-src-my-app"
    touch(proj / "before-clear.jsonl", now - 50)
    touch(proj / "after-clear.jsonl", now - 5)
    (claude / "sessions").mkdir(parents=True)
    (claude / "sessions" / "7.json").write_text(json.dumps({"pid": 7, "sessionId": "before-clear", "cwd": CWD}))
    found = TranscriptLocator(tmp_path).find("claude-code", 7, CWD, started_at=now - 60)
    assert found == ("after-clear", proj / "after-clear.jsonl")


def test_codex_rollout_by_cwd_and_recency(tmp_path: Path) -> None:
    now = time.time()
    day = time.strftime("%Y/%m/%d", time.gmtime(now))
    base = tmp_path / ".codex" / "sessions" / day

    def rollout(name: str, sid: str, cwd: str, mtime: float) -> Path:
        meta = {"timestamp": "2025-01-01T00:00:00Z", "type": "session_meta",
                "payload": {"id": sid, "cwd": cwd, "cli_version": "0.50.0"}}
        return touch(base / f"rollout-{name}.jsonl", mtime, json.dumps(meta) + "\n")

    other = rollout("1", "id-other-dir", "/elsewhere", now - 1)
    mine = rollout("2", "id-mine", CWD, now - 5)
    rollout("3", "id-old", CWD, now - 7200)
    loc = TranscriptLocator(tmp_path)
    assert loc.find("codex", 10, CWD, started_at=now - 60) == ("id-mine", mine)
    assert loc.find("codex", 11, "/elsewhere", started_at=now - 60) == ("id-other-dir", other)
    assert loc.find("codex", 12, CWD, started_at=now - 60) is None  # mine is taken
    assert loc.find("gemini", 13, CWD, started_at=now - 60) is None  # no known layout
