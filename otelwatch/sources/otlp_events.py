"""What an agent's own OTLP log record says: the session it names, an Event, and tokens and cost.

Owns the mapping from the three agents' telemetry events (REAL_AGENTS.md, "The
agents' own OpenTelemetry") to otelwatch's vocabulary:

- Claude Code (`service.name` claude-code): `session.id` (= its transcript's id);
  `user_prompt` opens a turn; `tool_decision`, `tool_result`, `api_request`
  (tokens, cost) and `assistant_response` are progress; `api_error` (sent only
  once retries are exhausted) is a heartbeat.
- Codex (`codex_*`): `conversation.id` (= its rollout id); `codex.user_prompt`
  opens a turn; `codex.api_request` is progress when it got an answer, a retry
  heartbeat (with its attempt) when not; `codex.sse_event` is progress, and its
  `response.completed` carries the tokens.
- Gemini CLI (`gemini-cli`): resource `process.pid` and `session.id`;
  `api_request` (sent when each attempt starts) is a heartbeat, `api_error` (one
  per failed attempt) a retry heartbeat counted as an error,
  `network_retry_attempt` a retry heartbeat with its attempt, maximum and delay
  (what makes `stalled/api_retrying` exact),
  `api_response` (tokens) and `tool_call` are progress.

Anything else an agent logs (configuration, plugin loads, startup phases) is a
state event: it proves nothing about the work moving. Pure: no I/O, no clock.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from otelwatch.model import Event, EventKind
from otelwatch.sources.otlp_decode import OtlpRecord, as_int

__all__ = ["USAGE_KEYS", "RecordMeaning", "agent_of", "meaning", "usage_json"]

PROGRESS = EventKind.PROGRESS
HEARTBEAT = EventKind.HEARTBEAT
STATE = EventKind.STATE
_PREFIXES = ("claude_code.", "codex.", "gemini_cli.")
# The per-session usage figures (`usage` on /api/sessions), in this order.
USAGE_KEYS = ("input_tokens", "output_tokens", "cache_read_tokens", "cache_creation_tokens", "cost_usd",
              "api_requests", "api_errors")
MAX_NAME = 64


@dataclass(frozen=True, slots=True)
class RecordMeaning:
    """One record's part: whose it is, what happened, what it cost. The event is built
    once its provenance is known (`event_at`): own records keep their own time."""

    agent: str  # "claude-code", "codex", "gemini", or "unknown"
    session_ids: tuple[str, ...]  # ids it names, most specific first
    pid: int | None  # the sender's pid where the record says it (Gemini)
    model: str
    usage: Mapping[str, float]  # deltas of USAGE_KEYS (only those it carries)
    time: float  # the record's own time, never later than when it was seen
    source: str = ""
    spec: tuple[str, str | None, EventKind, Mapping[str, Any]] | None = None  # type, tool, kind, fields

    @property
    def event(self) -> Event | None:
        return self.event_at(self.time, self.source)

    def event_at(self, t: float, source: str) -> Event | None:
        if self.spec is None:
            return None
        typ, tool, kind, fields = self.spec
        # Own when the sender is the session's own process tree (sources/otlp.py decides).
        return Event(time=t, type=typ, kind=kind, tool=tool, source=source, own=source == OWN_SOURCE, **fields)


OWN_SOURCE = "otlp"  # sources/otlp.py's OWN: records sent from inside the session's own tree


def agent_of(resource: Mapping[str, Any]) -> str:
    service = str(resource.get("service.name") or "").lower()
    if service.startswith("claude"):
        return "claude-code"
    if service.startswith("codex"):
        return "codex"
    if service.startswith("gemini"):
        return "gemini"
    return "unknown"


def meaning(record: OtlpRecord, seen_at: float, source: str) -> RecordMeaning:
    """What `record` says, dated by its own time (never later than `seen_at`)."""
    attrs, resource = record.attrs, record.resource
    agent = agent_of(resource)
    name = record.name
    for prefix in _PREFIXES:
        if name.startswith(prefix):
            name = name[len(prefix):]
            break
    name = name[:MAX_NAME]
    ids = tuple(dict.fromkeys(
        s for s in (_str(attrs.get("session.id")), _str(attrs.get("conversation.id")),
                    _str(resource.get("session.id"))) if s))
    pid = _int(resource.get("process.pid"))
    model = _str(attrs.get("model")) or _str(attrs.get("model_name"))
    t = seen_at if record.time is None else min(record.time, seen_at)
    usage: dict[str, float] = {}
    spec = _event(agent, name, attrs, usage) if name else None
    return RecordMeaning(agent, ids, pid if pid and pid > 0 else None, model[:MAX_NAME], usage, t, source, spec)


_Spec = tuple[str, "str | None", EventKind, Mapping[str, Any]]


def _event(agent: str, name: str, attrs: Mapping[str, Any], usage: dict[str, float]) -> _Spec:
    tool = _str(attrs.get("tool_name") or attrs.get("function_name")) or None
    ev = "otlp." + name

    def mk(kind: EventKind = PROGRESS, **extra: Any) -> _Spec:
        return ev, tool, kind, extra

    if name == "user_prompt":
        return mk(turn="open", awaiting_input=False)
    if name in ("tool_decision", "tool_result", "tool_call"):
        return mk(detail=_str(attrs.get("decision") or attrs.get("success"))[:40])
    if name == "api_request":
        usage["api_requests"] = 1
        if agent == "gemini":  # sent as each attempt starts: the loop trying, not output
            return mk(HEARTBEAT)
        if agent == "codex":
            status = _int(attrs.get("http.response.status_code"))
            if status is None or status >= 400:
                usage["api_errors"] = 1
                attempt = _int(attrs.get("attempt"))
                return mk(HEARTBEAT, retry=True, retry_attempt=None if attempt is None else attempt + 1,
                          detail=f"status {status}")
            return mk()
        _add_tokens(usage, attrs, input_="input_tokens", output="output_tokens", cached="cache_read_tokens",
                    creation="cache_creation_tokens")
        cost = _float(attrs.get("cost_usd"))
        if cost is not None and cost >= 0:
            usage["cost_usd"] = cost
        return mk()
    if name == "api_response":  # Gemini: an answer arrived, with its tokens
        _add_tokens(usage, attrs, input_="input_token_count", output="output_token_count",
                    cached="cached_content_token_count", creation="")
        return mk()
    if name == "sse_event":  # Codex: the answer streaming in; the last one carries the tokens
        if _str(attrs.get("event.kind")) == "response.completed":
            _add_tokens(usage, attrs, input_="input_token_count", output="output_token_count",
                        cached="cached_token_count", creation="cache_write_token_count")
        return mk()
    if name == "api_error":
        usage["api_errors"] = 1
        status = attrs.get("status_code")
        # Gemini CLI sends one per failed attempt (another follows): the agent is retrying.
        # Claude Code sends it once its retries are exhausted: the loop alive, no retry.
        return mk(HEARTBEAT, retry=agent == "gemini",
                  detail=f"status {status}" if status is not None else _str(attrs.get("error"))[:80])
    if name == "network_retry_attempt":
        attempt, most = _int(attrs.get("attempt")), _int(attrs.get("max_attempts"))
        delay = _float(attrs.get("delay_ms"))
        return mk(HEARTBEAT, retry=True, retry_attempt=attempt, retry_max=most,
                  retry_delay_s=None if delay is None or delay < 0 else min(delay / 1000.0, 86_400.0),
                  detail=_str(attrs.get("error_type"))[:40])
    if name in ("assistant_response", "api_retries_exhausted", "turn_ttft"):
        return mk(PROGRESS if name != "api_retries_exhausted" else HEARTBEAT)
    return mk(STATE)


def _add_tokens(usage: dict[str, float], attrs: Mapping[str, Any], *, input_: str, output: str, cached: str,
                creation: str) -> None:
    for key, attr in (("input_tokens", input_), ("output_tokens", output), ("cache_read_tokens", cached),
                      ("cache_creation_tokens", creation)):
        value = _int(attrs.get(attr)) if attr else None
        if value is not None and 0 <= value < 1 << 40:
            usage[key] = value


def usage_json(totals: Mapping[str, float], model: str) -> dict[str, Any]:
    """A session's `usage` object for /api/sessions and reports."""
    out: dict[str, Any] = {k: (round(float(totals.get(k, 0.0)), 6) if k == "cost_usd" else int(totals.get(k, 0)))
                           for k in USAGE_KEYS}
    if model:
        out["model"] = model
    return out


def _str(value: Any) -> str:
    """A string attribute, printable characters only (it may reach a terminal), bounded."""
    if not isinstance(value, str):
        return ""
    value = value[:256]
    return value if value.isprintable() else "".join(c for c in value if c.isprintable())


def _int(value: Any) -> int | None:
    """A non-negative integer attribute (a pid, an attempt, a token count); None otherwise."""
    n = as_int(value)
    return n if n is not None and n >= 0 else None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and math.isfinite(value):
        return int(value)
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())
    return None


def _float(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    if isinstance(value, str):
        try:
            f = float(value)
        except ValueError:
            return None
        return f if math.isfinite(f) else None
    return None
