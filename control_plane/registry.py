"""The model registry: receive a bundle archive, verify it, keep it encrypted and addressed
by content.

An upload is written to a private scratch directory while it is hashed and counted (the size
limit is enforced as bytes arrive), unpacked with the archive safety rules, and verified
against the trusted publisher keys. Only then is it encrypted into the blob store and
recorded; a refused upload leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fleetcore.archive import safe_extract
from fleetcore.bundle_verify import verify_bundle_dir
from fleetcore.errors import InvalidInputError, UntrustedInputError
from fleetcore.files import ensure_private_dir

__all__ = ["Upload", "VerifiedBundle", "key_fingerprint", "manifest_json", "verify_upload"]


class Upload:
    """A bundle archive arriving in pieces; call ``write`` per chunk, then ``finish``."""

    def __init__(self, scratch: Path, max_bytes: int) -> None:
        ensure_private_dir(scratch)
        self._dir = Path(tempfile.mkdtemp(prefix="upload-", dir=scratch))
        self.path = self._dir / "bundle.tar"
        self._fh = self.path.open("wb")
        self._hash = hashlib.sha256()
        self.length = 0
        self.max_bytes = max_bytes

    def write(self, data: bytes) -> None:
        self.length += len(data)
        if self.length > self.max_bytes:
            raise InvalidInputError(
                f"bundle upload exceeds the limit of {self.max_bytes} bytes"
            )
        self._hash.update(data)
        self._fh.write(data)

    def finish(self) -> str:
        self._fh.close()
        if self.length == 0:
            raise InvalidInputError("empty bundle upload")
        return "sha256:" + self._hash.hexdigest()

    def discard(self) -> None:
        if not self._fh.closed:
            self._fh.close()
        shutil.rmtree(self._dir, ignore_errors=True)


@dataclass(frozen=True)
class VerifiedBundle:
    digest: str
    length: int
    manifest: dict[str, Any] = field(hash=False)
    publisher_key: str  # fingerprint of the key that verified it


def key_fingerprint(pem: bytes) -> str:
    return "sha256:" + hashlib.sha256(pem.strip()).hexdigest()[:16]


def verify_upload(upload: Upload, digest: str, publisher_keys: tuple[bytes, ...]) -> VerifiedBundle:
    """Unpack and verify an upload; raise an UntrustedInputError subclass if refused."""
    if not publisher_keys:
        raise InvalidInputError("the control plane trusts no publisher key ([pki] publisher_keys)")
    extracted = upload.path.parent / "bundle"
    safe_extract(upload.path, extracted)
    errors = []
    for pem in publisher_keys:
        try:
            manifest = verify_bundle_dir(extracted, [pem])
        except UntrustedInputError as exc:
            errors.append(str(exc))
            continue
        return VerifiedBundle(digest, upload.length, manifest, key_fingerprint(pem))
    detail = errors[0] if len(set(errors)) == 1 else "; ".join(errors)
    raise UntrustedInputError(
        f"bundle does not verify with any of the {len(errors)} trusted publisher keys: {detail}"
    )


def manifest_json(manifest: dict[str, Any]) -> str:
    keep = {k: manifest[k] for k in ("name", "version", "created", "input", "output", "metrics",
                                     "lineage", "compression", "runtime") if k in manifest}
    return json.dumps(keep, sort_keys=True, separators=(",", ":"))
