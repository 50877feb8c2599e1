"""A real Prometheus scrapes `Telemetry.prometheus_exposition()` (served by a tiny
loopback HTTP server: the daemon is not needed) and PromQL sees the contract
series with their labels and values. `promtool check metrics` lints the text.
"""

from __future__ import annotations

import io
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from otelwatch.config import Config
from otelwatch.model import Reason, RecoveryStatus, RecoveryStep, SessionSnapshot, State
from otelwatch.telemetry import Telemetry
from tests.support.procs import require_binary, wait_for
from tests.support.prom_support import MetricsServer, PromHandle, start_prometheus

NOW = time.time()


def snap(sid: str, state: State, reason: Reason, **kw: object) -> SessionSnapshot:
    fields: dict[str, object] = dict(
        session_id=sid, agent="claude-code", pid=100, state=state, reason=reason,
        state_since=NOW - 60, last_event_time=NOW - 700, last_event_age_s=700.0, silence_s=700.0,
        cpu_percent=0.0, rss_bytes=5_000_000, open_fds=12, threads=3, tcp={"ESTABLISHED": 1})
    fields.update(kw)
    return SessionSnapshot(**fields)  # type: ignore[arg-type]


@pytest.fixture
def telemetry() -> Iterator[Telemetry]:
    t = Telemetry(Config(), environ={}, log_stream=io.StringIO(), service_instance_id="prom-test")
    try:
        yield t
    finally:
        t.shutdown()


@pytest.fixture
def served(telemetry: Telemetry) -> Iterator[MetricsServer]:
    server = MetricsServer(telemetry.prometheus_exposition)
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def prometheus(tmp_path: Path, served: MetricsServer) -> Iterator[PromHandle]:
    prom = start_prometheus(tmp_path, [served.target])
    try:
        yield prom
    finally:
        prom.stop()


def test_prometheus_scrapes_the_contract_series(telemetry: Telemetry, prometheus: PromHandle) -> None:
    stuck = snap("s1", State.STUCK, Reason.NO_ACTIVITY)
    busy = snap("s2", State.STALLED, Reason.CPU_SPIN, cpu_percent=85.0, tcp={})
    telemetry.update([stuck, busy])
    telemetry.on_transition(stuck, State.ACTIVE)
    telemetry.on_report(stuck, {"wchan": "do_select"})
    telemetry.on_recovery_step(RecoveryStep("s1", "claude-code", "signal", "completed", NOW, 100,
                                            status=RecoveryStatus.KILLED, duration_s=11.0))
    for _ in range(3):
        telemetry.on_tick(0.02)

    prometheus.wait_for('up{job="otelwatch"} == 1')
    prometheus.wait_for("otelwatch_collector_tick_duration_seconds_count == 3")
    assert prometheus.value(
        'otelwatch_session_tcp_connections{tcp_state="ESTABLISHED",session_id="s1"}') == 1.0
    assert prometheus.value(
        'otelwatch_session_tcp_connections{tcp_state="ESTABLISHED",session_id="s2"}') == 0.0
    assert prometheus.value('otelwatch_session_cpu_utilization{session_id="s2"}') == 0.85
    assert prometheus.value('otelwatch_sessions{state="stuck"}') == 1.0
    assert prometheus.value('otelwatch_sessions{state="active"}') == 0.0
    assert prometheus.value(
        'otelwatch_session_stuck_total{agent="claude-code",reason="no_activity"}') == 1.0
    assert prometheus.value('otelwatch_recovery_completed_total{status="killed"}') == 1.0
    assert prometheus.value(
        'histogram_quantile(1, otelwatch_session_stuck_age_seconds_bucket)') == 900.0
    (status,) = prometheus.query('otelwatch_session_status{session_id="s1"}')
    labels = status["metric"]
    assert (labels["state"], labels["reason"], labels["agent"]) == ("stuck", "no_activity", "claude-code")
    assert prometheus.value('count(target_info{service_name="otelwatch"})') == 1.0

    # The session leaves: its per-session series go stale in Prometheus.
    telemetry.update([busy])
    wait_for(lambda: not prometheus.query('otelwatch_session_status{session_id="s1"}'), timeout=15)
    prometheus.wait_for('otelwatch_sessions{state="stuck"} == 0')


def test_promtool_accepts_the_exposition(telemetry: Telemetry) -> None:
    promtool = require_binary("promtool")
    telemetry.update([snap("s1", State.STUCK, Reason.NO_ACTIVITY),
                      snap("s2", State.ACTIVE, Reason.RECENT_PROGRESS)])
    telemetry.on_transition(snap("s1", State.STUCK, Reason.NO_ACTIVITY), State.ACTIVE)
    telemetry.on_tick(0.01)
    body, _ = telemetry.prometheus_exposition()
    result = subprocess.run([promtool, "check", "metrics"], input=body, capture_output=True,
                            timeout=30, check=False)
    output = (result.stdout + result.stderr).decode()
    # promtool also lints naming conventions (units, _total); it passes cleanly.
    assert result.returncode == 0, output
    assert output.strip() == "", output
