"""The device's key and certificate on disk, and their crash-safe replacement on renewal.

Renewal writes ``device.key.next``, the CA bundle's ``.next`` when the control plane sent one
(a CA rotation moves the agent to a new fleet CA this way), and ``device.pem.next`` last (each
fsynced), then renames the key, the CA bundle and then the certificate into place: the
certificate's ``.next`` is the commit point. ``recover`` finishes or discards an interrupted
renewal at start-up, so a crash at any point leaves a key, certificate and CA bundle that
belong together.

It needs ``cryptography``: the agent's serving process never imports it; the trust child
(``install/trust_child.py``) and the ``edge-agent`` commands that run once do.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature

from edge_agent.credentials import Credentials
from edge_agent.state import StateDir
from fleetcore import pki
from fleetcore.files import atomic_write

log = logging.getLogger(__name__)

__all__ = ["check_ca_bundle", "install_renewed", "load_credentials", "recover"]


def _next(path: Path) -> Path:
    return path.with_name(path.name + ".next")


def recover(state: StateDir) -> None:
    key_next, ca_next, cert_next = _next(state.key), _next(state.ca), _next(state.cert)
    if cert_next.exists():
        for done, final in ((key_next, state.key), (ca_next, state.ca)):
            if done.exists():
                os.replace(done, final)
        os.replace(cert_next, state.cert)
    else:
        # An interrupted renewal's leftovers are ignored without the certificate; removing
        # them is tidiness, not safety, so a read-only state directory does not stop a start.
        for p in (key_next, ca_next):
            try:
                p.unlink()
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.warning("cannot remove %s (%s); it is ignored", p, exc.strerror)


def check_ca_bundle(ca_pem: bytes, cert: x509.Certificate) -> None:
    """A CA bundle from a renewal: CA certificates only, one of which issued ``cert``."""
    try:
        cas = x509.load_pem_x509_certificates(ca_pem)
    except ValueError as exc:
        raise ValueError(f"CA bundle is not PEM certificates: {exc}") from None
    for ca in cas:
        try:
            constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints).value
        except x509.ExtensionNotFound:
            constraints = None
        if constraints is None or not constraints.ca:
            raise ValueError("CA bundle holds a certificate that is not a CA")
    for ca in cas:
        try:
            cert.verify_directly_issued_by(ca)
        except (ValueError, TypeError, InvalidSignature):
            continue
        return
    raise ValueError("renewed certificate was not issued by a CA of the bundle sent with it")


def load_credentials(state: StateDir) -> Credentials:
    """Finish or discard an interrupted renewal, then read the credentials and the
    certificate's facts."""
    recover(state)
    cert_pem = state.cert.read_bytes()
    cert = pki.load_certificate(cert_pem)
    return Credentials(state.key.read_bytes(), cert_pem, state.ca.read_bytes(),
                       pki.serial_hex(cert), cert.not_valid_before_utc.timestamp(),
                       cert.not_valid_after_utc.timestamp())


def install_renewed(
    state: StateDir, key_pem: bytes, cert_pem: bytes, device_id: str, now: float,
    *, ca_pem: bytes = b"",
) -> None:
    """Check the renewed certificate against our new key and identity (and the CA bundle sent
    with it, if any), then swap them in."""
    cert = pki.load_certificate(cert_pem)
    key = pki.load_private_key(key_pem)
    identity = pki.identity_from_certificate(cert)
    if identity.kind is not pki.IdentityKind.DEVICE or identity.name != device_id:
        raise ValueError(f"renewed certificate names {identity.actor}, not device:{device_id}")
    if cert.public_key() != key.public_key():
        raise ValueError("renewed certificate is not for the key we generated")
    if cert.not_valid_after_utc.timestamp() <= now:
        raise ValueError("renewed certificate has already expired")
    if ca_pem:
        check_ca_bundle(ca_pem, cert)
    key_next, ca_next, cert_next = _next(state.key), _next(state.ca), _next(state.cert)
    try:
        atomic_write(key_next, key_pem, mode=0o600)
        if ca_pem:
            atomic_write(ca_next, ca_pem)
        atomic_write(cert_next, cert_pem)
    except BaseException:
        for p in (key_next, ca_next, cert_next):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        raise
    recover(state)
