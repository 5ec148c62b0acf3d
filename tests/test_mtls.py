"""Who may call the mTLS API: named after the attack each test refuses."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import grpc
import pytest
from edgefleet.v1 import admin_pb2, admin_pb2_grpc, agent_pb2, agent_pb2_grpc

from edge_agent.state import StateDir
from fleetcore import pki
from tests.support import WAIT, RunningControlPlane


def _agent_stub(target: str, ca: bytes, key: bytes | None = None, cert: bytes | None = None):
    creds = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key,
                                         certificate_chain=cert)
    channel = grpc.secure_channel(target, creds)
    return channel, agent_pb2_grpc.AgentServiceStub(channel)


def _device_stub(cp: RunningControlPlane, state_dir: Path):
    s = StateDir(state_dir)
    return _agent_stub(cp.api, s.ca.read_bytes(), s.key.read_bytes(), s.cert.read_bytes())


def _heartbeat(stub, version: str = "test") -> agent_pb2.HeartbeatResponse:
    return stub.Heartbeat(agent_pb2.HeartbeatRequest(agent_version=version), timeout=WAIT)


def test_device_heartbeat_over_mtls(cp: RunningControlPlane, tmp_path: Path) -> None:
    cfg = cp.enroll_agent(tmp_path / "a")
    channel, stub = _device_stub(cp, tmp_path / "a")
    with channel:
        reply = _heartbeat(stub, "1.2.3")
    assert reply.heartbeat_interval_seconds == 1
    device = cp.device(cfg.device_id)
    assert device.status == admin_pb2.DEVICE_STATUS_ONLINE
    assert device.agent_version == "1.2.3"


def test_call_without_client_certificate_is_refused(cp: RunningControlPlane) -> None:
    channel, stub = _agent_stub(cp.api, cp.ca_pem)
    with channel, pytest.raises(grpc.RpcError) as err:
        _heartbeat(stub)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE  # the TLS handshake fails


def test_enroll_port_does_not_serve_device_calls(cp: RunningControlPlane, tmp_path: Path) -> None:
    cp.enroll_agent(tmp_path / "a")
    channel, stub = _agent_stub(cp.enroll, cp.ca_pem)
    with channel, pytest.raises(grpc.RpcError) as err:
        _heartbeat(stub)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_certificate_from_another_ca_is_refused(cp: RunningControlPlane) -> None:
    now = dt.datetime.now(dt.UTC)
    other_key, other_ca = pki.create_ca("impostor CA", now, dt.timedelta(days=1))
    key = pki.generate_key()
    # Same identity format, same device-id shape: only the issuer differs.
    cert = pki.issue_client_certificate(
        other_key, other_ca, key.public_key(), pki.IdentityKind.OPERATOR, "admin", now,
        dt.timedelta(days=1), role=pki.Role.ADMIN,
    )
    creds = grpc.ssl_channel_credentials(
        root_certificates=cp.ca_pem,
        private_key=pki.private_key_pem(key),
        certificate_chain=pki.certificate_pem(cert),
    )
    with grpc.secure_channel(cp.api, creds) as channel:
        stub = admin_pb2_grpc.AdminServiceStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            stub.ListDevices(admin_pb2.ListDevicesRequest(), timeout=WAIT)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_certificate_from_our_ca_but_never_recorded_is_refused(cp: RunningControlPlane) -> None:
    """A certificate signed with a leaked CA key but unknown to the registry gets nowhere."""
    ca_key = pki.load_private_key((cp.home / "pki" / "ca.key").read_bytes())
    ca_cert = pki.load_certificate(cp.ca_pem)
    key = pki.generate_key()
    cert = pki.issue_client_certificate(
        ca_key, ca_cert, key.public_key(), pki.IdentityKind.OPERATOR, "admin",
        dt.datetime.now(dt.UTC), dt.timedelta(days=1), role=pki.Role.ADMIN,
    )
    creds = grpc.ssl_channel_credentials(
        root_certificates=cp.ca_pem, private_key=pki.private_key_pem(key),
        certificate_chain=pki.certificate_pem(cert),
    )
    with grpc.secure_channel(cp.api, creds) as channel, pytest.raises(grpc.RpcError) as err:
        admin_pb2_grpc.AdminServiceStub(channel).RevokeDevice(
            admin_pb2.RevokeDeviceRequest(id="dev-x"), timeout=WAIT
        )
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_revoked_certificate_is_refused_on_the_live_connection(
    cp: RunningControlPlane, tmp_path: Path
) -> None:
    cfg = cp.enroll_agent(tmp_path / "a")
    channel, stub = _device_stub(cp, tmp_path / "a")
    with channel:
        _heartbeat(stub)  # the connection is up and trusted
        cp.admin_stub().RevokeDevice(
            admin_pb2.RevokeDeviceRequest(id=cfg.device_id, reason="stolen"), timeout=WAIT
        )
        with pytest.raises(grpc.RpcError) as err:
            _heartbeat(stub)  # same channel, next call
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "revoked" in (err.value.details() or "")
        with pytest.raises(grpc.RpcError) as err:
            stub.RenewCertificate(
                agent_pb2.RenewCertificateRequest(csr_pem=pki.make_csr(pki.generate_key())),
                timeout=WAIT,
            )
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    # A fresh connection is refused too.
    channel, stub = _device_stub(cp, tmp_path / "a")
    with channel, pytest.raises(grpc.RpcError):
        _heartbeat(stub)
    assert cp.device(cfg.device_id).status == admin_pb2.DEVICE_STATUS_REVOKED


def test_device_cannot_act_as_another(cp: RunningControlPlane, tmp_path: Path) -> None:
    a = cp.enroll_agent(tmp_path / "a")
    b = cp.enroll_agent(tmp_path / "b")
    channel, stub = _device_stub(cp, tmp_path / "a")
    with channel:
        # Whatever the message says, the identity is the peer certificate's.
        request = agent_pb2.HeartbeatRequest(agent_version="from-a")
        request.host.hostname = b.device_id
        stub.Heartbeat(request, timeout=WAIT)
    assert cp.device(a.device_id).agent_version == "from-a"
    assert cp.device(b.device_id).last_seen == 0
    assert cp.device(b.device_id).agent_version != "from-a"


def test_device_certificate_cannot_call_the_admin_api(
    cp: RunningControlPlane, tmp_path: Path
) -> None:
    a = cp.enroll_agent(tmp_path / "a")
    b = cp.enroll_agent(tmp_path / "b")
    s = StateDir(tmp_path / "a")
    creds = grpc.ssl_channel_credentials(
        root_certificates=s.ca.read_bytes(), private_key=s.key.read_bytes(),
        certificate_chain=s.cert.read_bytes(),
    )
    with grpc.secure_channel(cp.api, creds) as channel, pytest.raises(grpc.RpcError) as err:
        admin_pb2_grpc.AdminServiceStub(channel).RevokeDevice(
            admin_pb2.RevokeDeviceRequest(id=b.device_id), timeout=WAIT
        )
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert cp.device(b.device_id).status != admin_pb2.DEVICE_STATUS_REVOKED
    assert cp.device(a.device_id).status != admin_pb2.DEVICE_STATUS_REVOKED


def test_operator_certificate_cannot_heartbeat_as_a_device(cp: RunningControlPlane) -> None:
    channel, stub = _agent_stub(
        cp.api, cp.ca_pem, cp.admin.key.read_bytes(), cp.admin.cert.read_bytes()
    )
    with channel, pytest.raises(grpc.RpcError) as err:
        _heartbeat(stub)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_renewal_issues_a_new_certificate_for_the_same_device(
    cp: RunningControlPlane, tmp_path: Path
) -> None:
    cfg = cp.enroll_agent(tmp_path / "a")
    new_key = pki.generate_key()
    channel, stub = _device_stub(cp, tmp_path / "a")
    with channel:
        reply = stub.RenewCertificate(
            agent_pb2.RenewCertificateRequest(csr_pem=pki.make_csr(new_key, "evil-name")),
            timeout=WAIT,
        )
    cert = pki.load_certificate(reply.certificate_pem)
    identity = pki.identity_from_certificate(cert)
    assert identity.name == cfg.device_id  # the CSR subject is ignored
    assert cert.public_key() == new_key.public_key()
    assert cp.device(cfg.device_id).certificate_serial == identity.serial
