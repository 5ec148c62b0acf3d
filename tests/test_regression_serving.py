"""A regression model on the agent: served over HTTP and gRPC by both runtimes with the
estimator's own answers, numeric feedback (and its refusals), error sums per arm, the smoke
test's absolute tolerance, and drift of the predicted value."""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
from edgefleet.v1 import grpc_predict_v2_pb2 as pb
from edgefleet.v1 import grpc_predict_v2_pb2_grpc as pb_grpc
from prometheus_client.parser import text_string_to_metric_families

from edge_agent.install.smoke import run_smoke_isolated
from edge_agent.reporting.drift import DriftConfig, DriftMonitor, parse_profile
from edge_agent.serving import ServingCore, start_grpc, start_http
from edge_agent.serving.errors import BadRequestError
from fleetcore import pki
from fleetcore.bundle import parse_manifest
from fleetcore.errors import InvalidInputError
from tests.regression_support import RegressionBundle, regression_bundle
from tests.support import LoopThread


@pytest.fixture(scope="module")
def key(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("key") / "publisher.key"
    path.write_bytes(pki.private_key_pem(pki.generate_key()))
    return path


@pytest.fixture(scope="module")
def diabetes(tmp_path_factory: pytest.TempPathFactory, key: Path) -> RegressionBundle:
    return regression_bundle(tmp_path_factory.mktemp("reg") / "v1", key, tflite=True)


class Served:
    def __init__(self, bundle: RegressionBundle, prefer: str) -> None:
        self.loop = LoopThread()
        self.core = ServingCore(seed=0)
        self.core.set_model("diabetes", [(1, 1.0, False)], {1: bundle.path}, prefer=prefer)

        async def up() -> tuple[Any, int, Any, int]:
            http, http_port = await start_http(self.core, "127.0.0.1", 0)
            server, grpc_port = await start_grpc(self.core, "127.0.0.1", 0)
            return http, http_port, server, grpc_port

        self.http_server, http_port, self.grpc_server, grpc_port = self.loop.run(up())
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{http_port}", timeout=10)
        self.channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}")
        self.grpc = pb_grpc.GRPCInferenceServiceStub(self.channel)

    def infer(self, x: np.ndarray, **extra: Any) -> httpx.Response:
        body = {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                            "data": x.tolist()}], **extra}
        return self.http.post("/v2/models/diabetes/infer", json=body)

    def feedback(self, body: Any) -> httpx.Response:
        return self.http.post("/v2/models/diabetes/feedback", json=body)

    def stop(self) -> None:
        self.http.close()
        self.channel.close()
        self.loop.run(self.http_server.stop())
        self.loop.run(self.grpc_server.stop(0))
        self.core.close()
        self.loop.close()


@pytest.fixture(params=["onnx", "tflite"])
def served(request: pytest.FixtureRequest, diabetes: RegressionBundle) -> Iterator[Served]:
    s = Served(diabetes, request.param)
    yield s
    s.stop()


def test_both_protocols_and_runtimes_answer_what_sklearn_predicts(
        served: Served, diabetes: RegressionBundle) -> None:
    x = diabetes.X_test[:70]  # a full LiteRT batch of 64 and six single rows
    expected = diabetes.model.predict(x)
    response = served.infer(x)
    assert response.status_code == 200, response.text
    out = response.json()["outputs"][0]
    assert (out["name"], out["datatype"], out["shape"]) == ("prediction", "FP32", [70, 1])
    np.testing.assert_allclose(np.array(out["data"]), expected, rtol=1e-5, atol=1e-3)
    for raw in (False, True):
        request = pb.ModelInferRequest(model_name="diabetes")
        tensor = request.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
        if raw:
            request.raw_input_contents.append(x.astype("<f4").tobytes())
        else:
            tensor.contents.fp32_contents.extend(x.ravel().tolist())
        reply = served.grpc.ModelInfer(request, timeout=10)
        assert (reply.outputs[0].name, list(reply.outputs[0].shape)) == ("prediction", [70, 1])
        got = (np.frombuffer(reply.raw_output_contents[0], "<f4") if raw
               else np.array(reply.outputs[0].contents.fp32_contents))
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-3)
    meta = served.http.get("/v2/models/diabetes").json()
    assert meta["outputs"] == [{"name": "prediction", "datatype": "FP32", "shape": [-1, 1]}]
    assert meta["task"] == "regression" and meta["labels"] == []


def test_numeric_feedback_sums_absolute_and_squared_errors(
        served: Served, diabetes: RegressionBundle) -> None:
    x, y = diabetes.X_test[:6], diabetes.y_test[:6]
    predicted = [float(v) for v in np.array(served.infer(x[:5], id="b").json()
                                            ["outputs"][0]["data"])]
    one = served.infer(x[5:6], id="one").json()["outputs"][0]["data"][0]
    assert served.feedback({"id": "b", "label": [float(v) for v in y[:5]]}).status_code == 200
    assert served.feedback({"id": "one", "label": int(y[5])}).status_code == 200  # an int too
    errors = [p - t for p, t in zip([*predicted, one], [*y[:5], int(y[5])], strict=True)]
    arm = served.core.stats()["models"]["diabetes"]["arms"]["1"]
    assert arm["feedback_rows"] == 6 and arm["feedback_correct"] == 0
    assert arm["accuracy"] is None
    assert arm["feedback_abs_error_sum"] == pytest.approx(sum(abs(e) for e in errors))
    assert arm["feedback_sq_error_sum"] == pytest.approx(sum(e * e for e in errors))
    assert arm["mae"] == pytest.approx(sum(abs(e) for e in errors) / 6)
    assert served.feedback({"id": "one", "label": 1.0}).status_code == 404  # scored once
    families = {f.name: f for f in text_string_to_metric_families(
        served.http.get("/metrics").text)}
    (sample,) = [s for s in families["edgefleet_serving_feedback_abs_error"].samples
                 if s.name.endswith("_total")]
    assert sample.value == pytest.approx(sum(abs(e) for e in errors))


@pytest.mark.parametrize("body", [
    b'{"id": "r", "label": true}',
    b'{"id": "r", "label": "151.0"}',
    b'{"id": "r", "label": [1.0, "x"]}',
    b'{"id": "r", "label": [false]}',
    b'{"id": "r", "label": 1e999}',
    b'{"id": "r", "label": -1e999}',
    b'{"id": "r", "label": NaN}',
    b'{"id": "r", "label": Infinity}',
    b'{"id": "r", "label": 1e200}',
    b'{"id": "r", "label": {"v": 1}}',
    b'{"id": "r", "label": null}',
    b'{"id": "r", "label": []}',
    b'{"id": "r", "label": [1.0, 2.0]}',
])
def test_hostile_regression_labels_get_a_one_line_400_and_change_nothing(
        served: Served, diabetes: RegressionBundle, body: bytes) -> None:
    assert served.infer(diabetes.X_test[:1], id="r").status_code == 200
    response = served.http.post("/v2/models/diabetes/feedback", content=body,
                                headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    assert "\n" not in response.json()["error"]
    arm = served.core.stats()["models"]["diabetes"]["arms"]["1"]
    assert arm["feedback_rows"] == 0 and arm["feedback_abs_error_sum"] == 0
    assert served.feedback({"id": "r", "label": 100.5}).status_code == 200  # still waiting


def test_core_feedback_refuses_non_finite_labels(diabetes: RegressionBundle) -> None:
    core = ServingCore(seed=0)
    try:
        core.set_model("diabetes", [(1, 1.0, False)], {1: diabetes.path})
        core.infer("diabetes", diabetes.X_test[:1], request_id="q")
        for bad in (math.nan, math.inf, -math.inf, True, "1", None, [math.nan]):
            with pytest.raises(BadRequestError):
                core.feedback("diabetes", "q", bad)  # type: ignore[arg-type]
        assert core.feedback("diabetes", "q", 3)
    finally:
        core.close()


def test_arms_of_different_tasks_cannot_share_a_model(
        diabetes: RegressionBundle, trained_bundle: Path, tmp_path: Path) -> None:
    digits = tmp_path / "digits"
    shutil.copytree(trained_bundle, digits)
    doc = json.loads((digits / "manifest.json").read_text())
    doc["name"], doc["version"] = "diabetes", 2
    (digits / "manifest.json").write_text(json.dumps(doc))
    core = ServingCore()
    try:
        with pytest.raises(InvalidInputError, match="same task"):
            core.set_model("diabetes", [(1, 0.5, False), (2, 0.5, False)],
                           {1: diabetes.path, 2: digits})
    finally:
        core.close()


def test_regression_manifest_checks(diabetes: RegressionBundle) -> None:
    doc = json.loads((diabetes.path / "manifest.json").read_text())
    assert parse_manifest(json.dumps(doc).encode())["task"] == "regression"
    for change in ({"task": "ranking"}, {"output": {**doc["output"], "kind": "probabilities"}},
                   {"output": {**doc["output"], "name": ""}}):
        with pytest.raises(InvalidInputError):
            parse_manifest(json.dumps({**doc, **change}).encode())


def test_smoke_test_uses_the_absolute_tolerance(diabetes: RegressionBundle,
                                                tmp_path: Path) -> None:
    manifest = json.loads((diabetes.path / "manifest.json").read_text())
    assert run_smoke_isolated(diabetes.path, manifest).ok
    spec = manifest["smoke_test"]
    assert spec["require_same_argmax"] is False and spec["atol"] >= 1e-3
    off = [[v[0] + 3 * spec["atol"]] for v in spec["expected"]]
    result = run_smoke_isolated(diabetes.path, {**manifest,
                                                "smoke_test": {**spec, "expected": off}})
    assert not result.ok and "differ from expected" in result.reason


def _monitor(diabetes: RegressionBundle) -> DriftMonitor:
    profile = parse_profile((diabetes.path / "profile.json").read_bytes())
    return DriftMonitor("diabetes", 1, profile, DriftConfig(window_requests=100, min_rows=100))


def test_drift_compares_the_predicted_value_with_the_profile(
        diabetes: RegressionBundle) -> None:
    x = diabetes.X_test[:100]
    predicted = diabetes.model.predict(x).astype(np.float32)
    calm = _monitor(diabetes).observe(x, predicted, 0.0)
    shifted = _monitor(diabetes).observe(x, predicted + 150.0, 0.0)
    nan = _monitor(diabetes).observe(x, np.full(100, np.nan, np.float32), 0.0)
    assert len(calm) == len(shifted) == len(nan) == 1
    assert calm[0].prediction_psi < 0.5
    assert shifted[0].prediction_psi > 2.0 and shifted[0].drifted
    assert nan[0].prediction_psi > 2.0  # NaN answers land in the bucket with share 0
    assert calm[0].feature_psi == shifted[0].feature_psi  # the same rows


@pytest.mark.parametrize("prediction", [
    {"kind": "value", "edges": [2.0, 1.0], "proportions": [0.3, 0.3, 0.4]},
    {"kind": "value", "edges": [1.0, 2.0], "proportions": [0.5, 0.5]},
    {"kind": "value", "edges": [1.0, 2.0], "proportions": [0.5, 0.5, 0.5]},
    {"kind": "value", "edges": [1.0, "x"], "proportions": [0.3, 0.3, 0.4]},
    {"kind": "value", "edges": list(np.arange(300.0)), "proportions": [1.0] + [0.0] * 300},
    {"kind": "value", "proportions": [1.0]},
    {"kind": "histogram", "edges": [1.0], "proportions": [0.5, 0.5]},
    {"kind": ["value"], "edges": [1.0], "proportions": [0.5, 0.5]},
])
def test_hostile_value_profiles_are_refused(diabetes: RegressionBundle,
                                            prediction: dict[str, Any]) -> None:
    profile = json.loads((diabetes.path / "profile.json").read_text())
    profile["prediction"] = prediction
    with pytest.raises(InvalidInputError):
        parse_profile(json.dumps(profile).encode())


def test_sampled_requests_leave_with_float_labels(diabetes: RegressionBundle) -> None:
    got: list[tuple[Any, ...]] = []
    core = ServingCore(seed=0, on_sample=lambda *a: got.append(a))
    try:
        core.set_model("diabetes", [(1, 1.0, False)], {1: diabetes.path})
        core.set_sampling("diabetes", 1.0)
        core.infer("diabetes", diabetes.X_test[:2], request_id="s")
        assert core.feedback("diabetes", "s", [151, 75.5])
        ((model, version, rows, labels, params),) = got
        assert (model, version, params) == ("diabetes", 1, {})
        assert labels == [151.0, 75.5] and all(type(v) is float for v in labels)
        np.testing.assert_array_equal(rows, diabetes.X_test[:2])
    finally:
        core.close()
