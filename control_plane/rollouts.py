"""Advance staged rollouts: the scheduler calls ``tick``; operators pause, resume, abort and
roll back. All state is in storage, so a restarted control plane carries on where it was.

A step is judged once every device in it has settled — reported the new version committed, or
failed it (an install failure, a local rollback, or silence past the device timeout counts as
failed) — and the bake time has passed. Then every gate must pass (``install_failures<=0`` is
always one), or the rollout pauses or rolls back per its policy. Rolling back (or aborting)
gives every device that got the new version its previous version again: no device is left
between versions.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from control_plane.domain import AuditOutcome, RolloutRecord
from control_plane.rollout_plan import (
    GateResult,
    RolloutEvent,
    RolloutState,
    next_state,
    parse_gate,
    step_devices,
)

if TYPE_CHECKING:
    from control_plane.handlers import Handlers

__all__ = ["RolloutController"]

log = logging.getLogger(__name__)

_FAILED = ("failed", "rolled-back")


class RolloutController:
    def __init__(self, handlers: Handlers, clock: Callable[[], float]) -> None:
        self.h = handlers
        self.store = handlers.store
        self.clock = clock

    # ------------------------------------------------------------------ scheduler
    def tick(self) -> None:
        for rollout in self.store.running_rollouts():
            try:
                self._advance(rollout, self.clock())
            except Exception:  # one broken rollout must not stop the others
                log.exception("advancing rollout %s of %s failed", rollout.id, rollout.model)

    def _device_states(self, r: RolloutRecord, members: list[str]) -> dict[str, str]:
        states = {}
        for device_id in members:
            device = self.store.get_device(device_id)
            reported = [m for m in (device.models if device else [])
                        if m.get("name") == r.model and m.get("version") == r.version]
            states[device_id] = str(reported[0]["state"]) if reported else "pending"
        return states

    def _metrics(self, r: RolloutRecord, members: list[str],
                 failed: int) -> dict[str, tuple[float | None, int]]:
        stats = [s for s in self.store.arm_stats(r.model) if s.device_id in members]
        new = [s for s in stats if s.version == r.version]
        old = [s for s in stats if s.version == r.previous_version]
        requests = sum(s.requests for s in new)
        out: dict[str, tuple[float | None, int]] = {
            "install_failures": (float(failed), len(members)),
            "error_rate": (sum(s.errors for s in new) / requests if requests else None, requests),
            "p95_ms": (sum(s.p95_ms * s.requests for s in new) / requests if requests else None,
                       requests),
        }
        windows = [w for w in self.store.latest_drift(r.model)
                   if w.device_id in members and w.version == r.version]
        out["drift_score"] = (sum(w.score for w in windows) / len(windows) if windows else None,
                              len(windows))
        new_l, old_l = sum(s.labelled for s in new), sum(s.labelled for s in old)
        delta = (sum(s.correct for s in new) / new_l - sum(s.correct for s in old) / old_l
                 if new_l and old_l else None)
        out["accuracy_delta"] = (delta, min(new_l, old_l))
        return out

    def judge(self, r: RolloutRecord, members: list[str], failed: int) -> list[GateResult]:
        texts = list(r.gates)
        if not any(t.startswith("install_failures") for t in texts):
            texts.insert(0, "install_failures<=0")
        metrics = self._metrics(r, members, failed)
        results = []
        for text in texts:
            gate = parse_gate(text)
            value, samples = metrics[gate.metric]
            results.append(gate.judge(value, samples))
        return results

    def _advance(self, r: RolloutRecord, now: float) -> None:
        members = step_devices(r.model, r.device_ids, r.steps, r.step)
        states = self._device_states(r, members)
        late = now - r.step_started_at > r.device_timeout_seconds
        failed = sum(1 for s in states.values() if s in _FAILED)
        unsettled = [d for d, s in states.items() if s != "committed" and s not in _FAILED]
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
                self.store.update_rollout(r.id, state=next_state(RolloutState(r.state),
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
            self._push(nxt, now)
            return
        failing = "; ".join(g.reason for g in results if not g.ok)
        history.append(f"{step_label} failed: {failing}")
        if r.on_failure == "rollback":
            self._revert(r, members, now, RolloutEvent.FAIL_ROLLBACK, history,
                         f"gate failed: {failing}")
        else:
            state = next_state(RolloutState(r.state), RolloutEvent.FAIL_PAUSE)
            self.store.update_rollout(r.id, state=state.value, history=history,
                                      reason=f"gate failed: {failing}")
        self.h.audit_system(f"rollouts.{'rollback' if r.on_failure == 'rollback' else 'pause'}",
                            f"{r.model}:{r.version}", {"reason": failing[:500]})

    def _revert(self, r: RolloutRecord, members: list[str], now: float, event: RolloutEvent,
                history: list[str], reason: str) -> None:
        state = next_state(RolloutState(r.state), event)
        reached = members if r.state != "completed" else list(r.device_ids)
        self.store.assign_version(r.model, r.previous_version, reached)
        history.append(f"{len(reached)} devices back to "
                       f"{'v' + str(r.previous_version) if r.previous_version else 'nothing'}")
        self.store.update_rollout(r.id, state=state.value, history=history, reason=reason)
        self._push(reached, now)

    def _push(self, device_ids: list[str], now: float) -> None:
        for device_id in device_ids:
            self.h.releases.current(device_id, now)

    # ------------------------------------------------------------------ operators
    def act(self, r: RolloutRecord, action: str, actor: Any) -> RolloutRecord:
        now = self.clock()
        event = RolloutEvent(action)
        history = [*r.history, f"{action} by {getattr(actor, 'actor', actor)}"]
        if event in (RolloutEvent.ABORT, RolloutEvent.ROLLBACK):
            members = step_devices(r.model, r.device_ids, r.steps, r.step)
            self._revert(r, members, now, event, history, f"{action} by operator")
        else:
            state = next_state(RolloutState(r.state), event)
            fields: dict[str, Any] = {"state": state.value, "history": history,
                                      "reason": f"{action} by operator"}
            if event is RolloutEvent.RESUME:
                fields["step_started_at"] = now  # a fresh bake for the current step
            self.store.update_rollout(r.id, **fields)
        updated = self.store.get_rollout(r.model)
        assert updated is not None
        self.h.audit_action(actor, f"rollouts.{action}", f"{r.model}:{r.version}",
                            AuditOutcome.ALLOWED, {"state": updated.state})
        return updated
