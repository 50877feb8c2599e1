"""OTLP wiring (telemetry/otlp.py, telemetry/resource.py): settings from config
and the OTEL_* environment, the resource, rate-limited export failure logs.
The real OTLP receivers are in test_otlp_real.py.
"""

from __future__ import annotations

import io
from typing import Any

from otelwatch.config import Config, ExportConfig, OtlpExportConfig, parse_config
from otelwatch.telemetry import Telemetry, resolve_otlp
from otelwatch.telemetry.otlp import FailureReporter, parse_key_values
from tests.support.telemetry_support import find


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


def test_export_interval_config_then_variable_then_default() -> None:
    from otelwatch.telemetry.otlp import export_interval

    assert export_interval(Config(), {}) == 15.0
    assert export_interval(Config(), {"OTEL_METRIC_EXPORT_INTERVAL": "2000"}) == 2.0
    assert export_interval(otlp_cfg(interval=30), {"OTEL_METRIC_EXPORT_INTERVAL": "2000"}) == 30.0
    # What cannot be a period is ignored, as the SDK does: the environment never stops the daemon.
    for bad in ("soon", "-5", "0", "nan", "1e12"):
        assert export_interval(Config(), {"OTEL_METRIC_EXPORT_INTERVAL": bad}) == 15.0
    assert resolve_otlp(Config(), {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317",
                                   "OTEL_METRIC_EXPORT_INTERVAL": "2500"}).interval_s == 2.5
