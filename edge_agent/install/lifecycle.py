"""The install lifecycle of one model version on an agent, as data (docs/design.md §5).

Rules (the table below is the whole truth; ``next_state`` only looks things up):

* downloading -download_complete-> verifying -verified-> staged -smoke_start-> smoke-testing
  -smoke_passed-> active (probation) -probation_passed-> committed.
* ``fail`` from any state before active (downloading, verifying, staged, smoke-testing) -> failed.
* ``regress`` from active -> rolled-back: probation found a regression, the agent serves the
  previous committed version again.
* ``superseded`` from active -> failed: a newer version was activated before this one finished
  its probation, so it never became committed (and is no rollback target).
* committed, failed and rolled-back are final. Whether a committed version is still the one
  being served is not a state: ``active.json`` says which version serves.

An illegal move raises ``IllegalTransitionError`` and changes nothing (the function is pure).
"""

from __future__ import annotations

from enum import StrEnum

from fleetcore.errors import EdgefleetError

__all__ = [
    "FINAL_STATES",
    "TRANSIENT_STATES",
    "TRANSITIONS",
    "IllegalTransitionError",
    "InstallEvent",
    "InstallState",
    "next_state",
]


class InstallState(StrEnum):
    DOWNLOADING = "downloading"
    VERIFYING = "verifying"
    STAGED = "staged"
    SMOKE_TESTING = "smoke-testing"
    ACTIVE = "active"
    COMMITTED = "committed"
    FAILED = "failed"
    ROLLED_BACK = "rolled-back"


class InstallEvent(StrEnum):
    DOWNLOAD_COMPLETE = "download_complete"
    VERIFIED = "verified"
    SMOKE_START = "smoke_start"
    SMOKE_PASSED = "smoke_passed"
    PROBATION_PASSED = "probation_passed"
    FAIL = "fail"
    REGRESS = "regress"
    SUPERSEDED = "superseded"


class IllegalTransitionError(EdgefleetError):
    """An event that the install state machine does not allow in the current state."""


_S = InstallState
_E = InstallEvent

TRANSITIONS: dict[tuple[InstallState, InstallEvent], InstallState] = {
    (_S.DOWNLOADING, _E.DOWNLOAD_COMPLETE): _S.VERIFYING,
    (_S.VERIFYING, _E.VERIFIED): _S.STAGED,
    (_S.STAGED, _E.SMOKE_START): _S.SMOKE_TESTING,
    (_S.SMOKE_TESTING, _E.SMOKE_PASSED): _S.ACTIVE,
    (_S.ACTIVE, _E.PROBATION_PASSED): _S.COMMITTED,
    (_S.ACTIVE, _E.REGRESS): _S.ROLLED_BACK,
    (_S.ACTIVE, _E.SUPERSEDED): _S.FAILED,
    (_S.DOWNLOADING, _E.FAIL): _S.FAILED,
    (_S.VERIFYING, _E.FAIL): _S.FAILED,
    (_S.STAGED, _E.FAIL): _S.FAILED,
    (_S.SMOKE_TESTING, _E.FAIL): _S.FAILED,
}

FINAL_STATES = frozenset({_S.COMMITTED, _S.FAILED, _S.ROLLED_BACK})
# States that only exist while an install runs: after a restart they mean "interrupted".
TRANSIENT_STATES = frozenset({_S.DOWNLOADING, _S.VERIFYING, _S.STAGED, _S.SMOKE_TESTING})


def next_state(state: InstallState, event: InstallEvent) -> InstallState:
    """The state after ``event`` in ``state``; raise ``IllegalTransitionError`` if not allowed."""
    try:
        return TRANSITIONS[(InstallState(state), InstallEvent(event))]
    except (KeyError, ValueError):
        raise IllegalTransitionError(
            f"install event {str(event)!r} is not allowed in state {str(state)!r}"
        ) from None
