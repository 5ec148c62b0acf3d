"""Enrollment, pure parts: which labels a device may claim, and the limits on attempts.

A token is the only thing an enrolling caller proves, so:

* the labels that carry trust come from the token alone: a device may add descriptive labels
  of its own, but never one the token sets (the token's value wins) nor one in
  ``TOKEN_ONLY_LABELS`` (``region`` decides where the device's data may be kept);
* failed attempts are rate-limited per peer address and for the whole control plane (token
  buckets: ``burst`` failures at once, then ``rate`` per second); an exhausted bucket refuses
  every attempt before any work, and the CSR is parsed and a certificate signed only after the
  token checks out;
* refused attempts are audited in aggregate: at most one row per ``window`` seconds, carrying
  how many attempts were refused since the previous row, so callers without a token cannot grow
  the audit log faster than that.

Time is passed in; nothing here reads a clock.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from fleetcore.errors import InvalidInputError

__all__ = ["TOKEN_ONLY_LABELS", "DenialTally", "RateLimits", "TokenBucket", "granted_labels"]

TOKEN_ONLY_LABELS = frozenset({"region"})


def granted_labels(token: Mapping[str, str], claimed: Mapping[str, str]) -> dict[str, str]:
    """The device's labels: what it claims, under what the token grants."""
    reserved = sorted(k for k in claimed if k in TOKEN_ONLY_LABELS and k not in token)
    if reserved:
        raise InvalidInputError(
            f"label {reserved[0]!r} can only come from the enrollment token; ask an admin for a "
            f"token made with `fleet tokens create --label {reserved[0]}=...`")
    return {**claimed, **token}


@dataclass
class TokenBucket:
    rate: float  # tokens per second
    burst: float
    level: float = -1.0  # -1: full at the first use
    at: float = 0.0

    def take(self, now: float) -> bool:
        return self.take_many(1.0, now)

    def refill(self, now: float) -> float:
        """Add what the time passed earned (up to ``burst``); return the level."""
        if self.level < 0:
            self.level, self.at = self.burst, now
        self.level = min(self.burst, self.level + max(0.0, now - self.at) * self.rate)
        self.at = max(self.at, now)
        return self.level

    def take_many(self, amount: float, now: float) -> bool:
        """Refill for the time passed, then take ``amount`` if the bucket holds it."""
        if self.refill(now) < max(amount, 1.0) and amount > 0:
            return False
        self.level -= amount
        return True


@dataclass
class RateLimits:
    """Failed attempts, limited: a bucket per peer and one for everyone, which only failures
    empty (a valid one-time token costs nothing, so bulk enrollment through one site's address
    is not slowed); once a bucket is empty, every attempt from there waits for it to refill.
    Peers are forgotten once their bucket is full again, so the table stays as small as the set
    of recent failing callers (at most ``max_peers``)."""

    per_peer_rate: float = 1.0
    per_peer_burst: float = 10.0
    global_rate: float = 20.0
    global_burst: float = 100.0
    max_peers: int = 10_000
    peers: dict[str, TokenBucket] = field(default_factory=dict)
    everyone: TokenBucket | None = None

    def allow(self, peer: str, now: float) -> bool:
        """May ``peer`` try now? (Looks; takes nothing.)"""
        if self._everyone().refill(now) < 1.0:
            return False
        bucket = self.peers.get(peer)
        if bucket is None:
            return len(self.peers) < self.max_peers or self._forget_idle(now)
        return bucket.refill(now) >= 1.0

    def failed(self, peer: str, now: float) -> None:
        """Count a failed attempt from ``peer`` against its bucket and everyone's."""
        self._everyone().take(now)
        bucket = self.peers.get(peer)
        if bucket is None:
            if len(self.peers) >= self.max_peers and not self._forget_idle(now):
                return  # the global bucket still counts it
            bucket = self.peers[peer] = TokenBucket(self.per_peer_rate, self.per_peer_burst)
        bucket.take(now)

    def _everyone(self) -> TokenBucket:
        if self.everyone is None:
            self.everyone = TokenBucket(self.global_rate, self.global_burst)
        return self.everyone

    def _forget_idle(self, now: float) -> bool:
        """Drop the peers whose bucket has refilled; True if that made room."""
        for peer, bucket in list(self.peers.items()):
            if bucket.refill(now) >= bucket.burst:
                del self.peers[peer]
        return len(self.peers) < self.max_peers


@dataclass
class DenialTally:
    """Refused attempts, written to the audit log at most once per ``window`` seconds."""

    window: float = 60.0
    pending: int = 0
    last_row_at: float | None = None

    def refused(self, now: float, count: int = 1) -> int:
        """Count ``count`` refusals; return how many to write in an audit row now (0: not
        yet)."""
        self.pending += count
        if self.last_row_at is not None and now - self.last_row_at < self.window:
            return 0
        count, self.pending, self.last_row_at = self.pending, 0, now
        return count
