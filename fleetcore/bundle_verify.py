"""Verify an unpacked model bundle against the trusted publisher keys (docs/design.md §3-§4).

Rules, checked in this order; the first failure raises and the bundle is never modified:

1. Layout: regular files and directories only (walked with ``os.lstat``, no link followed);
   ``manifest.json``, ``model.onnx`` and ``model.sig`` must be present.
2. Signatures: ``model.sig`` and any co-signatures ``model.sig.2`` .. ``model.sig.8``
   (``fleetcore.bundle.signature_names``; ``trainer cosign`` adds one) are OpenSSF
   model-signing signatures (Sigstore bundle, DSSE envelope over an in-toto statement) that the
   ``model_signing`` library verifies with the trusted publisher keys. Each signature counts
   for the one trusted key that verifies it, and each distinct key (its id: the SHA-256 of its
   SubjectPublicKeyInfo, ``fleetcore.signing.keyid``) counts once, however many signatures it
   made or however many times it is listed (TUF's rule); at least ``threshold`` distinct keys
   must verify (``BadSignatureError`` otherwise; a signature by an unknown key is ignored).
   The files on disk, less the signature files, must be exactly the files each counted
   statement lists: the library on its own skips git files (``.git/``, ``.gitignore``, ...)
   and whatever the signer chose to ignore, and an unsigned file must not ride along into an
   install.
3. Manifest: ``fleetcore.bundle.parse_manifest``; when it has a ``files`` table
   (``{name: {"sha256": hex, "size": bytes}}``), each listed file must exist with that size and
   SHA-256 digest. When the verified statement hashed with SHA-256, its digests are the files'
   digests (the library hashed the files on disk to check them), so the table is compared with
   them instead of hashing every file a second time (`make bench`: verification of a 64 MiB
   bundle against `openssl dgst -sha256`).

The library reads the signature from a private copy of ``model.sig``, the same bytes that the
file list is taken from, so what was verified is what is compared.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import importlib
import logging
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fleetcore import strict_json
from fleetcore.archive import list_regular_files
from fleetcore.bundle import (
    MANIFEST,
    MAX_MANIFEST_BYTES,
    MODEL_ONNX,
    SIGNATURE,
    parse_manifest,
    signature_names,
)
from fleetcore.errors import BadSignatureError, InvalidInputError
from fleetcore.signing import keyid

__all__ = ["MAX_SIGNATURE_BYTES", "VerifiedBundleDir", "publisher_keyid", "verify_bundle_dir",
           "verify_bundle_signers"]

logger = logging.getLogger(__name__)

# A statement lists one digest per file (~150 bytes each); real signatures are a few KiB.
MAX_SIGNATURE_BYTES = 1024 * 1024

_REQUIRED_FILES = (MANIFEST, MODEL_ONNX, SIGNATURE)
_CHUNK_BYTES = 1 << 20
_MAX_REASON_CHARS = 160
_HashType = Literal["sha256", "blake2", "blake3"]
_HASH_TYPES: dict[str, _HashType] = {"sha256": "sha256", "blake2": "blake2", "blake3": "blake3"}


@dataclass(frozen=True)
class _Statement:
    """What a signature claims (trusted only once the library has verified it)."""

    hash_type: _HashType
    names: frozenset[str]
    sha256: dict[str, str]  # name -> hex digest, when the statement hashed with SHA-256


@dataclass(frozen=True)
class VerifiedBundleDir:
    """A bundle that verified: its manifest and the ids of the trusted keys that signed it."""

    manifest: dict[str, Any] = field(hash=False)
    keyids: tuple[str, ...]


def verify_bundle_dir(bundle: Path, publisher_keys: Sequence[bytes],
                      threshold: int = 1) -> dict[str, Any]:
    """Check ``bundle`` against the trusted publisher keys (PEM); return its parsed manifest.

    Raises ``InvalidInputError`` for a bad layout or manifest and ``BadSignatureError`` when
    fewer than ``threshold`` distinct ``publisher_keys`` verify its signatures.
    """
    return verify_bundle_signers(bundle, publisher_keys, threshold).manifest


def verify_bundle_signers(bundle: Path, publisher_keys: Sequence[bytes],
                          threshold: int = 1) -> VerifiedBundleDir:
    """``verify_bundle_dir`` that also says which trusted keys (ids) signed the bundle."""
    bundle = Path(bundle)
    if threshold < 1:
        raise InvalidInputError(f"publisher threshold must be >= 1; got {threshold}")
    files = set(list_regular_files(bundle))
    missing = [name for name in _REQUIRED_FILES if name not in files]
    if missing:
        raise InvalidInputError(f"bundle {bundle} lacks {', '.join(missing)}")
    sig_files = signature_names(files)
    on_disk = files - set(sig_files)
    keys = _distinct_keys(publisher_keys)
    if not keys:
        raise BadSignatureError("no trusted publisher keys are configured")
    signers: list[str] = []
    reasons: list[str] = []
    digests: dict[str, str] = {}  # SHA-256 digests a verified statement established
    for name in sig_files:
        signature = _read_bounded(bundle / name, MAX_SIGNATURE_BYTES, "signature")
        statement = _parse_statement(signature)
        if on_disk != statement.names:
            unsigned = sorted(on_disk - statement.names)
            absent = sorted(statement.names - on_disk)
            reasons.append(f"{name}: files differ from the signed list: unsigned {unsigned}, "
                           f"missing {absent}")
            continue
        untried = {kid: pem for kid, pem in keys.items() if kid not in signers}
        found, why = _verify_signature(bundle, signature, statement, untried, sig_files)
        if found is None:
            reasons.extend(f"{name}: {r}" if len(sig_files) > 1 else r for r in why)
        else:
            signers.append(found)
            digests = digests or statement.sha256
    if len(signers) < threshold:
        detail = "; ".join(dict.fromkeys(reasons)) or "each signature is by a key counted already"
        raise BadSignatureError(
            f"bundle {bundle} signature does not verify with any of the {len(keys)} trusted "
            f"publisher key(s): {detail}" if not signers else
            f"bundle {bundle} is signed by {len(signers)} distinct trusted publisher key(s); "
            f"{threshold} are required (each key counts once): {detail}"
        )
    manifest = parse_manifest(_read_bounded(bundle / MANIFEST, MAX_MANIFEST_BYTES, "manifest"))
    if "files" in manifest:
        _check_files_table(bundle, files, manifest["files"], digests)
    return VerifiedBundleDir(manifest, tuple(signers))


def publisher_keyid(pem: bytes) -> str:
    """The key id (``fleetcore.signing.keyid``) of a publisher public key in PEM."""
    try:
        pub = serialization.load_pem_public_key(pem)
    except (ValueError, TypeError) as exc:
        raise InvalidInputError(f"publisher key is not a PEM public key: {exc}") from None
    if not isinstance(pub, ec.EllipticCurvePublicKey):
        raise InvalidInputError("publisher key must be an elliptic-curve (P-256) key")
    return keyid(pub)


def _distinct_keys(publisher_keys: Sequence[bytes]) -> dict[str, bytes]:
    """{keyid: PEM}, one entry per key however many times (or forms) it is listed; a key
    that does not load verifies nothing and is left out."""
    keys: dict[str, bytes] = {}
    for index, pem in enumerate(publisher_keys):
        try:
            keys.setdefault(publisher_keyid(pem), pem)
        except InvalidInputError as exc:
            logger.debug("publisher key %d left out: %s", index, exc)
    return keys


@functools.cache
def _model_signing() -> Any:
    """The reference library, imported on first use: with its dependencies (sigstore,
    pydantic, ...) it adds ~35 MiB of resident memory, which an agent that only serves what it
    already installed should not carry (measured in `make bench`)."""
    return importlib.import_module("model_signing")

def _verify_signature(
    bundle: Path, signature: bytes, statement: _Statement, keys: dict[str, bytes],
    sig_files: Sequence[str],
) -> tuple[str | None, list[str]]:
    """The id of the first of ``keys`` that verifies ``signature`` over ``bundle`` (or None,
    with the reasons each key refused)."""
    reasons: list[str] = []
    model_signing = _model_signing()
    with tempfile.TemporaryDirectory(prefix="edgefleet-verify-") as tmp:
        signature_copy = Path(tmp) / SIGNATURE
        signature_copy.write_bytes(signature)
        for index, (kid, pem) in enumerate(keys.items()):
            key_path = Path(tmp) / f"publisher-{index}.pem"
            key_path.write_bytes(pem)
            hashing = (
                model_signing.hashing.Config()
                .use_file_serialization(hashing_algorithm=statement.hash_type)
                .set_ignored_paths(paths=list(sig_files), ignore_git_paths=False)
            )
            try:
                model_signing.verifying.Config().use_elliptic_key_verifier(
                    public_key=key_path
                ).set_hashing_config(hashing).verify(bundle, signature_copy)
            # The library lets many kinds out (ValueError, KeyError, InvalidSignature, ...);
            # every one of them means "not with this key".
            except Exception as exc:
                logger.debug("bundle %s: publisher key %s refused: %r", bundle, kid[:16], exc)
                reasons.append(_short_reason(exc))
                continue
            logger.debug("bundle %s verified with publisher key %s", bundle, kid[:16])
            return kid, reasons
    return None, reasons


def _parse_statement(signature: bytes) -> _Statement:
    """The hash type and file names that the signature's in-toto statement lists."""
    try:
        envelope = strict_json.loads(signature, what="signature",
                                     max_bytes=MAX_SIGNATURE_BYTES)["dsseEnvelope"]
        statement = strict_json.loads(base64.b64decode(envelope["payload"], validate=True),
                                      what="signature payload", max_bytes=MAX_SIGNATURE_BYTES)
        serialization = statement["predicate"]["serialization"]
        resources = statement["predicate"]["resources"]
        method, hash_type = serialization["method"], serialization["hash_type"]
        names = [resource["name"] for resource in resources]
        sha256 = {str(r["name"]): str(r["digest"]).lower() for r in resources
                  if r.get("algorithm") == "sha256" and isinstance(r.get("digest"), str)}
    except KeyError as exc:
        raise BadSignatureError(f"signature is malformed: it lacks the field {exc}") from None
    except (ValueError, TypeError, binascii.Error, InvalidInputError) as exc:
        raise BadSignatureError(f"signature is malformed: {_short_reason(exc)}") from None
    if method != "files":
        raise BadSignatureError(f"signature must hash whole files; got method {method!r}")
    if not isinstance(hash_type, str) or hash_type not in _HASH_TYPES:
        raise BadSignatureError(f"signature uses the unknown hash {hash_type!r}")
    if not all(isinstance(name, str) for name in names) or len(set(names)) != len(names):
        raise BadSignatureError("signature lists a file name twice or a name that is not text")
    return _Statement(hash_type=_HASH_TYPES[hash_type], names=frozenset(names),
                      sha256=sha256 if hash_type == "sha256" else {})


def _check_files_table(bundle: Path, files: set[str], table: object,
                       verified: dict[str, str]) -> None:
    """``verified``: SHA-256 digests the signature check already established, by name."""
    if not isinstance(table, dict):
        raise InvalidInputError("manifest field 'files' must be an object")
    for name, entry in table.items():
        if name not in files:
            raise InvalidInputError(f"manifest lists {name!r}, which the bundle does not hold")
        if (
            not isinstance(entry, dict)
            or not isinstance(entry.get("sha256"), str)
            or not isinstance(entry.get("size"), int)
            or isinstance(entry.get("size"), bool)
        ):
            raise InvalidInputError(f"manifest entry for {name!r} needs a sha256 and a size")
        size = os.lstat(bundle / name).st_size
        if size != entry["size"]:
            raise InvalidInputError(f"{name} is {size} bytes; the manifest says {entry['size']}")
        expected = entry["sha256"].removeprefix("sha256:").lower()
        actual = verified.get(name) or _sha256_file(bundle / name)
        if actual != expected:
            raise InvalidInputError(f"{name} has SHA-256 {actual}; the manifest says {expected}")


def _read_bounded(path: Path, limit: int, what: str) -> bytes:
    with path.open("rb") as fh:
        data = fh.read(limit + 1)
    if len(data) > limit:
        raise InvalidInputError(f"{what} {path} is over the {limit}-byte limit")
    return data


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK_BYTES):
            h.update(chunk)
    return h.hexdigest()


def _short_reason(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:_MAX_REASON_CHARS]
