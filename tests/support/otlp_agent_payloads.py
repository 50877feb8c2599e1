"""OTLP export requests shaped as the three agents send them (REAL_AGENTS.md, measured
2026-12-07): Claude Code and Codex as protobuf, Gemini CLI as JSON. The attribute
names and event names are the ones captured from the real CLIs."""

from __future__ import annotations

import json
import time
from typing import Any

from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue


def _any(value: Any) -> AnyValue:
    if isinstance(value, bool):
        return AnyValue(bool_value=value)
    if isinstance(value, int):
        return AnyValue(int_value=value)
    if isinstance(value, float):
        return AnyValue(double_value=value)
    return AnyValue(string_value=str(value))


def _kvs(attrs: dict[str, Any]) -> list[KeyValue]:
    return [KeyValue(key=k, value=_any(v)) for k, v in attrs.items()]


def logs_pb(resource: dict[str, Any], records: list[tuple[str, dict[str, Any]]], *, t: float | None = None,
            body_name: bool = True) -> bytes:
    """An ExportLogsServiceRequest: one resource, one scope, a record per (event name, attributes)."""
    req = ExportLogsServiceRequest()
    rl = req.resource_logs.add()
    rl.resource.attributes.extend(_kvs(resource))
    sl = rl.scope_logs.add()
    sl.scope.name = "com.anthropic.claude_code.events"
    base = time.time() if t is None else t
    for n, (name, attrs) in enumerate(records):
        lr = sl.log_records.add()
        lr.time_unix_nano = int((base + n * 0.001) * 1e9)
        lr.observed_time_unix_nano = lr.time_unix_nano
        if body_name:
            lr.body.string_value = name
        lr.attributes.extend(_kvs(attrs))
    return req.SerializeToString()


def metrics_pb(resource: dict[str, Any], name: str, value: float, attrs: dict[str, Any]) -> bytes:
    req = ExportMetricsServiceRequest()
    rm = req.resource_metrics.add()
    rm.resource.attributes.extend(_kvs(resource))
    metric = rm.scope_metrics.add().metrics.add()
    metric.name = name
    metric.sum.is_monotonic = True
    metric.sum.aggregation_temporality = 1  # delta, as Claude Code sends it
    point = metric.sum.data_points.add()
    point.as_double = value
    point.time_unix_nano = int(time.time() * 1e9)
    point.attributes.extend(_kvs(attrs))
    return req.SerializeToString()


CLAUDE_RESOURCE = {"service.name": "claude-code", "service.version": "2.1.330", "os.type": "linux"}
CODEX_RESOURCE = {"service.name": "codex_exec", "service.version": "0.169.0"}


def claude_turn(session_id: str) -> list[tuple[str, dict[str, Any]]]:
    common = {"session.id": session_id, "terminal.type": "non-interactive"}
    return [
        ("claude_code.user_prompt", {**common, "event.name": "user_prompt", "prompt_length": 5}),
        ("claude_code.api_request", {**common, "event.name": "api_request", "model": "claude-opus-5-5",
                                     "input_tokens": 12, "output_tokens": 9, "cache_read_tokens": 3,
                                     "cache_creation_tokens": 0, "cost_usd": 0.000228, "duration_ms": 25}),
        ("claude_code.tool_decision", {**common, "event.name": "tool_decision", "tool_name": "Bash",
                                       "decision": "accept"}),
        ("claude_code.tool_result", {**common, "event.name": "tool_result", "tool_name": "Bash",
                                     "success": "true", "duration_ms": 12}),
    ]


def codex_turn(conversation_id: str) -> list[tuple[str, dict[str, Any]]]:
    common = {"conversation.id": conversation_id, "model": "fake-model"}
    return [
        ("", {**common, "event.name": "codex.user_prompt", "prompt_length": "5"}),
        ("", {**common, "event.name": "codex.api_request", "http.response.status_code": "200", "attempt": "0"}),
        ("", {**common, "event.name": "codex.sse_event", "event.kind": "response.completed",
              "input_token_count": "12", "output_token_count": "9", "cached_token_count": "0"}),
    ]


def gemini_json(session_id: str, pid: int, records: list[tuple[str, dict[str, Any]]], t: float | None = None) -> bytes:
    """OTLP/HTTP JSON as Gemini CLI sends it: 64-bit integers as strings, camelCase keys."""
    def kv(k: str, v: Any) -> dict[str, Any]:
        if isinstance(v, bool):
            val: dict[str, Any] = {"boolValue": v}
        elif isinstance(v, int):
            val = {"intValue": str(v)} if k != "attempt" else {"intValue": v}
        elif isinstance(v, float):
            val = {"doubleValue": v}
        else:
            val = {"stringValue": str(v)}
        return {"key": k, "value": val}

    base = time.time() if t is None else t
    return json.dumps({"resourceLogs": [{
        "resource": {"attributes": [kv("service.name", "gemini-cli"), kv("session.id", session_id),
                                    kv("process.pid", pid)]},
        "scopeLogs": [{"scope": {"name": "gemini-cli"}, "logRecords": [
            {"timeUnixNano": str(int((base + n * 0.001) * 1e9)), "body": {"stringValue": f"event {name}"},
             "attributes": [kv("session.id", session_id), kv("event.name", name)] + [kv(k, v) for k, v in a.items()]}
            for n, (name, a) in enumerate(records)
        ]}],
    }]}).encode()


def gemini_retries(session_id: str, pid: int, attempts: int, t: float | None = None) -> bytes:
    records: list[tuple[str, dict[str, Any]]] = []
    for attempt in range(1, attempts + 1):
        records += [
            ("gemini_cli.api_request", {"model": "gemini-3.5-flash"}),
            ("gemini_cli.api_error", {"model": "gemini-3.5-flash", "error": "fetch failed", "duration_ms": 4}),
            ("gemini_cli.network_retry_attempt", {"attempt": attempt, "max_attempts": 5,
                                                  "error_type": "FETCH_FAILED", "delay_ms": 4609.7}),
        ]
    return gemini_json(session_id, pid, records, t)


def post(port: int, path: str, body: bytes, content_type: str, *, encoding: str = "", chunked: bool = False,
         chunk: int = 700, timeout: float = 5.0) -> tuple[int, bytes]:
    """One OTLP/HTTP POST over a raw socket (so a chunked body is really sent in chunks)."""
    import socket

    head = [f"POST {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", f"Content-Type: {content_type}",
            "Connection: close"]
    if encoding:
        head.append(f"Content-Encoding: {encoding}")
    head.append("Transfer-Encoding: chunked" if chunked else f"Content-Length: {len(body)}")
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
        if chunked:
            for i in range(0, len(body), chunk):
                part = body[i:i + chunk]
                s.sendall(f"{len(part):x}\r\n".encode() + part + b"\r\n")
            s.sendall(b"0\r\n\r\n")
        else:
            s.sendall(body)
        buf = b""
        while True:
            data = s.recv(65536)
            if not data:
                break
            buf += data
    status_line, _, rest = buf.partition(b"\r\n")
    return int(status_line.split()[1]), rest.partition(b"\r\n\r\n")[2]


# A process that posts the bodies named on its command line (JSON list of
# [path, file, content type, encoding, chunked]) and then stays alive, printing each
# status: a session's own process sending its telemetry.
SENDER = """
import json, sys, time
from tests.support.otlp_agent_payloads import post
port = int(sys.argv[1])
for path, file, ctype, enc, chunked in json.loads(sys.argv[2]):
    status, _ = post(port, path, open(file, "rb").read(), ctype, encoding=enc, chunked=chunked)
    print(status, flush=True)
print("done", flush=True)
time.sleep(120)
"""
