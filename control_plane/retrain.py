"""Drift-triggered retraining: a policy per model, jobs, and the runners that execute them.

Policy: the model has drifted when at least ``device_fraction`` of the devices that report
drift for it show ``windows`` consecutive windows (their newest) with a score above
``threshold``. Then the control plane records why and queues one job (never two at once for a
model). The local runner executes ``trainer run PIPELINE --bundle-version N`` as a subprocess;
its bundle is published like any other (publisher signature verified), then goes out as a
canary experiment, or waits for an operator, per policy. ``render_kubernetes_job`` renders the
same job for a cluster from ``packaging/kubernetes/retrain-job.yaml``.

Samples: with ``sample_rate > 0`` the model's release documents let devices contribute
labelled rows (inputs that received feedback; PII columns pseudonymized with the device's own
HMAC key or dropped, as the bundle manifest says). The control plane vets each sample against
the manifest of the version that served it and against the store's region policy (the
pipeline's ``[store] allowed_regions``, else the store's ``policy.toml``): a refused sample is
counted, never stored. A job hands its samples to ``trainer run --samples``, which ingests
them as a new snapshot (lineage: the devices and their model versions) and trains on base data
plus samples; ``--baseline`` makes the trainer compare the new model with the current one on
the samples' held-out rows (the drifted data), and the job publishes only when the new model
beats the current one by ``margin``.
"""

from __future__ import annotations

import asyncio
import logging
import string
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from control_plane.domain import DriftWindowRecord
from fleetcore import tomlfile
from fleetcore.errors import InvalidInputError

__all__ = ["DriftPolicy", "LocalRunner", "policy_fires", "render_kubernetes_job",
           "sample_regions"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DriftPolicy:
    model: str
    pipeline: str  # path of the model's PIPELINE.toml on the control-plane host
    threshold: float = 0.2
    device_fraction: float = 0.5
    windows: int = 2
    canary_weight: float = 0.1
    auto_canary: bool = True  # False: the new version waits for an operator
    sample_rate: float = 0.0  # share of labelled requests devices contribute as samples
    margin: float = 0.0  # accuracy points (0..1) the new model must gain on the drifted data


def sample_regions(pipeline: Path) -> list[str]:
    """The regions the pipeline's feature store accepts data from ("*": any).

    Read from the pipeline's ``[store]`` table (the trainer's own format; the control plane
    does not import the trainer), else from the store's ``policy.toml``."""
    store_table = tomlfile.load(pipeline).get("store", {})
    if not isinstance(store_table, dict):
        raise InvalidInputError(f"{pipeline}: [store] must be a table")
    regions = store_table.get("allowed_regions")
    if isinstance(regions, list):
        return [str(r) for r in regions]
    store = Path(str(store_table.get("path", "store")))
    policy = store / "policy.toml"
    if store.is_absolute() and policy.is_file():
        stored = tomlfile.load(policy).get("allowed_regions")
        if isinstance(stored, list):
            return [str(r) for r in stored]
    return ["*"]  # a new store allows any region unless the pipeline says otherwise


def policy_fires(policy: DriftPolicy,
                 recent: Mapping[str, Sequence[DriftWindowRecord]]) -> tuple[bool, str]:
    """``recent``: per device, its newest windows first."""
    if not recent:
        return False, "no drift reports"
    drifted = [d for d, ws in recent.items()
               if len(ws) >= policy.windows
               and all(w.score > policy.threshold for w in ws[: policy.windows])]
    share = len(drifted) / len(recent)
    reason = (f"{len(drifted)} of {len(recent)} devices had {policy.windows} consecutive "
              f"windows with drift score > {policy.threshold:g}")
    return share >= policy.device_fraction, reason


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
