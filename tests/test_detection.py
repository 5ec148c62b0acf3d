"""Detection (docs/security.md, "Detection"): a cloned device certificate, a freeze, a
drip-fed download, and expired certificates, each against a real control plane, real agents,
real TLS and (for MQTT) a real Mosquitto."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
from cryptography import x509
from edgefleet.v1 import admin_pb2, agent_pb2, agent_pb2_grpc

from control_plane.services.broker import MqttSettings
from edge_agent.cli import main as agent_main
from edge_agent.state import StateDir
from fleet.cli import main as fleet_main
from fleetcore import pki
from tests.support import (
    WAIT,
    FakeClock,
    LoopThread,
    RunningAgent,
    RunningControlPlane,
    fleet_json,
    rpc_code,
    start_agent,
    start_control_plane,
    wait_until,
)

T = TypeVar("T")



def _start(transport: str, home: Path, loop: LoopThread, **overrides: Any) -> RunningControlPlane:
    if transport == "grpc":
        return start_control_plane(home, loop, **overrides)
    from tests.mqtt_support import start_mqtt_control_plane  # noqa: PLC0415

    return start_mqtt_control_plane(home, loop, **overrides)


@pytest.fixture
def plane(request: pytest.FixtureRequest, tmp_path: Path,
          loop: LoopThread) -> Iterator[Callable[..., RunningControlPlane]]:
    """A factory: ``plane(transport, **config overrides)``; stopped after the test."""
    started: list[RunningControlPlane] = []

    def make(transport: str, **overrides: Any) -> RunningControlPlane:
        running = _start(transport, tmp_path / "cp", loop, **overrides)
        started.append(running)
        return running

    yield make
    for running in started:
        running.stop()
        if running.broker is not None:
            running.broker.stop()


def _alerts(cp: RunningControlPlane, device_id: str) -> dict[str, admin_pb2.DeviceAlert]:
    return {a.kind: a for a in cp.device(device_id).alerts}


def _audit(cp: RunningControlPlane, action: str) -> list[admin_pb2.AuditEvent]:
    events = cp.admin_stub().ListAuditEvents(admin_pb2.ListAuditEventsRequest(limit=1000),
                                             timeout=WAIT).events
    return [e for e in events if e.action == action]


def _clone(cp: RunningControlPlane, tmp_path: Path) -> tuple[str, Path, Path]:
    """Enroll one device and copy its whole state directory: the clone has its key and
    certificate."""
    cfg = cp.enroll_agent(tmp_path / "original")
    shutil.copytree(tmp_path / "original", tmp_path / "clone")
    return cfg.device_id, tmp_path / "original", tmp_path / "clone"


def _release_bytes(state_dir: Path) -> bytes | None:
    path = StateDir(state_dir).release
    return path.read_bytes() if path.exists() else None


# ---------------------------------------------------------------------------- clones
@pytest.mark.parametrize("transport", ["grpc", "mqtt"])
def test_a_cloned_certificate_is_flagged_audited_and_shown(
    plane: Callable[..., RunningControlPlane], tmp_path: Path, transport: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    cp = plane(transport)
    device, original, clone = _clone(cp, tmp_path)
    agents = [start_agent(d, cp.loop, transport=transport) for d in (original, clone)]
    try:
        alert = wait_until(lambda: _alerts(cp, device).get("clone-suspected"))
    finally:
        for a in agents:
            a.stop()
    detail = json.loads(alert.detail)
    assert len(set(detail["sessions"])) == 2
    assert detail["sessions"][0] in {a.agent.session_id for a in agents}
    if transport == "grpc":
        assert all(p.startswith("ipv4:127.0.0.1:") for p in detail["peers"])
    else:
        assert detail["peers"] == ["mqtt", "mqtt"]
    flagged = _audit(cp, "devices.clone-suspected")
    assert [(e.actor, e.target, e.outcome) for e in flagged] == [
        ("control-plane", device, "allowed")]
    assert json.loads(flagged[0].detail)["policy"] == "flag"
    # "flag": the device stays enrolled and is shown flagged in `fleet devices list|show`.
    assert cp.device(device).revoked_at == 0
    listed = fleet_json(cp, capsys, "devices", "list")
    assert [a["kind"] for d in listed if d["id"] == device for a in d["alerts"]] == [
        "clone-suspected"]
    capsys.readouterr()
    config = str(cp.home / "operators/admin/fleet.toml")
    assert fleet_main(["--config", config, "--api", cp.api, "devices", "list"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if device in line)
    assert row.rstrip().endswith("clone-suspected")
    assert fleet_main(["--config", config, "--api", cp.api, "devices", "show", device]) == 0
    assert "alert clone-suspected" in capsys.readouterr().out


@pytest.mark.parametrize("transport", ["grpc", "mqtt"])
def test_a_cloned_certificate_is_revoked_under_on_clone_revoke(
    plane: Callable[..., RunningControlPlane], tmp_path: Path, transport: str,
) -> None:
    cp = plane(transport, on_clone="revoke")
    device, original, clone = _clone(cp, tmp_path)
    before = _release_bytes(original)
    agents = [start_agent(d, cp.loop, transport=transport) for d in (original, clone)]
    try:
        wait_until(lambda: cp.device(device).revoked_at)
        # Both copies are refused from then on: over gRPC by the registry check on every call;
        # over MQTT by the broker's CRL (rewritten and reloaded) at the next TLS handshake.
        if transport == "grpc":
            for a in agents:
                while a.wait_for("error")["state"] != "refused":
                    pass
        else:
            wait_until(lambda: _broker_refuses(cp, original))
    finally:
        for a in agents:
            a.stop()
    assert [e.actor for e in _audit(cp, "devices.clone-suspected")] == ["control-plane"]
    revoked = _audit(cp, "devices.revoke")
    assert [(e.actor, e.target) for e in revoked] == [("control-plane", device)]
    assert "clone-suspected" in _alerts(cp, device)
    assert _release_bytes(original) == before  # the refused clone changed nothing there
    with grpc.secure_channel(cp.api, _credentials(original)) as channel, pytest.raises(
            grpc.RpcError) as refused:
        agent_pb2_grpc.AgentServiceStub(channel).Heartbeat(agent_pb2.HeartbeatRequest(),
                                                           timeout=WAIT)
    assert rpc_code(refused.value) == grpc.StatusCode.UNAUTHENTICATED
    if transport == "mqtt":
        assert cp.cp.mqtt is not None
        crl = x509.load_pem_x509_crl(cp.cp.mqtt.crl.read_bytes())
        serial = pki.serial_hex(pki.load_certificate(StateDir(original).cert.read_bytes()))
        assert crl.get_revoked_certificate_by_serial_number(int(serial, 16)) is not None


@pytest.mark.parametrize("transport", ["grpc", "mqtt"])
def test_a_plain_agent_restart_is_not_flagged_as_a_clone(
    plane: Callable[..., RunningControlPlane], tmp_path: Path, transport: str,
) -> None:
    cp = plane(transport, on_clone="revoke")
    cfg = cp.enroll_agent(tmp_path / "a")
    for _ in range(2):  # a restart: a new session that then stays
        agent = start_agent(tmp_path / "a", cp.loop, transport=transport)
        try:
            for _ in range(5):  # more than the clone window (3 heartbeat intervals)
                agent.wait_for("heartbeat")
        finally:
            agent.stop()
    device = cp.device(cfg.device_id)
    assert device.revoked_at == 0
    assert list(device.alerts) == []
    assert _audit(cp, "devices.clone-suspected") == []


def test_a_cloned_certificate_holding_two_sync_streams_open_is_flagged(
    plane: Callable[..., RunningControlPlane], tmp_path: Path,
) -> None:
    """Two Sync streams of one device, different sessions, both kept open (no heartbeats)."""
    cp = plane("grpc")
    device, original, _ = _clone(cp, tmp_path)
    with grpc.secure_channel(cp.api, _credentials(original)) as first, \
            grpc.secure_channel(cp.api, _credentials(tmp_path / "clone")) as second:
        streams = [agent_pb2_grpc.AgentServiceStub(channel).Sync(
            agent_pb2.SyncRequest(session_id=session), timeout=WAIT)
            for channel, session in ((first, "a" * 32), (second, "b" * 32))]
        try:
            for stream in streams:
                stream.initial_metadata()  # each is open and subscribed
            alert = wait_until(lambda: _alerts(cp, device).get("clone-suspected"))
        finally:
            for stream in streams:
                stream.cancel()
    detail = json.loads(alert.detail)
    assert detail["how"] == "sync-streams"
    assert sorted(detail["sessions"]) == ["a" * 32, "b" * 32]


def test_one_session_reopening_its_sync_stream_is_not_a_clone(
    plane: Callable[..., RunningControlPlane], tmp_path: Path,
) -> None:
    cp = plane("grpc", on_clone="revoke")
    device, original, _ = _clone(cp, tmp_path)
    with grpc.secure_channel(cp.api, _credentials(original)) as channel:
        stub = agent_pb2_grpc.AgentServiceStub(channel)
        streams = [stub.Sync(agent_pb2.SyncRequest(session_id="a" * 32), timeout=WAIT)
                   for _ in range(2)]
        try:
            for stream in streams:
                stream.initial_metadata()
            stub.Heartbeat(agent_pb2.HeartbeatRequest(session_id="a" * 32), timeout=WAIT)
            # What the grace timer would decide for each open stream, asked now (no timer is
            # even set for streams of one session): no clone.
            clones = cp.cp.services.detection.clones
            tokens = list(clones._devices[device].streams)
            assert len(tokens) == 2
            assert all(clones.still_concurrent(device, t, time.time()) is None for t in tokens)
            stub.Heartbeat(agent_pb2.HeartbeatRequest(session_id="a" * 32), timeout=WAIT)
        finally:
            for stream in streams:
                stream.cancel()
    assert cp.device(device).revoked_at == 0
    assert _alerts(cp, device) == {}


def _broker_refuses(cp: RunningControlPlane, state_dir: Path) -> bool:
    from tests.mqtt_support import connect, connected  # noqa: PLC0415

    assert cp.cp.mqtt is not None
    client, result = connect(cp.cp.mqtt, StateDir(state_dir).cert, StateDir(state_dir).key)
    client.client.loop_stop()
    if connected(result):
        client.close()
        return False
    return True


def _credentials(state_dir: Path) -> grpc.ChannelCredentials:
    s = StateDir(state_dir)
    return grpc.ssl_channel_credentials(s.ca.read_bytes(), s.key.read_bytes(),
                                        s.cert.read_bytes())


# ---------------------------------------------------------------------------- expired certs
def _expired_device_certificate(cp: RunningControlPlane, device_id: str,
                                out: Path) -> tuple[Path, Path]:
    """A certificate for the enrolled device, signed by the fleet CA and recorded in the
    registry, whose validity ended an hour ago; its key and certificate files."""
    key = pki.generate_key()
    past = time.time() - 2 * 86400
    pem, record = cp.cp.authority.issue(key.public_key(), pki.IdentityKind.DEVICE, device_id,
                                        past, 86400 - 3600)
    cp.cp.store.add_certificate(record, current_for_device=False)
    out.mkdir()
    (out / "device.key").write_bytes(pki.private_key_pem(key))
    (out / "device.pem").write_bytes(pem)
    return out / "device.key", out / "device.pem"


def test_a_expired_certificate_is_refused_by_the_grpc_api(
    plane: Callable[..., RunningControlPlane], tmp_path: Path,
) -> None:
    cp = plane("grpc")
    device_id = cp.enroll_agent(tmp_path / "a").device_id
    key, cert = _expired_device_certificate(cp, device_id, tmp_path / "expired")
    ca = StateDir(tmp_path / "a").ca.read_bytes()
    creds = grpc.ssl_channel_credentials(ca, key.read_bytes(), cert.read_bytes())
    with grpc.secure_channel(cp.api, creds) as channel, pytest.raises(grpc.RpcError) as refused:
        agent_pb2_grpc.AgentServiceStub(channel).Heartbeat(agent_pb2.HeartbeatRequest(),
                                                           timeout=WAIT)
    # The TLS handshake fails: the call never reaches the servicer.
    assert rpc_code(refused.value) == grpc.StatusCode.UNAVAILABLE
    device = cp.cp.store.list_devices()[0]
    assert device.last_seen is None  # no heartbeat was recorded


def test_a_expired_certificate_is_refused_by_the_broker(
    plane: Callable[..., RunningControlPlane], tmp_path: Path,
) -> None:
    from tests.mqtt_support import connect, connected  # noqa: PLC0415

    cp = plane("mqtt")
    device_id = cp.enroll_agent(tmp_path / "a").device_id
    key, cert = _expired_device_certificate(cp, device_id, tmp_path / "expired")
    settings = cp.cp.mqtt
    assert isinstance(settings, MqttSettings)
    client, result = connect(settings, cert, key)
    try:
        assert not connected(result), result
    finally:
        client.client.loop_stop()
    good, result = connect(settings, StateDir(tmp_path / "a").cert,
                           StateDir(tmp_path / "a").key)
    try:
        assert connected(result), result  # the same device's valid certificate is accepted
    finally:
        good.close()


# ---------------------------------------------------------------------------- freeze
def test_a_freeze_is_reported_and_the_agent_keeps_serving(
    plane: Callable[..., RunningControlPlane], tmp_path: Path, trained_bundle: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """No newer release document reaches the device while its newest one expires (here the
    device's clock moves past the document's expiry and the control plane, by its own clock,
    has no reason to issue another): the agent keeps serving what it has, refuses the stale
    documents it is sent, and its heartbeats report the freeze."""
    from tests.test_delivery import _bundle_for, _committed, _fleet, _wait_models  # noqa: PLC0415

    cp = plane("grpc", release_ttl_seconds=600)
    bundle = _bundle_for(cp, trained_bundle, tmp_path / "v1")
    assert _fleet(cp, "models", "publish", str(bundle)) == 0
    cfg = cp.enroll_agent(tmp_path / "a")
    assert _fleet(cp, "rollouts", "start", "--model", "digits", "--version", "1") == 0
    clock = FakeClock(time.time())
    agent = start_agent(tmp_path / "a", cp.loop, probation_seconds=0.0)
    agent.agent.clock = clock
    agent.agent.updater.clock = clock
    try:
        _wait_models(agent, _committed(1))
        held = _release_bytes(tmp_path / "a")
        serial = agent.agent.trust.mark.serial if agent.agent.trust.mark else 0
        assert _alerts(cp, cfg.device_id) == {}
        clock.advance(601)  # the device's newest document is now past its expiry
        alert = wait_until(lambda: _alerts(cp, cfg.device_id).get("freeze"))
        seen = agent.agent.heartbeats  # the alert came with one of these (or the next)
        # Still serving version 1; the held document and the trusted serial are unchanged.
        assert any(m["serving"] and m["version"] == 1 for m in agent.agent.updater.report())
        assert agent.agent.trust.mark is not None and agent.agent.trust.mark.serial == serial
        assert _release_bytes(tmp_path / "a") == held
        # The device says so too (`edge-agent status`), from the status file a heartbeat after
        # the alert wrote (queued events of earlier heartbeats do not count).
        while agent.wait_for("heartbeat")["count"] <= seen:
            pass
        capsys.readouterr()
        assert agent_main(["status", "--state-dir", str(tmp_path / "a"), "--json"]) == 0
        assert "freeze" in json.loads(capsys.readouterr().out)["delivery_problems"]
    finally:
        agent.stop()
    assert f"release serial {serial} expired" in json.loads(alert.detail)["detail"]
    listed = fleet_json(cp, capsys, "devices", "show", cfg.device_id)
    assert [a["kind"] for a in listed["alerts"]] == ["freeze"]


# ---------------------------------------------------------------------------- slow retrieval
def _drip_feed(monkeypatch: pytest.MonkeyPatch, piece: int, every: float) -> dict[str, bool]:
    """The control plane's FetchBundle, slowed while ``["on"]`` of the returned switch is
    true: the same bytes from the real servicer, sent ``piece`` bytes at a time, each piece
    ``every`` seconds after the last on the clock the agent measures a download's pace on (a
    drip-feeding server, without waiting for it: the clock moves as the pieces go out). Patch
    before the control plane starts (the server binds the method then)."""
    from control_plane.api.grpc_agent import AgentServicer  # noqa: PLC0415
    from edge_agent.install import download  # noqa: PLC0415

    real = AgentServicer.FetchBundle
    switch = {"on": False}
    clock = [time.monotonic()]
    monkeypatch.setattr(download, "_now", lambda: clock[0])

    async def slowed(self: AgentServicer, request: agent_pb2.FetchBundleRequest,
                     context: grpc.aio.ServicerContext) -> Any:
        async for chunk in real(self, request, context):
            if not switch["on"]:
                yield chunk
                continue
            for i in range(0, len(chunk.data), piece):
                clock[0] += every
                yield agent_pb2.BundleChunk(offset=chunk.offset + i,
                                            data=chunk.data[i : i + piece])

    monkeypatch.setattr(AgentServicer, "FetchBundle", slowed)
    return switch


@pytest.mark.parametrize("limit", ["rate", "deadline"])
def test_a_drip_fed_download_is_aborted_reported_and_changes_nothing(
    plane: Callable[..., RunningControlPlane], tmp_path: Path, trained_bundle: Path,
    monkeypatch: pytest.MonkeyPatch, limit: str,
) -> None:
    from tests.test_delivery import _bundle_for, _committed, _fleet, _wait_models  # noqa: PLC0415

    drip = _drip_feed(monkeypatch, piece=256, every=0.05)  # about 5 KB/s when on
    cp = plane("grpc")
    cfg = cp.enroll_agent(tmp_path / "a")
    agent: RunningAgent | None = None
    try:
        # Version 1 arrives at full speed and is served.
        for version in (1, 2):
            bundle = _bundle_for(cp, trained_bundle, tmp_path / f"v{version}", version=version)
            assert _fleet(cp, "models", "publish", str(bundle)) == 0
        assert _fleet(cp, "rollouts", "start", "--model", "digits", "--version", "1") == 0
        agent = start_agent(tmp_path / "a", cp.loop, probation_seconds=0.0)
        _wait_models(agent, _committed(1))
        agent.stop()
        drip["on"] = True
        installed = agent.agent.updater.report()
        rules: dict[str, Any] = ({"download_min_bytes_per_second": 64 * 1024.0,
                  "download_rate_window_seconds": 0.5} if limit == "rate" else
                 {"download_min_bytes_per_second": 0.0, "download_deadline_seconds": 0.5})
        agent = start_agent(tmp_path / "a", cp.loop, probation_seconds=0.0, **rules)
        assert _fleet(cp, "rollouts", "start", "--model", "digits", "--version", "2") == 0
        error = agent.wait_for("slow-retrieval")["error"]
        assert ("below the minimum" if limit == "rate" else "deadline") in error
        alert = wait_until(lambda: _alerts(cp, cfg.device_id).get("slow-retrieval"))
        assert "aborted" in json.loads(alert.detail)["detail"]
        # Still serving version 1, committed; version 2 was not installed.
        serving = [m for m in agent.agent.updater.report() if m["serving"]]
        assert [(m["version"], m["state"]) for m in serving] == [(1, "committed")]
        assert [m for m in agent.agent.updater.report() if m["version"] == 1] == [
            m for m in installed if m["version"] == 1]
        assert not any(m["version"] == 2 and m["state"] in ("active", "committed")
                       for m in agent.agent.updater.report())
    finally:
        if agent is not None:
            agent.stop()


# ---------------------------------------------------------------------------- the pure rules
def test_clone_rules_two_sessions_taking_turns_are_a_clone_a_restart_is_not() -> None:
    from control_plane.domain.clones import CloneDetector  # noqa: PLC0415

    d = CloneDetector(window_seconds=3.0)
    # A restart: s1, then s2 from then on.
    assert d.heartbeat("dev", "s1", "ipv4:10.0.0.1:1", 0.0) is None
    assert d.heartbeat("dev", "s1", "ipv4:10.0.0.1:1", 1.0) is None
    assert all(d.heartbeat("dev", "s2", "ipv4:10.0.0.1:2", t) is None for t in (2.0, 3.0, 4.0))
    # s1 again, but long after it was last seen: outside the window, not a clone.
    assert d.heartbeat("dev", "s1", "ipv4:10.0.0.9:1", 20.0) is None
    # Taking turns within the window: a clone, with both peers.
    assert d.heartbeat("dev", "s2", "ipv4:10.0.0.1:2", 20.5) is None
    suspicion = d.heartbeat("dev", "s1", "ipv4:10.0.0.9:1", 21.0)
    assert suspicion is not None and suspicion.how == "heartbeats"
    assert suspicion.detail()["peers"] == ["ipv4:10.0.0.1:2", "ipv4:10.0.0.9:1"]
    # Agents from before session ids (empty) are not compared; another device is apart.
    assert d.heartbeat("dev", "", "mqtt", 22.0) is None
    assert d.heartbeat("other", "s1", "mqtt", 22.0) is None


def test_clone_rules_concurrent_sync_streams_of_two_sessions() -> None:
    from control_plane.domain.clones import CloneDetector  # noqa: PLC0415

    d = CloneDetector(window_seconds=3.0)
    first, other = d.stream_opened("dev", "s1", "ipv4:10.0.0.1:1", 0.0)
    assert other is None
    # The same session reopening its stream is no clone.
    again, other = d.stream_opened("dev", "s1", "ipv4:10.0.0.1:1", 0.5)
    assert other is None
    d.stream_closed("dev", again)
    # A restart: the old stream closed before the grace ran out.
    second, other = d.stream_opened("dev", "s2", "ipv4:10.0.0.1:2", 1.0)
    assert other is not None
    d.stream_closed("dev", first)
    assert d.still_concurrent("dev", second, 3.0) is None
    # A clone: both stay open.
    third, other = d.stream_opened("dev", "s3", "ipv4:10.0.0.7:3", 4.0)
    assert other is not None
    suspicion = d.still_concurrent("dev", third, 6.0)
    assert suspicion is not None and suspicion.how == "sync-streams"
    assert {suspicion.first.session, suspicion.second.session} == {"s2", "s3"}
