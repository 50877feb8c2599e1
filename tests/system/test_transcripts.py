"""TranscriptLocator against a fake home directory laid out like Claude Code's and Codex's."""

from __future__ import annotations

import io
import json
import os
import sys
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from otelwatch.events.activity import Activity
from otelwatch.events.lines import fold, parse_events
from otelwatch.model import Event, EventKind
from otelwatch.sources.transcripts import (
    ClaudeSession,
    TranscriptLocator,
    claude_project_dirs,
    fold_transcript,
    status_events,
)
from tests.support.procs import PROBE_BACKEND, Spawner, wait_for

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


# --------------------------------------------------------------------------- Claude Code's session file


def session_file(home: Path, name: int, **fields: object) -> Path:
    """~/.claude/sessions/<pid>.json as Claude Code 2.1.330 writes it (measured)."""
    obj = {"pid": name, "sessionId": "s-1", "cwd": CWD, "startedAt": 1796138813415, "procStart": "182800",
           "version": "2.1.330", "kind": "interactive", "entrypoint": "cli", "tmux": "w:@0.%0",
           "status": "idle", "updatedAt": 1796138820879, "statusUpdatedAt": 1796138820879, **fields}
    path = home / ".claude" / "sessions" / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({k: v for k, v in obj.items() if v is not None}))
    return path


def test_session_file_is_read_and_reread_when_it_changes(tmp_path: Path) -> None:
    loc = TranscriptLocator(tmp_path)
    assert loc.claude_session(42) is None
    session_file(tmp_path, 42, status="waiting", waitingFor="permission prompt", statusUpdatedAt=1796138833365)
    s = loc.claude_session(42)
    assert s is not None and s.current and (s.session_id, s.cwd, s.kind) == ("s-1", CWD, "interactive")
    assert (s.status, s.waiting_for, s.status_at) == ("waiting", "permission prompt", 1796138833.365)
    session_file(tmp_path, 42, status="busy", sessionId="s-2-after-clear", statusUpdatedAt=1796138840999)
    s = loc.claude_session(42)
    assert s is not None and (s.status, s.session_id, s.waiting_for) == ("busy", "s-2-after-clear", None)
    # Another process's file, a file being rewritten, an old version's file without status.
    session_file(tmp_path, 43, pid=99)
    (tmp_path / ".claude" / "sessions" / "44.json").write_text('{"pid": 44, "sessionId": "s-')
    session_file(tmp_path, 45, status=None, updatedAt=None, statusUpdatedAt=None)
    assert loc.claude_session(43) is None and loc.claude_session(44) is None
    old = loc.claude_session(45)
    assert old is not None and not old.current and old.session_id == "s-1"


def test_current_session_file_names_the_transcript_before_it_exists_and_after_clear(tmp_path: Path) -> None:
    now = time.time()
    proj = tmp_path / ".claude" / "projects" / "-home-u-src-my-app"
    session_file(tmp_path, 7, sessionId="first")
    session_file(tmp_path, 8, sessionId="other")
    touch(proj / "other.jsonl", now)  # the newest transcript of the project is someone else's
    loc = TranscriptLocator(tmp_path)
    # No prompt yet: the transcript does not exist, but its path is known (followed from the first tick).
    assert loc.find("claude-code", 7, "/somewhere/else", started_at=now - 5) == ("first", proj / "first.jsonl")
    assert loc.find("claude-code", 8, None, started_at=now - 5) == ("other", proj / "other.jsonl")
    session_file(tmp_path, 7, sessionId="after-clear", statusUpdatedAt=1796138899999)
    assert loc.find("claude-code", 7, None, started_at=now - 5) == ("after-clear", proj / "after-clear.jsonl")


def hb(t: float, type: str = "x", **kw: object) -> Event:
    return Event(time=t, type=type, kind=EventKind.HEARTBEAT, **kw)  # type: ignore[arg-type]


def cs(status: str, at: float, **kw: object) -> ClaudeSession:
    return ClaudeSession(pid=1, session_id="s", cwd=CWD, status=status, status_at=at, **kw)  # type: ignore[arg-type]


def test_status_idle_closes_a_turn_only_if_it_began_before() -> None:
    """Esc while waiting on the API writes nothing anywhere but the session file."""
    opened = Activity().apply(Event(time=10.0, type="prompt", turn="open"))
    closed = fold(opened, status_events(cs("idle", 20.0), cs("busy", 10.1), opened, now=21.0))
    assert not closed.turn_open and closed.last_progress_time == 10.0  # a heartbeat, not progress
    assert status_events(cs("idle", 20.0), None, closed, now=22.0) == []  # level: nothing more to do
    # A prompt newer than the idle status (its busy not written yet, or read a tick late) stays open.
    newer = closed.apply(Event(time=25.0, type="prompt", turn="open"))
    assert status_events(cs("idle", 20.0), cs("idle", 20.0), newer, now=26.0) == []


def test_status_waiting_holds_awaiting_input_until_busy() -> None:
    act = Activity().apply(Event(time=10.0, type="prompt", turn="open"))
    act = fold(act, status_events(cs("waiting", 12.0, waiting_for="permission prompt"), None, act, now=12.5))
    assert act.awaiting_input and act.recent[-1].detail == "permission prompt"
    # The transcript's tool_use line, flushed after the prompt came up, is progress that
    # clears awaiting_input; the file still says waiting, so it is set again.
    act = act.apply(Event(time=11.9, type="tool_use", tool="Bash", tool_id="t1", tool_call="open"))
    assert not act.awaiting_input
    act = fold(act, status_events(cs("waiting", 12.0), cs("waiting", 12.0), act, now=13.0))
    assert act.awaiting_input
    # Approved: busy again, nobody is asked any more, the tool stays open.
    act = fold(act, status_events(cs("busy", 40.0), cs("waiting", 12.0), act, now=40.5))
    assert not act.awaiting_input and act.turn_open and [t.tool_id for t in act.open_tools] == ["t1"]


def test_status_busy_opens_a_turn_once_and_never_reopens_a_closed_one() -> None:
    idle = Activity().apply(Event(time=5.0, type="prompt", turn="open")).apply(
        Event(time=6.0, type="assistant", turn="close"))
    opened = fold(idle, status_events(cs("busy", 9.0), cs("idle", 6.1), idle, now=9.2))
    assert opened.turn_open and opened.turn_opened_at == 9.0 and opened.last_progress_time == 9.0
    # Seen busy while the turn's end (a Stop hook, an end_turn line) is already newer: no reopening.
    ended = opened.apply(Event(time=9.5, type="Stop", turn="close"))
    assert status_events(cs("busy", 9.0), cs("idle", 6.1), ended, now=9.6) == []
    # Unchanged busy status: an edge, not a level.
    assert status_events(cs("busy", 9.0), cs("busy", 9.0), idle, now=10.0) == []


def test_fold_transcript_retries_and_state_lines() -> None:
    """Interactive mode writes one api-request line per attempt and no api_retry: an attempt
    after an unanswered one is a retry; lines written with the prompt are state."""
    lines = [
        {"type": "user", "message": {"role": "user", "content": "hang"}, "timestamp": "2026-12-01T15:31:04.064Z"},
        {"type": "api-request-shape", "shapeHash": "h", "timestamp": "2026-12-01T15:31:04.403Z"},
        {"type": "api-request-blob", "hash": "h", "message": {}},
        {"type": "api-request", "id": "r1", "timestamp": "2026-12-01T15:31:04.403Z"},
        {"type": "last-prompt", "lastPrompt": "hang", "sessionId": "s"},
        {"type": "mode", "mode": "normal", "sessionId": "s"},
        {"type": "api-request", "id": "r2", "timestamp": "2026-12-01T15:31:19.948Z"},
        {"type": "api-request", "id": "r3", "timestamp": "2026-12-01T15:31:36.135Z"},
    ]
    seen = 1796139200.0
    events = [e for line in lines for e in parse_events(json.dumps(line).encode(), seen, "transcript") or []]
    act = fold_transcript(Activity(), events)
    kinds = [(e.type, e.kind.value, e.retry) for e in act.recent]
    assert kinds == [("prompt", "progress", False), ("api-request-shape", "state", False),
                     ("api-request-blob", "state", False), ("api-request", "state", False),
                     ("last-prompt", "state", False), ("mode", "state", False),
                     ("api-request", "heartbeat", True), ("api-request", "heartbeat", True)]
    assert act.last_progress_time == act.recent[0].time  # nothing after the prompt moved the clock
    assert act.last_retry_time == act.recent[-1].time and act.retry_attempt_s is not None
    # Answered in between: the next attempt is a new call, not a retry.
    answered = act.apply(Event(time=act.recent[-1].time + 1, type="assistant"))
    again = fold_transcript(answered, [Event(time=answered.last_event_time + 1, type="api-request",  # type: ignore[operator]
                                             kind=EventKind.HEARTBEAT)])
    assert again.recent[-1].kind is EventKind.STATE and not again.recent[-1].retry


def test_fold_transcript_leaves_announced_retries_alone() -> None:
    """`claude -p` transcripts announce each retry (system/api_error with its schedule): the
    attempt that follows is the announced one, not a second retry."""
    act = fold_transcript(Activity(), [
        Event(time=1.0, type="prompt", turn="open"),
        hb(2.0, "api-request"),
        hb(3.0, "api_error", retry=True, retry_attempt=1, retry_max=10, retry_delay_s=0.6),
        hb(3.6, "api-request"),
    ])
    assert [(e.type, e.kind.value, e.retry) for e in act.recent[1:]] == [
        ("api-request", "state", False), ("api_error", "heartbeat", True), ("api-request", "state", False)]
    assert act.retry_due == 3.6 and act.retry_attempt == 1


# --------------------------------------------------------------------------- never stuck while a person is next


def test_no_interactive_wait_is_ever_recovered(tmp_path: Path, spawn: Spawner) -> None:
    """Every wait of the TUI on its user, as its session file and transcript show it (measured on
    2.1.330), held far past stall_after + recover_after with recovery on (real signals, no dry
    run), against a process that does nothing at all (no CPU, no socket, no child): never
    stuck, never signalled. Then a turn that really hangs is recovered: the same setup does
    signal when it should, so the silence before is the rules', not the setup's."""
    from otelwatch.config import parse_config
    from otelwatch.daemon import Watcher

    mark = f"otelwatch-tui-test-{uuid.uuid4().hex[:8]}"
    home, proj = tmp_path / "home", tmp_path / "proj"
    proj.mkdir()
    # Named like the CLI on its command line, and not a child of this process: in-process
    # discovery leaves the host application's own children alone.
    sh = spawn("sh", "-c", f"{sys.executable} -c 'import time; time.sleep(120)' claude {mark} >/dev/null 2>&1 & "
               "echo $!", fake=False, ready=True, cwd=str(proj))
    pid = int(sh.ready_line)  # type: ignore[attr-defined]
    wait_for(lambda: mark.encode() in Path(f"/proc/{pid}/cmdline").read_bytes())  # exec'd, not a shell fork
    cfg = parse_config({
        "probe": {"backend": PROBE_BACKEND}, "interval": 1, "probe_timeout": 0.5,
        "state_dir": str(tmp_path / "state"),
        "classify": {"startup_grace": 0, "stall_after": 3, "tool_stall_after": 60},
        "recovery": {"enabled": True, "recover_after": 3, "grace": 0.5, "max_per_hour": 100},
        "sources": {"registry": {"enabled": False}, "tmux": {"enabled": False},
                    "processes": {"match": [f"cmdline:(?P<agent>claude) {mark}"]},
                    "transcripts": {"home": str(home)}},
    })
    wall = [time.time()]
    boot = [1000.0]
    w = Watcher(cfg, clock=lambda: wall[0], boottime=lambda: boot[0], log_stream=io.StringIO())
    sid = ["s-1"]
    transcript_dir = claude_project_dirs(home / ".claude", str(proj))[0]

    def status(state: str, waiting: str | None = None) -> None:
        session_file(home, pid, sessionId=sid[0], cwd=str(proj), status=state, waitingFor=waiting,
                     statusUpdatedAt=int(wall[0] * 1000))

    def line(obj: dict[str, object], timed: bool = True) -> None:
        stamp = {"timestamp": datetime.fromtimestamp(wall[0], timezone.utc).isoformat()} if timed else {}
        transcript_dir.mkdir(parents=True, exist_ok=True)
        with open(transcript_dir / f"{sid[0]}.jsonl", "a") as fh:
            fh.write(json.dumps({**obj, "sessionId": sid[0], **stamp}) + "\n")

    def user(content: object) -> None:
        line({"type": "user", "message": {"role": "user", "content": content}})

    def tick() -> Any:
        wall[0] += 1.0
        boot[0] += 1.0
        snaps = [s for s in w.tick() if s.pid == pid]
        assert len(snaps) == 1, snaps
        return snaps[0]

    def hold(seconds: int, *want: tuple[str, str]) -> None:
        seen = [tick() for _ in range(seconds)]
        verdicts = {(s.state.value, s.reason.value) for s in seen}
        assert verdicts <= set(want), verdicts
        assert not any(s.recoveries for s in seen) and os.path.exists(f"/proc/{pid}")

    idle, awaiting = ("idle", "no_open_turn"), ("idle", "awaiting_input")
    long_ = {("active", "recent_progress"), ("long_running", "tool_running"), ("stalled", "tool_call_without_progress")}
    try:
        status("idle")
        hold(10, idle)  # started, at its input box
        status("busy")  # a prompt answered at once
        user("say hi")
        line({"type": "assistant", "message": {"role": "assistant", "stop_reason": "end_turn",
                                               "content": [{"type": "text", "text": "hi"}]}})
        status("idle")
        hold(10, idle)
        status("busy")  # a prompt the API never answers ...
        user("hang")
        line({"type": "api-request", "id": "r1"})
        line({"type": "last-prompt", "lastPrompt": "hang"}, timed=False)
        hold(2, ("active", "recent_progress"))
        status("idle")  # ... and Esc: nothing in the transcript, no hook
        hold(10, idle)
        status("busy")  # a permission prompt, open far longer than stall_after
        user("run it")
        line({"type": "assistant", "message": {"role": "assistant", "stop_reason": "tool_use", "content": [
            {"type": "tool_use", "id": "toolu_1", "name": "Bash", "input": {"command": "sleep 600"}}]}})
        status("waiting", "permission prompt")
        hold(10, awaiting)
        status("busy")  # approved: the tool runs (silently, childless here: never stuck either)
        hold(10, *long_)
        user([{"type": "tool_result", "tool_use_id": "toolu_1", "is_error": True, "content": "interrupted"}])
        user([{"type": "text", "text": "[Request interrupted by user for tool use]"}])  # Esc during the tool
        status("idle")
        hold(10, idle)
        sid[0] = "s-2-after-clear"  # /clear: a new transcript, named at once by the session file
        status("idle")
        user("<command-name>/clear</command-name>")
        line({"type": "system", "subtype": "local_command", "level": "info"})
        hold(10, idle)

        # The control: a turn that really hangs (it answered, then nothing; no CPU, no socket).
        hung_at = wall[0]
        status("busy")
        user("do it")
        tick()
        line({"type": "assistant", "message": {"role": "assistant", "content": [{"type": "text", "text": "ok"}]}})
        for _ in range(20):
            snap = tick()
            if any(r.step == "requested" for r in snap.recoveries):
                break
        assert [r.step for r in snap.recoveries][:1] == ["requested"], (snap.state, snap.reason)
        assert all(r.time > hung_at + 3 for r in snap.recoveries)
        wait_for(lambda: not os.path.exists(f"/proc/{pid}") or _zombie(pid), timeout=10)
    finally:
        w.stop()


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read()
    except OSError:
        return True
    return stat[stat.rindex(b")") + 2:][:1] == b"Z"
