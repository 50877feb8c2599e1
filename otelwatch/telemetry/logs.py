"""Structured logs: one JSON object per line to a stream, mirrored as OTel log records.

Owns the log line shape: `{"time": RFC 3339 UTC, "level", "event", ...fields}`.
Writing is serialized (the SDK's exporter threads log too) and never raises:
a closed or broken stream loses the line, never the tick. This module must
never touch /proc.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import math
import threading
import time
from collections.abc import Mapping
from typing import IO, Any

from opentelemetry._logs import SeverityNumber

LEVELS: Mapping[str, SeverityNumber] = {
    "debug": SeverityNumber.DEBUG,
    "info": SeverityNumber.INFO,
    "warning": SeverityNumber.WARN,
    "error": SeverityNumber.ERROR,
}
_RESERVED = ("time", "level", "event")


def _jsonable(value: Any) -> Any:
    """Plain JSON values (enums by value, tuples as lists, NaN/inf as null)."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_jsonable(v) for v in value]
    to_json = getattr(value, "to_json", None)
    if callable(to_json):
        return _jsonable(to_json())
    enum_value = getattr(value, "value", None)
    if isinstance(enum_value, (str, int)):
        return enum_value
    return str(value)


def format_time(t: float) -> str:
    stamp = _dt.datetime.fromtimestamp(t, tz=_dt.timezone.utc)
    return stamp.strftime("%Y-%m-%dT%H:%M:%S.") + f"{stamp.microsecond // 1000:03d}Z"


def build_record(event: str, fields: Mapping[str, Any], level: str, t: float) -> dict[str, Any]:
    record: dict[str, Any] = {"time": format_time(t), "level": level, "event": event}
    for key, value in fields.items():
        name = str(key)
        record[f"field_{name}" if name in _RESERVED else name] = _jsonable(value)
    return record


class JsonLog:
    """JSON lines to `stream`; with an OTel logger, also one log record per line."""

    def __init__(self, stream: IO[str], otel_logger: Any = None) -> None:
        self._stream = stream
        self._otel = otel_logger
        self._lock = threading.Lock()
        self.lines_dropped = 0

    def emit(self, event: str, fields: Mapping[str, Any], level: str = "info",
             t: float | None = None, otel: bool = True) -> dict[str, Any]:
        level = level if level in LEVELS else "info"
        now = time.time() if t is None else t
        record = build_record(event, fields, level, now)
        line = json.dumps(record, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
        with self._lock:
            try:
                self._stream.write(line + "\n")
                self._stream.flush()
            except (OSError, ValueError):  # closed or broken stream: drop, count, go on
                self.lines_dropped += 1
        if otel and self._otel is not None:
            body = {k: v for k, v in record.items() if k != "time"}
            try:
                self._otel.emit(
                    timestamp=int(now * 1e9),
                    severity_number=LEVELS[level],
                    severity_text=level.upper(),
                    body=_otel_value(body),
                    attributes={"event.name": event},
                    event_name=event,
                )
            except Exception:  # the OTel mirror is best effort
                self.lines_dropped += 1
        return record


class JsonLogHandler(logging.Handler):
    """Routes the standard library's `logging` into the same JSON lines and OTel log
    records as every other otelwatch log line, with its level: event "log", the
    logger's name and the message as fields. Installed on the "otelwatch" logger only:
    the OTel SDK's own loggers report export failures, and mirroring those into the
    logs exporter could feed a failing exporter its own failures."""

    def __init__(self, log: JsonLog, level: int = logging.INFO) -> None:
        super().__init__(level)
        self._json = log

    def emit(self, record: logging.LogRecord) -> None:
        try:
            fields: dict[str, Any] = {"logger": record.name, "message": record.getMessage()}
            if record.exc_info and record.exc_info[0] is not None:
                fields["exception"] = logging.Formatter().formatException(record.exc_info)
            self._json.emit("log", fields, _level_name(record.levelno), t=record.created)
        except Exception:  # a log line must never raise into the code that logged it
            self.handleError(record)


def _level_name(levelno: int) -> str:
    if levelno >= logging.ERROR:
        return "error"
    if levelno >= logging.WARNING:
        return "warning"
    return "info" if levelno >= logging.INFO else "debug"


def _otel_value(value: Any) -> Any:
    """OTel AnyValue: no None inside maps or lists (the proto has no null)."""
    if isinstance(value, Mapping):
        return {k: _otel_value(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_otel_value(v) for v in value if v is not None]
    return value
