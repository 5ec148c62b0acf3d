"""The AdminService over gRPC (the `fleet` CLI's API): authenticate the operator from the TLS
peer certificate, convert, call one service, convert back."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
from edgefleet.v1 import admin_pb2, admin_pb2_grpc

from control_plane.api import convert
from control_plane.api.grpc_common import abort_with, peer_identity, rpc
from control_plane.services import Services
from control_plane.services.history import HistoryService
from control_plane.services.publishers import PublisherService
from fleetcore import pki
from fleetcore.errors import EdgefleetError

__all__ = ["AdminServicer"]


class AdminServicer(admin_pb2_grpc.AdminServiceServicer):
    def __init__(self, services: Services) -> None:
        self.s = services
        self.history = HistoryService(services.ctx)
        self.publishers = PublisherService(services.ctx)

    def _operator(self, context: grpc.aio.ServicerContext) -> pki.Identity:
        return self.s.identity.authenticate(peer_identity(context), pki.IdentityKind.OPERATOR)

    @rpc
    async def CreateEnrollmentToken(
        self, request: admin_pb2.CreateEnrollmentTokenRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.CreateEnrollmentTokenResponse:
        token, expires = self.s.identity.create_token(
            self._operator(context), request.ttl_seconds, dict(request.labels))
        return admin_pb2.CreateEnrollmentTokenResponse(token=token, expires_at=expires)

    @rpc
    async def ListDevices(
        self, request: admin_pb2.ListDevicesRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.ListDevicesResponse:
        views = self.s.identity.list_devices(self._operator(context), dict(request.selector))
        return admin_pb2.ListDevicesResponse(devices=[convert.device_to_proto(v) for v in views])

    @rpc
    async def GetDevice(
        self, request: admin_pb2.GetDeviceRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.Device:
        return convert.device_to_proto(self.s.identity.get_device(self._operator(context),
                                                                  request.id))

    @rpc
    async def RevokeDevice(
        self, request: admin_pb2.RevokeDeviceRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.Device:
        view = self.s.identity.revoke_device(self._operator(context), request.id,
                                             request.reason)
        return convert.device_to_proto(view)

    @rpc
    async def CreateOperator(
        self, request: admin_pb2.CreateOperatorRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.CreateOperatorResponse:
        pem = self.s.identity.create_operator(self._operator(context), request.name,
                                              request.role, request.csr_pem)
        return admin_pb2.CreateOperatorResponse(certificate_pem=pem,
                                                ca_pem=self.s.ctx.keys.ca_pem)

    async def PublishModel(
        self, request_iterator: AsyncIterator[admin_pb2.PublishModelChunk],
        context: grpc.aio.ServicerContext,
    ) -> admin_pb2.ModelVersion:
        try:
            upload = self.s.registry.begin_upload(self._operator(context))
            try:
                async for chunk in request_iterator:
                    upload.write(chunk.data)
            except BaseException:
                upload.discard()
                raise
            return convert.model_to_proto(self.s.registry.publish(self._operator(context),
                                                                  upload))
        except EdgefleetError as exc:
            await abort_with(context, exc, "PublishModel")
            raise AssertionError("unreachable") from None

    @rpc
    async def ListModels(
        self, request: admin_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.ListModelsResponse:
        models = self.s.registry.list_versions(self._operator(context), request.name)
        return admin_pb2.ListModelsResponse(models=[convert.model_to_proto(m) for m in models])

    @rpc
    async def GetModel(
        self, request: admin_pb2.GetModelRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.ModelVersion:
        return convert.model_to_proto(self.s.registry.get_version(
            self._operator(context), request.name, request.version))

    @rpc
    async def StartRollout(
        self, request: admin_pb2.StartRolloutRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.Rollout:
        view = self.s.rollouts.start(
            self._operator(context), request.model, request.version, dict(request.selector),
            steps=list(request.steps) or [100], bake_seconds=request.bake_seconds,
            gates=list(request.gates), on_failure=request.on_failure or "pause")
        return convert.rollout_to_proto(view)

    @rpc
    async def ActOnRollout(
        self, request: admin_pb2.RolloutActionRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.Rollout:
        view = self.s.rollouts.act(self._operator(context), request.model, request.action)
        return convert.rollout_to_proto(view)

    @rpc
    async def GetRollout(
        self, request: admin_pb2.GetRolloutRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.Rollout:
        return convert.rollout_to_proto(self.s.rollouts.get(self._operator(context),
                                                            request.model))

    @rpc
    async def StartExperiment(
        self, request: admin_pb2.StartExperimentRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.Experiment:
        view = self.s.experiments.start(self._operator(context), request.model,
                                        request.challenger, request.weight,
                                        dict(request.selector))
        return convert.experiment_to_proto(view)

    @rpc
    async def StopExperiment(
        self, request: admin_pb2.GetExperimentRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.Experiment:
        return convert.experiment_to_proto(self.s.experiments.stop(self._operator(context),
                                                                   request.model))

    @rpc
    async def GetExperiment(
        self, request: admin_pb2.GetExperimentRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.Experiment:
        return convert.experiment_to_proto(self.s.experiments.get(self._operator(context),
                                                                  request.model))

    @rpc
    async def GetDrift(
        self, request: admin_pb2.GetDriftRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.DriftReport:
        return convert.drift_to_proto(self.s.telemetry.drift(self._operator(context),
                                                             request.model))

    @rpc
    async def VerifyAudit(
        self, request: admin_pb2.VerifyAuditRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.AuditVerification:
        verdict, checked = self.s.audit.verify(self._operator(context),
                                               request.checkpoint.document,
                                               request.checkpoint.signature)
        return convert.verification_to_proto(verdict, checked)

    @rpc
    async def CheckpointAudit(
        self, request: admin_pb2.CheckpointAuditRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.AuditCheckpoint:
        document, signature = self.s.audit.checkpoint(self._operator(context))
        return admin_pb2.AuditCheckpoint(document=document, signature=signature)

    @rpc
    async def SetDriftPolicy(
        self, request: admin_pb2.DriftPolicy, context: grpc.aio.ServicerContext
    ) -> admin_pb2.DriftPolicy:
        policy = self.s.retraining.set_policy(self._operator(context),
                                              convert.drift_policy_from_proto(request))
        return convert.drift_policy_to_proto(policy)

    @rpc
    async def ListRetrainJobs(
        self, request: admin_pb2.ListRetrainJobsRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.ListRetrainJobsResponse:
        caller = self._operator(context)
        return convert.jobs_to_proto(self.s.retraining.jobs(caller, request.model),
                                     self.s.retraining.samples(caller, request.model))

    @rpc
    async def ListAuditEvents(
        self, request: admin_pb2.ListAuditEventsRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.ListAuditEventsResponse:
        return convert.audit_events_to_proto(self.s.audit.list_events(self._operator(context),
                                                                      request.limit))

    @rpc
    async def GetDriftHistory(
        self, request: admin_pb2.GetDriftHistoryRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.DriftHistory:
        return convert.drift_history_to_proto(self.history.drift(
            self._operator(context), request.model, request.device_id, request.since,
            request.limit))

    @rpc
    async def GetArmHistory(
        self, request: admin_pb2.GetArmHistoryRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.ArmHistory:
        return convert.arm_history_to_proto(self.history.arms(
            self._operator(context), request.model, request.since, request.step_seconds))

    @rpc
    async def ListOperators(
        self, request: admin_pb2.ListOperatorsRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.ListOperatorsResponse:
        records = self.s.identity.list_operators(self._operator(context))
        return admin_pb2.ListOperatorsResponse(
            operators=[convert.operator_to_proto(o) for o in records])

    @rpc
    async def RevokeOperator(
        self, request: admin_pb2.RevokeOperatorRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.Operator:
        return convert.operator_to_proto(self.s.identity.revoke_operator(
            self._operator(context), request.name, request.reason))

    @rpc
    async def ListPublishers(
        self, request: admin_pb2.ListPublishersRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.ListPublishersResponse:
        return convert.publishers_to_proto(self.publishers.listing(self._operator(context)))

    @rpc
    async def AddPublisher(
        self, request: admin_pb2.AddPublisherRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.ListPublishersResponse:
        caller = self._operator(context)
        change = self.publishers.add(caller, request.public_key_pem, request.threshold)
        return convert.publishers_to_proto(self.publishers.listing(caller), change)

    @rpc
    async def RevokePublisher(
        self, request: admin_pb2.RevokePublisherRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.ListPublishersResponse:
        caller = self._operator(context)
        change = self.publishers.revoke(caller, request.keyid, rollback=request.rollback,
                                        threshold=request.threshold)
        return convert.publishers_to_proto(self.publishers.listing(caller), change)
