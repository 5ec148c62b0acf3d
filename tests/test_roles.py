"""Roles are enforced on every AdminService call, and state-changing calls are audited."""

from __future__ import annotations

import itertools
import json
import socket
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from edgefleet.v1 import admin_pb2

from fleet.cli import main as fleet_main
from fleetcore import operator_config, pki
from fleetcore.operator_config import OperatorConfig
from tests.support import WAIT, RunningControlPlane


def _operator(cp: RunningControlPlane, tmp_path: Path, name: str, role: str) -> OperatorConfig:
    out = tmp_path / f"op-{name}"
    rc = fleet_main(["--config", str(cp.home / "operators/admin/fleet.toml"), "--api", cp.api,
                     "operators", "create", name, "--role", role, "--out", str(out)])
    assert rc == 0
    return operator_config.load(out / "fleet.toml")


@dataclass(frozen=True)
class Case:
    role: str
    call: str
    allowed: bool


def _calls(device_id: str) -> dict[str, Callable[[Any], Any]]:
    return {
        "list": lambda s: s.ListDevices(admin_pb2.ListDevicesRequest(), timeout=WAIT),
        "show": lambda s: s.GetDevice(admin_pb2.GetDeviceRequest(id=device_id), timeout=WAIT),
        "audit": lambda s: s.ListAuditEvents(admin_pb2.ListAuditEventsRequest(), timeout=WAIT),
        "token": lambda s: s.CreateEnrollmentToken(
            admin_pb2.CreateEnrollmentTokenRequest(), timeout=WAIT
        ),
        "revoke": lambda s: s.RevokeDevice(
            admin_pb2.RevokeDeviceRequest(id=device_id), timeout=WAIT
        ),
        "operator": lambda s: s.CreateOperator(
            admin_pb2.CreateOperatorRequest(
                name="newbie", role="viewer", csr_pem=pki.make_csr(pki.generate_key())
            ),
            timeout=WAIT,
        ),
    }


CASES = [
    Case(role, call, allowed)
    for role, allowed_calls in {
        "viewer": {"list", "show", "audit"},
        "operator": {"list", "show", "audit"},
        "admin": {"list", "show", "audit", "token", "revoke", "operator"},
    }.items()
    for call, allowed in ((c, c in allowed_calls) for c in
                          ("list", "show", "audit", "token", "revoke", "operator"))
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.role}-{c.call}")
def test_role_table(cp: RunningControlPlane, tmp_path: Path, case: Case) -> None:
    device = cp.enroll_agent(tmp_path / "a")
    op = _operator(cp, tmp_path, f"{case.role}-user", case.role)
    stub = cp.admin_stub(op)
    call = _calls(device.device_id)[case.call]
    if case.allowed:
        call(stub)
    else:
        with pytest.raises(grpc.RpcError) as err:
            call(stub)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert case.role in (err.value.details() or "")


def test_viewer_cannot_revoke(cp: RunningControlPlane, tmp_path: Path) -> None:
    device = cp.enroll_agent(tmp_path / "a")
    viewer = _operator(cp, tmp_path, "vera", "viewer")
    with pytest.raises(grpc.RpcError) as err:
        cp.admin_stub(viewer).RevokeDevice(
            admin_pb2.RevokeDeviceRequest(id=device.device_id), timeout=WAIT
        )
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert cp.device(device.device_id).status != admin_pb2.DEVICE_STATUS_REVOKED
    last = cp.cp.store.list_audit(1)[0]
    assert (last.actor, last.action, last.target, last.outcome) == (
        "operator:vera", "devices.revoke", device.device_id, "denied"
    )


def test_state_changes_are_audited_in_a_hash_chain(cp: RunningControlPlane, tmp_path: Path) -> None:
    device = cp.enroll_agent(tmp_path / "a")
    cp.admin_stub().RevokeDevice(
        admin_pb2.RevokeDeviceRequest(id=device.device_id, reason="lost"), timeout=WAIT
    )
    events = cp.cp.store.list_audit(100)
    actions = [(e.actor.split(":")[0], e.action, e.outcome) for e in events]
    assert actions == [
        ("init", "control-plane.init", "allowed"),
        ("operator", "tokens.create", "allowed"),
        ("token", "devices.enroll", "allowed"),
        ("operator", "devices.revoke", "allowed"),
    ]
    assert json.loads(events[-1].detail) == {"reason": "lost"}
    for prev, cur in itertools.pairwise(events):
        assert cur.prev_hash == prev.hash


def test_audit_log_is_append_only(cp: RunningControlPlane) -> None:
    conn = sqlite3.connect(cp.home / "edgefleet.db")
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        conn.execute("UPDATE audit_events SET outcome = 'allowed'")
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        conn.execute("DELETE FROM audit_events")
    conn.close()


def test_operator_names_are_unique(cp: RunningControlPlane, tmp_path: Path) -> None:
    _operator(cp, tmp_path, "olga", "operator")
    with pytest.raises(grpc.RpcError) as err:
        cp.admin_stub().CreateOperator(
            admin_pb2.CreateOperatorRequest(
                name="olga", role="admin", csr_pem=pki.make_csr(pki.generate_key())
            ),
            timeout=WAIT,
        )
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS


def test_fleet_errors_say_what_to_do_next(cp: RunningControlPlane, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    config = str(cp.home / "operators/admin/fleet.toml")
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed = f"127.0.0.1:{s.getsockname()[1]}"
    capsys.readouterr()
    assert fleet_main(["--config", config, "--api", closed, "devices", "list"]) == 1
    err = capsys.readouterr().err
    assert "cannot reach the control plane" in err and "hint: is `control-plane serve`" in err
    _operator(cp, tmp_path, "val", "viewer")
    viewer = tmp_path / "op-val" / "fleet.toml"
    assert fleet_main(["--config", str(viewer), "--api", cp.api, "rollouts", "start",
                       "--model", "digits", "--version", "1"]) == 1
    assert "hint: your operator role does not allow this" in capsys.readouterr().err
