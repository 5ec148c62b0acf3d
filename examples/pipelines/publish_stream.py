"""Publish rows of a scikit-learn data set (wine) to an MQTT topic or a NATS JetStream subject,
as a site's tills or sensors would: JSON rows with column names, at QoS 1 (MQTT: every PUBACK
awaited; JetStream: every publish acknowledged by the stream).

    python -m examples.pipelines.publish_stream mqtt://127.0.0.1:1883/shop/sales --rows 50
    python -m examples.pipelines.publish_stream nats://127.0.0.1:4222/shop.sales --rows 500 \\
        --batch 50 --offset 50 --create-stream SHOP

Each row: ``id`` (the row's number: ``--offset`` + i), ``created_at``, ``customer_email``
(PII), ``shop`` (categorical), the 13 wine features and ``cultivar`` (the label): the columns of
``examples/load_sql.py``. Past the data set's 178 rows it starts again from its first row (with
new ids). ``--batch K`` sends K rows per message as a JSON list. ``--bad N`` also sends N
malformed messages (not JSON) in between, to watch them counted and skipped. A password comes
from the environment variable named by ``--password-env``; TLS files from ``--tls-ca``,
``--tls-cert``, ``--tls-key`` (for mqtts:// and tls://).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import nats
import nats.js.errors
import paho.mqtt.client as mqtt
from sklearn import datasets

from fleetcore.errors import InvalidInputError
from trainer.ingest.streams_base import StreamTarget, credentials, parse_stream_url, tls_context

SHOPS = ["harbour", "market-square", "old-town", "station"]
START = datetime(2026, 1, 1, tzinfo=UTC)
WAIT_S = 30.0


def wine_rows(n: int, offset: int = 0) -> list[dict[str, Any]]:
    """Rows ``offset .. offset+n`` (ids), cycling through the data set's 178 rows."""
    bunch = datasets.load_wine()
    names = [c.replace("/", "_").replace(" ", "_") for c in bunch.feature_names]
    out = []
    for i in range(offset, offset + n):
        k = i % len(bunch.target)
        row: dict[str, Any] = {"id": i, "created_at": (START + timedelta(hours=i)).isoformat(),
                               "customer_email": f"customer{i}@example.com",
                               "shop": SHOPS[i % len(SHOPS)]}
        row.update({c: float(bunch.data[k, j]) for j, c in enumerate(names)})
        row["cultivar"] = str(bunch.target_names[bunch.target[k]])
        out.append(row)
    return out


def payloads(rows: list[dict[str, Any]], batch: int, bad: int = 0) -> Iterator[bytes]:
    """One message per row (batch 1) or per ``batch`` rows; ``bad`` malformed ones spread in."""
    bodies = [json.dumps(rows[i] if batch == 1 else rows[i:i + batch]).encode()
              for i in range(0, len(rows), batch)]
    step = max(1, len(bodies) // (bad + 1))
    sent_bad = 0
    for i, body in enumerate(bodies):
        if sent_bad < bad and i and i % step == 0:
            sent_bad += 1
            yield b"{not json"
        yield body
    while sent_bad < bad:
        sent_bad += 1
        yield b"{not json"


def publish(url: str, messages: list[bytes], settings: dict[str, Any] | None = None, *,
            create_stream: str | None = None) -> int:
    """Publish ``messages`` at QoS 1 (every acknowledgement awaited); returns how many."""
    settings = settings or {}
    target = parse_stream_url(url)
    if target.protocol == "mqtt":
        return _publish_mqtt(target, messages, settings)
    return asyncio.run(_publish_nats(target, messages, settings, create_stream))


def _publish_mqtt(target: StreamTarget, messages: list[bytes], settings: dict[str, Any]) -> int:
    if any(c in target.topic for c in "+#"):
        raise InvalidInputError(f"{target.safe_url}: publish to a topic without wildcards")
    creds = credentials(target, settings)
    ctx = tls_context(target, settings)
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    if creds.username is not None:
        c.username_pw_set(creds.username, creds.password)
    if ctx is not None:
        c.tls_set_context(ctx)
    c.max_inflight_messages_set(1000)
    c.max_queued_messages_set(0)
    c.connect(target.host, target.port)
    c.loop_start()
    try:
        infos = [c.publish(target.topic, m, qos=1) for m in messages]
        for info in infos:
            info.wait_for_publish(WAIT_S)
    finally:
        c.disconnect()
        c.loop_stop()
    return len(messages)


async def _publish_nats(target: StreamTarget, messages: list[bytes], settings: dict[str, Any],
                        create_stream: str | None) -> int:
    if any(t in ("*", ">") for t in target.topic.split(".")):
        raise InvalidInputError(f"{target.safe_url}: publish to a subject without wildcards")
    creds = credentials(target, settings)
    ctx = tls_context(target, settings)
    scheme = "tls" if target.tls else "nats"
    nc = await nats.connect(f"{scheme}://{target.host}:{target.port}", user=creds.username,
                            password=creds.password, tls=ctx, allow_reconnect=False)
    try:
        js = nc.jetstream()
        try:
            await js.find_stream_name_by_subject(target.topic)
        except nats.js.errors.NotFoundError:
            if not create_stream:
                raise InvalidInputError(f"{target.safe_url}: no JetStream stream holds the "
                                        "subject; name one to create with --create-stream"
                                        ) from None
            await js.add_stream(name=create_stream, subjects=[target.topic])
        # at most 256 publishes awaiting their acknowledgement at once
        for i in range(0, len(messages), 256):
            await asyncio.gather(*(js.publish(target.topic, m, timeout=WAIT_S)
                                   for m in messages[i:i + 256]))
    finally:
        await nc.close()
    return len(messages)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("url", help="mqtt(s)://HOST:PORT/TOPIC or nats|tls://HOST:PORT/SUBJECT")
    p.add_argument("--rows", type=int, default=178)
    p.add_argument("--offset", type=int, default=0, help="the first row's id")
    p.add_argument("--batch", type=int, default=1, help="rows per message (a JSON list if > 1)")
    p.add_argument("--bad", type=int, default=0, help="malformed messages to send in between")
    p.add_argument("--username")
    p.add_argument("--password-env", help="the environment variable that holds the password")
    p.add_argument("--tls-ca")
    p.add_argument("--tls-cert")
    p.add_argument("--tls-key")
    p.add_argument("--create-stream", metavar="NAME",
                   help="NATS: create this JetStream stream for the subject if it is missing")
    a = p.parse_args(argv)
    if a.rows < 0 or a.batch < 1 or a.bad < 0:
        print("error: --rows and --bad must be >= 0 and --batch >= 1", file=sys.stderr)
        return 2
    settings = {"username": a.username, "password_env": a.password_env, "tls_ca": a.tls_ca,
                "tls_cert": a.tls_cert, "tls_key": a.tls_key}
    messages = list(payloads(wine_rows(a.rows, a.offset), a.batch, a.bad))
    try:
        n = publish(a.url, messages, settings, create_stream=a.create_stream)
    except (InvalidInputError, OSError, TimeoutError) as exc:
        print(f"error: {' '.join(str(exc).split())[:300]} (is the broker running, at that "
              "address?)" if isinstance(exc, OSError) else f"error: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # a client library's own error: one line, no traceback
        print(f"error: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}",
              file=sys.stderr)
        return 1
    print(f"published {a.rows} rows in {n} messages ({a.bad} malformed) to "
          f"{parse_stream_url(a.url).safe_url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
