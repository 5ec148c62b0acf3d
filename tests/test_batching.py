"""Dynamic batching (issue 19): joined requests get the answers they would get alone, routed
and counted as alone (A/B arm, shadows, stats, feedback, hooks), and a batch never holds more
than ``max_batch_size`` rows. Requests are submitted together on a real event loop and a real
ONNX model; nothing waits on time (a batch with a 0 delay runs at the loop's next turn).
"""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from sklearn.datasets import load_digits

from edge_agent.serving import ServingCore, start_http
from edge_agent.serving.batching import BatchPolicy, manifest_policy, policy
from edge_agent.state import AgentConfig, StateDir
from fleetcore.errors import InvalidInputError
from tests.support import LoopThread


@pytest.fixture(scope="module")
def bundles(trained_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    base = tmp_path_factory.mktemp("batching")
    out = {}
    for version in (1, 2, 3):
        dest = base / f"v{version}"
        shutil.copytree(trained_bundle, dest)
        # fp32: a dynamically quantized model's answer depends on the rows it shares a batch
        # with (its input scale is computed per call), so joined answers would differ slightly.
        shutil.copyfile(trained_bundle.parent / "compress" / "fp32.onnx", dest / "model.onnx")
        manifest = json.loads((dest / "manifest.json").read_text())
        manifest["version"] = version
        (dest / "manifest.json").write_text(json.dumps(manifest))
        out[version] = dest
    return out


@pytest.fixture
def loop() -> Iterator[LoopThread]:
    thread = LoopThread()
    yield thread
    thread.close()


ROWS = load_digits().data.astype(np.float32)


class _Calls:
    """Wraps a runtime's ``predict`` to record the batch sizes it was called with."""

    def __init__(self, core: ServingCore, version: int) -> None:
        self.sizes: list[int] = []
        runtime = core._model("digits").runtimes[version]
        inner = runtime.predict

        def predict(x: np.ndarray) -> np.ndarray:
            self.sizes.append(len(x))
            return inner(x)

        runtime.predict = predict  # type: ignore[method-assign]
        self.alone = inner


def _core(bundles: dict[int, Path], arms: list[tuple[int, float, bool]],
          **hooks: Any) -> ServingCore:
    core = ServingCore(seed=0, **hooks)
    core.set_model("digits", arms, {v: bundles[v] for v, _, _ in arms})
    return core


def test_joined_requests_get_their_own_answers_and_counts(
    bundles: dict[int, Path], loop: LoopThread
) -> None:
    seen: list[tuple[str, int, int]] = []
    results: list[tuple[str, int, bool]] = []
    core = _core(bundles, [(1, 1.0, False)],
                 on_prediction=lambda m, v, rows, classes: seen.append((m, v, len(rows))),
                 on_result=lambda m, v, ok, latency: results.append((m, v, ok)))
    core.set_batching("digits", policy(8, 0))
    calls = _Calls(core, 1)
    sizes = [1, 2, 1, 3, 1, 1, 2, 1, 1, 1, 2, 1]  # 17 rows
    starts = np.cumsum([0, *sizes])
    parts = [ROWS[starts[i]:starts[i + 1]] for i in range(len(sizes))]

    async def all_at_once() -> list[Any]:
        return await asyncio.gather(*(core.ainfer("digits", x, request_id=f"r{i}")
                                      for i, x in enumerate(parts)))

    answers = loop.run(all_at_once())
    for x, answer in zip(parts, answers, strict=True):
        assert answer.version == 1 and answer.outputs.shape == (len(x), 10)
        np.testing.assert_allclose(answer.outputs, calls.alone(x), rtol=1e-5, atol=1e-6)
    assert max(calls.sizes) <= 8 and sum(calls.sizes) == 17 and len(calls.sizes) < len(sizes)
    arm = core.stats()["models"]["digits"]["arms"]["1"]
    assert (arm["requests"], arm["rows"], arm["executions"]) == (12, 17, len(calls.sizes))
    assert len(results) == 12 and all(ok for _, _, ok in results)
    # Feedback scores every request of a batch; the hook saw every row.
    for i, x in enumerate(parts):
        assert core.feedback("digits", f"r{i}", [0] * len(x))
    assert core.stats()["models"]["digits"]["arms"]["1"]["feedback_rows"] == 17
    assert core.flush(30)
    assert sum(n for _, _, n in seen) == 17
    core.close()


def test_routing_and_shadows_are_those_of_each_request(
    bundles: dict[int, Path], loop: LoopThread
) -> None:
    arms = [(1, 0.5, False), (2, 0.5, False), (3, 0.0, True)]
    batched, alone = _core(bundles, arms), _core(bundles, arms)
    batched.set_batching("digits", policy(16, 0))
    keys = [f"customer-{i}" for i in range(40)]

    async def all_at_once(core: ServingCore) -> list[Any]:
        return await asyncio.gather(*(core.ainfer("digits", ROWS[i:i + 1], routing_key=k,
                                                  request_id=k) for i, k in enumerate(keys)))

    got = loop.run(all_at_once(batched))
    want = [alone.infer("digits", ROWS[i:i + 1], routing_key=k) for i, k in enumerate(keys)]
    assert [g.version for g in got] == [w.version for w in want]
    assert {g.version for g in got} == {1, 2}  # both arms were chosen
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g.outputs, w.outputs, rtol=1e-5, atol=1e-6)
    assert batched.flush(30)
    stats = batched.stats()["models"]["digits"]["arms"]
    assert stats["1"]["requests"] + stats["2"]["requests"] == 40
    assert stats["3"]["requests"] == 40  # the shadow answered a copy of each request
    assert stats["1"]["executions"] + stats["2"]["executions"] < 40
    # A versioned request is batched with its version only, and is not mirrored.
    answer = loop.run(batched.ainfer("digits", ROWS[:1], version=2))
    assert answer.version == 2
    batched.close()
    alone.close()


def test_big_requests_bypass_and_a_full_batch_runs_at_once(
    bundles: dict[int, Path], loop: LoopThread
) -> None:
    core = _core(bundles, [(1, 1.0, False)])
    core.set_batching("digits", policy(4, 10_000_000 // 10))  # 1 s delay: only fullness sends
    calls = _Calls(core, 1)

    async def run() -> list[Any]:
        big = core.ainfer("digits", ROWS[:6])  # >= max_batch_size: alone, at once
        four = [core.ainfer("digits", ROWS[i:i + 1]) for i in range(4)]  # fills one batch
        return await asyncio.gather(big, *four)

    answers = loop.run(run(), timeout=5)  # well before the 1 s delay would have sent it
    assert [a.outputs.shape[0] for a in answers] == [6, 1, 1, 1, 1]
    assert sorted(calls.sizes) == [4, 6]
    core.close()


def test_batching_over_http_gives_each_client_its_answer(
    bundles: dict[int, Path], loop: LoopThread
) -> None:
    core = _core(bundles, [(1, 1.0, False)])
    core.set_batching("digits", policy(32, 2000))
    calls = _Calls(core, 1)
    server, port = loop.run(start_http(core, "127.0.0.1", 0))

    async def clients() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as c:
            return await asyncio.gather(*(c.post("/v2/models/digits/infer", json={
                "id": f"h{i}", "inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32",
                                           "data": ROWS[i].tolist()}]}) for i in range(24)))

    try:
        responses = asyncio.run(clients())
    finally:
        loop.run(server.stop())
    for i, r in enumerate(responses):
        assert r.status_code == 200, r.text
        out = np.array(r.json()["outputs"][0]["data"], np.float32)
        np.testing.assert_allclose(out, calls.alone(ROWS[i:i + 1])[0], rtol=1e-5, atol=1e-6)
        assert r.json()["id"] == f"h{i}"
    assert sum(calls.sizes) == 24
    core.close()


def test_policies_from_manifest_and_config_are_checked(
    bundles: dict[int, Path], tmp_path: Path
) -> None:
    assert manifest_policy({"runtime": {"batching": {"max_batch_size": 16,
                                                     "max_queue_delay_us": 300}}}) == \
        BatchPolicy(16, 300e-6)
    assert manifest_policy({"runtime": {}}) is None
    for bad in ({"max_batch_size": 1}, {"max_batch_size": True}, {"max_batch_size": 10**6},
                {"max_batch_size": 8, "max_queue_delay_us": -1}, {"max_queue_delay_us": 5}):
        assert manifest_policy({"runtime": {"batching": bad}}) is None  # ignored, logged
        with pytest.raises(InvalidInputError, match="batching"):
            policy(bad.get("max_batch_size"), bad.get("max_queue_delay_us", 0))
    # The manifest's hint turns it on for a model; off by default.
    dest = tmp_path / "hinted"
    shutil.copytree(bundles[1], dest)
    manifest = json.loads((dest / "manifest.json").read_text())
    manifest.setdefault("runtime", {})["batching"] = {"max_batch_size": 8}
    (dest / "manifest.json").write_text(json.dumps(manifest))
    core = ServingCore()
    core.set_model("digits", [(1, 1.0, False)], {1: dest})
    assert core._model("digits").batching == BatchPolicy(8, 0.0)
    core.set_model("digits", [(1, 1.0, False)], {1: bundles[1]})
    assert core._model("digits").batching is None
    core.close()
    # agent.toml: [batching.MODEL]
    state = StateDir(tmp_path / "agent")
    state.root.mkdir()
    cfg = AgentConfig(device_id="d", api_address="127.0.0.1:1")
    cfg.batching = {"digits": {"max_batch_size": 32, "max_queue_delay_us": 500}}
    cfg.save(state)
    state.cert.write_bytes(b"x")  # what is_enrolled looks for
    state.key.write_bytes(b"x")
    assert AgentConfig.load(state).batching == cfg.batching
    cfg.batching = {"digits": {"max_batch_size": "many"}}  # type: ignore[dict-item]
    cfg.save(state)
    with pytest.raises(InvalidInputError, match="batching"):
        AgentConfig.load(state)
