"""The agent's persisted release trust: the high-water mark and the last accepted release.

A thin shell around the pure ``fleetcore.release`` core (the python-tuf updater split):

* ``accept`` verifies a delivered release against the current mark and, only on success,
  writes it to ``release.json`` atomically (temp file, fsync, ``os.replace``) before it returns.
  Any refusal leaves memory and disk exactly as they were.
* On load the stored release is re-verified (signature with the pinned key, device id) but not
  for expiry: a restarted agent keeps serving an expired release; it only refuses older ones.
* A missing file means "nothing accepted yet". A corrupted or tampered file is an error, never
  a silent reset, because forgetting the mark would re-open rollback.
* The trusted keys are the root's release keys (``root_trust.py``), or the key pinned at
  enrollment before a root arrives. ``use_keys(..., forget=True)``: the agent adopted a root
  whose release keys changed, and forgets its high-water mark (TUF's rule for rotated
  timestamp/snapshot keys): after a compromise (a stolen key signed serial 99999) legitimate
  releases flow again. A stored release signed only by a retired key counts as forgotten on
  load (a crash between adopting the root and forgetting).
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from fleetcore import signing, strict_json
from fleetcore.errors import BadSignatureError, InvalidInputError, UntrustedInputError
from fleetcore.files import atomic_write
from fleetcore.release import (
    MAX_DOCUMENT_BYTES,
    MAX_SIGNATURE_BYTES,
    MAX_SIGNATURES,
    ReleaseDocument,
    SignedRelease,
    TrustedMark,
    reverify_release,
    verify_release,
)
from fleetcore.signing import KeySignature, TrustedKeys

__all__ = ["TRUST_FILE_FORMAT", "ReleaseTrust", "recorded_serial"]

logger = logging.getLogger(__name__)

TRUST_FILE_FORMAT = "edgefleet.release-trust/v1"
# Base64 grows data by 4/3; leave room for the JSON around it.
_MAX_FILE_BYTES = 2 * (MAX_DOCUMENT_BYTES + (1 + MAX_SIGNATURES) * (MAX_SIGNATURE_BYTES + 100)) \
    + 4096
_FILE_KEYS = frozenset({"format", "serial", "digest", "document", "signature"})
# Written since releases carry key ids (k-of-n); files without it still load.
_SIGNATURES_KEY = "signatures"


class ReleaseTrust:
    """The release state of one device, kept in ``path`` (e.g. ``STATE/release.json``)."""

    def __init__(self, path: Path, public_key: ec.EllipticCurvePublicKey | TrustedKeys,
                 device_id: str, *, retired: Sequence[ec.EllipticCurvePublicKey] = ()) -> None:
        self._path = Path(path)
        self._public_key = public_key
        self._device_id = device_id
        self._lock = threading.Lock()
        self._mark: TrustedMark | None = None
        self._current: ReleaseDocument | None = None
        self._document = b""  # the current document's exact bytes
        loaded = self._load(retired)
        if loaded is not None:
            self._current = loaded
            self._mark = TrustedMark(serial=loaded.serial, digest=loaded.digest)

    @property
    def mark(self) -> TrustedMark | None:
        return self._mark

    @property
    def current(self) -> ReleaseDocument | None:
        return self._current

    @property
    def current_document(self) -> bytes | None:
        """The exact bytes of ``current``'s signed document."""
        return self._document if self._current is not None else None

    def use_keys(self, keys: ec.EllipticCurvePublicKey | TrustedKeys, *, forget: bool) -> None:
        """Verify from now on with ``keys``; ``forget``: drop the high-water mark and the
        stored release (signed by a key that is retired now). Installed models keep serving."""
        with self._lock:
            self._public_key = keys
            if forget and self._mark is not None:
                log_serial = self._mark.serial
                self._path.unlink(missing_ok=True)
                self._mark, self._current = None, None
                logger.warning("release keys changed with the root: forgot serial %d",
                               log_serial)

    def accept(self, signed: SignedRelease, now: float) -> tuple[ReleaseDocument, bool]:
        """Verify ``signed`` at ``now``; persist it if it is newer. Returns (document, changed).

        Raises the errors of ``verify_release`` (and ``OSError`` if persisting fails); in every
        such case the trust state is unchanged.
        """
        with self._lock:
            doc = verify_release(
                signed,
                public_key=self._public_key,
                device_id=self._device_id,
                now=now,
                trusted=self._mark,
            )
            if self._mark is not None and doc.serial == self._mark.serial:
                # verify_release has checked that the digest matches: a re-delivery.
                return doc, False
            atomic_write(self._path, _encode_file(_verified_only(signed, self._public_key), doc))
            previous = self._mark
            self._current, self._document = doc, signed.document
            self._mark = TrustedMark(serial=doc.serial, digest=doc.digest)
        logger.info(
            "accepted release serial %d (%s) for %s; previous serial %s",
            doc.serial,
            doc.digest,
            self._device_id,
            previous.serial if previous is not None else "none",
        )
        return doc, True

    def _load(self, retired: Sequence[ec.EllipticCurvePublicKey]) -> ReleaseDocument | None:
        try:
            with self._path.open("rb") as fh:
                data = fh.read(_MAX_FILE_BYTES + 1)
        except FileNotFoundError:
            return None
        try:
            serial, digest, signed = _decode_file(data)
            if retired and _signed_only_by(signed, retired, self._public_key, self._device_id):
                logger.warning("stored release serial %d was signed by a retired release key; "
                               "forgetting it", serial)
                self._path.unlink(missing_ok=True)
                return None
            # legacy: a release stored before signatures carried their purpose still loads.
            legacy = _SIGNATURES_KEY not in strict_json.loads(
                data, what="the file", max_bytes=_MAX_FILE_BYTES)
            doc = reverify_release(
                signed, public_key=self._public_key, device_id=self._device_id, legacy=legacy
            )
            if not legacy and _verified_only(signed, self._public_key) != signed:
                raise InvalidInputError("a stored signature does not verify (only verified "
                                        "signatures are written)")
        except UntrustedInputError as exc:
            raise InvalidInputError(
                f"release trust file {self._path} is corrupted or tampered with ({exc}); "
                "refusing to forget the trusted release"
            ) from exc
        if (serial, digest) != (doc.serial, doc.digest):
            raise InvalidInputError(
                f"release trust file {self._path} records serial {serial} and digest {digest}, "
                f"but its signed document has serial {doc.serial} and digest {doc.digest}"
            )
        self._document = signed.document
        return doc


def _verified_only(signed: SignedRelease,
                   keys: ec.EllipticCurvePublicKey | TrustedKeys) -> SignedRelease:
    """``signed`` with only the signatures that verify with ``keys`` (what is persisted)."""
    trusted = keys if isinstance(keys, TrustedKeys) else TrustedKeys.single(keys)

    def good(sig: bytes, keyids: list[str]) -> bool:
        for kid in keyids:
            try:
                signing.verify(trusted.keys[kid], "release", signed.document, sig)
            except (BadSignatureError, InvalidInputError):
                continue
            return True
        return False

    legacy = signed.signature if good(signed.signature, list(trusted.keys)) else b""
    keyed = tuple(s for s in signed.signatures
                  if s.keyid in trusted.keys and good(s.sig, [s.keyid]))
    return SignedRelease(signed.document, legacy, signatures=keyed)


def _signed_only_by(signed: SignedRelease, retired: Sequence[ec.EllipticCurvePublicKey],
                    current: ec.EllipticCurvePublicKey | TrustedKeys, device_id: str) -> bool:
    def verifies(keys: ec.EllipticCurvePublicKey | TrustedKeys) -> bool:
        try:
            reverify_release(signed, public_key=keys, device_id=device_id, legacy=True)
        except BadSignatureError:
            return False
        return True

    return not verifies(current) and any(verifies(k) for k in retired)


def _encode_file(signed: SignedRelease, doc: ReleaseDocument) -> bytes:
    record = {
        "format": TRUST_FILE_FORMAT,
        "serial": doc.serial,
        "digest": doc.digest,
        "document": base64.b64encode(signed.document).decode("ascii"),
        "signature": base64.b64encode(signed.signature).decode("ascii"),
        _SIGNATURES_KEY: [{"keyid": s.keyid, "sig": base64.b64encode(s.sig).decode("ascii")}
                          for s in signed.signatures],
    }
    return json.dumps(record, sort_keys=True, indent=1).encode("ascii") + b"\n"


def recorded_serial(path: Path) -> int:
    """The serial a trust file records (0 when there is none), for status displays only: the
    file is parsed strictly but its signature is not checked (``ReleaseTrust`` does that)."""
    try:
        with path.open("rb") as fh:
            data = fh.read(_MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        return 0
    try:
        return _decode_file(data)[0]
    except InvalidInputError as exc:
        raise InvalidInputError(f"release trust file {path}: {exc}") from None


def _decode_file(data: bytes) -> tuple[int, str, SignedRelease]:
    record: Any = strict_json.loads(data, what="the file", max_bytes=_MAX_FILE_BYTES)
    if not isinstance(record, dict) or record.keys() - {_SIGNATURES_KEY} != _FILE_KEYS:
        got = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise InvalidInputError(f"expected a JSON object with keys {sorted(_FILE_KEYS)}; got {got}")
    if record["format"] != TRUST_FILE_FORMAT:
        raise InvalidInputError(f"format must be {TRUST_FILE_FORMAT!r}; got {record['format']!r}")
    serial, digest = record["serial"], record["digest"]
    if not isinstance(serial, int) or isinstance(serial, bool) or not isinstance(digest, str):
        raise InvalidInputError(
            f"serial must be an integer and digest a string; got {serial!r} and {digest!r}"
        )
    try:
        document = base64.b64decode(_ascii(record["document"], "document"), validate=True)
        signature = base64.b64decode(_ascii(record["signature"], "signature"), validate=True)
        signatures = _signatures(record.get(_SIGNATURES_KEY, []))
    except binascii.Error as exc:
        raise InvalidInputError(f"document or signature is not valid base64: {exc}") from None
    return serial, digest, SignedRelease(document=document, signature=signature,
                                         signatures=signatures)


def _signatures(raw: object) -> tuple[KeySignature, ...]:
    if not isinstance(raw, list) or len(raw) > MAX_SIGNATURES:
        raise InvalidInputError(f"signatures must be a list of at most {MAX_SIGNATURES}")
    out = []
    for entry in raw:
        if not isinstance(entry, dict) or entry.keys() != {"keyid", "sig"} or not isinstance(
                entry["keyid"], str) or len(entry["keyid"]) > 64:
            raise InvalidInputError("each signature must be {keyid, sig}")
        out.append(KeySignature(entry["keyid"],
                                base64.b64decode(_ascii(entry["sig"], "sig"), validate=True)))
    return tuple(out)


def _ascii(value: object, where: str) -> bytes:
    if not isinstance(value, str) or not value.isascii():
        raise InvalidInputError(f"{where} must be an ASCII base64 string; got {value!r:.80}")
    return value.encode("ascii")
