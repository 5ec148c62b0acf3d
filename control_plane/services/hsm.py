"""Keys in a PKCS#11 token (``[pki.pkcs11]`` in config.toml; SoftHSM2 in the tests, any HSM
with a PKCS#11 library in production).

A ``TokenKey`` follows ``fleetcore.pki.SigningKey``: ``sign(data, ECDSA(SHA256))`` hashes on the
host and has the token sign the digest (CKM_ECDSA), whose raw r||s answer is returned as DER,
as cryptography's keys do; ``public_key()`` is read from the token's public key object. The
private keys are generated inside the token, sensitive and not extractable; they are found by
label (``edgefleet-ca``, ``edgefleet-release``, ``edgefleet-audit``).

One session per token per process, opened with the PIN from the environment variable that the
config names, and shared (calls into it are serialised).
"""

from __future__ import annotations

import hashlib
import os
import threading
from typing import Any

import pkcs11
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, utils
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
from pkcs11.util.ec import encode_ec_public_key, encode_named_curve_parameters

from control_plane.config import Pkcs11Settings
from fleetcore.errors import AlreadyExistsError, InvalidInputError, NotFoundError

__all__ = ["TokenKey", "generate_key", "label", "load_key"]

_lock = threading.RLock()
_libs: dict[str, Any] = {}
_sessions: dict[tuple[str, str], Any] = {}


def label(name: str) -> str:
    return f"edgefleet-{name}"


def _session(settings: Pkcs11Settings) -> Any:
    pin = os.environ.get(settings.pin_env, "")
    if not pin:
        raise InvalidInputError(f"the PKCS#11 token's PIN is not set: export {settings.pin_env}"
                                " (config pki.pkcs11.pin_env)")
    key = (str(settings.module), settings.token)
    with _lock:
        session = _sessions.get(key)
        if session is None:
            module = str(settings.module)
            if module not in _libs:
                if not settings.module.exists():
                    raise InvalidInputError(f"no PKCS#11 library at {module} (config "
                                            "pki.pkcs11.module)")
                _libs[module] = pkcs11.lib(module)
            try:
                token = _libs[module].get_token(token_label=settings.token)
                session = token.open(user_pin=pin, rw=True)
            except pkcs11.exceptions.NoSuchToken:
                raise NotFoundError(f"no PKCS#11 token labelled {settings.token!r} in "
                                    f"{module}") from None
            except pkcs11.exceptions.PinIncorrect:
                raise InvalidInputError(f"the PIN in ${settings.pin_env} is not the token's "
                                        "user PIN") from None
            _sessions[key] = session
        return session


class TokenKey:
    """An ECDSA P-256 key in the token, used like cryptography's private key for signing."""

    def __init__(self, settings: Pkcs11Settings, name: str) -> None:
        self.label = label(name)
        session = _session(settings)
        with _lock:
            try:
                self._private = session.get_key(object_class=ObjectClass.PRIVATE_KEY,
                                                key_type=KeyType.EC, label=self.label)
                public = session.get_key(object_class=ObjectClass.PUBLIC_KEY,
                                         key_type=KeyType.EC, label=self.label)
            except pkcs11.exceptions.NoSuchKey:
                raise NotFoundError(f"token {settings.token!r} holds no key {self.label!r}; "
                                    "control-plane init --pkcs11-... creates it") from None
            loaded = serialization.load_der_public_key(encode_ec_public_key(public))
        if not isinstance(loaded, ec.EllipticCurvePublicKey) or loaded.curve.name != "secp256r1":
            raise InvalidInputError(f"token key {self.label!r} is not ECDSA P-256")
        self._public = loaded

    def sign(self, data: bytes, signature_algorithm: ec.EllipticCurveSignatureAlgorithm,
             ) -> bytes:
        if not (isinstance(signature_algorithm, ec.ECDSA)
                and isinstance(signature_algorithm.algorithm, hashes.SHA256)):
            raise InvalidInputError("token keys sign with ECDSA over SHA-256 only")
        digest = hashlib.sha256(data).digest()
        with _lock:
            raw = self._private.sign(digest, mechanism=Mechanism.ECDSA)
        half = len(raw) // 2
        return utils.encode_dss_signature(int.from_bytes(raw[:half], "big"),
                                          int.from_bytes(raw[half:], "big"))

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._public

    def __repr__(self) -> str:
        return f"TokenKey({self.label})"


def load_key(settings: Pkcs11Settings, name: str) -> TokenKey:
    return TokenKey(settings, name)


def generate_key(settings: Pkcs11Settings, name: str) -> TokenKey:
    """Generate key ``name`` inside the token (not extractable); refuse to replace one."""
    session = _session(settings)
    with _lock:
        existing = list(session.get_objects({Attribute.LABEL: label(name)}))
        if existing:
            raise AlreadyExistsError(
                f"token {settings.token!r} already holds {label(name)!r}; use a fresh token "
                "(or delete that key with the token's tools)")
        params = session.create_domain_parameters(
            KeyType.EC, {Attribute.EC_PARAMS: encode_named_curve_parameters("secp256r1")},
            local=True)
        params.generate_keypair(
            store=True, label=label(name),
            public_template={Attribute.VERIFY: True},
            private_template={Attribute.SIGN: True, Attribute.SENSITIVE: True,
                              Attribute.EXTRACTABLE: False})
    return TokenKey(settings, name)
