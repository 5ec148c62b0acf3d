"""One warning per telemetry batch for what its checks refused, counted by reason.

A line per refused record would let one device write 500 log lines a batch (each ~20 us of the
event loop, and disk); the per-device refusal counters (``fleet devices show``) carry the
totals, the log says that it happened and why.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence

__all__ = ["MAX_REASONS", "warn_batch"]

log = logging.getLogger("control_plane.services.telemetry")

MAX_REASONS = 5  # distinct reasons named in one line; the rest are counted


def warn_batch(device_id: str, what: str, reasons: Sequence[str], example: str = "") -> None:
    """``telemetry from DEVICE: N WHAT (reason n, ...)[; first: EXAMPLE]``, nothing when
    ``reasons`` is empty."""
    if not reasons:
        return
    counts = sorted(Counter(reasons).items())
    named = ", ".join(f"{reason} {n}" for reason, n in counts[:MAX_REASONS])
    if len(counts) > MAX_REASONS:
        named += f", {len(counts) - MAX_REASONS} other reasons"
    log.warning("telemetry from %s: %d %s (%s)%s", device_id, len(reasons), what, named,
                f"; first: {example}" if example else "")
