"""Gemini CLI, opencode and aider followed from their own records (otelwatch/sources/gemini.py,
opencode.py, aider.py, feeds.py), on lines shaped as the real CLIs write them (Gemini CLI
0.61.0, opencode 1.18.33, aider 0.86.2, measured 2026-12-07), and Gemini's stream-json.

The opencode database is a real SQLite database in WAL mode, written by a writer
connection held open the way opencode holds it, while otelwatch reads it.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from pathlib import Path

from otelwatch.events.activity import Activity
from otelwatch.events.lines import fold, parse_events
from otelwatch.model import EventKind
from otelwatch.sources.aider import HistoryParser, find_history, parse_retry_delay
from otelwatch.sources.feeds import open_feed
from otelwatch.sources.gemini import find_chat, parse_chat_line
from otelwatch.sources.opencode import OpencodeFeed, feed_path, find_session, parse_event_row, split_path

T0 = 1_796_615_520.0


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t * 1000) % 1000:03d}Z"


def _gemini_lines(t: float) -> list[dict[str, object]]:
    """A `gemini -p --yolo` run with one shell tool call, as 0.61.0 writes its chat file."""
    return [
        {"sessionId": "e13699b2-e378-4ab7-af2d-de66d136aa64", "projectHash": "002a", "startTime": _iso(t),
         "lastUpdated": _iso(t), "kind": "main"},
        {"$set": {"messages": [{"id": "d0", "timestamp": _iso(t), "type": "user",
                                "content": [{"text": "<session_context>..."}]}]}},
        {"id": "u1", "timestamp": _iso(t + 1), "type": "user", "content": [{"text": "run sleep 60"}]},
        {"$set": {"lastUpdated": _iso(t + 1)}},
        {"id": "g1", "timestamp": _iso(t + 2), "type": "gemini", "content": "", "thoughts": [],
         "tokens": {"input": 12, "output": 9}, "model": "gemini-2.5-flash"},
        {"id": "g1", "timestamp": _iso(t + 2), "type": "gemini", "content": "", "model": "gemini-2.5-flash",
         "toolCalls": [{"id": "run_shell_command__1", "name": "run_shell_command",
                        "args": {"command": "sleep 60"}, "status": "success", "timestamp": _iso(t + 62)}]},
        {"id": "u2", "timestamp": _iso(t + 62), "type": "user",
         "content": [{"functionResponse": {"name": "run_shell_command", "response": {}}}]},
        {"id": "g2", "timestamp": _iso(t + 63), "type": "gemini", "content": "Hello from the otelwatch fake API."},
        {"$set": {"lastUpdated": _iso(t + 63)}},
    ]


def test_gemini_chat_lines() -> None:
    events = []
    for obj in _gemini_lines(T0):
        got = parse_chat_line(json.dumps(obj).encode(), T0 + 100, "transcript")
        assert got is not None
        events.extend(got)
    kinds = [(e.type, e.kind, e.turn) for e in events]
    assert kinds[0] == ("gemini/session_meta", EventKind.STATE, None)
    assert kinds[1] == ("gemini/set", EventKind.STATE, None)  # the setup context is no prompt
    assert kinds[2] == ("prompt", EventKind.PROGRESS, "open")
    assert kinds[4] == ("gemini", EventKind.PROGRESS, None)  # a tool requested: the turn goes on
    assert events[5].type == "tool_calls" and events[5].tool == "run_shell_command"
    assert kinds[6] == ("tool_response", EventKind.PROGRESS, None)  # tool results: no new prompt
    assert kinds[7] == ("gemini", EventKind.PROGRESS, "close")
    act = fold(Activity(), events)
    assert not act.turn_open and act.open_tools == ()
    assert act.last_progress_time == T0 + 63  # the line's own time, not when it was read
    # Mid-run (before the answer): the turn is open, no tool call shows (it ends later).
    act = fold(Activity(), events[:5])
    assert act.turn_open and act.turn_opened_at == T0 + 1 and act.open_tools == ()
    assert parse_chat_line(b"not json", T0, "transcript") is None


def test_gemini_stream_json_tool_calls() -> None:
    """`gemini -p -o stream-json` under `otelwatch exec`: tool_use opens, tool_result closes."""
    lines = [
        {"type": "init", "timestamp": _iso(T0), "session_id": "s1", "model": "gemini-2.5-flash"},
        {"type": "message", "timestamp": _iso(T0), "role": "user", "content": "run sleep 60"},
        {"type": "tool_use", "timestamp": _iso(T0 + 1), "tool_name": "run_shell_command",
         "tool_id": "run_shell_command__1", "parameters": {"command": "sleep 60"}},
    ]
    events = [e for obj in lines for e in parse_events(json.dumps(obj).encode(), T0 + 2, "stream") or []]
    act = fold(Activity(), events)
    assert act.turn_open and [o.tool for o in act.open_tools] == ["run_shell_command"]
    done = parse_events(json.dumps({"type": "tool_result", "timestamp": _iso(T0 + 61),
                                    "tool_id": "run_shell_command__1", "status": "success"}).encode(),
                        T0 + 62, "stream")
    assert done is not None and fold(act, done).open_tools == ()
    warn = parse_events(b'{"type":"error","severity":"warning","message":"loop detected"}', T0, "stream")
    assert warn is not None and warn[0].kind is EventKind.HEARTBEAT and not warn[0].retry


def test_gemini_chat_found_by_project_root(tmp_path: Path) -> None:
    gemini = tmp_path / ".gemini"
    cwd = tmp_path / "work" / "repo"
    cwd.mkdir(parents=True)
    project = gemini / "tmp" / "repo"
    (project / "chats").mkdir(parents=True)
    (project / ".project_root").write_text(str(cwd))
    other = gemini / "tmp" / "other"
    (other / "chats").mkdir(parents=True)
    (other / ".project_root").write_text(str(tmp_path / "elsewhere"))
    (other / "chats" / "session-2026-12-07T03-52-aaaaaaaa.jsonl").write_text('{"sessionId":"other"}\n')
    chat = project / "chats" / "session-2026-12-07T03-52-e13699b2.jsonl"
    chat.write_text(json.dumps(_gemini_lines(T0)[0]) + "\n")
    started = time.time() - 1

    def owned(st: os.stat_result) -> bool:
        return st.st_uid == os.getuid()

    found = find_chat(gemini, str(cwd / "src"), started, lambda p: True, owned)  # a subdirectory too
    assert found == ("e13699b2-e378-4ab7-af2d-de66d136aa64", chat)
    assert find_chat(gemini, str(cwd), started, lambda p: p != chat, owned) is None  # another process's
    assert find_chat(gemini, str(cwd), time.time() + 60, lambda p: True, owned) is None  # older than the process
    assert find_chat(gemini, str(cwd), started, lambda p: True, lambda st: False) is None  # not its user's
    link = project / "chats" / "session-2026-12-07T03-53-bbbbbbbb.jsonl"
    link.symlink_to(chat)
    assert find_chat(gemini, str(cwd), started, lambda p: p != chat, owned) is None  # a symlink is never read


def test_aider_history_lines() -> None:
    text = """
# aider chat started at 2026-12-07 03:52:02

> /opt/otelwatch-real-agents/bin/aider --model openai/fake-model --message say hello
> Aider v0.86.2
> Model: openai/fake-model with whole edit format

#### say hello

> litellm.APIConnectionError: APIConnectionError: OpenAIException - Connection error.
> Retrying in 0.2 seconds...
> litellm.APIConnectionError: APIConnectionError: OpenAIException - Connection error.
> The API provider's servers are down or overloaded.
> Retrying in 0.5 seconds...
Hello from the otelwatch fake API.

> Tokens: 600 sent, 9 received.

#### /add notes.md

#### /run sleep 60
> Add 0.0k tokens of command output to the chat? (Y)es/(N)o [Yes]: y
"""
    parser = HistoryParser()
    events = []
    for i, line in enumerate(text.splitlines()):
        events.extend(parser.parse(line.encode(), T0 + i, "transcript") or [])
    by_type = [e.type for e in events]
    assert by_type[0] == "session_start" and "prompt" in by_type
    retries = [e for e in events if e.retry]
    assert [e.retry_delay_s for e in retries] == [0.2, 0.5]
    # The errors and their explanations are heartbeats: a retry loop is not progress.
    errors = [e for e in events if e.type == "api_error"]
    assert len(errors) == 3 and all(e.kind is EventKind.HEARTBEAT for e in errors)
    prompt = next(i for i, e in enumerate(events) if e.type == "prompt")
    act = fold(Activity(), events[:prompt + 6])  # up to the second retry announcement
    assert act.turn_open and act.retry_due is not None
    assert act.last_progress_time == events[prompt].time  # retries moved no progress clock
    act = fold(Activity(), events[:by_type.index("tokens") + 1])
    assert not act.turn_open  # the answer is in
    # A local command opens no turn; /run is a tool until the next line, and then the turn is over.
    cmd = next(e for e in events if e.type == "command")
    assert cmd.turn is None
    run_at = by_type.index("run")
    act = fold(Activity(), events[:run_at + 1])
    assert act.turn_open and [o.tool for o in act.open_tools] == ["run"]
    act = fold(act, events[run_at + 1:])
    assert not act.turn_open and act.open_tools == ()
    assert parse_retry_delay("> Retrying in 32.0 seconds...") == 32.0
    assert parse_retry_delay("> Tokens: 1k sent") is None


def test_aider_history_found_in_the_git_root(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    (repo / ".git").mkdir(parents=True)
    (repo / "src").mkdir()
    history = repo / ".aider.chat.history.md"
    history.write_text("# aider chat started at 2026-12-07 03:52:02\n")
    started = time.time() - 1
    uid = os.getuid()
    assert find_history(str(repo / "src"), {}, (), uid, started) == history
    assert find_history(str(repo / "src"), {}, (), uid + 1, started) is None  # not its user's file
    assert find_history(str(repo), {}, (), uid, time.time() + 60) is None  # older than the process
    named = repo / "log.md"
    named.write_text("#### hi\n")
    assert find_history(str(repo), {"AIDER_CHAT_HISTORY_FILE": "log.md"}, (), uid, started) == named
    assert find_history(str(repo), {}, ("aider", "--chat-history-file", str(named)), uid, started) == named
    feed = open_feed("aider", str(history), "transcript")
    events, malformed = feed.poll(time.time())
    assert malformed == 0 and [e.type for e in events] == ["session_start"]


def _opencode_db(path: Path) -> sqlite3.Connection:
    """opencode's tables that otelwatch reads, in WAL mode, with the writer's connection kept open."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("CREATE TABLE session (id text PRIMARY KEY, project_id text NOT NULL, parent_id text, "
                 "directory text NOT NULL, time_created integer NOT NULL, time_updated integer NOT NULL)")
    conn.execute("CREATE TABLE event (id text PRIMARY KEY, aggregate_id text NOT NULL, seq integer NOT NULL, "
                 "type text NOT NULL, data text NOT NULL)")
    return conn


def _add(conn: sqlite3.Connection, sid: str, seq: int, typ: str, data: dict[str, object]) -> None:
    conn.execute("INSERT INTO event VALUES (?, ?, ?, ?, ?)", (f"evt_{sid}_{seq}", sid, seq, typ, json.dumps(data)))


def test_opencode_event_rows() -> None:
    ms = int(T0 * 1000)
    user = {"info": {"id": "msg_u", "role": "user", "time": {"created": ms}}}
    ev = parse_event_row("message.updated.1", user, T0 + 10, "transcript")
    assert ev.turn == "open" and ev.time == T0
    tool = {"part": {"type": "tool", "tool": "bash", "callID": "call_1", "state": {"status": "running"}},
            "time": ms + 2000}
    ev = parse_event_row("message.part.updated.1", tool, T0 + 10, "transcript")
    assert (ev.tool_call, ev.tool, ev.tool_id) == ("open", "bash", "call_1")
    tool["part"]["state"] = {"status": "completed"}  # type: ignore[index]
    assert parse_event_row("message.part.updated.1", tool, T0 + 70, "transcript").tool_call == "close"
    step = parse_event_row("message.part.updated.1", {"part": {"type": "step-start"}, "time": ms}, T0, "t")
    assert step.kind is EventKind.STATE  # an API call beginning is not progress
    calls = {"info": {"role": "assistant", "finish": "tool-calls", "time": {"created": ms, "completed": ms + 1}}}
    assert parse_event_row("message.updated.1", calls, T0 + 1, "t").turn is None
    done = {"info": {"role": "assistant", "finish": "stop", "time": {"created": ms, "completed": ms + 5000}}}
    ev = parse_event_row("message.updated.1", done, T0 + 10, "t")
    assert ev.turn == "close" and ev.time == T0 + 5
    retry = parse_event_row("session.retry.scheduled.1", {"attempt": 3, "at": ms + 9000}, T0, "t")
    assert retry.retry and retry.kind is EventKind.HEARTBEAT and retry.retry_attempt == 3
    assert retry.retry_delay_s == 9.0
    assert parse_event_row("session.updated.1", {}, T0, "t").kind is EventKind.STATE


def test_opencode_feed_reads_a_live_wal_database_read_only(tmp_path: Path) -> None:
    db = tmp_path / "opencode.db"
    writer = _opencode_db(db)
    cwd = str(tmp_path / "cwd")
    now_ms = int(time.time() * 1000)
    writer.execute("INSERT INTO session VALUES ('ses_a', 'global', NULL, ?, ?, ?)", (cwd, now_ms, now_ms))
    writer.execute("INSERT INTO session VALUES ('ses_b', 'global', NULL, '/elsewhere', ?, ?)", (now_ms, now_ms))
    writer.execute("INSERT INTO session VALUES ('ses_sub', 'global', 'ses_a', ?, ?, ?)", (cwd, now_ms, now_ms + 1))
    _add(writer, "ses_a", 0, "session.created.1", {"sessionID": "ses_a"})
    _add(writer, "ses_a", 1, "message.updated.1", {"info": {"id": "msg_u", "role": "user",
                                                            "time": {"created": now_ms}}})

    def owned(st: os.stat_result) -> bool:
        return st.st_uid == os.getuid()

    found = find_session(tmp_path, cwd, time.time() - 5, lambda p: True, owned)
    assert found is not None and found[0] == "ses_a" and split_path(str(found[1])) == (str(db), "ses_a")
    assert find_session(tmp_path, cwd, time.time() - 5, lambda p: False, owned) is None

    feed = open_feed("opencode", feed_path(db, "ses_a"), "transcript")
    assert isinstance(feed, OpencodeFeed)
    events, malformed = feed.poll(time.time())
    assert malformed == 0 and [e.type for e in events] == ["session.created.1", "prompt"]
    act = fold(Activity(), events)
    assert act.turn_open
    # The agent writes on while otelwatch holds its read-only connection: never blocked.
    t = time.perf_counter()
    _add(writer, "ses_a", 2, "message.part.updated.1",
         {"part": {"type": "tool", "tool": "bash", "callID": "c1", "state": {"status": "running"}}})
    _add(writer, "ses_a", 3, "message.updated.1", {"info": {"id": "msg_u", "role": "user",
                                                            "time": {"created": now_ms}}})
    assert time.perf_counter() - t < 1.0
    events, _ = feed.poll(time.time())
    act = fold(act, events)
    assert [o.tool for o in act.open_tools] == ["bash"]
    assert events[1].kind is EventKind.STATE and events[1].turn is None  # the prompt rewritten: not a new turn
    assert feed.poll(time.time()) == ([], 0)
    # Reading never wrote: no checkpoint moved the WAL into the database file.
    writer.execute("PRAGMA wal_checkpoint(PASSIVE)")  # the writer still can (nothing held it)
    feed.close()
    writer.close()


def test_opencode_immutable_reads_miss_the_wal(tmp_path: Path) -> None:
    """Why the feed opens `mode=ro`, not `immutable=1`: opencode's recent data lives in the
    WAL, which an immutable reader ignores."""
    db = tmp_path / "opencode.db"
    writer = _opencode_db(db)
    writer.execute("PRAGMA wal_autocheckpoint=0")
    _add(writer, "ses_a", 0, "session.created.1", {})
    ro = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    assert ro.execute("SELECT count(*) FROM event").fetchone() == (1,)
    immutable = sqlite3.connect(f"file:{db}?immutable=1", uri=True)
    try:
        seen = immutable.execute("SELECT count(*) FROM event").fetchone()
    except sqlite3.OperationalError:
        seen = None  # the table itself is still only in the WAL
    assert seen != (1,)
    ro.close()
    immutable.close()
    writer.close()


def test_gemini_retries_read_from_its_stderr_file(tmp_path: Path) -> None:
    """Gemini CLI announces a retry only on stderr; a headless run's stderr is often a file."""
    import subprocess

    from otelwatch.sources.gemini import parse_stderr_line, stderr_file

    line = b"Attempt 2 failed. Retrying with backoff... Error: exception TypeError: fetch failed sending request"
    got = parse_stderr_line(line, T0, "stderr")
    assert got is not None and got[0].retry and got[0].retry_attempt == 2 and got[0].kind is EventKind.HEARTBEAT
    assert parse_stderr_line(b"    at async retryWithBackoff (file:///x.js:1:2)", T0, "stderr") == []
    log = tmp_path / "stderr"
    with open(log, "wb") as err:
        to_file = subprocess.Popen(["sleep", "30"], stderr=err)
    to_pipe = subprocess.Popen(["sleep", "30"], stderr=subprocess.PIPE)
    try:
        assert stderr_file(to_file.pid, os.getuid()) == str(log)
        assert stderr_file(to_file.pid, os.getuid() + 1) is None  # not the process's user's file
        assert stderr_file(to_pipe.pid, os.getuid()) is None
    finally:
        for proc in (to_file, to_pipe):
            proc.kill()
            proc.wait()


def test_opencode_database_opened_only_in_wal_mode(tmp_path: Path) -> None:
    """A database not (yet) in WAL mode is never opened: in rollback mode a reader's shared lock
    makes the writer's commit wait (opencode switches its new database to WAL at start)."""
    from otelwatch.sources.opencode import in_wal_mode

    db = tmp_path / "opencode.db"
    writer = sqlite3.connect(db, isolation_level=None)
    writer.execute("CREATE TABLE event (id text, aggregate_id text, seq integer, type text, data text)")
    assert not in_wal_mode(str(db))
    feed = OpencodeFeed(feed_path(db, "ses_a"))
    assert feed.poll(time.time()) == ([], 0) and "WAL" in feed.last_error
    assert find_session(tmp_path, str(tmp_path), 0.0, lambda p: True, lambda st: True) is None
    writer.execute("PRAGMA journal_mode=WAL")
    _add(writer, "ses_a", 0, "session.created.1", {})
    assert in_wal_mode(str(db))
    assert [e.type for e in feed.poll(time.time())[0]] == ["session.created.1"]
    feed.close()
    writer.close()


def test_opencode_retries_read_from_its_log(tmp_path: Path) -> None:
    """1.18.33 writes no row for a failed attempt; its shared logfmt log has one `stream error`
    line per attempt, with the session's id (the small title call's are not the turn's)."""
    from otelwatch.sources.opencode import parse_log_line

    line = (b'timestamp=2026-12-07T04:03:18.323Z level=ERROR run=52668bbf message="stream error" '
            b'providerID=fake modelID=fake-model session.id=ses_a small=false agent=build mode=primary '
            b'error.error="AI_APICallError: Cannot connect to API"')
    got = parse_log_line(line, T0 + 1e6, "transcript", "ses_a")
    assert len(got) == 1 and got[0].retry and got[0].time < T0 + 1e6
    assert parse_log_line(line, T0, "transcript", "ses_b") == []
    assert parse_log_line(line.replace(b"small=false", b"small=true"), T0, "transcript", "ses_a") == []
    db = tmp_path / "opencode.db"
    writer = _opencode_db(db)
    _add(writer, "ses_a", 0, "session.created.1", {})
    (tmp_path / "log").mkdir()
    (tmp_path / "log" / "opencode.log").write_bytes(line + b"\n" + line.replace(b"ses_a", b"ses_b") + b"\n")
    feed = OpencodeFeed(feed_path(db, "ses_a"))
    events, _ = feed.poll(time.time())
    assert [e.type for e in events] == ["session.created.1", "api_retry"]
    act = fold(Activity(), events)
    assert act.last_retry_time is not None and act.last_progress_time is None  # a retry is no progress
    feed.close()
    writer.close()


def test_opencode_project_argument() -> None:
    """`opencode [project]` starts the TUI on another directory: its sessions are filed there."""
    from otelwatch.sources.processes import opencode_project

    assert opencode_project(["opencode"]) is None
    assert opencode_project(["opencode", "run", "fix it"]) is None
    assert opencode_project(["opencode", "--prompt", "say hi", "../app"]) == "../app"
    assert opencode_project(["/usr/lib/node_modules/opencode-ai/bin/opencode.exe", "--model", "a/b", "app"]) == "app"
