"""The fake model APIs on their own (no agent CLI needed): each behaviour does what it promises."""

from __future__ import annotations

import http.client
import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from tests.support.procs import REPO


@contextmanager
def fake(api: str, behaviour: str, *extra: str) -> Iterator[int]:
    proc = subprocess.Popen([sys.executable, "-m", "tests.e2e.realagents.fakeapi", "--api", api,
                             "--behaviour", behaviour, "--port", "0", "--lifetime", "60", *extra],
                            cwd=str(REPO), stdout=subprocess.PIPE, start_new_session=True)
    try:
        assert proc.stdout is not None
        ready = json.loads(proc.stdout.readline())
        yield int(ready["port"])
    finally:
        proc.kill()
        proc.wait(timeout=5)
        if proc.stdout:
            proc.stdout.close()


def post(port: int, path: str, body: dict[str, Any]) -> tuple[int, str, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("POST", path, json.dumps(body), {"content-type": "application/json"})
        resp = conn.getresponse()
        return resp.status, resp.getheader("content-type", ""), resp.read()
    finally:
        conn.close()


def sse_events(body: bytes) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for block in body.decode().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
        if "event" in lines:
            out.append((lines["event"], json.loads(lines["data"])))
    return out


def raw_request(port: int, body: dict[str, Any], wait: float = 0.6, path: str = "/v1/messages") -> tuple[bytes, str]:
    """POST by hand and read until the server closes, resets or goes silent for `wait`:
    (what came back, how it ended)."""
    data = json.dumps(body).encode()
    got = b""
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as s:
        try:
            s.sendall(f"POST {path} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                      f"content-length: {len(data)}\r\n\r\n".encode() + data)
            while chunk := s.recv(65536):
                got += chunk
        except TimeoutError:
            return got, "silence"
        except (ConnectionResetError, BrokenPipeError):
            return got, "reset"
    return got, "closed"


HELLO: dict[str, Any] = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]}


def test_anthropic_normal_streams_a_whole_message() -> None:
    with fake("anthropic", "normal") as port:
        status, ctype, body = post(port, "/v1/messages", HELLO)
        names = [name for name, _ in sse_events(body)]
        assert status == 200 and ctype == "text/event-stream"
        assert names[:2] == ["message_start", "content_block_start"] and names[-3:] == [
            "content_block_stop", "message_delta", "message_stop"]
        assert post(port, "/v1/messages/count_tokens", HELLO)[2] == b'{"input_tokens": 42}'
        status, _, body = post(port, "/v1/messages", {**HELLO, "stream": False})
        assert status == 200 and json.loads(body)["stop_reason"] == "end_turn"


def test_anthropic_tool_bash_asks_for_the_tool_then_answers() -> None:
    with fake("anthropic", "tool_bash", "--tool-command", "make all") as port:
        first = json.loads(post(port, "/v1/messages", {**HELLO, "stream": False})[2])
        tool = next(b for b in first["content"] if b["type"] == "tool_use")
        assert first["stop_reason"] == "tool_use" and tool["name"] == "Bash"
        assert tool["input"]["command"] == "make all"
        result = {"role": "user", "content": [{"type": "tool_result", "tool_use_id": tool["id"], "content": "ok"}]}
        second = json.loads(post(port, "/v1/messages", {**HELLO, "stream": False,
                                                        "messages": [*HELLO["messages"], result]})[2])
        assert second["stop_reason"] == "end_turn"


def test_misbehaviours() -> None:
    with fake("anthropic", "never_answer") as port:
        assert raw_request(port, HELLO) == (b"", "silence")
    with fake("anthropic", "partial_then_silence") as port:
        got, how = raw_request(port, HELLO)
        assert how == "silence" and got.startswith(b"HTTP/1.1 200")
        assert b"content_block_stop" in got and b"message_stop" not in got
    with fake("anthropic", "drop") as port:
        got, how = raw_request(port, HELLO)
        assert got == b"" and how in ("reset", "closed")


def test_openai_responses_stream_ends_with_completed() -> None:
    with fake("openai", "normal") as port:
        status, ctype, body = post(port, "/v1/responses", {"model": "m", "stream": True, "input": []})
        events = sse_events(body)
        assert status == 200 and ctype == "text/event-stream"
        assert events[0][0] == "response.created" and events[-1][0] == "response.completed"
        assert events[-1][1]["response"]["output"][0]["content"][0]["text"]
