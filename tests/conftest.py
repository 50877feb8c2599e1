from __future__ import annotations

import signal
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

from tests.support.procs import Spawner, TcpServer
from tests.support.tmux_support import Server, running_tmux_server

if TYPE_CHECKING:
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from otelwatch.telemetry import Telemetry

# Tests stop the CLIs they start with SIGINT (Ctrl-C). A suite started as a background job of a
# non-interactive shell (`pytest ... &`) inherits SIGINT ignored, and so would every command it
# starts (Python then installs no KeyboardInterrupt handler): `status --watch` would never stop.
# A handled SIGINT here is reset to the default in each child at exec.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture
def spawn() -> Iterator[Spawner]:
    spawner = Spawner()
    try:
        yield spawner
    finally:
        spawner.cleanup()


@pytest.fixture
def tcp_server() -> Iterator[TcpServer]:
    server = TcpServer("127.0.0.1")
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def tcp_server6() -> Iterator[TcpServer]:
    server = TcpServer("::1")
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def tmux_server() -> Iterator[Server]:
    """A real private tmux server with one pane running a fake agent (see tmux_support)."""
    with running_tmux_server() as srv:
        yield srv


# The telemetry fixtures import the OpenTelemetry SDK only when a test asks for them.


@pytest.fixture
def tel() -> Iterator[Telemetry]:
    """A real `Telemetry` with default config, no OTLP, JSON lines into a StringIO."""
    import io

    from otelwatch.config import Config
    from otelwatch.telemetry import Telemetry

    t = Telemetry(Config(), environ={}, log_stream=io.StringIO(), service_instance_id="test-1")
    try:
        yield t
    finally:
        t.shutdown()


@pytest.fixture
def spans(tel: Telemetry) -> InMemorySpanExporter:
    """The finished spans of `tel`, through the SDK's own in-memory exporter."""
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    tel.tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    return exporter
