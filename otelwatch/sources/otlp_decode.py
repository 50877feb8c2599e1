"""Decoding OTLP/HTTP request bodies (protobuf or JSON, gzip or not) into plain records.

Owns the wire formats of an OTLP export request as the agents send them:
`application/x-protobuf` (Claude Code, Codex) and `application/json` (Gemini
CLI), optionally `Content-Encoding: gzip`. Log records become `OtlpRecord`s
(event name, time, attributes, the resource's attributes); metrics and spans
are only counted, since what otelwatch uses of the agents' telemetry is in
their log events (the forwarder passes every signal on as it came).

Pure: no I/O, no clock. Bounded: a body inflates to at most MAX_INFLATED_BYTES
and at most MAX_RECORDS records are decoded from one request (the rest are
counted as dropped). Raises `OtlpDecodeError` (with an HTTP status) for what
cannot be read, never anything else.
"""

from __future__ import annotations

import json
import math
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

__all__ = ["MAX_INFLATED_BYTES", "MAX_RECORDS", "SIGNALS", "Decoded", "OtlpDecodeError", "OtlpRecord",
           "decode_request", "inflate"]

SIGNALS = ("logs", "metrics", "traces")
MAX_INFLATED_BYTES = 8 << 20
MAX_RECORDS = 5000
MAX_ATTRS = 128  # attributes kept per record (and per resource)
MAX_STR = 1024  # characters kept of a string attribute


class OtlpDecodeError(ValueError):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True, slots=True)
class OtlpRecord:
    """One log record: `name` is its event name (the `event.name` attribute, the record's
    own `eventName`, or a string body), `time` in Unix seconds (None: not given)."""

    name: str
    time: float | None
    attrs: Mapping[str, Any]
    resource: Mapping[str, Any]


@dataclass(frozen=True)
class Decoded:
    signal: str
    records: tuple[OtlpRecord, ...] = ()
    items: int = 0  # log records, metric data points or spans in the request
    dropped: int = 0  # log records past MAX_RECORDS
    resources: tuple[Mapping[str, Any], ...] = field(default=())


def inflate(body: bytes, encoding: str) -> bytes:
    """The body without its Content-Encoding (identity or gzip), bounded."""
    encoding = encoding.strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding not in ("gzip", "x-gzip", "deflate"):
        raise OtlpDecodeError(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, f"Content-Encoding {encoding!r} is not accepted")
    try:
        inflater = zlib.decompressobj(16 + zlib.MAX_WBITS if encoding != "deflate" else zlib.MAX_WBITS)
        out = inflater.decompress(body, MAX_INFLATED_BYTES + 1)
    except zlib.error as exc:
        raise OtlpDecodeError(HTTPStatus.BAD_REQUEST, f"body does not inflate: {exc}") from None
    if len(out) > MAX_INFLATED_BYTES or inflater.unconsumed_tail:
        raise OtlpDecodeError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                              f"body inflates past {MAX_INFLATED_BYTES} bytes")
    return out


def decode_request(signal: str, body: bytes, content_type: str, encoding: str = "") -> Decoded:
    """Decode one export request of `signal` (logs, metrics, traces)."""
    if signal not in SIGNALS:
        raise OtlpDecodeError(HTTPStatus.NOT_FOUND, f"no OTLP signal {signal!r}")
    media = content_type.split(";", 1)[0].strip().lower()
    raw = inflate(body, encoding)
    if media == "application/json":
        try:
            doc = json.loads(raw)
        except (ValueError, RecursionError, UnicodeDecodeError) as exc:
            raise OtlpDecodeError(HTTPStatus.BAD_REQUEST, f"body is not JSON: {exc}") from None
        if not isinstance(doc, dict):
            raise OtlpDecodeError(HTTPStatus.BAD_REQUEST, "an OTLP JSON body is an object")
        return _from_json(signal, doc)
    if media in ("application/x-protobuf", "application/protobuf"):
        return _from_protobuf(signal, raw)
    raise OtlpDecodeError(HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
                          "OTLP needs Content-Type application/x-protobuf or application/json")


# --------------------------------------------------------------------------- protobuf


def _from_protobuf(signal: str, raw: bytes) -> Decoded:
    from google.protobuf.message import DecodeError
    from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
    from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    classes: dict[str, Any] = {"logs": ExportLogsServiceRequest, "metrics": ExportMetricsServiceRequest,
                               "traces": ExportTraceServiceRequest}
    msg = classes[signal]()
    try:
        msg.ParseFromString(raw)
    except (DecodeError, RuntimeError, ValueError) as exc:
        raise OtlpDecodeError(HTTPStatus.BAD_REQUEST, f"body is not an OTLP {signal} protobuf: {exc}") from None
    if signal == "metrics":
        items = 0
        resources = []
        for rm in msg.resource_metrics:
            resources.append(_pb_attrs(rm.resource.attributes))
            for sm in rm.scope_metrics:
                for metric in sm.metrics:
                    kind = metric.WhichOneof("data")
                    items += len(getattr(metric, kind).data_points) if kind else 0
        return Decoded(signal, items=items, resources=tuple(resources))
    if signal == "traces":
        items = 0
        resources = []
        for rs in msg.resource_spans:
            resources.append(_pb_attrs(rs.resource.attributes))
            items += sum(len(ss.spans) for ss in rs.scope_spans)
        return Decoded(signal, items=items, resources=tuple(resources))
    records: list[OtlpRecord] = []
    items = dropped = 0
    resources = []
    for rl in msg.resource_logs:
        resource = _pb_attrs(rl.resource.attributes)
        resources.append(resource)
        for sl in rl.scope_logs:
            for lr in sl.log_records:
                items += 1
                if len(records) >= MAX_RECORDS:
                    dropped += 1
                    continue
                attrs = _pb_attrs(lr.attributes)
                body = _pb_value(lr.body) if lr.HasField("body") else None
                name = _event_name(attrs, getattr(lr, "event_name", ""), body)
                records.append(OtlpRecord(name, _nanos(lr.time_unix_nano or lr.observed_time_unix_nano),
                                          attrs, resource))
    return Decoded(signal, tuple(records), items, dropped, tuple(resources))


def _pb_attrs(kvs: Iterable[Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for n, kv in enumerate(kvs):
        if n >= MAX_ATTRS:
            break
        out[kv.key[:MAX_STR]] = _pb_value(kv.value)
    return out


def _pb_value(value: Any, depth: int = 0) -> Any:
    kind = value.WhichOneof("value")
    if kind is None:
        return None
    if kind == "string_value":
        return value.string_value[:MAX_STR]
    if kind in ("int_value", "double_value", "bool_value"):
        return getattr(value, kind)
    if depth >= 4:
        return None
    if kind == "array_value":
        return [_pb_value(v, depth + 1) for v in value.array_value.values[:MAX_ATTRS]]
    if kind == "kvlist_value":
        return {kv.key[:MAX_STR]: _pb_value(kv.value, depth + 1) for kv in value.kvlist_value.values[:MAX_ATTRS]}
    return None  # bytes: not used


# --------------------------------------------------------------------------- JSON


def _from_json(signal: str, doc: Mapping[str, Any]) -> Decoded:
    top = {"logs": "resourceLogs", "metrics": "resourceMetrics", "traces": "resourceSpans"}[signal]
    scope_key = {"logs": "scopeLogs", "metrics": "scopeMetrics", "traces": "scopeSpans"}[signal]
    records: list[OtlpRecord] = []
    items = dropped = 0
    resources = []
    for res in _list(_get(doc, top)):
        if not isinstance(res, dict):
            continue
        resource = _json_attrs((_get(res, "resource") or {}).get("attributes"))
        resources.append(resource)
        for scope in _list(_get(res, scope_key)):
            if not isinstance(scope, dict):
                continue
            if signal == "metrics":
                for metric in _list(scope.get("metrics")):
                    if isinstance(metric, dict):
                        for kind in ("sum", "gauge", "histogram", "exponentialHistogram", "summary"):
                            data = metric.get(kind)
                            if isinstance(data, dict):
                                items += len(_list(_get(data, "dataPoints")))
                continue
            if signal == "traces":
                items += len(_list(scope.get("spans")))
                continue
            for lr in _list(_get(scope, "logRecords")):
                if not isinstance(lr, dict):
                    continue
                items += 1
                if len(records) >= MAX_RECORDS:
                    dropped += 1
                    continue
                attrs = _json_attrs(lr.get("attributes"))
                body = _json_value(lr.get("body"))
                name = _event_name(attrs, _get(lr, "eventName") or "", body)
                t = _nanos(as_int(_get(lr, "timeUnixNano")) or as_int(_get(lr, "observedTimeUnixNano")))
                records.append(OtlpRecord(name, t, attrs, resource))
    return Decoded(signal, tuple(records), items, dropped, tuple(resources))


def _get(obj: Mapping[str, Any], camel: str) -> Any:
    """A field by its lowerCamelCase name (the OTLP JSON encoding) or its snake_case one."""
    if camel in obj:
        return obj[camel]
    snake = "".join("_" + c.lower() if c.isupper() else c for c in camel)
    return obj.get(snake)


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _json_attrs(kvs: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for n, kv in enumerate(_list(kvs)):
        if n >= MAX_ATTRS:
            break
        if isinstance(kv, dict) and isinstance(kv.get("key"), str):
            out[kv["key"][:MAX_STR]] = _json_value(kv.get("value"))
    return out


def _json_value(value: Any, depth: int = 0) -> Any:
    if not isinstance(value, dict):
        return None
    if "stringValue" in value or "string_value" in value:
        s = _get(value, "stringValue")
        return s[:MAX_STR] if isinstance(s, str) else None
    if "intValue" in value or "int_value" in value:
        return as_int(_get(value, "intValue"))
    if "doubleValue" in value or "double_value" in value:
        d = _get(value, "doubleValue")
        return float(d) if isinstance(d, (int, float, str)) and _is_number(d) else None
    if "boolValue" in value or "bool_value" in value:
        return bool(_get(value, "boolValue"))
    if depth >= 4:
        return None
    arr = _get(value, "arrayValue")
    if isinstance(arr, dict):
        return [_json_value(v, depth + 1) for v in _list(arr.get("values"))[:MAX_ATTRS]]
    kvl = _get(value, "kvlistValue")
    if isinstance(kvl, dict):
        return {k: v for k, v in list(_json_attrs(kvl.get("values")).items())[:MAX_ATTRS]}
    return None


def _is_number(value: Any) -> bool:
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def as_int(value: Any) -> int | None:
    """OTLP JSON writes 64-bit integers as strings (and some senders as numbers)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and math.isfinite(value):
        return int(value)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value.strip())
    return None


# --------------------------------------------------------------------------- shared


def _event_name(attrs: Mapping[str, Any], event_name: Any, body: Any) -> str:
    """`event.name` first (all three agents set it), then the record's own event name,
    then a string body (Claude Code repeats the name there)."""
    for candidate in (attrs.get("event.name"), event_name, body):
        if isinstance(candidate, str) and candidate and len(candidate) <= 128 and " " not in candidate:
            return candidate
    return ""


def _nanos(value: int | None) -> float | None:
    if not value or value <= 0:
        return None
    return value / 1e9
