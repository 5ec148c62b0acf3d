"""Resumable bundle download: append to a ``.part`` file, never past the declared length.

The release document declares each bundle's digest and length. Bytes are appended at the
offset the part file has reached (a broken connection or a restart resumes there), anything a
server sends beyond the declared length is never written (endless-data attack), a stream that
stalls longer than ``chunk_timeout`` is abandoned (the transport's base class enforces it; the
old model keeps serving), and the finished file must hash to the declared digest or it is
deleted. The same code runs over gRPC and MQTT (``edge_agent.transport``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from edgefleet.v1 import agent_pb2

from edge_agent.transport.base import Transport
from fleetcore.errors import EdgefleetError, TransportError, UntrustedInputError
from fleetcore.files import file_digest

__all__ = ["DiskSpaceError", "RetrievalPolicy", "SlowRetrievalError", "fetch_bundle"]

# The clock a download's pace is measured on (tests/test_detection.py drives its own).
_now: Callable[[], float] = time.monotonic

log = logging.getLogger(__name__)

# Room for the download, its unpacked copy and some slack.
SPACE_FACTOR = 2
SPACE_SLACK_BYTES = 16 * 1024 * 1024


class DiskSpaceError(EdgefleetError):
    """Not enough free disk for the download and its unpacked copy."""


class SlowRetrievalError(TransportError):
    """A download was aborted: below the minimum rate over a window, or past its deadline
    (slow-retrieval attack, docs/security.md "Detection"). The partial file is kept; the
    next try resumes it."""


@dataclass(frozen=True)
class RetrievalPolicy:
    """The slowest a download may be: ``min_bytes_per_second`` measured over each
    ``window_seconds`` (0: no minimum), and ``deadline_seconds`` for one attempt (0: none)."""

    min_bytes_per_second: float = 1024.0
    window_seconds: float = 30.0
    deadline_seconds: float = 3600.0


@dataclass
class _Pace:
    policy: RetrievalPolicy
    digest: str
    started: float = field(init=False)
    window_start: float = 0.0
    window_bytes: int = 0

    def __post_init__(self) -> None:
        self.started = self.window_start = _now()

    def check(self, received: int) -> None:
        """``received``: bytes received by this attempt so far."""
        now = _now()
        p = self.policy
        if p.deadline_seconds and now - self.started > p.deadline_seconds:
            raise SlowRetrievalError(
                f"download of {self.digest} passed its deadline of {p.deadline_seconds:g}s "
                f"({received} bytes received); aborted, to be retried")
        elapsed = now - self.window_start
        if p.min_bytes_per_second and p.window_seconds and elapsed >= p.window_seconds:
            rate = (received - self.window_bytes) / elapsed
            if rate < p.min_bytes_per_second:
                raise SlowRetrievalError(
                    f"download of {self.digest} at {rate:.0f} B/s over {elapsed:.1f}s, below "
                    f"the minimum of {p.min_bytes_per_second:g} B/s; aborted, to be retried")
            self.window_start, self.window_bytes = now, received


async def fetch_bundle(
    transport: Transport, digest: str, length: int, part: Path, *, chunk_timeout: float = 30.0,
    retrieval: RetrievalPolicy | None = None,
) -> Path:
    """Download the bundle into ``part`` (resuming), check its digest, return the path.
    ``retrieval``: abort (``SlowRetrievalError``) a download slower than it allows."""
    part.parent.mkdir(parents=True, exist_ok=True)
    have = part.stat().st_size if part.exists() else 0
    if have > length:
        part.unlink()
        have = 0
    needed = (length - have) + SPACE_FACTOR * length // 2 + SPACE_SLACK_BYTES
    free = shutil.disk_usage(part.parent).free
    if free < needed:
        raise DiskSpaceError(
            f"bundle {digest} needs about {needed} bytes free in {part.parent}; {free} are"
        )
    if have < length:
        log.info("downloading %s from offset %d of %d", digest, have, length)
        chunks = transport.fetch_bundle(digest, have, length - have,
                                        chunk_timeout=chunk_timeout)
        async with contextlib.aclosing(chunks):
            with part.open("ab") as fh:
                try:
                    have = await _receive(chunks, fh, digest, have, length,
                                          _Pace(retrieval or RetrievalPolicy(0, 0, 0), digest))
                finally:
                    fh.flush()
                    os.fsync(fh.fileno())
        if have < length:
            raise TransportError(f"download of {digest} ended at {have}/{length} bytes")
    actual = await asyncio.to_thread(file_digest, part)  # a big bundle: off the event loop
    if actual != digest:
        part.unlink()
        raise UntrustedInputError(f"bundle digest is {actual}; the release declares {digest}")
    return part


async def _receive(
    chunks: AsyncIterator[agent_pb2.BundleChunk], fh: BinaryIO, digest: str, have: int,
    length: int, pace: _Pace,
) -> int:
    """Append chunks to ``fh`` until ``length`` bytes are there or the stream ends."""
    start = have
    async for chunk in chunks:
        if chunk.offset != have:
            raise UntrustedInputError(f"chunk at offset {chunk.offset}; expected {have}")
        room = length - have
        fh.write(chunk.data[:room])
        have += min(len(chunk.data), room)
        if len(chunk.data) > room:
            # Endless data: what lies past the declared length is never written, and the
            # stream is not read any further.
            log.warning("server sent more than the declared %d bytes of %s; ignoring the excess",
                        length, digest)
        if have >= length:
            break
        pace.check(have - start)
    return have
