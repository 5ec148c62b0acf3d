"""The control plane's signing material, loaded from its home."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from control_plane.config import ControlPlaneConfig
from control_plane.domain.records import CertificateRecord
from control_plane.storage.blobs import load_or_create_key
from fleetcore import pki
from fleetcore.errors import InvalidInputError

__all__ = ["Authority"]


@dataclass(frozen=True)
class Authority:
    ca_key: ec.EllipticCurvePrivateKey
    ca_cert: x509.Certificate
    ca_pem: bytes
    server_cert_pem: bytes
    server_key_pem: bytes
    release_public_pem: bytes
    publisher_public_pems: tuple[bytes, ...]
    release_key: ec.EllipticCurvePrivateKey
    blob_key: bytes

    @classmethod
    def load(cls, config: ControlPlaneConfig) -> Authority:
        lay = config.layout
        ca_pem = lay.ca_cert.read_bytes()
        server_cert_pem = lay.server_cert.read_bytes()
        server_key_pem = lay.server_key.read_bytes()
        release_key = pki.load_private_key(lay.release_key.read_bytes())
        release_public_pem = lay.release_pub.read_bytes()
        # Pairs must match: a rotation caught half-way (KeyWatch) is not loaded.
        if pki.load_certificate(server_cert_pem).public_key() != pki.load_private_key(
                server_key_pem).public_key():
            raise InvalidInputError(f"{lay.server_cert} is not the certificate of "
                                    f"{lay.server_key}")
        if pki.load_public_key(release_public_pem) != release_key.public_key():
            raise InvalidInputError(f"{lay.release_pub} is not the public half of "
                                    f"{lay.release_key}")
        return cls(
            ca_key=pki.load_private_key(lay.ca_key.read_bytes()),
            ca_cert=pki.load_certificate(ca_pem),
            ca_pem=ca_pem,
            server_cert_pem=server_cert_pem,
            server_key_pem=server_key_pem,
            release_public_pem=release_public_pem,
            publisher_public_pems=tuple(p.read_bytes() for p in config.publisher_keys),
            release_key=release_key,
            blob_key=load_or_create_key(lay.blob_key),
        )

    def issue_server(self, key: ec.EllipticCurvePrivateKey, names: list[str], now: float,
                     ttl: dt.timedelta) -> x509.Certificate:
        """A server certificate for ``names`` (DNS names or IPs) from the current CA."""
        return pki.issue_server_certificate(self.ca_key, self.ca_cert, key, names,
                                            dt.datetime.fromtimestamp(now, dt.UTC), ttl)

    def server_chain(self, cert: x509.Certificate) -> bytes:
        """What the server presents for ``cert``: the certificate (PEM)."""
        return pki.certificate_pem(cert)

    def issue(
        self,
        public_key: ec.EllipticCurvePublicKey,
        kind: pki.IdentityKind,
        name: str,
        now: float,
        ttl_seconds: int,
        role: pki.Role | None = None,
    ) -> tuple[bytes, CertificateRecord]:
        """Issue a client certificate; return its PEM and the record to store."""
        cert = pki.issue_client_certificate(
            self.ca_key,
            self.ca_cert,
            public_key,
            kind,
            name,
            dt.datetime.fromtimestamp(now, dt.UTC),
            dt.timedelta(seconds=ttl_seconds),
            role=role,
        )
        record = CertificateRecord(
            serial=pki.serial_hex(cert),
            kind=kind.value,
            subject=name,
            not_before=cert.not_valid_before_utc.timestamp(),
            not_after=cert.not_valid_after_utc.timestamp(),
            issued_at=now,
        )
        return pki.certificate_pem(cert), record
