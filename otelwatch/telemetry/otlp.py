"""OTLP wiring: where to send (config + standard OTEL_* variables) and exporters
that count their failures.

`resolve_otlp` is pure (config and an environment mapping in, settings out).
The exporter wrappers run on the SDK's background threads (periodic metric
reader, batch span/log processors); they never raise into those threads and
never block the collector loop. This module must never touch /proc.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from opentelemetry.sdk._logs.export import LogRecordExporter, LogRecordExportResult
from opentelemetry.sdk.metrics import (
    Counter,
    Histogram,
    ObservableCounter,
    ObservableGauge,
    ObservableUpDownCounter,
    UpDownCounter,
)
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    MetricExporter,
    MetricExportResult,
    MetricsData,
)
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from otelwatch.config import Config

GRPC = "grpc"
HTTP = "http/protobuf"
SIGNALS = ("metrics", "traces", "logs")
_DEFAULT_BASE = {GRPC: "http://localhost:4317", HTTP: "http://localhost:4318"}

# Cumulative everywhere: Prometheus-style backends need it and a lost push
# then loses nothing (the next one carries the totals).
CUMULATIVE: dict[type, AggregationTemporality] = {
    kind: AggregationTemporality.CUMULATIVE
    for kind in (Counter, UpDownCounter, Histogram, ObservableCounter,
                 ObservableUpDownCounter, ObservableGauge)
}


@dataclass(frozen=True)
class SignalTarget:
    endpoint: str
    protocol: str


@dataclass(frozen=True)
class OtlpSettings:
    """Resolved OTLP export settings; a signal missing from `targets` is not exported."""

    enabled: bool
    targets: Mapping[str, SignalTarget] = field(default_factory=dict)
    headers: Mapping[str, str] = field(default_factory=dict)
    timeout_s: float = 5.0
    interval_s: float = 15.0
    insecure: bool | None = None


def _env(environ: Mapping[str, str], name: str) -> str:
    return environ.get(name, "").strip()


def parse_key_values(text: str) -> dict[str, str]:
    """`k1=v1,k2=v2` with percent-encoded values (OTEL_RESOURCE_ATTRIBUTES, *_HEADERS)."""
    out: dict[str, str] = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        if sep and key.strip():
            out[urllib.parse.unquote(key.strip())] = urllib.parse.unquote(value.strip())
    return out


def resolve_otlp(cfg: Config, environ: Mapping[str, str]) -> OtlpSettings:
    """Which signals go where. Precedence: config, then the signal's own
    OTEL_EXPORTER_OTLP_<SIGNAL>_* variable, then the general one, then the
    SDK default port for the protocol."""
    ocfg = cfg.export.otlp
    general = _env(environ, "OTEL_EXPORTER_OTLP_ENDPOINT")
    enabled = ocfg.enabled or bool(general) or bool(_env(environ, "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT"))
    if _env(environ, "OTEL_SDK_DISABLED").lower() == "true":
        enabled = False
    interval_s = export_interval(cfg, environ)
    settings = OtlpSettings(enabled=False, timeout_s=ocfg.timeout, interval_s=interval_s)
    if not enabled:
        return settings
    targets: dict[str, SignalTarget] = {}
    for signal in SIGNALS:
        upper = signal.upper()
        chooser = _env(environ, f"OTEL_{upper}_EXPORTER").lower()
        if chooser == "none":
            continue
        protocol = (ocfg.protocol or _env(environ, f"OTEL_EXPORTER_OTLP_{upper}_PROTOCOL")
                    or _env(environ, "OTEL_EXPORTER_OTLP_PROTOCOL") or GRPC)
        if protocol not in (GRPC, HTTP):
            protocol = GRPC
        own = _env(environ, f"OTEL_EXPORTER_OTLP_{upper}_ENDPOINT")
        if ocfg.endpoint:
            endpoint = _signal_url(ocfg.endpoint, protocol, signal)
        elif own:
            endpoint = own  # a signal endpoint is used as given (spec)
        elif general:
            endpoint = _signal_url(general, protocol, signal)
        elif signal == "logs":
            # Logs go out only to an endpoint someone named; the JSON lines on
            # stderr are the default log channel.
            continue
        else:
            endpoint = _signal_url(_DEFAULT_BASE[protocol], protocol, signal)
        targets[signal] = SignalTarget(endpoint, protocol)
    insecure_text = _env(environ, "OTEL_EXPORTER_OTLP_INSECURE").lower()
    return OtlpSettings(
        enabled=bool(targets),
        targets=targets,
        headers=parse_key_values(_env(environ, "OTEL_EXPORTER_OTLP_HEADERS")),
        timeout_s=ocfg.timeout,
        interval_s=interval_s,
        insecure=None if not insecure_text else insecure_text == "true",
    )


# The config's bounds for export.otlp.interval, applied to the variable too.
_INTERVAL_RANGE_S = (0.1, 86400.0)
DEFAULT_INTERVAL_S = 15.0


def export_interval(cfg: Config, environ: Mapping[str, str]) -> float:
    """Seconds between metric exports: `export.otlp.interval` when the config sets it,
    else OTEL_METRIC_EXPORT_INTERVAL (milliseconds, the spec's unit), else 15 s. A
    variable that is not a number, or outside the config's bounds, is ignored (the
    SDK does the same with a bad value): the environment never stops the daemon."""
    if cfg.export.otlp.interval is not None:
        return cfg.export.otlp.interval
    text = _env(environ, "OTEL_METRIC_EXPORT_INTERVAL")
    try:
        seconds = float(text) / 1000.0
    except ValueError:
        return DEFAULT_INTERVAL_S
    lo, hi = _INTERVAL_RANGE_S
    return seconds if lo <= seconds <= hi else DEFAULT_INTERVAL_S


def _signal_url(base: str, protocol: str, signal: str) -> str:
    if protocol == GRPC:
        return base
    return base.rstrip("/") + f"/v1/{signal}"


# --------------------------------------------------------------------------- failures

# The SDK's OTLP exporters log an ERROR line per failed export (every interval,
# forever, with a dead backend). We take those lines over: the text becomes
# the `error` of our own rate-limited line and the record is dropped.
_SDK_EXPORT_LOGGERS = (
    "opentelemetry.exporter.otlp.proto.grpc.exporter",
    "opentelemetry.exporter.otlp.proto.http.metric_exporter",
    "opentelemetry.exporter.otlp.proto.http.trace_exporter",
    "opentelemetry.exporter.otlp.proto.http._log_exporter",
)
_SIGNAL_WORDS = {"metrics": ("metric",), "traces": ("trace", "span"), "logs": ("log",)}


class _SdkExportErrors(logging.Filter):
    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self._last: dict[str, str] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        try:
            text = record.getMessage()
        except Exception:
            return True
        lowered = text.lower()
        if "export" not in lowered and "retry" not in lowered:
            return True
        with self._lock:
            for signal, words in _SIGNAL_WORDS.items():
                if any(w in lowered for w in words):
                    self._last[signal] = text[:300]
        return False

    def last(self, signal: str) -> str:
        with self._lock:
            return self._last.get(signal, "")


SDK_EXPORT_ERRORS = _SdkExportErrors()


def capture_sdk_export_errors() -> None:
    """Install the filter once per process (idempotent)."""
    for name in _SDK_EXPORT_LOGGERS:
        logger = logging.getLogger(name)
        if SDK_EXPORT_ERRORS not in logger.filters:
            logger.addFilter(SDK_EXPORT_ERRORS)


class FailureReporter:
    """Counts export failures and logs at most one line per `interval_s` per signal."""

    def __init__(self, count: Callable[[str], None], log: Callable[[str, Mapping[str, Any]], None],
                 interval_s: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._count = count
        self._log = log
        self._interval = interval_s
        self._clock = clock
        self._lock = threading.Lock()
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def failed(self, signal: str, endpoint: str, error: str) -> None:
        with self._lock:
            now = self._clock()
            last = self._last.get(signal)
            emit = last is None or now - last >= self._interval
            if emit:
                self._last[signal] = now
                suppressed = self._suppressed.pop(signal, 0)
            else:
                self._suppressed[signal] = self._suppressed.get(signal, 0) + 1
        with contextlib.suppress(Exception):  # counting must never break an exporter thread
            self._count(signal)
        if emit:
            self._log("otlp_export_failed", {
                "signal": signal, "endpoint": endpoint, "error": error,
                "suppressed_since_last": suppressed,
            })


# --------------------------------------------------------------------------- exporters


def _make_exporter(signal: str, target: SignalTarget, settings: OtlpSettings) -> Any:
    """The SDK's OTLP exporter for one signal (imported lazily: grpc is heavy)."""
    timeout = settings.timeout_s
    headers = dict(settings.headers) or None
    if target.protocol == GRPC:
        grpc_kwargs: dict[str, Any] = {"endpoint": target.endpoint, "timeout": timeout, "headers": headers}
        if settings.insecure is not None:
            grpc_kwargs["insecure"] = settings.insecure
        if signal == "metrics":
            from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
            return OTLPMetricExporter(preferred_temporality=CUMULATIVE, **grpc_kwargs)
        if signal == "traces":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
            return OTLPSpanExporter(**grpc_kwargs)
        from opentelemetry.exporter.otlp.proto.grpc._log_exporter import OTLPLogExporter
        return OTLPLogExporter(**grpc_kwargs)
    http_kwargs: dict[str, Any] = {"endpoint": target.endpoint, "timeout": timeout, "headers": headers}
    if signal == "metrics":
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import (
            OTLPMetricExporter as HttpMetricExporter,
        )
        return HttpMetricExporter(preferred_temporality=CUMULATIVE, **http_kwargs)
    if signal == "traces":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
            OTLPSpanExporter as HttpSpanExporter,
        )
        return HttpSpanExporter(**http_kwargs)
    from opentelemetry.exporter.otlp.proto.http._log_exporter import (
        OTLPLogExporter as HttpLogExporter,
    )
    return HttpLogExporter(**http_kwargs)


def _counted(signal: str, endpoint: str, failures: FailureReporter, export: Callable[[], Any],
             success: Any, failure: Any) -> Any:
    """Run one export; a failed or raising one is counted (and logged, rate limited)."""
    try:
        result = export()
    except Exception as exc:  # an exporter bug must not kill the SDK's export thread
        failures.failed(signal, endpoint, repr(exc))
        return failure
    if result is not success:
        failures.failed(signal, endpoint, SDK_EXPORT_ERRORS.last(signal) or "export failed")
    return result


class CountingMetricExporter(MetricExporter):
    """Delegates to an OTLP metric exporter, counting failed exports."""

    def __init__(self, inner: MetricExporter, endpoint: str, failures: FailureReporter) -> None:
        super().__init__(preferred_temporality=CUMULATIVE)
        self._inner = inner
        self._endpoint = endpoint
        self._failures = failures

    def export(self, metrics_data: MetricsData, timeout_millis: float = 10_000,
               **kwargs: Any) -> MetricExportResult:
        return _counted("metrics", self._endpoint, self._failures,
                        lambda: self._inner.export(metrics_data, timeout_millis=timeout_millis, **kwargs),
                        MetricExportResult.SUCCESS, MetricExportResult.FAILURE)

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return bool(self._inner.force_flush(timeout_millis=timeout_millis))

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        self._inner.shutdown(timeout_millis=timeout_millis, **kwargs)


class CountingSpanExporter(SpanExporter):
    def __init__(self, inner: SpanExporter, endpoint: str, failures: FailureReporter) -> None:
        self._inner = inner
        self._endpoint = endpoint
        self._failures = failures

    def export(self, spans: Sequence[Any]) -> SpanExportResult:
        return _counted("traces", self._endpoint, self._failures, lambda: self._inner.export(spans),
                        SpanExportResult.SUCCESS, SpanExportResult.FAILURE)

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return bool(self._inner.force_flush(timeout_millis))

    def shutdown(self) -> None:
        self._inner.shutdown()


class CountingLogExporter(LogRecordExporter):
    def __init__(self, inner: LogRecordExporter, endpoint: str, failures: FailureReporter) -> None:
        self._inner = inner
        self._endpoint = endpoint
        self._failures = failures

    def export(self, batch: Sequence[Any]) -> LogRecordExportResult:
        return _counted("logs", self._endpoint, self._failures, lambda: self._inner.export(batch),
                        LogRecordExportResult.SUCCESS, LogRecordExportResult.FAILURE)

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return bool(self._inner.force_flush(timeout_millis))

    def shutdown(self) -> None:
        self._inner.shutdown()


def counting_exporter(signal: str, target: SignalTarget, settings: OtlpSettings,
                      failures: FailureReporter) -> Any:
    capture_sdk_export_errors()
    inner = _make_exporter(signal, target, settings)
    if signal == "metrics":
        return CountingMetricExporter(inner, target.endpoint, failures)
    if signal == "traces":
        return CountingSpanExporter(inner, target.endpoint, failures)
    return CountingLogExporter(inner, target.endpoint, failures)
