"""A model trained from the PostgreSQL example goes out to an agent through the normal
rollout, and the agent serves it from raw rows: the categorical `shop` column travels as text
(the agent encodes it with the bundle's vocabulary; an unseen shop becomes code 0) over HTTP
and gRPC, with answers equal to the model's on the encoded rows."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
from edgefleet.v1 import grpc_predict_v2_pb2 as pb
from edgefleet.v1 import grpc_predict_v2_pb2_grpc as pb_grpc

from examples.load_sql import load
from tests.ingest_support import pg_url, write_pipeline
from tests.support import RunningControlPlane, fleet_json, start_agent
from trainer.cli import main as trainer_main
from trainer.onnx_tools import run_onnx

__all__ = ["pg_url"]

REPO = Path(__file__).resolve().parent.parent


def _raw_rows(features: list[dict[str, Any]], rows: list[dict[str, Any]]) -> list[list[Any]]:
    return [[row[f["name"]] for f in features] for row in rows]


def _encoded(features: list[dict[str, Any]], raw: list[list[Any]]) -> np.ndarray:
    out = np.empty((len(raw), len(features)), dtype=np.float32)
    for i, row in enumerate(raw):
        for j, f in enumerate(features):
            cats = f.get("categories")
            out[i, j] = (cats.index(row[j]) + 1 if row[j] in cats else 0) if cats \
                else float(row[j])
    return out


@pytest.mark.slow
def test_postgres_model_rolls_out_and_serves_raw_rows(
        pg_url: str, cp: RunningControlPlane, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    load(pg_url, "wine_sales")
    example = (REPO / "examples/pipelines/wine-postgres.toml").read_text()
    assert 'source = "postgresql://root@127.0.0.1:5432/test"' in example
    pipeline = write_pipeline(tmp_path, {
        "source": pg_url, "table": "wine_sales", "watermark": "id", "timestamp": "created_at",
        "label": "cultivar", "pii": ["customer_email"], "categorical": ["shop"],
        "impute": {"*": "median"}}, bundle={"name": "wine-pg", "version": 1})
    work = tmp_path / "work"
    rc = trainer_main(["run", str(pipeline), "--workdir", str(work), "--publisher-key",
                       str(cp.home / "publisher" / "publisher.key")])
    assert rc == 0, capsys.readouterr().err
    manifest = json.loads((work / "bundle" / "manifest.json").read_text())
    features = manifest["input"]["features"]
    assert [f["name"] for f in features if "categories" in f] == ["shop"]
    assert manifest["lineage"]["ingest"]["kind"] == "sql"
    assert "root@127.0.0.1" in manifest["lineage"]["source"]

    fleet_json(cp, capsys, "models", "publish", str(work / "bundle"))
    cp.enroll_agent(tmp_path / "agent")
    agent = start_agent(tmp_path / "agent", cp.loop, probation_seconds=0.0)
    try:
        events = agent.wait_for("serving")
        fleet_json(cp, capsys, "rollouts", "start", "--model", "wine-pg", "--version", "1")
        while not any(m["name"] == "wine-pg" and m["serving"] and m["state"] == "committed"
                      for m in agent.wait_for("models")["models"]):
            pass
        rows = [dict(r, shop=r["shop"]) for r in _db_rows(pg_url, 6)]
        rows[0]["shop"] = "airport"  # a shop the model never saw
        raw = _raw_rows(features, rows)
        encoded = _encoded(features, raw)
        assert encoded[0, [f["name"] for f in features].index("shop")] == 0
        expected = run_onnx(work / "bundle" / "model.onnx", encoded)
        port = events["http_port"]
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            answer = client.post("/v2/models/wine-pg/infer", json={"inputs": [{
                "name": "input", "datatype": "BYTES", "shape": [len(raw), len(features)],
                "data": raw}]})
            assert answer.status_code == 200, answer.text
            got = np.array(answer.json()["outputs"][0]["data"]).reshape(expected.shape)
            np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
            as_codes = client.post("/v2/models/wine-pg/infer", json={"inputs": [{
                "name": "input", "datatype": "FP32", "shape": list(encoded.shape),
                "data": encoded.ravel().tolist()}]}).json()["outputs"][0]["data"]
            np.testing.assert_allclose(as_codes, got.ravel(), rtol=1e-6)
            bad = raw[1][:]
            bad[[f["name"] for f in features].index("alcohol")] = "strong"
            refused = client.post("/v2/models/wine-pg/infer", json={"inputs": [{
                "name": "input", "datatype": "BYTES", "shape": [1, len(features)],
                "data": bad}]})
            assert refused.status_code == 400 and "expected a number" in refused.text
        with grpc.insecure_channel(f"127.0.0.1:{events['grpc_port']}") as channel:
            request = pb.ModelInferRequest(model_name="wine-pg")
            tensor = request.inputs.add(name="input", datatype="BYTES",
                                        shape=[len(raw), len(features)])
            tensor.contents.bytes_contents.extend(str(v).encode() for row in raw for v in row)
            reply = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)
        got_grpc = (np.frombuffer(reply.raw_output_contents[0], "<f4")
                    if reply.raw_output_contents else reply.outputs[0].contents.fp32_contents)
        np.testing.assert_allclose(got_grpc, expected.ravel(), rtol=1e-5, atol=1e-5)
    finally:
        agent.stop()


def _db_rows(url: str, n: int) -> list[dict[str, Any]]:
    from sqlalchemy import create_engine, text  # noqa: PLC0415

    engine = create_engine(url.replace("postgresql://", "postgresql+psycopg://"))
    with engine.connect() as conn:
        rows = [dict(r) for r in conn.execute(
            text("SELECT * FROM wine_sales ORDER BY id LIMIT :n"), {"n": n}).mappings()]
    engine.dispose()
    return rows
