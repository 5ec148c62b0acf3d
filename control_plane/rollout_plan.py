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
metric lacks its minimum sample count does not pass.
"""

from __future__ import annotations

import enum
import hashlib
import itertools
import math
import operator
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from fleetcore.errors import InvalidInputError

__all__ = [
    "GATE_METRICS",
    "Gate",
    "GateResult",
    "IllegalRolloutMoveError",
    "RolloutEvent",
    "RolloutState",
    "next_state",
    "parse_gate",
    "parse_steps",
    "step_devices",
]


class RolloutState(enum.StrEnum):
    RUNNING = "running"
    PAUSED = "paused"
    COMPLETED = "completed"
    ABORTED = "aborted"
    ROLLED_BACK = "rolled-back"
    SUPERSEDED = "superseded"


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
