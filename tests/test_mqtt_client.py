"""fleetcore.mqtt_client and its codec: against a real Mosquitto where a real broker can show
the behaviour (round trips with properties, more in flight than the broker's receive maximum),
and against a scripted broker on a real socket where only a hostile or broken broker can
(malformed and oversized packets, silence, a refusal, a connection dropped mid-publish, a
PUBACK held until the caller acknowledges). The codec's decoders take untrusted bytes: every
failure is ``MalformedPacket`` (Hypothesis, tests/test_fuzz.py style)."""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fleetcore import mqtt_codec as codec
from fleetcore.mqtt_client import MqttClient
from scripts.broker import start_plain_mosquitto
from tests.mqtt_support import free_port
from tests.support import WAIT


# ---------------------------------------------------------------------- the codec
def _frames(data: bytes, max_packet: int = 1 << 20, step: int = 0) -> list[tuple[int, int,
                                                                             bytes]]:
    framer = codec.Framer(max_packet)
    chunks = [data[i:i + step] for i in range(0, len(data), step)] if step else [data]
    return [(k, f, bytes(b)) for chunk in chunks for k, f, b in framer.feed(chunk)]


def test_a_publish_round_trips_with_its_properties_whatever_the_chunking() -> None:
    payload = bytes(range(256)) * 300  # 76.8 KB: a varint of three bytes
    raw = codec.publish("edgefleet/v1/dev/d-1/telemetry", payload, qos=1, packet_id=7,
                        retain=True, correlation=b"\x00corr",
                        user=(("error", "INVALID: x"), ("traceparent", "00-ab")))
    raw2 = codec.puback(7)
    for step in (0, 1, 1000):
        frames = _frames(raw + raw2, step=step)
        assert [(k, f) for k, f, _ in frames] == [(codec.PUBLISH, 0b0011), (codec.PUBACK, 0)]
        msg = codec.decode_publish(frames[0][1], memoryview(frames[0][2]))
        assert (msg.topic, msg.payload, msg.qos, msg.retain, msg.packet_id) == (
            "edgefleet/v1/dev/d-1/telemetry", payload, 1, True, 7)
        assert msg.properties.correlation == b"\x00corr"
        assert msg.properties.user == [("error", "INVALID: x"), ("traceparent", "00-ab")]
        assert codec.decode_puback(memoryview(frames[1][2]))[:2] == (7, 0)


def test_the_framer_refuses_a_packet_over_its_limit_from_the_header_alone() -> None:
    framer = codec.Framer(1000)
    assert framer.feed(b"\x30") == []  # not even the length yet
    with pytest.raises(codec.MalformedPacket, match="limit is 1000"):
        framer.feed(b"\xe9\x07")  # 1001: refused before a byte of the body arrived
    with pytest.raises(codec.MalformedPacket, match="longer than 4 bytes"):
        codec.Framer(1 << 30).feed(b"\x30\xff\xff\xff\xff\x01")


@pytest.mark.parametrize(("flags", "body", "why"), [
    (0b0100, b"\x00\x01t\x00\x01\x00", "QoS 2"),
    (0b0010, b"\x00\x01t\x00\x00\x00", "packet identifier 0"),
    (0b0000, b"\x00\x05t", "past the end"),
    (0b0000, b"\x00\x01\xff\x00", "UTF-8"),
    (0b0000, b"\x00\x01t\x02\x7f\x00", "unknown property"),
    (0b0000, b"\x00\x01t\x05\x09\x00\x09ab", "past the end"),
    (0b0000, b"\x00\x00\x00", "empty topic"),
    (0b0000, b"\x00\x01t" + codec._varint(65 * 6) + b"\x26\x00\x01k\x00\x00" * 65,
     "too many user properties"),
])
def test_a_malformed_publish_is_refused(flags: int, body: bytes, why: str) -> None:
    with pytest.raises(codec.MalformedPacket, match=why):
        codec.decode_publish(flags, memoryview(body))


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300), st.integers(0, 15), st.integers(1, 40))
def test_untrusted_bytes_decode_or_raise_malformed_packet(data: bytes, flags: int,
                                                          step: int) -> None:
    decoders: list[Callable[[memoryview], Any]] = [
        lambda b: codec.decode_publish(flags, b), codec.decode_connack, codec.decode_puback,
        codec.decode_suback, codec.decode_reason]
    for decode in decoders:
        with contextlib.suppress(codec.MalformedPacket):
            decode(memoryview(data))
    try:
        for chunk in (data[i:i + step] for i in range(0, len(data), step)):
            for _, _, body in codec.Framer(200).feed(chunk):
                assert len(body) <= 200
    except codec.MalformedPacket:
        pass


# ---------------------------------------------------------------------- a real Mosquitto
@pytest.fixture
def broker(tmp_path: Path) -> Iterator[int]:
    port = free_port()
    proc = start_plain_mosquitto(tmp_path, port, max_inflight=20)
    try:
        yield port
    finally:
        proc.terminate()
        proc.wait(WAIT)


def _run(main: Callable[[], Awaitable[Any]]) -> Any:
    return asyncio.run(asyncio.wait_for(main(), WAIT))


async def _up(client: MqttClient) -> MqttClient:
    client.start()
    await asyncio.wait_for(client.connected.wait(), WAIT)
    return client


def test_messages_and_their_properties_go_through_mosquitto(broker: int) -> None:
    async def main() -> list[codec.Publish]:
        got: asyncio.Queue[codec.Publish] = asyncio.Queue()
        sub = await _up(MqttClient("127.0.0.1", broker, None, "sub",
                                   on_message=got.put_nowait))
        assert await sub.subscribe([("t/#", 1)]) == [1]
        pub = await _up(MqttClient("127.0.0.1", broker, None, "pub"))
        big = bytes(range(256)) * 4000  # 1 MB
        assert await pub.publish("t/a", b"one", correlation=b"c1",  # type: ignore[misc]
                                 user=(("k", "v"),)) == 0
        assert await pub.publish("t/b", big) == 0  # type: ignore[misc]
        out = [await got.get(), await got.get()]
        await pub.close()
        await sub.close()
        return out

    first, second = _run(main)
    assert (first.topic, first.payload, first.qos) == ("t/a", b"one", 1)
    assert first.properties.correlation == b"c1" and first.properties.user == [("k", "v")]
    assert second.topic == "t/b" and second.payload == bytes(range(256)) * 4000


def test_packets_written_corked_go_out_together_in_order_at_the_end(broker: int) -> None:
    async def main() -> tuple[int, list[bytes]]:
        got: asyncio.Queue[codec.Publish] = asyncio.Queue()
        sub = await _up(MqttClient("127.0.0.1", broker, None, "sub", on_message=got.put_nowait))
        await sub.subscribe([("t/#", 1)])
        pub = await _up(MqttClient("127.0.0.1", broker, None, "pub"))
        assert pub._proto is not None and pub._proto.transport is not None
        transport = pub._proto.transport
        writes: list[bytes] = []
        real = transport.write

        def write(data: Any) -> None:
            writes.append(bytes(data))
            real(data)

        transport.write = write  # type: ignore[method-assign]
        with pub.corked():
            for i in range(3):
                pub.publish("t/c", b"%d" % i, qos=0)
            with pub.corked():  # nested: the outer one sends
                pub.publish("t/c", b"3", qos=0)
            acked = pub.publish("t/c", b"4")  # QoS 1 too
            assert writes == []
        together = len(writes)
        assert await acked == 0  # type: ignore[misc]
        out = [(await got.get()).payload for _ in range(5)]
        await pub.close()
        await sub.close()
        return together, out

    assert _run(main) == (1, [b"0", b"1", b"2", b"3", b"4"])


def test_more_publishes_than_the_brokers_receive_maximum_all_arrive_in_order(
        broker: int) -> None:
    async def main() -> tuple[list[int], list[bytes]]:
        got: list[bytes] = []
        all_in = asyncio.Event()

        def on_message(msg: codec.Publish) -> None:
            got.append(msg.payload)
            if len(got) == 300:
                all_in.set()

        sub = await _up(MqttClient("127.0.0.1", broker, None, "sub", on_message=on_message))
        await sub.subscribe([("t/#", 1)])
        pub = await _up(MqttClient("127.0.0.1", broker, None, "pub"))
        assert pub._send_max == 20  # the broker's receive maximum, from its CONNACK
        futures = [pub.publish("t/x", str(i).encode()) for i in range(300)]
        codes = list(await asyncio.gather(*futures))  # type: ignore[arg-type]
        await all_in.wait()
        await pub.close()
        await sub.close()
        return codes, got

    codes, got = _run(main)
    assert codes == [0] * 300
    assert got == [str(i).encode() for i in range(300)]


# ---------------------------------------------------------------------- a scripted broker
class _Broker:
    """A broker on a real socket that does what a test scripts: ``handle(packets, writer)``
    for each connection, with the client's packets as (type, flags, body) in a queue."""

    def __init__(self, handle: Callable[[asyncio.Queue[tuple[int, int, bytes]],
                                         asyncio.StreamWriter], Awaitable[None]]) -> None:
        self.handle = handle
        self.connections = 0
        self.port = 0
        self.server: asyncio.Server | None = None

    async def start(self) -> _Broker:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        packets: asyncio.Queue[tuple[int, int, bytes]] = asyncio.Queue()

        async def pump() -> None:
            framer = codec.Framer(1 << 24)
            while data := await reader.read(65536):
                for kind, flags, body in framer.feed(data):
                    packets.put_nowait((kind, flags, bytes(body)))

        task = asyncio.create_task(pump())
        try:
            await self.handle(packets, writer)
        finally:
            task.cancel()
            writer.close()

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()


CONNACK_OK = bytes([0x20, 3, 0, 0, 0])


def _connack(reason: int) -> bytes:
    return bytes([0x20, 3, 0, reason, 0])


async def _expect(packets: asyncio.Queue[tuple[int, int, bytes]], kind: int) -> bytes:
    got, _, body = await packets.get()
    assert got == kind, f"expected packet type {kind}, got {got}"
    return body


def _downs(client_kwargs: dict[str, Any] | None = None) -> tuple[
        list[tuple[str, bool]], asyncio.Queue[tuple[str, bool]], dict[str, Any]]:
    seen: list[tuple[str, bool]] = []
    q: asyncio.Queue[tuple[str, bool]] = asyncio.Queue()

    def on_down(error: str, refused: bool) -> None:
        seen.append((error, refused))
        q.put_nowait((error, refused))

    return seen, q, {"on_down": on_down, "reconnect": (0.01, 0.02), **(client_kwargs or {})}


@pytest.mark.parametrize(("bad", "why"), [
    (bytes([0x34, 5, 0, 1, ord("t"), 0, 1]), "QoS 2"),  # a QoS 2 PUBLISH
    (bytes([0x30, 0xFF, 0xFF, 0xFF, 0x7F]), "limit is"),  # 256 MB announced, nothing sent
    (bytes([0x50, 2, 0, 1]), "unexpected packet type 5"),  # PUBREC: QoS 2 is never used
])
def test_a_bad_packet_from_the_broker_drops_the_connection_and_it_reconnects(
        bad: bytes, why: str) -> None:
    async def main() -> tuple[str, int]:
        async def handle(packets: asyncio.Queue[tuple[int, int, bytes]],
                         writer: asyncio.StreamWriter) -> None:
            await _expect(packets, codec.CONNECT)
            writer.write(CONNACK_OK + bad if fake.connections == 1 else CONNACK_OK)
            await asyncio.Event().wait()  # until the client goes

        fake = await _Broker(handle).start()
        connects, again = [0], asyncio.Event()

        def on_connect() -> None:
            connects[0] += 1
            if connects[0] == 2:
                again.set()

        _, downs, kwargs = _downs({"on_connect": on_connect})
        client = MqttClient("127.0.0.1", fake.port, None, "c", max_packet=1 << 20, **kwargs)
        client.start()
        error, _ = await downs.get()
        await again.wait()
        await client.close()
        await fake.close()
        return error, connects[0]

    error, connects = _run(main)
    assert why in error and "bad packet" in error
    assert connects == 2  # connected, dropped on the bad packet, connected again


def test_a_refused_connect_says_so_and_a_silent_broker_is_dropped_at_the_keepalive() -> None:
    async def main() -> list[tuple[str, bool]]:
        async def handle(packets: asyncio.Queue[tuple[int, int, bytes]],
                         writer: asyncio.StreamWriter) -> None:
            await _expect(packets, codec.CONNECT)
            writer.write(_connack(0x87) if fake.connections == 1 else CONNACK_OK)
            while True:  # never answers a PINGREQ
                await packets.get()

        fake = await _Broker(handle).start()
        _, downs, kwargs = _downs()
        client = MqttClient("127.0.0.1", fake.port, None, "c", keepalive=1, **kwargs)
        client.start()
        out = [await downs.get(), await downs.get()]
        await client.close()
        await fake.close()
        return out

    (refused, was_refused), (silent, silent_refused) = _run(main)
    assert refused == "refused: Not authorized" and was_refused
    assert "keep-alive timeout" in silent and not silent_refused


def test_a_lost_connection_fails_what_was_not_acknowledged() -> None:
    async def main() -> BaseException | None:
        async def handle(packets: asyncio.Queue[tuple[int, int, bytes]],
                         writer: asyncio.StreamWriter) -> None:
            await _expect(packets, codec.CONNECT)
            writer.write(CONNACK_OK)
            await _expect(packets, codec.PUBLISH)  # never acknowledged: the broker goes

        fake = await _Broker(handle).start()
        client = await _up(MqttClient("127.0.0.1", fake.port, None, "c",
                                      reconnect=(5.0, 5.0)))
        future = client.publish("t", b"x")
        assert future is not None
        with pytest.raises(ConnectionError):
            await future
        error = future.exception()
        await client.close()
        await fake.close()
        return error

    assert isinstance(_run(main), ConnectionError)


def test_with_manual_ack_a_message_is_acknowledged_only_when_the_caller_says() -> None:
    async def main() -> list[int]:
        order: list[int] = []
        both = asyncio.Event()
        received: asyncio.Queue[codec.Publish] = asyncio.Queue()

        async def handle(packets: asyncio.Queue[tuple[int, int, bytes]],
                         writer: asyncio.StreamWriter) -> None:
            await _expect(packets, codec.CONNECT)
            writer.write(CONNACK_OK + codec.publish("t", b"m", qos=1, packet_id=42))
            for _ in range(2):
                kind, _, body = await packets.get()
                order.append(kind)
                if kind == codec.PUBACK:
                    assert struct.unpack(">H", body[:2]) == (42,)
            both.set()
            await asyncio.Event().wait()

        fake = await _Broker(handle).start()
        client = await _up(MqttClient("127.0.0.1", fake.port, None, "c", manual_ack=True,
                                      on_message=received.put_nowait))
        msg = await received.get()
        client.publish("marker", b"", qos=0)  # reaches the broker before any PUBACK
        client.ack(msg.packet_id)
        await both.wait()
        await client.close()
        await fake.close()
        return order

    assert _run(main) == [codec.PUBLISH, codec.PUBACK]


class _Pausing(MqttClient):
    """Records each wait before a reconnect (and then waits it)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.pauses: list[float] = []

    async def _pause(self, seconds: float) -> None:
        self.pauses.append(seconds)
        await super()._pause(seconds)


def test_the_reconnect_delay_doubles_while_refused_and_starts_over_after_a_connection() -> None:
    async def main() -> list[float]:
        async def handle(packets: asyncio.Queue[tuple[int, int, bytes]],
                         writer: asyncio.StreamWriter) -> None:
            await _expect(packets, codec.CONNECT)
            if fake.connections <= 3:  # refused three times, then up (and dropped at once)
                writer.write(_connack(0x87))
                await asyncio.Event().wait()
            writer.write(CONNACK_OK)

        fake = await _Broker(handle).start()
        _, downs, kwargs = _downs()
        kwargs["reconnect"] = (0.01, 0.08)
        client = _Pausing("127.0.0.1", fake.port, None, "c", **kwargs)
        client.start()
        for _ in range(5):  # three refusals, then two accepted connections dropped
            await downs.get()
        await client.close()
        await fake.close()
        return client.pauses[:4]

    pauses = _run(main)
    bounds = [0.01, 0.02, 0.04, 0.01]  # doubling while refused; after a connection, the least
    assert all(b / 2 <= p <= b for p, b in zip(pauses, bounds, strict=True)), pauses
