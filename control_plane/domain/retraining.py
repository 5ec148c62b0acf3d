"""Drift-triggered retraining, pure parts: the policy, when it fires, and the job table.

Policy: the model has drifted when at least ``device_fraction`` of the devices that report
drift for it show ``windows`` consecutive windows (their newest) with a score above
``threshold``. Then the control plane records why and queues one job (never two at once for a
model). A runner (``services/retrain_runner.py``) executes ``trainer run PIPELINE
--bundle-version N``; its bundle is published like any other (publisher signature verified),
then goes out as a canary experiment, or waits for an operator, per policy.

Job table (an illegal move raises and changes nothing)::

    queued --start--> running            queued --fail--> failed (no policy, no samples dir)
    running --fail--> failed             running --reject--> rejected (not better by margin)
    running --canary--> succeeded        running --await--> awaiting-approval

Samples: with ``sample_rate > 0`` the model's release documents let devices contribute
labelled rows (inputs that received feedback; PII columns pseudonymized with the device's own
HMAC key or dropped, as the bundle manifest says). The control plane vets each sample against
the manifest of the version that served it and against the store's region policy (the
pipeline's ``[store] allowed_regions``, else the store's ``policy.toml``): a refused sample is
counted, never stored. A job hands its samples to ``trainer run --samples``, which ingests
them as a new snapshot (lineage: the devices and their model versions) and trains on base data
plus samples; ``--baseline`` makes the trainer compare the new model with the current one on
the samples' held-out rows (the drifted data), and the job publishes only when the new model
beats the current one by ``margin``.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from control_plane.domain.records import DriftWindowRecord, JobState
from fleetcore.errors import InvalidInputError

__all__ = [
    "ACTIVE_JOB_STATES",
    "DEFAULT_POLICY",
    "DriftPolicy",
    "IllegalJobMoveError",
    "JobEvent",
    "check_policy",
    "drift_policy",
    "next_job_state",
    "policy_fires",
]


@dataclass(frozen=True)
class DriftPolicy:
    model: str
    pipeline: str  # path of the model's PIPELINE.toml on the control-plane host
    threshold: float = 0.2
    device_fraction: float = 0.5
    windows: int = 2
    canary_weight: float = 0.1
    auto_canary: bool = True  # False: the new version waits for an operator
    sample_rate: float = 0.0  # share of labelled requests devices contribute as samples
    # What the new model must gain on the drifted data: accuracy points in [0, 1) for a
    # classifier; for a regression model the MAE reduction, in the target's units (>= 0).
    margin: float = 0.0


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


DEFAULT_POLICY = DriftPolicy(model="", pipeline="")


def drift_policy(model: str, pipeline: str, *, threshold: float = 0.0,
                 device_fraction: float = 0.0, windows: int = 0, canary_weight: float = 0.0,
                 auto_canary: bool = True, sample_rate: float = 0.0,
                 margin: float = 0.0) -> DriftPolicy:
    """A policy from an operator's request: 0 (protobuf's "not set") takes the default."""
    d = DEFAULT_POLICY
    return DriftPolicy(model=model, pipeline=pipeline, threshold=threshold or d.threshold,
                       device_fraction=device_fraction or d.device_fraction,
                       windows=windows or d.windows, canary_weight=canary_weight or d.canary_weight,
                       auto_canary=auto_canary, sample_rate=sample_rate, margin=margin)


def check_policy(policy: DriftPolicy, task: str = "classification") -> DriftPolicy:
    """Refuse a policy whose numbers are out of range (the pipeline file is the service's);
    ``task``: the model's (its margin is accuracy points or target units)."""
    checks = [(policy.threshold > 0, "threshold must be > 0"),
              (0 < policy.device_fraction <= 1, "fraction must be in (0, 1]"),
              (1 <= policy.windows <= 100, "windows must be 1..100"),
              (0 < policy.canary_weight < 1, "canary weight must be in (0, 1)"),
              (0 <= policy.sample_rate <= 1, "sample rate must be in [0, 1]"),
              (0 <= policy.margin < 1 if task != "regression" else
               0 <= policy.margin < math.inf,
               "margin must be in [0, 1)" if task != "regression" else
               "margin must be a finite MAE reduction >= 0 (target units)")]
    for ok, message in checks:
        if not ok:
            raise InvalidInputError(f"drift policy: {message}")
    return policy


class JobEvent(enum.StrEnum):
    START = "start"
    FAIL = "fail"
    REJECT = "reject"
    CANARY = "canary"
    AWAIT = "await"


_J, _JE = JobState, JobEvent
JOB_TRANSITIONS: dict[tuple[JobState, JobEvent], JobState] = {
    (_J.QUEUED, _JE.START): _J.RUNNING,
    (_J.QUEUED, _JE.FAIL): _J.FAILED,
    (_J.RUNNING, _JE.FAIL): _J.FAILED,
    (_J.RUNNING, _JE.REJECT): _J.REJECTED,
    (_J.RUNNING, _JE.CANARY): _J.SUCCEEDED,
    (_J.RUNNING, _JE.AWAIT): _J.AWAITING_APPROVAL,
}
ACTIVE_JOB_STATES = (JobState.QUEUED, JobState.RUNNING)


class IllegalJobMoveError(InvalidInputError):
    """The job's state does not allow that move."""


def next_job_state(state: JobState, event: JobEvent) -> JobState:
    try:
        return JOB_TRANSITIONS[(state, event)]
    except KeyError:
        raise IllegalJobMoveError(f"a {state} retraining job cannot {event}") from None
