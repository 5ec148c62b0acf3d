"""Drift-triggered retraining: the policy, the Kubernetes rendering, and a real local job."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from edgefleet.v1 import agent_pb2
from sklearn.datasets import load_digits

from control_plane.domain.records import DriftWindowRecord
from control_plane.domain.retraining import DriftPolicy, policy_fires
from control_plane.services.retrain_runner import LocalRunner
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
from tests.trainer_support import write_pipeline
from trainer.config import Pipeline
from trainer.onnx_tools import run_onnx
from trainer.pipeline import Run, Workdir

REPO = Path(__file__).resolve().parent.parent


def _window(device: str, score: float) -> DriftWindowRecord:
    return DriftWindowRecord(device, "digits", 1, 0.0, 1.0, 200, score, score > 0.2, 0.0, ())


@dataclass(frozen=True)
class Case:
    name: str
    recent: dict[str, list[float]]  # device -> newest-first scores
    fires: bool


CASES = [
    Case("all-drifted", {"a": [0.5, 0.6], "b": [0.9, 0.4]}, True),
    Case("half-drifted", {"a": [0.5, 0.6], "b": [0.1, 0.1]}, True),
    Case("one-window-only", {"a": [0.5, 0.1], "b": [0.5, 0.05]}, False),
    Case("too-few-windows", {"a": [0.5], "b": [0.6]}, False),
    Case("minority", {"a": [0.5, 0.6], "b": [0.1, 0.1], "c": [0.0, 0.0]}, False),
    Case("nobody-reports", {}, False),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_policy(case: Case) -> None:
    policy = DriftPolicy("digits", "p.toml", threshold=0.2, device_fraction=0.5, windows=2)
    recent = {d: [_window(d, s) for s in scores] for d, scores in case.recent.items()}
    assert policy_fires(policy, recent)[0] is case.fires


@pytest.mark.slow
def test_drift_on_shifted_data_retrains_a_better_model_from_samples_and_canaries_it(
    tmp_path: Path, loop: LoopThread
) -> None:
    # The scheduler stays out of the way (an hour between ticks): the test ticks retraining
    # itself, so each job's state is observed before anything advances it.
    cp: RunningControlPlane = start_control_plane(tmp_path / "cp", loop, rollout_tick_seconds=3600)
    X, y = load_digits(return_X_y=True)
    shifted = (16.0 - X).astype(np.float32)  # the data shifts: inverted intensities
    try:
        pipeline = write_pipeline(
            tmp_path / "pipe", hidden="64", epochs=10, prune=0.25, store=str(tmp_path / "store")
        )
        Run(
            Pipeline.load(pipeline),
            Workdir(tmp_path / "v1w"),
            progress=lambda m: None,
            publisher_key=cp.home / "publisher" / "publisher.key",
        ).run_all()
        v1 = _bundle_for(cp, tmp_path / "v1w" / "bundle", tmp_path / "v1", version=1)
        admin = ["--config", str(cp.home / "operators/admin/fleet.toml"), "--api", cp.api]
        assert fleet_main([*admin, "models", "publish", str(v1)]) == 0
        devices = [
            cp.enroll_agent(tmp_path / n, labels={"region": "eu-west"}).device_id
            for n in ("a", "b")
        ]
        assert fleet_main([*admin, "rollouts", "start", "--model", "digits", "--version", "1"]) == 0
        policy = [
            *admin,
            "retrain",
            "policy",
            "--model",
            "digits",
            "--pipeline",
            str(pipeline),
            "--threshold",
            "0.2",
            "--windows",
            "2",
            "--sample-rate",
            "0.5",
        ]
        assert fleet_main([*policy, "--margin", "0.99"]) == 0  # no model can gain 99 points
        # Each device labels 300 of the shifted rows it served (rows 0..599); 600.. stay unseen.
        for k, name in enumerate(("a", "b")):
            rows = range(300 * k, 300 * (k + 1), 10)
            send_telemetry(
                cp.api,
                tmp_path / name,
                [
                    agent_pb2.TelemetryRecord(
                        seq=100 + i,
                        kind="sample",
                        created_at=1.0,
                        payload=encode(
                            {
                                "model": "digits",
                                "version": 1,
                                "features": shifted[i : i + 10].tolist(),
                                "labels": y[i : i + 10].tolist(),
                            }
                        ),
                    )
                    for i in rows
                ],
            )
        assert sum(s.stored for s in cp.cp.store.sample_summary("digits")) == 600

        assert _send_drift(cp, tmp_path) == ["queued"]
        job = run_retrain_job(cp, loop, "digits")
        assert job.state == "rejected", job
        assert "not better" in job.detail
        assert cp.cp.store.get_model_version("digits", 2) is None  # nothing published
        assert cp.cp.store.get_experiment("digits") is None

        assert fleet_main([*policy, "--margin", "0.2"]) == 0
        assert _send_drift(cp, tmp_path, first_seq=10) == ["queued", "rejected"]
        job = run_retrain_job(cp, loop, "digits")
        assert job.state == "succeeded", job
        work = cp.home / "retrain" / f"job-{job.id}"
        acceptance = json.loads((work / "acceptance.json").read_text())
        assert acceptance["accepted"] and acceptance["data"] == "held-out device samples"
        assert acceptance["candidate_accuracy"] >= acceptance["baseline_accuracy"] + 0.2
        # Better on shifted rows that no device sent, too.
        unseen, truth = shifted[600:], y[600:]
        old = (run_onnx(v1 / "model.onnx", unseen).argmax(1) == truth).mean()
        new = (run_onnx(work / "bundle" / "model.onnx", unseen).argmax(1) == truth).mean()
        assert new > old + 0.2, (old, new)
        # Lineage: the samples' snapshot names the devices and the version that served them.
        report = json.loads((work / "report.json").read_text())
        origins = [s["origin"]["devices"] for s in report["samples"]]
        assert origins == [{f"{devices[0]}@v1": 300, f"{devices[1]}@v1": 300}] or origins == [
            {f"{d}@v1": 300 for d in sorted(devices)}
        ]
        assert all(s.unused == 0 for s in cp.cp.store.sample_summary("digits"))

        v2 = cp.cp.store.get_model_version("digits", 2)
        assert v2 is not None and v2.published_by == "control-plane"
        experiment = cp.cp.store.get_experiment("digits")
        assert experiment is not None
        assert (experiment.champion, experiment.challenger, experiment.weight) == (1, 2, 0.1)
        # While the canary is measured, more drift from v1 starts no second job.
        assert _send_drift(cp, tmp_path, first_seq=20) == ["succeeded", "rejected"]
        actions = [e.action for e in cp.cp.store.list_audit(50)]
        assert "retrain.start" in actions and "retrain.rejected" in actions
    finally:
        cp.stop()


def _send_drift(cp: RunningControlPlane, tmp_path: Path, first_seq: int = 1) -> list[str]:
    """Two drifted windows from each device (closed now): the policy's condition."""
    now = time.time()
    for name in ("a", "b"):
        send_telemetry(
            cp.api,
            tmp_path / name,
            [
                agent_pb2.TelemetryRecord(
                    seq=i,
                    kind="drift",
                    created_at=float(i),
                    payload=encode(
                        {
                            "model": "digits",
                            "version": 1,
                            "start": now + i,
                            "end": now + i + 1.0,
                            "rows": 200,
                            "score": 0.8,
                            "drifted": True,
                            "prediction_psi": 0.3,
                            "drifted_features": ["pixel_1"],
                        }
                    ),
                )
                for i in (first_seq, first_seq + 1)
            ],
        )
    return [j.state for j in cp.cp.store.jobs("digits")]


def test_overlapping_ticks_start_a_job_once(tmp_path: Path, loop: LoopThread) -> None:
    """The scheduler's tick and an explicit one may overlap: a queued job's trainer must
    start once, not twice in the same workdir."""
    cp = start_control_plane(tmp_path / "cp", loop)
    try:
        pipeline = write_pipeline(tmp_path / "pipe", store=str(tmp_path / "store"))
        retrain = cp.cp.services.retraining
        cp.cp.store.set_policy(DriftPolicy("digits", str(pipeline)))
        job_id = cp.cp.store.add_job("digits", "test", 1, 0.0)
        started: list[int] = []

        class SlowRunner(LocalRunner):
            async def start(self, job_id: int, *args: Any, **kwargs: Any) -> None:
                started.append(job_id)
                await asyncio.sleep(0)  # a yield, not a wait: the other tick runs meanwhile
                self.procs[job_id] = await asyncio.create_subprocess_exec("true")

        retrain.runner = SlowRunner()

        async def both() -> None:
            await asyncio.gather(retrain.tick(), retrain.tick())

        loop.run(both())
        assert started == [job_id]
    finally:
        cp.stop()
