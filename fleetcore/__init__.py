"""What two or more Edgefleet components share: errors, PKI, SQLite and file helpers."""

from fleetcore.errors import (
    AuthenticationError,
    EdgefleetError,
    InvalidInputError,
    PermissionDeniedError,
    RevokedError,
    TokenError,
    TransportError,
    UntrustedInputError,
)

__all__ = [
    "AuthenticationError",
    "EdgefleetError",
    "InvalidInputError",
    "PermissionDeniedError",
    "RevokedError",
    "TokenError",
    "TransportError",
    "UntrustedInputError",
]

__version__ = "0.1.0"
