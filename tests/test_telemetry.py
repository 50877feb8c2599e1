"""Telemetry with the real OpenTelemetry SDK: the metric contract as Prometheus
sees it, per-session gauges that come and go, bounded SDK state, incident
spans, JSON logs, OTLP settings from config and environment.

Spans are read with the SDK's own InMemorySpanExporter (a real exporter that
keeps spans in a list); the real OTLP receivers are in tests/test_otlp_real.py.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client.parser import text_string_to_metric_families

from otelwatch.config import Config, ExportConfig, OtlpExportConfig, PrometheusExportConfig, parse_config
from otelwatch.model import (
    Reason,
    RecoveryStatus,
    RecoveryStep,
    SessionSnapshot,
    State,
)
from otelwatch.telemetry import Telemetry, resolve_otlp
from otelwatch.telemetry.otlp import FailureReporter, parse_key_values

NOW = time.time()


def snap(sid: str = "s1", state: State = State.ACTIVE, reason: Reason = Reason.RECENT_PROGRESS,
         **kw: Any) -> SessionSnapshot:
    fields: dict[str, Any] = dict(
        session_id=sid, agent="claude-code", pid=4242, state=state, reason=reason,
        state_since=NOW - 30, last_event_time=NOW - 20, last_event_age_s=20.0, silence_s=20.0,
        cpu_percent=50.0, rss_bytes=123456, open_fds=9, threads=4, tcp={"ESTABLISHED": 1})
    fields.update(kw)
    return SessionSnapshot(**fields)


def samples(body: bytes) -> list[tuple[str, dict[str, str], float]]:
    return [(s.name, dict(s.labels), s.value)
            for fam in text_string_to_metric_families(body.decode()) for s in fam.samples]


def find(body: bytes, name: str, **labels: str) -> list[float]:
    return [v for n, lab, v in samples(body)
            if n == name and all(lab.get(k) == val for k, val in labels.items())]


@pytest.fixture
def tel() -> Iterator[Telemetry]:
    t = Telemetry(Config(), environ={}, log_stream=io.StringIO(), service_instance_id="test-1")
    try:
        yield t
    finally:
        t.shutdown()


@pytest.fixture
def spans(tel: Telemetry) -> InMemorySpanExporter:
    exporter = InMemorySpanExporter()
    tel.tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    return exporter


def logs_of(t: Telemetry) -> list[dict[str, Any]]:
    stream = t._log._stream
    assert isinstance(stream, io.StringIO)
    return [json.loads(line) for line in stream.getvalue().splitlines()]


# --------------------------------------------------------------------------- the contract


def test_exposition_has_every_contract_name_with_its_labels(tel: Telemetry) -> None:
    stuck = snap("s1", State.STUCK, Reason.NO_ACTIVITY, silence_s=900.0, cpu_percent=0.0,
                 tcp={"ESTABLISHED": 1, "CLOSE_WAIT": 2})
    stalled = snap("s2", State.STALLED, Reason.WAITING_ON_NETWORK, silence_s=400.0)
    tel.update([stuck, stalled])
    tel.on_transition(stuck, State.ACTIVE)
    tel.on_transition(stalled, State.ACTIVE)
    tel.on_report(stuck, {"wchan": "ep_poll"})
    tel.on_report(stalled, {})
    tel.on_recovery_step(RecoveryStep("s1", "claude-code", "signal", "requested", NOW, 4242,
                                      reason="no_activity"))
    tel.on_recovery_step(RecoveryStep("s1", "claude-code", "signal", "completed", NOW + 1, 4242,
                                      status=RecoveryStatus.TERMINATED, duration_s=1.5))
    tel.on_tick(0.004)
    tel.on_probe_problem("proc", timeout=True)
    tel.on_probe_problem("tmux", timeout=False)
    body, ctype = tel.prometheus_exposition()
    assert ctype.startswith("text/plain")

    assert find(body, "otelwatch_session_state_total", agent="claude-code", state="stuck",
                reason="no_activity") == [1.0]
    assert find(body, "otelwatch_session_stuck_total", agent="claude-code", reason="no_activity") == [1.0]
    assert find(body, "otelwatch_session_stalled_total", reason="waiting_on_network") == [1.0]
    assert find(body, "otelwatch_session_stuck_age_seconds_count", reason="no_activity") == [1.0]
    assert find(body, "otelwatch_session_stuck_age_seconds_sum", reason="no_activity") == [900.0]
    assert find(body, "otelwatch_session_stalled_age_seconds_bucket", le="600") == [1.0]
    assert find(body, "otelwatch_session_stalled_age_seconds_bucket", le="300") == [0.0]
    assert find(body, "otelwatch_recovery_requested_total", agent="claude-code", action="signal",
                reason="no_activity") == [1.0]
    assert find(body, "otelwatch_recovery_completed_total", action="signal", status="terminated") == [1.0]
    assert find(body, "otelwatch_recovery_duration_seconds_sum", action="signal",
                status="terminated") == [1.5]
    assert find(body, "otelwatch_sessions", state="stuck") == [1.0]
    assert find(body, "otelwatch_sessions", state="idle") == [0.0]
    assert find(body, "otelwatch_session_status", session_id="s1", agent="claude-code",
                state="stuck", reason="no_activity") == [1.0]
    assert find(body, "otelwatch_session_last_event_age_seconds", session_id="s1") == [20.0]
    assert find(body, "otelwatch_session_last_event_time_seconds", session_id="s1") == [
        pytest.approx(NOW - 20)]
    assert find(body, "otelwatch_session_cpu_utilization", session_id="s2") == [0.5]
    assert find(body, "otelwatch_session_cpu_utilization", session_id="s1") == [0.0]
    assert find(body, "otelwatch_session_memory_rss_bytes", session_id="s1") == [123456.0]
    assert find(body, "otelwatch_session_open_fds", session_id="s1") == [9.0]
    assert find(body, "otelwatch_session_threads", session_id="s1") == [4.0]
    assert find(body, "otelwatch_session_tcp_connections", session_id="s1",
                tcp_state="CLOSE_WAIT") == [2.0]
    assert find(body, "otelwatch_collector_tick_duration_seconds_count") == [1.0]
    assert find(body, "otelwatch_collector_tick_duration_seconds_bucket", le="0.005") == [1.0]
    assert find(body, "otelwatch_collector_tick_duration_seconds_bucket", le="0.0025") == [0.0]
    assert find(body, "otelwatch_probe_timeouts_total", kind="proc") == [1.0]
    assert find(body, "otelwatch_probe_errors_total", kind="tmux") == [1.0]
    # Resource as Prometheus' target_info; no scope labels on the contract series.
    assert find(body, "target_info", service_name="otelwatch", service_instance_id="test-1")
    assert not any("otel_scope_name" in lab for _, lab, _ in samples(body))
    # session.id only on per-session gauges, never on counters or histograms.
    for name, labels, _ in samples(body):
        if name.endswith(("_total", "_bucket", "_count", "_sum")):
            assert "session_id" not in labels, name


def test_no_ratio_suffix_and_units_match_design(tel: Telemetry) -> None:
    tel.update([snap()])
    names = {n for n, _, _ in samples(tel.prometheus_exposition()[0])}
    assert "otelwatch_session_cpu_utilization" in names
    assert not any(n.endswith("_ratio") for n in names)
    assert "otelwatch_session_memory_rss_bytes" in names


def test_openmetrics_when_asked(tel: Telemetry) -> None:
    tel.update([snap()])
    body, ctype = tel.prometheus_exposition("application/openmetrics-text; version=1.0.0")
    assert ctype.startswith("application/openmetrics-text")
    assert body.rstrip().endswith(b"# EOF")


def test_sessions_gauge_counts_every_state(tel: Telemetry) -> None:
    tel.update([])
    body = tel.prometheus_exposition()[0]
    assert {lab["state"]: v for n, lab, v in samples(body) if n == "otelwatch_sessions"} == {
        s.value: 0.0 for s in State}
    tel.update([snap("a"), snap("b"), snap("c", State.EXITED, Reason.PROCESS_EXITED)])
    body = tel.prometheus_exposition()[0]
    assert find(body, "otelwatch_sessions", state="active") == [2.0]
    assert find(body, "otelwatch_sessions", state="exited") == [1.0]
    # Exited sessions are counted but have no per-session series.
    assert find(body, "otelwatch_session_status", session_id="c") == []


def test_per_session_series_follow_the_snapshot(tel: Telemetry) -> None:
    tel.update([snap("s1"), snap("s2", tcp={})])
    body = tel.prometheus_exposition()[0]
    assert find(body, "otelwatch_session_threads", session_id="s2") == [4.0]
    # ESTABLISHED is always present, even at zero, so `== 0` rules can match.
    assert find(body, "otelwatch_session_tcp_connections", session_id="s2",
                tcp_state="ESTABLISHED") == [0.0]
    # A state change replaces the status series instead of adding one.
    tel.update([snap("s1", State.STALLED, Reason.CPU_SPIN)])
    body = tel.prometheus_exposition()[0]
    assert find(body, "otelwatch_session_threads", session_id="s2") == []
    status = [(lab["state"], v) for n, lab, v in samples(body)
              if n == "otelwatch_session_status" and lab["session_id"] == "s1"]
    assert status == [("stalled", 1.0)]
    # Unknown values are absent, not zero.
    tel.update([snap("s1", cpu_percent=None, open_fds=None, last_event_age_s=None,
                     last_event_time=None)])
    body = tel.prometheus_exposition()[0]
    assert find(body, "otelwatch_session_cpu_utilization", session_id="s1") == []
    assert find(body, "otelwatch_session_open_fds", session_id="s1") == []
    assert find(body, "otelwatch_session_last_event_age_seconds", session_id="s1") == []
    assert find(body, "otelwatch_session_rss_bytes", session_id="s1") == []


def test_session_end_drops_its_series_before_the_next_update(tel: Telemetry) -> None:
    s = snap("gone")
    tel.update([s, snap("stays")])
    assert find(tel.prometheus_exposition()[0], "otelwatch_session_status", session_id="gone")
    tel.on_session_end(s, {"duration_s": 12.0, "final_state": "exited"})
    body = tel.prometheus_exposition()[0]
    assert find(body, "otelwatch_session_status", session_id="gone") == []
    assert find(body, "otelwatch_session_status", session_id="stays") == [1.0]


def test_two_thousand_short_sessions_stay_bounded(tel: Telemetry) -> None:
    """The SDK keeps every attribute set an observable gauge ever saw, and folds
    new ones into `otel.metric.overflow` after 2 000; the pruner prevents both."""
    sizes = []
    for i in range(2100):
        tel.update([snap(f"short-{i}", tcp={"ESTABLISHED": 1, "SYN_SENT": 1})])
        body = tel.prometheus_exposition()[0]
        if i % 500 == 0:
            sizes.append(len(body))
    last = samples(body)
    assert not any("otel_metric_overflow" in lab for _, lab, _ in last)
    assert {lab.get("session_id") for n, lab, _ in last if "session_id" in lab} == {"short-2099"}
    assert find(body, "otelwatch_session_tcp_connections", session_id="short-2099",
                tcp_state="SYN_SENT") == [1.0]
    assert max(sizes) - min(sizes) < 200, sizes
    # The SDK's own per-reader state holds only the live series.
    assert max(sdk_series(tel).values()) <= len(State) + 2


def sdk_series(t: Telemetry) -> dict[str, int]:
    """Attribute sets the SDK holds per instrument (largest over readers)."""
    consumer = t.meter_provider._measurement_consumer  # SDK internal, see AsyncStatePruner
    sizes: dict[str, int] = {}
    for storage in consumer._reader_storages.values():
        for instrument, matches in storage._instrument_view_instrument_matches.items():
            for match in matches:
                sizes[instrument.name] = max(sizes.get(instrument.name, 0), len(match._attributes_aggregation))
    return sizes


def test_state_and_tcp_churn_keep_sdk_state_to_live_series(tel: Telemetry) -> None:
    """A session flapping between states and TCP states leaves no stale sets behind;
    a tick whose series are unchanged prunes nothing."""
    for i in range(51):  # ends active
        flip = snap("s1", State.STALLED, Reason.CPU_SPIN, tcp={"SYN_SENT": 1}) if i % 2 else snap("s1")
        tel.update([flip, snap("s2")])
        tel.prometheus_exposition()
    sizes = sdk_series(tel)
    assert sizes["otelwatch.session.status"] == 2
    assert sizes["otelwatch.session.tcp.connections"] == 2  # s1 and s2 ESTABLISHED only
    # Same sessions, same attribute sets, new values: nothing is stale.
    assert tel.gauges.update([snap("s1", cpu_percent=3.0), snap("s2", rss_bytes=1)]) == {}


def test_pruner_disables_itself_when_sdk_internals_change(caplog: pytest.LogCaptureFixture) -> None:
    from otelwatch.telemetry.instruments import AsyncStatePruner, _key

    class Changed:  # a MeterProvider whose internals no longer look like 1.45's
        _measurement_consumer = object()

    pruner = AsyncStatePruner(Changed())  # type: ignore[arg-type]
    stale = {object(): frozenset({_key({"session.id": "x"})})}
    with caplog.at_level("WARNING", logger="otelwatch.telemetry.instruments"):
        assert pruner.prune(stale) == 0
        assert pruner.prune(stale) == 0
    assert [r.getMessage().startswith("cannot prune") for r in caplog.records] == [True]


# --------------------------------------------------------------------------- incidents


def test_incident_span_opens_on_stuck_and_ends_when_active(tel: Telemetry,
                                                           spans: InMemorySpanExporter) -> None:
    stalled = snap("s1", State.STALLED, Reason.WAITING_ON_NETWORK, state_since=NOW - 5,
                   tcp={"ESTABLISHED": 1}, children=({"pid": 1},))
    tel.on_transition(stalled, State.ACTIVE)
    tel.on_report(stalled, {"wchan": "ep_poll", "remote": ["1.2.3.4:443"]})
    stuck = snap("s1", State.STUCK, Reason.NO_ACTIVITY, tcp={}, cpu_percent=0.0)
    tel.on_transition(stuck, State.STALLED)
    tel.on_report(stuck, {})
    assert spans.get_finished_spans() == ()
    tel.on_transition(snap("s1"), State.STUCK)
    (span,) = spans.get_finished_spans()
    assert span.name == "otelwatch.incident"
    attrs = dict(span.attributes or {})
    assert attrs["session.id"] == "s1"
    assert attrs["agent"] == "claude-code"
    assert attrs["state"] == "stuck"  # the latest diagnostics
    assert attrs["outcome"] == "resolved"
    assert attrs["cpu.utilization"] == 0.0
    assert "fds" not in attrs and attrs["open_fds"] == 9
    assert [e.name for e in span.events] == ["report", "state_change", "report"]
    assert dict(span.events[0].attributes or {})["wchan"] == "ep_poll"
    assert span.start_time == int((NOW - 5) * 1e9)
    assert span.resource.attributes["service.name"] == "otelwatch"


def test_recovery_ends_incident_and_dry_run_does_not(tel: Telemetry,
                                                      spans: InMemorySpanExporter) -> None:
    stuck = snap("s1", State.STUCK, Reason.NO_ACTIVITY)
    tel.on_transition(stuck, State.ACTIVE)
    base: dict[str, Any] = dict(session_id="s1", agent="claude-code", action="signal", pid=4242)
    tel.on_recovery_step(RecoveryStep(step="requested", time=NOW, reason="no_activity", **base))
    tel.on_recovery_step(RecoveryStep(step="completed", time=NOW, status=RecoveryStatus.DRY_RUN,
                                      duration_s=0.0, **base))
    assert spans.get_finished_spans() == ()
    tel.on_recovery_step(RecoveryStep(step="sigterm", time=NOW + 1, **base))
    tel.on_recovery_step(RecoveryStep(step="completed", time=NOW + 2,
                                      status=RecoveryStatus.TERMINATED, duration_s=2.0, **base))
    (span,) = spans.get_finished_spans()
    assert [e.name for e in span.events] == [
        "recovery.requested", "recovery.completed", "recovery.sigterm", "recovery.completed"]
    assert dict(span.attributes or {})["recovery.status"] == "terminated"
    assert dict(span.attributes or {})["outcome"] == "recovered"
    events = [line["event"] for line in logs_of(tel)]
    assert events.count("recovery_completed") == 2


def test_incident_ends_when_session_exits_or_vanishes(tel: Telemetry,
                                                      spans: InMemorySpanExporter) -> None:
    a = snap("a", State.STALLED, Reason.CPU_SPIN)
    b = snap("b", State.STUCK, Reason.NO_ACTIVITY)
    tel.update([a, b])
    tel.on_transition(a, State.ACTIVE)
    tel.on_transition(b, State.ACTIVE)
    tel.on_session_end(snap("a", State.EXITED, Reason.PROCESS_EXITED), {"final_state": "exited"})
    tel.update([b])
    tel.update([])  # b left without an end: its span must not leak
    outcomes = {dict(s.attributes or {})["session.id"]: dict(s.attributes or {})["outcome"]
                for s in spans.get_finished_spans()}
    assert outcomes == {"a": "exited", "b": "gone"}
    assert len(tel.incidents) == 0


def test_shutdown_ends_open_incidents_and_is_idempotent(tel: Telemetry,
                                                        spans: InMemorySpanExporter) -> None:
    tel.on_transition(snap("s1", State.STUCK, Reason.NO_ACTIVITY), State.ACTIVE)
    tel.shutdown()
    tel.shutdown()
    assert [dict(s.attributes or {})["outcome"] for s in spans.get_finished_spans()] == ["shutdown"]


# --------------------------------------------------------------------------- logs


def test_report_and_summary_are_one_json_line_each(tel: Telemetry) -> None:
    s = snap("s1", State.STUCK, Reason.NO_ACTIVITY, silence_s=901.5)
    tel.on_report(s, {"fingerprint": "abc", "processes": [{"pid": 1, "wchan": "ep_poll"}],
                      "time": 5})
    tel.on_session_end(s, {"duration_s": 1000.0, "stalls": 2, "recoveries": 0})
    tel.log("started", {"version": "0.1.0", "nan": float("nan")}, level="debug")
    lines = logs_of(tel)
    assert [line["event"] for line in lines] == ["session_stuck", "session_summary", "started"]
    report = lines[0]
    assert report["level"] == "warning"
    assert report["session_id"] == "s1" and report["reason"] == "no_activity"
    assert report["silence_s"] == 901.5
    assert report["processes"] == [{"pid": 1, "wchan": "ep_poll"}]
    assert report["field_time"] == 5  # reserved keys are never overwritten
    assert report["time"].endswith("Z")
    assert lines[1]["stalls"] == 2 and lines[1]["agent"] == "claude-code"
    assert lines[2]["level"] == "debug" and lines[2]["nan"] is None


def test_closed_log_stream_never_raises() -> None:
    stream = io.StringIO()
    t = Telemetry(Config(), environ={}, log_stream=stream)
    try:
        stream.close()
        t.log("x", {})
        t.on_report(snap("s1", State.STUCK, Reason.NO_ACTIVITY), {})
        assert t._log.lines_dropped == 2
    finally:
        t.shutdown()


def test_failure_log_is_rate_limited_per_signal() -> None:
    clock = [0.0]
    counted: list[str] = []
    logged: list[dict[str, Any]] = []
    reporter = FailureReporter(counted.append, lambda e, f: logged.append(dict(f)),
                               interval_s=60, clock=lambda: clock[0])
    for _ in range(5):
        reporter.failed("metrics", "http://x", "refused")
        clock[0] += 10
    reporter.failed("traces", "http://x", "refused")
    clock[0] = 61
    reporter.failed("metrics", "http://x", "refused")
    assert counted == ["metrics"] * 5 + ["traces", "metrics"]
    assert [(f["signal"], f["suppressed_since_last"]) for f in logged] == [
        ("metrics", 0), ("traces", 0), ("metrics", 4)]


# --------------------------------------------------------------------------- settings


def otlp_cfg(**kw: Any) -> Config:
    return Config(export=ExportConfig(otlp=OtlpExportConfig(**kw)))


def test_otlp_off_by_default() -> None:
    assert not resolve_otlp(Config(), {}).enabled
    assert not resolve_otlp(Config(), {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://x"}).enabled


def test_otlp_from_general_env_endpoint() -> None:
    s = resolve_otlp(Config(), {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318/",
                                "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
                                "OTEL_EXPORTER_OTLP_HEADERS": "a=1,b=x%20y"})
    assert s.enabled
    assert {k: (v.endpoint, v.protocol) for k, v in s.targets.items()} == {
        "metrics": ("http://c:4318/v1/metrics", "http/protobuf"),
        "traces": ("http://c:4318/v1/traces", "http/protobuf"),
        "logs": ("http://c:4318/v1/logs", "http/protobuf"),
    }
    assert s.headers == {"a": "1", "b": "x y"}


def test_otlp_signal_endpoints_and_config_precedence() -> None:
    env = {"OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": "http://m:4317",
           "OTEL_TRACES_EXPORTER": "none"}
    s = resolve_otlp(Config(), env)
    assert s.enabled
    assert s.targets["metrics"].endpoint == "http://m:4317"
    assert "traces" not in s.targets
    assert "logs" not in s.targets  # no logs endpoint named anywhere
    cfg = otlp_cfg(enabled=True, endpoint="http://cfg:4318", protocol="http/protobuf", timeout=1.5)
    s = resolve_otlp(cfg, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://env:4317"})
    assert s.targets["metrics"].endpoint == "http://cfg:4318/v1/metrics"
    assert s.timeout_s == 1.5
    s = resolve_otlp(otlp_cfg(enabled=True), {})
    assert s.targets["metrics"] == type(s.targets["metrics"])("http://localhost:4317", "grpc")
    assert resolve_otlp(otlp_cfg(enabled=True), {"OTEL_SDK_DISABLED": "true"}).enabled is False
    # The config parser accepts the keys used here.
    parsed = parse_config({"export": {"otlp": {"enabled": True, "protocol": "grpc", "timeout": "2s"}}})
    assert resolve_otlp(parsed, {}).timeout_s == 2.0


def test_resource_from_environment() -> None:
    t = Telemetry(Config(), environ={"OTEL_SERVICE_NAME": "ow-test",
                                     "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment=ci,service.name=x"},
                  log_stream=io.StringIO(), service_instance_id="inst-9")
    try:
        attrs = t.resource.attributes
        assert attrs["service.name"] == "ow-test"
        assert attrs["deployment.environment"] == "ci"
        assert attrs["service.instance.id"] == "inst-9"
        assert attrs["service.version"] and attrs["host.name"]
        t.update([])
        assert find(t.prometheus_exposition()[0], "target_info", service_name="ow-test",
                    deployment_environment="ci")
    finally:
        t.shutdown()


def test_parse_key_values_ignores_junk() -> None:
    assert parse_key_values("a=1,,=x,b,c=%3D") == {"a": "1", "c": "="}


def test_prometheus_disabled_gives_empty_body() -> None:
    cfg = Config(export=ExportConfig(prometheus=PrometheusExportConfig(enabled=False)))
    t = Telemetry(cfg, environ={}, log_stream=io.StringIO())
    try:
        t.update([snap()])
        assert t.prometheus_exposition()[0] == b""
        assert not t.prometheus_enabled
    finally:
        t.shutdown()


def test_callbacks_cost_nothing_per_scrape(tel: Telemetry, monkeypatch: pytest.MonkeyPatch) -> None:
    """Scrapes read pre-built observations: 200 sessions, many scrapes, well under budget."""
    tel.update([snap(f"s{i}") for i in range(200)])

    def rebuilt(*_args: Any) -> None:
        raise AssertionError("a scrape rebuilt observations")

    monkeypatch.setattr("otelwatch.telemetry.instruments._observe_session", rebuilt)
    start = time.perf_counter()
    for _ in range(20):
        body = tel.prometheus_exposition()[0]
    per_scrape = (time.perf_counter() - start) / 20
    assert len(find(body, "otelwatch_session_status")) == 200
    assert per_scrape < 0.5, per_scrape


def test_ending_many_sessions_is_linear_and_drops_exactly_theirs(tel: Telemetry) -> None:
    """Sessions ending in one tick: each forget used to rebuild every observation
    list (11 s for 5 000 ends); now a forget is a set insert and collections
    leave the ended sessions out until the next update."""
    n = 1000  # under the SDK's cardinality limit (2 000), so the exposition shows all
    tel.update([snap(f"s{i}") for i in range(n)])
    for i in range(0, n, 2):
        tel.gauges.forget(f"s{i}")
    body = tel.prometheus_exposition()[0]
    ids = {lab["session_id"] for _, lab, _ in samples(body) if "session_id" in lab}
    assert ids == {f"s{i}" for i in range(1, n, 2)}
    # The next update is the truth again: an ended id that is live once more is shown.
    tel.update([snap("s0"), snap("s1")])
    ids = {lab["session_id"] for _, lab, _ in samples(tel.prometheus_exposition()[0]) if "session_id" in lab}
    assert ids == {"s0", "s1"}
    # 5 000 ends at once, timed on the gauges alone (the exposition would overflow).
    tel.gauges.update([snap(f"t{i}") for i in range(5000)])
    start = time.perf_counter()
    for i in range(5000):
        tel.gauges.forget(f"t{i}")
    took = time.perf_counter() - start
    assert took < 0.5, f"5000 forgets took {took:.2f} s"
