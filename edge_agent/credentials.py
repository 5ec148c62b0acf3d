"""The device's credentials as the agent's serving process holds them: PEM bytes and the
certificate's facts (serial, validity), without ``cryptography``.

The facts come from the trust child (``install/trust_keeper.py``), which parses and checks the
certificate; the transports only hand the PEM bytes to gRPC or ``ssl``.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Credentials", "renewal_due"]


@dataclass(frozen=True)
class Credentials:
    key_pem: bytes
    cert_pem: bytes
    ca_pem: bytes
    serial: str  # the certificate's serial number, hex
    not_before: float  # unix seconds
    not_after: float  # unix seconds


def renewal_due(creds: Credentials, now: float, fraction: float) -> bool:
    """Renew once ``fraction`` of the certificate's lifetime has passed."""
    return now >= creds.not_before + fraction * (creds.not_after - creds.not_before)
