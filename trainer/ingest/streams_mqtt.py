"""An MQTT 5 stream source (paho-mqtt 2.x) with a persistent session and manual acks.

The client connects with ``clean_start`` false and a long session expiry under a client id
derived from the ingest's name, subscribes at QoS 1 and acknowledges a message (PUBACK) only
when the caller calls ``ack``: a consumer killed before that gets the message again, flagged
DUP, when it reconnects with the same name. ``ack`` returns once the broker has processed the
PUBACKs (an UNSUBSCRIBE of a topic nobody uses is answered after them: one round trip per call).

Mosquitto 2.0.11 can crash on a reload that finds an offline persistent session of a client
identified by its certificate (docs/mqtt.md), which is why the fleet's agents and bridge use
clean sessions. Ingest needs a persistent session (it is what makes a killed consumer lose
nothing), so give the ingest client a user name and password (``username``, ``password_env``)
or a certificate on a listener without ``use_identity_as_username``, not the agents' kind of
identity.
"""

from __future__ import annotations

import logging
import queue
import ssl
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from fleetcore.errors import InvalidInputError
from trainer.ingest.streams_base import Credentials, StreamLimits, StreamMessage, StreamTarget

__all__ = ["MqttSource"]

log = logging.getLogger(__name__)

SESSION_EXPIRY_S = 30 * 24 * 3600  # the broker keeps the session (and queues) 30 days away
RECEIVE_MAXIMUM = 1000  # QoS 1 messages the broker may have in flight to us unacknowledged
KEEPALIVE_S = 30
CONNECT_TIMEOUT_S = 15.0
ACK_SYNC_TIMEOUT_S = 10.0
# Packets up to this size are received (and counted when over max_message_bytes); larger ones
# the broker discards without sending (MQTT 5 Maximum Packet Size), uncounted.
PACKET_CAP_FACTOR = 4
PACKET_OVERHEAD = 64 * 1024


@dataclass(frozen=True)
class _Token:
    generation: int  # which connection delivered it (a packet id means nothing on another)
    mid: int
    qos: int
    delivery: int  # unique per delivery, so a second ack of one message sends nothing


class MqttSource:
    """mqtt:// and mqtts:// (see the module docstring)."""

    def __init__(self, target: StreamTarget, client_id: str, creds: Credentials,
                 ctx: ssl.SSLContext | None, settings: Mapping[str, Any],
                 limits: StreamLimits) -> None:
        qos = settings.get("qos", 1)
        qos = 1 if qos is None else qos
        if isinstance(qos, bool) or qos not in (0, 1):
            raise InvalidInputError(
                f"data source {target.safe_url}: qos must be 1 (at least once, the default) or 0 "
                "(at most once; a killed consumer loses what was in flight); QoS 2 is not used")
        self.url = target.safe_url
        self.oversized = 0
        self._target, self._client_id, self._creds, self._ctx = target, client_id, creds, ctx
        self._qos, self._limits = int(qos), limits
        self._messages: queue.Queue[StreamMessage] = queue.Queue()
        self._lock = threading.Lock()
        self._generation = 0
        self._deliveries = 0
        self._outstanding: dict[int, int] = {}  # mid -> delivery, on the current connection
        self._events: queue.Queue[tuple[str, Any]] = queue.Queue()  # open()'s connect/suback
        self._opening = False  # events are recorded only while open() waits for them
        self._unsubacked = threading.Condition()
        self._unsub_done: set[int] = set()  # UNSUBACKs received (mids), until _sync sees them
        self._generation_lost = False
        self._client: mqtt.Client | None = None
        self._sync_topic = f"edgefleet/ingest-sync/{client_id}"

    # -- the interface ----------------------------------------------------------------------

    def open(self) -> None:
        where = f"data source {self.url}"
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=self._client_id,
                             protocol=mqtt.MQTTv5, manual_ack=True, reconnect_on_failure=True)
        if self._creds.username is not None:
            client.username_pw_set(self._creds.username, self._creds.password)
        if self._ctx is not None:
            client.tls_set_context(self._ctx)
        client.reconnect_delay_set(min_delay=1, max_delay=30)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        client.on_unsubscribe = self._on_unsubscribe
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = SESSION_EXPIRY_S
        props.ReceiveMaximum = RECEIVE_MAXIMUM
        props.MaximumPacketSize = (self._limits.max_message_bytes * PACKET_CAP_FACTOR
                                   + PACKET_OVERHEAD)
        self._client = client
        self._drain_events()
        try:
            client.connect(self._target.host, self._target.port, keepalive=KEEPALIVE_S,
                           clean_start=False, properties=props)
        except (OSError, ssl.SSLError, ValueError) as exc:
            self._client = None
            raise InvalidInputError(f"{where}: cannot connect: {_describe(exc, self._creds)}"
                                    ) from None
        self._opening = True
        client.loop_start()
        try:
            self._await_open(where)
        except BaseException:
            self.close()
            raise
        finally:
            self._opening = False
            self._drain_events()

    def fetch(self, max_messages: int, timeout_s: float) -> list[StreamMessage]:
        try:
            first = self._messages.get(timeout=max(0.0, timeout_s))
        except queue.Empty:
            return []
        out = [first]
        while len(out) < max_messages:
            try:
                out.append(self._messages.get_nowait())
            except queue.Empty:
                break
        return out

    def ack(self, messages: Sequence[StreamMessage]) -> None:
        client = self._client
        if client is None:
            return
        sent = 0
        with self._lock:
            for m in messages:
                t = m.token
                if not isinstance(t, _Token) or t.qos == 0 or t.generation != self._generation:
                    continue  # another connection's packet id: the broker sends it again
                if self._outstanding.get(t.mid) != t.delivery:
                    continue  # acknowledged already
                del self._outstanding[t.mid]
                client.ack(t.mid, t.qos)
                sent += 1
        if sent:
            self._sync(client)

    def close(self) -> None:
        client, self._client = self._client, None
        if client is None:
            return
        client.disconnect()  # the session stays (its expiry); unacked messages come again
        client.loop_stop()

    # -- paho callbacks (its network thread) --------------------------------------------------

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: mqtt.ConnectFlags,
                    reason: ReasonCode, props: Properties | None) -> None:
        if reason.is_failure:
            self._event(("connect", reason))
            log.warning("%s: the broker refused the connection: %s", self.url, reason)
            return
        with self._lock:
            self._generation += 1
            self._outstanding.clear()
            if flags.session_present:
                # what is queued from the last connection comes again, flagged DUP
                self._drain()
        options = SubscribeOptions(qos=self._qos, retainHandling=1)
        client.subscribe(self._target.topic, options=options)
        self._event(("connect", reason))

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: mqtt.DisconnectFlags,
                       reason: ReasonCode, props: Properties | None) -> None:
        self._event(("disconnect", reason))
        if reason.value == 0x8E:  # Session taken over
            log.warning("%s: another client connected with this ingest's client id %s (two "
                        "followers of one pipeline?); reconnecting", self.url, self._client_id)
        with self._unsubacked:
            self._generation_lost = True  # an ack waiting for its round trip stops waiting
            self._unsubacked.notify_all()

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int,
                      reasons: list[ReasonCode], props: Properties | None) -> None:
        self._event(("suback", reasons[0] if reasons else None))

    def _on_unsubscribe(self, client: mqtt.Client, userdata: Any, mid: int,
                        reasons: list[ReasonCode], props: Properties | None) -> None:
        with self._unsubacked:
            self._unsub_done.add(mid)
            self._unsubacked.notify_all()

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            if len(msg.payload) > self._limits.max_message_bytes:
                self.oversized += 1
                if msg.qos:
                    client.ack(msg.mid, msg.qos)
                log.warning("%s: dropped a message of %d bytes (the limit is %d)", self.url,
                            len(msg.payload), self._limits.max_message_bytes)
                return
            self._deliveries += 1
            token = _Token(self._generation, msg.mid, msg.qos, self._deliveries)
            if msg.qos:
                self._outstanding[msg.mid] = self._deliveries
            self._messages.put(StreamMessage(payload=bytes(msg.payload), position=None,
                                             redelivered=bool(msg.dup), token=token))

    # -- helpers ------------------------------------------------------------------------------

    def _await_open(self, where: str) -> None:
        deadline = time.monotonic() + CONNECT_TIMEOUT_S
        connected = False
        while True:
            try:
                kind, reason = self._events.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                what = "no answer to SUBSCRIBE" if connected else "no CONNACK"
                raise InvalidInputError(f"{where}: {what} within {CONNECT_TIMEOUT_S:g} s"
                                        ) from None
            if kind == "connect" and reason.is_failure:
                hint = (" (check data.username and the variable named by data.password_env)"
                        if reason.value in (0x86, 0x87) else "")
                raise InvalidInputError(f"{where}: the broker refused the connection: "
                                        f"{reason}{hint}")
            if kind == "connect":
                connected = True
            elif kind == "disconnect" and not connected:
                raise InvalidInputError(f"{where}: the broker closed the connection: {reason}")
            elif kind == "suback":
                if reason is None or reason.is_failure:
                    raise InvalidInputError(f"{where}: the broker refused the subscription to "
                                            f"{self._target.topic!r}: {reason}")
                return

    def _event(self, event: tuple[str, Any]) -> None:
        if self._opening:
            self._events.put(event)

    def _drain_events(self) -> None:
        while True:
            try:
                self._events.get_nowait()
            except queue.Empty:
                return

    def _drain(self) -> None:
        while True:
            try:
                self._messages.get_nowait()
            except queue.Empty:
                return

    def _sync(self, client: mqtt.Client) -> None:
        """Wait until the broker has processed what was sent before (its UNSUBACK follows)."""
        with self._unsubacked:
            self._generation_lost = False
            self._unsub_done.clear()
        rc, mid = client.unsubscribe(self._sync_topic)
        if rc != mqtt.MQTT_ERR_SUCCESS or mid is None:
            return  # disconnected: the messages come again and the caller's keys drop them
        with self._unsubacked:
            done = self._unsubacked.wait_for(
                lambda: mid in self._unsub_done or self._generation_lost, ACK_SYNC_TIMEOUT_S)
            self._unsub_done.discard(mid)
        if not done:
            log.warning("%s: no UNSUBACK within %g s after acknowledging", self.url,
                        ACK_SYNC_TIMEOUT_S)


def _describe(exc: BaseException, creds: Credentials) -> str:
    text = " ".join(str(exc).split())[:300]
    if creds.password:
        text = text.replace(creds.password, "REDACTED")
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused (is the broker running and is the port right?)"
    return f"{type(exc).__name__}: {text}"
