from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import LoopThread, RunningControlPlane, start_control_plane


@pytest.fixture
def loop() -> Iterator[LoopThread]:
    lt = LoopThread()
    yield lt
    lt.close()


@pytest.fixture
def cp(tmp_path: Path, loop: LoopThread) -> Iterator[RunningControlPlane]:
    running = start_control_plane(tmp_path / "cp", loop)
    yield running
    running.stop()
