"""Drift-triggered retraining of a regression model, against a real control plane and a real
trainer: devices send labelled samples (numeric targets) and drift windows, the policy fires, the
trainer retrains from base data plus samples, and the paired acceptance test (Wilcoxon
signed-rank on the same held-out device rows' absolute errors) decides.

The new population: every feature moved by +0.2 (outside the training range of the diabetes
data's scaled features) and a disease progression 120 points higher. The base model, a random
forest, answers these rows as if they were the old population; one retrained on base data plus
the devices' rows learns the new region."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from edgefleet.v1 import agent_pb2
from sklearn.datasets import load_diabetes

from edge_agent.reporting.telemetry import encode
from fleet.cli import main as fleet_main
from tests.support import (
    LoopThread,
    RunningControlPlane,
    run_retrain_job,
    send_telemetry,
    start_control_plane,
)
from tests.test_delivery import _bundle_for
from trainer.config import Pipeline
from trainer.onnx_tools import run_onnx
from trainer.pipeline import Run, Workdir

pytestmark = pytest.mark.slow

PIPELINE = """
[data]
source = "sklearn:diabetes"
task = "regression"
test_fraction = 0.2
region = "eu-west"

[store]
path = "{store}"
allowed_regions = ["eu-west"]

[model]
kind = "sklearn"
estimator = "sklearn.ensemble.RandomForestRegressor"
params = {{ n_estimators = 40, max_depth = 6, random_state = 0 }}

[train]
seed = 0

[bundle]
name = "diabetes"
version = 1
"""

SHIFT_X, SHIFT_Y = 0.2, 120.0


def _shifted() -> tuple[np.ndarray, np.ndarray]:
    X, y = load_diabetes(return_X_y=True)
    return (X + SHIFT_X).astype(np.float32), y + SHIFT_Y


def _send_samples(cp: RunningControlPlane, tmp_path: Path) -> None:
    """Each device labels 150 of the shifted rows it served (rows 0..299); 300.. stay unseen."""
    X, y = _shifted()
    for k, name in enumerate(("a", "b")):
        rows = range(150 * k, 150 * (k + 1), 10)
        send_telemetry(cp.api, tmp_path / name, [
            agent_pb2.TelemetryRecord(
                seq=100 + i, kind="sample", created_at=1.0,
                payload=encode({"model": "diabetes", "version": 1,
                                "features": X[i : i + 10].tolist(),
                                "labels": [float(v) for v in y[i : i + 10]]}))
            for i in rows])


def _send_drift(cp: RunningControlPlane, tmp_path: Path, first_seq: int) -> list[str]:
    now = time.time()
    for name in ("a", "b"):
        send_telemetry(cp.api, tmp_path / name, [
            agent_pb2.TelemetryRecord(
                seq=i, kind="drift", created_at=float(i),
                payload=encode({"model": "diabetes", "version": 1, "start": now + i,
                                "end": now + i + 1.0, "rows": 200, "score": 0.8,
                                "drifted": True, "prediction_psi": 0.4,
                                "drifted_features": ["bmi"]}))
            for i in (first_seq, first_seq + 1)])
    return [j.state for j in cp.cp.store.jobs("diabetes")]


def test_drift_retrains_a_regression_model_accepted_by_the_paired_test(
    tmp_path: Path, loop: LoopThread
) -> None:
    cp = start_control_plane(tmp_path / "cp", loop, rollout_tick_seconds=3600)
    try:
        pipeline = tmp_path / "pipe" / "diabetes.toml"
        pipeline.parent.mkdir()
        pipeline.write_text(PIPELINE.format(store=tmp_path / "store"))
        Run(Pipeline.load(pipeline), Workdir(tmp_path / "v1w"), progress=lambda m: None,
            publisher_key=cp.home / "publisher" / "publisher.key").run_all()
        v1 = _bundle_for(cp, tmp_path / "v1w" / "bundle", tmp_path / "v1", version=1)
        admin = ["--config", str(cp.home / "operators/admin/fleet.toml"), "--api", cp.api]
        assert fleet_main([*admin, "models", "publish", str(v1)]) == 0
        for n in ("a", "b"):
            cp.enroll_agent(tmp_path / n, labels={"region": "eu-west"})
        assert fleet_main([*admin, "rollouts", "start", "--model", "diabetes",
                           "--version", "1"]) == 0
        policy = [*admin, "retrain", "policy", "--model", "diabetes", "--pipeline",
                  str(pipeline), "--threshold", "0.2", "--windows", "2", "--sample-rate", "0.5"]
        # A margin in the target's units: no model can cut the error by 10,000.
        assert fleet_main([*policy, "--margin", "10000"]) == 0
        _send_samples(cp, tmp_path)
        assert sum(s.stored for s in cp.cp.store.sample_summary("diabetes")) == 300

        assert _send_drift(cp, tmp_path, first_seq=1) == ["queued"]
        job = run_retrain_job(cp, loop, "diabetes")
        assert job.state == "rejected", job
        assert cp.cp.store.get_model_version("diabetes", 2) is None

        assert fleet_main([*policy, "--margin", "5"]) == 0
        assert _send_drift(cp, tmp_path, first_seq=10) == ["queued", "rejected"]
        job = run_retrain_job(cp, loop, "diabetes")
        assert job.state == "succeeded", job
        work = cp.home / "retrain" / f"job-{job.id}"
        acceptance = json.loads((work / "acceptance.json").read_text())
        assert acceptance["accepted"] and acceptance["data"] == "held-out device samples"
        assert "wilcoxon" in acceptance["test"].lower()
        assert acceptance["p_value"] < acceptance["alpha"]
        assert acceptance["candidate_mae"] + 5 <= acceptance["baseline_mae"]
        assert acceptance["summary"] in job.detail
        # Better on shifted rows no device sent, too.
        X, y = _shifted()
        unseen, truth = X[300:], y[300:]
        old = np.abs(run_onnx(v1 / "model.onnx", unseen)[:, 0] - truth).mean()
        new = np.abs(run_onnx(work / "bundle" / "model.onnx", unseen)[:, 0] - truth).mean()
        assert new < old - 20, (old, new)
        v2 = cp.cp.store.get_model_version("diabetes", 2)
        assert v2 is not None and v2.published_by == "control-plane"
        manifest = json.loads((work / "bundle" / "manifest.json").read_text())
        assert manifest["task"] == "regression" and manifest["version"] == 2
        experiment = cp.cp.store.get_experiment("diabetes")
        assert experiment is not None and (experiment.champion, experiment.challenger) == (1, 2)
    finally:
        cp.stop()
