"""Source strings: which kind of source a ``[data] source`` names, and its URL made safe to
show (pure; no I/O).

A source URL never carries a secret: a password in the URL is refused (``password_env`` names
the environment variable that holds it), and the values of query parameters whose names look
like credentials (``api_key``, ``token``, ``sig``...) are replaced by ``REDACTED`` wherever a
URL is shown or recorded (logs, errors, lineage, manifests).
"""

from __future__ import annotations

import re
from urllib.parse import SplitResult, parse_qsl, urlencode, urlsplit, urlunsplit

from fleetcore.errors import InvalidInputError

__all__ = ["KINDS", "REDACTED", "check_source", "redact", "scrub", "source_kind"]

REDACTED = "REDACTED"
# scheme -> kind of source
_SCHEMES = {
    "postgresql": "sql", "postgres": "sql", "mysql": "sql", "mariadb": "sql",
    "https": "http", "http": "http",
    "mqtt": "stream", "mqtts": "stream", "nats": "stream", "tls": "stream",
}
KINDS = ("sklearn", "csv", "parquet", "sql", "http", "stream")
_SECRET_PARAM = re.compile(r"(key|token|secret|pass|pwd|sig|auth|credential)", re.IGNORECASE)


def source_kind(source: str) -> str:
    """'sklearn', 'csv', 'parquet', 'sql', 'http' or 'stream' (InvalidInputError otherwise)."""
    if source.startswith(("sklearn:", "csv:", "parquet:")):
        return source.partition(":")[0]
    scheme = _split(source).scheme.lower()
    base = scheme.partition("+")[0]  # postgresql+psycopg://: a SQLAlchemy driver suffix
    kind = _SCHEMES.get(base)
    if kind is None or (scheme != base and kind != "sql"):
        raise InvalidInputError(
            f"data source {redact(source)!r}: unknown kind of source; expected sklearn:NAME, "
            "csv:PATH, parquet:PATH, postgresql://..., mysql://..., https://..., mqtt(s)://... "
            "or nats://..."
        )
    return kind


def check_source(source: str) -> str:
    """The source's kind, after refusing a URL that holds a password or lacks a host."""
    kind = source_kind(source)
    if kind in ("sql", "http", "stream"):
        parts = _split(source)
        if parts.password is not None:
            raise InvalidInputError(
                f"data source {redact(source)!r} holds a password; remove it from the URL and "
                "name the environment variable that holds it with data.password_env"
            )
        try:
            port = parts.port
        except ValueError:
            raise InvalidInputError(f"data source {redact(source)!r}: the port is not a number "
                                    "in 0..65535") from None
        if not parts.hostname:
            raise InvalidInputError(f"data source {redact(source)!r}: no host in the URL")
        del port
        if kind in ("sql", "stream") and not parts.path.strip("/"):
            what = "database" if kind == "sql" else "topic or subject"
            raise InvalidInputError(
                f"data source {redact(source)!r}: no {what} after the host (e.g. "
                f"{parts.scheme}://{parts.hostname}:{parts.port or 1}/NAME)"
            )
    return kind


def _split(source: str) -> SplitResult:
    """A URL's parts; in a stream URL '#' is MQTT's wildcard, not a fragment."""
    stream = source.partition("://")[0].lower() in ("mqtt", "mqtts")
    return urlsplit(source, allow_fragments=not stream)


def redact(source: str) -> str:
    """``source`` with any password and credential-like query values replaced."""
    if source.startswith(("sklearn:", "csv:", "parquet:")) or "://" not in source:
        return source
    try:
        parts = _split(source)
        netloc = parts.netloc
        if "@" in netloc:
            userinfo, _, hostport = netloc.rpartition("@")
            user = userinfo.partition(":")[0]
            netloc = f"{user}{':' + REDACTED if ':' in userinfo else ''}@{hostport}"
        query = urlencode([(k, REDACTED if _SECRET_PARAM.search(k) else v)
                           for k, v in parse_qsl(parts.query, keep_blank_values=True)],
                          safe="/:")
        return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
    except ValueError:
        return "<unparsable URL>"


def scrub(text: str, *secrets: str | None) -> str:
    """``text`` with every non-empty secret replaced (for a driver's error message)."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, REDACTED)
    return text
