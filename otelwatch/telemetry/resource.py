"""The OTel Resource describing this otelwatch process.

Built from an explicit environment mapping (not os.environ) so tests and the
daemon pass what they mean. Precedence, lowest first: otelwatch's defaults,
OTEL_RESOURCE_ATTRIBUTES, OTEL_SERVICE_NAME.
"""

from __future__ import annotations

import socket
import uuid
from collections.abc import Mapping

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.version import __version__ as sdk_version

from otelwatch import __version__
from otelwatch.telemetry.otlp import parse_key_values


def build_resource(environ: Mapping[str, str], service_instance_id: str | None = None) -> Resource:
    host = socket.gethostname()
    attrs: dict[str, str] = {
        "service.name": "otelwatch",
        "service.version": __version__,
        # Stable across restarts: through a Collector this becomes Prometheus's
        # `instance` label, and a fresh UUID per restart would leave the old one
        # looking dead (OtelwatchDown) and fill dashboards' host lists. One
        # otelwatch per host, so the host name is unique; a second one on the same
        # host sets it through OTEL_RESOURCE_ATTRIBUTES.
        "service.instance.id": host or str(uuid.uuid4()),
        "host.name": host,
        "telemetry.sdk.name": "opentelemetry",
        "telemetry.sdk.language": "python",
        "telemetry.sdk.version": sdk_version,
    }
    attrs.update(parse_key_values(environ.get("OTEL_RESOURCE_ATTRIBUTES", "")))
    service_name = environ.get("OTEL_SERVICE_NAME", "").strip()
    if service_name:
        attrs["service.name"] = service_name
    if service_instance_id:
        # The daemon's explicit id wins: it is what its other outputs carry.
        attrs["service.instance.id"] = service_instance_id
    return Resource(attrs)
