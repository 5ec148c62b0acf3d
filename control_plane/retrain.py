"""Drift-triggered retraining: a policy per model, jobs, and the runners that execute them.

Policy: the model has drifted when at least ``device_fraction`` of the devices that report
drift for it show ``windows`` consecutive windows (their newest) with a score above
``threshold``. Then the control plane records why and queues one job (never two at once for a
model). The local runner executes ``trainer run PIPELINE --bundle-version N`` as a subprocess;
its bundle is published like any other (publisher signature verified), then goes out as a
canary experiment, or waits for an operator, per policy. ``render_kubernetes_job`` renders the
same job for a cluster from ``packaging/kubernetes/retrain-job.yaml``.

Not yet: the devices' labelled samples (PII pseudonymized on the device) joining the training
data, and the check that the new model beats the current one on the drifted data.
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

__all__ = ["DriftPolicy", "LocalRunner", "policy_fires", "render_kubernetes_job"]

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
                    publisher_key: Path) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        log_file = (workdir / "trainer.log").open("wb")
        self.procs[job_id] = await asyncio.create_subprocess_exec(
            str(self.trainer), "run", str(pipeline), "--workdir", str(workdir),
            "--publisher-key", str(publisher_key), "--bundle-version", str(version),
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
