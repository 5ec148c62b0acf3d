"""Telemetry quotas and retention, pure: how much one device may store, and for how long.

Each device has two token buckets (``enrollment.TokenBucket``): records and bytes. A batch is
admitted from its start for as long as both buckets hold enough; what does not fit is left
unacknowledged, and the agent keeps it in its outbox and sends it later. A batch of which not
even the first record fits is refused as a whole (``RESOURCE_EXHAUSTED``: the agent backs off
and retries). Every record counts against the quota, stored or not (an unknown kind, a
duplicate, a malformed payload cost the control plane work too).

Retention: raw telemetry rows are kept ``raw_retention_seconds`` after they were received, then
rolled up into one row per (device, kind, UTC day) holding the number of records and bytes,
and deleted; drift windows are kept ``drift_retention_seconds``. Arm statistics (one row per
device and arm), samples (bounded by the quota, used by retraining) and refusal counters are
not rolled up.

Time is passed in; nothing here reads a clock.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from control_plane.domain.enrollment import TokenBucket
from control_plane.domain.record_columns import RecordColumns, as_columns
from control_plane.domain.records import TelemetryRecord

__all__ = ["ROW_OVERHEAD_BYTES", "DeviceQuota", "QuotaLimits", "Quotas", "record_cost"]

# What a stored row costs beyond its payload (keys, kind, times, index entries): a flood of
# empty payloads is not free.
ROW_OVERHEAD_BYTES = 64


def record_cost(record: TelemetryRecord) -> int:
    return len(record.payload) + len(record.kind) + ROW_OVERHEAD_BYTES


@dataclass(frozen=True)
class QuotaLimits:
    """Per device: ``records_per_second`` and ``bytes_per_second`` on average, with bursts of
    ``burst_records`` and ``burst_bytes`` (an agent back from an outage drains its outbox at the
    burst, then at the rate)."""

    records_per_second: float = 2.0
    bytes_per_second: float = 4096.0
    burst_records: float = 2000.0
    burst_bytes: float = 4.0 * 1024 * 1024

    def __post_init__(self) -> None:
        for name in ("records_per_second", "bytes_per_second", "burst_records", "burst_bytes"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"telemetry quota {name} must be a positive number")


@dataclass
class DeviceQuota:
    records: TokenBucket
    bytes: TokenBucket

    def admit(self, costs: Sequence[int] | npt.NDArray[np.int64], now: float) -> int:
        """How many of the records (their byte costs, in order) fit now; takes their share."""
        self.records.refill(now)
        self.bytes.refill(now)
        burst = self.bytes.burst
        if isinstance(costs, np.ndarray):  # a batch's columns: one array operation
            total = float(np.minimum(costs, burst).sum())
        else:
            total = sum(cost if cost < burst else burst for cost in costs)
        if self.records.level >= len(costs) and self.bytes.level >= total:
            # The whole batch fits (the usual case): what the loop below would take, at once.
            self.records.level -= len(costs)
            self.bytes.level -= total
            return len(costs)
        admitted = 0
        for cost in (costs.tolist() if isinstance(costs, np.ndarray) else costs):
            # A record larger than the whole byte burst could never fit: it is admitted when
            # the bucket is full (the payload limit bounds it anyway).
            need = min(float(cost), self.bytes.burst)
            if self.records.level < 1.0 or self.bytes.level < need:
                break
            self.records.level -= 1.0
            self.bytes.level -= need
            admitted += 1
        return admitted

    def retry_after(self, cost: int) -> float:
        """Seconds until a record of ``cost`` bytes would fit (the buckets as they are now)."""
        need_records = max(0.0, 1.0 - self.records.level) / self.records.rate
        need = min(float(cost), self.bytes.burst)
        need_bytes = max(0.0, need - self.bytes.level) / self.bytes.rate
        return max(need_records, need_bytes)


@dataclass
class Quotas:
    """The quota of every device that sent telemetry (bounded by the number of devices)."""

    limits: QuotaLimits = field(default_factory=QuotaLimits)
    devices: dict[str, DeviceQuota] = field(default_factory=dict)

    def admit(self, device_id: str, records: Sequence[TelemetryRecord] | RecordColumns,
              now: float) -> int:
        """How many records of the batch, from its start, the device may store now."""
        columns = as_columns(records)
        # record_cost of each, as arrays: payload, kind name, the row's overhead
        name_lengths = np.array([len(k) for k in columns.kind_names] or [0], dtype=np.int64)
        costs = (columns.sizes.astype(np.int64) + name_lengths[columns.kind_index]
                 + ROW_OVERHEAD_BYTES)
        return self._quota(device_id).admit(costs, now)

    def retry_after(self, device_id: str, record: TelemetryRecord) -> float:
        return self._quota(device_id).retry_after(record_cost(record))

    def forget(self, device_id: str) -> None:
        self.devices.pop(device_id, None)

    def _quota(self, device_id: str) -> DeviceQuota:
        quota = self.devices.get(device_id)
        if quota is None:
            lim = self.limits
            quota = self.devices[device_id] = DeviceQuota(
                TokenBucket(lim.records_per_second, lim.burst_records),
                TokenBucket(lim.bytes_per_second, lim.burst_bytes))
        return quota
