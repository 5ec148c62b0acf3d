"""Serving errors, split by who is at fault (docs/design.md, "Engineering rules").

* ``BadRequestError`` (an ``InvalidInputError``): the caller sent something malformed: wrong
  shape, datatype or input name, bad JSON, a bad label. HTTP 400, gRPC INVALID_ARGUMENT.
* ``PayloadTooLargeError``: a request body over the limit. HTTP 413, gRPC INVALID_ARGUMENT.
* ``ModelNotFoundError`` (a ``NotFoundError``): no such model or version is being served.
  HTTP 404, gRPC NOT_FOUND.
* ``InferenceError``: the runtime failed on a well-formed request (our fault). HTTP 500, gRPC
  INTERNAL.

The HTTP and gRPC front ends map these to wire codes, each in one table.
"""

from __future__ import annotations

from fleetcore.errors import EdgefleetError, InvalidInputError, NotFoundError

__all__ = [
    "BadRequestError",
    "InferenceError",
    "ModelNotFoundError",
    "PayloadTooLargeError",
]


class BadRequestError(InvalidInputError):
    """A malformed inference or feedback request."""


class PayloadTooLargeError(BadRequestError):
    """A request body larger than the configured limit."""


class ModelNotFoundError(NotFoundError):
    """The named model, or the named version of it, is not being served."""


class InferenceError(EdgefleetError):
    """The runtime raised on a well-formed request."""
