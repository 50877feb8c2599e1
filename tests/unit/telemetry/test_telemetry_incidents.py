"""Incident spans (telemetry/incidents.py) through the real SDK: opened on
stalled/stuck, ended on recovery, exit, disappearance or shutdown. Spans are
read with the SDK's own InMemorySpanExporter (the `spans` fixture); the real
OTLP receivers are in test_otlp_real.py.
"""

from __future__ import annotations

from typing import Any

from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from otelwatch.model import Reason, RecoveryStatus, RecoveryStep, State
from otelwatch.telemetry import Telemetry
from tests.support.telemetry_support import NOW, logs_of, snap


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


def test_incidents_go_to_a_tracer_provider_passed_in() -> None:
    import io

    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor

    from otelwatch.config import Config

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    t = Telemetry(Config(), environ={}, log_stream=io.StringIO(), tracer_provider=provider)
    try:
        t.on_transition(snap("s1", State.STUCK, Reason.NO_ACTIVITY), State.ACTIVE)
        t.on_transition(snap("s1"), State.STUCK)
        assert [dict(s.attributes or {})["outcome"] for s in exporter.get_finished_spans()] == ["resolved"]
    finally:
        t.shutdown()
