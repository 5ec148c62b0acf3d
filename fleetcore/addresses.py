"""``HOST:PORT`` addresses as the command lines and configs give them."""

from __future__ import annotations

from fleetcore.errors import InvalidInputError

__all__ = ["MAX_API_ADDRESSES", "failover_addresses", "parse_hostport"]

MAX_API_ADDRESSES = 32  # replicas an enrollment answer may name (more is refused)


def parse_hostport(text: str) -> tuple[str, int]:
    """``"127.0.0.1:7443"`` -> ``("127.0.0.1", 7443)``; ``[::1]:0`` works too (port 0: any)."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise InvalidInputError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


def failover_addresses(advertised: str, configured: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """The API addresses an agent may use: the configured replicas (``[server] api_addresses``,
    each once, in order), or only the advertised address when none are configured."""
    ordered = tuple(dict.fromkeys(a for a in configured if a))
    return ordered or ((advertised,) if advertised else ())
