"""OTLP against real receivers on loopback:

- VictoriaMetrics (its OTLP/HTTP endpoint, Prometheus naming) gets otelwatch's
  metrics and answers PromQL for the contract series (scripts/install-victoria-metrics);
- a real OTLP/gRPC receiver (tests/support/otlp_receiver.py) gets the incident span with
  its events, the metric points and the log records;
- a closed port and a silent one: the caller's calls stay fast, memory stays
  flat over hundreds of failed exports, failures are counted and logged once.
"""

from __future__ import annotations

import gc
import io
import itertools
import json
import subprocess
import time
import tracemalloc
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from otelwatch.config import Config, ExportConfig, OtlpExportConfig
from otelwatch.model import Reason, RecoveryStatus, RecoveryStep, SessionSnapshot, State
from otelwatch.telemetry import Telemetry
from tests.support.otlp_receiver import OtlpReceiver
from tests.support.procs import TcpServer, free_port, require_binary, wait_for

NOW = time.time()


def snap(sid: str, state: State, reason: Reason, **kw: Any) -> SessionSnapshot:
    fields: dict[str, Any] = dict(
        session_id=sid, agent="codex", pid=321, state=state, reason=reason,
        state_since=NOW - 60, last_event_time=NOW - 700, last_event_age_s=700.0, silence_s=700.0,
        cpu_percent=0.0, rss_bytes=7_000_000, open_fds=11, threads=2,
        tcp={"ESTABLISHED": 1, "CLOSE_WAIT": 1}, children=({"pid": 322, "name": "bash"},))
    fields.update(kw)
    return SessionSnapshot(**fields)


def otlp_config(endpoint: str = "", protocol: str = "", interval: float | None = 0.5,
                timeout: float = 2.0, enabled: bool = True) -> Config:
    return Config(export=ExportConfig(otlp=OtlpExportConfig(
        enabled=enabled, endpoint=endpoint, protocol=protocol, interval=interval, timeout=timeout)))


def exposition_value(t: Telemetry, name: str, **labels: str) -> float:
    body = t.prometheus_exposition()[0].decode()
    total = 0.0
    for fam in text_string_to_metric_families(body):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


# --------------------------------------------------------------------------- VictoriaMetrics


class VictoriaMetrics:
    def __init__(self, tmp_path: Path) -> None:
        binary = require_binary("victoria-metrics")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tmp_path / "vm.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [binary, f"-httpListenAddr=127.0.0.1:{self.port}",
                 f"-storageDataPath={tmp_path / 'vmdata'}",
                 "-opentelemetry.usePrometheusNaming",
                 "-search.latencyOffset=0s",  # query what was just pushed
                 "-search.disableCache", "-loggerLevel=WARN"],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 15
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=1) as resp:
                    if resp.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"victoria-metrics did not start: {self.log.read_text()[-2000:]}")
            time.sleep(0.1)

    def query(self, promql: str) -> list[dict[str, Any]]:
        # Ingested rows become searchable only after VictoriaMetrics flushes them
        # (about 10 s); its test hook flushes now.
        with urllib.request.urlopen(f"{self.url}/internal/force_flush", timeout=5):
            pass
        params = urllib.parse.urlencode({"query": promql})
        with urllib.request.urlopen(f"{self.url}/api/v1/query?{params}", timeout=5) as resp:
            payload = json.loads(resp.read())
        assert payload["status"] == "success", payload
        return list(payload["data"]["result"])

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


@pytest.fixture
def victoria(tmp_path: Path) -> Iterator[VictoriaMetrics]:
    vm = VictoriaMetrics(tmp_path)
    try:
        yield vm
    finally:
        vm.stop()


def test_victoria_metrics_receives_the_contract_series(victoria: VictoriaMetrics) -> None:
    # Configured only through the standard variables, as a deployment would.
    environ = {
        "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": f"{victoria.url}/opentelemetry/v1/metrics",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        "OTEL_TRACES_EXPORTER": "none",  # VictoriaMetrics takes metrics only
        "OTEL_SERVICE_NAME": "otelwatch-vm-test",
    }
    t = Telemetry(otlp_config(enabled=False, interval=0.3), environ=environ,
                  log_stream=io.StringIO(), service_instance_id="vm-1")
    try:
        stuck = snap("s1", State.STUCK, Reason.NO_ACTIVITY)
        t.update([stuck])
        t.on_transition(stuck, State.ACTIVE)
        t.on_report(stuck, {})
        t.on_tick(0.02)
        t.on_tick(0.03)

        def series(promql: str) -> Any:
            return wait_for(lambda: victoria.query(promql), timeout=15)

        (tcp,) = series('otelwatch_session_tcp_connections{tcp_state="ESTABLISHED",session_id="s1"}')
        assert float(tcp["value"][1]) == 1.0
        assert tcp["metric"]["agent"] == "codex"
        assert tcp["metric"]["service_name"] == "otelwatch-vm-test"
        (stuck_gauge,) = series('otelwatch_sessions{state="stuck"}')
        assert float(stuck_gauge["value"][1]) == 1.0
        (stuck_total,) = series('otelwatch_session_stuck_total{reason="no_activity"}')
        assert float(stuck_total["value"][1]) == 1.0
        (ticks,) = series("otelwatch_collector_tick_duration_seconds_count")
        assert float(ticks["value"][1]) == 2.0
        (status,) = series('otelwatch_session_status{session_id="s1"}')
        assert status["metric"]["state"] == "stuck"
        assert series('otelwatch_session_memory_rss_bytes{session_id="s1"}')
        # VictoriaMetrics follows the older OTLP->Prometheus rule and adds `_ratio`
        # to unit "1" (DESIGN.md, "Telemetry"); the scrape endpoint has no suffix.
        (cpu,) = series('otelwatch_session_cpu_utilization_ratio{session_id="s1"}')
        assert float(cpu["value"][1]) == 0.0
        assert victoria.query('otelwatch_session_cpu_utilization{session_id="s1"}') == []
        assert exposition_value(t, "otelwatch_export_failures_total") == 0.0
    finally:
        t.shutdown()


# --------------------------------------------------------------------------- gRPC receiver


def _export_gaps(receiver: OtlpReceiver, interval: float | None, environ: dict[str, str], n: int) -> list[float]:
    """Seconds between the first `n` metric exports a Telemetry sends to `receiver`."""
    t = Telemetry(otlp_config(endpoint=receiver.endpoint, protocol="grpc", interval=interval),
                  environ=environ, log_stream=io.StringIO())
    try:
        t.update([snap("s1", State.ACTIVE, Reason.RECENT_PROGRESS)])
        t.on_tick(0.001)
        wait_for(lambda: len(receiver.metric_times) >= n, timeout=4 * n + 10, interval=0.05)
    finally:
        t.shutdown(timeout=2.0)
    times = receiver.metric_times[:n]
    return [b - a for a, b in itertools.pairwise(times)]


def test_otel_metric_export_interval_sets_the_period_the_config_does_not(receiver: OtlpReceiver) -> None:
    """OTEL_METRIC_EXPORT_INTERVAL=2000: an export every 2 s, not the config's 15 s
    default. The SDK's reader waits the interval after each export, so a loaded host
    stretches a gap a little, never shortens it much."""
    gaps = _export_gaps(receiver, None, {"OTEL_METRIC_EXPORT_INTERVAL": "2000"}, 3)
    assert all(1.7 <= g <= 4.0 for g in gaps), gaps


def test_an_explicit_export_interval_wins_over_the_variable(receiver: OtlpReceiver) -> None:
    gaps = _export_gaps(receiver, 0.3, {"OTEL_METRIC_EXPORT_INTERVAL": "2000"}, 4)
    assert all(g < 1.5 for g in gaps), gaps




@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as rx:
        yield rx


def test_grpc_receiver_gets_incident_span_metrics_and_logs(receiver: OtlpReceiver) -> None:
    log = io.StringIO()
    t = Telemetry(otlp_config(endpoint=receiver.endpoint, protocol="grpc", interval=0.3),
                  environ={}, log_stream=log, service_instance_id="grpc-1")
    try:
        stalled = snap("s9", State.STALLED, Reason.WAITING_ON_NETWORK, state_since=NOW - 10)
        t.update([stalled])
        t.on_transition(stalled, State.ACTIVE)
        t.on_report(stalled, {"wchan": "ep_poll", "remote": ["10.0.0.1:443"]})
        stuck = snap("s9", State.STUCK, Reason.NO_ACTIVITY, tcp={})
        t.update([stuck])
        t.on_transition(stuck, State.STALLED)
        t.on_report(stuck, {"repeat": 1})
        base: dict[str, Any] = dict(session_id="s9", agent="codex", action="signal", pid=321)
        t.on_recovery_step(RecoveryStep(step="requested", time=NOW, reason="no_activity", **base))
        t.on_recovery_step(RecoveryStep(step="sigterm", time=NOW + 0.1, **base))
        t.on_recovery_step(RecoveryStep(step="completed", time=NOW + 0.5,
                                        status=RecoveryStatus.TERMINATED, duration_s=0.5, **base))
        assert t.force_flush(5.0)

        spans: Any = wait_for(lambda: [s for s in receiver.spans() if s["name"] == "otelwatch.incident"])
        assert len(spans) == 1
        span = spans[0]
        assert span["attributes"]["session.id"] == "s9"
        assert span["attributes"]["agent"] == "codex"
        assert span["attributes"]["state"] == "stuck"
        assert span["attributes"]["reason"] == "no_activity"
        assert span["attributes"]["outcome"] == "recovered"
        assert span["attributes"]["children"] == 1
        assert span["attributes"]["open_fds"] == 11
        assert span["attributes"]["silence_s"] == 700.0
        assert [name for name, _ in span["events"]] == [
            "report", "state_change", "report",
            "recovery.requested", "recovery.sigterm", "recovery.completed"]
        assert span["events"][0][1]["wchan"] == "ep_poll"
        assert span["events"][5][1]["status"] == "terminated"
        assert span["resource"]["service.name"] == "otelwatch"
        assert span["resource"]["service.instance.id"] == "grpc-1"
        assert span["start"] == pytest.approx(NOW - 10, abs=0.01)

        def has_metric() -> list[Any]:
            return [p for p in receiver.metric_points()
                    if p[0] == "otelwatch.session.tcp.connections"
                    and p[1].get("session.id") == "s9" and p[1].get("tcp.state") == "ESTABLISHED"]

        point: Any = wait_for(has_metric)
        assert point[-1][2] == 0
        names = {p[0] for p in receiver.metric_points()}
        assert {"otelwatch.recovery.requested", "otelwatch.recovery.completed",
                "otelwatch.recovery.duration", "otelwatch.session.stuck",
                "otelwatch.session.stalled.age", "otelwatch.sessions"} <= names

        records: Any = wait_for(lambda: [r for r in receiver.log_records()
                                         if r["event_name"] == "recovery_completed"])
        assert records[0]["body"]["status"] == "terminated"
        stuck_logs = [r for r in receiver.log_records() if r["event_name"] == "session_stuck"]
        assert stuck_logs and stuck_logs[0]["body"]["session_id"] == "s9"
        assert stuck_logs[0]["severity"] == "WARNING"
        # The same lines went to the JSON stream.
        events = [json.loads(line)["event"] for line in log.getvalue().splitlines()]
        assert events.count("recovery_completed") == 1
    finally:
        t.shutdown()


# --------------------------------------------------------------------------- dead backends


class FailureLines(io.StringIO):
    """A log stream that keeps only export-failure lines and counts the rest."""

    def __init__(self) -> None:
        super().__init__()
        self.lines = 0
        self.failures: list[dict[str, Any]] = []

    def write(self, text: str) -> int:
        self.lines += text.count("\n")
        if '"otlp_export_failed"' in text:
            self.failures.append(json.loads(text))
        return len(text)


def test_closed_port_fast_calls_flat_memory_counted_failures() -> None:
    port = free_port()  # nothing listens there
    log = FailureLines()  # a StringIO would grow by 4 bytes a character
    t = Telemetry(otlp_config(endpoint=f"http://127.0.0.1:{port}", protocol="grpc",
                              interval=3600, timeout=0.1),
                  environ={}, log_stream=log)
    try:
        sessions = [snap(f"s{i}", State.STUCK, Reason.NO_ACTIVITY) for i in range(5)]
        active = [snap(f"s{i}", State.ACTIVE, Reason.RECENT_PROGRESS) for i in range(5)]

        def one_round(i: int) -> float:
            start = time.perf_counter()
            t.update(sessions)
            t.on_transition(sessions[i % 5], State.ACTIVE)  # opens an incident span
            t.on_report(sessions[i % 5], {"n": i})
            t.on_transition(active[i % 5], State.STUCK)  # ends it: one span per round
            t.on_tick(0.001)
            took = time.perf_counter() - start
            t.force_flush(2.0)  # one failed export per signal per round
            return took

        for i in range(20):
            one_round(i)
        log.failures.clear()
        # Measured between two points of steady state (tracemalloc on for both),
        # so what is in flight at any moment does not count as growth. Steady state
        # churns by a few hundred kB either way; the leak this guards against (data
        # queued per failed export) grew 40 kB a round, 12 MB over this loop.
        tracemalloc.start()
        try:
            for i in range(60):
                one_round(i)
            gc.collect()
            before = tracemalloc.take_snapshot()
            slowest = max(one_round(i) for i in range(300))
            gc.collect()
            after = tracemalloc.take_snapshot()
        finally:
            tracemalloc.stop()
        # Snapshots themselves are tracemalloc's allocations, not ours.
        mine = [tracemalloc.Filter(False, tracemalloc.__file__)]
        growth = sum(stat.size_diff for stat in
                     after.filter_traces(mine).compare_to(before.filter_traces(mine), "filename"))
        assert growth < 1_000_000, f"memory grew {growth} bytes over 300 failed exports"
        assert slowest < 0.25, f"a round of calls took {slowest:.3f} s"
        assert exposition_value(t, "otelwatch_export_failures_total", signal="metrics") >= 380
        assert exposition_value(t, "otelwatch_export_failures_total", signal="traces") >= 380
        assert exposition_value(t, "otelwatch_export_failures_total", signal="logs") >= 380
        # Rate limited to one line per signal per minute: all were logged during
        # the warm-up, none since.
        assert log.lines > 1000
        assert log.failures == []
    finally:
        start = time.monotonic()
        t.shutdown(timeout=2.0)
        assert time.monotonic() - start < 3.5


def test_failure_lines_name_the_cause() -> None:
    port = free_port()  # nothing listens there
    log = io.StringIO()
    t = Telemetry(otlp_config(endpoint=f"http://127.0.0.1:{port}", protocol="grpc",
                              interval=3600, timeout=0.1), environ={}, log_stream=log)
    try:
        t.on_transition(snap("s1", State.STUCK, Reason.NO_ACTIVITY), State.ACTIVE)
        t.on_transition(snap("s1", State.ACTIVE, Reason.RECENT_PROGRESS), State.STUCK)
        for _ in range(5):
            t.force_flush(2.0)
        lines = [json.loads(line) for line in log.getvalue().splitlines()
                 if '"otlp_export_failed"' in line]
        assert sorted(line["signal"] for line in lines) == ["logs", "metrics", "traces"]
        by_signal = {line["signal"]: line for line in lines}
        assert "UNAVAILABLE" in by_signal["metrics"]["error"]
        assert by_signal["metrics"]["endpoint"] == f"http://127.0.0.1:{port}"
        assert exposition_value(t, "otelwatch_export_failures_total", signal="metrics") == 5
    finally:
        t.shutdown(timeout=1.0)


def test_silent_backend_never_blocks_the_caller(tcp_server: TcpServer) -> None:
    """A backend that accepts and never answers: exports hang on the SDK's
    threads until their timeout, the caller's calls do not."""
    t = Telemetry(otlp_config(endpoint=f"http://127.0.0.1:{tcp_server.port}",
                              protocol="http/protobuf", interval=0.1, timeout=1.0),
                  environ={}, log_stream=io.StringIO())
    try:
        sessions = [snap(f"s{i}", State.STALLED, Reason.CPU_SPIN) for i in range(10)]
        slowest = 0.0
        deadline = time.monotonic() + 2.5
        rounds = 0
        while time.monotonic() < deadline and rounds < 2000:
            start = time.perf_counter()
            t.update(sessions)
            t.on_transition(sessions[rounds % 10], State.ACTIVE)
            t.on_report(sessions[rounds % 10], {})
            t.on_tick(0.001)
            body, _ = t.prometheus_exposition()
            slowest = max(slowest, time.perf_counter() - start)
            assert b'otelwatch_sessions{state="stalled"} 10.0' in body
            rounds += 1
            time.sleep(0.01)
        assert rounds > 50
        assert slowest < 0.25, f"a round took {slowest:.3f} s while exports hung"
        wait_for(lambda: tcp_server.accepted, timeout=5)  # the exporter connected
        wait_for(lambda: exposition_value(t, "otelwatch_export_failures_total") >= 1, timeout=5)
    finally:
        start = time.monotonic()
        t.shutdown(timeout=1.0)
        assert time.monotonic() - start < 2.5, "shutdown waited on a hung export"
