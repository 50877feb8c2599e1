"""Telemetry's instruments through the real OpenTelemetry SDK and the Prometheus
endpoint (telemetry/instruments.py, telemetry/prometheus.py): the metric
contract as Prometheus sees it, per-session gauges that come and go, bounded
SDK state, scrape cost.
"""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from otelwatch.config import Config, ExportConfig, PrometheusExportConfig
from otelwatch.model import Reason, RecoveryStatus, RecoveryStep, State
from otelwatch.telemetry import Telemetry
from otelwatch.telemetry.instruments import views
from tests.support.telemetry_support import NOW, find, samples, snap


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


@pytest.fixture
def otlp_side() -> Iterator[tuple[Telemetry, InMemoryMetricReader]]:
    """A Telemetry whose per-session gauges go through the SDK: a reader of the caller's
    provider stands in for OTLP's periodic reader (the Prometheus endpoint renders
    sessions itself, tests/unit/telemetry/test_telemetry_exposition.py)."""
    reader = InMemoryMetricReader()
    t = Telemetry(Config(), environ={}, log_stream=io.StringIO(),
                  meter_provider=MeterProvider(metric_readers=[reader], views=views()))
    try:
        yield t, reader
    finally:
        t.shutdown()


def points(reader: InMemoryMetricReader) -> list[tuple[str, dict[str, Any], float]]:
    data = reader.get_metrics_data()
    assert data is not None
    return [(m.name, dict(p.attributes or {}), p.value) for rm in data.resource_metrics
            for sm in rm.scope_metrics for m in sm.metrics for p in m.data.data_points
            if hasattr(p, "value")]


def test_two_thousand_short_sessions_stay_bounded(otlp_side: tuple[Telemetry, InMemoryMetricReader]) -> None:
    """The SDK keeps every attribute set an observable gauge ever saw, and folds
    new ones into `otel.metric.overflow` past its cardinality limit; the pruner prevents both."""
    tel, reader = otlp_side
    for i in range(2100):
        tel.update([snap(f"short-{i}", tcp={"ESTABLISHED": 1, "SYN_SENT": 1})])
        last = points(reader)
    assert not any("otel.metric.overflow" in attrs for _, attrs, _ in last)
    assert {attrs.get("session.id") for _, attrs, _ in last if "session.id" in attrs} == {"short-2099"}
    assert [v for n, attrs, v in last if n == "otelwatch.session.tcp.connections"
            and attrs.get("tcp.state") == "SYN_SENT"] == [1]
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


def test_state_and_tcp_churn_keep_sdk_state_to_live_series(
        otlp_side: tuple[Telemetry, InMemoryMetricReader]) -> None:
    """A session flapping between states and TCP states leaves no stale sets behind;
    a tick whose series are unchanged prunes nothing."""
    tel, reader = otlp_side
    for i in range(51):  # ends active
        flip = snap("s1", State.STALLED, Reason.CPU_SPIN, tcp={"SYN_SENT": 1}) if i % 2 else snap("s1")
        tel.update([flip, snap("s2")])
        points(reader)
    sizes = sdk_series(tel)
    assert sizes["otelwatch.session.status"] == 2
    assert sizes["otelwatch.session.tcp.connections"] == 2  # s1 and s2 ESTABLISHED only
    # Same sessions, same attribute sets, new values: nothing is stale.
    assert tel.gauges.update([snap("s1", cpu_percent=3.0), snap("s2", rss_bytes=1)]) == {}


def test_prometheus_holds_no_sdk_state_per_session(tel: Telemetry) -> None:
    """/metrics renders sessions from the snapshots: 300 short sessions leave the SDK
    (Prometheus reader) nothing per session and build no per-session observations."""
    for i in range(300):
        tel.update([snap(f"short-{i}")])
        body = tel.prometheus_exposition()[0]
    assert find(body, "otelwatch_session_status", session_id="short-299") == [1.0]
    assert "otelwatch.session.status" not in sdk_series(tel)
    assert tel.gauges._obs["otelwatch.session.status"] == []


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
    n = 1000
    tel.update([snap(f"s{i}") for i in range(n)])
    for i in range(0, n, 2):
        tel.on_session_end(snap(f"s{i}"), {"event": "session.summary"})
    body = tel.prometheus_exposition()[0]
    ids = {lab["session_id"] for _, lab, _ in samples(body) if "session_id" in lab}
    assert ids == {f"s{i}" for i in range(1, n, 2)}
    # The next update is the truth again: an ended id that is live once more is shown.
    tel.update([snap("s0"), snap("s1")])
    ids = {lab["session_id"] for _, lab, _ in samples(tel.prometheus_exposition()[0]) if "session_id" in lab}
    assert ids == {"s0", "s1"}
    # 5 000 ends at once, timed on the gauges and the exposition's bookkeeping alone.
    tel.gauges.update([snap(f"t{i}") for i in range(5000)])
    # CPU time, not wall time: a loaded host stretches the one, not the work.
    start = time.process_time()
    assert tel.session_metrics is not None
    tel.session_metrics.update([snap(f"t{i}") for i in range(5000)])
    for i in range(5000):
        tel.gauges.forget(f"t{i}")
        tel.session_metrics.forget(f"t{i}")
    took = time.process_time() - start
    assert took < 0.5, f"5000 forgets took {took:.2f} s"
