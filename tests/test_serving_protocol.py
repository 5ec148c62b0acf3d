"""The Open Inference Protocol as clients users know speak it (issue 19), against a real agent:
a real control plane rolls out a real signed ONNX bundle, and the agent's own HTTP and gRPC
listeners answer.

* ``tritonclient.http`` and ``tritonclient.grpc`` with their default settings (binary tensor
  data over HTTP both ways, raw contents over gRPC), in a process of their own
  (``tests/triton_probe.py`` says why);
* the binary data extension's parser against hostile bodies: every refusal a one-line 400
  that changes no arm's counters, and the next request is served;
* the statistics and repository endpoints.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from sklearn.datasets import load_digits

from edge_agent.serving import ServingCore
from edge_agent.serving.limits import MAX_BODY_BYTES
from edge_agent.serving.repository import EXTENSIONS
from tests.support import WAIT, LoopThread, RunningAgent, start_agent, start_control_plane
from tests.test_delivery import _bundle_for, _committed, _fleet, _wait_models

REPO = Path(__file__).resolve().parent.parent
INFER = "/v2/models/digits/infer"


@dataclass
class Agent:
    agent: RunningAgent
    port: int
    grpc_port: int
    rows: np.ndarray

    @property
    def core(self) -> ServingCore:
        return self.agent.agent.supervisor.core

    def expected(self, x: np.ndarray) -> np.ndarray:
        """What the served version answers for ``x`` (the runtime itself, no request)."""
        runtime = self.core._model("digits").runtimes[1]
        return runtime.predict(np.ascontiguousarray(x, dtype=np.float32))

    def arm(self) -> dict[str, Any]:
        return dict(self.core.stats()["models"]["digits"]["arms"]["1"])


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, trained_bundle: Path) -> Iterator[Agent]:
    base = tmp_path_factory.mktemp("protocol")
    loop = LoopThread()
    cp = start_control_plane(base / "cp", loop)
    bundle = _bundle_for(cp, trained_bundle, base / "v1", version=1)
    assert _fleet(cp, "models", "publish", str(bundle)) == 0
    cp.enroll_agent(base / "a")
    agent = start_agent(base / "a", loop, probation_seconds=0.0)
    try:
        ports = agent.wait_for("serving")
        assert _fleet(cp, "rollouts", "start", "--model", "digits", "--version", "1") == 0
        _wait_models(agent, _committed(1))
        yield Agent(agent, ports["http_port"], ports["grpc_port"],
                    load_digits().data[:4].astype(np.float32))
    finally:
        agent.stop()
        cp.stop()
        loop.close()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def client(served: Agent) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=f"http://127.0.0.1:{served.port}", timeout=WAIT) as c:
        yield c


def _binary_body(x: np.ndarray, **extra: Any) -> tuple[bytes, dict[str, str]]:
    data = x.astype("<f4").tobytes()
    head = json.dumps({"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                                   "parameters": {"binary_data_size": len(data)}}],
                       **extra}).encode()
    return head + data, {"inference-header-content-length": str(len(head))}


def _binary_outputs(response: httpx.Response) -> tuple[dict[str, Any], np.ndarray]:
    assert response.status_code == 200, response.text
    length = int(response.headers["inference-header-content-length"])
    head = json.loads(response.content[:length])
    out = head["outputs"][0]
    size = out["parameters"]["binary_data_size"]
    assert "data" not in out and len(response.content) == length + size
    return head, np.frombuffer(response.content[length:], "<f4").reshape(out["shape"])


# ------------------------------------------------------------------ tritonclient


@pytest.mark.slow
def test_tritonclient_with_its_defaults_is_served_over_http_and_grpc(
    served: Agent, tmp_path: Path
) -> None:
    rows = tmp_path / "rows.npy"
    np.save(rows, served.rows)
    run = subprocess.run([sys.executable, "-m", "tests.triton_probe", str(served.port),
                          str(served.grpc_port), "digits", str(rows)],
                         capture_output=True, text=True, cwd=REPO, timeout=120, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    probe = json.loads(run.stdout)
    expected = served.expected(served.rows)
    http, grpc = probe["http"], probe["grpc"]
    for side in (http, grpc):
        assert side["live"] and side["ready"]
        assert side["server"]["extensions"] == list(EXTENSIONS)
        assert side["model"]["inputs"][0]["name"] == "input"
    # The client's defaults: binary input, binary output (binary_data_output).
    for key in ("default", "requested_binary", "json"):
        np.testing.assert_allclose(np.array(http[key], np.float32), expected, rtol=1e-6)
    assert http["default_response"]["outputs"][0]["parameters"] == {
        "binary_data_size": expected.size * 4}
    assert http["requested_binary_response"]["id"] == "probe-1"
    assert "data" in http["json_response"]["outputs"][0]
    assert "no-such-model" in http["unknown_model"]
    for key in ("default", "requested"):
        np.testing.assert_allclose(np.array(grpc[key], np.float32), expected, rtol=1e-6)
    assert grpc["requested_response"]["id"] == "probe-2"
    assert grpc["unknown_model"] == "StatusCode.NOT_FOUND"
    stats = http["statistics"]["model_stats"]
    assert [(s["name"], s["version"]) for s in stats] == [("digits", "1")]
    assert stats[0]["inference_count"] >= 3 * len(served.rows)
    assert http["index"] == [{"name": "digits", "version": "1", "state": "READY"}]


# ------------------------------------------------------------------ binary data, by hand


def test_binary_requests_route_count_and_take_feedback_like_json_ones(
    served: Agent, client: httpx.Client
) -> None:
    x = served.rows[:2]
    before = served.arm()
    body, headers = _binary_body(x, id="bin-1", parameters={"routing_key": "k",
                                                             "binary_data_output": True})
    head, out = _binary_outputs(client.post(INFER, content=body, headers=headers))
    np.testing.assert_allclose(out, served.expected(x), rtol=1e-6)
    assert head["id"] == "bin-1" and head["model_version"] == "1"
    assert client.post("/v2/models/digits/feedback",
                       json={"id": "bin-1", "label": [0, 1]}).status_code == 200
    after = served.arm()
    assert after["requests"] == before["requests"] + 1
    assert after["rows"] == before["rows"] + 2
    assert after["feedback_rows"] == before["feedback_rows"] + 2
    # Binary in, JSON out (no binary output asked for), and JSON in, binary out.
    body, headers = _binary_body(x)
    r = client.post(INFER, content=body, headers=headers)
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    np.testing.assert_allclose(np.array(r.json()["outputs"][0]["data"], np.float32).reshape(
        2, -1), served.expected(x), rtol=1e-6)
    doc = {"inputs": [{"name": "input", "shape": [2, 64], "datatype": "FP32",
                       "data": x.ravel().tolist()}],
           "outputs": [{"name": "probabilities", "parameters": {"binary_data": True}}]}
    _, out = _binary_outputs(client.post(INFER, json=doc))
    np.testing.assert_allclose(out, served.expected(x), rtol=1e-6)


def _hostile(x: np.ndarray) -> list[tuple[str, bytes, dict[str, str], str]]:
    """(case, body, headers, what the 400 says) for the binary parser."""
    good, headers = _binary_body(x)
    length = int(headers["inference-header-content-length"])
    head, data = good[:length], good[length:]

    def header(value: str) -> dict[str, str]:
        return {"inference-header-content-length": value}

    def tensor(**params: Any) -> bytes:
        t = {"name": "input", "shape": list(x.shape), "datatype": "FP32", "parameters": params}
        return json.dumps({"inputs": [t]}).encode()

    def with_head(doc: bytes, binary: bytes) -> tuple[bytes, dict[str, str]]:
        return doc + binary, header(str(len(doc)))

    nan = np.full_like(x, np.nan).astype("<f4").tobytes()
    return [
        ("header past the body", good, header(str(len(good) + 1)), "only"),
        ("header far past the body", good, header("9" * 10), "only"),
        ("header huge", good, header("9" * 40), "non-negative integer"),
        ("header negative", good, header("-5"), "non-negative integer"),
        ("header not a number", good, header("twelve"), "non-negative integer"),
        ("header cuts the JSON", good, header(str(length - 3)), "not valid JSON"),
        ("header zero", good, header("0"), "not valid JSON"),
        ("size vs shape", *with_head(tensor(binary_data_size=len(data) // 2),
                                     data[:len(data) // 2]), "takes"),
        ("size huge", *with_head(tensor(binary_data_size=2**62), data), "takes"),
        ("size negative", *with_head(tensor(binary_data_size=-4), data), "non-negative"),
        ("size a boolean", *with_head(tensor(binary_data_size=True), data), "non-negative"),
        ("size a string", *with_head(tensor(binary_data_size="256"), data), "non-negative"),
        ("bytes missing", head + data[:-4], headers, "has"),
        ("bytes left over", head + data + b"\0\0\0\0", headers, "declare"),
        ("no header", good, {}, "body is not"),
        ("size but no binary part", head, {}, "no binary part"),
        ("data and size", *with_head(json.dumps({"inputs": [{
            "name": "input", "shape": list(x.shape), "datatype": "FP32",
            "data": x.ravel().tolist(), "parameters": {"binary_data_size": len(data)}}]}
        ).encode(), data), "not both"),
        ("bytes after a JSON tensor", *with_head(json.dumps({"inputs": [{
            "name": "input", "shape": list(x.shape), "datatype": "FP32",
            "data": x.ravel().tolist()}]}).encode(), data), "declare 0"),
        ("parameters not an object", *with_head(json.dumps({"inputs": [{
            "name": "input", "shape": list(x.shape), "datatype": "FP32",
            "parameters": [1]}]}).encode(), data), "'parameters'"),
        ("binary_data_output not a boolean", *with_head(
            json.dumps({**json.loads(head), "parameters": {"binary_data_output": "yes"}}
                       ).encode(), data), "true or false"),
        ("binary_data not a boolean", *with_head(
            json.dumps({**json.loads(head), "outputs": [
                {"name": "probabilities", "parameters": {"binary_data": 1}}]}).encode(), data),
         "true or false"),
        ("NaN in the bytes", head + nan, headers, "finite"),
        ("FP64 bytes", *with_head(json.dumps({"inputs": [{
            "name": "input", "shape": list(x.shape), "datatype": "FP64",
            "parameters": {"binary_data_size": len(data) * 2}}]}).encode(),
            x.astype("<f8").tobytes()), "FP32"),
    ]


def test_hostile_binary_bodies_are_a_one_line_400_and_change_nothing(
    served: Agent, client: httpx.Client
) -> None:
    x = served.rows[:1]
    for case, body, headers, needle in _hostile(x):
        before = served.arm()
        bad_before = served.core.stats()["models"]["digits"]["bad_requests"]
        r = client.post(INFER, content=body, headers=headers)
        assert r.status_code == 400, (case, r.text)
        assert "\n" not in r.text.strip() and len(r.text) < 400, (case, r.text)
        assert needle in r.json()["error"], (case, r.text)
        assert served.arm()["requests"] == before["requests"], case
        assert served.core.stats()["models"]["digits"]["bad_requests"] == bad_before + 1, case
        good, good_headers = _binary_body(x)
        r = client.post(INFER, content=good, headers=good_headers)
        assert r.status_code == 200, (case, r.text)


def test_a_binary_body_over_the_limit_is_a_413(served: Agent, client: httpx.Client) -> None:
    x = np.zeros((MAX_BODY_BYTES // 256 + 1, 64), np.float32)
    body, headers = _binary_body(x)
    r = client.post(INFER, content=body, headers=headers)
    assert r.status_code == 413 and "limit" in r.json()["error"]
    good, good_headers = _binary_body(served.rows[:1])
    assert client.post(INFER, content=good, headers=good_headers).status_code == 200


# ------------------------------------------------------------------ statistics, repository


def test_statistics_and_repository_endpoints(served: Agent, client: httpx.Client) -> None:
    body, headers = _binary_body(served.rows[:3])
    assert client.post(INFER, content=body, headers=headers).status_code == 200
    arm = served.arm()
    for path in ("/v2/models/stats", "/v2/models/digits/stats",
                 "/v2/models/digits/versions/1/stats"):
        stats = client.get(path).json()["model_stats"]
        assert len(stats) == 1 and stats[0]["name"] == "digits", path
        assert stats[0]["inference_count"] == arm["rows"]
        assert stats[0]["execution_count"] == arm["executions"]
        ok = arm["requests"] - arm["errors"]
        assert stats[0]["inference_stats"]["success"]["count"] == ok
    assert client.get("/v2/models/digits/versions/7/stats").status_code == 404
    assert client.get("/v2/models/nope/stats").status_code == 404
    assert client.post("/v2/models/stats").status_code == 405
    assert client.post("/v2/repository/index").json() == [
        {"name": "digits", "version": "1", "state": "READY"}]
    for verb in ("load", "unload"):
        r = client.post(f"/v2/repository/models/digits/{verb}")
        assert r.status_code == 403 and "control plane" in r.json()["error"]
    assert served.core.ready("digits")
