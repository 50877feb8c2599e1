"""The Prometheus exposition of otelwatch's OTel instruments (GET /metrics).

Uses the OpenTelemetry Prometheus reader, whose translation yields exactly the
contract names of DESIGN.md (checked: `_total` on counters, `_seconds` for
unit "s", `_bytes` for "By", no `_ratio` for "1", `{...}` units dropped,
`session.id` -> `session_id`; tests/system/test_telemetry_instruments.py pins this). It is
registered in a private CollectorRegistry so several Telemetry objects (tests)
never collide in prometheus_client's global one. It serves the counters,
histograms, the per-state count and target_info; the per-session families are
rendered from the last tick's snapshots (exposition.py) and appended by
Telemetry.prometheus_exposition. A scrape never touches /proc.
"""

from __future__ import annotations

import threading

from opentelemetry.exporter.prometheus import PrometheusMetricReader
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder


class PrometheusEndpoint:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        # Scope labels (otel_scope_name, ...) would ride on every series of the
        # contract; there is one scope, so they carry nothing.
        self.reader = PrometheusMetricReader(scope_info_enabled=False, registry=self.registry)
        # The reader's collector hands data from collect() to the registry through a
        # shared queue; concurrent scrapes could take each other's data.
        self._lock = threading.Lock()

    def exposition(self, accept: str = "") -> tuple[bytes, str]:
        encoder, content_type = choose_encoder(accept or "")
        with self._lock:
            body = encoder(self.registry)
        return body, content_type
