"""The control plane's MQTT bridge: the AgentService's job for agents that speak MQTT.

It connects to the broker as ``edgefleet:bridge`` (a certificate from `mqtt-config`), with a
persistent session and manual acknowledgement: a device's QoS 1 message is acknowledged to the
broker only after its handler ran, so what arrives while the control plane is down or dies
half-way is delivered again, and the handlers' deduplication on (device, seq) makes it count
once. Like a servicer it translates protobuf to handler calls and nothing else; the handlers
are the ones the gRPC servicer calls.

Identity: the device id comes from the topic. The broker's ACL lets a client write only under
``edgefleet/v1/dev/<the CN of its certificate>/``, so the topic names the certificate's device;
the bridge still refuses ids that are not registered or are revoked.

Per device: the signed release, retained on ``release`` (published at start, on every change
the handlers announce, and when a heartbeat renews it), bundle chunks on request, telemetry,
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
from typing import Any

import paho.mqtt.client as mqtt
from edgefleet.v1 import agent_pb2, common_pb2
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from control_plane._status import status_code_for
from control_plane.domain import TelemetryRecord
from control_plane.handlers import Handlers
from control_plane.mqtt_config import BRIDGE_NAME, MqttSettings
from control_plane.servicers import BUNDLE_CHUNK_BYTES, _models_from_proto, host_from_proto
from fleetcore import pki
from fleetcore.errors import AuthenticationError, EdgefleetError, InvalidInputError
from fleetcore.mqtt_wire import (
    DEVICE_PREFIX,
    ERROR_PROPERTY,
    MAX_MESSAGE_BYTES,
    Leaf,
    parse_message,
    parse_topic,
    parse_url,
    topic,
)

__all__ = ["MqttBridge"]

log = logging.getLogger(__name__)

SESSION_EXPIRY_SECONDS = 7 * 24 * 3600
# One bundle request may ask for at most this much (agents ask for 1 MiB windows).
MAX_REQUEST_BYTES = 4 * 1024 * 1024
MAX_CORRELATION_BYTES = 64
_INBOX = (Leaf.TELEMETRY, Leaf.STATUS, Leaf.BUNDLE_REQUEST, Leaf.RENEW_REQUEST)


class MqttBridge:
    def __init__(self, handlers: Handlers, url: str, home: Path, settings: MqttSettings, *,
                 on_event: Callable[[str, str], None] | None = None) -> None:
        self.h = handlers
        self.broker = parse_url(url)
        self.home = home
        self.settings = settings
        self.on_event = on_event  # (what, device id): for tests and metrics
        self.presence: dict[str, bool] = {}
        self.connected = asyncio.Event()
        self._published: dict[str, int] = {}
        self._inbox: asyncio.Queue[mqtt.MQTTMessage] = asyncio.Queue()
        self._client: mqtt.Client | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._worker: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_verify_locations(cafile=str(self.settings.ca))
        ctx.load_cert_chain(self.settings.bridge_cert(self.home),
                            self.settings.bridge_key(self.home))
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=BRIDGE_NAME,
                             protocol=mqtt.MQTTv5, manual_ack=True)
        client.tls_set_context(ctx)
        client.reconnect_delay_set(1, 30)
        client.max_inflight_messages_set(100)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = SESSION_EXPIRY_SECONDS
        props.MaximumPacketSize = MAX_MESSAGE_BYTES + 64 * 1024
        client.connect_async(self.broker.host, self.broker.port, keepalive=30,
                             clean_start=False, properties=props)
        self._client = client
        self._worker = asyncio.create_task(self._work())
        client.loop_start()
        log.info("MQTT bridge connecting to %s:%d", self.broker.host, self.broker.port)

    async def stop(self) -> None:
        client, self._client = self._client, None
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
        if client is not None:
            client.disconnect()
            await asyncio.to_thread(client.loop_stop)
        self.connected.clear()

    def device_changed(self, device_id: str) -> None:
        """The handlers' change hook: republish (or clear) the device's release."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._publish_release, device_id)

    # ------------------------------------------------------------------ paho's thread
    def _to_loop(self, fn: Any, *args: Any) -> None:
        if self._loop is not None and not self._loop.is_closed():
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(fn, *args)

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: ReasonCode,
                    properties: Any) -> None:
        if reason.is_failure:
            log.error("MQTT broker refused the bridge: %s", reason)
            return
        client.subscribe([(f"{DEVICE_PREFIX}/+/{leaf.value}", 1) for leaf in _INBOX])
        self._to_loop(self._up)

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any,
                       reason: ReasonCode, properties: Any) -> None:
        self._to_loop(self.connected.clear)

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        self._to_loop(self._inbox.put_nowait, msg)

    # ------------------------------------------------------------------ the event loop
    def _up(self) -> None:
        log.info("MQTT bridge connected to %s:%d", self.broker.host, self.broker.port)
        self.connected.set()
        self._published.clear()  # the broker may have lost its retained messages
        for device in self.h.store.list_devices():
            self._publish_release(device.id)

    async def _work(self) -> None:
        while True:
            msg = await self._inbox.get()
            try:
                self._handle(msg)
            except Exception:
                log.exception("MQTT bridge: handling a message on %s failed", msg.topic)
            finally:
                client = self._client
                if client is not None and msg.qos > 0:
                    client.ack(msg.mid, msg.qos)  # only now: a crash before means redelivery

    def _device(self, device_id: str) -> pki.Identity:
        device = self.h.store.get_device(device_id)
        if device is None:
            raise AuthenticationError(f"device {device_id} is not registered")
        identity = pki.Identity(pki.IdentityKind.DEVICE, device_id, device.cert_serial)
        if device.revoked_at is not None:
            raise AuthenticationError(f"device {device_id} is revoked")
        return identity

    def _handle(self, msg: mqtt.MQTTMessage) -> None:
        parsed = parse_topic(msg.topic)
        if parsed is None or parsed[1] not in _INBOX:
            log.warning("MQTT bridge: ignored a message on %r", msg.topic[:200])
            return
        device_id, leaf = parsed
        payload = bytes(msg.payload)
        props = getattr(msg, "properties", None)
        correlation = bytes(getattr(props, "CorrelationData", b"") or b"")
        reply = Leaf.BUNDLE_REPLY if leaf is Leaf.BUNDLE_REQUEST else Leaf.RENEW_REPLY
        try:
            caller = self._device(device_id)
            if leaf is Leaf.TELEMETRY:
                self._telemetry(caller, payload)
            elif leaf is Leaf.STATUS:
                self._status(caller, payload, replayed=bool(msg.retain))
            elif len(correlation) > MAX_CORRELATION_BYTES:
                raise InvalidInputError("correlation data over the limit")
            elif leaf is Leaf.BUNDLE_REQUEST:
                self._bundle(caller, payload, correlation)
            else:
                request = parse_message(agent_pb2.RenewCertificateRequest, payload)
                pem = self.h.renew_certificate(caller, request.csr_pem)
                self._publish(device_id, reply, agent_pb2.RenewCertificateResponse(
                    certificate_pem=pem).SerializeToString(), correlation=correlation)
        except EdgefleetError as exc:
            log.info("MQTT bridge: %s from %s refused: %s", leaf.value, device_id, exc)
            if leaf in (Leaf.BUNDLE_REQUEST, Leaf.RENEW_REQUEST) and correlation and len(
                    correlation) <= MAX_CORRELATION_BYTES:
                self._publish(device_id, reply, b"", correlation=correlation,
                              error=f"{status_code_for(exc).name}: {exc}")
            self._emit("refused", device_id)

    def _telemetry(self, caller: pki.Identity, payload: bytes) -> None:
        batch = parse_message(agent_pb2.TelemetryBatch, payload)
        records = [TelemetryRecord(r.seq, r.kind[:256], r.created_at, r.payload)
                   for r in batch.records]
        self.h.ingest_telemetry(caller, records, batch.dropped, batch.depth)
        self._emit("telemetry", caller.name)

    def _status(self, caller: pki.Identity, payload: bytes, *, replayed: bool = False) -> None:
        """``replayed``: the broker's retained copy, sent when the bridge subscribes: it tells
        presence, but is no heartbeat (it may be hours old)."""
        status = parse_message(agent_pb2.AgentStatus, payload)
        self.presence[caller.name] = status.online
        if status.online:
            self.h.disconnected.discard(caller.name)
        else:
            self.h.disconnected.add(caller.name)
        if not status.online:
            log.info("device %s went offline (MQTT)", caller.name)
        elif not replayed:
            beat = status.heartbeat
            self.h.heartbeat(caller, beat.agent_version[:256],
                             {**host_from_proto(beat.host), "transport": "mqtt"},
                             _models_from_proto(beat.models),
                             (beat.release_serial, beat.release_digest))
            self._publish_release(caller.name)  # a heartbeat may have renewed it
        self._emit("online" if status.online else "offline", caller.name)

    def _bundle(self, caller: pki.Identity, payload: bytes, correlation: bytes) -> None:
        request = parse_message(agent_pb2.FetchBundleRequest, payload)
        length = min(request.length or MAX_REQUEST_BYTES, MAX_REQUEST_BYTES)
        offset = request.offset
        for piece in self.h.bundle_for_device(caller, request.digest, offset, length):
            for i in range(0, len(piece), BUNDLE_CHUNK_BYTES):
                data = piece[i : i + BUNDLE_CHUNK_BYTES]
                self._publish(caller.name, Leaf.BUNDLE_REPLY, agent_pb2.BundleChunk(
                    offset=offset, data=data).SerializeToString(), correlation=correlation)
                offset += len(data)

    def _publish_release(self, device_id: str) -> None:
        device = self.h.store.get_device(device_id)
        if device is None or self._client is None:
            return
        if device.revoked_at is not None:
            self._published.pop(device_id, None)
            self._publish(device_id, Leaf.RELEASE, b"", retain=True)  # clears the retained one
            return
        release = self.h.current_release(self._device(device_id))
        if release is None or self._published.get(device_id) == release.serial:
            return
        signed = common_pb2.SignedRelease(document=release.document,
                                          signature=release.signature)
        self._publish(device_id, Leaf.RELEASE, signed.SerializeToString(), retain=True)
        self._published[device_id] = release.serial
        self._emit("release", device_id)

    def _publish(self, device_id: str, leaf: Leaf, payload: bytes, *, retain: bool = False,
                 correlation: bytes = b"", error: str = "") -> None:
        client = self._client
        if client is None:
            return
        props = Properties(PacketTypes.PUBLISH)
        if correlation:
            props.CorrelationData = correlation
        if error:
            props.UserProperty = (ERROR_PROPERTY, error[:1000])
        client.publish(topic(device_id, leaf), payload, qos=1, retain=retain, properties=props)

    def _emit(self, what: str, device_id: str) -> None:
        if self.on_event is not None:
            self.on_event(what, device_id)
