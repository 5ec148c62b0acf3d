"""Open Inference Protocol v2 over gRPC: ``inference.GRPCInferenceService`` on grpc.aio.

Rules:

* The servicer converts protobuf to rows and back (``rows_from_proto``, ``response_to_proto``)
  and calls ``ServingCore``; nothing else. Domain errors become status codes in ``_STATUS``
  only: malformed -> INVALID_ARGUMENT, unknown model or version -> NOT_FOUND, runtime failure ->
  INTERNAL.
* ModelInfer takes one FP32 input of shape ``[n, features]``, either in
  ``contents.fp32_contents`` or as one little-endian ``raw_input_contents`` buffer (not both).
  The answer comes back the same way: ``raw_output_contents`` when the request was raw, else
  ``contents.fp32_contents``.
* ``model_version`` empty: routed (A/B, shadows); a number: that version. A routing key comes
  from the ``routing_key`` string parameter or the ``x-routing-key`` metadata.
* ModelReady answers ``ready=false`` for a model that is not served (a probe, not an error);
  ModelMetadata answers NOT_FOUND.
* The limits of ``limits.py`` hold here as over HTTP: messages up to ``MAX_MESSAGE_BYTES``
  either way (gRPC answers RESOURCE_EXHAUSTED past it), metadata up to ``MAX_HEADER_BYTES``,
  at most ``MAX_CONNECTIONS`` RPCs at once (RESOURCE_EXHAUSTED past it), ids, routing keys,
  model names and versions of bounded length, finite inputs only (``ServingCore``); an error
  message quotes at most ``MAX_SHOWN_CHARS`` of what the client sent.
"""

from __future__ import annotations

import logging
import sys
from typing import NoReturn

import grpc
import numpy as np
from edgefleet.v1 import grpc_predict_v2_pb2 as pb
from edgefleet.v1 import grpc_predict_v2_pb2_grpc as pb_grpc

from edge_agent._version import __version__
from edge_agent.serving.categorical import encode
from edge_agent.serving.core import InferResult, ModelSignature, ServingCore
from edge_agent.serving.errors import BadRequestError, InferenceError, ModelNotFoundError
from edge_agent.serving.heap import trim as trim_heap
from edge_agent.serving.limits import (
    MAX_CONNECTIONS,
    MAX_HEADER_BYTES,
    MAX_MESSAGE_BYTES,
    check_model_name,
    parse_version,
    shown,
)
from edge_agent.serving.repository import EXTENSIONS, SERVER_NAME
from edge_agent.serving.spans import Served
from fleetcore.errors import EdgefleetError, InvalidInputError, NotFoundError
from fleetcore.otel import TRACE_KEYS

__all__ = [
    "MAX_MESSAGE_BYTES",
    "InferenceServicer",
    "response_to_proto",
    "rows_from_proto",
    "start_grpc",
]

logger = logging.getLogger(__name__)

_LE_F4 = np.dtype("<f4")
_NATIVE_LE = sys.byteorder == "little"

# Domain errors -> gRPC status codes: the one place where that mapping lives. First match wins.
_STATUS: tuple[tuple[type[EdgefleetError], grpc.StatusCode], ...] = (
    (InvalidInputError, grpc.StatusCode.INVALID_ARGUMENT),
    (NotFoundError, grpc.StatusCode.NOT_FOUND),
    (InferenceError, grpc.StatusCode.INTERNAL),
)


def rows_from_proto(request: pb.ModelInferRequest, signature: ModelSignature) -> np.ndarray:
    """The request's rows as float32 ``[n, features]``, or ``BadRequestError``.

    ``raw_input_contents`` is not copied: the rows are a read-only view of the request's bytes
    (little-endian float32 is the host's float32 on every platform the agent runs on; a
    big-endian host gets a native copy). ``ServingCore`` copies what it keeps."""
    inputs = request.inputs
    if len(inputs) != 1:
        raise BadRequestError(f"expected one input tensor named {signature.input_name!r}; got "
                              f"{len(inputs)}")
    tensor = inputs[0]
    if tensor.name != signature.input_name:
        raise BadRequestError(f"expected input {signature.input_name!r}; got "
                              f"{shown(tensor.name)}")
    raw_values = tensor.datatype == "BYTES" and signature.categories is not None
    if tensor.datatype != "FP32" and not raw_values:
        raise BadRequestError(f"expected datatype 'FP32'; got {shown(tensor.datatype)}")
    shape = tensor.shape
    features = signature.features
    if len(shape) != 2 or shape[0] < 1 or shape[1] != features:
        raise BadRequestError(f"expected shape [n, {features}] with n >= 1; got "
                              f"{shown(list(shape))}")
    rows = shape[0]
    count = rows * features
    if raw_values:  # raw values of a model with categorical inputs: UTF-8 text per value
        assert signature.categories is not None
        return encode(list(tensor.contents.bytes_contents), rows, signature.categories)
    raw_inputs = request.raw_input_contents
    if raw_inputs:
        if len(raw_inputs) != 1 or (tensor.HasField("contents")
                                    and len(tensor.contents.fp32_contents)):
            raise BadRequestError("give the input either as one raw_input_contents buffer or in "
                                  "contents, not both")
        raw = raw_inputs[0]
        if len(raw) != count * 4:
            raise BadRequestError(f"expected {count * 4} raw bytes ({count} FP32); got "
                                  f"{len(raw)}")
        x = np.frombuffer(raw, dtype=_LE_F4).reshape(rows, features)
        return x if _NATIVE_LE else x.astype(np.float32)
    values = tensor.contents.fp32_contents
    if len(values) != count:
        raise BadRequestError(f"expected {count} values in contents.fp32_contents; got "
                              f"{len(values)}")
    return np.array(values, dtype=np.float32).reshape(rows, features)


def response_to_proto(result: InferResult, signature: ModelSignature, *,
                      raw: bool) -> pb.ModelInferResponse:
    out = result.outputs
    response = pb.ModelInferResponse(model_name=result.model, model_version=str(result.version),
                                     id=result.request_id or "")
    tensor = response.outputs.add(name=signature.output_name, datatype="FP32", shape=out.shape)
    if raw:
        response.raw_output_contents.append(out.astype(_LE_F4, copy=False).tobytes())
    else:
        tensor.contents.fp32_contents.extend(out.ravel().tolist())
    return response


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, core: ServingCore) -> None:
        self.core = core

    async def ServerLive(self, request: pb.ServerLiveRequest,
                         context: grpc.aio.ServicerContext) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest,
                          context: grpc.aio.ServicerContext) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.core.ready())

    async def ModelReady(self, request: pb.ModelReadyRequest,
                         context: grpc.aio.ServicerContext) -> pb.ModelReadyResponse:
        try:
            version = _version(request.version)
        except BadRequestError as exc:
            await _abort(context, exc)
        return pb.ModelReadyResponse(ready=self.core.ready(request.name, version))

    async def ServerMetadata(self, request: pb.ServerMetadataRequest,
                             context: grpc.aio.ServicerContext) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=__version__,
                                         extensions=list(EXTENSIONS))

    async def ModelMetadata(self, request: pb.ModelMetadataRequest,
                            context: grpc.aio.ServicerContext) -> pb.ModelMetadataResponse:
        try:
            version = _version(request.version)
            meta = self.core.models().get(request.name)
            if meta is None or (version is not None and str(version) not in meta["versions"]):
                what = request.name if version is None else f"{request.name} v{version}"
                raise ModelNotFoundError(f"{what} is not served")
        except EdgefleetError as exc:
            await _abort(context, exc)
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=meta["name"], versions=meta["versions"], platform=meta["platform"],
            inputs=[tensor(**t) for t in meta["inputs"]],
            outputs=[tensor(**t) for t in meta["outputs"]],
        )

    async def ModelInfer(self, request: pb.ModelInferRequest,
                         context: grpc.aio.ServicerContext) -> pb.ModelInferResponse:
        spans = self.core.spans  # None: inference spans off (the one check)
        if spans is None:
            return await self._infer(request, context)
        carrier = {str(k): str(v) for k, v in context.invocation_metadata() or ()
                   if k in TRACE_KEYS}
        with spans.request(request.model_name, "grpc", carrier) as served:
            return await self._infer(request, context, served)

    async def _infer(self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext,
                     served: Served | None = None) -> pb.ModelInferResponse:
        try:
            check_model_name(request.model_name)
            signature = self.core.signature(request.model_name)
            try:
                x = rows_from_proto(request, signature)
            except BadRequestError:
                self.core.note_bad_request(request.model_name)
                raise
            result = await self.core.ainfer(
                request.model_name, x, request_id=request.id or None,
                routing_key=_routing_key(request, context),
                version=_version(request.model_version),
            )
            if served is not None:
                served.version, served.rows = result.version, len(x)
        except EdgefleetError as exc:
            await _abort(context, exc)
        return response_to_proto(result, signature, raw=bool(request.raw_input_contents))


def _routing_key(request: pb.ModelInferRequest, context: grpc.aio.ServicerContext) -> str | None:
    param = request.parameters.get("routing_key")
    if param is not None:
        if param.WhichOneof("parameter_choice") != "string_param":
            raise BadRequestError("the routing_key parameter must be a string_param")
        return str(param.string_param)
    for key, value in context.invocation_metadata() or ():
        if key == "x-routing-key":
            return str(value)
    return None


def _version(text: str) -> int | None:
    return parse_version(text) if text else None


async def _abort(context: grpc.aio.ServicerContext, exc: EdgefleetError) -> NoReturn:
    code = next((c for cls, c in _STATUS if isinstance(exc, cls)), grpc.StatusCode.INTERNAL)
    await context.abort(code, str(exc))
    raise AssertionError("context.abort returned")  # it raises; this keeps mypy informed


async def start_grpc(core: ServingCore, host: str = "127.0.0.1",
                     port: int = 0) -> tuple[grpc.aio.Server, int]:
    """Serve ``core`` over gRPC (plaintext, for local clients) on ``host:port``; port 0 picks
    a free one. Stop it with ``await server.stop(grace)``."""
    server = grpc.aio.server(maximum_concurrent_rpcs=MAX_CONNECTIONS, options=[
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_metadata_size", MAX_HEADER_BYTES),
    ])
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(core), server)
    target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    bound = server.add_insecure_port(target)
    await server.start()
    trim_heap()  # what importing and setting up the server freed goes back to the OS
    logger.info("inference gRPC listening on %s:%d", host, bound)
    return server, bound
