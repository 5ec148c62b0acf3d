"""Telemetry from devices: validated into rows (``domain/telemetry.py``), samples vetted by the
retraining service, stored once per (device, seq); new arm statistics may decide an experiment
and new drift windows may start a retraining job."""

from __future__ import annotations

import logging

from control_plane.domain.records import (
    ArmStatsRecord,
    DriftWindowRecord,
    ReportRefusal,
    TelemetryRecord,
)
from control_plane.domain.telemetry import MALFORMED, check_reports, derive
from control_plane.services.context import Context
from control_plane.services.experiments import ExperimentService
from control_plane.services.retraining import RetrainService
from fleetcore import pki

__all__ = ["TelemetryService"]

log = logging.getLogger(__name__)


class TelemetryService:
    def __init__(self, ctx: Context, experiments: ExperimentService,
                 retraining: RetrainService) -> None:
        self.ctx = ctx
        self.store = ctx.store
        self.experiments = experiments
        self.retraining = retraining

    def ingest(self, caller: pki.Identity, records: list[TelemetryRecord], dropped: int,
               depth: int) -> list[int]:
        """Store a batch; return the seqs acknowledged (a malformed payload is acknowledged
        too: resending would not fix it)."""
        derived, problems = derive(caller.name, records)
        for seq, problem in problems.items():
            log.warning("telemetry %s/%d not understood: %s", caller.name, seq, problem)
        arms = {(a.model, a.version) for a in self.store.device_arms(caller.name)}
        derived = check_reports(caller.name, records, derived, problems, arms, self.ctx.clock())
        for seq, row in derived.items():
            if isinstance(row, ReportRefusal) and row.reason != MALFORMED:
                log.warning("telemetry %s/%d refused: %s", caller.name, seq, row.reason)
        records, derived = self.retraining.vet(caller.name, records, derived)
        acked = self.store.ingest_telemetry(caller.name, records, derived, self.ctx.clock(),
                                            dropped, depth)
        for model in {r.model for r in derived.values() if isinstance(r, ArmStatsRecord)}:
            self.experiments.evaluate(model)
        for model in {r.model for r in derived.values() if isinstance(r, DriftWindowRecord)}:
            self.retraining.check(model)
        return acked

    def drift(self, caller: pki.Identity, model: str) -> list[DriftWindowRecord]:
        """Each device's newest window (of one model, or of all)."""
        self.ctx.authorize(caller, "drift.read", model)
        return self.store.latest_drift(model or None)
