"""PKI helpers, control-plane init, and the small parsers with limits."""

from __future__ import annotations

import datetime as dt
import os
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from control_plane.config import ControlPlaneConfig
from control_plane.ops.home import init_home
from fleetcore import pki, tomlfile
from fleetcore.errors import AlreadyExistsError, AuthenticationError, InvalidInputError
from fleetcore.labels import parse_label_args

NOW = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


def test_init_creates_the_home(tmp_path: Path) -> None:
    home = tmp_path / "home"
    cfg = init_home(home, sans=["cp.example.com", "10.0.0.7"], now=NOW)
    ca = pki.load_certificate((home / "pki/ca.pem").read_bytes())
    server = pki.load_certificate((home / "pki/server.pem").read_bytes())
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(sans.get_values_for_type(x509.DNSName)) == {"localhost", "cp.example.com"}
    assert {str(ip) for ip in sans.get_values_for_type(x509.IPAddress)} == {
        "127.0.0.1", "10.0.0.7",
    }
    server.verify_directly_issued_by(ca)
    for name in ("pki/ca.key", "pki/server.key", "keys/release.key", "publisher/publisher.key",
                 "operators/admin/operator.key"):
        key = pki.load_private_key((home / name).read_bytes())  # ECDSA P-256
        assert key.curve.name == "secp256r1"
        assert stat.S_IMODE(os.stat(home / name).st_mode) == 0o600
    admin = pki.load_certificate((home / "operators/admin/operator.pem").read_bytes())
    identity = pki.identity_from_certificate(admin)
    assert (identity.kind, identity.name, identity.role) == (
        pki.IdentityKind.OPERATOR, "admin", pki.Role.ADMIN,
    )
    fleet = tomlfile.load(home / "operators/admin/fleet.toml")
    assert fleet == {"api": "127.0.0.1:7443", "cert": "operator.pem", "key": "operator.key",
                     "ca": "ca.pem"}
    assert (home / "edgefleet.db").exists()
    loaded = ControlPlaneConfig.load(home)
    assert loaded.publisher_keys == [home / "publisher/publisher.pub"]
    assert loaded.device_cert_ttl_seconds == cfg.device_cert_ttl_seconds == 7 * 86400


def test_init_refuses_to_overwrite_without_force(tmp_path: Path) -> None:
    home = tmp_path / "home"
    init_home(home, now=NOW)
    ca_before = (home / "pki/ca.key").read_bytes()
    with pytest.raises(AlreadyExistsError, match="--force"):
        init_home(home, now=NOW)
    assert (home / "pki/ca.key").read_bytes() == ca_before
    init_home(home, now=NOW, force=True)
    assert (home / "pki/ca.key").read_bytes() != ca_before


def test_csr_with_an_rsa_key_is_refused() -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")]))
        .sign(key, hashes.SHA256())
    )
    with pytest.raises(InvalidInputError, match="P-256"):
        pki.parse_csr(csr.public_bytes(serialization.Encoding.PEM))


def test_certificate_without_identity_is_refused() -> None:
    ca_key, ca = pki.create_ca("ca", NOW, dt.timedelta(days=1))
    server = pki.issue_server_certificate(ca_key, ca, pki.generate_key(), ["localhost"], NOW,
                                          dt.timedelta(days=1))
    with pytest.raises(AuthenticationError):
        pki.identity_from_certificate(server)


@pytest.mark.parametrize(
    "name", ["", "Admin", "../etc", "a" * 64, "-lead", "spa ce"],
    ids=["empty", "upper", "traversal", "too-long", "leading-dash", "space"],
)
def test_bad_identity_names_are_refused(name: str) -> None:
    ca_key, ca = pki.create_ca("ca", NOW, dt.timedelta(days=1))
    with pytest.raises(InvalidInputError):
        pki.issue_client_certificate(ca_key, ca, pki.generate_key().public_key(),
                                     pki.IdentityKind.DEVICE, name, NOW, dt.timedelta(days=1))


@pytest.mark.parametrize(
    "items", [["novalue"], ["=x"], ["k=v w"], [f"k{i}=v" for i in range(33)], ["k=" + "v" * 64]],
    ids=["no-equals", "empty-key", "space-in-value", "too-many", "long-value"],
)
def test_bad_labels_are_refused(items: list[str]) -> None:
    with pytest.raises(InvalidInputError):
        parse_label_args(items)


def test_toml_round_trip_and_limits(tmp_path: Path) -> None:
    doc = {"top": "v", "t": {"s": 'quote " and \\ back', "n": 3, "f": 0.5, "b": True,
                             "l": ["a", "b"], "weird key": "x"}}
    tomlfile.write(tmp_path / "a.toml", doc)
    assert tomlfile.load(tmp_path / "a.toml") == doc
    (tmp_path / "bad.toml").write_text("this is = = not toml")
    with pytest.raises(InvalidInputError, match="not valid TOML"):
        tomlfile.load(tmp_path / "bad.toml")
    (tmp_path / "big.toml").write_bytes(b"#" * (tomlfile.MAX_TOML_BYTES + 1))
    with pytest.raises(InvalidInputError, match="limit"):
        tomlfile.load(tmp_path / "big.toml")


def test_config_rejects_bad_values(tmp_path: Path) -> None:
    home = tmp_path / "home"
    init_home(home, now=NOW)
    text = (home / "config.toml").read_text()
    (home / "config.toml").write_text(text.replace("device_cert_ttl_seconds = 604800",
                                                   "device_cert_ttl_seconds = -1"))
    with pytest.raises(InvalidInputError, match="device_cert_ttl_seconds"):
        ControlPlaneConfig.load(home)
