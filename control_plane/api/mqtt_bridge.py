"""The control plane's MQTT bridge: the AgentService's job for agents that speak MQTT.

It connects to the broker as ``edgefleet:bridge`` (a certificate from `mqtt-config`) with
``fleetcore.mqtt_client``, on the control plane's event loop, with a clean session (the
broker queues nothing while the control plane is away: why in ``fleetcore.mqtt_wire``;
agents send again what was not answered) and manual acknowledgement:
a device's QoS 1 message is acknowledged to the broker only after its handler ran, and
telemetry's deduplication on (device, seq) makes redeliveries and resends count once.
Telemetry messages waiting together are stored in one transaction (group commit, at most
``GROUP_COMMIT``), each answered and acknowledged only after it committed. Like
the gRPC servicer it authenticates, converts and delegates through the same ``AgentCalls``,
and nothing else.

Identity: the device id comes from the topic. The broker's ACL lets a client write only under
``edgefleet/v1/dev/<the CN of its certificate>/``, so the topic names the certificate's device;
the identity service still refuses ids that are not registered, revoked devices and revoked
certificates, as for a TLS peer.

Per device: the signed release, retained on ``release`` (published at start, on every change
the services announce, and when a heartbeat renews it), bundle chunks on request, telemetry,
certificate renewal by request/reply, and presence from the retained ``status`` (the will says
offline).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from edgefleet.v1 import agent_pb2

from control_plane.api.agent_calls import AgentCalls
from control_plane.api.status import status_code_for
from control_plane.api.tracing import Tracing
from control_plane.services import Services
from control_plane.services.broker import MqttSettings, bridge_name
from fleetcore import pki
from fleetcore.errors import EdgefleetError, InvalidInputError
from fleetcore.mqtt_client import MqttClient
from fleetcore.mqtt_codec import Publish
from fleetcore.mqtt_wire import (
    CLEAN_START,
    DEVICE_PREFIX,
    ERROR_PROPERTY,
    MAX_MESSAGE_BYTES,
    ROOTS_TOPIC,
    SESSION_EXPIRY_SECONDS,
    Leaf,
    parse_message,
    parse_topic,
    parse_url,
    topic,
)
from fleetcore.otel import check_carrier

__all__ = ["GROUP_COMMIT", "MqttBridge", "waiting"]

log = logging.getLogger(__name__)

# One bundle request may ask for at most this much (agents ask for 1 MiB windows).
MAX_REQUEST_BYTES = 4 * 1024 * 1024
MAX_CORRELATION_BYTES = 64
_SHARED = (Leaf.TELEMETRY, Leaf.BUNDLE_REQUEST, Leaf.RENEW_REQUEST)
# MQTT 5 shared subscription group of the control plane's bridges.
SHARE = "$share/edgefleet"
# Where the answer to a correlated message goes (a refusal too, with the error property).
_REPLY_TO = {Leaf.TELEMETRY: Leaf.TELEMETRY_ACK, Leaf.BUNDLE_REQUEST: Leaf.BUNDLE_REPLY,
             Leaf.RENEW_REQUEST: Leaf.RENEW_REPLY}
# A traced bundle request's span: the name of gRPC's, so one query finds both transports.
_FETCH_SPAN = "edgefleet.v1.AgentService/FetchBundle"
# At most this many telemetry messages waiting in the bridge are stored in one transaction
# (and acknowledged to the broker after it commits): below the broker's in-flight window.
GROUP_COMMIT = 64
T = TypeVar("T")


async def waiting(inbox: asyncio.Queue[T], limit: int) -> list[T]:
    """The next message and those waiting behind it, up to ``limit``: what the inbox holds
    and what the connection has already received. asyncio reads a socket at most 256 KiB a
    pass of its loop (five 45 KB telemetry batches), so the inbox alone would cut a group
    there; when it runs dry the loop is given one pass (its reads queued by then run) and
    the group ends at the first pass that brings nothing. A pass costs a poll of the sockets;
    a group of a dozen batches instead of four saves two thirds of their fsyncs."""
    group = [await inbox.get()]
    while len(group) < limit:
        if inbox.empty():
            await asyncio.sleep(0)  # one pass: the transport's reads run
            if inbox.empty():
                break
        group.append(inbox.get_nowait())
    return group


def _is_telemetry(msg: Publish) -> bool:
    parsed = parse_topic(msg.topic)
    return parsed is not None and parsed[1] is Leaf.TELEMETRY


class MqttBridge:
    def __init__(self, services: Services, url: str, home: Path, settings: MqttSettings, *,
                 on_event: Callable[[str, str], None] | None = None,
                 tracing: Tracing | None = None, index: int = 1) -> None:
        self.s = services
        self.index = index  # which bridge identity (replica) this is: `serve --bridge N`
        self.tracing = tracing or Tracing(None)
        # How many gRPC Sync streams a device has open (the server binds its notifier's).
        self.grpc_streams: Callable[[str], int] = lambda device_id: 0
        self.calls = AgentCalls(services)
        self.broker = parse_url(url)
        self.home = home
        self.settings = settings
        self.on_event = on_event  # (what, device id): for tests and metrics
        self.presence: dict[str, bool] = {}
        self.connected = asyncio.Event()
        self._published: dict[str, int] = {}
        self._inbox: asyncio.Queue[Publish] = asyncio.Queue()
        self._client: MqttClient | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._worker: asyncio.Task[None] | None = None
        self._tls: ssl.SSLContext | None = None

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        self._tls = ctx
        self.reload_tls()
        client = MqttClient(
            self.broker.host, self.broker.port, ctx, bridge_name(self.index), keepalive=30,
            clean_start=CLEAN_START, session_expiry=SESSION_EXPIRY_SECONDS,
            max_packet=MAX_MESSAGE_BYTES + 64 * 1024,
            reconnect=(1.0, 30.0), manual_ack=True, on_connect=self._on_connect,
            on_down=self._on_down, on_message=self._on_message)
        self._client = client
        self._worker = asyncio.create_task(self._work())
        client.start()
        log.info("MQTT bridge connecting to %s:%d", self.broker.host, self.broker.port)

    def reload_tls(self) -> None:
        """Read the broker's CA bundle and the bridge's certificate again (a CA rotation
        re-issued them): the next (re)connection uses them; the open one is kept."""
        if self._tls is not None:
            self._tls.load_verify_locations(cafile=str(self.settings.ca))
            self._tls.load_cert_chain(self.settings.bridge_cert(self.home, self.index),
                                      self.settings.bridge_key(self.home, self.index))

    async def stop(self) -> None:
        client, self._client = self._client, None
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
        if client is not None:
            await client.close()
        self.connected.clear()

    def roots_changed(self) -> None:
        """A new root was published: retain the latest roots for every device (from any
        thread)."""
        self._to_loop(self._publish_roots)

    def _publish_roots(self) -> None:
        client = self._client
        roots = self.s.ctx.roots.latest()
        if client is None or not roots:
            return
        payload = agent_pb2.SyncEvent(roots=roots).SerializeToString()
        client.publish(ROOTS_TOPIC, payload, qos=1, retain=True, wait=False)

    def device_changed(self, device_id: str) -> None:
        """The services' change hook: republish (or clear) the device's release (from any
        thread)."""
        self._to_loop(self._publish_release, device_id)

    def _to_loop(self, fn: Any, *args: Any) -> None:
        if self._loop is not None and not self._loop.is_closed():
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(fn, *args)

    # ------------------------------------------------------------------ the client's callbacks
    def _on_connect(self) -> None:
        client = self._client
        if client is None:
            return
        # Requests and telemetry through one shared subscription: the broker hands each message
        # to one bridge of the group (the replicas share the load). Status, to every bridge:
        # each keeps the fleet's presence, and a shared subscription gets no retained copies.
        client.subscribe([(f"{SHARE}/{DEVICE_PREFIX}/+/{leaf.value}", 1) for leaf in _SHARED]
                         + [(f"{DEVICE_PREFIX}/+/{Leaf.STATUS.value}", 1)])
        self._up()

    def _on_down(self, error: str, refused: bool) -> None:
        if refused:
            log.error("MQTT broker refused the bridge: %s", error)
        self.connected.clear()

    def _on_message(self, msg: Publish) -> None:
        self._inbox.put_nowait(msg)

    # ------------------------------------------------------------------ the event loop
    def _up(self) -> None:
        log.info("MQTT bridge connected to %s:%d", self.broker.host, self.broker.port)
        self.connected.set()
        self._published.clear()  # the broker may have lost its retained messages
        self._publish_roots()  # before any release signed by a key only a new root lists
        for device in self.s.ctx.store.list_devices():
            self._publish_release(device.id)

    async def _work(self) -> None:
        while True:
            group = await waiting(self._inbox, GROUP_COMMIT)
            # In arrival order; each run of telemetry messages is stored in one transaction.
            run: list[Publish] = []
            for msg in group:
                if _is_telemetry(msg):
                    run.append(msg)
                    continue
                if run:
                    await self._telemetry_group(run)
                    run = []
                try:
                    await self._handle(msg)
                except Exception:
                    log.exception("MQTT bridge: handling a message on %s failed", msg.topic)
                finally:
                    self._ack(msg)  # only now: a crash before means redelivery
            if run:
                await self._telemetry_group(run)

    def _ack(self, msg: Publish) -> None:
        client = self._client
        if client is not None and msg.qos > 0:
            client.ack(msg.packet_id)

    async def _telemetry_group(self, msgs: list[Publish]) -> None:
        """Telemetry batches stored in one transaction (group commit), each answered and
        acknowledged to the broker only after it committed. A batch refused by its checks is
        answered with the refusal; the group's transaction failing falls back to one
        transaction a batch (``TelemetryService.ingest_many``), so a bad batch cannot lose the
        others."""
        accepted: list[tuple[Publish, pki.Identity, bytes, agent_pb2.TelemetryBatch]] = []
        results: list[agent_pb2.TelemetryAck | Exception] = []
        # A device's identity checks run once a group: its batches arrived together, and
        # every one of them is answered only after the group's commit.
        callers: dict[str, pki.Identity] = {}
        try:
            for msg in msgs:
                device_id = parse_topic(msg.topic)[0]  # type: ignore[index]
                correlation = msg.properties.correlation
                try:
                    caller = callers.get(device_id) or self.calls.device_by_id(device_id)
                    callers[device_id] = caller
                    batch = parse_message(agent_pb2.TelemetryBatch, msg.payload)
                except EdgefleetError as exc:
                    self._refused(device_id, Leaf.TELEMETRY, correlation, exc)
                    continue
                accepted.append((msg, caller, correlation, batch))
            if accepted:
                results = await self.calls.telemetry_many([(c, b) for _, c, _, b in accepted])
        except Exception:
            log.exception("MQTT bridge: storing a group of %d telemetry batches failed",
                          len(msgs))
            results = []
        with self._corked():  # the answers and the acknowledgements go out in one write
            try:
                if results:
                    self._answer(accepted, results)
            except Exception:
                log.exception("MQTT bridge: answering a group of %d telemetry batches failed",
                              len(msgs))
            finally:
                for msg in msgs:
                    self._ack(msg)

    def _corked(self) -> contextlib.AbstractContextManager[None]:
        client = self._client
        return client.corked() if client is not None else contextlib.nullcontext()

    def _answer(self, accepted: list[tuple[Publish, pki.Identity, bytes,
                                          agent_pb2.TelemetryBatch]],
                results: list[agent_pb2.TelemetryAck | Exception]) -> None:
        """Each stored batch's answer; each refused one's refusal."""
        for (_, caller, correlation, _), result in zip(accepted, results, strict=True):
            if isinstance(result, EdgefleetError):
                self._refused(caller.name, Leaf.TELEMETRY, correlation, result)
            elif isinstance(result, Exception):
                continue  # not stored (logged): no answer, the agent sends it again
            else:
                if correlation and len(correlation) <= MAX_CORRELATION_BYTES:
                    # Stored: the agent may delete these now (the broker's PUBACK was not
                    # enough: a broker killed before delivering would have lost them).
                    self._publish(caller.name, Leaf.TELEMETRY_ACK,
                                  result.SerializeToString(), correlation=correlation)
                self._emit("telemetry", caller.name)

    def _refused(self, device_id: str, leaf: Leaf, correlation: bytes,
                 exc: EdgefleetError) -> None:
        log.info("MQTT bridge: %s from %s refused: %s", leaf.value, device_id, exc)
        if leaf in _REPLY_TO and correlation and len(correlation) <= MAX_CORRELATION_BYTES:
            self._publish(device_id, _REPLY_TO[leaf], b"", correlation=correlation,
                          error=f"{status_code_for(exc).name}: {exc}")
        self._emit("refused", device_id)

    async def _handle(self, msg: Publish) -> None:
        parsed = parse_topic(msg.topic)
        if parsed is None or parsed[1] not in (*_SHARED, Leaf.STATUS):
            log.warning("MQTT bridge: ignored a message on %r", msg.topic[:200])
            return
        device_id, leaf = parsed
        payload = msg.payload
        correlation = msg.properties.correlation
        reply = _REPLY_TO.get(leaf, Leaf.RENEW_REPLY)
        try:
            caller = self.calls.device_by_id(device_id)
            if leaf is Leaf.TELEMETRY:
                ack = await self.calls.telemetry(
                    caller, parse_message(agent_pb2.TelemetryBatch, payload))
                if correlation and len(correlation) <= MAX_CORRELATION_BYTES:
                    # Stored: the agent may delete these now (the broker's PUBACK was not
                    # enough: a broker killed before delivering would have lost them).
                    self._publish(device_id, Leaf.TELEMETRY_ACK, ack.SerializeToString(),
                                  correlation=correlation)
                self._emit("telemetry", caller.name)
            elif leaf is Leaf.STATUS:
                await self._status(caller, payload, replayed=bool(msg.retain))
            elif len(correlation) > MAX_CORRELATION_BYTES:
                raise InvalidInputError("correlation data over the limit")
            elif leaf is Leaf.BUNDLE_REQUEST:
                carrier = check_carrier(dict(msg.properties.user))
                if carrier and self.tracing.otel is not None:
                    # The agent's download span, as over gRPC: its bundle request's span.
                    with self.tracing.otel.span(_FETCH_SPAN, carrier, {
                            "rpc.system": "mqtt", "edgefleet.device": device_id},
                            kind="server"):
                        self._bundle(caller, payload, correlation)
                else:
                    self._bundle(caller, payload, correlation)
            else:
                request = parse_message(agent_pb2.RenewCertificateRequest, payload)
                response = self.calls.renew(caller, request)
                self._publish(device_id, reply, response.SerializeToString(),
                              correlation=correlation)
        except EdgefleetError as exc:
            self._refused(device_id, leaf, correlation, exc)

    async def _status(self, caller: pki.Identity, payload: bytes, *,
                      replayed: bool = False) -> None:
        """``replayed``: the broker's retained copy, sent when the bridge subscribes: it tells
        presence, but is no heartbeat (it may be hours old)."""
        status = parse_message(agent_pb2.AgentStatus, payload)
        self.presence[caller.name] = status.online
        if status.online:
            self.s.ctx.disconnected.discard(caller.name)
        else:
            self.s.ctx.disconnected.add(caller.name)
        if not status.online:
            log.info("device %s went offline (MQTT)", caller.name)
        elif not replayed:
            await self.calls.heartbeat(caller, status.heartbeat, "mqtt", "mqtt")
            self._publish_release(caller.name)  # a heartbeat may have renewed it
        self._emit("online" if status.online else "offline", caller.name)

    def _bundle(self, caller: pki.Identity, payload: bytes, correlation: bytes) -> None:
        request = parse_message(agent_pb2.FetchBundleRequest, payload)
        for chunk in self.calls.bundle_chunks(caller, request, MAX_REQUEST_BYTES):
            self._publish(caller.name, Leaf.BUNDLE_REPLY, chunk.SerializeToString(),
                          correlation=correlation)

    def _publish_release(self, device_id: str) -> None:
        device = self.s.ctx.store.get_device(device_id)
        if device is None or self._client is None:
            return
        if device.revoked_at is not None:
            self._published.pop(device_id, None)
            self._publish(device_id, Leaf.RELEASE, b"", retain=True)  # clears the retained one
            return
        try:
            current = self.calls.release(self.calls.device_by_id(device_id))
        except EdgefleetError as exc:
            log.info("MQTT bridge: no release for %s: %s", device_id, exc)
            return
        if current is None or self._published.get(device_id) == current[0]:
            return
        serial, signed = current
        # The trace context is not for a device with a gRPC Sync stream open: taking it here
        # would leave that stream's push without it (the bridge retains every device's
        # release, whatever its transport).
        trace = {} if self.grpc_streams(device_id) else self.tracing.take(device_id)
        self._publish(device_id, Leaf.RELEASE, signed.SerializeToString(), retain=True,
                      trace=trace)
        self._published[device_id] = serial
        self._emit("release", device_id)

    def _publish(self, device_id: str, leaf: Leaf, payload: bytes, *, retain: bool = False,
                 correlation: bytes = b"", error: str = "",
                 trace: dict[str, str] | None = None) -> None:
        client = self._client
        if client is None:
            return
        user = [(ERROR_PROPERTY, error[:1000])] if error else []
        user += sorted((trace or {}).items())  # W3C trace context as MQTT 5 user properties
        # Not awaited: a lost answer is asked for again (telemetry is sent again, and stored
        # once), and a retained release is published again on the next connection. A
        # telemetry answer goes at QoS 0: it is lost only with the connection, when the batch
        # is sent again anyway, and QoS 1 would cost two PUBACKs through the broker a batch.
        qos = 0 if leaf is Leaf.TELEMETRY_ACK else 1
        client.publish(topic(device_id, leaf), payload, qos=qos, retain=retain,
                       correlation=correlation, user=tuple(user), wait=False)

    def _emit(self, what: str, device_id: str) -> None:
        if self.on_event is not None:
            self.on_event(what, device_id)
