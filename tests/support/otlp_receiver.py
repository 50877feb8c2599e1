"""A real OTLP/gRPC receiver for tests: Trace, Metrics and Logs services on
127.0.0.1 at a free port, storing every request it gets.

Use as a context manager (`with OtlpReceiver() as rx:`); it is always stopped
on exit. Helpers flatten the stored protobufs into plain Python so tests can
assert on spans, span events, metric points and log records.
"""

from __future__ import annotations

import threading
import time
from concurrent import futures
from typing import Any

import grpc
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2, logs_service_pb2_grpc
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue


def any_value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind is None:
        return None
    if kind == "kvlist_value":
        return {kv.key: any_value(kv.value) for kv in value.kvlist_value.values}
    if kind == "array_value":
        return [any_value(v) for v in value.array_value.values]
    return getattr(value, kind)


def attributes(kvs: Any) -> dict[str, Any]:
    return {kv.key: any_value(kv.value) for kv in kvs if isinstance(kv, KeyValue)}


class OtlpReceiver:
    def __init__(self, host: str = "127.0.0.1") -> None:
        self._lock = threading.Lock()
        self.traces: list[trace_service_pb2.ExportTraceServiceRequest] = []
        self.metrics: list[metrics_service_pb2.ExportMetricsServiceRequest] = []
        self.logs: list[logs_service_pb2.ExportLogsServiceRequest] = []
        self.metric_times: list[float] = []  # time.monotonic() of each metrics request
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        receiver = self

        class Traces(trace_service_pb2_grpc.TraceServiceServicer):
            def Export(self, request: Any, context: Any) -> Any:
                with receiver._lock:
                    receiver.traces.append(request)
                return trace_service_pb2.ExportTraceServiceResponse()

        class Metrics(metrics_service_pb2_grpc.MetricsServiceServicer):
            def Export(self, request: Any, context: Any) -> Any:
                with receiver._lock:
                    receiver.metrics.append(request)
                    receiver.metric_times.append(time.monotonic())
                return metrics_service_pb2.ExportMetricsServiceResponse()

        class Logs(logs_service_pb2_grpc.LogsServiceServicer):
            def Export(self, request: Any, context: Any) -> Any:
                with receiver._lock:
                    receiver.logs.append(request)
                return logs_service_pb2.ExportLogsServiceResponse()

        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Traces(), self._server)
        metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(Metrics(), self._server)
        logs_service_pb2_grpc.add_LogsServiceServicer_to_server(Logs(), self._server)
        self.port = self._server.add_insecure_port(f"{host}:0")
        self.endpoint = f"http://{host}:{self.port}"

    def __enter__(self) -> OtlpReceiver:
        self._server.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._server.stop(grace=0).wait(5)

    # ------------------------------------------------------------------ views

    def spans(self) -> list[dict[str, Any]]:
        out = []
        with self._lock:
            requests = list(self.traces)
        for req in requests:
            for rs in req.resource_spans:
                resource = attributes(rs.resource.attributes)
                for ss in rs.scope_spans:
                    for span in ss.spans:
                        out.append({
                            "name": span.name,
                            "attributes": attributes(span.attributes),
                            "events": [(e.name, attributes(e.attributes)) for e in span.events],
                            "start": span.start_time_unix_nano / 1e9,
                            "end": span.end_time_unix_nano / 1e9,
                            "status": span.status.code,
                            "resource": resource,
                        })
        return out

    def metric_points(self) -> list[tuple[str, dict[str, Any], Any]]:
        """(metric name, attributes, value) for gauge/sum points; histograms give count."""
        out: list[tuple[str, dict[str, Any], Any]] = []
        with self._lock:
            requests = list(self.metrics)
        for req in requests:
            for rm in req.resource_metrics:
                for sm in rm.scope_metrics:
                    for m in sm.metrics:
                        kind = m.WhichOneof("data")
                        data = getattr(m, kind)
                        for p in data.data_points:
                            if kind == "histogram":
                                out.append((m.name, attributes(p.attributes), p.count))
                            else:
                                value = p.as_double if p.WhichOneof("value") == "as_double" else p.as_int
                                out.append((m.name, attributes(p.attributes), value))
        return out

    def log_records(self) -> list[dict[str, Any]]:
        out = []
        with self._lock:
            requests = list(self.logs)
        for req in requests:
            for rl in req.resource_logs:
                for sl in rl.scope_logs:
                    for rec in sl.log_records:
                        out.append({
                            "body": any_value(rec.body),
                            "attributes": attributes(rec.attributes),
                            "severity": rec.severity_text,
                            "event_name": getattr(rec, "event_name", ""),
                        })
        return out

