"""What the agent asks of the control plane, whatever carries it (gRPC or MQTT).

The public methods of ``Transport`` are the only way in, and they enforce what must hold for
every implementation (the python-tuf fetcher split):

* every request-reply call has a timeout (``rpc_timeout_seconds``), and every chunk of a
  download must arrive within the caller's ``chunk_timeout``;
* every message from the other side is bounded: release documents and signatures by the
  release-document limits, bundle chunks by ``MAX_CHUNK_BYTES``, certificates by the PKI limit;
* every failure leaves as an ``EdgefleetError``: ``RefusedError`` when the other side refused
  this device (revoked, unknown certificate), ``TransportError`` for anything that may work
  later, ``UntrustedInputError`` for bytes we refuse. Library exceptions never escape.

Subclasses implement the underscored methods and ``_wrap`` (their exceptions to ours), and stay
short. The transport adds no trust: what it returns is verified above it exactly as before.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import TypeVar

from edgefleet.v1 import agent_pb2, common_pb2

from edge_agent.reporting.wire import seqs_from_column
from fleetcore.errors import EdgefleetError, InvalidInputError, TransportError
from fleetcore.otel import check_carrier
from fleetcore.release_doc import (
    MAX_DOCUMENT_BYTES,
    MAX_SIGNATURE_BYTES,
    MAX_SIGNATURES,
    SignedRelease,
)
from fleetcore.signatures import MAX_CERT_BYTES, KeySignature
from fleetcore.signatures import MAX_ROOT_ENVELOPE_BYTES as MAX_ENVELOPE_BYTES

MAX_ROOTS = 16  # roots in one event (the control plane sends at most 8)

__all__ = ["MAX_CHUNK_BYTES", "ClosedHereError", "RefusedError", "Transport", "acked_seqs"]

log = logging.getLogger(__name__)

T = TypeVar("T")
# A bundle chunk may not be larger than this (servers send 256 KiB).
MAX_CHUNK_BYTES = 1024 * 1024
# A renewal's CA bundle: the fleet CA, and during a CA rotation the old one too.
MAX_CA_BUNDLE_BYTES = 4 * MAX_CERT_BYTES


class RefusedError(TransportError):
    """The control plane (or broker) refused this device: revoked or unknown certificate."""


class ClosedHereError(TransportError):
    """The call's connection was closed by this agent (a reset by the other loop, a renewal):
    no sign that the replica died."""


class Transport(abc.ABC):
    """One connection to the control plane; ``close`` it when done."""

    name = "abstract"

    def __init__(self, *, rpc_timeout_seconds: float = 10.0) -> None:
        self.rpc_timeout_seconds = rpc_timeout_seconds
        # Tracing (edge_agent/tracing.py): the W3C context that came with the release the
        # implementation yielded last, and what bundle requests carry (nothing when off).
        self.last_trace_context: dict[str, str] = {}
        self.trace_metadata: Callable[[], tuple[tuple[str, str], ...]] = tuple
        # This agent process's random session id (the daemon sets it), sent where a request
        # has room for it (the Sync stream): the control plane tells clones apart by it.
        self.session_id = ""
        # Signed roots of trust that came with the event the implementation yielded last
        # (unverified envelopes); ``releases`` hands them to ``on_roots`` before the release.
        self.last_roots: list[bytes] = []
        self.on_roots: Callable[[list[bytes]], None] = lambda roots: None
        self.have_root_version = 0  # the agent's root version, sent when a stream opens

    @property
    def address(self) -> str:
        """Where this transport connects now (shown by ``edge-agent status``)."""
        return ""

    async def fail_over(self, failed: str) -> bool:
        """``failed`` (an ``address`` read before the failing call) stopped answering: drop
        the connection and move to the next replica, if there is one and no other caller
        moved already. Nothing else changes (outbox, trust and session stay as they are).
        True when the address changed."""
        return False

    # ------------------------------------------------------------------ the public surface
    async def heartbeat(
        self, request: agent_pb2.HeartbeatRequest
    ) -> agent_pb2.HeartbeatResponse:
        return await self._call("heartbeat", self._heartbeat(request))

    async def send_telemetry(self, batch: agent_pb2.TelemetryBatch) -> list[int]:
        """Send a batch; return the seqs that the receiver acknowledged (a subset)."""
        listed = [r.seq for r in batch.records] + seqs_from_column(batch.columns.seqs)
        return _within(await self._call("telemetry", self._send_telemetry(batch)), listed)

    async def send_telemetry_wire(self, seqs: list[int], wire: bytes) -> list[int]:
        """``send_telemetry`` for a batch already encoded (``reporting.wire.frame_batch``,
        what the sender reads from the outbox) whose records are ``seqs``: a transport that
        carries bytes (MQTT) sends them as they are, without a parse and a serialization of
        the whole batch. Returns ``seqs`` itself when every one was acknowledged."""
        return _within(await self._call("telemetry", self._send_telemetry_wire(seqs, wire)),
                       seqs)

    async def renew_certificate(self, csr_pem: bytes) -> tuple[bytes, bytes]:
        """The renewed certificate and the CA bundle to trust with it (empty: keep ours)."""
        pem, ca_pem = await self._call("renewal", self._renew_certificate(csr_pem))
        if len(pem) > MAX_CERT_BYTES:
            raise InvalidInputError(
                f"renewed certificate is {len(pem)} bytes; the limit is {MAX_CERT_BYTES}"
            )
        if len(ca_pem) > MAX_CA_BUNDLE_BYTES:
            raise InvalidInputError(
                f"CA bundle is {len(ca_pem)} bytes; the limit is {MAX_CA_BUNDLE_BYTES}"
            )
        return pem, ca_pem

    async def releases(self, have_serial: int) -> AsyncGenerator[SignedRelease, None]:
        """Each signed release document as it arrives (the current one first), unverified."""
        stream = self._releases(have_serial)
        try:
            while True:
                try:
                    release = await anext(stream)
                except StopAsyncIteration:
                    return
                except asyncio.CancelledError:
                    raise _unless_ours("release stream") from None
                except EdgefleetError:
                    raise
                except Exception as exc:
                    raise self._wrapped("release stream", exc) from exc
                if len(release.document) > MAX_DOCUMENT_BYTES or (
                    len(release.signature) > MAX_SIGNATURE_BYTES
                ) or len(release.signatures) > MAX_SIGNATURES or any(
                    len(s.keyid) > 64 or len(s.sig) > MAX_SIGNATURE_BYTES
                    for s in release.signatures
                ):
                    raise InvalidInputError(
                        f"release document of {len(release.document)} bytes with a signature of "
                        f"{len(release.signature)}; the limits are {MAX_DOCUMENT_BYTES} and "
                        f"{MAX_SIGNATURE_BYTES}"
                    )
                roots, self.last_roots = self.last_roots, []
                if len(roots) > MAX_ROOTS or any(
                        len(r) > MAX_ENVELOPE_BYTES for r in roots):
                    raise InvalidInputError(
                        f"{len(roots)} roots of up to {max(map(len, roots))} bytes; the limits "
                        f"are {MAX_ROOTS} and {MAX_ENVELOPE_BYTES}")
                if roots:
                    self.on_roots(roots)  # verified (and persisted) before the release
                if not release.document and not release.signature:
                    continue  # only the root changed
                trace = tuple(sorted(check_carrier(self.last_trace_context).items()))
                self.last_trace_context = {}
                yield SignedRelease(
                    bytes(release.document), bytes(release.signature), trace,
                    tuple(KeySignature(s.keyid, bytes(s.sig)) for s in release.signatures),
                )
        finally:
            await stream.aclose()

    async def fetch_bundle(
        self, digest: str, offset: int, length: int, *, chunk_timeout: float
    ) -> AsyncGenerator[agent_pb2.BundleChunk, None]:
        """Chunks of bundle ``digest`` from ``offset`` (``length`` bytes are wanted)."""
        stream = self._fetch_bundle(digest, offset, length)
        have = offset
        try:
            while True:
                try:
                    chunk = await asyncio.wait_for(anext(stream), chunk_timeout)
                except StopAsyncIteration:
                    return
                except TimeoutError:
                    raise TransportError(
                        f"download of {digest} stalled at byte {have} (nothing for "
                        f"{chunk_timeout:g}s)"
                    ) from None
                except asyncio.CancelledError:
                    raise _unless_ours(f"download of {digest}") from None
                except EdgefleetError:
                    raise
                except Exception as exc:
                    raise self._wrapped(f"download of {digest} at byte {have}", exc) from exc
                if len(chunk.data) > MAX_CHUNK_BYTES:
                    raise InvalidInputError(
                        f"bundle chunk of {len(chunk.data)} bytes; the limit is {MAX_CHUNK_BYTES}"
                    )
                have = chunk.offset + len(chunk.data)
                yield chunk
        finally:
            await stream.aclose()

    async def reset(self) -> None:
        """Drop the connection after a failure or a renewal; the next call connects again."""
        with contextlib.suppress(Exception):
            await self._reset()

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self._close()

    # ------------------------------------------------------------------ for subclasses
    @abc.abstractmethod
    async def _heartbeat(
        self, request: agent_pb2.HeartbeatRequest
    ) -> agent_pb2.HeartbeatResponse: ...

    @abc.abstractmethod
    async def _send_telemetry(self, batch: agent_pb2.TelemetryBatch) -> list[int]: ...

    async def _send_telemetry_wire(self, seqs: list[int], wire: bytes) -> list[int]:
        """An encoded ``TelemetryBatch`` of ``seqs``; by default parsed, sent as a message."""
        return await self._send_telemetry(agent_pb2.TelemetryBatch.FromString(wire))

    @abc.abstractmethod
    async def _renew_certificate(self, csr_pem: bytes) -> tuple[bytes, bytes]: ...

    @abc.abstractmethod
    def _releases(self, have_serial: int) -> AsyncGenerator[common_pb2.SignedRelease, None]: ...

    @abc.abstractmethod
    def _fetch_bundle(
        self, digest: str, offset: int, length: int
    ) -> AsyncGenerator[agent_pb2.BundleChunk, None]: ...

    @abc.abstractmethod
    async def _reset(self) -> None: ...

    @abc.abstractmethod
    async def _close(self) -> None: ...

    def _wrap(self, what: str, exc: Exception) -> EdgefleetError | None:
        """Translate a library exception; None: a plain ``TransportError``."""
        return None

    # ------------------------------------------------------------------ invariants
    async def _call(self, what: str, call: Awaitable[T]) -> T:
        try:
            # In this task (not wait_for's task a call): the telemetry window makes one a batch.
            async with asyncio.timeout(self.rpc_timeout_seconds):
                return await call
        except TimeoutError:
            raise TransportError(
                f"{self.name} {what}: no answer within {self.rpc_timeout_seconds:g}s"
            ) from None
        except asyncio.CancelledError:
            raise _unless_ours(what) from None
        except EdgefleetError:
            raise
        except Exception as exc:
            raise self._wrapped(what, exc) from exc

    def _wrapped(self, what: str, exc: Exception) -> EdgefleetError:
        wrapped = self._wrap(what, exc)
        if wrapped is not None:
            return wrapped
        log.debug("%s %s failed", self.name, what, exc_info=exc)
        return TransportError(f"{self.name} {what} failed: {type(exc).__name__}: {exc}")


def acked_seqs(ack: agent_pb2.TelemetryAck, sent: list[int]) -> list[int]:
    """The seqs an answer acknowledges, listed (``acked``) or as (first, last) ``runs`` (to a
    batch that asked for them), of those ``sent``: a run is never expanded past what was sent.
    ``sent`` itself when one run covers the whole batch (the usual answer). More runs than
    seqs sent, or an odd number of bounds, is not an answer to this batch."""
    runs = ack.runs
    if not runs:
        return list(ack.acked)
    if len(runs) % 2 or len(runs) > 2 * len(sent):
        raise InvalidInputError(f"telemetry ack of {len(sent)} records holds {len(runs)} run "
                                "bounds; expected (first, last) pairs, at most one a record")
    if (len(runs) == 2 and not ack.acked and runs[0] == sent[0] and runs[1] == sent[-1]
            and sent[-1] - sent[0] + 1 == len(sent)):  # sent's seqs increase: all of them
        return sent
    listed = set(sent)
    out = listed.intersection(ack.acked)
    for first, last in zip(runs[::2], runs[1::2], strict=True):
        if last - first < len(sent):
            out.update(seq for seq in range(first, last + 1) if seq in listed)
        else:
            out.update(seq for seq in sent if first <= seq <= last)
    return sorted(out)


def _within(acked: list[int], sent: list[int]) -> list[int]:
    """The acknowledged seqs that were sent (a receiver may not acknowledge others); ``sent``
    itself when it acknowledged exactly those, in order (the usual answer)."""
    if acked is sent or acked == sent:
        return sent
    listed = set(sent)
    return [seq for seq in acked if seq in listed]


def _unless_ours(what: str) -> BaseException:
    """What to raise for a CancelledError out of a call: the same cancellation when this task
    is being cancelled, else a TransportError. gRPC's asyncio calls raise CancelledError when
    their channel closes under them (a reset after another call failed); left alone, that
    silently ended the agent's release loop for good."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        return asyncio.CancelledError()
    return ClosedHereError(f"{what}: the connection was closed under the call")
