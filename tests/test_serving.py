"""Serving on the agent: real bundles, ServingCore, the v2 HTTP and gRPC front ends.

Servers run on a LoopThread on 127.0.0.1 port 0; tests wait on results and ``core.flush()``
(the background worker's marker), never on time.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
from edgefleet.v1 import grpc_predict_v2_pb2 as pb
from edgefleet.v1 import grpc_predict_v2_pb2_grpc as pb_grpc
from prometheus_client.parser import text_string_to_metric_families
from sklearn.datasets import load_digits

from edge_agent.serving import (
    BadRequestError,
    InferenceError,
    ModelNotFoundError,
    ServingCore,
    ServingMetrics,
    start_grpc,
    start_http,
)
from edge_agent.serving import core as core_module
from edge_agent.serving.http import HttpServer
from edge_agent.serving.runtime import (
    OnnxRuntime,
    litert_interpreter_class,
    load_runtime,
    onnx_session,
)
from edge_agent.serving.stats import ArmStats, LatencyHistogram, Pending, PredictionLog
from scripts.bench_agent_serving import bench_inprocess
from tests.support import LoopThread
from tests.trainer_support import write_pipeline
from trainer.config import Pipeline
from trainer.pipeline import Run, Workdir
from trainer.tflite import converter_available, run_tflite

TEST_BODY_LIMIT = 64 * 1024  # small, so oversized bodies stay within the socket buffers


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    """v1 and v2 of "digits": the same trained model, with model.tflite."""
    base = tmp_path_factory.mktemp("serving")
    pipeline = write_pipeline(base, hidden="32", epochs=2, prune=0.25,
                              formats='"onnx", "tflite"')
    Run(Pipeline.load(pipeline), Workdir(base / "work"), progress=lambda m: None).run_all()
    out = {}
    for version in (1, 2):
        dest = base / f"v{version}"
        shutil.copytree(base / "work" / "bundle", dest)
        manifest = json.loads((dest / "manifest.json").read_text())
        manifest["version"] = version
        (dest / "manifest.json").write_text(json.dumps(manifest))
        out[version] = dest
    return out


@pytest.fixture(scope="module")
def rows() -> np.ndarray:
    # Real digits: on random noise the int8 variants (which one export keeps is measured, so
    # it varies between runs) and LiteRT can split near-ties and disagree on the class.
    return load_digits().data[:5].astype(np.float32)


@dataclass
class Served:
    core: ServingCore
    http: httpx.Client
    grpc: pb_grpc.GRPCInferenceServiceStub
    metrics: ServingMetrics
    calls: list[tuple[Any, ...]] = field(default_factory=list)

    def infer(self, x: np.ndarray, *, path: str = "/v2/models/digits/infer",
              **extra: Any) -> httpx.Response:
        body = {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                            "data": x.tolist()}], **extra}
        return self.http.post(path, json=body)


def _start(loop: LoopThread, core: ServingCore) -> tuple[Served, Callable[[], None]]:
    metrics = ServingMetrics(core)

    async def up() -> tuple[HttpServer, int, grpc.aio.Server, int]:
        http, http_port = await start_http(core, "127.0.0.1", 0, metrics=metrics,
                                           max_body_bytes=TEST_BODY_LIMIT)
        server, grpc_port = await start_grpc(core, "127.0.0.1", 0)
        return http, http_port, server, grpc_port

    http, http_port, server, grpc_port = loop.run(up())
    client = httpx.Client(base_url=f"http://127.0.0.1:{http_port}", timeout=10)
    channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}")

    def stop() -> None:
        client.close()
        channel.close()
        loop.run(http.stop())
        loop.run(server.stop(0))
        core.close()

    return Served(core, client, pb_grpc.GRPCInferenceServiceStub(channel), metrics), stop


@pytest.fixture
def serve(bundles: dict[int, Path]) -> Iterator[Callable[..., Served]]:
    """Start a core with the given arms behind HTTP and gRPC; everything stops afterwards."""
    loop = LoopThread()
    cleanup: list[Callable[[], None]] = []

    def start(arms: list[tuple[int, float, bool]], prefer: str = "onnx") -> Served:
        calls: list[tuple[Any, ...]] = []
        core = ServingCore(on_result=lambda *a: calls.append(a), seed=0)
        core.set_model("digits", arms, {v: bundles[v] for v, _, _ in arms}, prefer=prefer)
        served, stop = _start(loop, core)
        served.calls = calls
        cleanup.append(stop)
        return served

    yield start
    for stop in cleanup:
        stop()
    loop.close()


@pytest.fixture(scope="module")
def shared(bundles: dict[int, Path]) -> Iterator[Served]:
    """One server for the refusal tables: a refusal must not disturb the requests after it."""
    loop = LoopThread()
    core = ServingCore()
    core.set_model("digits", [(1, 1.0, False)], {1: bundles[1]})
    served, stop = _start(loop, core)
    yield served
    stop()
    loop.close()


def _grpc_request(x: np.ndarray, *, raw: bool, model: str = "digits", version: str = "",
                  request_id: str = "") -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model, model_version=version, id=request_id)
    tensor = request.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
    if raw:
        request.raw_input_contents.append(x.astype("<f4").tobytes())
    else:
        tensor.contents.fp32_contents.extend(x.ravel().tolist())
    return request


def _grpc_outputs(response: pb.ModelInferResponse) -> np.ndarray:
    shape = tuple(response.outputs[0].shape)
    if response.raw_output_contents:
        return np.frombuffer(response.raw_output_contents[0], dtype="<f4").reshape(shape)
    return np.array(response.outputs[0].contents.fp32_contents, dtype=np.float32).reshape(shape)


def _http_outputs(response: httpx.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    out = response.json()["outputs"][0]
    assert out["name"] == "probabilities" and out["datatype"] == "FP32"
    return np.array(out["data"], dtype=np.float32).reshape(out["shape"])


class _RecordingHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.closed = False
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record.getMessage())

    def close(self) -> None:
        self.closed = True
        super().close()


def test_starting_the_http_server_leaves_the_process_logging_alone(
    serve: Callable[..., Served],
) -> None:
    """uvicorn's default logging setup (dictConfig) closed every handler of the process:
    the agent's own and, after LiteRT's conversion imported absl, sys.stderr itself."""
    handler = _RecordingHandler()
    logger = logging.getLogger("edgefleet.test.serving")
    logger.addHandler(handler)
    try:
        served = serve([(1, 1.0, False)])
        assert served.http.get("/v2/health/ready").status_code == 200
        assert not handler.closed
        logger.warning("still here")
        assert handler.records == ["still here"]
        assert logging.getLogger("edgefleet.test.serving").handlers == [handler]
    finally:
        logger.removeHandler(handler)


# ------------------------------------------------------------------ round trips


# The test environment always has LiteRT (the Makefile installs it): a missing one must fail.
RUNTIMES = ["onnx", "tflite"]


@pytest.mark.parametrize("prefer", RUNTIMES)
def test_http_and_grpc_give_the_runtimes_own_predictions(
    serve: Callable[..., Served], bundles: dict[int, Path], rows: np.ndarray, prefer: str
) -> None:
    s = serve([(1, 1.0, False)], prefer=prefer)
    session = onnx_session(bundles[1] / "model.onnx")

    def direct(x: np.ndarray) -> np.ndarray:
        if prefer == "onnx":  # dynamic int8: a row's answer depends on its batch, so per batch
            out: np.ndarray = session.run(None, {"input": x})[0]
            return out
        return run_tflite(bundles[1] / "model.tflite", x)

    expected = direct(rows)
    assert (expected.argmax(1) == session.run(None, {"input": rows})[0].argmax(1)).all()
    tol = 0.0 if prefer == "onnx" else 1e-5  # LiteRT batches the remainder (runtime.py)

    np.testing.assert_allclose(_http_outputs(s.infer(rows)), expected, rtol=0, atol=tol)
    flat = s.http.post("/v2/models/digits/infer", json={"inputs": [
        {"name": "input", "shape": [5, 64], "datatype": "FP32", "data": rows.ravel().tolist()}]})
    np.testing.assert_allclose(_http_outputs(flat), expected, rtol=0, atol=tol)
    for raw in (False, True):
        response = s.grpc.ModelInfer(_grpc_request(rows, raw=raw, request_id="g"))
        assert (response.model_name, response.model_version, response.id) == ("digits", "1", "g")
        assert bool(response.raw_output_contents) is raw
        np.testing.assert_allclose(_grpc_outputs(response), expected, rtol=0, atol=tol)
    one = rows[:1]
    np.testing.assert_allclose(_http_outputs(s.infer(one)), direct(one), rtol=0, atol=tol)
    meta = s.http.get("/v2/models/digits").json()
    assert meta["platform"] == {"onnx": "onnxruntime_onnx", "tflite": "litert_tflite"}[prefer]


def test_metadata_health_and_readiness(serve: Callable[..., Served]) -> None:
    s = serve([(1, 1.0, False), (2, 0.0, True)])
    assert s.http.get("/v2/health/live").json() == {"live": True}
    assert s.http.get("/v2/health/ready").json() == {"ready": True}
    meta = s.http.get("/v2/models/digits").json()
    assert meta["name"] == "digits" and meta["versions"] == ["1", "2"]
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 64]}]
    assert meta["outputs"] == [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]}]
    assert s.http.get("/v2/models/digits/versions/2/ready").status_code == 200
    assert s.http.get("/v2/models/digits/versions/3/ready").status_code == 404
    assert s.http.get("/v2/models/nope/ready").status_code == 404

    assert s.grpc.ServerLive(pb.ServerLiveRequest()).live
    assert s.grpc.ServerReady(pb.ServerReadyRequest()).ready
    assert s.grpc.ModelReady(pb.ModelReadyRequest(name="digits", version="2")).ready
    assert not s.grpc.ModelReady(pb.ModelReadyRequest(name="nope")).ready
    grpc_meta = s.grpc.ModelMetadata(pb.ModelMetadataRequest(name="digits"))
    assert list(grpc_meta.versions) == ["1", "2"]
    assert list(grpc_meta.inputs[0].shape) == [-1, 64]
    assert s.grpc.ServerMetadata(pb.ServerMetadataRequest()).name == "edgefleet-agent"

    s.core.remove_model("digits")
    assert s.http.get("/v2/health/ready").status_code == 503
    assert not s.grpc.ServerReady(pb.ServerReadyRequest()).ready


# ------------------------------------------------------------------ refusals


def _chunks(total: int, size: int = 8192) -> Iterator[bytes]:
    for _ in range(total // size):
        yield b" " * size


@dataclass(frozen=True)
class HttpCase:
    id: str
    status: int
    body: Any = None  # JSON document, or bytes sent as they are
    method: str = "POST"
    path: str = "/v2/models/digits/infer"
    contains: str = ""


def _tensor(**changes: Any) -> dict[str, Any]:
    tensor = {"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [0.5] * 64}
    tensor.update(changes)
    return {"inputs": [tensor]}


HTTP_CASES = [
    HttpCase("malformed-json", 400, b'{"inputs": [', contains="not valid JSON"),
    HttpCase("not-utf8", 400, b"\xff\xfe{}", contains="not UTF-8"),
    # The strict loader (fleetcore.strict_json): refused with a 400, never a 500.
    HttpCase("duplicate-key", 400,
             json.dumps(_tensor())[:-1].encode() + b', "inputs": []}',
             contains="duplicate key 'inputs'"),
    HttpCase("nan-data", 400, json.dumps(_tensor(data=[float("nan")] * 64)).encode(),
             contains="NaN is not a JSON number"),
    HttpCase("infinity-data", 400, json.dumps(_tensor(data=[float("inf")] * 64)).encode(),
             contains="Infinity is not a JSON number"),
    HttpCase("deeply-nested", 400, b'{"inputs": ' + b"[" * 20_000 + b"]" * 20_000 + b"}",
             contains="nests deeper than 32"),
    HttpCase("json-array", 400, [1, 2], contains="JSON object"),
    HttpCase("no-inputs", 400, {"id": "x"}, contains="one tensor"),
    HttpCase("two-inputs", 400, {"inputs": _tensor()["inputs"] * 2}, contains="one tensor"),
    HttpCase("wrong-input-name", 400, _tensor(name="pixels"), contains="'input'"),
    HttpCase("wrong-datatype", 400, _tensor(datatype="FP64"), contains="FP32"),
    HttpCase("wrong-width", 400, _tensor(shape=[1, 63], data=[0.5] * 63), contains="[n, 64]"),
    HttpCase("zero-rows", 400, _tensor(shape=[0, 64], data=[]), contains="n >= 1"),
    HttpCase("shape-not-list", 400, _tensor(shape="1x64"), contains="shape"),
    HttpCase("bool-in-shape", 400, _tensor(shape=[True, 64]), contains="shape"),
    HttpCase("data-count-mismatch", 400, _tensor(shape=[2, 64]), contains="128 numbers"),
    HttpCase("ragged-rows", 400, _tensor(shape=[2, 64], data=[[0.5] * 64, [0.5] * 63]),
             contains="ragged"),
    HttpCase("string-data", 400, _tensor(data=["0.5"] * 64), contains="numbers"),
    HttpCase("null-data", 400, _tensor(data=[None] * 64), contains="numbers"),
    HttpCase("data-not-list", 400, _tensor(data="abc"), contains="list"),
    HttpCase("id-not-string", 400, {**_tensor(), "id": 7}, contains="'id'"),
    HttpCase("routing-key-not-string", 400, {**_tensor(), "parameters": {"routing_key": 3}},
             contains="routing_key"),
    HttpCase("unknown-output", 400, {**_tensor(), "outputs": [{"name": "logits"}]},
             contains="probabilities"),
    HttpCase("unknown-model", 404, _tensor(), path="/v2/models/nope/infer",
             contains="nope"),
    HttpCase("unknown-version", 404, _tensor(), path="/v2/models/digits/versions/9/infer",
             contains="v9"),
    HttpCase("bad-version", 400, _tensor(), path="/v2/models/digits/versions/x/infer",
             contains="positive integer"),
    HttpCase("get-on-infer", 405, method="GET"),
    HttpCase("unknown-route", 404, method="GET", path="/v3/models"),
    HttpCase("oversized-declared", 413, b" " * (TEST_BODY_LIMIT + 1), contains="limit"),
    HttpCase("oversized-chunked", 413, "chunked", contains="limit"),
    HttpCase("feedback-malformed", 400, b"{", path="/v2/models/digits/feedback"),
    HttpCase("feedback-no-id", 400, {"label": 1}, path="/v2/models/digits/feedback",
             contains="'id'"),
    HttpCase("feedback-label-out-of-range", 400, {"id": "a", "label": 10},
             path="/v2/models/digits/feedback", contains="[0, 10)"),
    HttpCase("feedback-label-bool", 400, {"id": "a", "label": True},
             path="/v2/models/digits/feedback"),
    HttpCase("feedback-unknown-id", 404, {"id": "never-seen", "label": 1},
             path="/v2/models/digits/feedback", contains="never-seen"),
    HttpCase("feedback-unknown-model", 404, {"id": "a", "label": 1},
             path="/v2/models/nope/feedback"),
]


@pytest.mark.parametrize("case", HTTP_CASES, ids=[c.id for c in HTTP_CASES])
def test_malformed_http_requests_get_their_4xx_and_the_next_request_works(
    shared: Served, rows: np.ndarray, case: HttpCase
) -> None:
    good = _http_outputs(shared.infer(rows[:1]))
    if case.body == "chunked":
        content: Any = _chunks(TEST_BODY_LIMIT * 2)
    elif isinstance(case.body, bytes):
        content = case.body
    else:
        content = None if case.body is None else json.dumps(case.body).encode()
    response = shared.http.request(case.method, case.path, content=content)
    assert response.status_code == case.status, response.text
    assert case.contains in response.json()["error"], response.text
    np.testing.assert_array_equal(_http_outputs(shared.infer(rows[:1])), good)
    assert shared.core.stats()["models"]["digits"]["arms"]["1"]["errors"] == 0


@dataclass(frozen=True)
class GrpcCase:
    id: str
    code: grpc.StatusCode
    change: Callable[[pb.ModelInferRequest], None]


def _set(attr: str, value: Any) -> Callable[[pb.ModelInferRequest], None]:
    def change(request: pb.ModelInferRequest) -> None:
        setattr(request, attr, value)
    return change


def _tensor_change(fn: Callable[[Any], None]) -> Callable[[pb.ModelInferRequest], None]:
    return lambda request: fn(request.inputs[0])


def _raw_too_short(request: pb.ModelInferRequest) -> None:
    request.inputs[0].contents.ClearField("fp32_contents")
    request.raw_input_contents.append(b"\0")


GRPC_CASES = [
    GrpcCase("unknown-model", grpc.StatusCode.NOT_FOUND, _set("model_name", "nope")),
    GrpcCase("unknown-version", grpc.StatusCode.NOT_FOUND, _set("model_version", "9")),
    GrpcCase("bad-version", grpc.StatusCode.INVALID_ARGUMENT, _set("model_version", "v1")),
    GrpcCase("wrong-input-name", grpc.StatusCode.INVALID_ARGUMENT,
             _tensor_change(lambda t: setattr(t, "name", "pixels"))),
    GrpcCase("wrong-datatype", grpc.StatusCode.INVALID_ARGUMENT,
             _tensor_change(lambda t: setattr(t, "datatype", "INT64"))),
    GrpcCase("wrong-shape", grpc.StatusCode.INVALID_ARGUMENT,
             _tensor_change(lambda t: t.shape.__setitem__(1, 63))),
    GrpcCase("short-contents", grpc.StatusCode.INVALID_ARGUMENT,
             _tensor_change(lambda t: t.contents.fp32_contents.pop())),
    GrpcCase("no-inputs", grpc.StatusCode.INVALID_ARGUMENT, lambda r: r.ClearField("inputs")),
    GrpcCase("raw-and-contents", grpc.StatusCode.INVALID_ARGUMENT,
             lambda r: r.raw_input_contents.append(b"\0" * 256)),
    GrpcCase("raw-too-short", grpc.StatusCode.INVALID_ARGUMENT, _raw_too_short),
    GrpcCase("routing-key-not-string", grpc.StatusCode.INVALID_ARGUMENT,
             lambda r: r.parameters["routing_key"].CopyFrom(pb.InferParameter(int64_param=3))),
]


@pytest.mark.parametrize("case", GRPC_CASES, ids=[c.id for c in GRPC_CASES])
def test_malformed_grpc_requests_get_their_status_and_the_next_request_works(
    shared: Served, rows: np.ndarray, case: GrpcCase
) -> None:
    s = shared
    request = _grpc_request(rows[:1], raw=False)
    case.change(request)
    with pytest.raises(grpc.RpcError) as info:
        s.grpc.ModelInfer(request)
    assert info.value.code() == case.code, info.value.details()
    response = s.grpc.ModelInfer(_grpc_request(rows[:1], raw=True))
    assert response.model_version == "1"


# ------------------------------------------------------------------ A/B, shadows, feedback


def test_shadow_answers_never_reach_the_caller_but_are_counted(
    serve: Callable[..., Served], rows: np.ndarray
) -> None:
    s = serve([(1, 1.0, False), (2, 0.0, True)])
    for i in range(20):
        response = s.infer(rows[i % 5:i % 5 + 1], id=f"r{i}")
        assert response.json()["model_version"] == "1"
    for raw in (False, True):
        assert s.grpc.ModelInfer(_grpc_request(rows, raw=raw)).model_version == "1"
    assert s.core.flush(10)
    arms = s.core.stats()["models"]["digits"]["arms"]
    assert arms["1"]["requests"] == 22 and not arms["1"]["shadow"]
    assert arms["2"]["requests"] == 22 and arms["2"]["shadow"]
    assert {c[1] for c in s.calls} == {1}  # on_result hears only answers callers got
    # An explicit version is not mirrored.
    assert s.infer(rows[:1], path="/v2/models/digits/versions/1/infer").status_code == 200
    assert s.core.flush(10)
    assert s.core.stats()["models"]["digits"]["arms"]["2"]["requests"] == 22


def test_routing_key_is_sticky_over_http_and_grpc(serve: Callable[..., Served],
                                                  rows: np.ndarray) -> None:
    s = serve([(1, 0.5, False), (2, 0.5, False)])
    seen = set()
    for key in (f"user-{i}" for i in range(12)):
        by_param = {s.infer(rows[:1], parameters={"routing_key": key}).json()["model_version"]
                    for _ in range(5)}
        by_header = {s.http.post("/v2/models/digits/infer", headers={"x-routing-key": key},
                                 json={"inputs": [{"name": "input", "shape": [1, 64],
                                                   "datatype": "FP32",
                                                   "data": rows[0].tolist()}]}
                                 ).json()["model_version"] for _ in range(5)}
        request = _grpc_request(rows[:1], raw=True)
        request.parameters["routing_key"].string_param = key
        by_grpc = {s.grpc.ModelInfer(request).model_version for _ in range(5)}
        meta = {s.grpc.ModelInfer(_grpc_request(rows[:1], raw=True),
                                  metadata=[("x-routing-key", key)]).model_version}
        assert len(by_param | by_header | by_grpc | meta) == 1, key
        seen |= by_param
    assert seen == {"1", "2"}  # 12 keys at 50/50: both arms (chance of not: 2 * 2**-12)


def test_feedback_scores_the_arm_that_answered_and_its_shadow(
    serve: Callable[..., Served], rows: np.ndarray
) -> None:
    s = serve([(1, 1.0, False), (2, 0.0, True)])
    predicted = []
    for i in range(5):
        out = _http_outputs(s.infer(rows[i:i + 1], id=f"q{i}"))
        predicted.append(int(out.argmax()))
    assert s.core.flush(10)  # the shadow's answers join the log before the labels come
    for i in range(5):  # right for the first three, wrong for the last two
        label = predicted[i] if i < 3 else (predicted[i] + 1) % 10
        response = s.http.post("/v2/models/digits/feedback", json={"id": f"q{i}", "label": label})
        assert response.status_code == 200, response.text
    # Scored once; an unknown id is refused and changes nothing.
    assert s.http.post("/v2/models/digits/feedback", json={"id": "q0", "label": 1}
                       ).status_code == 404
    assert s.http.post("/v2/models/digits/feedback", json={"id": "zz", "label": 1}
                       ).status_code == 404
    arms = s.core.stats()["models"]["digits"]["arms"]
    for v in ("1", "2"):
        assert (arms[v]["feedback_rows"], arms[v]["feedback_correct"]) == (5, 3)
        assert arms[v]["accuracy"] == pytest.approx(0.6)
    # A batch takes one label per row.
    s.infer(rows, id="batch")
    assert s.http.post("/v2/models/digits/feedback", json={"id": "batch", "label": [1]}
                       ).status_code == 400
    assert s.core.feedback("digits", "batch", [0] * 5)


def test_feedback_log_is_bounded_lru() -> None:
    log = PredictionLog(capacity=3)
    for i in range(5):
        log.put(f"r{i}", Pending("m", 1, ArmStats("m", 1), (0,)))
    assert len(log) == 3 and log.evicted == 2
    assert log.take("r0", "m") is None
    assert log.take("r4", "other") is None  # another model's id is unknown here
    assert log.take("r4", "m") is not None
    assert log.take("r4", "m") is None


def test_latency_histogram_quantiles_within_a_bucket() -> None:
    hist = LatencyHistogram()
    for i in range(1, 1001):
        hist.record(i * 1e-6)  # 1 µs .. 1 ms, uniform
    assert hist.quantile(0.5) == pytest.approx(500e-6, rel=0.13)
    assert hist.quantile(0.95) == pytest.approx(950e-6, rel=0.13)
    assert LatencyHistogram().quantile(0.5) is None
    hist.record(1e6)  # beyond the last bound: counted, reported as the last bound
    assert hist.count == 1001 and hist.quantile(1.0) == pytest.approx(100.0)


# ------------------------------------------------------------------ switching, hooks, errors


def test_model_switch_under_concurrent_load_fails_no_request(
    bundles: dict[int, Path], rows: np.ndarray
) -> None:
    core = ServingCore(seed=1)
    core.set_model("digits", [(1, 1.0, False)], {1: bundles[1]})
    stop = threading.Event()
    failures: list[BaseException] = []
    versions: list[set[int]] = []

    def hammer(i: int) -> None:
        seen: set[int] = set()
        n = 0
        while not stop.is_set() or n < 50:
            try:
                result = core.infer("digits", rows[i % 5:i % 5 + 1 + i % 2],
                                    request_id=f"t{i}-{n}", routing_key=f"k{n}")
                assert result.outputs.shape == (1 + i % 2, 10)
                seen.add(result.version)
            except BaseException as exc:  # any failure fails the test
                failures.append(exc)
                return
            n += 1
        versions.append(seen)

    threads = [threading.Thread(target=hammer, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    plans: list[list[tuple[int, float, bool]]] = [
        [(2, 1.0, False)], [(1, 0.5, False), (2, 0.5, False)], [(1, 1.0, False), (2, 0.0, True)],
        [(1, 1.0, False)],
    ]
    for i in range(16):
        arms = plans[i % len(plans)]
        core.set_model("digits", arms, {v: bundles[v] for v, _, _ in arms})
    stop.set()
    for t in threads:
        t.join(30)
    core.close()
    assert not failures, failures[:3]
    assert set().union(*versions) == {1, 2}


def test_hooks_see_predictions_off_the_request_path_and_results_inline(
    bundles: dict[int, Path], rows: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[tuple[str, int, np.ndarray, np.ndarray]] = []
    results: list[tuple[str, int, bool, float]] = []
    core = ServingCore(on_prediction=lambda *a: seen.append(a),
                       on_result=lambda *a: results.append(a))
    core.set_model("digits", [(1, 1.0, False)], {1: bundles[1]})
    expected = onnx_session(bundles[1] / "model.onnx").run(None, {"input": rows})[0]
    x = rows.copy()
    core.infer("digits", x[:2])
    core.infer("digits", x[2:])
    x[:] = -1  # the caller reuses its buffer: the hook must still see what was served
    assert core.flush(10)
    got_rows = np.concatenate([a[2] for a in seen])
    got_classes = np.concatenate([a[3] for a in seen])
    np.testing.assert_array_equal(got_rows, rows)
    np.testing.assert_array_equal(got_classes, expected.argmax(1))
    assert [(m, v, ok) for m, v, ok, _ in results] == [("digits", 1, True)] * 2

    runtime = core._models["digits"].runtimes[1]  # a runtime that breaks

    def broken(x: np.ndarray) -> np.ndarray:
        raise RuntimeError("boom")

    monkeypatch.setattr(runtime, "predict", broken)
    with pytest.raises(InferenceError, match="boom"):
        core.infer("digits", rows[:1])
    assert results[-1][:3] == ("digits", 1, False)
    assert core.stats()["models"]["digits"]["arms"]["1"]["errors"] == 1
    core.close()


def test_core_refuses_bad_input_and_unknown_models(bundles: dict[int, Path],
                                                   rows: np.ndarray) -> None:
    core = ServingCore()
    core.set_model("digits", [(1, 1.0, False)], {1: bundles[1]})
    with pytest.raises(ModelNotFoundError):
        core.infer("nope", rows)
    with pytest.raises(ModelNotFoundError):
        core.infer("digits", rows, version=7)
    for bad in (rows.astype(np.float64), rows[:, :10], rows[0], rows[:0], rows.tolist()):
        with pytest.raises(BadRequestError):
            core.infer("digits", bad)
    assert core.stats()["models"]["digits"]["bad_requests"] == 5
    np.testing.assert_array_equal(core.infer("digits", np.asfortranarray(rows)).outputs,
                                  core.infer("digits", rows).outputs)
    with pytest.raises(Exception, match="v2"):  # a manifest naming another version
        core.set_model("digits", [(2, 1.0, False)], {2: bundles[1]})
    assert core.ready("digits", 1)  # the failed swap left the old model serving
    core.close()


def test_load_runtime_prefers_onnx_unless_asked(bundles: dict[int, Path]) -> None:
    manifest = json.loads((bundles[1] / "manifest.json").read_text())
    assert load_runtime(bundles[1], manifest).kind == "onnx"
    assert converter_available() and litert_interpreter_class() is not None
    assert load_runtime(bundles[1], manifest, prefer="tflite").kind == "tflite"
    manifest["runtime"]["preferred"] = "tflite"
    assert load_runtime(bundles[1], manifest).kind == "tflite"


# ------------------------------------------------------------------ metrics, bench


def test_metrics_expose_per_arm_counters_in_prometheus_text(
    serve: Callable[..., Served], rows: np.ndarray
) -> None:
    s = serve([(1, 1.0, False), (2, 0.0, True)])
    s.metrics.add_gauge("edgefleet_agent_outbox_depth", "Records waiting", lambda: 7.0)
    s.metrics.add_gauge("edgefleet_agent_drift_score", "PSI per model",
                        lambda: {("digits",): 0.25}, labelnames=["model"])
    for _ in range(3):
        s.infer(rows[:1])
    s.infer(rows[:1], path="/v2/models/digits/versions/2/infer")
    s.http.post("/v2/models/digits/infer", content=b"{")
    assert s.core.flush(10)
    response = s.http.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text) for sample in family.samples
    }

    def value(name: str, **labels: str) -> float:
        return samples[(name, tuple(sorted(labels.items())))]

    assert value("edgefleet_serving_requests_total", model="digits", version="1",
                 role="primary") == 3
    assert value("edgefleet_serving_requests_total", model="digits", version="2",
                 role="shadow") == 4  # 3 mirrored + 1 asked for by version
    assert value("edgefleet_serving_latency_seconds_count", model="digits", version="1",
                 role="primary") == 3
    assert value("edgefleet_serving_bad_requests_total", model="digits") == 1
    assert value("edgefleet_agent_outbox_depth") == 7
    assert value("edgefleet_agent_drift_score", model="digits") == 0.25


def test_bench_inprocess_reports_both_sides(bundles: dict[int, Path]) -> None:
    result = bench_inprocess(bundles[1], n=200)
    assert result["raw_p50_us"] > 0 and result["core_p50_us"] > 0
    assert set(result) >= {"overhead_us", "ratio", "core_hooks_p50_us"}


def test_slow_models_run_on_the_thread_pool_not_the_event_loop(
    bundles: dict[int, Path], rows: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(core_module, "INLINE_MAX_S", 0.0)  # every model counts as slow
    threads: list[str] = []
    core = ServingCore(on_result=lambda *_: threads.append(threading.current_thread().name))
    core.set_model("digits", [(1, 1.0, False)], {1: bundles[1]})
    loop = LoopThread()
    served, stop = _start(loop, core)
    try:
        expected = onnx_session(bundles[1] / "model.onnx").run(None, {"input": rows})[0]
        np.testing.assert_array_equal(_http_outputs(served.infer(rows)), expected)
        response = served.grpc.ModelInfer(_grpc_request(rows, raw=True))
        np.testing.assert_array_equal(_grpc_outputs(response), expected)
        assert len(threads) == 2 and all(t.startswith("serving") for t in threads), threads
    finally:
        stop()
        loop.close()


def test_manifest_thread_count_is_honoured_and_clamped(bundles: dict[int, Path]) -> None:
    manifest = json.loads((bundles[1] / "manifest.json").read_text())
    cores = os.cpu_count() or 1
    for asked, used in ((2, min(2, cores)), (10_000, cores), (0, 1), ("two", 1)):
        manifest["runtime"]["onnx"]["intra_op_num_threads"] = asked
        runtime = load_runtime(bundles[1], manifest)
        assert isinstance(runtime, OnnxRuntime) and runtime.threads == used
        assert runtime.predict(np.zeros((1, 64), np.float32)).shape == (1, 10)
