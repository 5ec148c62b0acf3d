"""Fleet PKI: ECDSA P-256 keys, the fleet CA, server and client certificates, CSRs.

Identities live in URI subject-alternative names so that they survive any subject formatting:

* a device:   ``urn:edgefleet:device:<id>``
* an operator: ``urn:edgefleet:operator:<name>`` plus ``urn:edgefleet:role:<viewer|operator|admin>``

Every function takes the reference time (``now``) as an argument; nothing here reads the clock.
"""

from __future__ import annotations

import datetime as dt
import enum
import ipaddress
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fleetcore.errors import AuthenticationError, InvalidInputError
from fleetcore.names import NAME_RE as _NAME_RE
from fleetcore.names import validate_name
from fleetcore.signatures import MAX_CERT_BYTES, MAX_CSR_BYTES
from fleetcore.signing import SigningKey

__all__ = [
    "MAX_CSR_BYTES",
    "Identity",
    "IdentityKind",
    "Role",
    "SigningKey",
    "ca_certificate",
    "certificate_pem",
    "certificate_revocation_list",
    "create_ca",
    "generate_key",
    "identity_from_certificate",
    "issue_client_certificate",
    "issue_server_certificate",
    "issue_service_certificate",
    "key_id",
    "load_certificate",
    "load_private_key",
    "load_public_key",
    "make_csr",
    "parse_csr",
    "private_key_pem",
    "public_key_pem",
    "serial_hex",
    "sign_certificate",
    "validate_name",
]

_URN = "urn:edgefleet:"
# Backdate certificates a little so that a host whose clock runs slightly behind accepts them.
_CLOCK_SKEW = dt.timedelta(minutes=5)


class Role(enum.IntEnum):
    """Operator roles; a higher role may do everything a lower one may."""

    VIEWER = 1
    OPERATOR = 2
    ADMIN = 3

    @classmethod
    def parse(cls, text: str) -> Role:
        try:
            return cls[text.upper()]
        except KeyError:
            raise InvalidInputError(
                f"role must be one of viewer, operator, admin; got {text!r}"
            ) from None

    @property
    def label(self) -> str:
        return self.name.lower()


class IdentityKind(enum.Enum):
    DEVICE = "device"
    OPERATOR = "operator"


@dataclass(frozen=True)
class Identity:
    """Who a verified certificate says its holder is."""

    kind: IdentityKind
    name: str
    serial: str
    role: Role | None = None

    @property
    def actor(self) -> str:
        """How the audit log names this identity."""
        return f"{self.kind.value}:{self.name}"


def generate_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def private_key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def public_key_pem(key: ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey) -> bytes:
    pub = key.public_key() if isinstance(key, ec.EllipticCurvePrivateKey) else key
    return pub.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def certificate_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def serial_hex(cert: x509.Certificate) -> str:
    return format(cert.serial_number, "x")


def load_private_key(pem: bytes) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(pem, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
        raise InvalidInputError("expected an ECDSA P-256 private key")
    return key


def load_public_key(pem: bytes) -> ec.EllipticCurvePublicKey:
    key = serialization.load_pem_public_key(pem)
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
        raise InvalidInputError("expected an ECDSA P-256 public key")
    return key


def load_certificate(pem: bytes) -> x509.Certificate:
    if len(pem) > MAX_CERT_BYTES:
        raise InvalidInputError(
            f"certificate is {len(pem)} bytes; the limit is {MAX_CERT_BYTES}"
        )
    try:
        return x509.load_pem_x509_certificate(pem)
    except ValueError as exc:
        raise InvalidInputError(f"not a PEM X.509 certificate: {exc}") from None


def _name(common_name: str, unit: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Edgefleet"),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, unit),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _builder(
    subject: x509.Name,
    issuer: x509.Name,
    public_key: ec.EllipticCurvePublicKey,
    now: dt.datetime,
    ttl: dt.timedelta,
) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(now + ttl)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )


def create_ca(
    common_name: str, now: dt.datetime, ttl: dt.timedelta
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = generate_key()
    return key, ca_certificate(key, common_name, now, ttl)


def ca_certificate(key: SigningKey, common_name: str, now: dt.datetime,
                   ttl: dt.timedelta) -> x509.Certificate:
    """The self-signed certificate of a fleet CA whose key is ``key`` (in a file or a token)."""
    name = _name(common_name, "ca")
    return sign_certificate(
        _builder(name, name, key.public_key(), now, ttl)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        ), key)


def key_id(cert: x509.Certificate) -> str:
    """A CA certificate's subject key identifier (hex): names the CA that issued a record."""
    return cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest.hex()


def sign_certificate(builder: x509.CertificateBuilder, key: SigningKey) -> x509.Certificate:
    """``builder`` signed (ECDSA with SHA-256) by ``key``. cryptography's builders sign only
    with its own key objects: for any other key the certificate is built with a throwaway
    key, then its to-be-signed bytes are signed by ``key`` and the DER is put back together."""
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return builder.sign(key, hashes.SHA256())
    throwaway = builder.sign(generate_key(), hashes.SHA256())
    return x509.load_der_x509_certificate(_resigned(
        throwaway.public_bytes(serialization.Encoding.DER), throwaway.tbs_certificate_bytes,
        key))


def _der_length(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(raw)]) + raw


def _resigned(der: bytes, tbs: bytes, key: SigningKey) -> bytes:
    """A certificate or CRL (SEQUENCE { tbs, AlgorithmIdentifier, BIT STRING signature })
    with ``tbs`` signed again by ``key``: the same algorithm (ecdsa-with-SHA256), a new
    signature value."""
    start = der.index(tbs)
    alg_at = start + len(tbs)
    if der[alg_at] != 0x30 or der[alg_at + 1] >= 0x80:
        raise InvalidInputError("unexpected signature algorithm encoding")
    algorithm = der[alg_at:alg_at + 2 + der[alg_at + 1]]
    signature = key.sign(tbs, ec.ECDSA(hashes.SHA256()))
    bits = b"\x00" + signature  # no unused bits
    body = tbs + algorithm + b"\x03" + _der_length(len(bits)) + bits
    return b"\x30" + _der_length(len(body)) + body


def _leaf(
    builder: x509.CertificateBuilder,
    ca_key: SigningKey,
    ca_cert: x509.Certificate,
    usage: x509.ObjectIdentifier,
    sans: list[x509.GeneralName],
) -> x509.Certificate:
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return sign_certificate(
        builder.add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
            critical=False,
        ), ca_key)


def issue_server_certificate(
    ca_key: SigningKey,
    ca_cert: x509.Certificate,
    key: ec.EllipticCurvePrivateKey,
    hostnames: list[str],
    now: dt.datetime,
    ttl: dt.timedelta,
) -> x509.Certificate:
    sans: list[x509.GeneralName] = []
    for host in dict.fromkeys(hostnames):
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    builder = _builder(
        _name("edgefleet-control-plane", "server"), ca_cert.subject, key.public_key(), now, ttl
    )
    return _leaf(builder, ca_key, ca_cert, ExtendedKeyUsageOID.SERVER_AUTH, sans)


def issue_client_certificate(
    ca_key: SigningKey,
    ca_cert: x509.Certificate,
    public_key: ec.EllipticCurvePublicKey,
    kind: IdentityKind,
    name: str,
    now: dt.datetime,
    ttl: dt.timedelta,
    role: Role | None = None,
) -> x509.Certificate:
    """Issue a client certificate that names a device or an operator (with its role)."""
    validate_name(name, f"{kind.value} name")
    sans: list[x509.GeneralName] = [
        x509.UniformResourceIdentifier(f"{_URN}{kind.value}:{name}")
    ]
    if kind is IdentityKind.OPERATOR:
        if role is None:
            raise InvalidInputError("an operator certificate needs a role")
        sans.append(x509.UniformResourceIdentifier(f"{_URN}role:{role.label}"))
    # An MQTT broker that takes the subject CN as the username (use_identity_as_username) must
    # see a device's id and nothing that could be mistaken for one: operators get a prefix that
    # no device id can have.
    common_name = name if kind is IdentityKind.DEVICE else f"{kind.value}:{name}"
    builder = _builder(_name(common_name, kind.value), ca_cert.subject, public_key, now, ttl)
    return _leaf(builder, ca_key, ca_cert, ExtendedKeyUsageOID.CLIENT_AUTH, sans)


def issue_service_certificate(
    ca_key: SigningKey,
    ca_cert: x509.Certificate,
    public_key: ec.EllipticCurvePublicKey,
    common_name: str,
    now: dt.datetime,
    ttl: dt.timedelta,
) -> x509.Certificate:
    """A client certificate for one of the fleet's own services (the MQTT bridge).

    It names no Edgefleet identity (no URI SAN), so the gRPC APIs refuse it; its CN is meant
    for a broker's ACL, and must not be a valid device or operator name.
    """
    if _NAME_RE.match(common_name):
        raise InvalidInputError(f"service name {common_name!r} could be taken for a device id")
    builder = _builder(_name(common_name, "service"), ca_cert.subject, public_key, now, ttl)
    return _leaf(builder, ca_key, ca_cert, ExtendedKeyUsageOID.CLIENT_AUTH, [])


def certificate_revocation_list(
    ca_key: SigningKey,
    ca_cert: x509.Certificate,
    revoked: list[tuple[str, dt.datetime]],
    now: dt.datetime,
    ttl: dt.timedelta,
) -> bytes:
    """A PEM CRL of the CA listing ``revoked`` (hex serial, revocation time)."""
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(now - _CLOCK_SKEW)
        .next_update(now + ttl)
    )
    for serial, when in revoked:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(int(serial, 16))
            .revocation_date(when).build()
        )
    if isinstance(ca_key, ec.EllipticCurvePrivateKey):
        crl = builder.sign(ca_key, hashes.SHA256())
    else:  # a key in a token: cryptography signs only with its own keys (sign_certificate)
        throwaway = builder.sign(generate_key(), hashes.SHA256())
        crl = x509.load_der_x509_crl(_resigned(
            throwaway.public_bytes(serialization.Encoding.DER), throwaway.tbs_certlist_bytes,
            ca_key))
    return crl.public_bytes(serialization.Encoding.PEM)


def make_csr(key: ec.EllipticCurvePrivateKey, common_name: str = "edgefleet-agent") -> bytes:
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM)


def parse_csr(pem: bytes) -> ec.EllipticCurvePublicKey:
    """Check a CSR from outside and return its public key (the subject is ignored)."""
    if len(pem) > MAX_CSR_BYTES:
        raise InvalidInputError(f"CSR is {len(pem)} bytes; the limit is {MAX_CSR_BYTES}")
    try:
        csr = x509.load_pem_x509_csr(pem)
    except ValueError as exc:
        raise InvalidInputError(f"not a PEM PKCS#10 CSR: {exc}") from None
    if not csr.is_signature_valid:
        raise InvalidInputError("CSR signature does not verify with its own key")
    key = csr.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
        raise InvalidInputError(
            f"CSR key must be ECDSA P-256; got {type(key).__name__}"
        )
    return key


def identity_from_certificate(cert: x509.Certificate) -> Identity:
    """Read the identity out of a certificate that TLS has already verified against our CA."""
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise AuthenticationError("client certificate names no Edgefleet identity") from None
    uris = [
        u for u in sans.get_values_for_type(x509.UniformResourceIdentifier) if u.startswith(_URN)
    ]
    kind: IdentityKind | None = None
    name = ""
    role: Role | None = None
    for uri in uris:
        field, _, value = uri[len(_URN):].partition(":")
        if field in (IdentityKind.DEVICE.value, IdentityKind.OPERATOR.value):
            if kind is not None:
                raise AuthenticationError("client certificate names more than one identity")
            kind, name = IdentityKind(field), value
        elif field == "role":
            role = Role.parse(value)
    if kind is None or not _NAME_RE.match(name):
        raise AuthenticationError("client certificate names no Edgefleet identity")
    if kind is IdentityKind.OPERATOR and role is None:
        raise AuthenticationError("operator certificate carries no role")
    if kind is IdentityKind.DEVICE:
        role = None
    return Identity(kind=kind, name=name, serial=serial_hex(cert), role=role)
