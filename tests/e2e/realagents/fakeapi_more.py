"""Fake model APIs for Gemini CLI, opencode and aider: Gemini streamGenerateContent and
OpenAI Chat Completions, both as server-sent events.

Owns the two wire formats; `fakeapi.FakeApi` owns the connections, the log and the
behaviours and routes `--api gemini` and `--api chat` calls here:

- Gemini (`POST /v1beta/models/<model>:streamGenerateContent?alt=sse`, Gemini CLI):
  `data: {"candidates": [...]}` chunks; a tool call is a `functionCall` part naming
  the request's shell tool (`run_shell_command`). `:generateContent` (the CLI's side
  calls: next-speaker checks, summaries) gets one plain JSON answer, `:countTokens` a count.
- Chat Completions (`POST /v1/chat/completions`, opencode's
  `@ai-sdk/openai-compatible` provider and aider's `openai/<model>`): `chat.completion.chunk`
  lines ending in `data: [DONE]`; a tool call is a `tool_calls` delta naming the
  request's shell tool (`bash`). A request without tools (aider) is answered with text.

Behaviours are fakeapi's: `normal`, `never_answer` (reads the request, then silence),
`partial_then_silence` (the first chunk, then silence), `tool_bash` (the shell tool
with `--tool-command`, then a normal answer once its result comes back), `drop`
(handled before a request is read), `by_prompt` (the `[fake:NAME]` marker in the last
user text).

It must never run anything a request names: the tool command is the server's own.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tests.e2e.realagents.fakeapi import Conn, FakeApi, Request

__all__ = ["chat", "gemini"]

_MARKER = re.compile(r"\[fake:(normal|slow|never_answer|partial_then_silence|tool_bash)\]")
SHELL_TOOLS = ("run_shell_command", "bash", "shell", "Bash")
SLOW_S = 4.0


def _data(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\r\n\r\n"


def _behaviour(api: FakeApi, texts: list[str], tool_done: bool) -> tuple[str, float | None]:
    """The behaviour of this call, and the seconds to spread a normal answer over."""
    behaviour = api.behaviour
    if behaviour == "by_prompt":
        found = [m for t in texts for m in _MARKER.findall(t)]
        behaviour = found[-1] if found else "normal"
        if tool_done:
            behaviour = "tool_bash"
    if behaviour == "slow":
        return "normal", SLOW_S
    return behaviour, None


def _tool_args(tool: str, params: Any, command: str) -> dict[str, Any]:
    """Arguments for the shell tool: its command, plus a description where the schema has one."""
    props = params.get("properties") if isinstance(params, dict) else None
    props = props if isinstance(props, dict) else {}
    args: dict[str, Any] = {"command": command}
    if "description" in props:
        args["description"] = "Run the requested command"
    if "is_background" in props:
        args["is_background"] = False
    return args


# --------------------------------------------------------------------------- Gemini


def _gemini_tools(body: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for group in body.get("tools") or ():
        if isinstance(group, dict):
            for decl in group.get("functionDeclarations") or ():
                if isinstance(decl, dict) and isinstance(decl.get("name"), str):
                    out[decl["name"]] = decl.get("parameters") or decl.get("parametersJsonSchema")
    return out


def _gemini_last_user(body: dict[str, Any]) -> tuple[list[str], bool]:
    """(texts of the last user content, whether it carries a functionResponse)."""
    contents = body.get("contents")
    if not isinstance(contents, list):
        return [], False
    for content in reversed(contents):
        if not isinstance(content, dict) or content.get("role", "user") != "user":
            continue
        parts = [p for p in content.get("parts") or () if isinstance(p, dict)]
        done = any("functionResponse" in p for p in parts)
        return [str(p["text"]) for p in parts if isinstance(p.get("text"), str)], done
    return [], False


async def gemini(api: FakeApi, req: Request, conn: Conn, reader: asyncio.StreamReader, cid: int) -> bool:
    path = req.path
    body = req.json()
    body = body if isinstance(body, dict) else {}
    model = path.rsplit("/", 1)[-1].split(":", 1)[0] or "gemini-fake"
    usage = {"promptTokenCount": 12, "candidatesTokenCount": 9, "totalTokenCount": 21}
    if path.endswith(":countTokens"):
        await conn.json({"totalTokens": 42})
        return True
    texts, tool_done = _gemini_last_user(body)
    behaviour, pace_s = _behaviour(api, texts, tool_done)
    if behaviour == "never_answer":
        return await api.silence(reader, cid, "never_answer")
    if path.endswith(":generateContent"):
        # Side calls (next speaker, loop checks) ask for JSON: say the user speaks next.
        cfg = body.get("generationConfig") or {}
        wants_json = isinstance(cfg, dict) and "json" in str(cfg.get("responseMimeType", ""))
        text = json.dumps({"reasoning": "The answer is complete.", "next_speaker": "user"}) if wants_json \
            else "Hello from the otelwatch fake API."
        api.log(event="answer", conn=cid, stream=False, kind="side_call")
        await conn.json({"candidates": [{"content": {"role": "model", "parts": [{"text": text}]},
                                         "finishReason": "STOP", "index": 0}],
                         "usageMetadata": usage, "modelVersion": model})
        return True
    if not path.endswith(":streamGenerateContent"):
        await conn.json({})
        return True
    tools = _gemini_tools(body)
    shell = next((t for t in SHELL_TOOLS if t in tools), None)
    tool_turn = behaviour == "tool_bash" and shell is not None and not tool_done
    api.log(event="answer", conn=cid, stream=True, kind="function_call" if tool_turn else "text")
    await conn.start_stream()
    if tool_turn:
        assert shell is not None
        call = {"name": shell, "args": _tool_args(shell, tools[shell], api.tool_command)}
        await conn.chunk(_data({"candidates": [{"content": {"role": "model", "parts": [{"functionCall": call}]},
                                                "finishReason": "STOP", "index": 0}],
                                "usageMetadata": usage, "modelVersion": model}))
        await conn.end_stream()
        return True
    answer = "Hello from the otelwatch fake API."
    words = answer.split(" ")
    for i, word in enumerate(words):
        await api.pace(len(words), pace_s)
        last = i + 1 == len(words)
        cand: dict[str, Any] = {"content": {"role": "model", "parts": [{"text": word if i == 0 else " " + word}]},
                                "index": 0}
        if last:
            cand["finishReason"] = "STOP"
        await conn.chunk(_data({"candidates": [cand], "modelVersion": model, **({"usageMetadata": usage}
                                                                                if last else {})}))
        if behaviour == "partial_then_silence":
            return await api.silence(reader, cid, "partial_silence")
    await conn.end_stream()
    return True


# --------------------------------------------------------------------------- Chat Completions


def _chat_tools(body: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for tool in body.get("tools") or ():
        fn = tool.get("function") if isinstance(tool, dict) else None
        if isinstance(fn, dict) and isinstance(fn.get("name"), str):
            out[fn["name"]] = fn.get("parameters")
    return out


def _chat_last_user(body: dict[str, Any]) -> tuple[list[str], bool]:
    """(texts of the last user message, whether a tool result follows it)."""
    messages = body.get("messages")
    if not isinstance(messages, list):
        return [], False
    tool_done = False
    for message in reversed(messages):
        if not isinstance(message, dict):
            continue
        if message.get("role") == "tool":
            tool_done = True
        if message.get("role") != "user":
            continue
        content = message.get("content")
        if isinstance(content, str):
            return [content], tool_done
        if isinstance(content, list):
            return [str(b["text"]) for b in content if isinstance(b, dict) and isinstance(b.get("text"), str)], \
                tool_done
        return [], tool_done
    return [], tool_done


async def chat(api: FakeApi, req: Request, conn: Conn, reader: asyncio.StreamReader, cid: int) -> bool:
    body = req.json()
    body = body if isinstance(body, dict) else {}
    texts, tool_done = _chat_last_user(body)
    behaviour, pace_s = _behaviour(api, texts, tool_done)
    if behaviour == "never_answer":
        return await api.silence(reader, cid, "never_answer")
    tools = _chat_tools(body)
    shell = next((t for t in SHELL_TOOLS if t in tools), None)
    tool_turn = behaviour == "tool_bash" and shell is not None and not tool_done
    model = body.get("model") or "fake-model"
    base = {"id": f"chatcmpl-fake-{cid}", "object": "chat.completion.chunk", "created": int(time.time()),
            "model": model}
    usage = {"prompt_tokens": 12, "completion_tokens": 9, "total_tokens": 21}
    answer = "Hello from the otelwatch fake API."
    api.log(event="answer", conn=cid, stream=bool(body.get("stream")), kind="tool_calls" if tool_turn else "text")
    if not body.get("stream"):
        if behaviour == "partial_then_silence":
            await conn.respond(200, b'{"id": "chatcmpl-fake", "obj')
            return await api.silence(reader, cid, "partial_silence")
        message: dict[str, Any] = {"role": "assistant", "content": answer}
        finish = "stop"
        if tool_turn:
            assert shell is not None
            message = {"role": "assistant", "content": None, "tool_calls": [{
                "id": f"call_fake_{cid}", "type": "function",
                "function": {"name": shell, "arguments": json.dumps(_tool_args(shell, tools[shell],
                                                                                api.tool_command))}}]}
            finish = "tool_calls"
        await conn.json({**base, "object": "chat.completion", "choices": [
            {"index": 0, "message": message, "finish_reason": finish}], "usage": usage})
        return True

    def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> bytes:
        return _data({**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra})

    await conn.start_stream()
    await conn.chunk(chunk({"role": "assistant", "content": ""}))
    if tool_turn:
        assert shell is not None
        args = json.dumps(_tool_args(shell, tools[shell], api.tool_command))
        await conn.chunk(chunk({"tool_calls": [{"index": 0, "id": f"call_fake_{cid}", "type": "function",
                                                "function": {"name": shell, "arguments": ""}}]}))
        await conn.chunk(chunk({"tool_calls": [{"index": 0, "function": {"arguments": args}}]}))
        await conn.chunk(chunk({}, "tool_calls", usage=usage))
    else:
        words = answer.split(" ")
        for i, word in enumerate(words):
            await api.pace(len(words), pace_s)
            await conn.chunk(chunk({"content": word if i == 0 else " " + word}))
            if behaviour == "partial_then_silence":
                return await api.silence(reader, cid, "partial_silence")
        await conn.chunk(chunk({}, "stop", usage=usage))
    await conn.chunk(b"data: [DONE]\r\n\r\n")
    await conn.end_stream()
    return True
