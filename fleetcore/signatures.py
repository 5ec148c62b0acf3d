"""Signatures as data, and the limits of what arrives from the wire: no cryptography.

``fleetcore.signing`` verifies and makes signatures and re-exports ``KeySignature``; the
agent's transports and its release parsing use this module so that its serving process does
not load ``cryptography`` (docs/serving.md, "Agent footprint").
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["MAX_CERT_BYTES", "MAX_CSR_BYTES", "MAX_ROOT_ENVELOPE_BYTES", "MAX_SIGNATURE_BYTES",
           "KeySignature"]

MAX_SIGNATURE_BYTES = 512
MAX_CSR_BYTES = 8 * 1024
MAX_CERT_BYTES = 16 * 1024
MAX_ROOT_ENVELOPE_BYTES = 64 * 1024


@dataclass(frozen=True)
class KeySignature:
    """One signature and the id of the key that made it ("" when unknown: legacy)."""

    keyid: str
    sig: bytes
