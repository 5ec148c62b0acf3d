"""Stream ingest figures: our stream clients (trainer.ingest.streams) against a raw subscriber
of the same library, both measured in the same run against the same broker.

``python -m scripts.bench_ingest_streams [--messages 20000] [--mqtt URL] [--nats URL]``

For each broker, ``--messages`` wine rows (examples/pipelines/publish_stream.py, one JSON row
per message, ~400 bytes) are published at QoS 1 while the consumer is away, then consumed:

* ``raw_rate``: a raw subscriber. MQTT: paho-mqtt with a persistent session, QoS 1, paho's own
  automatic acknowledgements. NATS: nats-py, a durable pull consumer, ``fetch(500)`` and
  ``msg.ack()`` for every message.
* ``client_rate``: ``open_stream(...)``, then ``fetch(500, 1.0)`` and ``ack(batch)`` until every
  message came: what ``trainer ingest --follow`` does around its SQLite writes (MQTT: manual
  PUBACKs and a wait for the broker's confirmation per ack call; NATS: the acks and a flush per
  batch). Targets: >= 0.4x for MQTT (the confirmation wait, see TARGETS), >= 0.5x for NATS.

Both figures are messages per second from the consumer's connect to its last acknowledgement.
Without ``--mqtt``, a Mosquitto of the bench's own is started (its queue for an absent client
is unlimited, which the broker's default of 1,000 messages is not); without ``--nats``, the
machine's NATS at 127.0.0.1:4222 is used with a stream created and deleted by the bench.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pwd
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import nats
import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from control_plane.services.broker import MqttSettings
from examples.pipelines.publish_stream import payloads, publish, wine_rows
from scripts.broker import Mosquitto, find_mosquitto
from tests.mqtt_support import free_port
from trainer.ingest.streams import open_stream, parse_stream_url

__all__ = ["bench_streams", "client_rate", "raw_rate"]

FETCH = 500
WAIT_S = 120.0
# Our client's rate against the raw subscriber's. MQTT's is lower by design: each ack() call
# waits for the broker to confirm it has processed the PUBACKs (an UNSUBACK that queues behind
# the messages the broker already sent to refill its window), so a consumer killed after ack()
# returned gets none of them again; paho's automatic acks never wait.
TARGETS = {"MQTT": 0.4, "NATS JetStream": 0.5}


def _messages(n: int) -> list[bytes]:
    return list(payloads(wine_rows(n), 1))


# -- MQTT ------------------------------------------------------------------------------------

def _paho(client_id: str) -> mqtt.Client:
    return mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                       protocol=mqtt.MQTTv5)


def _mqtt_session(url: str, client_id: str, *, create: bool) -> None:
    """Create (subscribe, persistent) or remove (clean start, no expiry) a raw session."""
    t = parse_stream_url(url)
    c = _paho(client_id)
    done = threading.Event()
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 3600 if create else 0
    if create:
        c.on_connect = lambda cl, u, f, r, p: cl.subscribe(t.topic, qos=1)
        c.on_subscribe = lambda *a: done.set()
    else:
        c.on_connect = lambda *a: done.set()
    c.connect(t.host, t.port, clean_start=not create, properties=props)
    c.loop_start()
    try:
        if not done.wait(WAIT_S):
            raise RuntimeError(f"{t.safe_url}: no answer from the broker")
    finally:
        c.disconnect()
        c.loop_stop()


def _raw_mqtt(url: str, n: int) -> float:
    t = parse_stream_url(url)
    client_id = f"bench-raw-{uuid.uuid4().hex[:12]}"
    _mqtt_session(url, client_id, create=True)
    try:
        publish(url, _messages(n))
        got = 0
        done = threading.Event()

        def on_message(cl: mqtt.Client, u: Any, msg: mqtt.MQTTMessage) -> None:
            nonlocal got
            got += 1
            if got >= n:
                done.set()

        c = _paho(client_id)
        c.on_message = on_message
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600
        t0 = time.perf_counter()
        c.connect(t.host, t.port, clean_start=False, properties=props)
        c.loop_start()
        try:
            if not done.wait(WAIT_S):
                raise RuntimeError(f"raw paho: {got} of {n} messages came")
            elapsed = time.perf_counter() - t0
        finally:
            c.disconnect()
            c.loop_stop()
        return n / elapsed
    finally:
        _mqtt_session(url, client_id, create=False)


# -- NATS ------------------------------------------------------------------------------------

async def _raw_nats(server: str, subject: str, n: int) -> float:
    nc = await nats.connect(server)
    try:
        js = nc.jetstream()
        t0 = time.perf_counter()
        sub = await js.pull_subscribe(subject, durable=f"bench-raw-{uuid.uuid4().hex[:12]}")
        got = 0
        while got < n:
            try:
                msgs = await sub.fetch(FETCH, timeout=1.0)
            except nats.errors.TimeoutError:
                continue
            for m in msgs:
                await m.ack()
            got += len(msgs)
        await nc.flush()
        return n / (time.perf_counter() - t0)
    finally:
        await nc.close()


@contextmanager
def _nats_stream(url: str) -> Iterator[str]:
    """A stream of the bench's own for the URL's subject (deleted afterwards); yields its name."""
    t = parse_stream_url(url)
    server = f"nats://{t.host}:{t.port}"
    name = f"EF_BENCH_{uuid.uuid4().hex[:10]}"

    async def admin(add: bool) -> None:
        nc = await nats.connect(server)
        try:
            js = nc.jetstream()
            if add:
                await js.add_stream(name=name, subjects=[t.topic])
            else:
                await js.delete_stream(name)
        finally:
            await nc.close()

    asyncio.run(admin(True))
    try:
        yield name
    finally:
        asyncio.run(admin(False))


# -- the two figures -----------------------------------------------------------------------------

def raw_rate(url: str, n: int) -> float:
    """A raw paho / nats-py subscriber's messages per second for ``n`` messages published to
    ``url`` (MQTT: the broker must queue ``n`` for an absent client; NATS: a stream must hold
    the subject)."""
    t = parse_stream_url(url)
    if t.protocol == "mqtt":
        return _raw_mqtt(url, n)
    publish(url, _messages(n))
    return asyncio.run(_raw_nats(f"nats://{t.host}:{t.port}", t.topic, n))


def client_rate(url: str, n: int, settings: dict[str, Any] | None = None) -> float:
    """Our StreamSource's fetch+ack rate (messages per second) for ``n`` messages."""
    settings = settings or {}
    name = f"bench-client-{uuid.uuid4().hex[:12]}"
    t = parse_stream_url(url)
    if t.protocol == "mqtt":  # the session must exist before the messages are published
        first = open_stream(url, name=name, settings=settings)
        first.open()
        first.close()
    try:
        publish(url, _messages(n))
        t0 = time.perf_counter()
        source = open_stream(url, name=name, settings=settings)
        source.open()
        try:
            got = 0
            deadline = time.monotonic() + WAIT_S
            while got < n:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"stream client: {got} of {n} messages came")
                batch = source.fetch(FETCH, 1.0)
                source.ack(batch)
                got += len(batch)
            return n / (time.perf_counter() - t0)
        finally:
            source.close()
    finally:
        if t.protocol == "mqtt":
            _mqtt_session(url, name, create=False)


@contextmanager
def _own_mosquitto(work: Path) -> Iterator[str | None]:
    """A Mosquitto on a free port that queues without limit for absent clients; its URL."""
    binary = find_mosquitto()
    if binary is None:
        yield None
        return
    port = free_port()
    (work / "mosquitto.conf").write_text(
        f"user {pwd.getpwuid(os.getuid()).pw_name}\n"
        f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
        "max_queued_messages 0\nlog_dest stderr\nlog_type error\nlog_type information\n")
    broker = Mosquitto(MqttSettings(out=work, port=port), binary).start()
    try:
        yield f"mqtt://127.0.0.1:{port}/bench/ingest"
    finally:
        broker.stop()


def _row(what: str, n: int, figure: float, baseline: float, base_name: str) -> dict[str, Any]:
    ratio = figure / baseline
    target = TARGETS[what]
    return {"name": f"{what} stream client fetch+ack vs {base_name} ({n:,} messages)",
            "figure": round(figure), "baseline": round(baseline), "unit": "msg/s",
            "ratio": round(ratio, 2), "target": f">= {target}x", "pass": ratio >= target}


def bench_streams(work: Path, n: int = 20_000, *, mqtt_url: str | None = None,
                  nats_url: str = "nats://127.0.0.1:4222/bench.ingest.rows",
                  progress: Any = print) -> list[dict[str, Any]]:
    rows = []
    work.mkdir(parents=True, exist_ok=True)
    with _own_mosquitto(work) as own:
        url = mqtt_url or own
        if url is None:
            progress("MQTT: no mosquitto binary and no --mqtt URL: skipped")
        else:
            raw = raw_rate(url, n)
            ours = client_rate(url, n)
            rows.append(_row("MQTT", n, ours, raw, "raw paho subscriber"))
    with _nats_stream(nats_url):
        raw = raw_rate(nats_url, n)
    with _nats_stream(nats_url):
        ours = client_rate(nats_url, n)
    rows.append(_row("NATS JetStream", n, ours, raw, "raw nats-py pull consumer"))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--messages", type=int, default=20_000)
    p.add_argument("--mqtt", help="an MQTT broker's URL (default: a Mosquitto of the bench's own)")
    p.add_argument("--nats", default="nats://127.0.0.1:4222/bench.ingest.rows",
                   help="a NATS server's URL with JetStream (the bench makes its own stream)")
    p.add_argument("--json", type=Path, help="also write the rows here")
    args = p.parse_args(argv)
    from scripts.bench import _print  # noqa: PLC0415 - its imports are heavy

    with tempfile.TemporaryDirectory() as tmp:
        rows = bench_streams(Path(tmp), args.messages, mqtt_url=args.mqtt, nats_url=args.nats)
    _print(rows)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 1 if any(r["pass"] is False for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
