"""`fleet operators list|revoke`: a revoked operator's certificate is refused from its next call,
also on a connection opened before the revocation (real mTLS, a real control plane)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
from edgefleet.v1 import admin_pb2, admin_pb2_grpc

from fleet.channel import open_channel
from fleet.cli import main as fleet_main
from fleetcore import operator_config
from fleetcore.operator_config import OperatorConfig
from tests.support import WAIT, RunningControlPlane, fleet_json, rpc_code


def _fleet(cp: RunningControlPlane, *args: str, config: Path | None = None) -> int:
    return fleet_main(["--config", str(config or cp.home / "operators/admin/fleet.toml"),
                       "--api", cp.api, *args])


def _operator(cp: RunningControlPlane, tmp_path: Path, name: str, role: str) -> OperatorConfig:
    out = tmp_path / f"op-{name}"
    assert _fleet(cp, "operators", "create", name, "--role", role, "--out", str(out)) == 0
    return operator_config.load(out / "fleet.toml")


def _audit(cp: RunningControlPlane, action: str) -> list[admin_pb2.AuditEvent]:
    events = cp.admin_stub().ListAuditEvents(admin_pb2.ListAuditEventsRequest(limit=1000),
                                             timeout=WAIT).events
    return [e for e in events if e.action == action]


def test_a_revoked_operator_is_refused_from_its_next_call_even_on_an_open_connection(
    cp: RunningControlPlane, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    mallory = _operator(cp, tmp_path, "mallory", "operator")
    with open_channel(replace(mallory, api=cp.api)) as channel:
        stub = admin_pb2_grpc.AdminServiceStub(channel)
        stub.ListDevices(admin_pb2.ListDevicesRequest(), timeout=WAIT)  # works; stays open
        listed = fleet_json(cp, capsys, "operators", "list")
        entry = next(o for o in listed if o["name"] == "mallory")
        assert (entry["role"], entry["revoked_at"], len(entry["certificate_serials"])) == (
            "operator", None, 1)

        # Runbook "Revoke an operator" (docs/operator-guide.md), step by step.
        assert _fleet(cp, "operators", "revoke", "mallory", "--reason", "laptop stolen") == 0
        assert "revoked" in capsys.readouterr().out

        with pytest.raises(grpc.RpcError) as refused:  # the same connection, its next call
            stub.ListDevices(admin_pb2.ListDevicesRequest(), timeout=WAIT)
        assert rpc_code(refused.value) == grpc.StatusCode.UNAUTHENTICATED
        assert "revoked" in (refused.value.details() or "")
    # A new connection, through the CLI: one error line and a hint.
    capsys.readouterr()
    assert _fleet(cp, "devices", "list", config=tmp_path / "op-mallory/fleet.toml") == 1
    err = capsys.readouterr().err
    assert err.startswith("error: UNAUTHENTICATED") and "hint:" in err
    assert "Traceback" not in err

    listed = fleet_json(cp, capsys, "operators", "list")
    entry = next(o for o in listed if o["name"] == "mallory")
    assert entry["revoked_at"] is not None
    events = _audit(cp, "operators.revoke")
    assert [(e.actor, e.target, e.outcome) for e in events] == [
        ("operator:admin", "operator:mallory", "allowed")]
    assert json.loads(events[0].detail)["reason"] == "laptop stolen"
    # The other operators keep working.
    assert _fleet(cp, "devices", "list") == 0


def test_only_an_admin_lists_or_revokes_operators_and_a_denial_is_audited(
    cp: RunningControlPlane, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    ops = _operator(cp, tmp_path, "ops", "operator")
    _operator(cp, tmp_path, "victim", "viewer")
    stub = cp.admin_stub(ops)
    for call in (lambda: stub.ListOperators(admin_pb2.ListOperatorsRequest(), timeout=WAIT),
                 lambda: stub.RevokeOperator(admin_pb2.RevokeOperatorRequest(name="victim"),
                                             timeout=WAIT)):
        with pytest.raises(grpc.RpcError) as denied:
            call()
        assert rpc_code(denied.value) == grpc.StatusCode.PERMISSION_DENIED
    assert [(e.actor, e.outcome) for e in _audit(cp, "operators.revoke")] == [
        ("operator:ops", "denied")]
    victim = next(o for o in fleet_json(cp, capsys, "operators", "list") if o["name"] == "victim")
    assert victim["revoked_at"] is None  # unchanged
    # Unknown names and the caller itself are refused with one error line.
    capsys.readouterr()
    assert _fleet(cp, "operators", "revoke", "nobody") == 1
    assert capsys.readouterr().err.startswith("error: NOT_FOUND")
    assert _fleet(cp, "operators", "revoke", "admin") == 1
    assert "cannot revoke itself" in capsys.readouterr().err
