"""Fake model APIs for the real agent CLIs: Anthropic Messages and OpenAI Responses.

Owns speaking just enough HTTP/1.1 and server-sent events for `claude -p` and
`codex exec` to run a turn against it, and misbehaving on purpose in the ways
real APIs do (see REAL_AGENTS.md). Standalone, so it can be started inside the
agent's own network namespace:

    python3 -m tests.e2e.realagents.fakeapi --api anthropic --behaviour never_answer --port 8080

`--api gemini` (Gemini CLI's streamGenerateContent) and `--api chat` (OpenAI Chat
Completions, for opencode and aider) are spoken by `fakeapi_more`, with the same behaviours.

It prints one JSON line (`{"ready": true, "port": N, "pid": P}`) on stdout once
it listens, and appends one JSON line per connection and request to `--log`.

Behaviours (for the model call; other paths always get harmless answers):
`normal` answers text; `never_answer` reads the request and then stays silent
on the open connection; `partial_then_silence` sends the headers and the first
content block, then stays silent; `tool_bash` asks for a Bash tool call
(`--tool-command`) and answers normally once the tool's result comes back;
`drop` closes every connection as soon as it is accepted; `by_prompt` (not Responses)
takes each call's behaviour from a marker such as `[fake:never_answer]` in
the conversation's last user text, so one interactive session can go through
several behaviours turn by turn (no marker: `normal`; `slow`: a normal answer
streamed over SLOW_S).

It must never talk to anything but the client that connected to it, never run
anything a request names, and never keep a connection open after its peer left.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import signal
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["APIS", "BEHAVIOURS", "Request", "main"]

APIS = ("anthropic", "openai", "gemini", "chat")  # the last two: fakeapi_more
BEHAVIOURS = ("normal", "never_answer", "partial_then_silence", "tool_bash", "drop", "by_prompt")
# by_prompt: the marker in the last user text names the behaviour of that call.
_MARKER = re.compile(r"\[fake:(normal|slow|never_answer|partial_then_silence|tool_bash)\]")
SLOW_S = 4.0  # by_prompt `[fake:slow]`: a normal answer streamed over this long
MAX_HEADER_BYTES = 64 << 10
MAX_BODY_BYTES = 64 << 20  # agents send their whole conversation and tool schemas
ANSWER = "Hello from the otelwatch fake API."
MODEL = "fake-model"


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    headers: Mapping[str, str]  # lower-case names
    body: bytes

    def json(self) -> Any:
        try:
            return json.loads(self.body or b"null")
        except ValueError:
            return None

    @property
    def keep_alive(self) -> bool:
        return self.headers.get("connection", "").lower() != "close"


class BadRequest(Exception):
    pass


async def read_request(reader: asyncio.StreamReader) -> Request | None:
    """The next request on the connection; None when the peer closed it between requests."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if exc.partial.strip():
            raise BadRequest("connection closed inside the request head") from None
        return None
    except asyncio.LimitOverrunError:
        raise BadRequest("request head too large") from None
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3:
        raise BadRequest(f"bad request line {lines[0]!r}")
    method, target, _version = parts
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    if "chunked" in headers.get("transfer-encoding", "").lower():
        body = await _read_chunked(reader)
    else:
        length = int(headers.get("content-length") or 0)
        if length > MAX_BODY_BYTES:
            raise BadRequest("request body too large")
        body = await reader.readexactly(length) if length else b""
    return Request(method.upper(), target.split("?")[0], headers, body)


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    out = bytearray()
    while True:
        size = int((await reader.readline()).split(b";")[0].strip() or b"0", 16)
        if size == 0:
            while (await reader.readline()).strip():  # trailers
                pass
            return bytes(out)
        out += await reader.readexactly(size)
        await reader.readexactly(2)
        if len(out) > MAX_BODY_BYTES:
            raise BadRequest("request body too large")


def sse(event: str, data: Mapping[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


class Conn:
    """One accepted connection: writes responses, plain or chunked."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer

    async def respond(self, status: int, body: bytes = b"", content_type: str = "application/json",
                      *, head_only: bool = False) -> None:
        reason = {200: "OK", 404: "Not Found", 400: "Bad Request"}.get(status, "OK")
        self.writer.write(
            f"HTTP/1.1 {status} {reason}\r\ncontent-type: {content_type}\r\n"
            f"content-length: {len(body)}\r\n\r\n".encode()
        )
        if not head_only:
            self.writer.write(body)
        await self.writer.drain()

    async def json(self, obj: Any, status: int = 200) -> None:
        await self.respond(status, json.dumps(obj).encode())

    async def start_stream(self) -> None:
        self.writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
            b"transfer-encoding: chunked\r\n\r\n"
        )
        await self.writer.drain()

    async def chunk(self, data: bytes) -> None:
        self.writer.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        await self.writer.drain()

    async def end_stream(self) -> None:
        self.writer.write(b"0\r\n\r\n")
        await self.writer.drain()


class FakeApi:
    def __init__(self, api: str, behaviour: str, *, tool_command: str, stream_seconds: float,
                 log_path: str | None) -> None:
        self.api = api
        self.behaviour = behaviour
        self.tool_command = tool_command
        self.stream_seconds = stream_seconds
        self.log_path = log_path
        self.open_conns = 0
        self.next_conn = 0

    # ------------------------------------------------------------------ plumbing

    def log(self, **fields: Any) -> None:
        if not self.log_path:
            return
        line = json.dumps({"t": round(time.time(), 3), "open": self.open_conns, **fields}) + "\n"
        with contextlib.suppress(OSError), open(self.log_path, "a") as fh:
            fh.write(line)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.next_conn += 1
        cid = self.next_conn
        self.open_conns += 1
        self.log(event="accept", conn=cid)
        try:
            if self.behaviour == "drop":
                # An abort sends RST at once, like a proxy refusing the upstream.
                writer.transport.abort()
                self.log(event="drop", conn=cid)
                return
            conn = Conn(writer)
            while True:
                try:
                    req = await read_request(reader)
                except BadRequest as exc:
                    self.log(event="bad_request", conn=cid, error=str(exc))
                    await conn.json({"error": str(exc)}, 400)
                    return
                if req is None:
                    return
                self.log(event="request", conn=cid, method=req.method, path=req.path, bytes=len(req.body))
                keep = await self.route(req, conn, reader, cid)
                if not keep or not req.keep_alive:
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self.open_conns -= 1
            self.log(event="close", conn=cid)
            with contextlib.suppress(Exception):
                writer.close()

    async def silence(self, reader: asyncio.StreamReader, cid: int, what: str) -> bool:
        """Say nothing more until the client gives up (closes or resets the connection)."""
        self.log(event=what, conn=cid)
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while await reader.read(65536):
                pass
        self.log(event="peer_gone", conn=cid)
        return False

    # ------------------------------------------------------------------ routing

    async def route(self, req: Request, conn: Conn, reader: asyncio.StreamReader, cid: int) -> bool:
        """Answer one request; False when the connection must end."""
        if req.method == "HEAD":
            await conn.respond(200, b"", head_only=True)
            return True
        if req.method != "POST":
            await conn.json(self.models() if req.path.endswith("/models") else {})
            return True
        if self.api == "anthropic" and req.path.endswith("/v1/messages"):
            return await self.anthropic(req, conn, reader, cid)
        if self.api == "anthropic" and req.path.endswith("/count_tokens"):
            await conn.json({"input_tokens": 42})
            return True
        if self.api == "openai" and req.path.endswith("/responses"):
            return await self.openai(req, conn, reader, cid)
        if self.api in ("gemini", "chat"):  # Gemini CLI, opencode and aider: fakeapi_more
            from tests.e2e.realagents import fakeapi_more

            if self.api == "gemini" and ":" in req.path:
                return await fakeapi_more.gemini(self, req, conn, reader, cid)
            if self.api == "chat" and req.path.endswith("/chat/completions"):
                return await fakeapi_more.chat(self, req, conn, reader, cid)
        await conn.json({})
        return True

    def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [{"id": MODEL, "object": "model", "created": 0, "owned_by": "tests"}],
                "models": []}

    async def pace(self, n: int, seconds: float | None = None) -> None:
        """Spread n pieces of an answer over --stream-seconds (or `seconds`)."""
        total = self.stream_seconds if seconds is None else seconds
        if total > 0 and n > 0:
            await asyncio.sleep(total / n)

    # ------------------------------------------------------------------ Anthropic Messages

    async def anthropic(self, req: Request, conn: Conn, reader: asyncio.StreamReader, cid: int) -> bool:
        body = req.json()
        body = body if isinstance(body, dict) else {}
        stream = bool(body.get("stream"))
        behaviour = self.behaviour
        if behaviour == "by_prompt":
            behaviour = _marked_behaviour(body.get("messages"))
            self.log(event="by_prompt", conn=cid, behaviour=behaviour)
        pace_s = None
        if behaviour == "slow":
            behaviour, pace_s = "normal", SLOW_S
        if behaviour == "never_answer":
            return await self.silence(reader, cid, "never_answer")
        tool_turn = behaviour == "tool_bash" and not _has_tool_result(body.get("messages"))
        msg_id = f"msg_fake_{cid}"
        if tool_turn:
            blocks: list[dict[str, Any]] = [
                {"type": "text", "text": "Running it."},
                {"type": "tool_use", "id": f"toolu_fake_{cid}", "name": "Bash",
                 "input": {"command": self.tool_command, "description": "Run the requested command"}},
            ]
            stop = "tool_use"
        else:
            blocks = [{"type": "text", "text": ANSWER}]
            stop = "end_turn"
        self.log(event="answer", conn=cid, stream=stream, kind="tool_use" if tool_turn else "text")
        usage = {"input_tokens": 12, "output_tokens": 9, "cache_creation_input_tokens": 0,
                 "cache_read_input_tokens": 0}
        if not stream:
            if behaviour == "partial_then_silence":
                await conn.respond(200, b'{"id": "' + msg_id.encode() + b'", "type": "mess')
                return await self.silence(reader, cid, "partial_silence")
            await conn.json({"id": msg_id, "type": "message", "role": "assistant", "model": body.get("model", MODEL),
                             "content": blocks, "stop_reason": stop, "stop_sequence": None, "usage": usage})
            return True
        await conn.start_stream()
        await conn.chunk(sse("message_start", {"type": "message_start", "message": {
            "id": msg_id, "type": "message", "role": "assistant", "model": body.get("model", MODEL),
            "content": [], "stop_reason": None, "stop_sequence": None, "usage": {**usage, "output_tokens": 1}}}))
        for index, block in enumerate(blocks):
            if block["type"] == "text":
                words = block["text"].split(" ")
                await conn.chunk(sse("content_block_start", {"type": "content_block_start", "index": index,
                                                              "content_block": {"type": "text", "text": ""}}))
                for i, word in enumerate(words):
                    await self.pace(len(words), pace_s)
                    piece = word if i == 0 else " " + word
                    await conn.chunk(sse("content_block_delta", {"type": "content_block_delta", "index": index,
                                                                  "delta": {"type": "text_delta", "text": piece}}))
            else:
                await conn.chunk(sse("content_block_start", {"type": "content_block_start", "index": index,
                                                              "content_block": {**block, "input": {}}}))
                await conn.chunk(sse("content_block_delta", {"type": "content_block_delta", "index": index, "delta": {
                    "type": "input_json_delta", "partial_json": json.dumps(block["input"])}}))
            await conn.chunk(sse("content_block_stop", {"type": "content_block_stop", "index": index}))
            if behaviour == "partial_then_silence":
                # One whole block (the CLI prints it as an `assistant` line), then nothing.
                return await self.silence(reader, cid, "partial_silence")
        await conn.chunk(sse("message_delta", {"type": "message_delta", "delta": {
            "stop_reason": stop, "stop_sequence": None}, "usage": {"output_tokens": 9}}))
        await conn.chunk(sse("message_stop", {"type": "message_stop"}))
        await conn.end_stream()
        return True

    # ------------------------------------------------------------------ OpenAI Responses

    async def openai(self, req: Request, conn: Conn, reader: asyncio.StreamReader, cid: int) -> bool:
        body = req.json()
        body = body if isinstance(body, dict) else {}
        if self.behaviour == "never_answer":
            return await self.silence(reader, cid, "never_answer")
        resp_id = f"resp_fake_{cid}"
        tool = _shell_tool(body.get("tools")) if self.behaviour == "tool_bash" else None
        tool_turn = tool is not None and not _has_function_output(body.get("input"))
        model = body.get("model", MODEL)
        if tool_turn:
            assert tool is not None
            args = {"cmd": self.tool_command} if tool == "exec_command" else {
                "command": ["bash", "-lc", self.tool_command]}
            items: list[dict[str, Any]] = [{"type": "function_call", "id": f"fc_fake_{cid}", "status": "completed",
                                            "name": tool, "arguments": json.dumps(args),
                                            "call_id": f"call_fake_{cid}"}]
        else:
            items = [{"type": "message", "id": f"msg_fake_{cid}", "status": "completed", "role": "assistant",
                      "content": [{"type": "output_text", "text": ANSWER, "annotations": []}]}]
        self.log(event="answer", conn=cid, stream=bool(body.get("stream")),
                 kind="function_call" if tool_turn else "text")
        usage = {"input_tokens": 12, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": 9,
                 "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 21}
        base = {"id": resp_id, "object": "response", "created_at": int(time.time()), "model": model}
        if not body.get("stream"):
            if self.behaviour == "partial_then_silence":
                await conn.respond(200, b'{"id": "' + resp_id.encode() + b'", "obj')
                return await self.silence(reader, cid, "partial_silence")
            await conn.json({**base, "status": "completed", "output": items, "usage": usage})
            return True
        seq = iter(range(1, 1 << 30))
        await conn.start_stream()

        async def send(event: str, data: dict[str, Any]) -> None:
            await conn.chunk(sse(event, {"type": event, "sequence_number": next(seq), **data}))

        await send("response.created", {"response": {**base, "status": "in_progress", "output": []}})
        await send("response.in_progress", {"response": {**base, "status": "in_progress", "output": []}})
        for index, item in enumerate(items):
            if item["type"] == "message":
                await send("response.output_item.added", {"output_index": index, "item": {
                    **item, "status": "in_progress", "content": []}})
                words = ANSWER.split(" ")
                for i, word in enumerate(words):
                    await self.pace(len(words))
                    await send("response.output_text.delta", {"item_id": item["id"], "output_index": index,
                                                              "content_index": 0,
                                                              "delta": word if i == 0 else " " + word})
                if self.behaviour == "partial_then_silence":
                    return await self.silence(reader, cid, "partial_silence")
                await send("response.output_text.done", {"item_id": item["id"], "output_index": index,
                                                         "content_index": 0, "text": ANSWER})
            await send("response.output_item.done", {"output_index": index, "item": item})
        await send("response.completed", {"response": {**base, "status": "completed", "output": items,
                                                       "usage": usage}})
        await conn.end_stream()
        return True


def _has_tool_result(messages: Any) -> bool:
    """Whether the conversation's last user turn carries a tool_result (the tool has run)."""
    if not isinstance(messages, list) or not messages:
        return False
    last = messages[-1]
    content = last.get("content") if isinstance(last, dict) else None
    return isinstance(content, list) and any(
        isinstance(b, dict) and b.get("type") == "tool_result" for b in content
    )


def _marked_behaviour(messages: Any) -> str:
    """by_prompt: the behaviour named by the last `[fake:NAME]` marker in the last user
    message's text (a string or text blocks); a tool result answers `tool_bash` normally."""
    if not isinstance(messages, list):
        return "normal"
    for message in reversed(messages):
        if not isinstance(message, dict) or message.get("role") != "user":
            continue
        content = message.get("content")
        blocks = [{"type": "text", "text": content}] if isinstance(content, str) else content
        if not isinstance(blocks, list):
            continue
        if any(isinstance(b, dict) and b.get("type") == "tool_result" for b in blocks):
            return "tool_bash"  # the tool ran: _has_tool_result makes this a normal answer
        texts = [b["text"] for b in blocks if isinstance(b, dict) and isinstance(b.get("text"), str)]
        found = [m for text in texts for m in _MARKER.findall(text)]
        if found:
            return found[-1]
        if any(not t.startswith("<") for t in texts):  # a prompt without a marker
            return "normal"
    return "normal"


def _has_function_output(items: Any) -> bool:
    return isinstance(items, list) and any(
        isinstance(i, dict) and str(i.get("type", "")).endswith("call_output") for i in items
    )


def _shell_tool(tools: Any) -> str | None:
    """The name of the request's shell tool (Codex offers one under a version-dependent name)."""
    names = [t.get("name") for t in tools if isinstance(t, dict)] if isinstance(tools, list) else []
    for wanted in ("shell", "exec_command", "shell_command", "local_shell"):
        if wanted in names:
            return wanted
    return None


async def serve(args: argparse.Namespace) -> None:
    api = FakeApi(args.api, args.behaviour, tool_command=args.tool_command, stream_seconds=args.stream_seconds,
                  log_path=args.log)
    server = await asyncio.start_server(api.handle, args.host, args.port, limit=MAX_HEADER_BYTES,
                                        reuse_address=True)
    port = server.sockets[0].getsockname()[1]
    api.log(event="listen", port=port, api=args.api, behaviour=args.behaviour)
    sys.stdout.write(json.dumps({"ready": True, "port": port, "pid": os.getpid()}) + "\n")
    sys.stdout.flush()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # Bounded like every test helper: it stops by itself after --lifetime.
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=args.lifetime)
    server.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fakeapi", description=__doc__.splitlines()[0])
    p.add_argument("--api", choices=APIS, required=True)
    p.add_argument("--behaviour", choices=BEHAVIOURS, default="normal")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--tool-command", default="sleep 600", help="the Bash command of tool_bash")
    p.add_argument("--stream-seconds", type=float, default=0.0, help="spread a normal answer over this long")
    p.add_argument("--log", help="append one JSON line per connection event to this file")
    p.add_argument("--lifetime", type=float, default=900.0, help="exit after this many seconds")
    args = p.parse_args(argv)
    asyncio.run(serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
