"""The control plane's signing material, loaded from its home.

During a CA rotation (``control_plane/ops/rotate_ca.py``) the home also holds the previous CA
(``pki/ca-old.{pem,key}``): then ``ca_pem`` is the bundle of both (trusted for client
certificates, handed to agents), client certificates come from the current CA, the server
certificate from the old one (which every agent trusts), and the CRLs of both are published.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from control_plane.config import ControlPlaneConfig
from control_plane.domain.records import CertificateRecord
from control_plane.storage.blobs import load_or_create_key
from fleetcore import pki
from fleetcore.errors import InvalidInputError

__all__ = ["Authority", "load_signing_key"]


def load_signing_key(config: ControlPlaneConfig, name: str, path: Path) -> pki.SigningKey:
    """Key ``name`` ("ca", "release", "audit"): from the PKCS#11 token when [pki.pkcs11] puts
    it there (control_plane/services/hsm.py), else from its file ``path``."""
    if config.pkcs11 is not None and config.pkcs11.holds(name):
        from control_plane.services.hsm import load_key  # noqa: PLC0415  (homes with a token)

        return load_key(config.pkcs11, name)
    return pki.load_private_key(path.read_bytes())


@dataclass(frozen=True)
class Authority:
    ca_key: pki.SigningKey
    ca_cert: x509.Certificate
    ca_pem: bytes
    server_cert_pem: bytes
    server_key_pem: bytes
    release_public_pem: bytes
    publisher_public_pems: tuple[bytes, ...]
    release_key: pki.SigningKey
    blob_key: bytes
    # Signs audit checkpoints (purpose "audit-checkpoint"); a home made before the audit key
    # existed uses its release key (the signature's purpose still tells them apart).
    audit_key: pki.SigningKey | None = None
    # The previous CA and its key while a rotation is in transition; its CRL is still needed.
    old_ca: tuple[x509.Certificate, pki.SigningKey] | None = None

    @property
    def ca_id(self) -> str:
        """The current (issuing) CA's key id: recorded with each certificate it issues."""
        return pki.key_id(self.ca_cert)

    @property
    def crl_signers(self) -> list[tuple[pki.SigningKey, x509.Certificate]]:
        """Each CA still trusted, with its key: each publishes a CRL."""
        signers = [(self.ca_key, self.ca_cert)]
        if self.old_ca is not None:
            signers.append((self.old_ca[1], self.old_ca[0]))
        return signers

    @classmethod
    def load(cls, config: ControlPlaneConfig) -> Authority:
        lay = config.layout
        ca_pem = lay.ca_cert.read_bytes()
        ca_cert = pki.load_certificate(ca_pem)
        ca_key = load_signing_key(config, "ca", lay.ca_key)
        if ca_cert.public_key() != ca_key.public_key():
            raise InvalidInputError(f"{lay.ca_cert} is not the certificate of {lay.ca_key}")
        old_ca = None
        if lay.old_ca_cert.exists():  # a CA rotation in transition
            old_pem = lay.old_ca_cert.read_bytes()
            old_cert = pki.load_certificate(old_pem)
            old_key = pki.load_private_key(lay.old_ca_key.read_bytes())
            if old_cert.public_key() != old_key.public_key():
                raise InvalidInputError(f"{lay.old_ca_cert} is not the certificate of "
                                        f"{lay.old_ca_key}")
            if old_cert.fingerprint(hashes.SHA256()) != ca_cert.fingerprint(hashes.SHA256()):
                old_ca = (old_cert, old_key)
                ca_pem = ca_pem + old_pem
        server_cert_pem = lay.server_cert.read_bytes()
        server_key_pem = lay.server_key.read_bytes()
        release_key = load_signing_key(config, "release", lay.release_key)
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
            ca_key=ca_key,
            ca_cert=ca_cert,
            ca_pem=ca_pem,
            server_cert_pem=server_cert_pem,
            server_key_pem=server_key_pem,
            release_public_pem=release_public_pem,
            publisher_public_pems=tuple(p.read_bytes() for p in config.publisher_keys),
            release_key=release_key,
            blob_key=load_or_create_key(lay.blob_key),
            audit_key=(load_signing_key(config, "audit", lay.audit_key)
                       if lay.audit_key.exists() or (config.pkcs11 is not None
                                                     and config.pkcs11.holds("audit"))
                       else None),
            old_ca=old_ca,
        )

    def issue_server(self, key: ec.EllipticCurvePrivateKey, names: list[str], now: float,
                     ttl: dt.timedelta) -> x509.Certificate:
        """A server certificate for ``names`` (DNS names or IPs) from the CA that every agent
        trusts: during a CA rotation the old one (agents that have not renewed trust only it;
        a cross-certified chain does not verify under its ``pathlen:0``), else the current."""
        ca_cert, ca_key = self.old_ca or (self.ca_cert, self.ca_key)
        return pki.issue_server_certificate(ca_key, ca_cert, key, names,
                                            dt.datetime.fromtimestamp(now, dt.UTC), ttl)

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
            issuer=self.ca_id,
        )
        return pki.certificate_pem(cert), record
