"""How retraining jobs run and where their data may come from (I/O around the pure policy).

``LocalRunner`` executes ``trainer run PIPELINE --bundle-version N`` as a child process of the
control plane (the default); ``cluster_runner.ClusterRunner`` submits the same command as a
Kubernetes Job or an Argo Workflow (``[retrain] runner``); both follow the ``Runner``
protocol. ``sample_regions`` reads the data-locality policy of the pipeline's feature store
with the one region-policy parser (``fleetcore.regions``).
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from fleetcore import regions, tomlfile
from fleetcore.errors import InvalidInputError

__all__ = ["LocalRunner", "Outcome", "Runner", "sample_regions"]

log = logging.getLogger(__name__)


def sample_regions(pipeline: Path) -> list[str]:
    """The regions the pipeline's feature store accepts data from ("*": any).

    Read from the pipeline's ``[store]`` table (the trainer's own format; the control plane
    does not import the trainer), else from the store's ``policy.toml``."""
    store_table = tomlfile.load(pipeline).get("store", {})
    if not isinstance(store_table, dict):
        raise InvalidInputError(f"{pipeline}: [store] must be a table")
    if "allowed_regions" in store_table:
        return regions.check_regions(store_table["allowed_regions"], f"{pipeline} [store]")
    store = Path(str(store_table.get("path", "store")))
    policy = store / regions.POLICY_FILE
    if store.is_absolute() and policy.is_file():
        return regions.read_policy_file(policy)
    return [regions.ANY_REGION]  # a new store allows any region unless the pipeline says so


@dataclass(frozen=True)
class Outcome:
    """How a job's trainer ended: its exit code (0: it wrote its bundle and verdict) and,
    when it failed, why, in a line for the job's detail."""

    code: int
    detail: str


class Runner(Protocol):
    """Where retraining jobs run: ``LocalRunner`` or ``cluster_runner.ClusterRunner``."""

    async def start(self, job_id: int, pipeline: Path, workdir: Path, version: int,
                    publisher_key: Path, extra: Sequence[str] = (), *,
                    model: str = "") -> None: ...

    async def check(self, job_id: int) -> Outcome | None: ...

    async def stop(self) -> None: ...


class LocalRunner:
    """Runs ``trainer run`` as a child process of the control plane."""

    def __init__(self, trainer: Path | None = None) -> None:
        self.trainer = trainer or Path(sys.executable).parent / "trainer"
        self.procs: dict[int, asyncio.subprocess.Process] = {}
        self.workdirs: dict[int, Path] = {}

    async def start(self, job_id: int, pipeline: Path, workdir: Path, version: int,
                    publisher_key: Path, extra: Sequence[str] = (), *,
                    model: str = "") -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdirs[job_id] = workdir
        log_file = (workdir / "trainer.log").open("wb")
        self.procs[job_id] = await asyncio.create_subprocess_exec(
            str(self.trainer), "run", str(pipeline), "--workdir", str(workdir),
            "--publisher-key", str(publisher_key), "--bundle-version", str(version), *extra,
            stdout=log_file, stderr=log_file,
        )
        log_file.close()

    def poll(self, job_id: int) -> int | None:
        """The exit code once the job has finished, else None."""
        proc = self.procs.get(job_id)
        if proc is None:
            return -1  # lost (e.g. the control plane restarted): counts as failed
        if proc.returncode is None:
            return None
        del self.procs[job_id]
        return proc.returncode

    async def check(self, job_id: int) -> Outcome | None:
        code = self.poll(job_id)
        if code is None:
            return None
        workdir = self.workdirs.pop(job_id, None)
        where = f"; see {workdir}/trainer.log" if workdir is not None else ""
        return Outcome(code, "" if code == 0 else f"trainer exited {code}{where}")

    async def stop(self) -> None:
        for proc in self.procs.values():
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        self.procs.clear()

