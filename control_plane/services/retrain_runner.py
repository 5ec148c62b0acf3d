"""How retraining jobs run and where their data may come from (I/O around the pure policy).

``LocalRunner`` executes ``trainer run PIPELINE --bundle-version N`` as a child process of the
control plane. ``render_kubernetes_job`` renders the same job for a cluster from
``packaging/kubernetes/retrain-job.yaml``. ``sample_regions`` reads the data-locality policy
of the pipeline's feature store with the one region-policy parser (``fleetcore.regions``).
"""

from __future__ import annotations

import asyncio
import logging
import string
import sys
from collections.abc import Sequence
from pathlib import Path

from fleetcore import regions, tomlfile
from fleetcore.errors import InvalidInputError

__all__ = ["LocalRunner", "render_kubernetes_job", "sample_regions"]

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


class LocalRunner:
    """Runs ``trainer run`` as a child process of the control plane."""

    def __init__(self, trainer: Path | None = None) -> None:
        self.trainer = trainer or Path(sys.executable).parent / "trainer"
        self.procs: dict[int, asyncio.subprocess.Process] = {}

    async def start(self, job_id: int, pipeline: Path, workdir: Path, version: int,
                    publisher_key: Path, extra: Sequence[str] = ()) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
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

    async def stop(self) -> None:
        for proc in self.procs.values():
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        self.procs.clear()


def render_kubernetes_job(template: str, *, job_id: int, model: str, version: int,
                          pipeline: str, image: str) -> str:
    """Fill the Job template (``$name`` placeholders; unknown ones are an error)."""
    return string.Template(template).substitute(
        job_name=f"edgefleet-retrain-{model}-{job_id}", model=model, version=version,
        pipeline=pipeline, image=image,
    )
