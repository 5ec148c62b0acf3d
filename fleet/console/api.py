"""What the console's pages read and do: AdminService calls made with the operator's own
certificate (so the control plane's roles and audit apply as for the CLI), answered as JSON.

Every answer is a plain dict built with protobuf's JSON mapping (field names as in the
protos). Nothing here holds state: the browser asks again to refresh."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import grpc
from edgefleet.v1 import admin_pb2
from google.protobuf import json_format
from google.protobuf.message import Message

from fleet.common import RPC_TIMEOUT_SECONDS as T
from fleet.common import Stub
from fleetcore.errors import InvalidInputError

__all__ = ["ACTIONS", "ConsoleApi"]

# What the console may ask the control plane to do, and the least role it needs (the control
# plane checks again; this only decides which buttons a page shows).
ACTIONS = {
    "rollouts.pause": "operator", "rollouts.resume": "operator", "rollouts.abort": "operator",
    "rollouts.rollback": "operator", "experiments.stop": "operator",
}
_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")
MAX_SINCE_SECONDS = 400 * 86400


def _dict(message: Message) -> dict[str, Any]:
    return json_format.MessageToDict(message, preserving_proto_field_name=True,
                                     always_print_fields_with_no_presence=True)


def _name(value: str, what: str) -> str:
    if not 0 < len(value) <= 128 or not set(value) <= _NAME_CHARS:
        raise InvalidInputError(f"{what} must be a name of 1..128 letters, digits, - _ .")
    return value


class ConsoleApi:
    def __init__(self, stub: Stub, clock: Callable[[], float] = time.time) -> None:
        self.stub = stub
        self.clock = clock

    def fleet(self) -> dict[str, Any]:
        return _dict(self.stub.ListDevices(admin_pb2.ListDevicesRequest(), timeout=T))

    def device(self, device_id: str) -> dict[str, Any]:
        d = self.stub.GetDevice(admin_pb2.GetDeviceRequest(id=_name(device_id, "device")),
                                timeout=T)
        return _dict(d)

    def models(self) -> dict[str, Any]:
        out = _dict(self.stub.ListModels(admin_pb2.ListModelsRequest(), timeout=T))
        for m in out.get("models", []):  # the manifest summary, parsed for the page
            try:
                m["manifest"] = json.loads(m.pop("manifest_json", "") or "{}")
            except ValueError:
                m["manifest"] = {}
        return out

    def _model_names(self) -> list[str]:
        models = self.stub.ListModels(admin_pb2.ListModelsRequest(), timeout=T).models
        return sorted({m.name for m in models})

    def _each_model(self, call: Callable[[str], Message]) -> list[dict[str, Any]]:
        out = []
        for name in self._model_names():
            try:
                out.append(_dict(call(name)))
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.NOT_FOUND:
                    raise
        return out

    def rollouts(self) -> dict[str, Any]:
        return {"rollouts": self._each_model(lambda name: self.stub.GetRollout(
            admin_pb2.GetRolloutRequest(model=name), timeout=T))}

    def experiments(self) -> dict[str, Any]:
        return {"experiments": self._each_model(lambda name: self.stub.GetExperiment(
            admin_pb2.GetExperimentRequest(model=name), timeout=T))}

    def drift(self, hours: float, device_id: str = "", model: str = "") -> dict[str, Any]:
        if not 0 < hours * 3600 <= MAX_SINCE_SECONDS:
            raise InvalidInputError("hours must be in (0, 9600]")
        request = admin_pb2.GetDriftHistoryRequest(
            model=_name(model, "model") if model else "",
            device_id=_name(device_id, "device") if device_id else "",
            since=self.clock() - hours * 3600, limit=5000)
        return _dict(self.stub.GetDriftHistory(request, timeout=T))

    def jobs(self) -> dict[str, Any]:
        return _dict(self.stub.ListRetrainJobs(admin_pb2.ListRetrainJobsRequest(), timeout=T))

    def audit(self) -> dict[str, Any]:
        events = _dict(self.stub.ListAuditEvents(admin_pb2.ListAuditEventsRequest(limit=200),
                                                 timeout=T))
        verdict = _dict(self.stub.VerifyAudit(admin_pb2.VerifyAuditRequest(), timeout=T))
        return {**events, "verification": verdict}

    def act(self, action: str, model: str) -> dict[str, Any]:
        model = _name(model, "model")
        if action not in ACTIONS:
            raise InvalidInputError(f"unknown action {action!r}")
        group, verb = action.split(".")
        if group == "rollouts":
            return _dict(self.stub.ActOnRollout(
                admin_pb2.RolloutActionRequest(model=model, action=verb), timeout=T))
        return _dict(self.stub.StopExperiment(admin_pb2.GetExperimentRequest(model=model),
                                              timeout=T))
