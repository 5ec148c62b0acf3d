"""The control plane observed: Prometheus ``/metrics`` (what the fleet reported, and the
process's own counters), ``/healthz`` and ``/readyz`` on the metrics address
(``serve --metrics HOST:PORT``), and readiness for the gRPC health service.

* Fleet families come from ``services.fleet_metrics`` at scrape time (nothing is counted
  twice); the process's own counters (RPCs by method and code, scheduler runs and failures)
  live in a private registry.
* Readiness: the database answers a read, and the scheduler is running and has ticked
  recently. ``/readyz`` answers 200 or 503 with the checks as JSON; the gRPC health service of
  the API and enrollment ports says SERVING or NOT_SERVING from the same checks.
* The HTTP server is the standard library's (its request parser caps the request line at 64 KiB
  and headers at 100); it serves GET only, on its own thread, and reads storage through the
  store's lock.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import grpc
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client import Counter as PromCounter
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

from control_plane.config import parse_hostport
from control_plane.services.fleet_metrics import FAMILIES, FleetMetrics
from control_plane.storage import Store
from fleetcore.otel import Otel

__all__ = ["MetricsServer", "Readiness", "RpcMetricsInterceptor", "ServerMetrics",
           "export_fleet_metrics"]

log = logging.getLogger(__name__)


class _FleetCollector:
    """prometheus_client's side of ``FleetMetrics``."""

    def __init__(self, fleet: FleetMetrics) -> None:
        self.fleet = fleet

    def collect(self) -> Iterator[Metric]:
        for family in self.fleet.collect():
            spec = family.spec
            metric: GaugeMetricFamily | CounterMetricFamily
            if spec.kind == "counter":
                metric = CounterMetricFamily(spec.name, spec.help, labels=spec.labels)
            else:
                metric = GaugeMetricFamily(spec.name, spec.help, labels=spec.labels)
            for labels, value in family.samples:
                metric.add_metric(list(labels), value)
            yield metric


class ServerMetrics:
    """The registry behind ``/metrics``: the fleet's families and the process's counters."""

    def __init__(self, fleet: FleetMetrics, readiness: Readiness) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_FleetCollector(fleet))
        self.readiness = readiness
        self.rpc_started = PromCounter(
            "edgefleet_cp_grpc_started", "gRPC calls the control plane received",
            ("method",), registry=self.registry)
        self.rpc_handled = PromCounter(
            "edgefleet_cp_grpc_handled", "gRPC calls the control plane finished, by status code",
            ("method", "code"), registry=self.registry)
        self.job_runs = PromCounter(
            "edgefleet_cp_scheduler_runs", "Scheduler job runs", ("job",), registry=self.registry)
        self.job_failures = PromCounter(
            "edgefleet_cp_scheduler_failures", "Scheduler job runs that raised", ("job",),
            registry=self.registry)
        self.registry.register(_ReadyCollector(readiness))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _ReadyCollector:
    def __init__(self, readiness: Readiness) -> None:
        self.readiness = readiness

    def collect(self) -> Iterator[Metric]:
        checks = self.readiness.checks()
        ready = GaugeMetricFamily("edgefleet_cp_ready",
                                  "1 when every readiness check passes (database, scheduler)")
        ready.add_metric([], all(ok for ok, _ in checks.values()))
        yield ready
        check = GaugeMetricFamily("edgefleet_cp_check", "1 when this readiness check passes",
                                  labels=("check",))
        for name, (ok, _) in sorted(checks.items()):
            check.add_metric([name], ok)
        yield check


@dataclass
class Readiness:
    """Whether the control plane can do its work: the database answers, the scheduler runs."""

    store: Store
    tick_seconds: float
    started: float = 0.0  # monotonic time the scheduler started (0: not running)
    last_tick: float = 0.0  # monotonic time of the last rollout tick that finished

    def scheduler_started(self) -> None:
        self.started = self.last_tick = time.monotonic()

    def scheduler_stopped(self) -> None:
        self.started = 0.0

    def ticked(self) -> None:
        self.last_tick = time.monotonic()

    def checks(self) -> dict[str, tuple[bool, str]]:
        out: dict[str, tuple[bool, str]] = {}
        try:
            self.store.ping()
            out["database"] = (True, "ok")
        except Exception as exc:  # any failure to read is "not ready"
            out["database"] = (False, f"{type(exc).__name__}: {exc}"[:200])
        if not self.started:
            out["scheduler"] = (False, "not running")
        else:
            late = time.monotonic() - self.last_tick
            limit = max(3 * self.tick_seconds, 10.0)
            out["scheduler"] = (late <= limit, f"last tick {late:.1f}s ago (limit {limit:g}s)")
        return out

    def ready(self) -> bool:
        return all(ok for ok, _ in self.checks().values())


class RpcMetricsInterceptor(grpc.aio.ServerInterceptor):
    """Counts each call by method, and unary-response calls by their status code."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self.metrics = metrics

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = str(handler_call_details.method)
        if handler is None:
            return handler
        self.metrics.rpc_started.labels(method).inc()
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._wrap(method, handler.unary_unary),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(
                self._wrap(method, handler.stream_unary),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        return handler

    def _wrap(self, method: str, behavior: Callable[..., Any]) -> Callable[..., Any]:
        handled = self.metrics.rpc_handled

        async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
            try:
                reply = await behavior(request, context)
            except BaseException:
                handled.labels(method, _code_name(context.code(), "UNKNOWN")).inc()
                raise
            handled.labels(method, _code_name(context.code(), "OK")).inc()
            return reply

        return call


def _code_name(code: Any, default: str) -> str:
    if isinstance(code, grpc.StatusCode):
        return str(code.name)
    return default


class MetricsServer:
    """``GET /metrics``, ``/healthz`` (the process answers) and ``/readyz`` on one address."""

    def __init__(self, address: str, metrics: ServerMetrics, readiness: Readiness) -> None:
        host, port = parse_hostport(address)
        handler = _handler(metrics, readiness)
        try:
            self.httpd = ThreadingHTTPServer((host, port), handler)
        except OSError as exc:
            raise OSError(f"cannot listen on {address} for metrics: {exc.strerror} "
                          "(choose another --metrics address)") from None
        self.httpd.daemon_threads = True
        self.host = host
        self.port = int(self.httpd.server_address[1])
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="metrics-http",
                                        daemon=True)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> None:
        self._thread.start()
        log.info("metrics, /healthz and /readyz on http://%s", self.address)

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(5)


def _handler(metrics: ServerMetrics, readiness: Readiness) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "edgefleet-control-plane"
        timeout = 10  # a client that stalls mid-request is dropped

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                try:
                    body = metrics.render()
                except Exception as exc:  # the database went away mid-scrape
                    log.warning("metrics scrape failed: %s", exc)
                    self._send(503, b"metrics unavailable\n", "text/plain")
                    return
                self._send(200, body, CONTENT_TYPE_LATEST)
            elif path == "/healthz":
                self._send(200, b"ok\n", "text/plain")
            elif path == "/readyz":
                checks = readiness.checks()
                ok = all(passed for passed, _ in checks.values())
                doc = {"ready": ok, "checks": {name: {"ok": passed, "detail": detail}
                                               for name, (passed, detail) in checks.items()}}
                self._send(200 if ok else 503, json.dumps(doc).encode() + b"\n",
                           "application/json")
            else:
                self._send(404, b"not found: try /metrics, /healthz or /readyz\n",
                           "text/plain")

        def do_HEAD(self) -> None:
            self._send(405, b"", "text/plain")

        def _send(self, code: int, body: bytes, content_type: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("metrics http: " + format, *args)

    return Handler


def export_fleet_metrics(otel: Otel, fleet: FleetMetrics, *, max_age_seconds: float = 1.0,
                         ) -> None:
    """Re-export the fleet's families through OpenTelemetry: one observable instrument per
    family, each sample's labels as attributes (``device``, ``model``, ``version``, ...), so
    one Collector sees what every device reported. One collection serves every instrument of
    an export (it is reused for ``max_age_seconds``)."""
    from opentelemetry.metrics import CallbackOptions, Observation  # noqa: PLC0415

    cache: dict[str, Any] = {"at": -1.0, "families": {}}
    lock = threading.Lock()

    def families() -> dict[str, Any]:
        with lock:
            now = time.monotonic()
            if now - cache["at"] > max_age_seconds:
                cache["families"] = {f.spec.name: f for f in fleet.collect()}
                cache["at"] = now
            return dict(cache["families"])

    def callback(name: str) -> Callable[[CallbackOptions], list[Observation]]:
        def observe(options: CallbackOptions) -> list[Observation]:
            family = families().get(name)
            if family is None:
                return []
            return [Observation(value, dict(zip(family.spec.labels, labels, strict=True)))
                    for labels, value in family.samples]
        return observe

    for spec in FAMILIES.values():
        if spec.kind == "counter":
            otel.meter.create_observable_counter(spec.name, [callback(spec.name)],
                                                 description=spec.help)
        else:
            otel.meter.create_observable_gauge(spec.name, [callback(spec.name)],
                                               description=spec.help)
