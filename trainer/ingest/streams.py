"""Stream sources (MQTT 5, NATS JetStream): the small interface ``trainer.ingest.follow``
reads, the rules for stream URLs and settings (pure), and ``open_stream``.

A stream source hands out raw messages (``StreamMessage``: the body, the stream position where
the stream has one, whether the broker says it is a redelivery) and acknowledges them only when
the caller says so, after it made their rows durable. Killed before that, the broker delivers
the messages again. The clients live in ``streams_mqtt`` (paho-mqtt) and ``streams_nats``
(nats-py); a Kafka consumer would be one more module with the same four methods
(``open``, ``fetch``, ``ack``, ``close``: the partition offset as ``position``, a commit of the
highest acknowledged offset per partition as ``ack``) and one more scheme here.

Hostile input: URLs are checked before any connection (scheme, host, port, a topic or subject
that is well formed, no credentials, no query); a password comes only from the environment
variable named by ``password_env``; every error is one line naming the URL without userinfo;
a message larger than ``StreamLimits.max_message_bytes`` is acknowledged, dropped and counted
in ``source.oversized``, never handed to the caller.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from fleetcore.errors import InvalidInputError
from trainer.ingest.streams_base import (
    StreamLimits,
    StreamMessage,
    StreamTarget,
    client_name,
    credentials,
    parse_stream_url,
    tls_context,
)

__all__ = ["StreamLimits", "StreamMessage", "StreamSource", "StreamTarget", "client_name",
           "open_stream", "parse_stream_url"]

DEFAULT_LIMITS = StreamLimits()


class StreamSource(Protocol):
    url: str  # the URL without userinfo (safe to log)
    oversized: int  # messages over max_message_bytes acknowledged and dropped so far

    def open(self) -> None:
        """Connect (InvalidInputError, one line naming ``url``, on failure)."""

    def fetch(self, max_messages: int, timeout_s: float) -> list[StreamMessage]:
        """Up to ``max_messages``, waiting at most ``timeout_s`` for the first; [] then."""

    def ack(self, messages: Sequence[StreamMessage]) -> None:
        """Acknowledge (once the caller made them durable); idempotent."""

    def close(self) -> None:
        """Disconnect; what was fetched and not acknowledged is delivered again later."""


def open_stream(url: str, *, name: str, settings: Mapping[str, Any],
                limits: StreamLimits = DEFAULT_LIMITS) -> StreamSource:
    """A stream source for ``url`` (not yet connected: call ``open``). ``name`` is the stable
    identity of the durable session (MQTT client id) or consumer (JetStream durable name);
    ``settings``: tls_ca, tls_cert, tls_key, username, password_env, qos (MQTT: 0 or 1,
    default 1), stream (NATS: the stream's name; default: the stream that holds the subject),
    ack_wait_seconds (NATS: redelivery after this long without an ack, default 30)."""
    target = parse_stream_url(url)
    creds = credentials(target, settings)
    ctx = tls_context(target, settings)
    if limits.max_message_bytes < 1:
        raise InvalidInputError("max_message_bytes must be at least 1")
    if target.protocol == "mqtt":
        from trainer.ingest.streams_mqtt import MqttSource

        return MqttSource(target, client_name(name), creds, ctx, settings, limits)
    from trainer.ingest.streams_nats import NatsSource

    return NatsSource(target, client_name(name), creds, ctx, settings, limits)
