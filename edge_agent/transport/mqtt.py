"""The agent's transport over MQTT 5 with TLS and its device certificate.

The client is ``fleetcore.mqtt_client``: it runs on the agent's event loop (no network thread)
and reconnects by itself with a growing, jittered delay. The session is clean
(``CLEAN_START``, no session expiry: why in ``fleetcore.mqtt_wire``): the broker keeps
nothing of an agent that is away, so the agent subscribes on every connect (the retained
release comes with the subscription) and asks again for what was not answered; telemetry
stays in the outbox until the control plane acknowledges it. Messages are published at QoS 1
and a call returns after the broker's PUBACK (a connection lost before it fails the call).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import ssl
from collections.abc import AsyncGenerator

from edgefleet.v1 import agent_pb2, common_pb2

from edge_agent.reporting.wire import ASK_ACK_RUNS, seqs_from_column
from edge_agent.state import StateDir
from edge_agent.transport.base import RefusedError, Transport, acked_seqs
from fleetcore.errors import EdgefleetError, InvalidInputError, TransportError
from fleetcore.mqtt_client import MqttClient
from fleetcore.mqtt_codec import Publish, Will, reason_name
from fleetcore.mqtt_wire import (
    CLEAN_START,
    ERROR_PROPERTY,
    MAX_MESSAGE_BYTES,
    ROOTS_TOPIC,
    SESSION_EXPIRY_SECONDS,
    Leaf,
    parse_message,
    parse_url,
    topic,
)
from fleetcore.otel import check_carrier

__all__ = ["MqttTransport"]

log = logging.getLogger(__name__)

KEEPALIVE_SECONDS = 30
_ROOTS_MARK = b"\0roots"  # in the release queue: the retained roots changed (never a release)
# A bundle is requested in windows of this many bytes; the next window is asked for once the
# chunks of this one have arrived, so neither the broker nor the client holds a whole bundle.
WINDOW_BYTES = 1024 * 1024
# CONNACK reason codes that mean "not this device" rather than "not now".
_REFUSED_CONNACK = {"Not authorized", "Bad user name or password", "Banned",
                    "Client identifier not valid"}


def _reason(reply_error: str) -> EdgefleetError:
    code = reply_error.partition(":")[0]
    if code in ("UNAUTHENTICATED", "PERMISSION_DENIED"):
        return RefusedError(reply_error)
    return TransportError(reply_error)


class MqttTransport(Transport):
    name = "mqtt"

    def __init__(self, url: str, device_id: str, state: StateDir, *,
                 rpc_timeout_seconds: float = 10.0, reconnect_min_seconds: float = 1.0,
                 reconnect_max_seconds: float = 30.0) -> None:
        super().__init__(rpc_timeout_seconds=rpc_timeout_seconds)
        self.broker = parse_url(url)
        self.device_id = device_id
        self.state = state
        self.reconnect = (max(1, round(reconnect_min_seconds)),
                          max(1, round(reconnect_max_seconds)))
        self._client: MqttClient | None = None
        self._cert_pem = b""
        self._connected = asyncio.Event()
        self._last_error = "not connected yet"
        self._refused = False
        # (payload, W3C trace context from its MQTT 5 user properties)
        self._releases_q: asyncio.Queue[tuple[bytes, dict[str, str]]] = asyncio.Queue(
            maxsize=16)
        self._roots_payload = b""  # the newest retained roots message (ROOTS_TOPIC)
        self._replies: dict[bytes, asyncio.Queue[tuple[bytes, str]]] = {}

    # ------------------------------------------------------------------ connection
    def _ensure_started(self) -> MqttClient:
        if self._client is not None:
            return self._client
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_verify_locations(cadata=self.state.ca.read_text())
        ctx.load_cert_chain(self.state.cert, self.state.key)
        self._cert_pem = self.state.cert.read_bytes()  # a renewal changes it: reconnect
        client = MqttClient(
            self.broker.host, self.broker.port, ctx, self.device_id,
            keepalive=KEEPALIVE_SECONDS, clean_start=CLEAN_START,
            session_expiry=SESSION_EXPIRY_SECONDS,
            max_packet=MAX_MESSAGE_BYTES + 64 * 1024, reconnect=self.reconnect,
            will=Will(topic(self.device_id, Leaf.STATUS),
                      agent_pb2.AgentStatus(online=False).SerializeToString()),
            on_connect=self._set_up, on_down=self._set_down, on_message=self._on_message)
        client.start()
        self._client = client
        return client

    async def _ready(self) -> MqttClient:
        client = self._ensure_started()
        if not self._connected.is_set():
            try:
                await asyncio.wait_for(self._connected.wait(),
                                       min(5.0, self.rpc_timeout_seconds))
            except TimeoutError:
                error = f"broker {self.broker.host}:{self.broker.port}: {self._last_error}"
                raise RefusedError(error) if self._refused else TransportError(error) from None
        return client

    def _set_up(self) -> None:
        client = self._client
        if client is None:
            return
        client.subscribe([(topic(self.device_id, leaf), 1)
                          for leaf in (Leaf.RELEASE, Leaf.TELEMETRY_ACK, Leaf.BUNDLE_REPLY,
                                       Leaf.RENEW_REPLY)] + [(ROOTS_TOPIC, 1)])
        self._refused = False
        self._connected.set()
        log.info("connected to MQTT broker %s:%d as %s", self.broker.host, self.broker.port,
                 self.device_id)

    def _set_down(self, error: str, refused: bool) -> None:
        self._connected.clear()
        self._last_error = error
        self._refused = refused and error.removeprefix("refused: ") in _REFUSED_CONNACK

    def _on_message(self, msg: Publish) -> None:
        user = dict(msg.properties.user)
        error = user.get(ERROR_PROPERTY, "")
        trace = check_carrier(user)  # bounded: the W3C keys only, well-formed
        self._arrived(msg.topic, msg.payload, msg.properties.correlation, error, trace)

    def _arrived(self, name: str, payload: bytes, correlation: bytes, error: str,
                 trace: dict[str, str] | None = None) -> None:
        if name == topic(self.device_id, Leaf.RELEASE) or name == ROOTS_TOPIC:
            if name == ROOTS_TOPIC:  # kept aside (the newest only); the queue gets a marker
                self._roots_payload, payload = payload, _ROOTS_MARK
            if self._releases_q.full():  # only the newest documents matter
                self._releases_q.get_nowait()
            self._releases_q.put_nowait((payload, trace or {}))
        elif correlation in self._replies:
            self._replies[correlation].put_nowait((payload, error))
        else:
            log.debug("dropped an MQTT message on %s (no request waits for it)", name)

    # ------------------------------------------------------------------ publishing
    async def _publish(self, leaf: Leaf, payload: bytes, *, retain: bool = False,
                       correlation: bytes = b"",
                       trace: tuple[tuple[str, str], ...] = ()) -> None:
        """Publish at QoS 1 and wait for the broker's PUBACK."""
        if len(payload) > MAX_MESSAGE_BYTES:
            raise InvalidInputError(f"message of {len(payload)} bytes; the limit is "
                                    f"{MAX_MESSAGE_BYTES}")
        client = await self._ready()
        try:
            reason = await client.publish(  # type: ignore[misc]
                topic(self.device_id, leaf), payload, qos=1, retain=retain,
                correlation=correlation, user=trace)
        except ConnectionError as exc:
            raise TransportError(f"publish on {leaf.value}: {exc}") from None
        if reason >= 0x80:
            name = reason_name(reason)
            cls = RefusedError if name == "Not authorized" else TransportError
            raise cls(f"broker refused the message on {leaf.value}: {name}")

    async def _request(self, leaf: Leaf, payload: bytes,
                       trace: tuple[tuple[str, str], ...] = ()) -> tuple[
            bytes, asyncio.Queue[tuple[bytes, str]], bytes]:
        correlation = secrets.token_bytes(12)
        replies: asyncio.Queue[tuple[bytes, str]] = asyncio.Queue()
        self._replies[correlation] = replies
        try:
            await self._publish(leaf, payload, correlation=correlation, trace=trace)
        except BaseException:
            del self._replies[correlation]
            raise
        return correlation, replies, payload

    async def _ask(self, leaf: Leaf, payload: bytes) -> bytes:
        """Publish a correlated request and wait for its one reply; a refusal raises."""
        correlation, replies, _ = await self._request(leaf, payload)
        try:
            answer, error = await replies.get()
        finally:
            self._replies.pop(correlation, None)
        if error:
            raise _reason(error)
        return answer

    # ------------------------------------------------------------------ the transport
    async def _heartbeat(
        self, request: agent_pb2.HeartbeatRequest
    ) -> agent_pb2.HeartbeatResponse:
        status = agent_pb2.AgentStatus(online=True, heartbeat=request)
        await self._publish(Leaf.STATUS, status.SerializeToString(), retain=True)
        return agent_pb2.HeartbeatResponse()

    async def _send_telemetry(self, batch: agent_pb2.TelemetryBatch) -> list[int]:
        """Publish a batch and wait for the control plane's acknowledgement (the bridge stored
        it), not only the broker's PUBACK: a broker killed before it delivered would lose what
        it had acknowledged. No answer in time: nothing is deleted, the batch goes again, and
        the control plane stores each (device, seq) once."""
        listed = [r.seq for r in batch.records] + seqs_from_column(batch.columns.seqs)
        return await self._send_telemetry_wire(listed, batch.SerializeToString())

    async def _send_telemetry_wire(self, seqs: list[int], wire: bytes) -> list[int]:
        # Asks for the answer as (first, last) runs: a pair for a whole batch, not 500 seqs
        # (fields appended to a message's bytes are read as part of it).
        payload = await self._ask(Leaf.TELEMETRY, wire + ASK_ACK_RUNS)
        return acked_seqs(parse_message(agent_pb2.TelemetryAck, payload, "telemetry ack"), seqs)

    async def _renew_certificate(self, csr_pem: bytes) -> tuple[bytes, bytes]:
        request = agent_pb2.RenewCertificateRequest(csr_pem=csr_pem).SerializeToString()
        payload = await self._ask(Leaf.RENEW_REQUEST, request)
        reply = parse_message(agent_pb2.RenewCertificateResponse, payload, "renewal reply")
        return bytes(reply.certificate_pem), bytes(reply.ca_pem)

    async def _releases(self, have_serial: int) -> AsyncGenerator[common_pb2.SignedRelease, None]:
        self._ensure_started()
        last: common_pb2.SignedRelease | None = None
        while True:
            payload, trace = await self._releases_q.get()
            if payload is _ROOTS_MARK:
                event = parse_message(agent_pb2.SyncEvent, self._roots_payload, "roots message")
                self.last_roots = [bytes(r) for r in event.roots]
                # The release seen last again: refused before its root arrived, it may verify
                # now (the two retained messages come in no set order).
                yield last if last is not None else common_pb2.SignedRelease()
                continue
            if not payload:
                continue  # the retained document was cleared
            self.last_trace_context = trace
            last = parse_message(common_pb2.SignedRelease, payload, "release message")
            yield last

    async def _fetch_bundle(
        self, digest: str, offset: int, length: int
    ) -> AsyncGenerator[agent_pb2.BundleChunk, None]:
        have, end = offset, offset + length
        trace = self.trace_metadata()  # the download span's context (nothing when off)
        while have < end:
            want = min(WINDOW_BYTES, end - have)
            request = agent_pb2.FetchBundleRequest(digest=digest, offset=have, length=want)
            correlation, replies, _ = await self._request(Leaf.BUNDLE_REQUEST,
                                                          request.SerializeToString(), trace)
            try:
                window_end = have + want
                while have < window_end:
                    payload, error = await replies.get()
                    if error:
                        raise _reason(error)
                    chunk = parse_message(agent_pb2.BundleChunk, payload, "bundle chunk")
                    if chunk.offset < have and chunk.offset + len(chunk.data) <= have:
                        continue  # a QoS 1 duplicate of what is already here
                    if chunk.offset != have:
                        raise TransportError(f"bundle chunk at {chunk.offset}; expected {have}")
                    if not chunk.data:
                        return  # the server has nothing more
                    have += len(chunk.data)
                    yield chunk
            finally:
                self._replies.pop(correlation, None)

    async def _reset(self) -> None:
        """Reconnect only when the certificate changed (the client reconnects by itself)."""
        if self._client is None:
            return
        if self.state.cert.read_bytes() != self._cert_pem:
            await self._stop_client(say_offline=False)

    async def _close(self) -> None:
        await self._stop_client(say_offline=True)

    async def _stop_client(self, *, say_offline: bool) -> None:
        client, self._client = self._client, None
        if client is None:
            return
        if say_offline and self._connected.is_set():
            offline = client.publish(topic(self.device_id, Leaf.STATUS),
                                     agent_pb2.AgentStatus(online=False).SerializeToString(),
                                     qos=1, retain=True)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(offline, 2.0)  # type: ignore[arg-type]
        self._connected.clear()
        await client.close()
