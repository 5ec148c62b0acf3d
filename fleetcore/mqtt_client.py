"""A lean MQTT 5 client on asyncio: one TLS connection, reconnected with a growing delay.

The agents' transport and the control plane's bridge use it (``fleetcore.mqtt_codec`` has the
packets). Everything runs on the caller's event loop: no network thread, no hand-off between
threads for each message, which is where paho-mqtt spent most of the telemetry path's CPU
(docs/mqtt.md). What it does, and nothing more:

* ``start`` connects (TCP, TLS with the caller's context: the agents and the bridge always
  give one, ``None`` is plain TCP for tests; CONNECT with an optional will) and,
  whenever the connection is lost, connects again after ``reconnect`` seconds, doubling up to
  the maximum, with jitter so that a fleet that lost its broker does not come back at once;
  ``on_connect`` runs after each CONNACK that accepted it (subscribe there: the session is
  clean), ``on_down(error, refused)`` after each failure or loss (``refused``: the broker said
  who we are is not welcome, e.g. "Not authorized").
* ``publish`` at QoS 0 or 1; at QoS 1 it returns a future of the broker's PUBACK reason code,
  or with ``wait=False`` nothing. At most the broker's receive maximum are in flight; more wait
  in order. A connection lost fails the futures of what was not acknowledged
  (``ConnectionError``): the callers send again (telemetry stays in the agent's outbox).
* Received messages go to ``on_message`` in order. With ``manual_ack`` a QoS 1 message is
  acknowledged only when the caller calls ``ack`` (the bridge: after its transaction commits).
* ``corked()``: what is written inside goes out in one write at its end (the bridge's answers
  and acknowledgements of a group).
* Keep-alive: PINGREQ every half keep-alive; nothing heard for 1.5 keep-alives drops the
  connection. Bytes from the broker are bounded by ``max_packet``; a malformed packet drops the
  connection too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import ssl
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

from fleetcore import mqtt_codec as codec

__all__ = ["MqttClient"]

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_SECONDS = 10.0


class _Protocol(asyncio.Protocol):
    def __init__(self, client: MqttClient) -> None:
        self.client = client
        self.framer = codec.Framer(client.max_packet)
        self.transport: asyncio.Transport | None = None
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            for kind, flags, body in self.framer.feed(data):
                self.client._packet(self, kind, flags, body)
            if self.framer.broken is not None:
                raise self.framer.broken
        except codec.MalformedPacket as exc:
            log.warning("MQTT broker %s:%d sent a bad packet: %s", self.client.host,
                        self.client.port, exc)
            self.abort(f"bad packet from the broker: {exc}")

    def abort(self, why: str) -> None:
        if not self.lost.done():
            self.lost.set_result(None)
            self.client._why = why
        if self.transport is not None:
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.client._why = f"connection lost: {exc}" if exc else "connection closed"
            self.lost.set_result(None)


class MqttClient:
    def __init__(self, host: str, port: int, tls: ssl.SSLContext | None, client_id: str, *,
                 keepalive: int = 30, clean_start: bool = True,
                 will: codec.Will | None = None,
                 session_expiry: int = 0, max_packet: int = 4 * 1024 * 1024,
                 reconnect: tuple[float, float] = (1.0, 30.0), manual_ack: bool = False,
                 on_connect: Callable[[], None] = lambda: None,
                 on_down: Callable[[str, bool], None] = lambda error, refused: None,
                 on_message: Callable[[codec.Publish], None] = lambda msg: None) -> None:
        self.host, self.port, self.tls, self.client_id = host, port, tls, client_id
        self.keepalive, self.will, self.session_expiry = keepalive, will, session_expiry
        self.clean_start = clean_start
        self.max_packet = max_packet
        self.reconnect = reconnect
        self.manual_ack = manual_ack
        self.on_connect, self.on_down, self.on_message = on_connect, on_down, on_message
        self.connected = asyncio.Event()
        self._proto: _Protocol | None = None
        self._task: asyncio.Task[None] | None = None
        self._why = ""
        self._next_id = 0
        self._pending: dict[int, asyncio.Future[int] | None] = {}  # in flight, by packet id
        self._waiting: deque[tuple[bytes, int, asyncio.Future[int] | None]] = deque()
        self._queued: set[int] = set()  # the packet ids of those waiting
        self._send_max = 65535  # the broker's receive maximum
        self._subacks: dict[int, asyncio.Future[list[int]]] = {}
        self._connack: asyncio.Future[tuple[int, codec.Properties]] | None = None
        self._heard = 0.0
        self._was_up = False  # the current connection got as far as an accepted CONNACK
        self._cork: list[bytes] | None = None  # writes held by ``corked``

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        """DISCONNECT (the will is not sent) and stop; what was not acknowledged fails."""
        task, self._task = self._task, None
        proto = self._proto
        if proto is not None and proto.transport is not None and self.connected.is_set():
            proto.transport.write(codec.disconnect())
            proto.transport.close()
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._lost("closed")

    def socket(self) -> socket.socket | None:
        proto = self._proto
        if proto is None or proto.transport is None:
            return None
        return proto.transport.get_extra_info("socket")

    async def _run(self) -> None:
        delay = self.reconnect[0]
        while True:
            refused, self._was_up = False, False
            try:
                refused = await self._session()
            except (OSError, ssl.SSLError, TimeoutError, codec.MalformedPacket) as exc:
                self._why = f"cannot connect: {exc}"
            except Exception as exc:  # a bug must not end the reconnecting for good
                log.exception("MQTT connection to %s:%d failed", self.host, self.port)
                self._why = f"failed: {exc}"
            finally:
                self._lost(self._why or "disconnected")
            if self._was_up:  # it was up: start over from the shortest delay
                delay = self.reconnect[0]
            self.on_down(self._why, refused)
            # Jitter: half to the whole delay, so that a fleet does not come back at once.
            await self._pause(delay * (0.5 + random.random() / 2))  # noqa: S311
            delay = min(delay * 2, self.reconnect[1])

    async def _pause(self, seconds: float) -> None:
        """The wait before connecting again (its own method: tests watch the delays)."""
        await asyncio.sleep(seconds)

    async def _session(self) -> bool:
        """One connection, until it is lost; True when the broker refused us."""
        loop = asyncio.get_running_loop()
        self._why = ""
        proto: _Protocol
        transport, proto = await asyncio.wait_for(loop.create_connection(
            lambda: _Protocol(self), self.host, self.port, ssl=self.tls,
            server_hostname=self.host if self.tls is not None else None),
            CONNECT_TIMEOUT_SECONDS)
        sock = transport.get_extra_info("socket")
        if sock is not None:  # small packets behind a large one must not wait for an ACK
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._proto = proto
        connack: asyncio.Future[tuple[int, codec.Properties]] = loop.create_future()
        self._connack = connack
        transport.write(codec.connect(
            self.client_id, keepalive=self.keepalive, clean_start=self.clean_start,
            session_expiry=self.session_expiry,
            maximum_packet_size=self.max_packet, will=self.will))
        try:
            lost: asyncio.Future[Any] = proto.lost
            done, _ = await asyncio.wait({connack, lost}, timeout=CONNECT_TIMEOUT_SECONDS,
                                         return_when=asyncio.FIRST_COMPLETED)
            if connack not in done:
                self._why = self._why or "no CONNACK"
                return False
            reason, props = connack.result()
            if reason >= 0x80:
                self._why = f"refused: {codec.reason_name(reason)}"
                return True
            self._send_max = props.receive_maximum
            self._heard = loop.time()
            self.connected.set()
            self._was_up = True
            try:
                self.on_connect()
            except Exception:
                log.exception("MQTT: the connect handler failed")
            ping = loop.create_task(self._keepalive(proto))
            try:
                await proto.lost
            finally:
                ping.cancel()
            return False
        finally:
            transport.close()  # flushes a DISCONNECT that close() wrote

    async def _keepalive(self, proto: _Protocol) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.keepalive / 2)
            if loop.time() - self._heard > 1.5 * self.keepalive:
                proto.abort("keep-alive timeout: nothing from the broker")
                return
            self._write(codec.pingreq())

    def _lost(self, why: str) -> None:
        self.connected.clear()
        self._proto = None
        error = ConnectionError(f"MQTT connection to {self.host}:{self.port}: {why}")
        for future in [*self._pending.values(), *(f for _, _, f in self._waiting),
                       *self._subacks.values()]:
            if future is not None and not future.done():
                future.set_exception(error)
                future.exception()  # retrieved: a caller that stopped waiting logs nothing
        self._pending.clear()
        self._waiting.clear()
        self._queued.clear()
        self._subacks.clear()

    # ------------------------------------------------------------------ sending
    @contextlib.contextmanager
    def corked(self) -> Iterator[None]:
        """The packets written inside go to the connection together at the end, in order: one
        TLS record and one send for a group's answers and acknowledgements, not one each."""
        if self._cork is not None:  # corked already: the outer one sends them
            yield
            return
        held: list[bytes] = []
        self._cork = held
        try:
            yield
        finally:
            self._cork = None
            if held:
                self._write(b"".join(held))

    def _write(self, data: bytes) -> bool:
        proto = self._proto
        if proto is None or proto.transport is None or proto.transport.is_closing():
            return False
        if self._cork is not None:
            self._cork.append(data)
        else:
            proto.transport.write(data)
        return True

    def _packet_id(self) -> int:
        for _ in range(65535):
            self._next_id = self._next_id % 65535 + 1
            if (self._next_id not in self._pending and self._next_id not in self._subacks
                    and self._next_id not in self._queued):
                return self._next_id
        raise ConnectionError("no free packet identifier")

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False,
                correlation: bytes = b"", user: tuple[tuple[str, str], ...] = (),
                wait: bool = True) -> asyncio.Future[int] | None:
        """Send (QoS 0: once, if connected; QoS 1: acknowledged by the broker, whose reason
        code the future gets). Not connected: QoS 0 is dropped, QoS 1 fails at once."""
        if not self.connected.is_set():
            if qos and wait:
                refused: asyncio.Future[int] = asyncio.get_running_loop().create_future()
                refused.set_exception(ConnectionError(
                    f"MQTT broker {self.host}:{self.port} not connected: {self._why}"))
                return refused
            return None
        if not qos:
            self._write(codec.publish(topic, payload, qos=0, retain=retain,
                                      correlation=correlation, user=user))
            return None
        future: asyncio.Future[int] | None = (
            asyncio.get_running_loop().create_future() if wait else None)
        packet_id = self._packet_id()
        packet = codec.publish(topic, payload, qos=1, packet_id=packet_id, retain=retain,
                               correlation=correlation, user=user)
        if len(self._pending) < self._send_max:
            self._pending[packet_id] = future
            self._write(packet)
        else:
            self._waiting.append((packet, packet_id, future))
            self._queued.add(packet_id)
        return future

    def subscribe(self, filters: list[tuple[str, int]]) -> asyncio.Future[list[int]]:
        """SUBSCRIBE; the future gets the broker's reason codes, one a filter."""
        future: asyncio.Future[list[int]] = asyncio.get_running_loop().create_future()
        packet_id = self._packet_id()
        self._subacks[packet_id] = future
        if not self._write(codec.subscribe(packet_id, filters)):
            self._subacks.pop(packet_id)
            future.set_exception(ConnectionError("MQTT broker not connected"))
            future.exception()  # retrieved: subscribing again is the next connection's job
        return future

    def ack(self, packet_id: int) -> None:
        """PUBACK a QoS 1 message received with ``manual_ack`` (lost with the connection it
        came on: the broker sends it again)."""
        if packet_id:
            self._write(codec.puback(packet_id))

    # ------------------------------------------------------------------ receiving
    def _packet(self, proto: _Protocol, kind: int, flags: int, body: memoryview) -> None:
        self._heard = asyncio.get_running_loop().time()
        if kind == codec.PUBLISH:
            msg = codec.decode_publish(flags, body)
            if msg.qos and not self.manual_ack:
                self.ack(msg.packet_id)
            try:
                self.on_message(msg)
            except Exception:
                log.exception("MQTT: handling a message on %s failed", msg.topic[:200])
        elif kind == codec.PUBACK:
            packet_id, code, _ = codec.decode_puback(body)
            future = self._pending.pop(packet_id, None)
            if future is not None and not future.done():
                future.set_result(code)
            self._send_waiting()
        elif kind == codec.SUBACK:
            packet_id, codes, _ = codec.decode_suback(body)
            sub = self._subacks.pop(packet_id, None)
            if sub is not None and not sub.done():
                sub.set_result(codes)
        elif kind == codec.CONNACK and self._connack is not None and not self._connack.done():
            self._connack.set_result(codec.decode_connack(body))
        elif kind == codec.PINGRESP:
            pass
        elif kind == codec.DISCONNECT:
            code, props = codec.decode_reason(body)
            proto.abort(f"the broker disconnected: {codec.reason_name(code)}"
                        + (f" ({props.reason[:200]})" if props.reason else ""))
        else:
            raise codec.MalformedPacket(f"unexpected packet type {kind}")

    def _send_waiting(self) -> None:
        while self._waiting and len(self._pending) < self._send_max:
            packet, packet_id, future = self._waiting.popleft()
            self._queued.discard(packet_id)
            self._pending[packet_id] = future
            self._write(packet)
