"""Enrollment over server TLS with one-time tokens (real sockets, real certificates)."""

from __future__ import annotations

import datetime as dt
import os
import stat
import time
from pathlib import Path

import grpc
import pytest
from edgefleet.v1 import agent_pb2, agent_pb2_grpc

from control_plane.services.identity import hash_token
from edge_agent.enroll import enroll
from edge_agent.state import StateDir
from fleetcore import pki
from fleetcore.errors import AlreadyExistsError, TokenError
from tests.support import WAIT, FakeClock, LoopThread, RunningControlPlane, start_control_plane


def _device_ids(cp: RunningControlPlane) -> list[str]:
    return [d.id for d in cp.cp.store.list_devices()]


def test_enrollment_issues_a_device_identity(cp: RunningControlPlane, tmp_path: Path) -> None:
    state_dir = tmp_path / "agent"
    token = cp.token({"site": "paris", "tier": "canary"})
    cfg = enroll(cp.enroll, token, cp.ca_pem, state_dir, labels={"tier": "stable", "rack": "a"})

    state = StateDir(state_dir)
    cert = pki.load_certificate(state.cert.read_bytes())
    identity = pki.identity_from_certificate(cert)
    assert identity.kind is pki.IdentityKind.DEVICE
    assert identity.name == cfg.device_id
    # The key was generated here and matches the certificate; only a CSR left the host.
    assert cert.public_key() == pki.load_private_key(state.key.read_bytes()).public_key()
    assert state.ca.read_bytes() == cp.ca_pem
    assert state.release_pub.read_bytes() == (cp.home / "keys" / "release.pub").read_bytes()
    publishers = sorted(state.publishers_dir.iterdir())
    assert [p.read_bytes() for p in publishers] == [
        (cp.home / "publisher" / "publisher.pub").read_bytes()
    ]
    assert cfg.api_address == cp.api
    # The token's labels win over the ones the agent asked for.
    assert cfg.labels == {"site": "paris", "tier": "canary", "rack": "a"}
    # Default device certificates live 7 days.
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert abs(lifetime.total_seconds() - (7 * 86400 + 300)) < 5

    device = cp.device(cfg.device_id)
    assert dict(device.labels) == cfg.labels
    assert device.certificate_serial == identity.serial


def test_keys_on_disk_are_private(cp: RunningControlPlane, tmp_path: Path) -> None:
    cfg = cp.enroll_agent(tmp_path / "agent")
    assert cfg.device_id
    private = [
        tmp_path / "agent" / "device.key",
        cp.home / "pki" / "ca.key",
        cp.home / "pki" / "server.key",
        cp.home / "keys" / "release.key",
        cp.home / "publisher" / "publisher.key",
        cp.home / "operators" / "admin" / "operator.key",
    ]
    for path in private:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600, path
    assert stat.S_IMODE(os.stat(cp.home).st_mode) == 0o700


def test_tokens_are_stored_hashed(cp: RunningControlPlane) -> None:
    token = cp.token()
    db = (cp.home / "edgefleet.db").read_bytes()
    assert token.encode() not in db
    rows = cp.cp.store._query(  # type: ignore[attr-defined]
        "SELECT token_hash FROM enrollment_tokens"
    )
    assert [r["token_hash"] for r in rows] == [hash_token(token)]


def test_reused_token_is_refused(cp: RunningControlPlane, tmp_path: Path) -> None:
    token = cp.token()
    enroll(cp.enroll, token, cp.ca_pem, tmp_path / "first")
    with pytest.raises(TokenError, match="already been used"):
        enroll(cp.enroll, token, cp.ca_pem, tmp_path / "second")
    assert not (tmp_path / "second").exists()
    assert len(_device_ids(cp)) == 1


def test_unknown_token_is_refused(cp: RunningControlPlane, tmp_path: Path) -> None:
    with pytest.raises(TokenError, match="unknown"):
        enroll(cp.enroll, "not-a-real-token", cp.ca_pem, tmp_path / "agent")
    assert not (tmp_path / "agent").exists()
    assert _device_ids(cp) == []
    denied = [e for e in cp.cp.store.list_audit(100) if e.action == "devices.enroll"]
    assert [e.outcome for e in denied] == ["denied"]


def test_expired_token_is_refused(tmp_path: Path, loop: LoopThread) -> None:
    clock = FakeClock(time.time())
    cp = start_control_plane(tmp_path / "cp", loop, clock=clock)
    try:
        token = cp.token(ttl=60)
        clock.advance(61)
        with pytest.raises(TokenError, match="expired"):
            enroll(cp.enroll, token, cp.ca_pem, tmp_path / "agent")
        assert _device_ids(cp) == []
    finally:
        cp.stop()


def test_enrolled_state_dir_is_not_overwritten(cp: RunningControlPlane, tmp_path: Path) -> None:
    cfg = cp.enroll_agent(tmp_path / "agent")
    before = (tmp_path / "agent" / "device.key").read_bytes()
    with pytest.raises(AlreadyExistsError):
        cp.enroll_agent(tmp_path / "agent")
    assert (tmp_path / "agent" / "device.key").read_bytes() == before
    assert _device_ids(cp) == [cfg.device_id]


@pytest.mark.parametrize(
    "csr",
    [
        b"",
        b"-----BEGIN CERTIFICATE REQUEST-----\nnot base64\n-----END CERTIFICATE REQUEST-----\n",
        b"A" * (pki.MAX_CSR_BYTES + 1),
        b"\x00\xff" * 100,
    ],
    ids=["empty", "garbage-pem", "oversized", "binary"],
)
def test_hostile_csr_is_refused_and_token_survives(
    cp: RunningControlPlane, tmp_path: Path, csr: bytes
) -> None:
    token = cp.token()
    creds = grpc.ssl_channel_credentials(root_certificates=cp.ca_pem)
    with grpc.secure_channel(cp.enroll, creds) as channel:
        stub = agent_pb2_grpc.AgentServiceStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            stub.Enroll(agent_pb2.EnrollRequest(token=token, csr_pem=csr), timeout=WAIT)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert _device_ids(cp) == []
    # A refused request does not burn the token.
    assert enroll(cp.enroll, token, cp.ca_pem, tmp_path / "agent").device_id


def test_oversized_enroll_message_is_refused(cp: RunningControlPlane) -> None:
    creds = grpc.ssl_channel_credentials(root_certificates=cp.ca_pem)
    with grpc.secure_channel(cp.enroll, creds) as channel:
        stub = agent_pb2_grpc.AgentServiceStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            stub.Enroll(agent_pb2.EnrollRequest(token="x" * (128 * 1024)), timeout=WAIT)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_enrollment_needs_the_right_ca(cp: RunningControlPlane, tmp_path: Path) -> None:
    """An agent given another CA refuses to talk to this server (no token leaves the host)."""
    _, other_ca = pki.create_ca("other", dt.datetime.now(dt.UTC), dt.timedelta(days=1))
    token = cp.token()
    with pytest.raises(Exception, match="UNAVAILABLE"):
        enroll(cp.enroll, token, pki.certificate_pem(other_ca), tmp_path / "agent")
    assert _device_ids(cp) == []
