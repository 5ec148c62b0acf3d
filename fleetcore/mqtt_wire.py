"""The MQTT contract between agents and the control plane's bridge: topics, limits, URLs.

Every device lives under ``edgefleet/v1/dev/{device_id}/``; the broker's ACL (written by
``control-plane mqtt-config``) confines a device to its own subtree, so the device id in a
topic is the one in the certificate that the broker verified. Payloads are the protobuf
messages of agent.proto:

==================  =========  ===========================================================
leaf                written by payload
==================  =========  ===========================================================
``release``         bridge     ``SignedRelease``, retained (empty: cleared, e.g. revoked)
``status``          agent      ``AgentStatus``, retained; the will says ``online=false``
``telemetry``       agent      ``TelemetryBatch`` at QoS 1
``bundle/request``  agent      ``FetchBundleRequest`` with MQTT 5 correlation data
``bundle/reply``    bridge     ``BundleChunk`` (same correlation data), or an error
``renew/request``   agent      ``RenewCertificateRequest`` with correlation data
``renew/reply``     bridge     ``RenewCertificateResponse`` (same correlation data), or an error
==================  =========  ===========================================================

An error reply carries an empty payload and the user property ``error`` = ``CODE: message``.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from google.protobuf.message import DecodeError, Message

from fleetcore.errors import InvalidInputError

__all__ = [
    "CLEAN_START",
    "DEVICE_PREFIX",
    "ERROR_PROPERTY",
    "MAX_MESSAGE_BYTES",
    "ROOTS_TOPIC",
    "SESSION_EXPIRY_SECONDS",
    "BrokerUrl",
    "Leaf",
    "parse_message",
    "parse_topic",
    "parse_url",
    "topic",
]

DEVICE_PREFIX = "edgefleet/v1/dev"
# Retained, fleet-wide, readable by every device: a SyncEvent holding only ``roots``, the
# latest signed roots of trust (oldest first; fleetcore/root.py verifies them on the agent).
ROOTS_TOPIC = "edgefleet/v1/fleet/roots"
ERROR_PROPERTY = "error"
# The largest MQTT message either side sends or accepts (a telemetry batch is at most 1 MiB of
# payloads, a bundle chunk 256 KiB); the broker's max_packet_size is set a little above it.
MAX_MESSAGE_BYTES = 2 * 1024 * 1024
# Both ends start a clean session that ends with the connection: the broker keeps no session of
# a client that is away. Mosquitto 2.0.11 (Debian 12) crashes on a reload (SIGHUP: the CRL) that
# finds an offline session of a certificate-identified client, once that client comes back (see
# docs/mqtt.md and scripts/broker_crash.py). Nothing depends on a queue in the broker: agents keep
# telemetry until the control plane acknowledges it, releases and presence are retained, and a
# request without an answer is asked again.
CLEAN_START = True
SESSION_EXPIRY_SECONDS = 0
DEFAULT_PORT = 8883
_DEVICE_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")


class Leaf(enum.StrEnum):
    RELEASE = "release"
    STATUS = "status"
    TELEMETRY = "telemetry"
    TELEMETRY_ACK = "telemetry/ack"  # the control plane stored these seqs (correlated)
    BUNDLE_REQUEST = "bundle/request"
    BUNDLE_REPLY = "bundle/reply"
    RENEW_REQUEST = "renew/request"
    RENEW_REPLY = "renew/reply"


def topic(device_id: str, leaf: Leaf) -> str:
    return f"{DEVICE_PREFIX}/{device_id}/{leaf.value}"


def parse_topic(name: str) -> tuple[str, Leaf] | None:
    """(device id, leaf) of a device topic; None for anything else."""
    prefix = DEVICE_PREFIX + "/"
    if not name.startswith(prefix):
        return None
    device_id, _, rest = name[len(prefix):].partition("/")
    if not _DEVICE_RE.match(device_id):
        return None
    try:
        return device_id, Leaf(rest)
    except ValueError:
        return None


@dataclass(frozen=True)
class BrokerUrl:
    host: str
    port: int


def parse_url(url: str) -> BrokerUrl:
    """``mqtts://HOST[:PORT]`` (TLS only: devices authenticate with their certificate)."""
    parts = urlsplit(url)
    if parts.scheme != "mqtts" or not parts.hostname:
        raise InvalidInputError(f"expected an MQTT URL like mqtts://HOST:PORT; got {url!r}")
    try:
        port = parts.port or DEFAULT_PORT
    except ValueError:
        raise InvalidInputError(f"bad port in MQTT URL {url!r}") from None
    return BrokerUrl(parts.hostname, port)


def parse_message(message: type[Message], payload: bytes, what: str = "") -> Any:
    """A protobuf message from untrusted MQTT bytes: size-limited, or ``InvalidInputError``."""
    what = what or message.__name__
    if len(payload) > MAX_MESSAGE_BYTES:
        raise InvalidInputError(f"{what} of {len(payload)} bytes; the limit is "
                                f"{MAX_MESSAGE_BYTES}")
    try:
        return message.FromString(payload)
    except DecodeError as exc:
        raise InvalidInputError(f"{what} is not a valid {message.__name__}: {exc}") from None
