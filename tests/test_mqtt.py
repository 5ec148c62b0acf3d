"""MQTT transport attacks and outages against a real Mosquitto configured by `mqtt-config`.

Each attack test asserts the refusal and that nothing moved on the other side (no stored
telemetry, no change of the agent's release state).
"""

from __future__ import annotations

import datetime as dt
import json
import queue
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from edgefleet.v1 import admin_pb2, agent_pb2, common_pb2

from control_plane.services.broker import MqttSettings
from edge_agent.reporting.outbox import Outbox
from edge_agent.reporting.telemetry import encode
from edge_agent.state import StateDir
from fleet.cli import main as fleet_main
from fleetcore import pki
from fleetcore.errors import AuthenticationError
from fleetcore.mqtt_wire import ROOTS_TOPIC, Leaf, topic
from tests.mqtt_support import connect, connected, start_mqtt_control_plane, wait_bridge
from tests.support import (
    WAIT,
    LoopThread,
    RunningControlPlane,
    kill_agent_after_a_failed_contact,
    start_agent,
)
from tests.test_delivery import _bundle_for, _committed, _wait_models


@pytest.fixture
def mq(tmp_path: Path, loop: LoopThread) -> Iterator[RunningControlPlane]:
    running = start_mqtt_control_plane(tmp_path / "cp", loop)
    yield running
    running.stop()
    running.broker.stop()


def _settings(cp: RunningControlPlane) -> MqttSettings:
    assert cp.cp.mqtt is not None
    return cp.cp.mqtt


def _device(cp: RunningControlPlane, tmp_path: Path, name: str) -> tuple[str, StateDir]:
    cfg = cp.enroll_agent(tmp_path / name)
    return cfg.device_id, StateDir(tmp_path / name)


def _bridge_events(cp: RunningControlPlane) -> queue.Queue[tuple[str, str]]:
    events: queue.Queue[tuple[str, str]] = queue.Queue()
    assert cp.cp.bridge is not None
    cp.cp.bridge.on_event = lambda what, device: events.put((what, device))
    return events


def _wait_bridge(events: queue.Queue[tuple[str, str]], what: str, device: str) -> None:
    while events.get(timeout=WAIT) != (what, device):
        pass


def _bridge_publish(cp: RunningControlPlane, device: str, leaf: Leaf, payload: bytes,
                    retain: bool = False) -> None:
    """Publish as the control plane's bridge (its own client: another client with the bridge's
    certificate would take the bridge's session over)."""
    bridge = cp.cp.bridge
    assert bridge is not None
    cp.loop.loop.call_soon_threadsafe(
        lambda: bridge._publish(device, leaf, payload, retain=retain))


def _telemetry_seqs(cp: RunningControlPlane, device_id: str) -> list[int]:
    return [r.seq for r in cp.cp.store.telemetry_records(device_id)]


def _batch(*seqs: int) -> bytes:
    return agent_pb2.TelemetryBatch(records=[
        agent_pb2.TelemetryRecord(seq=s, kind="error", created_at=float(s),
                                  payload=encode({"where": "test", "error": str(s)}))
        for s in seqs]).SerializeToString()


def test_device_cannot_subscribe_or_publish_on_another_devices_topics(
    mq: RunningControlPlane, tmp_path: Path
) -> None:
    a, state_a = _device(mq, tmp_path, "a")
    b, state_b = _device(mq, tmp_path, "b")
    settings = _settings(mq)
    events = _bridge_events(mq)
    client, result = connect(settings, state_a.cert, state_a.key)
    other, result_b = connect(settings, state_b.cert, state_b.key)
    assert connected(result) and connected(result_b)
    try:
        # Mosquitto grants the subscriptions but delivers nothing the ACL does not let a read.
        for name in [topic(b, leaf) for leaf in Leaf] + ["edgefleet/v1/dev/+/release", "#"]:
            client.subscribe(name)
        client.subscribe(topic(a, Leaf.BUNDLE_REPLY))
        assert not other.publish(topic(b, Leaf.TELEMETRY), _batch(1)).is_failure
        assert not other.publish(topic(b, Leaf.STATUS), b"", retain=True).is_failure
        for leaf in (Leaf.RELEASE, Leaf.BUNDLE_REPLY, Leaf.RENEW_REPLY):
            _bridge_publish(mq, b, leaf, b"for b only")
        _bridge_publish(mq, a, Leaf.BUNDLE_REPLY, b"marker")
        # Delivery keeps the broker's order: had anything of b's reached a, it came first.
        first = client.messages.get(timeout=WAIT)
        while first.topic == ROOTS_TOPIC:  # the fleet's signed roots: every device reads them
            first = client.messages.get(timeout=WAIT)
        assert (first.topic, first.payload) == (topic(a, Leaf.BUNDLE_REPLY), b"marker")
        while not client.messages.empty():  # the same marker again, through "#"
            assert client.messages.get_nowait().topic in (topic(a, Leaf.BUNDLE_REPLY),
                                                          ROOTS_TOPIC)
        for leaf in Leaf:  # nothing of b's can be written either
            assert client.publish(topic(b, leaf), _batch(2)).is_failure, leaf
        assert client.publish(ROOTS_TOPIC, b"forged roots", retain=True).is_failure
        # Its own topics work as the ACL says: it may not forge its own release either.
        assert client.publish(topic(a, Leaf.RELEASE), b"forged", retain=True).is_failure
        assert not client.publish(topic(a, Leaf.TELEMETRY), _batch(7)).is_failure
        _wait_bridge(events, "telemetry", a)
    finally:
        for c in (client, other):
            c.close()
    assert _telemetry_seqs(mq, b) == [1]  # b's own batch, nothing a tried
    assert _telemetry_seqs(mq, a) == [7]


def test_client_id_of_another_device_cannot_take_over_its_session(
    mq: RunningControlPlane, tmp_path: Path
) -> None:
    _, state_a = _device(mq, tmp_path, "a")
    b, state_b = _device(mq, tmp_path, "b")
    victim, result = connect(_settings(mq), state_b.cert, state_b.key, client_id=b)
    assert connected(result)
    # use_username_as_clientid: a's client id is a's device id whatever it asks for.
    thief, result = connect(_settings(mq), state_a.cert, state_a.key, client_id=b)
    try:
        assert connected(result)
        assert victim.connects.empty()  # b was not kicked off
        assert not victim.publish(topic(b, Leaf.TELEMETRY), _batch(1)).is_failure
    finally:
        thief.close()
        victim.close()


def _other_ca_client(tmp_path: Path) -> tuple[Path, Path]:
    now = dt.datetime.now(dt.UTC)
    ca_key, ca = pki.create_ca("rogue", now, dt.timedelta(days=1))
    key = pki.generate_key()
    cert = pki.issue_client_certificate(ca_key, ca, key.public_key(), pki.IdentityKind.DEVICE,
                                        "dev-0000000000000000", now, dt.timedelta(days=1))
    (tmp_path / "rogue.pem").write_bytes(pki.certificate_pem(cert))
    (tmp_path / "rogue.key").write_bytes(pki.private_key_pem(key))
    return tmp_path / "rogue.pem", tmp_path / "rogue.key"


def test_client_without_certificate_or_from_another_ca_is_refused(
    mq: RunningControlPlane, tmp_path: Path
) -> None:
    _, result = connect(_settings(mq), None, None)
    assert not connected(result), result
    cert, key = _other_ca_client(tmp_path)
    _, result = connect(_settings(mq), cert, key)
    assert not connected(result), result


def test_revoked_device_is_refused_by_the_broker_and_ignored_by_the_bridge(
    mq: RunningControlPlane, tmp_path: Path, trained_bundle: Path
) -> None:
    bundle = _bundle_for(mq, trained_bundle, tmp_path / "v1")
    assert fleet_main(["--config", str(mq.home / "operators/admin/fleet.toml"), "--api", mq.api,
                       "models", "publish", str(bundle)]) == 0
    device, state = _device(mq, tmp_path, "a")
    assert fleet_main(["--config", str(mq.home / "operators/admin/fleet.toml"), "--api", mq.api,
                       "rollouts", "start", "--model", "digits", "--version", "1"]) == 0
    events = _bridge_events(mq)
    open_conn, result = connect(_settings(mq), state.cert, state.key)
    assert connected(result)
    try:
        assert not open_conn.subscribe(topic(device, Leaf.RELEASE)).is_failure
        assert open_conn.messages.get(timeout=WAIT).payload  # its retained release
        log_mark = len(mq.broker.log)
        mq.admin_stub().RevokeDevice(admin_pb2.RevokeDeviceRequest(id=device), timeout=WAIT)
        mq.broker.wait_for_log("Reloading config", after=log_mark)  # the CRL, via SIGHUP
        # The connection opened before stays up, but the bridge ignores what comes on it ...
        assert not open_conn.publish(topic(device, Leaf.TELEMETRY), _batch(1)).is_failure
        _wait_bridge(events, "refused", device)
        # ... and its retained release is cleared.
        assert open_conn.messages.get(timeout=WAIT).payload == b""
    finally:
        open_conn.close()
    _, result = connect(_settings(mq), state.cert, state.key)
    assert not connected(result), result  # a new connection fails the TLS handshake
    assert _telemetry_seqs(mq, device) == []
    crl = x509.load_pem_x509_crl(_settings(mq).crl.read_bytes())
    assert crl.get_revoked_certificate_by_serial_number(
        int(pki.serial_hex(pki.load_certificate(state.cert.read_bytes())), 16)) is not None


def test_hostile_payloads_are_refused_and_the_bridge_keeps_working(
    mq: RunningControlPlane, tmp_path: Path
) -> None:
    device, state = _device(mq, tmp_path, "a")
    events = _bridge_events(mq)
    client, result = connect(_settings(mq), state.cert, state.key)
    assert connected(result)
    try:
        for leaf in (Leaf.TELEMETRY, Leaf.STATUS, Leaf.BUNDLE_REQUEST, Leaf.RENEW_REQUEST):
            assert not client.publish(topic(device, leaf), b"\xff" * 64,
                                      correlation=b"c" * 8).is_failure
            _wait_bridge(events, "refused", device)
        # A bundle request for something outside its release: an error reply, no bytes.
        assert not client.subscribe(topic(device, Leaf.BUNDLE_REPLY)).is_failure
        request = agent_pb2.FetchBundleRequest(digest="sha256:" + "0" * 64, offset=0, length=10)
        client.publish(topic(device, Leaf.BUNDLE_REQUEST), request.SerializeToString(),
                       correlation=b"req-1")
        reply = client.messages.get(timeout=WAIT)
        assert reply.payload == b""
        assert dict(reply.properties.UserProperty)["error"].startswith(  # type: ignore[union-attr]
            "PERMISSION_DENIED")
        assert not client.publish(topic(device, Leaf.TELEMETRY), _batch(3)).is_failure
        _wait_bridge(events, "telemetry", device)
    finally:
        client.close()
    assert _telemetry_seqs(mq, device) == [3]


def test_agent_refuses_a_retained_release_replayed_from_an_old_serial(
    mq: RunningControlPlane, tmp_path: Path, trained_bundle: Path
) -> None:
    for version in (1, 2):
        bundle = _bundle_for(mq, trained_bundle, tmp_path / f"v{version}", version=version)
        assert fleet_main(["--config", str(mq.home / "operators/admin/fleet.toml"), "--api",
                           mq.api, "models", "publish", str(bundle)]) == 0
    device, state = _device(mq, tmp_path, "a")
    agent = start_agent(state.root, mq.loop, probation_seconds=0.0, transport="mqtt")
    try:
        assert fleet_main(["--config", str(mq.home / "operators/admin/fleet.toml"), "--api",
                           mq.api, "rollouts", "start", "--model", "digits", "--version",
                           "1"]) == 0
        _wait_models(agent, _committed(1))
        old = mq.cp.store.get_release(device)
        assert old is not None
        assert fleet_main(["--config", str(mq.home / "operators/admin/fleet.toml"), "--api",
                           mq.api, "rollouts", "start", "--model", "digits", "--version",
                           "2"]) == 0
        _wait_models(agent, _committed(2))
        mark = agent.agent.trust.mark
        assert mark is not None and mark.serial > old.serial
        release_file = state.release.read_bytes()
        # Someone with the broker's keys (or the bridge's) replays the old signed document,
        # then sends garbage: both are refused, and nothing moves.
        replay = common_pb2.SignedRelease(document=old.document, signature=old.signature)
        _bridge_publish(mq, device, Leaf.RELEASE, replay.SerializeToString(), retain=True)
        refused = agent.wait_for("release-refused")
        assert "serial" in refused["error"]
        _bridge_publish(mq, device, Leaf.RELEASE, b"\x0a\xff\xff", retain=True)
        assert "SignedRelease" in agent.wait_for("release-refused")["error"]
        assert agent.agent.trust.mark == mark
        assert state.release.read_bytes() == release_file
        assert agent.agent.models.active("digits")[0] == 2  # type: ignore[index]
    finally:
        agent.stop()


def test_agent_renews_its_certificate_over_mqtt(mq: RunningControlPlane, tmp_path: Path) -> None:
    device, state = _device(mq, tmp_path, "a")
    old_serial = pki.serial_hex(pki.load_certificate(state.cert.read_bytes()))
    agent = start_agent(state.root, mq.loop, renew_at_fraction=0.0, transport="mqtt")
    try:
        renewed = agent.wait_for("renewed")
        agent.agent.config.renew_at_fraction = 2 / 3
        agent.wait_for("heartbeat")  # reconnected to the broker with the new certificate
    finally:
        agent.stop()
    assert renewed["old_serial"] == old_serial != renewed["serial"]
    assert mq.device(device).certificate_serial == renewed["serial"]


@pytest.mark.slow
def test_telemetry_through_broker_outage_restart_and_kill_9_arrives_exactly_once(
    mq: RunningControlPlane, tmp_path: Path
) -> None:
    device, state = _device(mq, tmp_path, "a")
    mq.broker.stop()  # the broker is down while telemetry is written
    with Outbox(state.outbox) as outbox:
        for i in range(1, 21):
            outbox.append("error", encode({"where": "test", "error": str(i)}), now=float(i))
    kill_agent_after_a_failed_contact(state.root, "--transport", "mqtt")
    with Outbox(state.outbox) as outbox:  # written while it was dead
        for i in range(21, 26):
            outbox.append("error", encode({"where": "test", "error": str(i)}), now=float(i))
    # The broker comes back but the control plane is away: the broker takes the batches
    # (PUBACK) and keeps nothing for the absent bridge (clean sessions), and no acknowledgement
    # comes from the control plane, so the agent deletes nothing.
    mq.stop()
    mq.broker.start()
    agent = start_agent(state.root, mq.loop, transport="mqtt")
    try:
        while agent.wait_for("error")["error"].find("telemetry") < 0:
            pass  # a send that timed out waiting for the control plane
    finally:
        agent.stop()
    with Outbox(state.outbox) as outbox:
        assert outbox.stats().depth == 25
    # The broker crashes (SIGKILL), then comes back with the control plane: the agent sends
    # again and everything arrives, once.
    mq.broker.kill()
    mq.broker.start()
    mq.restart()
    events = _bridge_events(mq)
    agent = start_agent(state.root, mq.loop, transport="mqtt")
    try:
        while len(_telemetry_seqs(mq, device)) < 25:
            _wait_bridge(events, "telemetry", device)
        while True:  # the acknowledgements reach the agent: its outbox empties
            agent.wait_for("heartbeat")
            with Outbox(state.outbox) as outbox:
                if outbox.stats().depth == 0:
                    break
    finally:
        agent.stop()
    assert _telemetry_seqs(mq, device) == list(range(1, 26))
    (seventh,) = [r for r in mq.cp.store.telemetry_records(device) if r.seq == 7]
    assert json.loads(seventh.payload)["error"] == "7"


def test_mqtt_config_writes_a_broker_configuration(tmp_path: Path) -> None:
    from control_plane.cli import main as cp_main  # noqa: PLC0415

    assert cp_main(["init", "--home", str(tmp_path / "cp")]) == 0
    assert cp_main(["mqtt-config", "--home", str(tmp_path / "cp"), "--out",
                    str(tmp_path / "broker"), "--port", "18883", "--fleet-size", "50"]) == 0
    settings = MqttSettings.load(tmp_path / "cp")
    assert settings is not None and settings.port == 18883
    conf = settings.conf.read_text().splitlines()
    for line in ("require_certificate true", "use_identity_as_username true",
                 "use_username_as_clientid true", "persistence true", "allow_anonymous false",
                 f"crlfile {settings.crl}", "listener 18883", "max_queued_messages 6000"):
        assert line in conf, line
    acl = settings.acl.read_text().splitlines()
    assert "pattern read edgefleet/v1/dev/%u/release" in acl
    assert "pattern write edgefleet/v1/dev/%u/telemetry" in acl
    assert not any(line.startswith("pattern readwrite") for line in acl)
    assert (settings.out / "server.key").stat().st_mode & 0o777 == 0o600
    bridge = pki.load_certificate(settings.bridge_cert(tmp_path / "cp").read_bytes())
    with pytest.raises(AuthenticationError):  # no Edgefleet identity: the APIs refuse it
        pki.identity_from_certificate(bridge)
    assert cp_main(["serve", "--home", str(tmp_path / "cp"), "--mqtt", "tcp://x:1"]) == 1


def test_mqtt_config_for_a_container_names_the_paths_the_broker_sees(tmp_path: Path) -> None:
    from control_plane.cli import main as cp_main  # noqa: PLC0415

    assert cp_main(["init", "--home", str(tmp_path / "cp")]) == 0
    assert cp_main(["mqtt-config", "--home", str(tmp_path / "cp"), "--out",
                    str(tmp_path / "secret"), "--broker-dir", "/mosquitto/config",
                    "--data-dir", "/mosquitto/data"]) == 0
    conf = (tmp_path / "secret" / "mosquitto.conf").read_text().splitlines()
    for line in ("cafile /mosquitto/config/ca.pem", "crlfile /mosquitto/config/crl.pem",
                 "keyfile /mosquitto/config/server.key", "acl_file /mosquitto/config/acl",
                 "persistence_location /mosquitto/data/", "pid_file /mosquitto/data/mosquitto.pid"):
        assert line in conf, line
    assert not any(str(tmp_path) in line for line in conf)
    written = sorted(p.name for p in (tmp_path / "secret").iterdir() if p.is_file())
    assert written == ["acl", "ca.pem", "crl.pem", "mosquitto.conf", "server.key", "server.pem"]


def test_a_dropped_mqtt_connection_shows_offline_at_once(
    mq: RunningControlPlane, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The broker publishes the device's will when its connection drops: the fleet shows it
    offline then, not only once its heartbeats have lapsed."""
    device, state = _device(mq, tmp_path, "a")
    events = _bridge_events(mq)
    status = topic(device, Leaf.STATUS)
    client, result = connect(_settings(mq), state.cert, state.key, client_id=device,
                             will=(status, agent_pb2.AgentStatus(online=False).SerializeToString()))
    assert connected(result)
    beat = agent_pb2.AgentStatus(online=True, heartbeat=agent_pb2.HeartbeatRequest(
        agent_version="test"))
    assert not client.publish(status, beat.SerializeToString(), retain=True).is_failure
    _wait_bridge(events, "online", device)

    def listed() -> dict[str, Any]:
        capsys.readouterr()
        assert fleet_main(["--config", str(mq.home / "operators/admin/fleet.toml"), "--api",
                           mq.api, "devices", "list", "--json"]) == 0
        return {d["id"]: d for d in json.loads(capsys.readouterr().out)}[device]

    assert (listed()["status"], listed()["transport"]) == ("online", "mqtt")
    sock = client.client.socket()
    assert isinstance(sock, socket.socket)  # an ssl.SSLSocket
    sock.shutdown(socket.SHUT_RDWR)  # gone without a DISCONNECT: the broker sends the will
    _wait_bridge(events, "offline", device)
    assert listed()["status"] == "offline"  # its last heartbeat is seconds old
    client.client.loop_stop()


def test_control_plane_restarts_reload_the_broker_only_when_the_crl_changed(
    mq: RunningControlPlane, tmp_path: Path
) -> None:
    """Every start used to SIGHUP the broker, and a reload is where Mosquitto has crashed
    (seen after repeated control-plane restarts): now only a changed or aging CRL reloads."""
    device, _ = _device(mq, tmp_path, "a")
    mark = len(mq.broker.log)
    for _ in range(3):
        mq.restart()
        wait_bridge(mq)
    mq.admin_stub().RevokeDevice(admin_pb2.RevokeDeviceRequest(id=device), timeout=WAIT)
    mq.broker.wait_for_log("Reloading config", after=mark)  # the revocation reloads it ...
    reloads = [line for line in list(mq.broker.log)[mark:] if "Reloading config" in line]
    assert len(reloads) == 1, reloads  # ... and the three restarts did not
