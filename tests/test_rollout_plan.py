"""Staged rollouts, pure parts: transitions, stable step membership, gates."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import pytest

from control_plane.domain.rollout_plan import (
    TRANSITIONS,
    IllegalRolloutMoveError,
    RolloutEvent,
    RolloutState,
    next_state,
    parse_gate,
    parse_steps,
    step_devices,
)
from fleetcore.errors import InvalidInputError


def test_every_illegal_move_raises() -> None:
    for state, event in itertools.product(RolloutState, RolloutEvent):
        if (state, event) in TRANSITIONS:
            assert next_state(state, event) == TRANSITIONS[(state, event)]
        else:
            with pytest.raises(IllegalRolloutMoveError):
                next_state(state, event)


def test_final_states_have_no_way_out_but_rollback_of_completed() -> None:
    for state in (RolloutState.ABORTED, RolloutState.ROLLED_BACK, RolloutState.SUPERSEDED):
        assert not [e for (s, e) in TRANSITIONS if s == state]
    assert [e for (s, e) in TRANSITIONS if s == RolloutState.COMPLETED] == [RolloutEvent.ROLLBACK]


def test_step_membership_is_stable_and_cumulative() -> None:
    devices = [f"dev-{i:04d}" for i in range(200)]
    steps = [5, 25, 100]
    groups = [step_devices("digits", devices, steps, k) for k in range(3)]
    assert [len(g) for g in groups] == [10, 50, 200]
    assert set(groups[0]) <= set(groups[1]) <= set(groups[2])
    # Another order of the same fleet, or more devices joining, keeps the canary stable.
    assert step_devices("digits", list(reversed(devices)), steps, 0) == groups[0]
    assert step_devices("digits", devices[:1], steps, 0) == devices[:1]  # at least one device
    assert step_devices("other", devices, steps, 0) != groups[0]  # per model


@pytest.mark.parametrize("text", ["50,25,100", "5,25", "0,100", "5,5,100", "x"],
                         ids=["decreasing", "no-100", "zero", "repeat", "junk"])
def test_bad_steps_are_refused(text: str) -> None:
    with pytest.raises((InvalidInputError, ValueError)):
        parse_steps(text)


@dataclass(frozen=True)
class GateCase:
    text: str
    value: float | None
    samples: int
    ok: bool


GATES = [
    GateCase("error_rate<0.05", 0.01, 100, True),
    GateCase("error_rate<0.05", 0.2, 100, False),
    GateCase("error_rate<0.05", 0.0, 10, False),  # too few requests: does not pass
    GateCase("p95_ms<=50", 12.0, 500, True),
    GateCase("accuracy_delta>=-0.01", -0.05, 200, False),
    GateCase("install_failures<=0", 0, 3, True),
    GateCase("install_failures<=0", 1, 3, False),
    GateCase("drift_score<0.3", None, 0, False),
]


@pytest.mark.parametrize("case", GATES, ids=lambda c: f"{c.text}-{c.value}-{c.samples}")
def test_gates(case: GateCase) -> None:
    result = parse_gate(case.text).judge(case.value, case.samples)
    assert result.ok is case.ok, result.reason


@pytest.mark.parametrize("text", ["latency<5", "error_rate=0.1", "error_rate<x", ""])
def test_bad_gates_are_refused(text: str) -> None:
    with pytest.raises(InvalidInputError):
        parse_gate(text)
