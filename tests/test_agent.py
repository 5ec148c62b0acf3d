"""The agent daemon against a real control plane: heartbeats, restarts, renewal, revocation."""

from __future__ import annotations

import datetime as dt
import random
from pathlib import Path

import pytest
from edgefleet.v1 import admin_pb2

from edge_agent.backoff import Backoff
from edge_agent.identity import install_renewed, load_credentials
from edge_agent.state import StateDir
from fleetcore import pki
from tests.support import WAIT, RunningControlPlane, start_agent


def test_agent_heartbeats_and_shows_online(cp: RunningControlPlane, tmp_path: Path) -> None:
    cfg = cp.enroll_agent(tmp_path / "a", labels={"site": "lyon"})
    agent = start_agent(tmp_path / "a", cp.loop)
    try:
        agent.wait_for("heartbeat")
        device = cp.device(cfg.device_id)
        assert device.status == admin_pb2.DEVICE_STATUS_ONLINE
        assert device.host.hostname
        assert device.host.cpu_count > 0
        status = StateDir(tmp_path / "a").read_status()
        assert status["state"] == "connected"
        assert status["device_id"] == cfg.device_id
    finally:
        agent.stop()
    assert StateDir(tmp_path / "a").read_status()["state"] == "stopped"


def test_agent_survives_a_control_plane_restart(cp: RunningControlPlane, tmp_path: Path) -> None:
    cfg = cp.enroll_agent(tmp_path / "a")
    agent = start_agent(tmp_path / "a", cp.loop)
    try:
        agent.wait_for("heartbeat")
        cp.stop()
        error = agent.wait_for("error")
        assert error["state"] == "disconnected"
        assert StateDir(tmp_path / "a").read_status()["state"] == "disconnected"
        cp.restart()
        # Drain the failures that happened while it was down, then see it reconnect.
        agent.wait_for("heartbeat")
        assert cp.device(cfg.device_id).status == admin_pb2.DEVICE_STATUS_ONLINE
        assert StateDir(tmp_path / "a").read_status()["consecutive_failures"] == 0
    finally:
        agent.stop()


def test_agent_renews_its_certificate_over_mtls(cp: RunningControlPlane, tmp_path: Path) -> None:
    cfg = cp.enroll_agent(tmp_path / "a")
    state = StateDir(tmp_path / "a")
    old_serial = load_credentials(state).serial
    old_key = state.key.read_bytes()
    agent = start_agent(tmp_path / "a", cp.loop, renew_at_fraction=0.0)
    try:
        renewed = agent.wait_for("renewed")
        agent.wait_for("heartbeat")  # and the new certificate works
    finally:
        agent.stop()
    assert renewed["old_serial"] == old_serial
    assert renewed["serial"] != old_serial
    assert state.key.read_bytes() != old_key  # a new key, generated on the host
    creds = load_credentials(state)
    assert pki.identity_from_certificate(pki.load_certificate(creds.cert_pem)).name == cfg.device_id
    assert cp.device(cfg.device_id).certificate_serial == creds.serial


def test_revoked_agent_is_refused_and_keeps_its_state(
    cp: RunningControlPlane, tmp_path: Path
) -> None:
    cfg = cp.enroll_agent(tmp_path / "a")
    agent = start_agent(tmp_path / "a", cp.loop)
    try:
        agent.wait_for("heartbeat")
        cp.admin_stub().RevokeDevice(
            admin_pb2.RevokeDeviceRequest(id=cfg.device_id), timeout=WAIT
        )
        error = agent.wait_for("error")
        assert error["state"] == "refused"
        assert "revoked" in error["error"]
    finally:
        agent.stop()
    assert cp.device(cfg.device_id).status == admin_pb2.DEVICE_STATUS_REVOKED


def test_offline_when_not_heard_from(cp: RunningControlPlane, tmp_path: Path) -> None:
    cfg = cp.enroll_agent(tmp_path / "a")
    assert cp.device(cfg.device_id).status == admin_pb2.DEVICE_STATUS_OFFLINE


def test_backoff_grows_with_jitter_and_resets() -> None:
    b = Backoff(0.5, 8.0, random.Random(7))
    delays = [b.next_delay() for _ in range(8)]
    for n, d in enumerate(delays):
        ceiling = min(8.0, 0.5 * 2**n)
        assert 0.05 <= d <= ceiling  # full jitter, above a floor of initial / 10
    assert len(set(delays)) == len(delays)  # jittered, not a fixed schedule
    b.reset()
    assert b.next_delay() <= 0.5


def test_interrupted_renewal_leaves_a_matching_key_and_certificate(
    cp: RunningControlPlane, tmp_path: Path
) -> None:
    cfg = cp.enroll_agent(tmp_path / "a")
    state = StateDir(tmp_path / "a")
    before = load_credentials(state)

    # Crash after writing the new key only: the old pair stays.
    (state.root / "device.key.next").write_bytes(pki.private_key_pem(pki.generate_key()))
    creds = load_credentials(state)
    assert creds.serial == before.serial
    assert not (state.root / "device.key.next").exists()

    # Crash after both .next files are written: the new pair is rolled forward.
    new_key = pki.generate_key()
    ca_key = pki.load_private_key((cp.home / "pki" / "ca.key").read_bytes())
    cert = pki.issue_client_certificate(
        ca_key, pki.load_certificate(cp.ca_pem), new_key.public_key(), pki.IdentityKind.DEVICE,
        cfg.device_id, dt.datetime.now(dt.UTC), dt.timedelta(days=1),
    )
    (state.root / "device.key.next").write_bytes(pki.private_key_pem(new_key))
    (state.root / "device.pem.next").write_bytes(pki.certificate_pem(cert))
    creds = load_credentials(state)
    assert creds.serial == pki.serial_hex(cert)
    assert pki.load_private_key(creds.key_pem).public_key() == cert.public_key()


def test_renewed_certificate_for_another_device_is_refused(
    cp: RunningControlPlane, tmp_path: Path
) -> None:
    a = cp.enroll_agent(tmp_path / "a")
    b = cp.enroll_agent(tmp_path / "b")
    state = StateDir(tmp_path / "a")
    before = (state.key.read_bytes(), state.cert.read_bytes())
    key_b = StateDir(tmp_path / "b").key.read_bytes()
    cert_b = StateDir(tmp_path / "b").cert.read_bytes()
    with pytest.raises(ValueError, match=b.device_id):
        install_renewed(state, key_b, cert_b, a.device_id, now=0.0)
    assert (state.key.read_bytes(), state.cert.read_bytes()) == before
