"""A hostile enrolled device: a valid device certificate and made-up reports. Each attack runs
against a real control plane over mTLS gRPC; the fleet's decisions do not move, the refusal is
counted for that device and shown to operators, and the operator views keep working."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
from edgefleet.v1 import agent_pb2, agent_pb2_grpc, common_pb2

from control_plane.domain.enrollment import RateLimits
from edge_agent.reporting.telemetry import encode
from fleet.cli import main as fleet_main
from fleetcore import pki
from fleetcore.cli import terminal_safe
from tests.support import WAIT, RunningControlPlane, assign_digits_v1, device_credentials
from tests.test_delivery import _bundle_for


def _send(cp: RunningControlPlane, state_dir: Path, kind: str, *payloads: dict[str, Any],
          seq: int = 1) -> None:
    now = time.time()
    records = [agent_pb2.TelemetryRecord(seq=seq + i, kind=kind, created_at=now,
                                         payload=encode(p)) for i, p in enumerate(payloads)]
    with grpc.secure_channel(cp.api, device_credentials(state_dir)) as channel:
        reply = agent_pb2_grpc.AgentServiceStub(channel).SendTelemetry(
            agent_pb2.TelemetryBatch(records=records), timeout=WAIT)
    assert list(reply.acked) == [r.seq for r in records]  # acknowledged: resending won't help


def _fleet(cp: RunningControlPlane, capsys: pytest.CaptureFixture[str], *args: str) -> Any:
    capsys.readouterr()
    rc = fleet_main(["--config", str(cp.home / "operators/admin/fleet.toml"), "--api", cp.api,
                     *args, "--json"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    return json.loads(out.out)


def _arm(version: int, requests: int, labelled: int, correct: int) -> dict[str, Any]:
    return {"model": "digits", "version": version, "requests": requests, "errors": 0,
            "p50_ms": 0.1, "p95_ms": 0.2, "labelled": labelled, "correct": correct}


def _experiment(cp: RunningControlPlane, tmp_path: Path, trained_bundle: Path,
                capsys: pytest.CaptureFixture[str], devices: list[str]) -> None:
    for name in devices:
        cp.enroll_agent(tmp_path / name)
    assign_digits_v1(cp, trained_bundle, tmp_path)
    bundle = _bundle_for(cp, trained_bundle, tmp_path / "digits-v2", version=2)
    assert fleet_main(["--config", str(cp.home / "operators/admin/fleet.toml"), "--api",
                       cp.api, "models", "publish", str(bundle)]) == 0
    _fleet(cp, capsys, "experiments", "start", "--model", "digits", "--challenger", "2",
           "--weight", "0.5")


def test_one_hostile_device_among_honest_ones_does_not_decide_an_experiment(
    cp: RunningControlPlane, tmp_path: Path, trained_bundle: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The field attack: the challenger is honestly far worse (14% against 97%); one device
    claims a billion perfect answers for it and none for the champion."""
    _experiment(cp, tmp_path, trained_bundle, capsys, ["h1", "h2", "h3", "evil"])
    for name in ("h1", "h2", "h3"):
        _send(cp, tmp_path / name, "arm_stats", _arm(1, 400, 300, 291), _arm(2, 400, 300, 42))
    _send(cp, tmp_path / "evil", "arm_stats", _arm(1, 10**9, 10**9, 0),
          _arm(2, 10**9, 10**9, 10**9))
    status = _fleet(cp, capsys, "experiments", "status", "--model", "digits")
    assert status["decision"] == "stop" and status["state"] == "stopped", status
    arms = {a["version"]: a for a in status["arms"]}
    assert arms[2]["accuracy"] < 0.4 and arms[1]["accuracy"] > 0.7  # weighed as one device
    assert all(a.version == 1 for d in ("h1", "h2", "h3", "evil")
               for a in cp.cp.store.device_arms(_device_id(cp, tmp_path / d)))


def test_arm_stats_for_a_version_the_device_does_not_run_are_refused_and_counted(
    cp: RunningControlPlane, tmp_path: Path, trained_bundle: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    cp.enroll_agent(tmp_path / "evil")
    assign_digits_v1(cp, trained_bundle, tmp_path)  # the device runs digits v1 only
    _send(cp, tmp_path / "evil", "arm_stats", _arm(7, 100, 100, 100),
          {**_arm(1, 100, 100, 100), "model": "other"})
    assert cp.cp.store.arm_stats("digits") == [] and cp.cp.store.arm_stats("other") == []
    device = _fleet(cp, capsys, "devices", "show", _device_id(cp, tmp_path / "evil"))
    assert device["refused_reports"] == {"arm_stats/not-in-release": 2}


def test_impossible_counts_are_refused_and_the_experiment_view_keeps_working(
    cp: RunningControlPlane, tmp_path: Path, trained_bundle: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """correct > labelled once made the experiment view fail with "math domain error"."""
    _experiment(cp, tmp_path, trained_bundle, capsys, ["evil"])
    _send(cp, tmp_path / "evil", "arm_stats", _arm(1, 10, 10, 50), _arm(2, 5, 10, 10),
          {**_arm(2, 10, 10, 10), "p50_ms": 5.0, "p95_ms": 1.0},
          {**_arm(2, 10, 10, 10), "errors": 11})
    assert cp.cp.store.arm_stats("digits") == []
    status = _fleet(cp, capsys, "experiments", "status", "--model", "digits")
    assert status["state"] == "running" and status["decision"] == "wait"
    device = _fleet(cp, capsys, "devices", "show", _device_id(cp, tmp_path / "evil"))
    assert device["refused_reports"] == {"arm_stats/malformed": 4}


def test_drift_windows_outside_the_release_or_far_in_time_are_refused(
    cp: RunningControlPlane, tmp_path: Path, trained_bundle: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Far-future windows once crashed `fleet drift` for every operator and kept a drift
    policy firing; windows for a model the device does not run steered retraining."""
    cp.enroll_agent(tmp_path / "evil")
    assign_digits_v1(cp, trained_bundle, tmp_path)
    now = time.time()

    def window(start: float, end: float, **extra: Any) -> dict[str, Any]:
        return {"model": "digits", "version": 1, "start": start, "end": end, "rows": 200,
                "score": 9.9, "drifted": True, "prediction_psi": 1.0,
                "drifted_features": ["pixel_1"], **extra}

    _send(cp, tmp_path / "evil", "drift", window(now + 10**9, now + 10**9 + 60),
          window(now - 400 * 86400, now - 400 * 86400 + 60), window(now - 10, now - 20),
          window(now - 60, now, model="elsewhere"), window(now - 60, now, version=9))
    assert cp.cp.store.latest_drift(None) == []
    assert _fleet(cp, capsys, "drift", "--model", "digits")["devices"] == []
    device = _fleet(cp, capsys, "devices", "show", _device_id(cp, tmp_path / "evil"))
    assert device["refused_reports"] == {"drift/not-in-release": 2,
                                         "drift/time-out-of-range": 3}
    _send(cp, tmp_path / "evil", "drift", window(now - 60, now), seq=10)  # a fair one counts
    assert [w.model for w in cp.cp.store.latest_drift(None)] == ["digits"]


def _device_id(cp: RunningControlPlane, state_dir: Path) -> str:
    from edge_agent.state import AgentConfig, StateDir  # noqa: PLC0415

    return AgentConfig.load(StateDir(state_dir)).device_id


def test_terminal_escapes_in_a_hostname_do_not_reach_the_operator_s_terminal(
    cp: RunningControlPlane, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    cp.enroll_agent(tmp_path / "evil")
    hostile = "shop\x1b[2J\x1b]0;owned\x07\u202etxt.exe"  # clear screen, set title, reorder
    request = agent_pb2.HeartbeatRequest(agent_version="1\x1b[31m",
                                         host=common_pb2.HostFacts(hostname=hostile))
    with grpc.secure_channel(cp.api, device_credentials(tmp_path / "evil")) as channel:
        agent_pb2_grpc.AgentServiceStub(channel).Heartbeat(request, timeout=WAIT)
    device_id = _device_id(cp, tmp_path / "evil")
    for args in (["devices", "list"], ["devices", "show", device_id]):
        capsys.readouterr()
        assert fleet_main(["--config", str(cp.home / "operators/admin/fleet.toml"), "--api",
                           cp.api, *args]) == 0
        out = capsys.readouterr().out
        assert not any(ch in out for ch in "\x1b\x07\u202e"), out
    assert "shop\\x1b[2J\\x1b]0;owned\\x07\\u202etxt.exe" in out  # shown, escaped


def test_terminal_safe_escapes_control_and_format_characters_only() -> None:
    assert terminal_safe("plain é 漢 📦 a-b") == "plain é 漢 📦 a-b"
    assert terminal_safe("a\x1b[0mb\tc\r\n") == "a\\x1b[0mb\\tc\\r\\n"
    assert terminal_safe("x\u200by\u2028z\x7f") == "x\\u200by\\u2028z\\x7f"


# ---------------------------------------------------------------- enrollment, without a token


def _enroll_raw(cp: RunningControlPlane, token: str, **labels: str) -> grpc.StatusCode:
    creds = grpc.ssl_channel_credentials(root_certificates=cp.ca_pem)
    with grpc.secure_channel(cp.enroll, creds) as channel:
        try:
            agent_pb2_grpc.AgentServiceStub(channel).Enroll(
                agent_pb2.EnrollRequest(token=token, csr_pem=_csr(), labels=labels),
                timeout=WAIT)
        except grpc.RpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


def _csr() -> bytes:
    return pki.make_csr(pki.generate_key())


def test_bad_tokens_are_rate_limited_signed_for_never_and_audited_in_aggregate(
    cp: RunningControlPlane, monkeypatch: pytest.MonkeyPatch
) -> None:
    signed: list[str] = []
    issue = pki.issue_client_certificate

    def counting(*args: Any, **kwargs: Any) -> Any:  # counts the CA's signatures
        signed.append(args[4])
        return issue(*args, **kwargs)

    monkeypatch.setattr(pki, "issue_client_certificate", counting)
    audit_before = len(cp.cp.store.list_audit(10_000))
    codes = [_enroll_raw(cp, f"eft_guess{i}") for i in range(40)]
    assert codes[:10] == [grpc.StatusCode.PERMISSION_DENIED] * 10  # the peer's burst
    assert set(codes[10:]) == {grpc.StatusCode.RESOURCE_EXHAUSTED}  # then 1 per second
    assert signed == []  # the CA never signed for a caller without a valid token
    rows = cp.cp.store.list_audit(10_000)[audit_before:]
    assert [(r.action, r.outcome) for r in rows] == [("devices.enroll", "denied")]
    assert json.loads(rows[0].detail)["attempts"] == 1  # the next row will carry the rest
    cp.cp.services.identity.limits = RateLimits()  # a minute later, as far as limits go
    assert _enroll_raw(cp, cp.token()) == grpc.StatusCode.OK
    assert len(signed) == 1  # the spy sees the signature of a real enrollment


def test_a_device_cannot_claim_a_region_its_token_did_not_grant(
    cp: RunningControlPlane, tmp_path: Path
) -> None:
    token = cp.token({"site": "shop"})
    assert _enroll_raw(cp, token, region="eu-west") == grpc.StatusCode.INVALID_ARGUMENT
    assert cp.cp.store.list_devices() == []
    # The token survived the refusal; the token's labels win over the device's own.
    assert _enroll_raw(cp, token, site="elsewhere", rack="3") == grpc.StatusCode.OK
    (device,) = cp.cp.store.list_devices()
    assert device.labels == {"site": "shop", "rack": "3"}
