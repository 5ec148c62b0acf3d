"""A/B experiments: a challenger against the champion on the champion's devices, decided once
by the statistics in ``domain/experiments.py``; promoting rolls the challenger out to them."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

from control_plane.domain.experiments import (
    ArmResult,
    Decision,
    ExperimentEvent,
    arm_counts,
    arm_results,
    decide,
    decide_errors,
    next_state,
)
from control_plane.domain.records import (
    ArmStatsRecord,
    AuditOutcome,
    ExperimentRecord,
    ExperimentState,
    RolloutState,
)
from control_plane.services.context import SYSTEM, Context
from control_plane.services.registry import version_task
from fleetcore import pki
from fleetcore.errors import InvalidInputError, NotFoundError
from fleetcore.labels import matches, validate_labels

__all__ = ["ExperimentService", "ExperimentView"]

log = logging.getLogger(__name__)

DEFAULT_WEIGHT = 0.1


@dataclass(frozen=True)
class ExperimentView:
    record: ExperimentRecord
    arms: list[ArmResult]
    decision: Decision  # as of now (the recorded one, once made, is in ``record``)
    min_samples: int
    task: str = "classification"


class ExperimentService:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.store = ctx.store

    # ------------------------------------------------------------------ operators
    def start(self, caller: pki.Identity, model: str, challenger: int, weight: float,
              selector: Mapping[str, str]) -> ExperimentView:
        self.ctx.authorize(caller, "experiments.start", f"{model}:{challenger}")
        self.begin(caller, model, challenger, weight, selector)
        return self._view(model)

    def begin(self, caller: pki.Identity | str, model: str, challenger: int, weight: float,
              selector: Mapping[str, str]) -> ExperimentRecord:
        """Start an experiment (authorization is the caller's business: an operator's was
        checked by ``start``; the retraining service starts canaries by policy)."""
        target = f"{model}:{challenger}"
        weight = weight or DEFAULT_WEIGHT
        if not 0.0 < weight < 1.0:
            raise InvalidInputError(f"challenger weight must be in (0, 1); got {weight}")
        rollout = self.store.get_rollout(model)
        if rollout is None or rollout.state not in (RolloutState.RUNNING,
                                                    RolloutState.COMPLETED):
            raise NotFoundError(f"model {model!r} has no active rollout to be the champion")
        if challenger == rollout.version:
            raise InvalidInputError(f"version {challenger} is already the champion")
        published = self.store.get_model_version(model, challenger)
        if published is None:
            raise NotFoundError(f"model {model} version {challenger} is not published")
        champion_task = version_task(self.store.get_model_version(model, rollout.version))
        if version_task(published) != champion_task:
            raise InvalidInputError(f"v{challenger} is a {version_task(published)} model and "
                                    f"the champion v{rollout.version} a {champion_task} one")
        clean = validate_labels(selector)
        devices = []
        for device_id in rollout.device_ids:
            device = self.store.get_device(device_id)
            if (device is not None and device.revoked_at is None
                    and matches(device.labels, clean)):
                devices.append(device_id)
        now = self.ctx.clock()
        actor = caller.actor if isinstance(caller, pki.Identity) else caller
        record = ExperimentRecord(model, rollout.version, challenger, weight,
                                  ExperimentState.RUNNING, clean, tuple(devices), now, actor)
        self.store.start_experiment(record)
        self.ctx.push(devices, now)
        self.ctx.audit.record(caller, "experiments.start", target, AuditOutcome.ALLOWED,
                              {"weight": weight, "devices": len(devices),
                               "champion": rollout.version})
        return record

    def stop(self, caller: pki.Identity, model: str) -> ExperimentView:
        self.ctx.authorize(caller, "experiments.stop", model)
        now = self.ctx.clock()
        record = self.store.stop_experiment(model, now)
        self.ctx.push(record.device_ids, now)
        self.ctx.audit.record(caller, "experiments.stop", model, AuditOutcome.ALLOWED,
                              {"champion": record.champion, "challenger": record.challenger})
        return self._view(model)

    def get(self, caller: pki.Identity, model: str) -> ExperimentView:
        self.ctx.authorize(caller, "experiments.status", model)
        return self._view(model)

    def _view(self, model: str) -> ExperimentView:
        record = self.store.get_experiment(model)
        if record is None:
            raise NotFoundError(f"no experiment for model {model!r}")
        devices = set(record.device_ids)
        stats = [s for s in self.store.arm_stats(model) if s.device_id in devices
                 and s.version in (record.champion, record.challenger)]
        task = self.task(record)
        return ExperimentView(record, arm_results(record, stats, task),
                              self.decision(record, stats), self.ctx.config.experiment_min_samples,
                              task)

    def task(self, record: ExperimentRecord) -> str:
        """The experiment's task: the challenger's (a champion of another task cannot be one:
        ``begin`` refuses that)."""
        return version_task(self.store.get_model_version(record.model, record.challenger))

    # ------------------------------------------------------------------ decisions
    def decision(self, record: ExperimentRecord,
                 stats: list[ArmStatsRecord] | None = None) -> Decision:
        rows = self.store.arm_stats(record.model) if stats is None else stats
        task = self.task(record)
        counts = arm_counts(record, rows, task)
        champion, challenger = counts[record.champion], counts[record.challenger]
        if task == "regression":
            return decide_errors(champion, challenger,
                                 min_samples=self.ctx.config.experiment_min_samples,
                                 alpha=self.ctx.config.experiment_alpha,
                                 min_devices=self.ctx.config.experiment_min_devices)
        return decide((champion.correct, champion.labelled),
                      (challenger.correct, challenger.labelled),
                      min_samples=self.ctx.config.experiment_min_samples,
                      alpha=self.ctx.config.experiment_alpha,
                      devices=(champion.devices, challenger.devices),
                      min_devices=self.ctx.config.experiment_min_devices)

    def evaluate(self, model: str) -> None:
        """Decide a running experiment once enough feedback is in, and act on it."""
        record = self.store.get_experiment(model)
        if record is None or record.state is not ExperimentState.RUNNING:
            return
        decision = self.decision(record)
        if decision.verdict == "wait":
            return
        event = ExperimentEvent(decision.verdict)
        now = self.ctx.clock()
        if event is ExperimentEvent.PROMOTE:
            self.store.record_decision(model, decision.verdict, decision.p_value,
                                       decision.reason, now, next_state(record.state, event))
            # A rollout the control plane starts itself: a trace of its own, which the
            # releases it pushes (and the rollout's later steps) carry to the agents.
            with self.ctx.traced(f"promote {model} v{record.challenger}", model, True):
                self.store.start_rollout(model, record.challenger, record.selector,
                                         list(record.device_ids), now, SYSTEM)
                self.ctx.push(record.device_ids, now)
        else:
            self.store.record_decision(model, decision.verdict, decision.p_value,
                                       decision.reason, now, record.state)
            self.store.stop_experiment(model, now)  # running -> stopped, the champion stays
            self.ctx.push(record.device_ids, now)
        self.ctx.audit.record(SYSTEM, f"experiments.{decision.verdict}",
                              f"{model}:{record.challenger}", AuditOutcome.ALLOWED,
                              {"p_value": decision.p_value, "reason": decision.reason})
        log.info("experiment %s: %s (%s)", model, decision.verdict, decision.reason)
