"""Telemetry from devices: validated into rows (``domain/telemetry.py``), samples vetted by the
retraining service, stored once per (device, seq); new arm statistics may decide an experiment
and new drift windows may start a retraining job."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from control_plane.domain.enrollment import DenialTally
from control_plane.domain.quota import QuotaLimits, Quotas
from control_plane.domain.record_columns import RecordColumns, Seqs, TelemetryWrite, as_columns
from control_plane.domain.records import (
    ArmStatsRecord,
    AuditOutcome,
    DriftWindowRecord,
    ReportRefusal,
    TelemetryRecord,
)
from control_plane.domain.telemetry import (
    KINDS,
    MALFORMED,
    MAX_BATCH_RECORDS,
    OVER_QUOTA,
    check_reports,
    counter,
    derive,
    screen,
)
from control_plane.services.batch_log import warn_batch
from control_plane.services.context import Context
from control_plane.services.experiments import ExperimentService
from control_plane.services.retraining import RetrainService
from fleetcore import pki
from fleetcore.errors import EdgefleetError, InvalidInputError, RateLimitedError

__all__ = ["TelemetryService"]

log = logging.getLogger(__name__)

# Over-quota refusals reach the per-device counters and the audit log at most this often per
# device (carrying how many records were refused since), so a flood cannot make the control
# plane write for every refused batch.
QUOTA_REPORT_SECONDS = 60.0
T = TypeVar("T")
# A batch's records: as columns (what the API edge makes), or records (tests, tools).
Records = Sequence[TelemetryRecord] | RecordColumns
EXPIRE_BATCH_ROWS = 10_000


class TelemetryService:
    def __init__(self, ctx: Context, experiments: ExperimentService,
                 retraining: RetrainService) -> None:
        self.ctx = ctx
        self.store = ctx.store
        self.experiments = experiments
        self.retraining = retraining
        cfg = ctx.config
        self.quotas = Quotas(QuotaLimits(
            cfg.telemetry_records_per_second, cfg.telemetry_bytes_per_second,
            cfg.telemetry_burst_records, cfg.telemetry_burst_bytes))
        self._over: dict[str, Counter[str]] = {}  # device -> kind -> records refused, unsaved
        self._tallies: dict[str, DenialTally] = {}

    async def ingest(self, caller: pki.Identity, records: Records,
                     dropped: int, depth: int) -> list[int]:
        """Store a batch; return the seqs acknowledged. A device's quota admits the batch from
        its start: what does not fit is not acknowledged (the agent sends it again later), and
        a batch of which nothing fits is refused (``RateLimitedError``). Of what is admitted,
        everything is acknowledged, refused records too (resending would not fix them). The
        store write runs off the event loop where the store allows it
        (``Store.writes_off_loop``); the checks and what follows the write stay on the loop."""
        write, acked = self._vetted(caller, records, dropped, depth)
        await self._off_loop(self.store.ingest_telemetry_many, [write])
        self._judge([write])
        return acked.tolist()

    async def ingest_many(
            self, batches: Sequence[tuple[pki.Identity, Records, int, int]]
    ) -> list[Seqs | Exception]:
        """``ingest`` for several batches (caller, records, dropped, depth) with one store
        transaction (group commit); per batch, its acknowledged seqs or why it was refused. A
        batch refused by the checks is left out; when the group's transaction fails, each
        batch is written alone, so one batch the store refuses cannot lose the others."""
        out, vetted = self._vetted_many(batches)
        if vetted:
            self._judge(await self._off_loop(self._write_group, out, vetted))
        return out

    async def _off_loop(self, fn: Callable[..., T], *args: Any) -> T:
        if self.store.writes_off_loop:
            return await asyncio.to_thread(fn, *args)
        return fn(*args)

    def _vetted_many(self, batches: Sequence[tuple[pki.Identity, Records, int, int]]
                     ) -> tuple[list[Seqs | Exception],
                                list[tuple[int, TelemetryWrite, Seqs]]]:
        out: list[Seqs | Exception] = []
        vetted: list[tuple[int, TelemetryWrite, Seqs]] = []
        for caller, records, dropped, depth in batches:
            try:
                write, acked = self._vetted(caller, records, dropped, depth)
            except EdgefleetError as exc:
                out.append(exc)
                continue
            vetted.append((len(out), write, acked))
            out.append(acked)
        return out, vetted

    def _write_group(self, out: list[Seqs | Exception],
                     vetted: list[tuple[int, TelemetryWrite, Seqs]]
                     ) -> list[TelemetryWrite]:
        """Store the vetted writes in one transaction, else one by one; a write the store
        refuses replaces its entry of ``out``. Return the writes stored."""
        try:
            self.store.ingest_telemetry_many([w for _, w, _ in vetted])
            stored = [w for _, w, _ in vetted]
        except Exception:
            log.warning("telemetry: a group of %d batches failed in one transaction; writing "
                        "them one by one", len(vetted), exc_info=True)
            stored = []
            for i, write, _ in vetted:
                try:
                    self.store.ingest_telemetry_many([write])
                except Exception as exc:
                    log.exception("telemetry batch of %s could not be stored", write.device_id)
                    out[i] = exc
                    continue
                stored.append(write)
        return stored

    def _vetted(self, caller: pki.Identity, batch: Records, dropped: int,
                depth: int) -> tuple[TelemetryWrite, Seqs]:
        """The checks of ``ingest``: what to write, and the seqs to acknowledge once it is."""
        records = as_columns(batch)
        if len(records) > MAX_BATCH_RECORDS:
            raise InvalidInputError(
                f"telemetry batch has {len(records)} records; the limit is {MAX_BATCH_RECORDS}")
        now = self.ctx.clock()
        admitted = self.quotas.admit(caller.name, records, now)
        if admitted < len(records):
            self._over_quota(caller, records.kinds()[admitted:], now)
        if len(records) and not admitted:
            wait = self.quotas.retry_after(caller.name, records.records()[0])
            raise RateLimitedError(
                f"telemetry quota of device {caller.name} is used up ("
                f"{self.quotas.limits.records_per_second:g} records and "
                f"{self.quotas.limits.bytes_per_second:g} bytes a second); retry in "
                f"{max(wait, 1.0):.0f}s")
        records = records.head(admitted)
        kept, refused = screen(caller.name, records)
        warn_batch(caller.name, "records refused", [r.reason for r in refused])
        derived, problems = derive(caller.name, kept)
        warn_batch(caller.name, "payloads not understood", ["malformed"] * len(problems),
                   next((f"seq {seq}: {p}" for seq, p in problems.items()), ""))
        judged = any(isinstance(r, ArmStatsRecord | DriftWindowRecord) for r in derived.values())
        arms = ({(a.model, a.version) for a in self.store.device_arms(caller.name)} if judged
                else set())  # only arm stats and drift windows are judged against them
        derived = check_reports(caller.name, kept, derived, problems, arms, now)
        warn_batch(caller.name, "reports refused",
                   [row.reason for row in derived.values()
                    if isinstance(row, ReportRefusal) and row.reason != MALFORMED])
        kept, derived = self.retraining.vet(caller.name, kept, derived)
        refused += self._unsaved(caller.name)
        write = TelemetryWrite(caller.name, kept, derived, now, counter(dropped),
                               counter(depth), refused)
        return write, records.seqs

    def _judge(self, writes: Sequence[TelemetryWrite]) -> None:
        """New arm statistics may decide an experiment, new drift windows start retraining:
        once per model for the whole group."""
        rows = [r for w in writes for r in w.derived.values()]
        for model in sorted({r.model for r in rows if isinstance(r, ArmStatsRecord)}):
            self.experiments.evaluate(model)
        for model in sorted({r.model for r in rows if isinstance(r, DriftWindowRecord)}):
            self.retraining.check(model)

    def _over_quota(self, caller: pki.Identity, over: list[str], now: float) -> None:
        """Count records over the quota: in memory, then in the device's counters and one
        audit row at most every ``QUOTA_REPORT_SECONDS`` (or with its next stored batch)."""
        pending = self._over.setdefault(caller.name, Counter())
        pending.update(kind if kind in KINDS else "?" for kind in over)
        tally = self._tallies.setdefault(caller.name, DenialTally(QUOTA_REPORT_SECONDS))
        count = tally.refused(now, len(over))
        if count:
            log.warning("telemetry of device %s over its quota: %d records refused",
                        caller.name, count)
            self.store.count_refusals(self._unsaved(caller.name), now)
            self.ctx.audit.record(caller, "telemetry.quota", caller.name, AuditOutcome.DENIED,
                                  {"records": count})

    def _unsaved(self, device_id: str) -> list[ReportRefusal]:
        pending = self._over.pop(device_id, Counter())
        return [ReportRefusal(device_id, kind, OVER_QUOTA, n)
                for kind, n in sorted(pending.items())]

    def expire(self) -> int:
        """Roll up and delete telemetry past its retention (the scheduler calls this)."""
        cfg, now, total = self.ctx.config, self.ctx.clock(), 0
        while True:
            removed = self.store.expire_telemetry(now - cfg.telemetry_raw_retention_seconds,
                                                  now - cfg.telemetry_drift_retention_seconds,
                                                  EXPIRE_BATCH_ROWS)
            total += removed
            if removed < EXPIRE_BATCH_ROWS:
                break
        if total:
            log.info("telemetry retention: %d expired rows rolled up and deleted", total)
        return total

    def drift(self, caller: pki.Identity, model: str) -> list[DriftWindowRecord]:
        """Each device's newest window (of one model, or of all)."""
        self.ctx.authorize(caller, "drift.read", model)
        return self.store.latest_drift(model or None)
