"""`Telemetry`: the one place the daemon hands its view to, for every exporter.

One MeterProvider with two readers (the Prometheus reader behind /metrics and,
when OTLP is on, a periodic OTLP reader), one TracerProvider for incident
spans, one LoggerProvider mirroring the JSON log lines, all sharing one
Resource. The daemon calls `update()` once per tick with the latest
snapshots; every gauge reads only that. Exports run on the SDK's own threads
with bounded queues and timeouts, so a dead backend never blocks the tick and
never grows memory. This module must never touch /proc.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import IO, Any, Protocol

from opentelemetry.sdk._logs import LoggerProvider
from opentelemetry.sdk._logs.export import BatchLogRecordProcessor
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.trace import SpanLimits, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

from otelwatch import __version__
from otelwatch.config import Config
from otelwatch.model import RecoveryStatus, RecoveryStep, SessionSnapshot, State
from otelwatch.telemetry import instruments as names
from otelwatch.telemetry.exposition import SessionExposition
from otelwatch.telemetry.incidents import Incidents
from otelwatch.telemetry.instruments import AsyncStatePruner, SessionGauges
from otelwatch.telemetry.logs import JsonLog, JsonLogHandler
from otelwatch.telemetry.otlp import FailureReporter, OtlpSettings, counting_exporter, resolve_otlp
from otelwatch.telemetry.prometheus import PrometheusEndpoint
from otelwatch.telemetry.resource import build_resource

SCOPE = "otelwatch"
# Bounded queues: with a dead backend the oldest data is dropped, memory stays flat.
SPAN_QUEUE = 2048
LOG_QUEUE = 2048
EXPORT_BATCH = 512
SPAN_EVENTS = 128
_FAILED_STATUSES = frozenset({RecoveryStatus.UNKILLABLE, RecoveryStatus.FAILED})


class TelemetrySink(Protocol):
    """The telemetry protocol: what the loop (`daemon.Watcher`) and the sources hub hand
    their view to. `Telemetry` is the production one; the loop guards every call, so an
    implementation may raise without taking a tick down."""

    def update(self, snapshots: Sequence[SessionSnapshot]) -> None: ...
    def on_tick(self, duration_s: float) -> None: ...
    def on_probe_problem(self, kind: str, timeout: bool) -> None: ...
    def on_transition(self, snap: SessionSnapshot, old_state: State | None) -> None: ...
    def on_report(self, snap: SessionSnapshot, report: Mapping[str, Any]) -> None: ...
    def on_recovery_step(self, step: RecoveryStep) -> None: ...
    def on_session_end(self, snap: SessionSnapshot, summary: Mapping[str, Any]) -> None: ...
    def log(self, event: str, fields: Mapping[str, Any], level: str = "info") -> None: ...
    def shutdown(self, timeout: float = 2.0) -> None: ...


class Telemetry:
    """Metrics, incident traces and structured logs for otelwatch (see DESIGN.md).

    `meter_provider` / `tracer_provider`: by default Telemetry builds its own (Prometheus
    and OTLP readers, OTLP span export, per [export]). A provider passed in is used as
    it is, with the caller's readers or processors (no Prometheus endpoint, no OTLP
    export of that signal), so tests read what was recorded through the public SDK.
    `shutdown()` shuts it down too: Telemetry is its only user."""

    def __init__(self, cfg: Config, *, environ: Mapping[str, str] | None = None,
                 log_stream: IO[str] | None = None, service_instance_id: str | None = None,
                 meter_provider: MeterProvider | None = None,
                 tracer_provider: TracerProvider | None = None, clock: Callable[[], float] = time.time) -> None:
        env: Mapping[str, str] = os.environ if environ is None else environ
        self._clock = clock  # the watcher's wall clock (spans and log lines that carry no time)
        self.resource = build_resource(env, service_instance_id)
        self.otlp: OtlpSettings = resolve_otlp(cfg, env)
        self._closed = False
        self._close_lock = threading.Lock()

        # Logs first: exporter failures are reported through them.
        self.logger_provider: LoggerProvider | None = None
        otel_logger = None
        if "logs" in self.otlp.targets:
            self.logger_provider = LoggerProvider(resource=self.resource, shutdown_on_exit=False)
            otel_logger = self.logger_provider.get_logger(SCOPE, __version__)
        self._log = JsonLog(log_stream if log_stream is not None else sys.stderr, otel_logger)
        self.failures = FailureReporter(self.count_export_failure, self._log_export_failure)
        self._exporters: list[Any] = []

        readers: list[MetricReader] = []
        self.prometheus: PrometheusEndpoint | None = None
        if cfg.export.prometheus.enabled and meter_provider is None:
            self.prometheus = PrometheusEndpoint()
            readers.append(self.prometheus.reader)
        self._otlp_reader: PeriodicExportingMetricReader | None = None
        if "metrics" in self.otlp.targets and meter_provider is None:
            exporter = counting_exporter("metrics", self.otlp.targets["metrics"], self.otlp, self.failures)
            self._exporters.append(exporter)
            self._otlp_reader = PeriodicExportingMetricReader(
                exporter,
                export_interval_millis=self.otlp.interval_s * 1000,
                export_timeout_millis=self.otlp.timeout_s * 1000,
            )
            readers.append(self._otlp_reader)
        self.meter_provider = meter_provider or MeterProvider(
            metric_readers=readers, resource=self.resource, views=names.views(),
            shutdown_on_exit=False)
        meter = self.meter_provider.get_meter(SCOPE, __version__)

        self._state = meter.create_counter(
            names.SESSION_STATE, unit="{transition}", description="Transitions into a state")
        self._stalled = meter.create_counter(
            names.SESSION_STALLED, unit="{report}", description="Stalled reports (backed off)")
        self._stuck = meter.create_counter(
            names.SESSION_STUCK, unit="{report}", description="Stuck reports (backed off)")
        self._stalled_age = meter.create_histogram(
            names.SESSION_STALLED_AGE, unit="s", description="Progress silence at each stalled report")
        self._stuck_age = meter.create_histogram(
            names.SESSION_STUCK_AGE, unit="s", description="Progress silence at each stuck report")
        self._rec_requested = meter.create_counter(
            names.RECOVERY_REQUESTED, unit="{recovery}", description="Recoveries requested")
        self._rec_completed = meter.create_counter(
            names.RECOVERY_COMPLETED, unit="{recovery}", description="Recoveries completed, by status")
        self._rec_duration = meter.create_histogram(
            names.RECOVERY_DURATION, unit="s", description="Recovery duration, request to result")
        self._tick = meter.create_histogram(
            names.TICK_DURATION, unit="s", description="Duration of one collector tick")
        self._probe_timeouts = meter.create_counter(
            names.PROBE_TIMEOUTS, unit="{timeout}", description="Probes that overran their deadline")
        self._probe_errors = meter.create_counter(
            names.PROBE_ERRORS, unit="{error}", description="Probes that failed")
        self._export_failures = meter.create_counter(
            names.EXPORT_FAILURES, unit="{failure}", description="Failed OTLP exports by signal")
        self._agent_tokens = meter.create_counter(
            names.AGENT_TOKENS, unit="{token}", description="Tokens the agents' own telemetry reported")
        self._agent_cost = meter.create_counter(
            names.AGENT_COST, unit="{USD}", description="Cost in US dollars the agents' own telemetry reported")
        self._agent_requests = meter.create_counter(
            names.AGENT_API_REQUESTS, unit="{request}", description="Model API requests the agents reported")
        self._agent_errors = meter.create_counter(
            names.AGENT_API_ERRORS, unit="{error}", description="Failed model API attempts the agents reported")
        self.gauges = SessionGauges(meter)
        self._pruner = AsyncStatePruner(self.meter_provider)
        # Who reads the per-session gauges: /metrics renders them from the snapshots
        # (exposition.py); the SDK's observations are built only for a reader that needs
        # them (OTLP metrics, or the caller's provider), not on every tick for nobody.
        self.session_metrics: SessionExposition | None = (
            SessionExposition() if self.prometheus is not None else None)
        self._sdk_gauges = self._otlp_reader is not None or meter_provider is not None

        # At most SPAN_EVENTS events per open incident, whatever the environment says.
        self.tracer_provider = tracer_provider or TracerProvider(
            resource=self.resource, shutdown_on_exit=False,
            span_limits=SpanLimits(max_events=SPAN_EVENTS))
        if "traces" in self.otlp.targets and tracer_provider is None:
            exporter = counting_exporter("traces", self.otlp.targets["traces"], self.otlp, self.failures)
            self._exporters.append(exporter)
            self.tracer_provider.add_span_processor(BatchSpanProcessor(
                exporter, max_queue_size=SPAN_QUEUE, max_export_batch_size=EXPORT_BATCH,
                schedule_delay_millis=1000, export_timeout_millis=self.otlp.timeout_s * 1000))
        self.incidents = Incidents(self.tracer_provider.get_tracer(SCOPE, __version__), clock)

        if self.logger_provider is not None:
            exporter = counting_exporter("logs", self.otlp.targets["logs"], self.otlp, self.failures)
            self._exporters.append(exporter)
            self.logger_provider.add_log_record_processor(BatchLogRecordProcessor(
                exporter, max_queue_size=LOG_QUEUE, max_export_batch_size=EXPORT_BATCH,
                schedule_delay_millis=1000, export_timeout_millis=self.otlp.timeout_s * 1000))

    # ------------------------------------------------------------------ per tick

    def update(self, snapshots: Sequence[SessionSnapshot]) -> None:
        """The latest view of every session; gauges read only this until the next call."""
        if self.session_metrics is not None:
            self.session_metrics.update(snapshots)
        stale = self.gauges.update(snapshots, per_session=self._sdk_gauges)
        if stale:
            self._pruner.prune({self.gauges.instruments[name]: keys for name, keys in stale.items()})
        self.incidents.end_missing(snapshots, self._clock())

    def on_tick(self, duration_s: float) -> None:
        self._tick.record(max(0.0, float(duration_s)))

    def on_probe_problem(self, kind: str, timeout: bool) -> None:
        (self._probe_timeouts if timeout else self._probe_errors).add(1, {"kind": kind})

    # ------------------------------------------------------------------ session events

    def on_transition(self, snap: SessionSnapshot, old_state: State | None) -> None:
        self._state.add(1, {"agent": snap.agent, "state": snap.state.value, "reason": snap.reason.value})
        self.incidents.transition(snap, old_state)
        self._log.emit("session_state", {
            "session_id": snap.session_id, "agent": snap.agent, "pid": snap.pid,
            "from": None if old_state is None else old_state.value,
            "state": snap.state.value, "reason": snap.reason.value,
            "silence_s": round(snap.silence_s, 3),
        })

    def on_report(self, snap: SessionSnapshot, report: Mapping[str, Any]) -> None:
        attrs = {"agent": snap.agent, "reason": snap.reason.value}
        silence = max(0.0, float(snap.silence_s))
        if snap.state is State.STUCK:
            self._stuck.add(1, attrs)
            self._stuck_age.record(silence, attrs)
        elif snap.state is State.STALLED:
            self._stalled.add(1, attrs)
            self._stalled_age.record(silence, attrs)
        now = self._clock()
        self.incidents.report(snap, report, now)
        fields: dict[str, Any] = {
            "session_id": snap.session_id, "agent": snap.agent, "pid": snap.pid,
            "state": snap.state.value, "reason": snap.reason.value,
            "silence_s": round(silence, 3),
        }
        fields.update(report)
        self._log.emit(f"session_{snap.state.value}", fields, "warning", t=now)

    def on_recovery_step(self, step: RecoveryStep) -> None:
        if step.step == "requested":
            self._rec_requested.add(1, {"agent": step.agent, "action": step.action,
                                        "reason": step.reason})
        elif step.step == "completed":
            status = step.status.value if step.status is not None else "failed"
            self._rec_completed.add(1, {"agent": step.agent, "action": step.action, "status": status})
            if step.duration_s is not None:
                self._rec_duration.record(max(0.0, step.duration_s),
                                          {"action": step.action, "status": status})
        self.incidents.recovery_step(step)
        level = "error" if step.status in _FAILED_STATUSES else "warning"
        self._log.emit(f"recovery_{step.step}", step.to_json(), level)

    def on_session_end(self, snap: SessionSnapshot, summary: Mapping[str, Any]) -> None:
        fields: dict[str, Any] = {"session_id": snap.session_id, "agent": snap.agent}
        fields.update(summary)
        self._log.emit("session_summary", fields)
        self.incidents.end(snap.session_id, "exited", snap, self._clock())
        self.gauges.forget(snap.session_id)
        if self.session_metrics is not None:
            self.session_metrics.forget(snap.session_id)

    def log(self, event: str, fields: Mapping[str, Any], level: str = "info") -> None:
        self._log.emit(event, fields, level)

    def logging_handler(self, level: int = logging.INFO) -> logging.Handler:
        """A `logging.Handler` writing to this telemetry's JSON lines and OTel log records
        (`otelwatch run` installs it on the "otelwatch" logger)."""
        return JsonLogHandler(self._log, level)

    def on_agent_usage(self, agent: str, model: str, usage: Mapping[str, float]) -> None:
        """Tokens, cost and API calls from one agent record (sources/otlp.py)."""
        for key, kind in (("input_tokens", "input"), ("output_tokens", "output"),
                          ("cache_read_tokens", "cache_read"), ("cache_creation_tokens", "cache_creation")):
            if usage.get(key):
                self._agent_tokens.add(usage[key], {"agent": agent, "model": model, "type": kind})
        if usage.get("cost_usd"):
            self._agent_cost.add(usage["cost_usd"], {"agent": agent, "model": model})
        if usage.get("api_requests"):
            self._agent_requests.add(usage["api_requests"], {"agent": agent, "model": model})
        if usage.get("api_errors"):
            self._agent_errors.add(usage["api_errors"], {"agent": agent, "model": model})

    def count_export_failure(self, signal: str) -> None:
        """One failed export of `signal` (metrics, traces, logs, notify):
        otelwatch.export.failures. Thread-safe."""
        self._export_failures.add(1, {"signal": signal})

    # ------------------------------------------------------------------ exporters

    @property
    def prometheus_enabled(self) -> bool:
        return self.prometheus is not None

    def prometheus_exposition(self, accept: str = "") -> tuple[bytes, str]:
        """Body and content type for GET /metrics (OpenMetrics when `accept` asks for it)."""
        if self.prometheus is None or self.session_metrics is None:
            return b"", "text/plain; version=0.0.4; charset=utf-8"
        with self.gauges.muted():  # the SDK serves the rest; sessions are rendered below
            body, content_type = self.prometheus.exposition(accept)
        if not content_type.startswith("application/openmetrics-text"):
            return body + self.session_metrics.render(False), content_type
        eof = b"# EOF\n"
        head = body[:-len(eof)] if body.endswith(eof) else body
        return head + self.session_metrics.render(True) + eof, content_type

    def force_flush(self, timeout: float = 5.0) -> bool:
        """Export what is pending now (metrics collected and pushed, spans and logs sent)."""
        deadline = time.monotonic() + timeout
        ok = True
        # Not MeterProvider.force_flush: it would also collect into the Prometheus
        # reader, which queues that data until the next scrape (unbounded if none).
        flushers: list[Any] = [self._otlp_reader, self.tracer_provider, self.logger_provider]
        for flusher in flushers:
            if flusher is None:
                continue
            left_ms = max(0.0, deadline - time.monotonic()) * 1000
            try:
                ok = bool(flusher.force_flush(left_ms)) and ok
            except Exception:  # flushing is best effort
                ok = False
        return ok

    def shutdown(self, timeout: float = 2.0) -> None:
        """End open incidents, flush, stop every export thread. Safe to call twice.

        The SDK's shutdowns wait for a last export; against a dead backend that
        can take the export timeout, so they run on a helper thread and, when
        the deadline passes, the exporters are shut down under them, which
        makes their retry loops give up.
        """
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        self.incidents.end_all("shutdown")
        deadline = time.monotonic() + max(0.0, timeout)
        steps: list[Callable[[], Any]] = [self.tracer_provider.shutdown]
        if self.logger_provider is not None:
            steps.append(self.logger_provider.shutdown)
        steps.append(lambda: self.meter_provider.shutdown(
            timeout_millis=max(1.0, (deadline - time.monotonic()) * 1000)))

        def run() -> None:
            for step in steps:
                # Shutdown must finish whatever fails.
                with contextlib.suppress(Exception):
                    step()

        worker = threading.Thread(target=run, name="otelwatch-telemetry-shutdown", daemon=True)
        worker.start()
        worker.join(max(0.0, deadline - time.monotonic()))
        if worker.is_alive():
            for exporter in self._exporters:
                with contextlib.suppress(Exception):
                    exporter.shutdown()
            worker.join(0.5)

    # ------------------------------------------------------------------ internals

    def _log_export_failure(self, event: str, fields: Mapping[str, Any]) -> None:
        # Only to the stream: a failing logs exporter must not feed itself.
        self._log.emit(event, fields, "warning", otel=False)
