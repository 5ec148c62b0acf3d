"""Staged rollouts, pure parts: the state machine, step membership and the gates.

State machine (a table; an illegal move raises and changes nothing)::

    running --advance--> running (next step) | completed (after the last step)
    running --gate_failed(pause)--> paused      running --gate_failed(rollback)--> rolled-back
    running --pause--> paused                   paused --resume--> running
    running|paused --abort--> aborted           running|paused|completed --rollback--> rolled-back
    running|paused --supersede--> superseded

Step membership is deterministic and stable: devices are ordered by SHA-256(model, device id)
and step k takes the first ceil(percent_k / 100 * N) of them, so the canary devices stay in
every later step. Gates (``metric op value``) are judged on the step's devices; a gate whose
metric lacks its minimum sample count does not pass. ``accuracy_delta`` (a classifier) is the
new version's accuracy minus the previous one's; ``mae_delta`` (a regression model) is the new
version's mean absolute error minus the previous one's, in the target's units (``mae_delta<=0``:
no worse than before), from the error sums of labelled requests.
"""

from __future__ import annotations

import enum
import hashlib
import itertools
import math
import operator
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from control_plane.domain.experiments import ArmEvidence, mae_interval, wilson_interval
from control_plane.domain.records import (
    ArmStatsRecord,
    DriftWindowRecord,
    InstalledModel,
    RolloutRecord,
    RolloutState,
)
from fleetcore.errors import InvalidInputError

__all__ = [
    "FAILED_INSTALL_STATES",
    "GATE_METRICS",
    "Gate",
    "GateResult",
    "IllegalRolloutMoveError",
    "RolloutEvent",
    "RolloutState",
    "VersionQuality",
    "check_gates_for_task",
    "device_progress",
    "first_steps",
    "gate_metrics",
    "judge_gates",
    "next_state",
    "parse_gate",
    "parse_steps",
    "step_devices",
    "version_quality",
]


class RolloutEvent(enum.StrEnum):
    ADVANCE = "advance"
    FINISH = "finish"
    FAIL_PAUSE = "gate_failed_pause"
    FAIL_ROLLBACK = "gate_failed_rollback"
    PAUSE = "pause"
    RESUME = "resume"
    ABORT = "abort"
    ROLLBACK = "rollback"
    SUPERSEDE = "supersede"


_S, _E = RolloutState, RolloutEvent
TRANSITIONS: dict[tuple[RolloutState, RolloutEvent], RolloutState] = {
    (_S.RUNNING, _E.ADVANCE): _S.RUNNING,
    (_S.RUNNING, _E.FINISH): _S.COMPLETED,
    (_S.RUNNING, _E.FAIL_PAUSE): _S.PAUSED,
    (_S.RUNNING, _E.FAIL_ROLLBACK): _S.ROLLED_BACK,
    (_S.RUNNING, _E.PAUSE): _S.PAUSED,
    (_S.PAUSED, _E.RESUME): _S.RUNNING,
    (_S.RUNNING, _E.ABORT): _S.ABORTED,
    (_S.PAUSED, _E.ABORT): _S.ABORTED,
    (_S.RUNNING, _E.ROLLBACK): _S.ROLLED_BACK,
    (_S.PAUSED, _E.ROLLBACK): _S.ROLLED_BACK,
    (_S.COMPLETED, _E.ROLLBACK): _S.ROLLED_BACK,
    (_S.RUNNING, _E.SUPERSEDE): _S.SUPERSEDED,
    (_S.PAUSED, _E.SUPERSEDE): _S.SUPERSEDED,
}


class IllegalRolloutMoveError(InvalidInputError):
    """The rollout's state does not allow that action."""


def next_state(state: RolloutState, event: RolloutEvent) -> RolloutState:
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        raise IllegalRolloutMoveError(f"a {state} rollout cannot {event}") from None


def parse_steps(text: str | Sequence[int]) -> list[int]:
    """``"5,25,100"`` -> [5, 25, 100]: increasing percentages ending at 100."""
    values = [int(v) for v in (text.split(",") if isinstance(text, str) else text)]
    if not values or values[-1] != 100 or any(not 0 < v <= 100 for v in values) or any(
        a >= b for a, b in itertools.pairwise(values)
    ):
        raise InvalidInputError(
            f"steps must be increasing percentages ending at 100 (e.g. 5,25,100); got {values}"
        )
    return values


def step_devices(model: str, device_ids: Sequence[str], steps: Sequence[int],
                 step: int) -> list[str]:
    """The devices in step ``step`` (cumulative: every earlier step's devices included)."""
    ordered = sorted(device_ids, key=lambda d: hashlib.sha256(f"{model}\0{d}".encode()).digest())
    count = max(1, math.ceil(steps[step] / 100 * len(ordered))) if ordered else 0
    return ordered[:count]


# metric -> (minimum samples it needs, what the samples are)
GATE_METRICS: dict[str, tuple[int, str]] = {
    "install_failures": (0, "devices"),
    "error_rate": (50, "requests"),
    "p95_ms": (50, "requests"),
    "drift_score": (1, "windows"),
    "accuracy_delta": (50, "labelled requests per version"),
    "mae_delta": (50, "labelled requests per version"),
}
_OPS: dict[str, Callable[[float, float], bool]] = {
    "<=": operator.le, ">=": operator.ge, "<": operator.lt, ">": operator.gt,
}
_GATE_RE = re.compile(r"^\s*([a-z][a-z0-9_]*)\s*(<=|>=|<|>)\s*(-?[0-9.]+)\s*$")


@dataclass(frozen=True)
class Gate:
    metric: str
    op: str
    threshold: float

    @property
    def text(self) -> str:
        return f"{self.metric}{self.op}{self.threshold:g}"

    def judge(self, value: float | None, samples: int) -> GateResult:
        need = GATE_METRICS[self.metric][0]
        if value is None or samples < need:
            return GateResult(self.text, False, value, samples,
                              f"not enough data: {samples} of {need} "
                              f"{GATE_METRICS[self.metric][1]}")
        ok = _OPS[self.op](value, self.threshold)
        return GateResult(self.text, ok, value, samples,
                          f"{self.metric} = {value:.4g} ({'meets' if ok else 'fails'} "
                          f"{self.op} {self.threshold:g})")


@dataclass(frozen=True)
class GateResult:
    gate: str
    ok: bool
    value: float | None
    samples: int
    reason: str


def parse_gate(text: str) -> Gate:
    m = _GATE_RE.match(text)
    if not m or m.group(1) not in GATE_METRICS:
        raise InvalidInputError(
            f"gate must be METRIC OP VALUE with METRIC one of {sorted(GATE_METRICS)} and OP one "
            f"of <, <=, >, >= (e.g. error_rate<0.05); got {text!r}"
        )
    return Gate(m.group(1), m.group(2), float(m.group(3)))


# Gates that mean something for one task only: a classifier has no error sums, a regression
# model no correct answers (its accuracy_delta would be a constant 0).
_TASK_METRICS = {"accuracy_delta": "classification", "mae_delta": "regression"}


def check_gates_for_task(gates: Sequence[Gate], task: str) -> None:
    """Refuse a gate whose metric the model's task does not have."""
    for gate in gates:
        wanted = _TASK_METRICS.get(gate.metric)
        if wanted is not None and wanted != task:
            other = "mae_delta" if task == "regression" else "accuracy_delta"
            raise InvalidInputError(f"gate {gate.text} needs a {wanted} model; this one is "
                                    f"a {task} model (use {other})")


# What a device reports when the version did not take (a local rollback counts as failed).
FAILED_INSTALL_STATES = ("failed", "rolled-back")


def first_steps(model: str, device_ids: Sequence[str], steps: Sequence[int]) -> dict[str, int]:
    """The step (1-based) in which each device gets the new version."""
    out: dict[str, int] = {}
    for k in range(len(steps)):
        for device_id in step_devices(model, device_ids, steps, k):
            out.setdefault(device_id, k + 1)
    return out


@dataclass(frozen=True)
class DeviceProgress:
    reported_version: int  # the version it serves (0: none of this model)
    state: str  # its install state of the rollout's version ("pending": not reported yet)
    reason: str


def device_progress(models: Sequence[InstalledModel], model: str,
                    version: int) -> DeviceProgress:
    """Where a device stands in a rollout of ``model`` to ``version``, from its report."""
    reported = [m for m in models if m.name == model]
    serving = next((m for m in reported if m.serving), None)
    desired = next((m for m in reported if m.version == version), None)
    return DeviceProgress(serving.version if serving else 0,
                          desired.state if desired else "pending",
                          desired.reason if desired else "")


def gate_metrics(rollout: RolloutRecord, members: Sequence[str], failed: int,
                 stats: Sequence[ArmStatsRecord], windows: Sequence[DriftWindowRecord],
                 ) -> dict[str, tuple[float | None, int]]:
    """Each gate metric of the step's devices: (value or None, samples behind it)."""
    inside = set(members)
    stats = [s for s in stats if s.device_id in inside]
    new = [s for s in stats if s.version == rollout.version]
    old = [s for s in stats if s.version == rollout.previous_version]
    requests = sum(s.requests for s in new)
    out: dict[str, tuple[float | None, int]] = {
        "install_failures": (float(failed), len(members)),
        "error_rate": (sum(s.errors for s in new) / requests if requests else None, requests),
        "p95_ms": (sum(s.p95_ms * s.requests for s in new) / requests if requests else None,
                   requests),
    }
    mine = [w for w in windows if w.device_id in inside and w.version == rollout.version]
    out["drift_score"] = (sum(w.score for w in mine) / len(mine) if mine else None, len(mine))
    new_l, old_l = sum(s.labelled for s in new), sum(s.labelled for s in old)
    delta = (sum(s.correct for s in new) / new_l - sum(s.correct for s in old) / old_l
             if new_l and old_l else None)
    out["accuracy_delta"] = (delta, min(new_l, old_l))
    mae_delta = (sum(s.abs_error_sum for s in new) / new_l - sum(s.abs_error_sum for s in old)
                 / old_l if new_l and old_l else None)
    out["mae_delta"] = (mae_delta, min(new_l, old_l))
    return out


@dataclass(frozen=True)
class VersionQuality:
    """What feedback says of one version on a rollout's devices (plain sums, as the gates
    take them): a classifier's accuracy with its Wilson interval, or a regression model's MAE
    with its t interval; None before any labelled request."""

    version: int
    labelled: int
    accuracy: float | None
    accuracy_low: float
    accuracy_high: float
    mae: float | None
    mae_low: float
    mae_high: float


def version_quality(stats: Sequence[ArmStatsRecord], devices: Sequence[str], version: int,
                    task: str) -> VersionQuality:
    inside = set(devices)
    rows = [s for s in stats if s.device_id in inside and s.version == version]
    evidence = ArmEvidence(sum(s.correct for s in rows), sum(s.labelled for s in rows),
                           len(rows), math.fsum(s.abs_error_sum for s in rows),
                           math.fsum(s.sq_error_sum for s in rows))
    n = evidence.labelled
    low, high = wilson_interval(evidence.correct, n)
    mae_low, mae_high = mae_interval(evidence)
    regression = task == "regression"
    return VersionQuality(
        version, n, evidence.correct / n if n and not regression else None, low, high,
        evidence.abs_error_sum / n if n and regression else None, mae_low, mae_high)


def judge_gates(gates: Sequence[str],
                metrics: Mapping[str, tuple[float | None, int]]) -> list[GateResult]:
    """Every gate's verdict; ``install_failures<=0`` is always one unless a gate names it."""
    texts = list(gates)
    if not any(t.startswith("install_failures") for t in texts):
        texts.insert(0, "install_failures<=0")
    results = []
    for text in texts:
        gate = parse_gate(text)
        value, samples = metrics[gate.metric]
        results.append(gate.judge(value, samples))
    return results
