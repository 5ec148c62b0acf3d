from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import LoopThread, RunningControlPlane, start_control_plane
from tests.trainer_support import write_pipeline
from trainer.config import Pipeline
from trainer.pipeline import Run, Workdir


@pytest.fixture
def loop() -> Iterator[LoopThread]:
    lt = LoopThread()
    yield lt
    lt.close()


@pytest.fixture(scope="session")
def trained_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small signed digits bundle (trained once per test session); tests re-sign copies."""
    base = tmp_path_factory.mktemp("bundle")
    pipeline = write_pipeline(base, hidden="32", epochs=3, prune=0.25)
    Run(Pipeline.load(pipeline), Workdir(base / "work"), progress=lambda m: None).run_all()
    return base / "work" / "bundle"


@pytest.fixture
def cp(tmp_path: Path, loop: LoopThread) -> Iterator[RunningControlPlane]:
    running = start_control_plane(tmp_path / "cp", loop)
    yield running
    running.stop()


@pytest.fixture(params=["grpc", "mqtt"])
def cp_any(request: pytest.FixtureRequest, tmp_path: Path,
           loop: LoopThread) -> Iterator[RunningControlPlane]:
    """A control plane whose agents use the transport of the parameter (mqtt: a real
    Mosquitto and the bridge); pass ``transport=cp_any.transport`` to ``start_agent``."""
    if request.param == "grpc":
        running = start_control_plane(tmp_path / "cp", loop)
    else:
        from tests.mqtt_support import start_mqtt_control_plane  # noqa: PLC0415

        running = start_mqtt_control_plane(tmp_path / "cp", loop)
    yield running
    running.stop()
    if running.broker is not None:
        running.broker.stop()


def pytest_report_header(config: pytest.Config) -> str:
    import torch  # noqa: PLC0415 (only to describe the machine)

    return f"cuda devices: {torch.cuda.device_count()} (tests marked gpu run only where > 0)"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests of the CUDA/NCCL path are collected only where enough GPUs exist."""
    import torch  # noqa: PLC0415

    available = torch.cuda.device_count()

    def runnable(item: pytest.Item) -> bool:
        marker = item.get_closest_marker("gpu")
        return marker is None or available >= int(marker.kwargs.get("devices", 1))

    dropped = [item for item in items if not runnable(item)]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = [item for item in items if runnable(item)]
