"""Staged rollouts: operators start, pause, resume, abort and roll back; the scheduler calls
``tick``. All state is in storage, so a restarted control plane carries on where it was.

A step is judged once every device in it has settled — reported the new version committed, or
failed it (an install failure, a local rollback, or silence past the device timeout counts as
failed) — and the bake time has passed. Then every gate must pass (``install_failures<=0`` is
always one), or the rollout pauses or rolls back per its policy. Rolling back (or aborting)
gives every device that got the new version its previous version again: no device is left
between versions. The rules (state table, step membership, gates) are in
``domain/rollout_plan.py``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from control_plane.domain.records import (
    AuditOutcome,
    DeviceView,
    ReleaseRecord,
    RolloutRecord,
    RolloutState,
)
from control_plane.domain.rollout_plan import (
    FAILED_INSTALL_STATES,
    GateResult,
    RolloutEvent,
    VersionQuality,
    check_gates_for_task,
    device_progress,
    gate_metrics,
    judge_gates,
    next_state,
    parse_gate,
    parse_steps,
    step_devices,
    version_quality,
)
from control_plane.services.context import Context
from control_plane.services.publishers import version_trusted
from control_plane.services.registry import version_task
from fleetcore import pki
from fleetcore.errors import InvalidInputError, NotFoundError, PermissionDeniedError
from fleetcore.labels import matches, validate_labels

__all__ = ["ACTIONS", "RolloutService", "RolloutView"]

log = logging.getLogger(__name__)

ACTIONS = ("pause", "resume", "abort", "rollback")
MAX_BAKE_SECONDS = 30 * 86400


@dataclass(frozen=True)
class RolloutView:
    rollout: RolloutRecord
    devices: list[DeviceView]
    releases: dict[str, ReleaseRecord]  # device id -> its current release
    task: str = "classification"
    quality: tuple[VersionQuality, ...] = ()  # the new version, then the previous one


class RolloutService:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.store = ctx.store

    # ------------------------------------------------------------------ operators
    def start(self, caller: pki.Identity, model: str, version: int,
              selector: Mapping[str, str], *, steps: Sequence[int] = (100,),
              bake_seconds: float = 0.0, gates: Sequence[str] = (),
              on_failure: str = "pause") -> RolloutView:
        target = f"{model}:{version}"
        self.ctx.authorize(caller, "rollouts.start", target)
        published = self.store.get_model_version(model, version)
        if published is None:
            raise NotFoundError(f"model {model} version {version} is not published")
        if not version_trusted(self.ctx, model, version):
            raise PermissionDeniedError(
                f"model {model} version {version} is signed only by revoked publisher keys "
                "(or by fewer than the publisher threshold); hint: publish a version signed "
                "by a trusted key (`fleet publishers list`)")
        clean = validate_labels(selector)
        plan = tuple(parse_steps(list(steps) or [100]))
        parsed = [parse_gate(g) for g in gates]
        check_gates_for_task(parsed, version_task(published))
        checked = tuple(g.text for g in parsed)
        if on_failure not in ("pause", "rollback"):
            raise InvalidInputError(f"on-failure must be pause or rollback; got {on_failure!r}")
        if not 0 <= bake_seconds <= MAX_BAKE_SECONDS:
            raise InvalidInputError(
                f"bake must be 0..{MAX_BAKE_SECONDS} seconds; got {bake_seconds}")
        now = self.ctx.clock()
        devices = [d.id for d in self.store.list_devices()
                   if d.revoked_at is None and matches(d.labels, clean)]
        first = step_devices(model, devices, plan, 0)
        self.store.start_rollout(
            model, version, clean, devices, now, caller.actor, first_step=first, steps=plan,
            bake_seconds=bake_seconds, gates=checked, on_failure=on_failure,
            device_timeout_seconds=self.ctx.config.rollout_device_timeout_seconds,
        )
        self.ctx.push(first, now)
        self.ctx.audit.record(caller, "rollouts.start", target, AuditOutcome.ALLOWED,
                              {"selector": clean, "devices": len(devices), "steps": list(plan),
                               "gates": list(checked), "on_failure": on_failure})
        return self._view(model)

    def act(self, caller: pki.Identity, model: str, action: str) -> RolloutView:
        if action not in ACTIONS:
            raise InvalidInputError(
                f"action must be pause, resume, abort or rollback; got {action!r}")
        self.ctx.authorize(caller, f"rollouts.{action}", model)
        r = self.store.get_rollout(model)
        if r is None:
            raise NotFoundError(f"no rollout for model {model!r}")
        now = self.ctx.clock()
        event = RolloutEvent(action)
        if event is RolloutEvent.RESUME and not version_trusted(self.ctx, r.model, r.version):
            raise PermissionDeniedError(
                f"model {r.model} version {r.version} is no longer signed by the publisher "
                "threshold (a publisher key was revoked); hint: roll out a trusted version")
        history = [*r.history, f"{action} by {caller.actor}"]
        if event in (RolloutEvent.ABORT, RolloutEvent.ROLLBACK):
            members = step_devices(r.model, r.device_ids, r.steps, r.step)
            self._revert(r, members, now, event, history, f"{action} by operator")
        else:
            state = next_state(r.state, event)
            fields: dict[str, Any] = {"state": state.value, "history": history,
                                      "reason": f"{action} by operator"}
            if event is RolloutEvent.RESUME:
                fields["step_started_at"] = now  # a fresh bake for the current step
            self.store.update_rollout(r.id, **fields)
        view = self._view(model)
        self.ctx.audit.record(caller, f"rollouts.{action}", f"{r.model}:{r.version}",
                              AuditOutcome.ALLOWED, {"state": view.rollout.state.value})
        return view

    def get(self, caller: pki.Identity, model: str) -> RolloutView:
        self.ctx.authorize(caller, "rollouts.status", model)
        return self._view(model)

    def _view(self, model: str) -> RolloutView:
        rollout = self.store.get_rollout(model)
        if rollout is None:
            raise NotFoundError(f"no rollout for model {model!r}")
        now = self.ctx.clock()
        views, releases = [], {}
        for device_id in rollout.device_ids:
            device = self.store.get_device(device_id)
            if device is None:
                continue
            views.append(self.ctx.view(device, now))
            release = self.store.get_release(device_id)
            if release is not None:
                releases[device_id] = release
        task = version_task(self.store.get_model_version(model, rollout.version))
        stats = self.store.arm_stats(model)
        quality = tuple(version_quality(stats, rollout.device_ids, v, task)
                        for v in (rollout.version, rollout.previous_version) if v)
        return RolloutView(rollout, views, releases, task, quality)

    # ------------------------------------------------------------------ scheduler
    def tick(self) -> None:
        for rollout in self.store.running_rollouts():
            try:
                self._advance(rollout, self.ctx.clock())
            except Exception:  # one broken rollout must not stop the others
                log.exception("advancing rollout %s of %s failed", rollout.id, rollout.model)

    def judge(self, r: RolloutRecord, members: list[str], failed: int) -> list[GateResult]:
        metrics = gate_metrics(r, members, failed, self.store.arm_stats(r.model),
                               self.store.latest_drift(r.model))
        return judge_gates(r.gates, metrics)

    def _install_states(self, r: RolloutRecord, members: list[str]) -> dict[str, str]:
        states = {}
        for device_id in members:
            device = self.store.get_device(device_id)
            models = device.models if device is not None else []
            states[device_id] = device_progress(models, r.model, r.version).state
        return states

    def _advance(self, r: RolloutRecord, now: float) -> None:
        members = step_devices(r.model, r.device_ids, r.steps, r.step)
        states = self._install_states(r, members)
        late = now - r.step_started_at > r.device_timeout_seconds
        failed = sum(1 for s in states.values() if s in FAILED_INSTALL_STATES)
        unsettled = [d for d, s in states.items()
                     if s != "committed" and s not in FAILED_INSTALL_STATES]
        if unsettled and not late:
            return
        failed += len(unsettled)  # silent past the timeout: counts as failed
        if now - r.step_started_at < r.bake_seconds:
            return
        results = self.judge(r, members, failed)
        history = list(r.history)
        step_label = f"step {r.step + 1} ({r.steps[r.step]}%, {len(members)} devices)"
        if all(g.ok for g in results):
            history.append(f"{step_label} passed: " + "; ".join(g.reason for g in results))
            if r.step + 1 == len(r.steps):
                self.store.update_rollout(r.id, state=next_state(r.state,
                                                                 RolloutEvent.FINISH).value,
                                          history=history, reason="all steps passed")
                log.info("rollout %s v%d completed", r.model, r.version)
                return
            nxt = step_devices(r.model, r.device_ids, r.steps, r.step + 1)
            history.append(f"step {r.step + 2} of {len(r.steps)}: {r.steps[r.step + 1]}% "
                           f"({len(nxt)} devices)")
            self.store.assign_version(r.model, r.version, [d for d in nxt if d not in members])
            self.store.update_rollout(r.id, step=r.step + 1, step_started_at=now,
                                      history=history, reason="")
            self.ctx.push(nxt, now)
            return
        failing = "; ".join(g.reason for g in results if not g.ok)
        history.append(f"{step_label} failed: {failing}")
        if r.on_failure == "rollback":
            self._revert(r, members, now, RolloutEvent.FAIL_ROLLBACK, history,
                         f"gate failed: {failing}")
        else:
            state = next_state(r.state, RolloutEvent.FAIL_PAUSE)
            self.store.update_rollout(r.id, state=state.value, history=history,
                                      reason=f"gate failed: {failing}")
        self.ctx.audit.system(
            f"rollouts.{'rollback' if r.on_failure == 'rollback' else 'pause'}",
            f"{r.model}:{r.version}", {"reason": failing[:500]})

    def _revert(self, r: RolloutRecord, members: list[str], now: float, event: RolloutEvent,
                history: list[str], reason: str) -> None:
        state = next_state(r.state, event)
        reached = members if r.state is not RolloutState.COMPLETED else list(r.device_ids)
        self.store.assign_version(r.model, r.previous_version, reached)
        history.append(f"{len(reached)} devices back to "
                       f"{'v' + str(r.previous_version) if r.previous_version else 'nothing'}")
        self.store.update_rollout(r.id, state=state.value, history=history, reason=reason)
        self.ctx.push(reached, now)
