"""Every conversion between protobuf messages and the control plane's records, in one place.

Text a device sends is cut to ``MAX_TEXT`` characters and lists to ``MAX_MODELS`` entries here,
before anything else sees it.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from edgefleet.v1 import admin_pb2, agent_pb2, common_pb2

from control_plane.domain.audit_chain import ChainVerdict
from control_plane.domain.drift import fleet_summary
from control_plane.domain.experiments import experiment_test_name
from control_plane.domain.record_columns import RecordColumns, Seqs, seq_runs
from control_plane.domain.records import (
    AuditRecord,
    DeviceAlert,
    DeviceStatus,
    DeviceView,
    DriftWindowRecord,
    InstalledModel,
    ModelVersionRecord,
    OperatorRecord,
    RetrainJob,
    SampleSummary,
    TelemetryRecord,
)
from control_plane.domain.retraining import DriftPolicy, drift_policy
from control_plane.domain.rollout_plan import device_progress, first_steps
from control_plane.services.experiments import ExperimentView
from control_plane.services.history import ArmHistory, DriftHistory
from control_plane.services.publishers import PublisherChange, PublisherList
from control_plane.services.rollouts import RolloutView

__all__ = [
    "MAX_MODELS",
    "MAX_TEXT",
    "alert_to_proto",
    "arm_history_to_proto",
    "audit_events_to_proto",
    "delivery_problems_from_proto",
    "device_to_proto",
    "drift_history_to_proto",
    "drift_policy_from_proto",
    "drift_policy_to_proto",
    "drift_to_proto",
    "experiment_to_proto",
    "host_from_proto",
    "jobs_to_proto",
    "model_to_proto",
    "models_from_proto",
    "operator_to_proto",
    "publishers_to_proto",
    "rollout_to_proto",
    "seq_runs",
    "telemetry_ack_to_proto",
    "telemetry_from_proto",
    "verification_to_proto",
]

MAX_TEXT = 256
MAX_MODELS = 64
MAX_DELIVERY_PROBLEMS = 8

_STATUS = {
    DeviceStatus.ONLINE: admin_pb2.DEVICE_STATUS_ONLINE,
    DeviceStatus.OFFLINE: admin_pb2.DEVICE_STATUS_OFFLINE,
    DeviceStatus.REVOKED: admin_pb2.DEVICE_STATUS_REVOKED,
}


def text(value: str) -> str:
    return value[:MAX_TEXT]


# ---------------------------------------------------------------------- from devices
def host_from_proto(host: common_pb2.HostFacts, transport: str = "") -> dict[str, Any]:
    """``transport``: the path the message came by (a fact of ours, not the agent's claim)."""
    out: dict[str, Any] = {
        "hostname": text(host.hostname),
        "os": text(host.os),
        "arch": text(host.arch),
        "cpu_count": host.cpu_count,
        "memory_bytes": host.memory_bytes,
        "python_version": text(host.python_version),
    }
    if transport:
        out["transport"] = transport
    return out


def models_from_proto(models: Iterable[common_pb2.InstalledModel]) -> list[InstalledModel]:
    return [InstalledModel(name=text(m.name), version=m.version, state=text(m.state),
                           bundle_digest=text(m.bundle_digest), reason=text(m.reason),
                           serving=m.serving)
            for m in list(models)[:MAX_MODELS]]


def telemetry_from_proto(batch: agent_pb2.TelemetryBatch) -> RecordColumns:
    """A batch's records: those of ``records`` (older agents: a message each), then those of
    ``columns`` (its byte columns as arrays, checked: ``RecordColumns.from_buffers``)."""
    parts = []
    if batch.records:
        # text() inlined (hundreds of records a batch); screening refuses unknown kinds anyway.
        parts.append(RecordColumns.of([
            TelemetryRecord(r.seq, r.kind[:MAX_TEXT], r.created_at, r.payload)
            for r in batch.records]))
    if batch.HasField("columns") or not parts:
        c = batch.columns
        parts.append(RecordColumns.from_buffers(c.seqs, c.created_at, c.kinds, c.kind_index,
                                                c.payload_sizes, c.payloads))
    return RecordColumns.concat(parts)


# ---------------------------------------------------------------------- to operators
def telemetry_ack_to_proto(acked: Sequence[int] | Seqs, runs: bool) -> agent_pb2.TelemetryAck:
    """The answer to a batch: its acknowledged seqs, as (first, last) runs to an agent that
    asked for them (``TelemetryBatch.ack_runs``: a whole batch is one pair), else listed."""
    if not runs:
        return agent_pb2.TelemetryAck(
            acked=acked.tolist() if isinstance(acked, np.ndarray) else acked)
    return agent_pb2.TelemetryAck(runs=seq_runs(acked))


def _host_to_proto(host: dict[str, Any]) -> common_pb2.HostFacts:
    known = {f.name for f in common_pb2.HostFacts.DESCRIPTOR.fields}
    return common_pb2.HostFacts(**{k: v for k, v in host.items() if k in known})


def device_to_proto(view: DeviceView) -> admin_pb2.Device:
    d = view.record
    return admin_pb2.Device(
        id=d.id,
        labels=d.labels,
        status=_STATUS[view.status],
        enrolled_at=d.enrolled_at,
        last_seen=d.last_seen or 0.0,
        agent_version=d.agent_version,
        host=_host_to_proto(d.host),
        models=[common_pb2.InstalledModel(**m.to_json()) for m in d.models],
        certificate_serial=d.cert_serial,
        certificate_expires_at=d.cert_not_after,
        revoked_at=d.revoked_at or 0.0,
        transport=str(d.host.get("transport", "")),
        refused_reports=view.refused,
        alerts=[alert_to_proto(a) for a in view.alerts],
        root_version=view.root_version,
    )


def delivery_problems_from_proto(
    problems: Iterable[agent_pb2.DeliveryProblem],
) -> list[tuple[str, str, float]]:
    """(kind, detail, since) of each reported problem, at most ``MAX_DELIVERY_PROBLEMS``."""
    return [(text(p.kind)[:32], text(p.detail), p.since if math.isfinite(p.since) else 0.0)
            for p in itertools.islice(problems, MAX_DELIVERY_PROBLEMS)]


def alert_to_proto(a: DeviceAlert) -> admin_pb2.DeviceAlert:
    return admin_pb2.DeviceAlert(kind=a.kind, detail=a.detail, since=a.since,
                                 updated_at=a.updated_at)


def operator_to_proto(o: OperatorRecord) -> admin_pb2.Operator:
    return admin_pb2.Operator(name=o.name, role=o.role, created_at=o.created_at,
                              created_by=o.created_by, revoked_at=o.revoked_at or 0.0,
                              certificate_serials=list(o.certificate_serials))


def model_to_proto(m: ModelVersionRecord) -> admin_pb2.ModelVersion:
    return admin_pb2.ModelVersion(
        name=m.name, version=m.version, digest=m.digest, length=m.length,
        created_at=m.created_at, published_by=m.published_by, publisher_key=m.publisher_key,
        manifest_json=m.manifest, manifest_bytes=m.manifest_bytes or len(m.manifest),
    )


def rollout_to_proto(view: RolloutView) -> admin_pb2.Rollout:
    rollout = view.rollout
    joins = first_steps(rollout.model, rollout.device_ids, rollout.steps)
    devices = []
    for device in view.devices:
        progress = device_progress(device.record.models, rollout.model, rollout.version)
        release = view.releases.get(device.record.id)
        devices.append(admin_pb2.RolloutDevice(
            device_id=device.record.id,
            desired_version=rollout.version,
            reported_version=progress.reported_version,
            reported_state=progress.state,
            reason=progress.reason,
            release_serial=release.serial if release else 0,
            step=joins.get(device.record.id, 0),
        ))
    return admin_pb2.Rollout(
        model=rollout.model, version=rollout.version, selector=rollout.selector,
        state=rollout.state.value, created_at=rollout.created_at,
        created_by=rollout.created_by, devices=devices, steps=list(rollout.steps),
        step=rollout.step + 1, bake_seconds=rollout.bake_seconds, gates=list(rollout.gates),
        on_failure=rollout.on_failure, previous_version=rollout.previous_version,
        reason=rollout.reason, history=list(rollout.history), task=view.task,
        quality=[admin_pb2.VersionQuality(
            version=q.version, labelled=q.labelled, accuracy=q.accuracy,
            accuracy_low=q.accuracy_low, accuracy_high=q.accuracy_high, mae=q.mae,
            mae_low=q.mae_low, mae_high=q.mae_high) for q in view.quality],
    )


def experiment_to_proto(view: ExperimentView) -> admin_pb2.Experiment:
    record, decision = view.record, view.decision
    arms = [admin_pb2.ArmResult(
        version=a.version, role=a.role, weight=a.weight, requests=a.requests, errors=a.errors,
        p50_ms=a.p50_ms, p95_ms=a.p95_ms, labelled=a.labelled, correct=a.correct,
        devices=a.devices, accuracy_low=a.accuracy_low, accuracy_high=a.accuracy_high,
        task=a.task, mae=a.mae, mae_low=a.mae_low, mae_high=a.mae_high,
    ) for a in view.arms]
    return admin_pb2.Experiment(
        model=record.model, champion=record.champion, challenger=record.challenger,
        weight=record.weight, state=record.state.value, selector=record.selector,
        device_ids=list(record.device_ids), arms=arms, created_at=record.created_at,
        decision=record.decision or decision.verdict,
        p_value=record.p_value if record.p_value is not None else (decision.p_value or 0.0),
        test=experiment_test_name(view.task),
        decision_reason=record.decision_reason or decision.reason,
        min_samples=view.min_samples, task=view.task,
    )


def drift_to_proto(windows: list[DriftWindowRecord]) -> admin_pb2.DriftReport:
    latest = [admin_pb2.DriftWindowReport(
        device_id=w.device_id, model=w.model, version=w.version, start=w.start, end=w.end,
        rows=w.rows, score=w.score, drifted=w.drifted, prediction_psi=w.prediction_psi,
        drifted_features=list(w.drifted_features)) for w in windows]
    fleet = [admin_pb2.DriftModelSummary(model=s.model, devices=s.devices,
                                         drifted_devices=s.drifted_devices,
                                         mean_score=s.mean_score)
             for s in fleet_summary(windows)]
    return admin_pb2.DriftReport(latest=latest, fleet=fleet)


def drift_policy_from_proto(p: admin_pb2.DriftPolicy) -> DriftPolicy:
    return drift_policy(p.model, p.pipeline, threshold=p.threshold,
                        device_fraction=p.device_fraction, windows=p.windows,
                        canary_weight=p.canary_weight, auto_canary=not p.approval,
                        sample_rate=p.sample_rate, margin=p.margin)


def drift_policy_to_proto(policy: DriftPolicy) -> admin_pb2.DriftPolicy:
    return admin_pb2.DriftPolicy(
        model=policy.model, pipeline=policy.pipeline, threshold=policy.threshold,
        device_fraction=policy.device_fraction, windows=policy.windows,
        canary_weight=policy.canary_weight, approval=not policy.auto_canary,
        sample_rate=policy.sample_rate, margin=policy.margin,
    )


def jobs_to_proto(jobs: list[RetrainJob],
                  samples: list[SampleSummary]) -> admin_pb2.ListRetrainJobsResponse:
    return admin_pb2.ListRetrainJobsResponse(jobs=[
        admin_pb2.RetrainJob(id=j.id, model=j.model, state=j.state.value, reason=j.reason,
                             version=j.version, created_at=j.created_at,
                             finished_at=j.finished_at or 0.0, detail=j.detail)
        for j in jobs], samples=[
        admin_pb2.SampleSummary(model=s.model, region=s.region, stored=s.stored,
                                unused=s.unused, devices=s.devices, refused=s.refused)
        for s in samples])


def verification_to_proto(verdict: ChainVerdict,
                          checked: tuple[bool, str] | None) -> admin_pb2.AuditVerification:
    return admin_pb2.AuditVerification(
        ok=verdict.ok and (checked is None or checked[0]), entries=verdict.entries,
        first_bad_seq=verdict.first_bad_seq, reason=verdict.reason,
        checkpoint_checked=checked is not None,
        checkpoint_ok=bool(checked and checked[0]),
        checkpoint_reason=checked[1] if checked else "",
    )


def audit_events_to_proto(events: list[AuditRecord]) -> admin_pb2.ListAuditEventsResponse:
    return admin_pb2.ListAuditEventsResponse(events=[
        admin_pb2.AuditEvent(seq=e.seq, time=e.time, actor=e.actor, action=e.action,
                             target=e.target, outcome=e.outcome, detail=e.detail, role=e.role)
        for e in events])


# --- history ---
def _window_to_proto(w: DriftWindowRecord) -> admin_pb2.DriftWindowReport:
    return admin_pb2.DriftWindowReport(
        device_id=w.device_id, model=w.model, version=w.version, start=w.start, end=w.end,
        rows=w.rows, score=w.score, drifted=w.drifted, prediction_psi=w.prediction_psi,
        drifted_features=list(w.drifted_features), feature_psi=w.feature_psi)


def drift_history_to_proto(h: DriftHistory) -> admin_pb2.DriftHistory:
    return admin_pb2.DriftHistory(
        since=h.since, windows=[_window_to_proto(w) for w in h.windows], truncated=h.truncated,
        days=[admin_pb2.DriftDay(device_id=d.device_id, model=d.model, version=d.version,
                                 day=d.day, windows=d.windows, drifted=d.drifted, rows=d.rows,
                                 mean_score=d.mean_score, max_score=d.max_score)
              for d in h.days])


def arm_history_to_proto(h: ArmHistory) -> admin_pb2.ArmHistory:
    return admin_pb2.ArmHistory(
        model=h.model, since=h.since, step_seconds=h.step,
        points=[admin_pb2.ArmPoint(time=p.time, version=p.version, requests=p.requests,
                                   errors=p.errors, labelled=p.labelled, correct=p.correct,
                                   abs_error_sum=p.abs_error_sum, p95_ms=p.p95_ms,
                                   devices=p.devices) for p in h.points])


def publishers_to_proto(listing: PublisherList, change: PublisherChange | None = None
                        ) -> admin_pb2.ListPublishersResponse:
    out = admin_pb2.ListPublishersResponse(
        publishers=[admin_pb2.Publisher(keyid=kid, public_key_pem=pem)
                    for kid, pem in listing.publishers],
        threshold=listing.threshold, root_version=listing.root_version,
        pending_version=listing.pending_version)
    if change is not None:
        out.changed_keyid = change.keyid
        out.change_root_version = change.root_version
        out.change_published = change.published
        out.rolled_back.extend(change.rolled_back)
    return out
