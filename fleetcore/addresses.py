"""``HOST:PORT`` addresses as the command lines and configs give them."""

from __future__ import annotations

from fleetcore.errors import InvalidInputError

__all__ = ["parse_hostport"]


def parse_hostport(text: str) -> tuple[str, int]:
    """``"127.0.0.1:7443"`` -> ``("127.0.0.1", 7443)``; ``[::1]:0`` works too (port 0: any)."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise InvalidInputError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)
