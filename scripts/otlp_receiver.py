"""A real OTLP/gRPC receiver on 127.0.0.1 (the collector services of opentelemetry-proto): it
keeps every span, metric point and log record it is sent, for the tests and `make demo`."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2, logs_service_pb2_grpc
from opentelemetry.proto.collector.metrics.v1 import (
    metrics_service_pb2,
    metrics_service_pb2_grpc,
)
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

__all__ = ["OtlpReceiver", "Point", "Span"]


def _attrs(kvs: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kv in kvs:
        which = kv.value.WhichOneof("value")
        out[kv.key] = getattr(kv.value, which) if which else None
    return out


@dataclass(frozen=True)
class Span:
    service: str
    resource: dict[str, Any]
    name: str
    trace_id: str
    span_id: str
    parent_id: str
    attributes: dict[str, Any]


@dataclass(frozen=True)
class Point:
    service: str
    resource: dict[str, Any]
    metric: str
    attributes: dict[str, Any]
    value: float


@dataclass
class OtlpReceiver:
    """``start()`` binds 127.0.0.1:0; ``endpoint`` is what exporters are pointed at."""

    spans: list[Span] = field(default_factory=list)
    points: list[Point] = field(default_factory=list)
    logs: list[tuple[str, str]] = field(default_factory=list)  # (service, body)
    port: int = 0
    _server: Any = None
    _changed: threading.Condition = field(default_factory=threading.Condition)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> OtlpReceiver:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        receiver = self

        class Traces(trace_service_pb2_grpc.TraceServiceServicer):
            def Export(self, request: Any, context: Any) -> Any:
                receiver._add_spans(request)
                return trace_service_pb2.ExportTraceServiceResponse()

        class Metrics(metrics_service_pb2_grpc.MetricsServiceServicer):
            def Export(self, request: Any, context: Any) -> Any:
                receiver._add_points(request)
                return metrics_service_pb2.ExportMetricsServiceResponse()

        class Logs(logs_service_pb2_grpc.LogsServiceServicer):
            def Export(self, request: Any, context: Any) -> Any:
                receiver._add_logs(request)
                return logs_service_pb2.ExportLogsServiceResponse()

        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Traces(), server)
        metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(Metrics(), server)
        logs_service_pb2_grpc.add_LogsServiceServicer_to_server(Logs(), server)
        self.port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        self._server = server
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop(0.5).wait()

    def wait(self, predicate: Callable[[OtlpReceiver], bool], timeout: float = 30.0) -> bool:
        with self._changed:
            return self._changed.wait_for(lambda: predicate(self), timeout)

    def _add_spans(self, request: Any) -> None:
        got = []
        for rs in request.resource_spans:
            resource = _attrs(rs.resource.attributes)
            for ss in rs.scope_spans:
                for s in ss.spans:
                    got.append(Span(str(resource.get("service.name", "")), resource, s.name,
                                    s.trace_id.hex(), s.span_id.hex(), s.parent_span_id.hex(),
                                    _attrs(s.attributes)))
        with self._changed:
            self.spans.extend(got)
            self._changed.notify_all()

    def _add_points(self, request: Any) -> None:
        got = []
        for rm in request.resource_metrics:
            resource = _attrs(rm.resource.attributes)
            service = str(resource.get("service.name", ""))
            for sm in rm.scope_metrics:
                for m in sm.metrics:
                    kind = m.WhichOneof("data")
                    if kind not in ("gauge", "sum"):
                        continue  # histograms and summaries: not what the tests look at
                    for dp in getattr(m, kind).data_points:
                        value = dp.as_double if dp.HasField("as_double") else float(dp.as_int)
                        got.append(Point(service, resource, m.name, _attrs(dp.attributes),
                                         value))
        with self._changed:
            self.points.extend(got)
            self._changed.notify_all()

    def _add_logs(self, request: Any) -> None:
        got: list[tuple[str, str]] = []
        for rl in request.resource_logs:
            service = str(_attrs(rl.resource.attributes).get("service.name", ""))
            for sl in rl.scope_logs:
                got.extend((service, r.body.string_value) for r in sl.log_records)
        with self._changed:
            self.logs.extend(got)
            self._changed.notify_all()
