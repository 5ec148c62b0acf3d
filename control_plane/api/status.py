"""Domain errors -> gRPC status codes: the one place where that mapping lives."""

from __future__ import annotations

import grpc

from fleetcore.errors import (
    AlreadyExistsError,
    AuthenticationError,
    EdgefleetError,
    ExpiredError,
    InvalidInputError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitedError,
    TokenError,
    TransportError,
    UntrustedInputError,
)

__all__ = ["status_code_for"]

# Checked in order: the first class that matches wins, so subclasses come first.
_TABLE: tuple[tuple[type[EdgefleetError], grpc.StatusCode], ...] = (
    (AuthenticationError, grpc.StatusCode.UNAUTHENTICATED),
    (PermissionDeniedError, grpc.StatusCode.PERMISSION_DENIED),
    (TokenError, grpc.StatusCode.PERMISSION_DENIED),
    (RateLimitedError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (ExpiredError, grpc.StatusCode.FAILED_PRECONDITION),
    (InvalidInputError, grpc.StatusCode.INVALID_ARGUMENT),
    (UntrustedInputError, grpc.StatusCode.INVALID_ARGUMENT),
    (NotFoundError, grpc.StatusCode.NOT_FOUND),
    (AlreadyExistsError, grpc.StatusCode.ALREADY_EXISTS),
    (TransportError, grpc.StatusCode.UNAVAILABLE),
)


def status_code_for(exc: EdgefleetError) -> grpc.StatusCode:
    for cls, code in _TABLE:
        if isinstance(exc, cls):
            return code
    return grpc.StatusCode.INTERNAL
