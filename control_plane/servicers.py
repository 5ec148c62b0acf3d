"""gRPC servicers: protobuf in, protobuf out, nothing else.

Each method takes the caller's identity from the TLS-verified peer certificate, calls one
handler and converts the result. Domain errors become status codes in ``_status``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
from cryptography import x509
from edgefleet.v1 import admin_pb2, admin_pb2_grpc, agent_pb2, agent_pb2_grpc, common_pb2

from control_plane._status import status_code_for
from control_plane.domain import (
    ArmStatsRecord,
    DriftWindowRecord,
    ExperimentRecord,
    ModelVersionRecord,
    ReleaseRecord,
    RolloutRecord,
    TelemetryRecord,
)
from control_plane.experiment_stats import TEST_NAME, Decision, wilson_interval
from control_plane.handlers import DeviceView, Handlers
from control_plane.notify import DeviceNotifier
from control_plane.retrain import DriftPolicy
from control_plane.rollout_plan import step_devices
from fleetcore import pki
from fleetcore.errors import AuthenticationError, EdgefleetError, InvalidInputError

__all__ = ["AdminServicer", "AgentServicer", "device_to_proto", "host_from_proto", "peer_identity"]

log = logging.getLogger(__name__)

R = TypeVar("R")
_MAX_TEXT = 256
BUNDLE_CHUNK_BYTES = 256 * 1024
# A Sync stream re-checks the device now and then even without a wake-up: that renews its
# release before expiry and notices a revocation made by another control-plane replica.
SYNC_RECHECK_SECONDS = 30.0

_STATUS = {
    "online": admin_pb2.DEVICE_STATUS_ONLINE,
    "offline": admin_pb2.DEVICE_STATUS_OFFLINE,
    "revoked": admin_pb2.DEVICE_STATUS_REVOKED,
}


def _rpc(
    method: Callable[[Any, Any, grpc.aio.ServicerContext], Awaitable[R]],
) -> Callable[[Any, Any, grpc.aio.ServicerContext], Awaitable[R]]:
    @functools.wraps(method)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> R:
        try:
            return await method(self, request, context)
        except EdgefleetError as exc:
            code = status_code_for(exc)
            log.info("%s refused: %s (%s)", method.__name__, exc, code.name)
            await context.abort(code, str(exc))
            raise AssertionError("unreachable") from None  # abort() always raises

    return wrapper


@functools.lru_cache(maxsize=4096)
def _identity_from_pem(pem: bytes) -> pki.Identity:
    return pki.identity_from_certificate(x509.load_pem_x509_certificate(pem))


def peer_identity(context: grpc.aio.ServicerContext) -> pki.Identity:
    """The identity in the client certificate that TLS verified for this call."""
    auth = context.auth_context()
    pems = auth.get("x509_pem_cert") or []
    if not pems:
        raise AuthenticationError("this call needs a client certificate from the fleet CA")
    return _identity_from_pem(bytes(pems[0]))


def _text(value: str) -> str:
    return value[:_MAX_TEXT]


def host_from_proto(host: common_pb2.HostFacts) -> dict[str, Any]:
    return {
        "hostname": _text(host.hostname),
        "os": _text(host.os),
        "arch": _text(host.arch),
        "cpu_count": host.cpu_count,
        "memory_bytes": host.memory_bytes,
        "python_version": _text(host.python_version),
    }


def _host_to_proto(host: dict[str, Any]) -> common_pb2.HostFacts:
    known = {f.name for f in common_pb2.HostFacts.DESCRIPTOR.fields}
    return common_pb2.HostFacts(**{k: v for k, v in host.items() if k in known})


def _models_from_proto(models: Any) -> list[dict[str, Any]]:
    return [
        {
            "name": _text(m.name),
            "version": m.version,
            "state": _text(m.state),
            "bundle_digest": _text(m.bundle_digest),
            "reason": _text(m.reason),
            "serving": m.serving,
        }
        for m in list(models)[:64]
    ]


def model_to_proto(m: ModelVersionRecord) -> admin_pb2.ModelVersion:
    return admin_pb2.ModelVersion(
        name=m.name, version=m.version, digest=m.digest, length=m.length,
        created_at=m.created_at, published_by=m.published_by, publisher_key=m.publisher_key,
        manifest_json=m.manifest,
    )


def rollout_to_proto(
    rollout: RolloutRecord, views: list[DeviceView], releases: dict[str, ReleaseRecord]
) -> admin_pb2.Rollout:
    devices = []
    first_step: dict[str, int] = {}
    for k in range(len(rollout.steps)):
        for device_id in step_devices(rollout.model, rollout.device_ids, rollout.steps, k):
            first_step.setdefault(device_id, k + 1)
    for view in views:
        reported = [m for m in view.record.models if m.get("name") == rollout.model]
        serving = next((m for m in reported if m.get("serving")), None)
        desired = next((m for m in reported if m.get("version") == rollout.version), None)
        release = releases.get(view.record.id)
        devices.append(admin_pb2.RolloutDevice(
            device_id=view.record.id,
            desired_version=rollout.version,
            reported_version=int(serving["version"]) if serving else 0,
            reported_state=str(desired["state"]) if desired else "pending",
            reason=str(desired.get("reason", "")) if desired else "",
            release_serial=release.serial if release else 0,
            step=first_step.get(view.record.id, 0),
        ))
    return admin_pb2.Rollout(
        model=rollout.model, version=rollout.version, selector=rollout.selector,
        state=rollout.state, created_at=rollout.created_at, created_by=rollout.created_by,
        devices=devices, steps=list(rollout.steps), step=rollout.step + 1,
        bake_seconds=rollout.bake_seconds, gates=list(rollout.gates),
        on_failure=rollout.on_failure, previous_version=rollout.previous_version,
        reason=rollout.reason, history=list(rollout.history),
    )


def experiment_to_proto(
    record: ExperimentRecord, stats: list[ArmStatsRecord], decision: Decision, min_samples: int
) -> admin_pb2.Experiment:
    arms = []
    for version, role, weight in ((record.champion, "champion", 1 - record.weight),
                                  (record.challenger, "challenger", record.weight)):
        rows = [s for s in stats if s.version == version]
        requests = sum(s.requests for s in rows)

        def weighted(values: list[tuple[float, int]], total: int = requests) -> float:
            # Devices' percentiles averaged by their request counts: an approximation that
            # is good when devices see similar traffic (exact fleet percentiles need the
            # histograms, which come with the experiments' statistics).
            return sum(v * n for v, n in values) / total if total else 0.0

        labelled, correct = sum(s.labelled for s in rows), sum(s.correct for s in rows)
        low, high = wilson_interval(correct, labelled)
        arms.append(admin_pb2.ArmResult(
            accuracy_low=low, accuracy_high=high,
            version=version, role=role, weight=weight, requests=requests,
            errors=sum(s.errors for s in rows),
            p50_ms=weighted([(s.p50_ms, s.requests) for s in rows]),
            p95_ms=weighted([(s.p95_ms, s.requests) for s in rows]),
            labelled=sum(s.labelled for s in rows), correct=sum(s.correct for s in rows),
            devices=len(rows),
        ))
    return admin_pb2.Experiment(
        model=record.model, champion=record.champion, challenger=record.challenger,
        weight=record.weight, state=record.state, selector=record.selector,
        device_ids=list(record.device_ids), arms=arms, created_at=record.created_at,
        decision=record.decision or decision.verdict,
        p_value=record.p_value if record.p_value is not None else (decision.p_value or 0.0),
        test=TEST_NAME, decision_reason=record.decision_reason or decision.reason,
        min_samples=min_samples,
    )


def drift_to_proto(windows: list[DriftWindowRecord]) -> admin_pb2.DriftReport:
    latest = [admin_pb2.DriftWindowReport(
        device_id=w.device_id, model=w.model, version=w.version, start=w.start, end=w.end,
        rows=w.rows, score=w.score, drifted=w.drifted, prediction_psi=w.prediction_psi,
        drifted_features=list(w.drifted_features)) for w in windows]
    fleet = []
    for model in sorted({w.model for w in windows}):
        rows = [w for w in windows if w.model == model]
        fleet.append(admin_pb2.DriftModelSummary(
            model=model, devices=len(rows), drifted_devices=sum(w.drifted for w in rows),
            mean_score=sum(w.score for w in rows) / len(rows)))
    return admin_pb2.DriftReport(latest=latest, fleet=fleet)


def device_to_proto(view: DeviceView) -> admin_pb2.Device:
    d = view.record
    return admin_pb2.Device(
        id=d.id,
        labels=d.labels,
        status=_STATUS[view.status.value],
        enrolled_at=d.enrolled_at,
        last_seen=d.last_seen or 0.0,
        agent_version=d.agent_version,
        host=_host_to_proto(d.host),
        models=[common_pb2.InstalledModel(**m) for m in d.models],
        certificate_serial=d.cert_serial,
        certificate_expires_at=d.cert_not_after,
        revoked_at=d.revoked_at or 0.0,
        transport=str(d.host.get("transport", "")),
    )


class AgentServicer(agent_pb2_grpc.AgentServiceServicer):
    def __init__(self, handlers: Handlers, notifier: DeviceNotifier) -> None:
        self.h = handlers
        self.notifier = notifier

    def _device(self, context: grpc.aio.ServicerContext) -> pki.Identity:
        return self.h.authenticate(peer_identity(context), pki.IdentityKind.DEVICE)

    @_rpc
    async def Enroll(
        self, request: agent_pb2.EnrollRequest, context: grpc.aio.ServicerContext
    ) -> agent_pb2.EnrollResponse:
        r = self.h.enroll(
            request.token,
            request.csr_pem,
            dict(request.labels),
            host_from_proto(request.host),
            _text(request.agent_version),
        )
        return agent_pb2.EnrollResponse(
            device_id=r.device.id,
            certificate_pem=r.certificate_pem,
            ca_pem=r.ca_pem,
            release_public_key_pem=r.release_public_pem,
            publisher_public_keys_pem=list(r.publisher_public_pems),
            api_address=r.api_address,
            mqtt_url=r.mqtt_url,
            labels=r.device.labels,
            heartbeat_interval_seconds=r.heartbeat_interval_seconds,
        )

    @_rpc
    async def RenewCertificate(
        self, request: agent_pb2.RenewCertificateRequest, context: grpc.aio.ServicerContext
    ) -> agent_pb2.RenewCertificateResponse:
        pem = self.h.renew_certificate(self._device(context), request.csr_pem)
        return agent_pb2.RenewCertificateResponse(certificate_pem=pem)

    @_rpc
    async def Heartbeat(
        self, request: agent_pb2.HeartbeatRequest, context: grpc.aio.ServicerContext
    ) -> agent_pb2.HeartbeatResponse:
        now, interval, serial = await self.h.heartbeat_grouped(
            self._device(context),
            _text(request.agent_version),
            {**host_from_proto(request.host), "transport": "grpc"},  # how it came, not a claim
            _models_from_proto(request.models),
            (request.release_serial, request.release_digest),
        )
        return agent_pb2.HeartbeatResponse(server_time=now, heartbeat_interval_seconds=interval,
                                           release_serial=serial)

    async def Sync(
        self, request: agent_pb2.SyncRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[agent_pb2.SyncEvent]:
        try:
            caller = self._device(context)
            sent = request.have_serial
            with self.notifier.subscribe(caller.name) as wake:
                # Tells the client the stream is live (and subscribed) before any release.
                await context.send_initial_metadata(())
                while True:
                    # Clear before looking: a change notified from here on is not lost.
                    wake.clear()
                    self._device(context)  # a revoked device's stream ends here
                    release = self.h.current_release(caller, request.have_serial)
                    if release is not None and release.serial > sent:
                        sent = release.serial
                        yield agent_pb2.SyncEvent(release=common_pb2.SignedRelease(
                            document=release.document, signature=release.signature))
                    with contextlib.suppress(TimeoutError):
                        # Wake on a change, or now and then to renew the document before expiry.
                        await asyncio.wait_for(wake.wait(), timeout=SYNC_RECHECK_SECONDS)
        except EdgefleetError as exc:
            await context.abort(status_code_for(exc), str(exc))

    @_rpc
    async def SendTelemetry(
        self, request: agent_pb2.TelemetryBatch, context: grpc.aio.ServicerContext
    ) -> agent_pb2.TelemetryAck:
        records = [TelemetryRecord(r.seq, _text(r.kind), r.created_at, r.payload)
                   for r in request.records]
        acked = self.h.ingest_telemetry(self._device(context), records, request.dropped,
                                        request.depth)
        return agent_pb2.TelemetryAck(acked=acked)

    async def FetchBundle(
        self, request: agent_pb2.FetchBundleRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[agent_pb2.BundleChunk]:
        try:
            pieces = self.h.bundle_for_device(self._device(context), request.digest,
                                              request.offset, request.length)
            offset = request.offset
            for piece in pieces:
                for i in range(0, len(piece), BUNDLE_CHUNK_BYTES):
                    data = piece[i : i + BUNDLE_CHUNK_BYTES]
                    yield agent_pb2.BundleChunk(offset=offset, data=data)
                    offset += len(data)
        except EdgefleetError as exc:
            await context.abort(status_code_for(exc), str(exc))


class AdminServicer(admin_pb2_grpc.AdminServiceServicer):
    def __init__(self, handlers: Handlers) -> None:
        self.h = handlers

    def _operator(self, context: grpc.aio.ServicerContext) -> pki.Identity:
        return self.h.authenticate(peer_identity(context), pki.IdentityKind.OPERATOR)

    @_rpc
    async def CreateEnrollmentToken(
        self, request: admin_pb2.CreateEnrollmentTokenRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.CreateEnrollmentTokenResponse:
        token, expires = self.h.create_token(
            self._operator(context), request.ttl_seconds, dict(request.labels)
        )
        return admin_pb2.CreateEnrollmentTokenResponse(token=token, expires_at=expires)

    @_rpc
    async def ListDevices(
        self, request: admin_pb2.ListDevicesRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.ListDevicesResponse:
        views = self.h.list_devices(self._operator(context), dict(request.selector))
        return admin_pb2.ListDevicesResponse(devices=[device_to_proto(v) for v in views])

    @_rpc
    async def GetDevice(
        self, request: admin_pb2.GetDeviceRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.Device:
        return device_to_proto(self.h.get_device(self._operator(context), request.id))

    @_rpc
    async def RevokeDevice(
        self, request: admin_pb2.RevokeDeviceRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.Device:
        view = self.h.revoke_device(self._operator(context), request.id, request.reason)
        return device_to_proto(view)

    @_rpc
    async def CreateOperator(
        self, request: admin_pb2.CreateOperatorRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.CreateOperatorResponse:
        pem = self.h.create_operator(
            self._operator(context), request.name, request.role, request.csr_pem
        )
        return admin_pb2.CreateOperatorResponse(certificate_pem=pem, ca_pem=self.h.authority.ca_pem)

    async def PublishModel(
        self, request_iterator: AsyncIterator[admin_pb2.PublishModelChunk],
        context: grpc.aio.ServicerContext,
    ) -> admin_pb2.ModelVersion:
        try:
            upload = self.h.begin_upload(self._operator(context))
            try:
                async for chunk in request_iterator:
                    upload.write(chunk.data)
            except BaseException:
                upload.discard()
                raise
            return model_to_proto(self.h.publish_model(self._operator(context), upload))
        except EdgefleetError as exc:
            await context.abort(status_code_for(exc), str(exc))
            raise AssertionError("unreachable") from None

    @_rpc
    async def ListModels(
        self, request: admin_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.ListModelsResponse:
        models = self.h.list_models(self._operator(context), request.name)
        return admin_pb2.ListModelsResponse(models=[model_to_proto(m) for m in models])

    @_rpc
    async def StartRollout(
        self, request: admin_pb2.StartRolloutRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.Rollout:
        caller = self._operator(context)
        self.h.start_rollout(caller, request.model, request.version, dict(request.selector),
                             steps=list(request.steps) or [100],
                             bake_seconds=request.bake_seconds, gates=list(request.gates),
                             on_failure=request.on_failure or "pause")
        return rollout_to_proto(*self.h.get_rollout(caller, request.model))

    @_rpc
    async def ActOnRollout(
        self, request: admin_pb2.RolloutActionRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.Rollout:
        caller = self._operator(context)
        if request.action not in ("pause", "resume", "abort", "rollback"):
            raise InvalidInputError(
                f"action must be pause, resume, abort or rollback; got {request.action!r}"
            )
        self.h.rollout_action(caller, request.model, request.action)
        return rollout_to_proto(*self.h.get_rollout(caller, request.model))

    @_rpc
    async def GetRollout(
        self, request: admin_pb2.GetRolloutRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.Rollout:
        return rollout_to_proto(*self.h.get_rollout(self._operator(context), request.model))

    @_rpc
    async def StartExperiment(
        self, request: admin_pb2.StartExperimentRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.Experiment:
        caller = self._operator(context)
        self.h.start_experiment(caller, request.model, request.challenger, request.weight,
                                dict(request.selector))
        return self._experiment(caller, request.model)

    def _experiment(self, caller: pki.Identity, model: str) -> admin_pb2.Experiment:
        record, stats = self.h.get_experiment(caller, model)
        return experiment_to_proto(record, stats, self.h.experiment_decision(record),
                                   self.h.config.experiment_min_samples)

    @_rpc
    async def StopExperiment(
        self, request: admin_pb2.GetExperimentRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.Experiment:
        caller = self._operator(context)
        self.h.stop_experiment(caller, request.model)
        return self._experiment(caller, request.model)

    @_rpc
    async def GetExperiment(
        self, request: admin_pb2.GetExperimentRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.Experiment:
        return self._experiment(self._operator(context), request.model)

    @_rpc
    async def GetDrift(
        self, request: admin_pb2.GetDriftRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.DriftReport:
        return drift_to_proto(self.h.drift(self._operator(context), request.model))

    @_rpc
    async def VerifyAudit(
        self, request: admin_pb2.VerifyAuditRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.AuditVerification:
        verdict, checked = self.h.verify_audit(self._operator(context),
                                               request.checkpoint.document,
                                               request.checkpoint.signature)
        return admin_pb2.AuditVerification(
            ok=verdict.ok and (checked is None or checked[0]), entries=verdict.entries,
            first_bad_seq=verdict.first_bad_seq, reason=verdict.reason,
            checkpoint_checked=checked is not None,
            checkpoint_ok=bool(checked and checked[0]),
            checkpoint_reason=checked[1] if checked else "",
        )

    @_rpc
    async def CheckpointAudit(
        self, request: admin_pb2.CheckpointAuditRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.AuditCheckpoint:
        document, signature = self.h.checkpoint_audit(self._operator(context))
        return admin_pb2.AuditCheckpoint(document=document, signature=signature)

    @_rpc
    async def SetDriftPolicy(
        self, request: admin_pb2.DriftPolicy, context: grpc.aio.ServicerContext
    ) -> admin_pb2.DriftPolicy:
        policy = DriftPolicy(
            model=request.model, pipeline=request.pipeline, threshold=request.threshold or 0.2,
            device_fraction=request.device_fraction or 0.5, windows=request.windows or 2,
            canary_weight=request.canary_weight or 0.1, auto_canary=not request.approval,
            sample_rate=request.sample_rate, margin=request.margin,
        )
        self.h.retrain.set_policy(self._operator(context), policy)
        return admin_pb2.DriftPolicy(
            model=policy.model, pipeline=policy.pipeline, threshold=policy.threshold,
            device_fraction=policy.device_fraction, windows=policy.windows,
            canary_weight=policy.canary_weight, approval=not policy.auto_canary,
            sample_rate=policy.sample_rate, margin=policy.margin,
        )

    @_rpc
    async def ListRetrainJobs(
        self, request: admin_pb2.ListRetrainJobsRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.ListRetrainJobsResponse:
        caller = self._operator(context)
        jobs = self.h.retrain.jobs(caller, request.model)
        samples = self.h.retrain.samples(caller, request.model)
        return admin_pb2.ListRetrainJobsResponse(jobs=[
            admin_pb2.RetrainJob(id=j.id, model=j.model, state=j.state, reason=j.reason,
                                 version=j.version, created_at=j.created_at,
                                 finished_at=j.finished_at or 0.0, detail=j.detail)
            for j in jobs], samples=[
            admin_pb2.SampleSummary(model=s.model, region=s.region, stored=s.stored,
                                    unused=s.unused, devices=s.devices, refused=s.refused)
            for s in samples])

    @_rpc
    async def ListAuditEvents(
        self, request: admin_pb2.ListAuditEventsRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.ListAuditEventsResponse:
        events = self.h.list_audit(self._operator(context), request.limit)
        return admin_pb2.ListAuditEventsResponse(
            events=[
                admin_pb2.AuditEvent(
                    seq=e.seq, time=e.time, actor=e.actor, action=e.action,
                    target=e.target, outcome=e.outcome, detail=e.detail, role=e.role,
                )
                for e in events
            ]
        )
