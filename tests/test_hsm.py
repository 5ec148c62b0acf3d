"""Keys in a PKCS#11 token (SoftHSM2): the CA signs certificates and CRLs and the release key
signs releases inside the token; a real agent enrolls and verifies them; no private key file
for those keys is ever written."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from pkcs11 import Attribute

from control_plane.cli import main as cp_main
from control_plane.config import ControlPlaneConfig, Pkcs11Settings
from control_plane.services import hsm
from control_plane.services.authority import Authority
from control_plane.services.broker import write_crl
from edge_agent.state import StateDir
from fleetcore import pki
from fleetcore.errors import InvalidInputError
from tests.support import LoopThread, assign_digits_v1, start_agent, start_control_plane

SOFTHSM = Path("/usr/lib/softhsm/libsofthsm2.so")
PIN_ENV = "EDGEFLEET_TEST_PKCS11_PIN"
TOKENS = ("serve", "cli")

pytestmark = pytest.mark.skipif(
    not SOFTHSM.exists(),
    reason="SoftHSM2 is not installed (Debian package softhsm2: /usr/lib/softhsm/libsofthsm2.so)")


@pytest.fixture(scope="module")
def softhsm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A SoftHSM2 configuration with its own token directory, and the module's tokens (made
    before the library is loaded: it is loaded once per process)."""
    root = tmp_path_factory.mktemp("softhsm")
    (root / "tokens").mkdir()
    conf = root / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {root / 'tokens'}\nobjectstore.backend = file\n"
                    "log.level = ERROR\n")
    saved = {k: os.environ.get(k) for k in ("SOFTHSM2_CONF", PIN_ENV)}
    os.environ["SOFTHSM2_CONF"] = str(conf)
    os.environ[PIN_ENV] = "4321"
    for label in TOKENS:
        subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", label,
                        "--pin", "4321", "--so-pin", "8765"], check=True, capture_output=True)
    yield conf
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _settings(token: str) -> Pkcs11Settings:
    return Pkcs11Settings(module=SOFTHSM, token=token, pin_env=PIN_ENV)


def test_a_token_ca_and_release_key_enroll_a_real_agent_that_verifies_their_signatures(
    softhsm: Path, tmp_path: Path, loop: LoopThread, trained_bundle: Path
) -> None:
    cp = start_control_plane(tmp_path / "cp", loop, pkcs11=_settings("serve"))
    try:
        lay = cp.cp.config.layout
        assert not lay.ca_key.exists() and not lay.release_key.exists()
        authority = cp.cp.authority
        assert isinstance(authority.ca_key, hsm.TokenKey)
        assert isinstance(authority.release_key, hsm.TokenKey)
        for key in (authority.ca_key, authority.release_key):
            assert key._private[Attribute.EXTRACTABLE] is False
            assert key._private[Attribute.SENSITIVE] is True

        cp.enroll_agent(tmp_path / "a")
        state = StateDir(tmp_path / "a")
        cert = pki.load_certificate(state.cert.read_bytes())
        ca = pki.load_certificate(state.ca.read_bytes())
        cert.verify_directly_issued_by(ca)  # signed inside the token
        assert ca.public_key() == authority.ca_key.public_key()
        assert pki.load_public_key(state.release_pub.read_bytes()) == \
            authority.release_key.public_key()
        agent = start_agent(state.root, loop)
        try:
            agent.wait_for("heartbeat")  # over mTLS with the token-issued certificate
            assign_digits_v1(cp, trained_bundle, tmp_path)
            agent.wait_for("release")  # a release document signed by the token, verified
        finally:
            agent.stop()

        crl_path = tmp_path / "crl.pem"
        write_crl(authority, cp.cp.store, crl_path, dt.datetime.now(dt.UTC).timestamp())
        crl = x509.load_pem_x509_crl(crl_path.read_bytes())
        assert crl.is_signature_valid(authority.ca_key.public_key())
    finally:
        cp.stop()


def test_control_plane_init_with_a_token_writes_no_key_file_and_needs_the_pin(
    softhsm: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    home = tmp_path / "cp"
    assert cp_main(["init", "--home", str(home), "--pkcs11-module", str(SOFTHSM),
                    "--pkcs11-token", "cli", "--pkcs11-pin-env", PIN_ENV]) == 0
    cfg = ControlPlaneConfig.load(home)
    assert cfg.pkcs11 == _settings("cli")
    assert "4321" not in cfg.layout.config.read_text()  # the PIN is never in the file
    assert not cfg.layout.ca_key.exists() and not cfg.layout.release_key.exists()
    # The token CA issues a rotated server certificate.
    assert cp_main(["rotate", "server-cert", "--home", str(home)]) == 0
    server = pki.load_certificate(cfg.layout.server_cert.read_bytes())
    server.verify_directly_issued_by(Authority.load(cfg).ca_cert)
    # A second init into the same token refuses to replace its keys.
    capsys.readouterr()
    assert cp_main(["init", "--home", str(tmp_path / "again"), "--pkcs11-module",
                    str(SOFTHSM), "--pkcs11-token", "cli", "--pkcs11-pin-env", PIN_ENV]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "edgefleet-ca" in err[0], err


def test_a_token_key_is_refused_without_its_pin(
    softhsm: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(PIN_ENV)
    settings = Pkcs11Settings(module=SOFTHSM, token="not-opened-yet", pin_env=PIN_ENV)
    with pytest.raises(InvalidInputError, match=PIN_ENV):
        hsm.load_key(settings, "ca")


def test_a_config_that_writes_the_pin_itself_is_refused() -> None:
    with pytest.raises(InvalidInputError, match="never write the PIN"):
        Pkcs11Settings.parse({"module": str(SOFTHSM), "token": "t", "pin_env": PIN_ENV,
                              "pin": "1234"})
    with pytest.raises(InvalidInputError, match="keys must list"):
        Pkcs11Settings.parse({"module": str(SOFTHSM), "token": "t", "pin_env": PIN_ENV,
                              "keys": ["ca", "bundle"]})
