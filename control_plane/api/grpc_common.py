"""What both gRPC servicers share: the caller's identity from the TLS peer certificate, and
domain errors turned into status codes (``status.py``) at the edge of each call."""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
from cryptography import x509

from control_plane.api.status import status_code_for
from fleetcore import pki
from fleetcore.errors import AuthenticationError, EdgefleetError

__all__ = ["abort_with", "peer_identity", "rpc"]

log = logging.getLogger(__name__)

R = TypeVar("R")


def rpc(
    method: Callable[[Any, Any, grpc.aio.ServicerContext], Awaitable[R]],
) -> Callable[[Any, Any, grpc.aio.ServicerContext], Awaitable[R]]:
    """A unary method whose domain errors end the call with their status code."""

    @functools.wraps(method)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> R:
        try:
            return await method(self, request, context)
        except EdgefleetError as exc:
            await abort_with(context, exc, method.__name__)
            raise AssertionError("unreachable") from None  # abort() always raises

    return wrapper


async def abort_with(context: grpc.aio.ServicerContext, exc: EdgefleetError,
                     what: str = "") -> None:
    code = status_code_for(exc)
    if what:
        log.info("%s refused: %s (%s)", what, exc, code.name)
    await context.abort(code, str(exc))


@functools.lru_cache(maxsize=4096)
def _identity_from_pem(pem: bytes) -> pki.Identity:
    return pki.identity_from_certificate(x509.load_pem_x509_certificate(pem))


def peer_identity(context: grpc.aio.ServicerContext) -> pki.Identity:
    """The identity in the client certificate that TLS verified for this call."""
    auth = context.auth_context()
    pems = auth.get("x509_pem_cert") or []
    if not pems:
        raise AuthenticationError("this call needs a client certificate from the fleet CA")
    return _identity_from_pem(bytes(pems[0]))


def peer_address(peer: str) -> str:
    """The caller's address without its port ("ipv4:10.0.0.5:51234" -> "ipv4:10.0.0.5"): what
    per-caller limits count by, since every new connection has another port."""
    head, sep, port = peer.rpartition(":")
    return head if sep and port.isdigit() and ":" in head else peer
