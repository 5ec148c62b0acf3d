"""`control-plane rotate ca` and `--retire-old` on live agents over gRPC and MQTT: a new fleet
CA cross-signed by the old one, agents that renew into it, nothing re-enrolled, and old-CA
certificates refused once the old CA is retired."""

from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from edgefleet.v1 import agent_pb2, agent_pb2_grpc

from control_plane.api.mqtt_bridge import MqttBridge
from control_plane.cli import main as cp_main
from edge_agent.identity import check_ca_bundle, install_renewed, load_credentials
from edge_agent.state import StateDir
from fleetcore import pki
from tests.mqtt_support import connect, connected
from tests.support import WAIT, RunningControlPlane, start_agent, wait_until_async
from tests.test_rotate_server_cert import served_serial


def _rotate(cp: RunningControlPlane, *args: str) -> int:
    mark = len(cp.broker.log) if cp.broker is not None else 0
    rc = cp_main(["rotate", "ca", "--home", str(cp.home), *args])
    if rc == 0:
        cp.loop.run(cp.cp._reload_keys())  # what KeyWatch does within a second
        if cp.broker is not None:
            cp.broker.wait_for_log("Reloading config", after=mark)
    return rc


def _heartbeat_refused(cp: RunningControlPlane, cert: Path, key: Path, ca: Path) -> bool:
    creds = grpc.ssl_channel_credentials(ca.read_bytes(), key.read_bytes(), cert.read_bytes())
    with grpc.secure_channel(cp.api, creds) as channel:
        try:
            agent_pb2_grpc.AgentServiceStub(channel).Heartbeat(agent_pb2.HeartbeatRequest(),
                                                               timeout=WAIT)
        except grpc.RpcError as exc:
            return exc.code() == grpc.StatusCode.UNAVAILABLE  # the TLS handshake fails
    return False


async def _reconnected(bridge: MqttBridge) -> None:
    await wait_until_async(lambda: not bridge.connected.is_set(),  # it saw the broker go
                           what="the bridge to see the broker go")
    await bridge.connected.wait()


def _issuer(state: StateDir) -> x509.Name:
    return pki.load_certificate(state.cert.read_bytes()).issuer


def test_a_ca_rotation_moves_live_agents_to_the_new_ca_and_retiring_refuses_the_old_one(
    cp_any: RunningControlPlane, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cp = cp_any
    cp.enroll_agent(tmp_path / "a")
    a = StateDir(tmp_path / "a")
    old_ca = pki.load_certificate(a.ca.read_bytes())
    kept = tmp_path / "old-a"  # the old-CA credentials, to try once the old CA is retired
    shutil.copytree(a.root, kept)
    agent = start_agent(a.root, cp.loop, transport=cp.transport)
    try:
        agent.wait_for("heartbeat")
        assert _rotate(cp) == 0
        new_ca = cp.cp.authority.ca_cert
        assert new_ca.subject != old_ca.subject
        # An agent that trusts only the old CA verifies the new server chain (cross cert),
        # on every port; the agent keeps heartbeating.
        ports = [cp.cp.api_port, cp.cp.enroll_port] + (
            [cp.cp.mqtt.port] if cp.cp.mqtt is not None else [])
        for port in ports:
            served_serial("127.0.0.1", port, a.ca.read_bytes(), a)
        for _ in range(2):
            agent.wait_for("heartbeat")

        # A device enrolled now gets a new-CA certificate and the bundle of both CAs.
        cp.enroll_agent(tmp_path / "b")
        b = StateDir(tmp_path / "b")
        assert _issuer(b) == new_ca.subject
        assert len(x509.load_pem_x509_certificates(b.ca.read_bytes())) == 2

        # Retiring now is refused: device a still has its old-CA certificate. Nothing changes.
        capsys.readouterr()
        assert _rotate(cp, "--retire-old") == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error:") and "--force" in err[0], err
        assert agent.agent.config.device_id in err[0]
        assert cp.cp.config.layout.old_ca_key.exists()

        # The agent renews on its normal schedule (made immediate here) into the new CA.
        agent.agent.config.renew_at_fraction = 0.0
        renewed = agent.wait_for("renewed")
        agent.agent.config.renew_at_fraction = 2 / 3
        agent.wait_for("heartbeat")
        assert _issuer(a) == new_ca.subject
        assert len(x509.load_pem_x509_certificates(a.ca.read_bytes())) == 2
        assert cp.device(agent.agent.config.device_id).certificate_serial == renewed["serial"]

        assert _rotate(cp, "--retire-old") == 0
        assert not cp.cp.config.layout.old_ca_key.exists()
        assert cp.cp.authority.old_ca is None
        for _ in range(2):
            agent.wait_for("heartbeat")
        # A new connection with the renewed credentials works on every port.
        for port in ports:
            served_serial("127.0.0.1", port, a.ca.read_bytes(), a)
        if cp.broker is not None:  # the bridge reconnects with its re-issued certificate
            bridge = cp.cp.bridge
            assert bridge is not None
            cp.broker.restart()
            cp.loop.run(asyncio.wait_for(_reconnected(bridge), WAIT))
            agent.wait_for("heartbeat")
    finally:
        agent.stop()

    # The old-CA client certificate is refused now, over gRPC and by the broker.
    old = StateDir(kept)
    assert _heartbeat_refused(cp, old.cert, old.key, a.ca)
    if cp.cp.mqtt is not None:
        _, result = connect(cp.cp.mqtt, old.cert, old.key, ca=a.ca)
        assert not connected(result), result
    actions = [e.action for e in cp.cp.store.list_audit(50)]
    assert "keys.rotate-ca" in actions and "keys.retire-ca" in actions


def test_retiring_without_a_rotation_in_transition_is_one_error_line(
    cp: RunningControlPlane, capsys: pytest.CaptureFixture[str]
) -> None:
    capsys.readouterr()
    assert cp_main(["rotate", "ca", "--retire-old", "--home", str(cp.home)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "rotate ca --home" in err[0]


def test_a_renewal_whose_ca_bundle_did_not_issue_the_certificate_leaves_the_agent_unchanged(
    cp: RunningControlPlane, tmp_path: Path
) -> None:
    """A renewal answer that would make the agent trust a CA unrelated to its certificate (it
    would lock itself out, or trust an attacker's CA) is refused; the state is untouched."""
    import datetime as dt  # noqa: PLC0415

    cfg = cp.enroll_agent(tmp_path / "a")
    state = StateDir(tmp_path / "a")
    before = {p.name: p.read_bytes() for p in state.root.iterdir() if p.is_file()}
    now = dt.datetime.now(dt.UTC)
    _, impostor = pki.create_ca("impostor CA", now, dt.timedelta(days=1))
    key = pki.generate_key()
    cert_pem, _ = cp.cp.authority.issue(key.public_key(), pki.IdentityKind.DEVICE,
                                        cfg.device_id, now.timestamp(), 3600)
    with pytest.raises(ValueError, match="not issued by a CA of the bundle"):
        install_renewed(state, pki.private_key_pem(key), cert_pem, cfg.device_id,
                        now.timestamp(), ca_pem=pki.certificate_pem(impostor))
    assert {p.name: p.read_bytes() for p in state.root.iterdir() if p.is_file()} == before
    with pytest.raises(ValueError, match="not a CA"):
        check_ca_bundle(cert_pem, pki.load_certificate(cert_pem))
    assert load_credentials(state).cert_pem == before[state.cert.name]


def test_an_interrupted_renewal_into_a_new_ca_keeps_key_certificate_and_ca_together(
    cp: RunningControlPlane, tmp_path: Path
) -> None:
    cp.enroll_agent(tmp_path / "a")
    state = StateDir(tmp_path / "a")
    before = load_credentials(state)
    assert _rotate(cp) == 0
    bundle = cp.cp.authority.ca_pem
    key = pki.generate_key()
    cert_pem, _ = cp.cp.authority.issue(key.public_key(), pki.IdentityKind.DEVICE,
                                        pki.identity_from_certificate(pki.load_certificate(before.cert_pem)).name,
                                        time.time(), 3600)
    nxt = {p: p.with_name(p.name + ".next") for p in (state.key, state.ca, state.cert)}

    # Crash before the certificate's .next (the commit point): the old key and CA stay.
    nxt[state.key].write_bytes(pki.private_key_pem(key))
    nxt[state.ca].write_bytes(bundle)
    creds = load_credentials(state)
    assert (creds.serial, creds.ca_pem) == (before.serial, before.ca_pem)
    assert not any(p.exists() for p in nxt.values())

    # Crash after all three were written: key, CA bundle and certificate roll forward together.
    nxt[state.key].write_bytes(pki.private_key_pem(key))
    nxt[state.ca].write_bytes(bundle)
    nxt[state.cert].write_bytes(cert_pem)
    creds = load_credentials(state)
    assert (creds.cert_pem, creds.ca_pem) == (cert_pem, bundle)
    assert pki.load_private_key(creds.key_pem).public_key() == key.public_key()
