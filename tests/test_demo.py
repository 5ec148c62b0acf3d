"""`make demo` stays green: run its scenario (real processes) and check what it reports."""

from __future__ import annotations

from pathlib import Path

import pytest

from scripts import demo, demo_regression

# The whole scenario takes ~100 s on a 2-core host (training included): more than the
# suite-wide 120 s leaves room for under load.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]


def test_demo_runs_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert demo.main(["--workdir", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "demo OK: 2 devices online" in out
    assert "control-plane exited 0" in out
    assert out.count("connected to control plane") == 2
    assert "connected to control plane via MQTT broker mqtts://" in out  # agent-2 over MQTT
    assert "mosquitto stopped" in out
    assert out.count("digits v1 committed after probation") == 2
    assert "bundle verified with the reference tool" in out
    assert "v1 answered" in out and "drift on digits" in out
    assert "intact:" in out  # fleet audit verify
    # The whole loop: drift -> retrain from samples (accepted) -> canary -> promoted -> rolled out
    assert "v2 published and canaried; McNemar exact p=" in out
    assert "rows of held-out device samples" in out and "): accepted" in out
    assert "digits now serves v1 0.9, v2 0.1" in out
    assert "decision: promote" in out
    assert "rollout digits -> version 2 (completed)" in out
    assert "retrain.start        digits:3" not in out  # no second job while the canary runs
    table = out.split("the fleet at the end")[1]
    assert table.count("digits v2") == 2 and "grpc" in table and "mqtt" in table


def test_regression_demo_decides_by_errors(tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    assert demo_regression.main(["--workdir", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "demo OK: 2 devices online" in out and "control-plane exited 0" in out
    assert out.count("diabetes v1 committed after probation") == 2
    assert out.count("bundle verified with model_signing") == 2
    assert "TASK" in out and "regression" in out
    assert "diabetes now serves v1 0.5, v2 0.5" in out
    assert "decision: promote — challenger's MAE lower by" in out
    assert "Welch's t-test on absolute errors" in out
    assert "rollout diabetes -> version 2 (completed)" in out
    table = out.split("the fleet at the end")[1]
    assert table.count("diabetes v2") == 2
