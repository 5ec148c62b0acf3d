"""Retraining jobs as the control plane runs them (the shell around ``retrain``).

``vet`` checks each labelled sample a device sends against the model's manifest and the
store's region policy (refused samples are counted, not stored). ``check`` runs after drift
telemetry arrives and may queue a job; ``tick`` (the scheduler's) starts queued jobs (with the
model's unused samples and the current champion's bundle as the baseline) and finishes the
ones whose trainer has exited: a bundle the trainer found no better than the champion on the
drifted data by the policy's margin is rejected; otherwise it is published through the same
verification as any upload, then started as a canary experiment against the current
champion, or left awaiting an operator, per the model's policy.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import tempfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from control_plane.domain.record_columns import RecordColumns, as_columns
from control_plane.domain.records import (
    AuditOutcome,
    Derived,
    DriftWindowRecord,
    ExperimentState,
    JobState,
    ReportRefusal,
    RetrainJob,
    SampleRecord,
    SampleRefusal,
    SampleSummary,
    TelemetryRecord,
)
from control_plane.domain.retraining import (
    ACTIVE_JOB_STATES,
    DriftPolicy,
    JobEvent,
    check_policy,
    next_job_state,
    policy_fires,
)
from control_plane.domain.samples import against_manifest, region_refusal
from control_plane.domain.telemetry import MALFORMED, REGION, SAMPLE_REFUSED
from control_plane.services.batch_log import warn_batch
from control_plane.services.context import SYSTEM, Context
from control_plane.services.experiments import ExperimentService
from control_plane.services.registry import RegistryService, version_task
from control_plane.services.retrain_runner import LocalRunner, Outcome, Runner, sample_regions
from fleetcore import pki, strict_json
from fleetcore.archive import safe_extract
from fleetcore.bundle import MAX_MANIFEST_BYTES
from fleetcore.errors import EdgefleetError, InvalidInputError

__all__ = ["RetrainService"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Checks:
    before: str  # a refusal that holds for every row ("" when none: then manifest is set)
    manifest: dict[str, Any] = field(default_factory=dict)  # each row is checked against it
    after: str = ""  # the region's refusal, reported after a row's own problems


class RetrainService:
    def __init__(self, ctx: Context, registry: RegistryService, experiments: ExperimentService,
                 runner: Runner | None = None) -> None:
        self.ctx = ctx
        self.store = ctx.store
        self.registry = registry
        self.experiments = experiments
        self.runner: Runner = runner or LocalRunner()
        # One tick at a time: a job is marked running only after its trainer has started, so
        # two overlapping ticks (the scheduler's and an explicit one) would start it twice.
        self._ticking = asyncio.Lock()

    # ------------------------------------------------------------------ operators
    def set_policy(self, caller: pki.Identity, policy: DriftPolicy) -> DriftPolicy:
        self.ctx.authorize(caller, "retrain.policy", policy.model)
        pki.validate_name(policy.model, "model name")
        if not Path(policy.pipeline).is_file():
            raise InvalidInputError(f"pipeline {policy.pipeline} is not a file on this host")
        versions = self.store.list_model_versions(policy.model)
        check_policy(policy, version_task(max(versions, key=lambda m: m.version))
                     if versions else "classification")
        if policy.sample_rate > 0:
            sample_regions(Path(policy.pipeline))  # a pipeline we cannot read fails here
        self.store.set_policy(policy)
        self.ctx.audit.record(caller, "retrain.policy", policy.model, AuditOutcome.ALLOWED,
                              {"threshold": policy.threshold, "fraction": policy.device_fraction,
                               "windows": policy.windows, "sample_rate": policy.sample_rate,
                               "margin": policy.margin})
        self.ctx.reissue_model(policy.model)  # the sampling rate is part of the release
        return policy

    def jobs(self, caller: pki.Identity, model: str) -> list[RetrainJob]:
        self.ctx.authorize(caller, "retrain.jobs", model)
        return self.store.jobs(model or None)

    def samples(self, caller: pki.Identity, model: str) -> list[SampleSummary]:
        self.ctx.authorize(caller, "retrain.jobs", model)
        return self.store.sample_summary(model or None)

    # ------------------------------------------------------------------ samples
    def vet(self, device_id: str, records: Sequence[TelemetryRecord] | RecordColumns,
            derived: dict[int, Derived]) -> tuple[RecordColumns, dict[int, Derived]]:
        """Replace each sample the fleet may not keep with a refusal (counted, not stored).

        A sample's raw payload is never kept in the telemetry log: a refused one could hold
        what must not be stored, and an accepted one lives in the samples table.
        """
        columns = as_columns(records)
        samples = columns.records(columns.kind_mask({"sample"}))
        if not samples:
            return columns, derived
        device = self.store.get_device(device_id)  # every record of a batch is this device's
        region = device.labels.get("region", "") if device is not None else ""
        out = self._vet(device_id, derived, region)
        notes: dict[int, bytes] = {}
        for record in samples:
            row = out.get(record.seq)
            if row is None or isinstance(row, ReportRefusal):  # it did not parse
                row = out[record.seq] = SampleRefusal("-", region or "-", "malformed",
                                                      device_id, MALFORMED)
            note = (f"refused: {row.reason}" if isinstance(row, SampleRefusal)
                    else "stored in the samples table")
            notes[record.seq] = json.dumps({"sample": note}).encode()
        return columns.replace_payloads(notes), out

    def _vet(self, device_id: str, derived: dict[int, Derived],
             region: str) -> dict[int, Derived]:
        checks: dict[tuple[str, int], _Checks] = {}  # looked up once per model version
        out: dict[int, Derived] = {}
        refused: list[str] = []
        for seq, row in derived.items():
            if not isinstance(row, SampleRecord):
                out[seq] = row
                continue
            key = (row.model, row.version)
            if key not in checks:
                checks[key] = self._checks(row.model, row.version, region)
            c = checks[key]
            reason = c.before or against_manifest(row, c.manifest) or c.after
            if reason:
                refused.append(f"{row.model}: {reason}")
                category = REGION if reason == c.after else SAMPLE_REFUSED
                out[seq] = SampleRefusal(row.model, region or "-", reason, device_id, category)
            else:
                out[seq] = SampleRecord(row.device_id, row.model, row.version, row.features,
                                        row.labels, row.pii, region)
        warn_batch(device_id, "samples refused", refused)
        return out

    def _checks(self, model: str, version: int, region: str) -> _Checks:
        """What refuses a sample of this model version from this region, row aside."""
        policy = self.store.get_policy(model)
        if policy is None or policy.sample_rate <= 0:
            return _Checks("sampling is off for this model")
        mv = self.store.get_model_version(model, version)
        if mv is None:
            return _Checks(f"v{version} is not published")
        try:
            allowed = sample_regions(Path(policy.pipeline))
        except (OSError, EdgefleetError) as exc:
            log.warning("cannot read the store policy of %s: %s", policy.pipeline, exc)
            allowed = []
        manifest = strict_json.loads(mv.manifest, what=f"manifest of {model} v{version}",
                                     max_bytes=MAX_MANIFEST_BYTES)
        return _Checks("", manifest,
                       region_refusal(region, allowed))

    # ------------------------------------------------------------------ triggers
    def check(self, model: str) -> RetrainJob | None:
        """Queue a job if the model's policy fires and none is under way."""
        policy = self.store.get_policy(model)
        if policy is None or self.store.jobs(model, ACTIVE_JOB_STATES):
            return None
        experiment = self.store.get_experiment(model)
        if experiment is not None and experiment.state is ExperimentState.RUNNING:
            return None  # a canary is being measured: wait for its decision
        fires, reason = policy_fires(policy, self._fresh_drift(model, policy.windows))
        if not fires:
            return None
        version = max((m.version for m in self.store.list_model_versions(model)), default=0) + 1
        job_id = self.store.add_job(model, reason, version, self.ctx.clock())
        self.ctx.audit.system("retrain.start", f"{model}:{version}", {"reason": reason})
        log.warning("drift policy of %s fired (%s): retraining job %d for v%d", model, reason,
                    job_id, version)
        return self.store.jobs(model)[0]

    def _fresh_drift(self, model: str, windows: int) -> dict[str, list[DriftWindowRecord]]:
        """Each device's newest windows of the version now rolled out, received (by the
        control plane's clock: a device's own times do not count) after the last job ended,
        from devices not revoked: a version being replaced, drift a job has answered, or a
        revoked device fires nothing."""
        rollout = self.store.get_rollout(model)
        since = max((j.finished_at if j.finished_at is not None else j.created_at
                     for j in self.store.jobs(model)), default=0.0)
        out = {}
        for device, recent in self.store.recent_drift(model, windows, since).items():
            fresh = [w for w in recent if rollout is None or w.version == rollout.version]
            if fresh:
                out[device] = fresh
        return out

    async def tick(self) -> None:
        async with self._ticking:
            await self._tick()

    async def _tick(self) -> None:
        for job in self.store.jobs(states=(JobState.QUEUED,)):
            policy = self.store.get_policy(job.model)
            if policy is None:
                self._move(job, JobEvent.FAIL, self.ctx.clock(), "policy removed")
                continue
            key = self.ctx.config.home / self.ctx.config.retrain_publisher_key  # absolute stays
            try:
                extra = self._prepare(job, policy)
            except EdgefleetError as exc:
                self._move(job, JobEvent.FAIL, self.ctx.clock(), str(exc)[:500])
                continue
            try:
                await self.runner.start(job.id, Path(policy.pipeline), self._workdir(job),
                                        job.version, key, extra, model=job.model)
            except Exception as exc:  # e.g. the cluster refused the job: it never started
                log.warning("retraining job %d could not start: %s", job.id, exc)
                self.store.release_samples(job.id)
                self._move(job, JobEvent.FAIL, self.ctx.clock(),
                           f"could not start: {exc}"[:500])
                continue
            self._move(job, JobEvent.START)
        for job in self.store.jobs(states=(JobState.RUNNING,)):
            outcome = await self.runner.check(job.id)
            if outcome is not None:
                self._finish(job, outcome)

    def _move(self, job: RetrainJob, event: JobEvent, now: float | None = None,
              detail: str = "") -> JobState:
        """Move a job by the job table (an illegal move raises and changes nothing)."""
        state = next_job_state(job.state, event)
        self.store.update_job(job.id, state, now, detail)
        return state

    def _workdir(self, job: RetrainJob) -> Path:
        return self.ctx.config.home / "retrain" / f"job-{job.id}"

    def _prepare(self, job: RetrainJob, policy: DriftPolicy) -> list[str]:
        """Write the job's samples and the champion's bundle; return the trainer's options."""
        work = self._workdir(job)
        work.mkdir(parents=True, exist_ok=True)
        extra = ["--margin", repr(policy.margin)]
        self._refuse_regions(job.model, policy)
        samples = self.store.take_samples(job.model, job.id)
        if samples:
            versions = Counter(f"{s.device_id}@v{s.version}" for s in samples)
            doc = {"model": job.model, "rows": [
                {"device": s.device_id, "version": s.version, "region": s.region,
                 "features": s.features, "labels": s.labels, "pii": s.pii} for s in samples],
                "devices": dict(sorted(versions.items()))}
            (work / "samples.json").write_text(json.dumps(doc))
            extra += ["--samples", str(work / "samples.json")]
        rollout = self.store.get_rollout(job.model)
        champion = (self.store.get_model_version(job.model, rollout.version)
                    if rollout is not None else None)
        if champion is not None:
            baseline = work / "baseline"
            shutil.rmtree(baseline, ignore_errors=True)
            with tempfile.TemporaryDirectory(dir=self.ctx.config.layout.scratch) as tmp:
                archive = Path(tmp) / "bundle.tar"
                with archive.open("wb") as fh:
                    for chunk in self.ctx.blobs.read(champion.digest, champion.length, 0,
                                                   champion.length):
                        fh.write(chunk)
                safe_extract(archive, baseline)
            extra += ["--baseline", str(baseline)]
        log.info("retraining job %d: %d sample records, baseline %s", job.id, len(samples),
                 f"v{champion.version}" if champion is not None else "none")
        return extra

    def _refuse_regions(self, model: str, policy: DriftPolicy) -> None:
        """Refuse (count, delete) the unused samples whose region the store's policy does not
        allow now: the policy may have changed since they were vetted, and samples stored
        before regions were required have none. They never reach a job (one such sample once
        failed every later job: a failed job gives its samples back)."""
        allowed = sample_regions(Path(policy.pipeline))  # unreadable: the job fails here
        reasons = {r: why for r in self.store.unused_sample_regions(model)
                   if (why := region_refusal(r, allowed))}
        if reasons:
            n = self.store.refuse_samples(model, reasons, REGION, self.ctx.clock())
            log.warning("retraining %s: %d stored sample records refused by region (%s)", model,
                        n, "; ".join(reasons.values()))

    def _acceptance(self, job: RetrainJob) -> tuple[bool, str]:
        path = self._workdir(job) / "acceptance.json"
        if not path.is_file():
            return True, "no baseline to compare with"
        doc = strict_json.loads(path.read_bytes(), what=f"{path}")
        return acceptance_text(doc, job.version)

    def _finish(self, job: RetrainJob, outcome: Outcome) -> None:
        now = self.ctx.clock()
        if outcome.code != 0:
            self.store.release_samples(job.id)
            self._move(job, JobEvent.FAIL, now, outcome.detail[:500])
            self.ctx.audit.system("retrain.failed", f"{job.model}:{job.version}",
                                  {"code": outcome.code, "reason": outcome.detail[:200]})
            return
        accepted, comparison = self._acceptance(job)
        if not accepted:
            self.store.release_samples(job.id)  # a later job may do better with more of them
            self._move(job, JobEvent.REJECT, now, f"not better: {comparison}")
            self.ctx.audit.system("retrain.rejected", f"{job.model}:{job.version}", {})
            log.warning("retraining job %d rejected: %s", job.id, comparison)
            return
        try:
            self.registry.publish_dir(SYSTEM, self._workdir(job) / "bundle")
            policy = self.store.get_policy(job.model)
            if policy is not None and policy.auto_canary:
                # Its own trace: the canary's release pushes carry it to the agents' installs.
                with self.ctx.traced(f"retrain canary {job.model} v{job.version}", job.model,
                                     False):
                    self.experiments.begin(SYSTEM, job.model, job.version,
                                           policy.canary_weight, {})
                event, detail = JobEvent.CANARY, f"v{job.version} published and canaried"
            else:
                event, detail = JobEvent.AWAIT, f"v{job.version} published"
            detail += f"; {comparison}"
        except EdgefleetError as exc:
            event, detail = JobEvent.FAIL, str(exc)[:500]
        state = self._move(job, event, now, detail)
        log.info("retraining job %d: %s (%s)", job.id, state, detail)


def acceptance_text(doc: object, version: int) -> tuple[bool, str]:
    """(accepted, the line shown) of the trainer's ``acceptance.json``: its ``summary`` as is;
    a file from before summaries (accuracy, or a regression model's MAE) is described here."""
    if not isinstance(doc, dict) or not isinstance(doc.get("accepted"), bool):
        return False, "acceptance.json has no 'accepted' verdict"
    summary = doc.get("summary")
    if isinstance(summary, str) and summary:
        return doc["accepted"], summary[:500]
    kind, fmt, word = (("mae", ".4g", "MAE ") if "candidate_mae" in doc
                       else ("accuracy", ".3f", ""))
    try:
        text = (f"on {doc['rows']} rows of {doc['data']}: v{version} "
                f"{word}{doc[f'candidate_{kind}']:{fmt}} vs current "
                f"{doc[f'baseline_{kind}']:{fmt}} (margin {doc['margin']:g})")
    except (KeyError, TypeError, ValueError):
        text = "acceptance.json lacks the figures to describe it"
    return doc["accepted"], text
