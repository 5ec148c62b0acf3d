"""Retraining jobs as the control plane runs them (the shell around ``retrain``).

``check`` runs after drift telemetry arrives and may queue a job; ``tick`` (the scheduler's)
starts queued jobs and finishes the ones whose trainer has exited: their bundle is published
through the same verification as any upload, then started as a canary experiment against the
current champion, or left awaiting an operator, per the model's policy.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from control_plane.domain import RetrainJob
from control_plane.registry import Upload
from control_plane.retrain import DriftPolicy, LocalRunner, policy_fires
from fleetcore import pki
from fleetcore.archive import pack_bundle
from fleetcore.errors import EdgefleetError, InvalidInputError

if TYPE_CHECKING:
    from control_plane.handlers import Handlers

__all__ = ["RetrainService"]

log = logging.getLogger(__name__)

SYSTEM = "control-plane"
_ACTIVE = ("queued", "running")


class RetrainService:
    def __init__(self, handlers: Handlers, runner: LocalRunner | None = None) -> None:
        self.h = handlers
        self.store = handlers.store
        self.runner = runner or LocalRunner()

    # ------------------------------------------------------------------ operators
    def set_policy(self, caller: pki.Identity, policy: DriftPolicy) -> DriftPolicy:
        self.h.authorize(caller, "retrain.policy", policy.model)
        pki.validate_name(policy.model, "model name")
        if not Path(policy.pipeline).is_file():
            raise InvalidInputError(f"pipeline {policy.pipeline} is not a file on this host")
        checks = [(policy.threshold > 0, "threshold must be > 0"),
                  (0 < policy.device_fraction <= 1, "fraction must be in (0, 1]"),
                  (1 <= policy.windows <= 100, "windows must be 1..100"),
                  (0 < policy.canary_weight < 1, "canary weight must be in (0, 1)")]
        for ok, message in checks:
            if not ok:
                raise InvalidInputError(f"drift policy: {message}")
        self.store.set_policy(policy)
        self.h.audit_action(caller, "retrain.policy", policy.model,
                            self.h.allowed, {"threshold": policy.threshold,
                                             "fraction": policy.device_fraction,
                                             "windows": policy.windows})
        return policy

    def jobs(self, caller: pki.Identity, model: str) -> list[RetrainJob]:
        self.h.authorize(caller, "retrain.jobs", model)
        return self.store.jobs(model or None)

    # ------------------------------------------------------------------ triggers
    def check(self, model: str) -> RetrainJob | None:
        """Queue a job if the model's policy fires and none is under way."""
        policy = self.store.get_policy(model)
        if policy is None or self.store.jobs(model, _ACTIVE):
            return None
        fires, reason = policy_fires(policy, self.store.recent_drift(model, policy.windows))
        if not fires:
            return None
        version = max((m.version for m in self.store.list_model_versions(model)), default=0) + 1
        job_id = self.store.add_job(model, reason, version, self.h.clock())
        self.h.audit_system("retrain.start", f"{model}:{version}", {"reason": reason})
        log.warning("drift policy of %s fired (%s): retraining job %d for v%d", model, reason,
                    job_id, version)
        return self.store.jobs(model)[0]

    async def tick(self) -> None:
        for job in self.store.jobs(states=("queued",)):
            policy = self.store.get_policy(job.model)
            if policy is None:
                self.store.update_job(job.id, "failed", self.h.clock(), "policy removed")
                continue
            key = self.h.config.home / self.h.config.retrain_publisher_key  # absolute stays
            await self.runner.start(job.id, Path(policy.pipeline), self._workdir(job),
                                    job.version, key)
            self.store.update_job(job.id, "running")
        for job in self.store.jobs(states=("running",)):
            code = self.runner.poll(job.id)
            if code is not None:
                self._finish(job, code)

    def _workdir(self, job: RetrainJob) -> Path:
        return self.h.config.home / "retrain" / f"job-{job.id}"

    def _finish(self, job: RetrainJob, code: int) -> None:
        now = self.h.clock()
        if code != 0:
            self.store.update_job(job.id, "failed", now,
                                  f"trainer exited {code}; see {self._workdir(job)}/trainer.log")
            self.h.audit_system("retrain.failed", f"{job.model}:{job.version}", {"code": code})
            return
        try:
            self._publish(self._workdir(job) / "bundle")
            policy = self.store.get_policy(job.model)
            if policy is not None and policy.auto_canary:
                self.h.begin_experiment(SYSTEM, job.model, job.version, policy.canary_weight, {})
                state, detail = "succeeded", f"v{job.version} published and canaried"
            else:
                state, detail = "awaiting-approval", f"v{job.version} published"
        except EdgefleetError as exc:
            state, detail = "failed", str(exc)[:500]
        self.store.update_job(job.id, state, now, detail)
        log.info("retraining job %d: %s (%s)", job.id, state, detail)

    def _publish(self, bundle: Path) -> None:
        with tempfile.TemporaryDirectory(dir=self.h.config.layout.scratch) as tmp:
            archive = Path(tmp) / "bundle.tar"
            pack_bundle(bundle, archive)
            upload = Upload(self.h.config.layout.scratch, self.h.config.max_bundle_bytes)
            with archive.open("rb") as fh:
                while data := fh.read(1 << 20):
                    upload.write(data)
            self.h.publish_model(SYSTEM, upload)
