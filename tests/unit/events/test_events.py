"""The event parser: agents' line shapes in, Events out; garbage is None, never an exception."""

from __future__ import annotations

import json
from typing import Any

import pytest

from otelwatch.events.activity import Activity
from otelwatch.events.lines import MAX_LINE_BYTES, fold, parse_events, parse_line
from otelwatch.model import EventKind

T = 1_700_000_000.0


def line(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj).encode()


def one(obj: dict[str, Any], seen_at: float = T, source: str = "stream"):
    ev = parse_line(line(obj), seen_at, source)
    assert ev is not None
    return ev


# --------------------------------------------------------------------------- malformed


@pytest.mark.parametrize("raw", [
    b"not json",
    b"{broken",
    b"[1, 2, 3]",
    b'"a string"',
    b"\x00\x01\x02binary",
    b"{\"type\": \"assistant\"}\x00",
    b"   ",
    b"\xff\xfe{",
])
def test_malformed_lines_are_none(raw: bytes) -> None:
    assert parse_line(raw, T, "stream") is None


def test_overlong_line_is_malformed_even_if_json() -> None:
    big = b'{"type": "assistant", "x": "' + b"a" * MAX_LINE_BYTES + b'"}'
    assert parse_line(big, T, "stream") is None


def test_plain_text_when_not_json_only() -> None:
    ev = parse_line(b"compiling foo.c \xff\n", T, "exec", json_only=False)
    assert ev is not None
    assert ev.type == "line" and ev.kind is EventKind.PROGRESS and ev.source == "exec"
    assert parse_line(b"\x00\x00", T, "exec", json_only=False) is None


def test_unknown_json_object_is_progress() -> None:
    ev = one({"hello": "world"})
    assert ev.type == "unknown" and ev.kind is EventKind.PROGRESS and ev.time == T
    ev = one({"type": "file-history-snapshot"})
    assert ev.type == "file-history-snapshot"


# --------------------------------------------------------------------------- Claude stream-json


def test_claude_stream_json_session() -> None:
    lines: list[dict[str, Any]] = [
        {"type": "system", "subtype": "init", "session_id": "s1", "model": "m"},
        {"type": "assistant", "message": {"role": "assistant", "content": [
            {"type": "text", "text": "let me look"},
            {"type": "tool_use", "id": "toolu_1", "name": "Bash", "input": {"command": "make"}}]}},
        {"type": "tool_progress", "tool_use_id": "toolu_1", "tool_name": "Bash", "elapsed_time_seconds": 30},
        {"type": "user", "message": {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_1", "content": "ok"}]}},
        {"type": "result", "subtype": "success", "is_error": False},
    ]
    evs = [one(o) for o in lines]
    assert [e.type for e in evs] == ["init", "tool_use", "tool_progress", "tool_result", "result"]
    assert evs[1].tool == "Bash" and evs[1].tool_id == "toolu_1" and evs[1].tool_call == "open"
    assert evs[2].kind is EventKind.HEARTBEAT and evs[2].tool_id == "toolu_1" and evs[2].tool_call is None
    assert evs[3].tool_call == "close" and evs[3].tool_id == "toolu_1"
    assert evs[4].turn == "close"

    act = fold(Activity(), evs[:2])
    assert [o.tool_id for o in act.open_tools] == ["toolu_1"]
    act = fold(act, evs[2:3])
    assert act.open_tools and act.last_heartbeat_time == T
    act = fold(act, evs[3:])
    assert act.open_tools == () and not act.turn_open and act.events == 5


def test_api_retry_is_a_retry_heartbeat() -> None:
    ev = one({"type": "system", "subtype": "api_retry", "attempt": 3, "error": "overloaded"})
    assert ev.kind is EventKind.HEARTBEAT and ev.retry and ev.type == "api_retry"
    assert (ev.retry_attempt, ev.retry_max, ev.retry_delay_s) == (3, None, None)


def test_api_retry_carries_its_schedule() -> None:
    """Claude Code's retry line as measured on 2.1.330."""
    ev = one({"type": "system", "subtype": "api_retry", "attempt": 6, "max_retries": 10, "retry_delay_ms": 17816,
              "error_status": None, "error": "unknown", "session_id": "s", "uuid": "u"})
    assert (ev.retry_attempt, ev.retry_max, ev.retry_delay_s) == (6, 10, 17.816)
    assert ev.detail == "unknown"


def test_transcript_api_error_is_the_same_retry() -> None:
    """Claude Code's transcript records each retry as system/api_error with its schedule."""
    ev = one({"type": "system", "subtype": "api_error", "level": "error", "retryInMs": 17816, "retryAttempt": 6,
              "maxRetries": 10, "timestamp": "2023-11-14T22:13:20.000Z",
              "error": {"status": 529, "error": {"type": "error", "error": {"type": "overloaded_error",
                                                                           "message": "Overloaded"}}}},
             source="transcript")
    assert ev.kind is EventKind.HEARTBEAT and ev.retry and ev.type == "api_error"
    assert (ev.retry_attempt, ev.retry_max, ev.retry_delay_s, ev.detail) == (6, 10, 17.816, "Overloaded")
    # Each attempt is logged as an api-request line first: the loop calling its API, not progress.
    request = one({"type": "api-request", "sessionId": "s", "id": "r1", "timestamp": "2023-11-14T22:13:20.000Z",
                   "version": "2.1.330", "querySource": "sdk", "params": {"model": "m"}}, source="transcript")
    assert request.kind is EventKind.HEARTBEAT and not request.retry and request.type == "api-request"
    for bookkeeping in ({"type": "last-prompt", "lastPrompt": "hi", "leafUuid": "u", "sessionId": "s"},
                        {"type": "atis-latch", "atis": "", "sessionId": "s"},
                        {"type": "cost-state", "sessionId": "s", "totalCostUSD": 0}):
        assert one(bookkeeping, source="transcript").kind is EventKind.HEARTBEAT
    final = one({"type": "system", "subtype": "api_error", "error": "Connection error."})
    assert final.kind is EventKind.HEARTBEAT and not final.retry and final.detail == "Connection error."


@pytest.mark.parametrize("fields", [
    {"attempt": True, "max_retries": "10", "retry_delay_ms": "17816"},
    {"attempt": -1, "max_retries": 2.5, "retry_delay_ms": -5},
    {"attempt": None, "max_retries": [], "retry_delay_ms": float("nan")},
])
def test_api_retry_with_bad_schedule_fields_is_still_a_retry(fields: dict[str, Any]) -> None:
    ev = one({"type": "system", "subtype": "api_retry", **fields})
    assert ev.retry and (ev.retry_attempt, ev.retry_max, ev.retry_delay_s) == (None, None, None)


def test_api_retry_delay_is_clamped() -> None:
    ev = one({"type": "system", "subtype": "api_retry", "retry_delay_ms": 1e300})
    assert ev.retry_delay_s == 86_400.0


def test_retries_fold_into_the_next_attempt_due() -> None:
    """Each retry: the next attempt is due after the announced delay; the attempt that
    just failed began when the previous one was due (the first: at the last progress).
    Progress after a retry settles it; an older retry line seen late moves nothing."""
    def retry(t: float, attempt: int, delay_ms: int) -> Any:
        return one({"type": "system", "subtype": "api_retry", "attempt": attempt, "max_retries": 10,
                    "retry_delay_ms": delay_ms}, seen_at=t)

    act = fold(Activity(), [one({"type": "system", "subtype": "init"}, seen_at=T), retry(T + 360, 1, 600)])
    assert (act.retry_due, act.retry_attempt_s, act.retry_attempt, act.retry_max) == (T + 360.6, 360.0, 1, 10)
    act = act.apply(retry(T + 720.6, 2, 1200))
    assert act.retry_due == pytest.approx(T + 721.8) and act.retry_attempt_s == pytest.approx(360.0)
    late = act.apply(retry(T + 100, 9, 99_000))
    assert late.retry_due == act.retry_due and late.retry_attempt == 2 and late.last_retry_time == T + 720.6
    done = act.apply(one({"type": "assistant", "message": {"content": []}}, seen_at=T + 730))
    assert (done.retry_due, done.retry_attempt_s, done.retry_attempt, done.retry_max) == (None, None, None, None)
    assert done.last_retry_time == T + 720.6


def test_assistant_with_two_tool_calls_opens_both() -> None:
    obj = {"type": "assistant", "message": {"content": [
        {"type": "tool_use", "id": "a", "name": "Read"}, {"type": "tool_use", "id": "b", "name": "Grep"}]}}
    evs = parse_events(line(obj), T, "stream")
    assert evs is not None and [e.tool_id for e in evs] == ["a", "b"]
    assert [o.tool for o in fold(Activity(), evs).open_tools] == ["Read", "Grep"]


def test_stream_event_ping_is_heartbeat_and_delta_is_progress() -> None:
    ping = one({"type": "stream_event", "event": {"type": "ping"}})
    delta = one({"type": "stream_event", "event": {"type": "content_block_delta",
                                                   "delta": {"type": "text_delta", "text": "hi"}}})
    assert ping.kind is EventKind.HEARTBEAT
    assert delta.kind is EventKind.PROGRESS


def test_subagent_end_turn_does_not_close_main_turn() -> None:
    sub = one({"type": "assistant", "parent_tool_use_id": "toolu_9",
               "message": {"stop_reason": "end_turn", "content": [{"type": "text", "text": "done"}]}})
    assert sub.turn is None


# --------------------------------------------------------------------------- Claude transcripts


def test_transcript_lines_use_their_timestamp_and_open_and_close_turns() -> None:
    prompt = one({"type": "user", "timestamp": "2023-11-14T22:13:20.000Z", "sessionId": "s",
                  "message": {"role": "user", "content": "fix the bug"}})
    assert prompt.turn == "open" and prompt.type == "prompt"
    assert prompt.time == pytest.approx(1_700_000_000.0)
    done = one({"type": "assistant", "timestamp": "2023-11-14T22:13:30Z",
                "message": {"stop_reason": "end_turn", "content": [{"type": "text", "text": "fixed"}]}},
               seen_at=T + 100)
    assert done.turn == "close" and done.time == pytest.approx(T + 10)


def test_line_timestamp_never_later_than_seen() -> None:
    future = one({"type": "user", "timestamp": "2099-01-01T00:00:00Z", "message": {"content": "hi"}})
    assert future.time == T


def test_transcript_meta_and_command_lines_do_not_open_turns() -> None:
    meta = one({"type": "user", "isMeta": True, "message": {"content": "Caveat: generated"}})
    cmd = one({"type": "user", "message": {"content": "<command-name>/clear</command-name>"}})
    interrupted = one({"type": "user", "message": {"content": [
        {"type": "text", "text": "[Request interrupted by user for tool use]"}]}})
    assert meta.turn is None and cmd.turn is None
    assert interrupted.turn == "close"


# --------------------------------------------------------------------------- Codex


def test_codex_exec_json() -> None:
    lines: list[dict[str, Any]] = [
        {"type": "thread.started", "thread_id": "th_1"},
        {"type": "turn.started"},
        {"type": "item.started", "item": {"id": "item_1", "type": "command_execution", "command": "ls"}},
        {"type": "item.completed", "item": {"id": "item_1", "type": "command_execution", "exit_code": 0}},
        {"type": "item.completed", "item": {"id": "item_2", "type": "agent_message", "text": "done"}},
        {"type": "turn.completed", "usage": {"input_tokens": 1}},
    ]
    evs = [one(o) for o in lines]
    assert evs[1].turn == "open" and evs[5].turn == "close"
    assert (evs[2].tool_call, evs[2].tool, evs[2].tool_id) == ("open", "command_execution", "item_1")
    assert evs[3].tool_call == "close" and evs[4].tool_call is None
    act = fold(Activity(), evs[:3])
    assert act.turn_open and act.open_tools[0].tool_id == "item_1"
    assert not fold(act, evs[3:]).turn_open


def test_codex_mcp_tool_name_and_error_retry() -> None:
    mcp = one({"type": "item.started", "item": {"id": "i", "type": "mcp_tool_call", "server": "gh", "tool": "pr"}})
    assert mcp.tool == "gh/pr"
    err = one({"type": "error", "message": "stream disconnected; reconnecting 1/5"})
    assert err.kind is EventKind.HEARTBEAT and err.retry
    assert (err.retry_attempt, err.retry_max, err.retry_delay_s) == (1, 5, None)


@pytest.mark.parametrize(("message", "expected"), [
    # codex exec --json: the stream error with its details appended
    ("Reconnecting... 2/5 (stream disconnected before completion: idle timeout waiting for SSE)", (2, 5, None)),
    # older releases named the delay (Rust's Debug of a Duration)
    ("stream error: error sending request; retrying 3/5 in 812.5ms…", (3, 5, 0.8125)),
    ("stream error: 500; retrying 1/4 in 1.6s…", (1, 4, 1.6)),
    ("unexpected status 401 Unauthorized", (None, None, None)),
])
def test_codex_reconnects_carry_their_number(message: str, expected: tuple[Any, ...]) -> None:
    err = one({"type": "error", "message": message})
    assert err.retry and (err.retry_attempt, err.retry_max, err.retry_delay_s) == expected
    rollout = one({"timestamp": "2023-11-14T22:13:20.000Z", "type": "event_msg",
                   "payload": {"type": "stream_error", "message": message}})
    assert rollout.retry and (rollout.retry_attempt, rollout.retry_max, rollout.retry_delay_s) == expected
    failed = one({"type": "turn.failed", "error": {"message": "x"}})
    assert failed.turn == "close"


def test_codex_rollout_lines() -> None:
    ts = "2023-11-14T22:13:20.000Z"
    evs = [one(o, seen_at=T + 60) for o in [
        {"timestamp": ts, "type": "session_meta", "payload": {"id": "abc", "cwd": "/w"}},
        {"timestamp": ts, "type": "event_msg", "payload": {"type": "user_message", "message": "hi"}},
        {"timestamp": ts, "type": "response_item", "payload": {"type": "function_call", "name": "shell",
                                                                "call_id": "c1", "arguments": "{}"}},
        {"timestamp": ts, "type": "response_item", "payload": {"type": "function_call_output", "call_id": "c1"}},
        {"timestamp": ts, "type": "event_msg", "payload": {"type": "task_complete"}},
    ]]
    assert all(e.time == pytest.approx(T) for e in evs)
    assert evs[1].turn == "open" and evs[4].turn == "close"
    assert (evs[2].tool_call, evs[2].tool_id, evs[2].tool) == ("open", "c1", "shell")
    assert evs[3].tool_call == "close" and evs[3].tool_id == "c1"


# --------------------------------------------------------------------------- hooks and spool records

BASE = {"session_id": "abc123", "transcript_path": "/home/u/.claude/projects/-w/abc123.jsonl",
        "cwd": "/w", "permission_mode": "default"}


def hook(name: str, **fields: Any):
    return one({**BASE, "hook_event_name": name, **fields}, source="hook")


def test_hook_payloads_in_documented_shapes() -> None:
    prompt = hook("UserPromptSubmit", prompt="do it")
    pre = hook("PreToolUse", tool_name="Bash", tool_input={"command": "make"}, tool_use_id="toolu_01")
    post = hook("PostToolUse", tool_name="Bash", tool_input={}, tool_response={"ok": True},
                tool_use_id="toolu_01")
    fail = hook("PostToolUseFailure", tool_name="Bash", tool_input={}, error="boom")
    stop = hook("Stop", stop_hook_active=False)
    sub = hook("SubagentStop", stop_hook_active=False)
    assert prompt.turn == "open" and prompt.type == "UserPromptSubmit"
    assert (pre.tool_call, pre.tool, pre.tool_id) == ("open", "Bash", "toolu_01")
    assert post.tool_call == "close" and fail.tool_call == "close"
    assert stop.turn == "close" and sub.turn is None

    act = fold(Activity(), [prompt, pre, sub])
    assert act.turn_open and len(act.open_tools) == 1, "SubagentStop must not close the main turn"
    act = fold(act, [post])
    assert act.open_tools == () and act.turn_open
    assert not fold(act, [stop]).turn_open


def test_hook_without_tool_use_id_closes_by_tool_name() -> None:
    pre = hook("PreToolUse", tool_name="Bash", tool_input={})
    post = hook("PostToolUse", tool_name="Bash", tool_input={}, tool_response={})
    assert pre.tool_id is None
    assert fold(Activity(), [pre, post]).open_tools == ()


@pytest.mark.parametrize(("fields", "waiting"), [
    ({"notification_type": "permission_prompt", "message": "Claude needs your permission to use Bash"}, True),
    ({"notification_type": "idle_prompt", "message": "Claude is waiting for your input"}, True),
    ({"message": "Claude needs your permission to use Bash"}, True),  # older versions: no type
    ({"notification_type": "auth_success", "message": "Logged in"}, None),
])
def test_notification_sets_awaiting_input_only_for_prompts(fields: dict[str, Any], waiting: bool | None) -> None:
    ev = hook("Notification", **fields)
    assert ev.kind is EventKind.HEARTBEAT
    assert ev.awaiting_input is waiting


def test_permission_request_awaits_input_and_progress_clears_it() -> None:
    ev = hook("PermissionRequest", tool_name="Bash", tool_input={})
    act = fold(Activity(), [ev])
    assert act.awaiting_input
    assert not fold(act, [hook("PostToolUse", tool_name="Bash")]).awaiting_input


def test_other_hooks_are_progress() -> None:
    for name in ("SessionStart", "PreCompact", "SomeFutureHook"):
        ev = hook(name, source="startup")
        assert ev.kind is EventKind.PROGRESS and ev.type == name
    assert hook("SessionEnd", reason="exit").turn == "close"


def test_spool_record_round_trip() -> None:
    original = hook("PreToolUse", tool_name="Bash", tool_use_id="t1")
    record = {"otelwatch": 1, "session_id": "s", "pid": 42, "agent": "claude-code", **original.to_json()}
    back = one(record, seen_at=T + 5, source="spool")
    assert back == original
    # A retry keeps its schedule through the exec wrapper's spool.
    retry = one({"type": "system", "subtype": "api_retry", "attempt": 6, "max_retries": 10, "retry_delay_ms": 17816},
                source="exec")
    record = {"otelwatch": 1, "session_id": "s", **retry.to_json()}
    assert one(record, seen_at=T + 5, source="spool") == retry


def test_spool_record_with_bad_fields_is_sanitised() -> None:
    ev = one({"otelwatch": 1, "time": "yesterday", "type": 7, "kind": "weird", "turn": "maybe"})
    assert ev.time == T and ev.type == "event" and ev.kind is EventKind.PROGRESS and ev.turn is None


def test_spool_records_keep_every_event_kind_and_the_background_task_list() -> None:
    """The exec wrapper and hooks write events to the spool; reading them back must give
    the same event (a state line read back as progress would reset the silence clock)."""
    from otelwatch.events.lines import parse_object
    from otelwatch.model import Event, EventKind

    for event in (Event(time=5.0, type="system/background_tasks_changed", kind=EventKind.STATE,
                        background=("b87",), source="stream"),
                  Event(time=5.0, type="mode", kind=EventKind.STATE, source="stream"),
                  Event(time=5.0, type="tool_progress", kind=EventKind.HEARTBEAT, source="stream")):
        back = parse_object({"otelwatch": 1, "session_id": "s", **event.to_json()}, 9.0, "hook")
        assert back == [event]
