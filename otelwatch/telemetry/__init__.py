"""otelwatch's exporters: OTel metrics (Prometheus endpoint and OTLP), incident
traces and structured logs, all fed from one `Telemetry` object.

The daemon calls `Telemetry` once per tick and on each session event; nothing
in this package reads /proc or blocks the tick on a backend.
"""

from __future__ import annotations

from otelwatch.telemetry.core import Telemetry, TelemetrySink
from otelwatch.telemetry.otlp import OtlpSettings, resolve_otlp

__all__ = ["OtlpSettings", "Telemetry", "TelemetrySink", "resolve_otlp"]
