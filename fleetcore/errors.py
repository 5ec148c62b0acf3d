"""Errors shared by every component, split by who is at fault.

* ``UntrustedInputError`` and its subclasses: the other side sent something we refuse
  (malformed, oversized, badly signed, expired, replayed, not allowed). Retrying the same
  input will fail the same way.
* ``TransportError``: the network or the peer failed; retrying later may succeed.

Messages say what was expected and what was received. Servers map these to wire status codes
in exactly one place (``control_plane/api/status.py``).
"""

from __future__ import annotations

__all__ = [
    "AlreadyExistsError",
    "AuthenticationError",
    "BadSignatureError",
    "EdgefleetError",
    "ExpiredError",
    "InvalidInputError",
    "NotFoundError",
    "PermissionDeniedError",
    "ReplayError",
    "RevokedError",
    "RollbackError",
    "TokenError",
    "TransportError",
    "UntrustedInputError",
    "WrongDeviceError",
]


class EdgefleetError(Exception):
    """Base of every error this project raises on purpose."""


class UntrustedInputError(EdgefleetError):
    """Input from outside (a peer, a file, an operator) that we refuse."""


class InvalidInputError(UntrustedInputError):
    """Malformed or oversized input, or input that breaks a documented limit."""


class AuthenticationError(UntrustedInputError):
    """The caller could not be identified (no, unknown or unacceptable certificate)."""


class RevokedError(AuthenticationError):
    """The caller's certificate or device has been revoked."""


class PermissionDeniedError(UntrustedInputError):
    """The caller is identified but its role does not allow the action."""


class TokenError(UntrustedInputError):
    """An enrollment token is unknown, already used or expired."""


class ExpiredError(UntrustedInputError):
    """Something time-limited is past its expiry."""


class NotFoundError(EdgefleetError):
    """The named object does not exist."""


class AlreadyExistsError(EdgefleetError):
    """The object to create exists already."""


class TransportError(EdgefleetError):
    """The network or the remote side failed; the same request may succeed later."""


class BadSignatureError(UntrustedInputError):
    """A signature does not verify with the pinned key (forged, altered, or the wrong key)."""


class WrongDeviceError(UntrustedInputError):
    """A signed document names another device (mix-and-match)."""


class RollbackError(UntrustedInputError):
    """A signed document is older than the newest one already trusted."""


class ReplayError(UntrustedInputError):
    """A signed document reuses a trusted serial with different content."""


class RateLimitedError(UntrustedInputError):
    """Too many attempts from this caller (or from everyone) just now; try again later."""
