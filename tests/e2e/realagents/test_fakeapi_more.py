"""The Gemini and Chat Completions fakes on their own (no agent CLI needed): each behaviour does what it promises."""

from __future__ import annotations

import json
from typing import Any

from tests.e2e.realagents.test_fakeapi import fake, post, raw_request

GEMINI = "/v1beta/models/gemini-2.5-flash:streamGenerateContent"
SHELL_DECL = {"name": "run_shell_command", "parameters": {"type": "object", "properties": {
    "command": {"type": "string"}, "description": {"type": "string"}}}}
GEMINI_HELLO: dict[str, Any] = {"contents": [{"role": "user", "parts": [{"text": "hi"}]}],
                                "tools": [{"functionDeclarations": [SHELL_DECL]}]}
BASH_TOOL = {"type": "function", "function": {"name": "bash", "parameters": {"type": "object", "properties": {
    "command": {"type": "string"}, "description": {"type": "string"}}}}}
CHAT_HELLO: dict[str, Any] = {"model": "fake-model", "stream": True, "tools": [BASH_TOOL],
                              "messages": [{"role": "user", "content": "hi"}]}


def data_lines(body: bytes) -> list[Any]:
    out = []
    for line in body.decode().splitlines():
        if line.startswith("data: "):
            payload = line[len("data: "):]
            out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


def raw(port: int, path: str, body: dict[str, Any], wait: float = 0.6) -> tuple[bytes, str]:
    return raw_request(port, body, wait, path)


def test_gemini_text_then_function_call_then_answer() -> None:
    with fake("gemini", "normal") as port:
        status, ctype, body = post(port, GEMINI + "?alt=sse", GEMINI_HELLO)
        chunks = data_lines(body)
        assert status == 200 and ctype == "text/event-stream"
        text = "".join(c["candidates"][0]["content"]["parts"][0]["text"] for c in chunks)
        assert text == "Hello from the otelwatch fake API."
        assert chunks[-1]["candidates"][0]["finishReason"] == "STOP" and "usageMetadata" in chunks[-1]
    with fake("gemini", "tool_bash", "--tool-command", "make all") as port:
        first = data_lines(post(port, GEMINI, GEMINI_HELLO)[2])
        call = first[0]["candidates"][0]["content"]["parts"][0]["functionCall"]
        assert call["name"] == "run_shell_command" and call["args"]["command"] == "make all"
        result = {"role": "user", "parts": [{"functionResponse": {"name": "run_shell_command", "response": {}}}]}
        second = data_lines(post(port, GEMINI, {**GEMINI_HELLO, "contents": [*GEMINI_HELLO["contents"], result]})[2])
        assert "text" in second[0]["candidates"][0]["content"]["parts"][0]


def test_gemini_side_calls_and_misbehaviours() -> None:
    with fake("gemini", "normal") as port:
        side = json.loads(post(port, "/v1beta/models/m:generateContent",
                               {**GEMINI_HELLO, "generationConfig": {"responseMimeType": "application/json"}})[2])
        answer = json.loads(side["candidates"][0]["content"]["parts"][0]["text"])
        assert answer["next_speaker"] == "user"
        assert json.loads(post(port, "/v1beta/models/m:countTokens", GEMINI_HELLO)[2]) == {"totalTokens": 42}
    with fake("gemini", "never_answer") as port:
        assert raw(port, GEMINI, GEMINI_HELLO) == (b"", "silence")
    with fake("gemini", "drop") as port:
        got, how = raw(port, GEMINI, GEMINI_HELLO)
        assert got == b"" and how in ("reset", "closed")


def test_chat_completions_text_and_tool_calls() -> None:
    with fake("chat", "normal") as port:
        status, ctype, body = post(port, "/v1/chat/completions", CHAT_HELLO)
        chunks = data_lines(body)
        assert status == 200 and ctype == "text/event-stream" and chunks[-1] == "[DONE]"
        text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks[:-1])
        assert text == "Hello from the otelwatch fake API."
        assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
        plain = json.loads(post(port, "/v1/chat/completions", {**CHAT_HELLO, "stream": False})[2])
        assert plain["choices"][0]["message"]["content"] == text
    with fake("chat", "tool_bash", "--tool-command", "make all") as port:
        chunks = data_lines(post(port, "/v1/chat/completions", CHAT_HELLO)[2])
        calls = [c["choices"][0]["delta"]["tool_calls"][0] for c in chunks[:-1]
                 if c["choices"][0]["delta"].get("tool_calls")]
        args = json.loads("".join(c["function"].get("arguments", "") for c in calls))
        assert calls[0]["function"]["name"] == "bash" and args["command"] == "make all"
        assert chunks[-2]["choices"][0]["finish_reason"] == "tool_calls"
        done = [*CHAT_HELLO["messages"], {"role": "assistant", "tool_calls": [calls[0]]},
                {"role": "tool", "tool_call_id": calls[0]["id"], "content": "ok"}]
        after = data_lines(post(port, "/v1/chat/completions", {**CHAT_HELLO, "messages": done})[2])
        assert after[-2]["choices"][0]["finish_reason"] == "stop"
        # Without tools (aider), tool_bash answers text.
        bare = data_lines(post(port, "/v1/chat/completions", {**CHAT_HELLO, "tools": []})[2])
        assert bare[-2]["choices"][0]["finish_reason"] == "stop"


def test_chat_by_prompt_and_misbehaviours() -> None:
    with fake("chat", "by_prompt") as port:
        hang = {**CHAT_HELLO, "messages": [{"role": "user", "content": "[fake:never_answer] hi"}]}
        assert raw(port, "/v1/chat/completions", hang) == (b"", "silence")
        tool = {**CHAT_HELLO, "messages": [{"role": "user", "content": [{"type": "text", "text": "[fake:tool_bash]"}]}]}
        chunks = data_lines(post(port, "/v1/chat/completions", tool)[2])
        assert chunks[-2]["choices"][0]["finish_reason"] == "tool_calls"
    with fake("chat", "drop") as port:
        got, how = raw(port, "/v1/chat/completions", CHAT_HELLO)
        assert got == b"" and how in ("reset", "closed")
