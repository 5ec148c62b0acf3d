"""A hostile enrolled device: a valid device certificate and made-up reports. Each attack runs
against a real control plane over mTLS gRPC; the fleet's decisions do not move, the refusal is
counted for that device and shown to operators, and the operator views keep working."""

from __future__ import annotations

import json
import shutil
import signal
import sqlite3
import struct
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest
from edgefleet.v1 import admin_pb2, admin_pb2_grpc, agent_pb2, agent_pb2_grpc, common_pb2

from control_plane.config import ControlPlaneConfig
from control_plane.domain.enrollment import RateLimits
from control_plane.domain.quota import QuotaLimits, Quotas
from control_plane.domain.records import JobState, SampleRecord, TelemetryRecord
from control_plane.domain.retraining import DriftPolicy
from control_plane.services.identity import hash_token
from edge_agent.enroll import enroll
from edge_agent.reporting.outbox import Outbox
from edge_agent.reporting.telemetry import encode
from edge_agent.state import StateDir
from fleet.channel import open_channel
from fleet.cli import main as fleet_main
from fleetcore import operator_config, pki
from fleetcore.cli import terminal_safe
from tests.store_support import raw_telemetry
from tests.support import (
    WAIT,
    FakeClock,
    LoopThread,
    RunningControlPlane,
    assign_digits_v1,
    device_credentials,
    fleet_json,
    start_agent,
    start_control_plane,
)
from tests.test_cli import Proc
from tests.test_cli import run as cli_run
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


_fleet = fleet_json


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
    # The default limits, but refilling too slowly to matter during the test.
    cp.cp.services.identity.limits = RateLimits(per_peer_rate=1e-6, global_rate=1e-6)
    audit_before = len(cp.cp.store.list_audit(10_000))
    codes = [_enroll_raw(cp, f"eft_guess{i}") for i in range(40)]
    assert codes[:10] == [grpc.StatusCode.PERMISSION_DENIED] * 10  # the peer's burst
    assert set(codes[10:]) == {grpc.StatusCode.RESOURCE_EXHAUSTED}  # then (default) 1 a second
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


# ---------------------------------------------------------------- issue 13: what a device costs


def _raw_send(cp: RunningControlPlane, state_dir: Path,
              records: list[agent_pb2.TelemetryRecord]) -> tuple[grpc.StatusCode, list[int]]:
    with grpc.secure_channel(cp.api, device_credentials(state_dir)) as channel:
        try:
            reply = agent_pb2_grpc.AgentServiceStub(channel).SendTelemetry(
                agent_pb2.TelemetryBatch(records=records), timeout=WAIT)
        except grpc.RpcError as exc:
            return exc.code(), []
    return grpc.StatusCode.OK, list(reply.acked)


def _window(**extra: Any) -> dict[str, Any]:
    now = time.time()
    return {"model": "digits", "version": 1, "start": now - 60, "end": now, "rows": 200,
            "score": 0.01, "drifted": False, "prediction_psi": 0.0, "drifted_features": [],
            **extra}


def test_seqs_and_numbers_beyond_the_store_are_refused_and_the_batch_goes_on(
    cp: RunningControlPlane, tmp_path: Path, trained_bundle: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A seq of 2^63 once failed the whole batch with an internal error (SQLite INTEGER)."""
    cp.enroll_agent(tmp_path / "evil")
    assign_digits_v1(cp, trained_bundle, tmp_path)
    now = time.time()
    records = [
        agent_pb2.TelemetryRecord(seq=2**63, kind="drift", created_at=now,
                                  payload=encode(_window())),
        agent_pb2.TelemetryRecord(seq=2**64 - 1, kind="error", created_at=now, payload=b"{}"),
        agent_pb2.TelemetryRecord(seq=5, kind="drift", created_at=float("nan"),
                                  payload=encode(_window())),
        agent_pb2.TelemetryRecord(seq=6, kind="drift", created_at=now,
                                  payload=encode(_window(rows=2**63))),
        agent_pb2.TelemetryRecord(seq=7, kind="made-up", created_at=now, payload=b"x" * 1000),
        agent_pb2.TelemetryRecord(seq=8, kind="drift", created_at=now, payload=encode(_window())),
    ]
    with grpc.secure_channel(cp.api, device_credentials(tmp_path / "evil")) as channel:
        reply = agent_pb2_grpc.AgentServiceStub(channel).SendTelemetry(
            agent_pb2.TelemetryBatch(records=records, dropped=2**64 - 1, depth=2**64 - 1),
            timeout=WAIT)
    assert list(reply.acked) == [r.seq for r in records]  # all answered: none will be resent
    assert [w.model for w in cp.cp.store.latest_drift("digits")] == ["digits"]  # seq 8 landed
    device = _fleet(cp, capsys, "devices", "show", _device_id(cp, tmp_path / "evil"))
    assert device["refused_reports"] == {"drift/out-of-range": 2, "error/out-of-range": 1,
                                         "drift/malformed": 1, "?/unknown-kind": 1}
    assert cp.cp.store.telemetry_counts()["telemetry"] == 2  # seq 6 (kept raw) and seq 8


def test_columns_that_do_not_fit_each_other_are_refused_whole_and_store_nothing(
    cp: RunningControlPlane, tmp_path: Path,
) -> None:
    """The columnar form agents send: a batch whose columns disagree (here its payload sizes
    claim more bytes than it carries) is refused as a whole, before anything is stored; the
    same batch made whole is stored, its unknown kind refused and counted."""
    cp.enroll_agent(tmp_path / "evil")
    n = 3
    columns = agent_pb2.TelemetryColumns(
        seqs=struct.pack(f"<{n}Q", 1, 2, 3), created_at=struct.pack(f"<{n}d", *[time.time()] * n),
        kinds=["error", "made-up"], kind_index=bytes([0, 1, 0]),
        payload_sizes=struct.pack(f"<{n}I", 2, 2, 2**31), payloads=b"{}{}{}")
    with grpc.secure_channel(cp.api, device_credentials(tmp_path / "evil")) as channel:
        stub = agent_pb2_grpc.AgentServiceStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            stub.SendTelemetry(agent_pb2.TelemetryBatch(columns=columns), timeout=WAIT)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "do not add up" in (refused.value.details() or "")
        assert cp.cp.store.telemetry_counts()["telemetry"] == 0
        columns.payload_sizes = struct.pack(f"<{n}I", 2, 2, 2)
        reply = stub.SendTelemetry(agent_pb2.TelemetryBatch(columns=columns), timeout=WAIT)
    assert list(reply.acked) == [1, 2, 3]
    device = _device_id(cp, tmp_path / "evil")
    assert [r.seq for r in cp.cp.store.telemetry_records(device)] == [1, 3]
    assert cp.cp.store.report_refusals(device) == {"?/unknown-kind": 1}


def test_a_flood_from_one_device_stays_within_its_quota_and_honest_reports_land(
    tmp_path: Path, loop: LoopThread, trained_bundle: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """150 MB offered by one device certificate: the database grows by its burst at most
    (the control plane's clock stands still here, so nothing refills), the flooder is told
    to retry later, is counted and audited once, and honest devices' reports still land."""
    clock = FakeClock(time.time())
    cp = start_control_plane(tmp_path / "cp", loop, clock=clock)
    try:
        for name in ("evil", "h1", "h2"):
            cp.enroll_agent(tmp_path / name)
        assign_digits_v1(cp, trained_bundle, tmp_path)
        burst = cp.cp.services.telemetry.quotas.limits.burst_bytes
        db = cp.cp.config.database
        before = _db_bytes(db)
        payload = encode({"where": "x", "error": "A" * 250_000})
        codes, offered, acked = [], 0, 0
        for batch in range(20):  # 20 x 30 x 250 kB = 150 MB
            records = [agent_pb2.TelemetryRecord(seq=1 + batch * 30 + i, kind="error",
                                                 created_at=clock.now, payload=payload)
                       for i in range(30)]
            offered += 30 * len(payload)
            code, got = _raw_send(cp, tmp_path / "evil", records)
            codes.append(code)
            acked += len(got)
        assert offered >= 150_000_000
        assert codes[0] == grpc.StatusCode.OK and 0 < acked < 30  # the burst, then no more
        assert set(codes[1:]) == {grpc.StatusCode.RESOURCE_EXHAUSTED}
        assert _db_bytes(db) - before < 2 * burst + 1024 * 1024
        assert cp.cp.store.telemetry_counts()["telemetry"] == acked
        for name in ("h1", "h2"):  # each device has its own quota
            _send(cp, tmp_path / name, "drift", _window())
        assert len(cp.cp.store.latest_drift("digits")) == 2
        evil = _device_id(cp, tmp_path / "evil")
        refused = _fleet(cp, capsys, "devices", "show", evil)["refused_reports"]
        assert refused == {"error/over-quota": 30 - acked}  # the first refusal shows at once
        rows = [r for r in cp.cp.store.list_audit(1000) if r.action == "telemetry.quota"]
        assert len(rows) == 1 and rows[0].outcome == "denied"  # then one row a minute
        clock.advance(61)
        _, got = _raw_send(cp, tmp_path / "evil", [
            agent_pb2.TelemetryRecord(seq=1000 + i, kind="error", created_at=clock.now,
                                      payload=payload) for i in range(30)])
        acked += len(got)
        refused = _fleet(cp, capsys, "devices", "show", evil)["refused_reports"]
        assert refused == {"error/over-quota": 630 - acked}
        rows = [r for r in cp.cp.store.list_audit(1000) if r.action == "telemetry.quota"]
        counts = [json.loads(r.detail)["records"] for r in rows]
        assert len(counts) == 2 and sum(counts) == 630 - acked  # the second carries the rest

        # Eight days later the raw rows are rolled up and gone; the counts stay.
        clock.advance(8 * 86400)
        assert cp.cp.services.telemetry.expire() >= acked
        assert cp.cp.store.telemetry_counts()["telemetry"] == 0
        assert cp.cp.store.telemetry_rollup(evil) == {"error": (acked, acked * len(payload))}
        size = _db_bytes(db)
        for batch in range(20, 40):  # the same flood again: freed pages are reused
            records = [agent_pb2.TelemetryRecord(seq=1 + batch * 30 + i, kind="error",
                                                 created_at=clock.now, payload=payload)
                       for i in range(30)]
            _raw_send(cp, tmp_path / "evil", records)
        assert _db_bytes(db) - size < burst + 1024 * 1024
    finally:
        cp.stop()


def _db_bytes(db: Path) -> int:
    return sum(p.stat().st_size for p in (db, db.with_name(db.name + "-wal")) if p.exists())


def test_an_agent_over_its_quota_keeps_its_outbox_and_delivers_later(
    tmp_path: Path, loop: LoopThread,
) -> None:
    """RESOURCE_EXHAUSTED is "retry later" to the agent: nothing is dropped."""
    clock = FakeClock(time.time())
    cp = start_control_plane(tmp_path / "cp", loop, clock=clock)
    try:
        cp.cp.services.telemetry.quotas = Quotas(QuotaLimits(burst_records=5))
        cp.enroll_agent(tmp_path / "a")
        with Outbox(StateDir(tmp_path / "a").outbox) as outbox:
            for i in range(20):
                outbox.append("error", encode({"where": "test", "error": f"e{i}"}), clock.now)
        agent = start_agent(tmp_path / "a", loop)
        try:
            event = agent.wait_for("error")
            assert "RESOURCE_EXHAUSTED" in event["error"] and event["retry_in"] > 0
            assert agent.agent.outbox.stats().depth == 15  # the burst went; the rest waits
            clock.advance(3600)  # the bucket refills (at most its burst)
            cp.cp.services.telemetry.quotas = Quotas(QuotaLimits(burst_records=1000))
            while agent.wait_for("heartbeat")["telemetry_sent"] == 0:
                pass
            assert agent.agent.outbox.stats().depth == 0
        finally:
            agent.stop()
        assert cp.cp.store.telemetry_counts()["telemetry"] == 20
    finally:
        cp.stop()


def test_revoked_devices_and_answered_drift_do_not_fire_retraining(
    cp: RunningControlPlane, tmp_path: Path, trained_bundle: Path,
) -> None:
    """A revoked device's windows once kept counting, and a job kept firing after it ended
    (windows whose end the device set minutes ahead stayed "after" the job)."""
    for name in ("h1", "h2", "evil"):
        cp.enroll_agent(tmp_path / name)
    assign_digits_v1(cp, trained_bundle, tmp_path)
    pipeline = tmp_path / "PIPELINE.toml"
    pipeline.write_text('[store]\nallowed_regions = ["*"]\n')
    cp.cp.store.set_policy(DriftPolicy("digits", str(pipeline), threshold=0.2,
                                       device_fraction=0.6, windows=1))
    drifted = _window(score=0.9, drifted=True, end=time.time() + 250)  # 250 s "ahead"
    _send(cp, tmp_path / "h1", "drift", _window())
    _send(cp, tmp_path / "evil", "drift", drifted)  # 1 of 2 drifted: not yet
    assert cp.cp.store.jobs("digits") == []
    revoke = cp.admin_stub().RevokeDevice(
        admin_pb2.RevokeDeviceRequest(id=_device_id(cp, tmp_path / "evil")), timeout=WAIT)
    assert revoke.revoked_at > 0
    _send(cp, tmp_path / "h2", "drift", drifted)  # 1 of 2 live devices: still not
    assert cp.cp.store.jobs("digits") == []

    _send(cp, tmp_path / "h1", "drift", drifted, seq=2)  # now 2 of 2: a job
    (job,) = cp.cp.store.jobs("digits")
    cp.cp.store.update_job(job.id, JobState.FAILED, time.time(), "ended")
    assert cp.cp.services.retraining.check("digits") is None  # answered drift fires nothing
    _send(cp, tmp_path / "h1", "drift", drifted, seq=3)
    _send(cp, tmp_path / "h2", "drift", drifted, seq=2)
    assert len(cp.cp.store.jobs("digits")) == 2  # new windows after the job: a new job


def test_samples_need_a_region_the_store_allows_and_never_poison_a_later_job(
    cp: RunningControlPlane, tmp_path: Path, trained_bundle: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A sample from a device without a region label was once kept, then failed every later
    retraining job (a failed job gives its samples back to the next one)."""
    cp.enroll_agent(tmp_path / "noregion")
    cp.enroll_agent(tmp_path / "eu", labels={"region": "eu-west-1"})
    cp.enroll_agent(tmp_path / "gone", labels={"region": "eu-west-1"})
    assign_digits_v1(cp, trained_bundle, tmp_path)
    pipeline = tmp_path / "PIPELINE.toml"
    pipeline.write_text('[store]\nallowed_regions = ["*"]\n')
    policy = DriftPolicy("digits", str(pipeline), sample_rate=1.0)
    cp.cp.store.set_policy(policy)
    width = len(json.loads((trained_bundle / "manifest.json").read_text())["input"]["features"])
    sample = {"model": "digits", "version": 1, "features": [[0.0] * width], "labels": [3]}
    for name in ("noregion", "eu", "gone"):
        _send(cp, tmp_path / name, "sample", sample)
    noregion = _device_id(cp, tmp_path / "noregion")
    device = _fleet(cp, capsys, "devices", "show", noregion)
    assert device["refused_reports"] == {"sample/region-not-allowed": 1}
    # One stored before regions were required (its region empty), and a revoked device's.
    cp.cp.store.ingest_telemetry(noregion, [TelemetryRecord(99, "sample", time.time(), b"{}")],
                                 {99: SampleRecord(noregion, "digits", 1, [[0.0] * width], [3],
                                                   {}, "")}, time.time(), 0, 0)
    cp.admin_stub().RevokeDevice(
        admin_pb2.RevokeDeviceRequest(id=_device_id(cp, tmp_path / "gone")), timeout=WAIT)
    job_id = cp.cp.store.add_job("digits", "test", 2, time.time())
    (job,) = cp.cp.store.jobs("digits")
    cp.cp.services.retraining._prepare(job, policy)
    rows = json.loads((cp.home / "retrain" / f"job-{job_id}" / "samples.json").read_text())
    assert [r["device"] for r in rows["rows"]] == [_device_id(cp, tmp_path / "eu")]
    device = _fleet(cp, capsys, "devices", "show", noregion)
    assert device["refused_reports"] == {"sample/region-not-allowed": 2}
    cp.cp.store.release_samples(job_id)  # the job failed: what it gives back is clean
    assert cp.cp.store.unused_sample_regions("digits") == ["eu-west-1"]


def test_models_list_stays_small_when_manifests_hold_megabytes_of_lineage(
    cp: RunningControlPlane, tmp_path: Path, trained_bundle: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Three versions with 3.5 MB of lineage each once made `fleet models list` fail for
    everyone (over gRPC's 4 MiB message limit)."""
    lineage = {"snapshots": ["s" * 64] * 50_000}  # ~3.5 MB of JSON
    for version in (1, 2, 3):
        staging = tmp_path / f"src{version}"
        shutil.copytree(trained_bundle, staging)
        manifest = json.loads((staging / "manifest.json").read_text())
        manifest["lineage"] = {**manifest.get("lineage", {}), **lineage}
        (staging / "manifest.json").write_text(json.dumps(manifest))
        bundle = _bundle_for(cp, staging, tmp_path / f"v{version}", version=version)
        assert fleet_main(["--config", str(cp.home / "operators/admin/fleet.toml"), "--api",
                           cp.api, "models", "publish", str(bundle)]) == 0
    reply = cp.admin_stub().ListModels(admin_pb2.ListModelsRequest(), timeout=WAIT)
    assert reply.ByteSize() < 64 * 1024
    assert all(m.manifest_bytes > 3_000_000 for m in reply.models)
    listed = _fleet(cp, capsys, "models", "list")
    assert [m["version"] for m in listed] == [1, 2, 3]
    assert "accuracy" in json.dumps(listed[0]["summary"]["metrics"])
    shown = _fleet(cp, capsys, "models", "show", "digits", "2")
    assert shown["manifest"]["lineage"]["snapshots"] == lineage["snapshots"]
    capsys.readouterr()
    assert fleet_main(["--config", str(cp.home / "operators/admin/fleet.toml"), "--api", cp.api,
                       "models", "show", "digits", "9"]) == 1
    assert "no model 'digits' version 9" in capsys.readouterr().err


def test_quota_buckets_admit_a_prefix_and_refill_with_time() -> None:
    """The rule alone, time passed in (no clock, no timing)."""
    quotas = Quotas(QuotaLimits(records_per_second=1, bytes_per_second=1000, burst_records=3,
                                burst_bytes=10_000))
    small = [TelemetryRecord(i, "error", 0.0, b"x" * 100) for i in range(5)]
    assert quotas.admit("d", small, now=100.0) == 3  # the record burst
    assert quotas.admit("d", small, now=100.0) == 0
    assert quotas.retry_after("d", small[0]) == pytest.approx(1.0)
    assert quotas.admit("d", small, now=102.0) == 2  # two seconds: two records
    assert quotas.admit("other", small, now=100.0) == 3  # every device has its own
    big = [TelemetryRecord(i, "error", 0.0, b"x" * 4000) for i in range(5)]
    assert quotas.admit("b", big, now=0.0) == 2  # the byte burst (4,000 + overhead each)
    assert quotas.admit("b", big, now=4.0) == 1  # 4,000 bytes refilled after ~4 s
    huge = [TelemetryRecord(1, "error", 0.0, b"x" * 50_000)]  # beyond any burst: when full
    assert quotas.admit("h", huge, now=0.0) == 1
    assert quotas.admit("h", huge, now=1.0) == 0


# ---------------------------------------------------------------- storage faults


def test_a_damaged_database_is_refused_with_one_line(tmp_path: Path) -> None:
    home = tmp_path / "cp"
    assert cli_run("control-plane", "init", "--home", str(home)).returncode == 0
    db = home / "edgefleet.db"
    with sqlite3.connect(db) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        size = conn.execute("PRAGMA page_size").fetchone()[0]
    assert pages > 3
    with db.open("r+b") as fh:  # garbage over every page but the header's
        fh.seek(size)
        fh.write(bytes(range(256)) * (size * (pages - 1) // 256))
    served = cli_run("control-plane", "serve", "--home", str(home), "--api", "127.0.0.1:0",
                     "--enroll", "127.0.0.1:0")
    assert served.returncode != 0
    assert served.stderr.strip().count("\n") == 0, served.stderr
    assert "failed its integrity check" in served.stderr and "restore" in served.stderr


def test_kill_9_during_a_write_burst_loses_nothing_acknowledged(tmp_path: Path) -> None:
    """A real `control-plane serve` killed with SIGKILL while devices send telemetry and an
    admin creates tokens: the database is sound, every acknowledged record and token is
    there, and the audit chain verifies."""
    home = tmp_path / "cp"
    assert cli_run("control-plane", "init", "--home", str(home)).returncode == 0
    config = ControlPlaneConfig.load(home)
    config.telemetry_burst_records = config.telemetry_records_per_second = 1e9
    config.save()
    server = Proc("control-plane", "serve", "--home", str(home), "--api", "127.0.0.1:0",
                  "--enroll", "127.0.0.1:0")
    api = server.expect(r"api \(mTLS\) listening on (\S+)").group(1)
    enroll_address = server.expect(r"enrollment .* listening on (\S+)").group(1)
    admin = replace(operator_config.load(home / "operators/admin/fleet.toml"), api=api)
    stub = admin_pb2_grpc.AdminServiceStub(open_channel(admin))
    ca = (home / "pki/ca.pem").read_bytes()
    devices = []
    for i in range(4):
        token = stub.CreateEnrollmentToken(admin_pb2.CreateEnrollmentTokenRequest(),
                                           timeout=WAIT).token
        devices.append(enroll(enroll_address, token, ca, tmp_path / f"d{i}").device_id)
    acked: dict[str, set[int]] = {d: set() for d in devices}
    tokens: list[str] = []
    enough = threading.Event()

    def send(i: int) -> None:
        with grpc.secure_channel(api, device_credentials(tmp_path / f"d{i}")) as channel:
            call = agent_pb2_grpc.AgentServiceStub(channel).SendTelemetry
            for n in range(10_000):
                records = [agent_pb2.TelemetryRecord(
                    seq=n * 20 + k + 1, kind="error", created_at=time.time(),
                    payload=encode({"where": "burst", "error": "e" * 200})) for k in range(20)]
                try:
                    reply = call(agent_pb2.TelemetryBatch(records=records), timeout=WAIT)
                except grpc.RpcError:
                    return  # the server is gone
                acked[devices[i]].update(reply.acked)
                if sum(len(s) for s in acked.values()) > 2000:
                    enough.set()

    def create_tokens() -> None:
        while True:
            try:
                tokens.append(stub.CreateEnrollmentToken(
                    admin_pb2.CreateEnrollmentTokenRequest(), timeout=WAIT).token)
            except grpc.RpcError:
                return

    threads = [threading.Thread(target=send, args=(i,)) for i in range(4)]
    threads.append(threading.Thread(target=create_tokens))
    for t in threads:
        t.start()
    assert enough.wait(WAIT)
    server.p.send_signal(signal.SIGKILL)  # mid-burst: the senders are still sending
    assert server.p.wait(WAIT) == -signal.SIGKILL
    for t in threads:
        t.join(WAIT)

    with sqlite3.connect(home / "edgefleet.db") as conn:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        hashes = {r[0] for r in conn.execute("SELECT token_hash FROM enrollment_tokens")}
    stored = {(d, r.seq) for d, r in raw_telemetry(home / "edgefleet.db")}
    assert {(d, s) for d, seqs in acked.items() for s in seqs} <= stored
    assert {hash_token(t) for t in tokens} <= hashes and tokens
    server = Proc("control-plane", "serve", "--home", str(home), "--api", "127.0.0.1:0",
                  "--enroll", "127.0.0.1:0")
    try:
        api = server.expect(r"api \(mTLS\) listening on (\S+)").group(1)
        verified = cli_run("fleet", "--config", str(home / "operators/admin/fleet.toml"),
                           "--api", api, "audit", "verify")
        assert verified.returncode == 0, verified.stderr
    finally:
        server.terminate()


def test_valid_tokens_enroll_in_bulk_from_one_address(cp: RunningControlPlane) -> None:
    """Only failures count against the limits: a site that enrolls its hosts behind one
    address is not slowed down."""
    tokens = [cp.token() for _ in range(15)]  # more than the burst of failures
    assert {_enroll_raw(cp, token) for token in tokens} == {grpc.StatusCode.OK}
    assert len(cp.cp.store.list_devices()) == 15
