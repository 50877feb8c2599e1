"""collector-config.yaml: every pipeline component is defined, memory_limiter comes
first, the OTLP receivers use otelwatch's default ports on loopback, and the
Prometheus exporter is where the compose Prometheus scrapes.

Structure only: the collector binary is not installed here. When `otelcol-contrib`
is on PATH, `otelcol-contrib validate` runs as well.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.procs import REPO

ROOT = REPO
CONFIG = ROOT / "collector-config.yaml"
SECTIONS = ("receivers", "processors", "exporters")
OTLP_GRPC_PORT = 4317  # the OTLP default otelwatch's SDK exporter uses for grpc
OTLP_HTTP_PORT = 4318  # ... and for http/protobuf


def load() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(CONFIG.read_text())
    return data


def port_of(endpoint: str) -> int:
    return int(endpoint.rsplit(":", 1)[1])


def test_pipelines_for_every_signal() -> None:
    pipelines = load()["service"]["pipelines"]
    assert set(pipelines) == {"metrics", "traces", "logs"}
    assert "prometheus" in pipelines["metrics"]["exporters"]
    assert any(e.split("/")[0] == "otlp" for e in pipelines["traces"]["exporters"])
    assert pipelines["logs"]["exporters"]


def test_every_referenced_component_is_defined() -> None:
    cfg = load()
    for name, pipeline in cfg["service"]["pipelines"].items():
        for section in SECTIONS:
            for component in pipeline.get(section, []):
                assert component in (cfg.get(section) or {}), f"{name}: {section}.{component} undefined"
        assert pipeline["receivers"] and pipeline["exporters"], name
    for ext in cfg["service"].get("extensions", []):
        assert ext in cfg["extensions"], ext


def test_every_defined_component_is_used() -> None:
    cfg = load()
    used = {c for p in cfg["service"]["pipelines"].values() for k in SECTIONS for c in p.get(k, [])}
    for section in SECTIONS:
        unused = set(cfg[section]) - used
        assert not unused, f"{section} defined but in no pipeline: {unused}"


def test_memory_limiter_first_and_batch_last() -> None:
    for name, pipeline in load()["service"]["pipelines"].items():
        procs = pipeline["processors"]
        assert procs[0] == "memory_limiter", name
        assert procs[-1] == "batch", name


def test_otlp_receiver_ports_and_loopback_binding() -> None:
    protocols = load()["receivers"]["otlp"]["protocols"]
    assert port_of(protocols["grpc"]["endpoint"]) == OTLP_GRPC_PORT
    assert port_of(protocols["http"]["endpoint"]) == OTLP_HTTP_PORT
    for proto in ("grpc", "http"):
        host = protocols[proto]["endpoint"].rsplit(":", 1)[0]
        # Explicit loopback: the compose file overrides it for container networks.
        assert host in ("127.0.0.1", "localhost", "[::1]"), proto


def test_otlp_ports_match_otelwatch_defaults() -> None:
    """otelwatch sets no endpoint of its own, so its exporters use the SDK defaults."""
    import inspect

    import opentelemetry.exporter.otlp.proto.grpc.exporter as grpc_exporter
    from opentelemetry.exporter.otlp.proto.http import metric_exporter as http_exporter

    from otelwatch.config import Config

    otlp = Config().export.otlp
    assert otlp.endpoint == ""
    assert otlp.protocol in ("", "grpc")
    assert port_of(http_exporter.DEFAULT_ENDPOINT.rstrip("/")) == OTLP_HTTP_PORT
    assert f"localhost:{OTLP_GRPC_PORT}" in inspect.getsource(grpc_exporter)


def test_prometheus_exporter_keeps_contract_names() -> None:
    cfg = load()
    prom = cfg["exporters"]["prometheus"]
    assert not prom.get("namespace"), "a namespace would prefix every otelwatch_ name"
    assert prom.get("add_metric_suffixes", True) is True, "counters must keep _total"
    # The unit "1" would become a _ratio suffix on the CPU gauge without the transform.
    transform = cfg["processors"]["transform/otelwatch"]
    statements = [s for group in transform["metric_statements"] for s in group["statements"]]
    assert any('"otelwatch.session.cpu.utilization"' in s and "set(unit" in s for s in statements)
    expiry = prom["metric_expiration"]
    assert expiry.endswith("m") and int(expiry[:-1]) <= 5


def test_compose_scrapes_the_prometheus_exporter() -> None:
    port = port_of(load()["exporters"]["prometheus"]["endpoint"])
    prom = yaml.safe_load((ROOT / "deploy" / "compose" / "prometheus.yml").read_text())
    targets = [t for job in prom["scrape_configs"] for sc in job.get("static_configs", [])
               for t in sc["targets"]]
    assert f"otelcol:{port}" in targets


def test_validate_with_collector_binary_when_installed(tmp_path: Path) -> None:
    # Optional: the collector is not a test dependency (no Debian package).
    binary = shutil.which("otelcol-contrib")
    if not binary:
        pytest.skip("otelcol-contrib not installed")
    proc = subprocess.run([binary, "validate", f"--config={CONFIG}"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
