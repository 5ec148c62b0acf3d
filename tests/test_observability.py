"""The control plane observed: Prometheus /metrics with what devices reported, /healthz and
/readyz, grpc.health.v1 on both ports, and the shipped Grafana dashboards naming only metrics
the control plane exports."""

from __future__ import annotations

import http.client
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from edgefleet.v1 import agent_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from control_plane.services.fleet_metrics import FAMILIES
from tests.support import (
    WAIT,
    LoopThread,
    RunningControlPlane,
    device_credentials,
    send_telemetry,
    start_control_plane,
)

REPO = Path(__file__).resolve().parent.parent
DASHBOARDS = sorted((REPO / "packaging" / "grafana").glob("*.json"))


@pytest.fixture
def cpm(tmp_path: Path, loop: LoopThread) -> Iterator[RunningControlPlane]:
    running = start_control_plane(tmp_path / "cp", loop, metrics_listen="127.0.0.1:0")
    yield running
    running.stop()


def _get(cp: RunningControlPlane, path: str) -> tuple[int, bytes, str]:
    server = cp.cp.metrics_server
    assert server is not None
    conn = http.client.HTTPConnection(server.host, server.port, timeout=WAIT)
    try:
        conn.request("GET", path)
        reply = conn.getresponse()
        return reply.status, reply.read(), reply.getheader("Content-Type") or ""
    finally:
        conn.close()


def _samples(cp: RunningControlPlane) -> dict[str, list[tuple[dict[str, str], float]]]:
    status, body, content_type = _get(cp, "/metrics")
    assert status == 200 and content_type.startswith("text/plain")
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(body.decode()):
        out.setdefault(family.name, [])
        for s in family.samples:
            out.setdefault(s.name, []).append((dict(s.labels), s.value))
    return out


def _exported_names(samples: dict[str, list[tuple[dict[str, str], float]]]) -> set[str]:
    names = set(samples)
    return names | {n + "_total" for n in names}


def test_metrics_carry_what_devices_reported_with_device_and_model_labels(
    cpm: RunningControlPlane, tmp_path: Path, trained_bundle: Path,
) -> None:
    from tests.support import assign_digits_v1  # noqa: PLC0415

    before = _samples(cpm)
    for spec in FAMILIES.values():  # every family is there before any device reported
        assert spec.name in before, spec.name
    assert [v for labels, v in before["edgefleet_devices"] if labels["status"] == "online"] == [0]

    cpm.enroll_agent(tmp_path / "a", labels={"site": "north"})
    device = next(iter(cpm.cp.store.list_devices())).id
    assign_digits_v1(cpm, trained_bundle, tmp_path)
    now = time.time()
    stats = {"model": "digits", "version": 1, "requests": 40, "errors": 2, "labelled": 10,
             "correct": 9, "p50_ms": 1.5, "p95_ms": 4.0}
    drift = {"model": "digits", "version": 1, "start": now - 60, "end": now - 1, "rows": 500,
             "score": 0.42, "drifted": True, "prediction_psi": 0.1,
             "drifted_features": ["pixel_3"], "feature_psi": {"pixel_3": 0.9, "pixel_4": 0.01}}
    send_telemetry(cpm.api, tmp_path / "a", [
        agent_pb2.TelemetryRecord(seq=1, kind="arm_stats", created_at=now,
                                  payload=json.dumps(stats).encode()),
        agent_pb2.TelemetryRecord(seq=2, kind="drift", created_at=now,
                                  payload=json.dumps(drift).encode()),
        agent_pb2.TelemetryRecord(seq=3, kind="nonsense", created_at=now, payload=b"{}"),
    ])

    after = _samples(cpm)
    arm = {"device": device, "model": "digits", "version": "1"}
    assert (arm, 40.0) in after["edgefleet_arm_requests_total"]
    assert (arm, 2.0) in after["edgefleet_arm_errors_total"]
    assert (arm, 4.0) in after["edgefleet_arm_latency_p95_ms"]
    assert (arm, 0.42) in after["edgefleet_drift_score"]
    assert (arm, 1.0) in after["edgefleet_drift_drifted"]
    assert ({"device": device}, 1.0) in after["edgefleet_device_reports_refused_total"]
    # No agent runs: the rollout's one step reaches the device, which has not installed it.
    assert ({"model": "digits", "version": "1", "state": "running"}, 1.0) in after[
        "edgefleet_rollout_info"]
    assert ({"model": "digits", "version": "1"}, 100.0) in after["edgefleet_rollout_percent"]
    assert ({"model": "digits", "version": "1", "state": "pending"}, 1.0) in after[
        "edgefleet_rollout_devices"]
    # The process's own counters: the telemetry call above, counted by method and code.
    handled = after["edgefleet_cp_grpc_handled_total"]
    assert ({"method": "/edgefleet.v1.AgentService/SendTelemetry", "code": "OK"}, 1.0) in handled
    assert after["edgefleet_cp_ready"] == [({}, 1.0)]


def test_healthz_and_readyz_follow_the_database_and_the_scheduler(
    cpm: RunningControlPlane, loop: LoopThread,
) -> None:
    assert _get(cpm, "/healthz")[0] == 200
    status, body, _ = _get(cpm, "/readyz")
    assert status == 200
    doc = json.loads(body)
    assert doc["ready"] is True and set(doc["checks"]) == {"database", "scheduler"}
    assert _get(cpm, "/nope")[0] == 404

    # A scheduler that stopped ticking is not ready; nor is one whose database is gone.
    readiness = cpm.cp.readiness
    readiness.last_tick -= 3600
    status, body, _ = _get(cpm, "/readyz")
    assert status == 503 and json.loads(body)["checks"]["scheduler"]["ok"] is False
    readiness.ticked()
    assert _get(cpm, "/readyz")[0] == 200


def test_readiness_reports_a_database_that_cannot_answer(tmp_path: Path,
                                                         loop: LoopThread) -> None:
    cp = start_control_plane(tmp_path / "cp", loop, metrics_listen="127.0.0.1:0")
    try:
        cp.cp.store.close()  # the database is gone under the running server
        status, body, _ = _get(cp, "/readyz")
        assert status == 503
        assert json.loads(body)["checks"]["database"]["ok"] is False
        assert _get(cp, "/metrics")[0] == 503  # said, not a traceback or a hang
    finally:
        cp.stop()  # closing it again is harmless


def _health(target: str, creds: grpc.ChannelCredentials, service: str = "",
            override: str = "") -> int:
    options = [("grpc.ssl_target_name_override", override)] if override else []
    with grpc.secure_channel(target, creds, options=options) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=WAIT)
        return int(reply.status)


def test_grpc_health_on_the_api_and_enrollment_ports(cpm: RunningControlPlane,
                                                     tmp_path: Path, loop: LoopThread) -> None:
    serving = health_pb2.HealthCheckResponse.SERVING
    # Enrollment port: TLS without a client certificate.
    anonymous = grpc.ssl_channel_credentials(cpm.ca_pem)
    assert _health(cpm.enroll, anonymous) == serving
    assert _health(cpm.enroll, anonymous, "edgefleet.v1.AgentService") == serving
    # API port: mTLS, as any device or operator.
    cpm.enroll_agent(tmp_path / "a")
    assert _health(cpm.api, device_credentials(tmp_path / "a"),
                   "edgefleet.v1.AdminService") == serving
    with pytest.raises(grpc.RpcError) as err:
        _health(cpm.api, device_credentials(tmp_path / "a"), "no.such.Service")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND

    cpm.cp.readiness.last_tick -= 3600  # the scheduler stalls: health says so
    loop.run(cpm.cp._refresh_health())
    assert _health(cpm.enroll, anonymous) == health_pb2.HealthCheckResponse.NOT_SERVING


def test_metrics_address_in_use_is_one_error_line(tmp_path: Path, cpm: RunningControlPlane,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    from control_plane.cli import main  # noqa: PLC0415

    server = cpm.cp.metrics_server
    assert server is not None
    rc = main(["serve", "--home", str(cpm.home), "--api", "127.0.0.1:0", "--enroll",
               "127.0.0.1:0", "--metrics", server.address])
    err = capsys.readouterr().err
    assert rc != 0 and "error:" in err and "metrics" in err and "Traceback" not in err


# --- the shipped Grafana dashboards --------------------------------------------------------

_METRIC = re.compile(r"\b(edgefleet_[a-z0-9_]+)")


def _panels(doc: dict) -> list[dict]:
    out = []
    for panel in doc.get("panels", []):
        out.append(panel)
        out.extend(panel.get("panels", []))  # collapsed rows hold their panels
    return out


def test_dashboards_query_only_metrics_the_control_plane_exports(
    cpm: RunningControlPlane,
) -> None:
    assert {p.name for p in DASHBOARDS} >= {"edgefleet-fleet.json",
                                             "edgefleet-control-plane.json"}
    exported = _exported_names(_samples(cpm))
    for path in DASHBOARDS:
        doc = json.loads(path.read_text())
        assert doc["title"] and doc["uid"] and doc["schemaVersion"] >= 36
        panels = [p for p in _panels(doc) if p.get("type") != "row"]
        assert panels, path.name
        for panel in panels:
            exprs = [t["expr"] for t in panel.get("targets", [])]
            assert exprs, f"{path.name}: panel {panel.get('title')!r} has no query"
            for expr in exprs:
                names = set(_METRIC.findall(expr))
                assert names, f"{path.name}: {expr!r} names no edgefleet metric"
                # A histogram's or summary's suffixes are not used: every name is exported.
                assert names <= exported, (path.name, panel.get("title"), names - exported)
        for variable in doc.get("templating", {}).get("list", []):
            query = variable.get("query", "")
            text = query if isinstance(query, str) else query.get("query", "")
            assert set(_METRIC.findall(text)) <= exported, (path.name, variable["name"])


def test_the_metrics_address_survives_hostile_requests(cpm: RunningControlPlane) -> None:
    """The standard library's parser bounds what a client sends; refused, the server goes on."""
    import socket  # noqa: PLC0415

    server = cpm.cp.metrics_server
    assert server is not None

    def raw(data: bytes) -> bytes:
        with socket.create_connection((server.host, server.port), timeout=WAIT) as s:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
            return s.recv(200)

    assert raw(b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.0 414")
    headers = b"".join(b"X-%d: y\r\n" % i for i in range(200))
    assert raw(b"GET /metrics HTTP/1.1\r\n" + headers + b"\r\n").startswith(b"HTTP/1.0 431")
    assert b"Error code: 400" in raw(b"\x16\x03\x01 garbage\r\n\r\n")  # a TLS hello
    assert raw(b"POST /metrics HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello").startswith(
        b"HTTP/1.0 501")
    assert _get(cpm, "/healthz")[0] == 200
