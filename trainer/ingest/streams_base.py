"""What the stream clients share (pure): the message and limits types, the rules for stream
URLs and settings, credentials from the environment and the TLS context. The interface and
``open_stream`` are in ``trainer.ingest.streams``."""

from __future__ import annotations

import hashlib
import os
import re
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from fleetcore.errors import InvalidInputError

__all__ = ["Credentials", "StreamLimits", "StreamMessage", "StreamTarget", "client_name",
           "credentials", "parse_stream_url", "tls_context"]

MIB = 1024 * 1024
MAX_TOPIC_BYTES = 65_535  # MQTT's limit for a topic (a UTF-8 string with a 16-bit length)
MAX_SUBJECT_BYTES = 4_096
MAX_NAME_CHARS = 64
_MQTT_SCHEMES = {"mqtt": False, "mqtts": True}  # scheme -> TLS
_NATS_SCHEMES = {"nats": False, "tls": True}
_DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883, "nats": 4222, "tls": 4222}
_SUBJECT_TOKEN = re.compile(r"^[^\s.*>]+$")
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


@dataclass(frozen=True)
class StreamMessage:
    """One message as the broker delivered it."""

    payload: bytes  # the raw body (a JSON row or a JSON list of rows; not parsed here)
    position: int | None  # the JetStream stream sequence; None for MQTT
    redelivered: bool  # MQTT's DUP flag; JetStream's num_delivered > 1
    token: Any = field(default=None, repr=False, compare=False)  # what ack() needs


@dataclass(frozen=True)
class StreamLimits:
    """Limits of one stream client. A message over ``max_message_bytes`` is acknowledged and
    dropped inside the client and counted in ``source.oversized``."""

    max_message_bytes: int = MIB


@dataclass(frozen=True)
class StreamTarget:
    """A checked stream URL."""

    scheme: str
    host: str
    port: int
    topic: str  # the MQTT topic filter or the NATS subject, percent-decoded
    username: str | None  # from the URL's userinfo (no password allowed there)
    tls: bool

    @property
    def protocol(self) -> str:
        return "mqtt" if self.scheme in _MQTT_SCHEMES else "nats"

    @property
    def safe_url(self) -> str:
        """The URL without userinfo, for logs, errors and lineage."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}/{self.topic}"


@dataclass(frozen=True)
class Credentials:
    username: str | None
    password: str | None = field(repr=False)


def _safe(url: str) -> str:
    """``url`` with userinfo removed, without trusting it to parse (for the first errors)."""
    try:
        parts = urlsplit(url, allow_fragments=False)
        netloc = parts.netloc.rpartition("@")[2]
        return f"{parts.scheme}://{netloc}{parts.path}"[:300]
    except ValueError:
        return "<unparsable URL>"


def parse_stream_url(url: str) -> StreamTarget:
    """Check a stream URL (pure): ``mqtt(s)://HOST[:PORT]/TOPIC`` or
    ``nats|tls://HOST[:PORT]/SUBJECT``. An MQTT wildcard ``#`` may be written as is or as
    ``%23``; the topic or subject is percent-decoded."""
    where = f"data source {_safe(url)}"
    if len(url) > MAX_TOPIC_BYTES + 1024 or any(c in url for c in "\r\n\t\x00"):
        raise InvalidInputError(f"{where}: the URL is too long or holds control characters")
    try:
        parts = urlsplit(url, allow_fragments=False)
        port = parts.port
    except ValueError:
        raise InvalidInputError(f"{where}: the port is not a number in 1..65535") from None
    scheme = parts.scheme.lower()
    if scheme not in _MQTT_SCHEMES and scheme not in _NATS_SCHEMES:
        raise InvalidInputError(f"{where}: not a stream URL; expected mqtt://, mqtts://, "
                                "nats:// or tls:// (NATS over TLS)")
    if parts.password is not None:
        raise InvalidInputError(f"{where}: the URL holds a password; remove it and name the "
                                "environment variable that holds it with data.password_env")
    if not parts.hostname:
        raise InvalidInputError(f"{where}: no host in the URL")
    if port == 0:
        raise InvalidInputError(f"{where}: the port is not a number in 1..65535")
    if parts.query:
        raise InvalidInputError(f"{where}: a stream URL takes no query string; settings go in "
                                "[data] (qos, stream, tls_ca, tls_cert, tls_key, username)")
    topic = unquote(parts.path[1:]) if parts.path.startswith("/") else ""
    if not topic:
        what, example = (("topic", "sensors/+/readings") if scheme in _MQTT_SCHEMES
                         else ("subject", "sensors.readings"))
        raise InvalidInputError(f"{where}: no {what} after the host (e.g. "
                                f"{scheme}://{parts.hostname}:{port or _DEFAULT_PORTS[scheme]}"
                                f"/{example})")
    if scheme in _MQTT_SCHEMES:
        _check_topic(topic, where)
        tls = _MQTT_SCHEMES[scheme]
    else:
        _check_subject(topic, where)
        tls = _NATS_SCHEMES[scheme]
    username = unquote(parts.username) if parts.username else None
    return StreamTarget(scheme=scheme, host=parts.hostname, port=port or _DEFAULT_PORTS[scheme],
                        topic=topic, username=username, tls=tls)


def _check_topic(topic: str, where: str) -> None:
    """An MQTT topic filter: UTF-8, no NUL, '+' a whole level, '#' a whole last level."""
    if len(topic.encode("utf-8", "surrogatepass")) > MAX_TOPIC_BYTES:
        raise InvalidInputError(f"{where}: the topic is longer than {MAX_TOPIC_BYTES} bytes")
    if "\x00" in topic or any(0xD800 <= ord(c) <= 0xDFFF for c in topic):
        raise InvalidInputError(f"{where}: the topic is not valid UTF-8 text")
    levels = topic.split("/")
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            raise InvalidInputError(f"{where}: '#' must be the whole last level of the topic "
                                    "(e.g. sensors/#)")
        if "+" in level and level != "+":
            raise InvalidInputError(f"{where}: '+' must be a whole level of the topic "
                                    "(e.g. sensors/+/readings)")


def _check_subject(subject: str, where: str) -> None:
    """A NATS subject: dot-separated tokens without spaces; '*' a whole token, '>' a whole last
    token (wildcards are accepted when the stream's subjects cover them: the server checks)."""
    if len(subject.encode()) > MAX_SUBJECT_BYTES:
        raise InvalidInputError(f"{where}: the subject is longer than {MAX_SUBJECT_BYTES} bytes")
    parts = subject.split(".")
    for i, part in enumerate(parts):
        if part == "*" or (part == ">" and i == len(parts) - 1):
            continue
        if not _SUBJECT_TOKEN.match(part):
            raise InvalidInputError(
                f"{where}: {subject!r} is not a NATS subject (dot-separated tokens without "
                "spaces; '*' a whole token, '>' the whole last token)")


def client_name(name: str) -> str:
    """The durable session / consumer name for ``name``: itself when it is short and plain
    (letters, digits, '-', '_'), else a digest of it (the same name gives the same session)."""
    if _NAME.match(name):
        return name
    return "ingest-" + hashlib.sha256(name.encode()).hexdigest()[:32]


def credentials(target: StreamTarget, settings: Mapping[str, Any]) -> Credentials:
    """The user name (settings first, then the URL's) and the password from the environment
    variable ``settings['password_env']`` (never from a file or the URL)."""
    where = f"data source {target.safe_url}"
    username = settings.get("username") or target.username
    env = settings.get("password_env")
    password = None
    if env:
        password = os.environ.get(str(env))
        if password is None:
            raise InvalidInputError(f"{where}: the environment variable {env} "
                                    "(data.password_env) is not set")
        if username is None:
            raise InvalidInputError(f"{where}: a password without a user name; set "
                                    "data.username")
    return Credentials(username=None if username is None else str(username), password=password)


def tls_context(target: StreamTarget, settings: Mapping[str, Any]) -> ssl.SSLContext | None:
    """The TLS context for mqtts:// and tls:// (TLS 1.2+, the server verified against
    ``tls_ca`` or the system's CAs, a client certificate from ``tls_cert``/``tls_key``);
    None for plain URLs, which refuse TLS settings rather than silently ignore them."""
    where = f"data source {target.safe_url}"
    ca, cert, key = (settings.get(k) for k in ("tls_ca", "tls_cert", "tls_key"))
    if not target.tls:
        if ca or cert or key:
            secure = "mqtts" if target.protocol == "mqtt" else "tls"
            raise InvalidInputError(f"{where}: TLS settings on a plain URL; use {secure}:// to "
                                    "connect over TLS")
        return None
    if bool(cert) != bool(key):
        raise InvalidInputError(f"{where}: data.tls_cert and data.tls_key go together")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        if ca:
            ctx.load_verify_locations(cafile=str(ca))
        else:
            ctx.load_default_certs()
        if cert and key:
            ctx.load_cert_chain(str(cert), str(key))
    except (OSError, ssl.SSLError) as exc:
        which = ", ".join(Path(str(p)).name for p in (ca, cert, key) if p)
        raise InvalidInputError(f"{where}: cannot load the TLS files ({which}): "
                                f"{type(exc).__name__}: {_one_line(str(exc))}") from None
    return ctx


def _one_line(text: str) -> str:
    return " ".join(text.split())[:300]
