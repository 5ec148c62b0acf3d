"""The model registry: receive a bundle archive, verify it, keep it encrypted and addressed
by content.

An upload is written to a private scratch directory while it is hashed and counted (the size
limit is enforced as bytes arrive), unpacked with the archive safety rules, and verified
against the current root's publisher keys and threshold (``services/publishers.py``: a revoked
publisher's bundle is refused from the root that drops its key on). Only then is it encrypted
into the blob store and recorded, with the ids of the keys that signed it; a refused upload
leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from control_plane.domain.records import AuditOutcome, ModelVersionRecord
from control_plane.services.context import Context
from control_plane.services.publishers import publisher_trust
from fleetcore import pki, strict_json
from fleetcore.archive import pack_bundle, safe_extract
from fleetcore.bundle import MAX_MANIFEST_BYTES, manifest_task
from fleetcore.bundle_verify import publisher_keyid, verify_bundle_signers
from fleetcore.errors import InvalidInputError, NotFoundError, UntrustedInputError
from fleetcore.files import ensure_private_dir

__all__ = ["RegistryService", "Upload", "VerifiedBundle", "key_fingerprint", "manifest_json",
           "verify_upload", "version_task"]

log = logging.getLogger(__name__)

# What one version's manifest summary in a listing may take (its metrics are the big part).
MAX_SUMMARY_BYTES = 16 * 1024


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
    signer_keyids: tuple[str, ...] = ()  # every distinct trusted key that signed it


def key_fingerprint(pem: bytes) -> str:
    return "sha256:" + hashlib.sha256(pem.strip()).hexdigest()[:16]


def verify_upload(upload: Upload, digest: str, publisher_keys: tuple[bytes, ...],
                  threshold: int = 1) -> VerifiedBundle:
    """Unpack and verify an upload; raise an UntrustedInputError subclass if refused: at
    least ``threshold`` distinct ``publisher_keys`` must have signed it (each counts once)."""
    if not publisher_keys:
        raise InvalidInputError("the control plane trusts no publisher key ([pki] publisher_keys)")
    extracted = upload.path.parent / "bundle"
    safe_extract(upload.path, extracted)
    verified = verify_bundle_signers(extracted, publisher_keys, threshold)
    by_id = {publisher_keyid(pem): pem for pem in publisher_keys if _loads(pem)}
    first = by_id[verified.keyids[0]]
    return VerifiedBundle(digest, upload.length, verified.manifest, key_fingerprint(first),
                          verified.keyids)


def _loads(pem: bytes) -> bool:
    try:
        publisher_keyid(pem)
    except InvalidInputError:
        return False
    return True


def manifest_json(manifest: dict[str, Any]) -> str:
    keep = {k: manifest[k] for k in ("name", "version", "created", "task", "input", "output",
                                     "metrics", "lineage", "compression", "runtime")
            if k in manifest}
    return json.dumps(keep, sort_keys=True, separators=(",", ":"))


def version_task(record: ModelVersionRecord | None) -> str:
    """A published version's task ("classification" unless its manifest says "regression")."""
    if record is None or '"task"' not in record.manifest:
        return "classification"
    doc = strict_json.loads(record.manifest, what=f"manifest of {record.name} v{record.version}",
                            max_bytes=MAX_MANIFEST_BYTES)
    return manifest_task(doc) if isinstance(doc, dict) else "classification"


class RegistryService:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.store = ctx.store

    def begin_upload(self, caller: pki.Identity) -> Upload:
        self.ctx.authorize(caller, "models.publish", "")
        return self.new_upload()

    def new_upload(self) -> Upload:
        return Upload(self.ctx.config.layout.scratch, self.ctx.config.max_bundle_bytes)

    def publish(self, caller: pki.Identity | str, upload: Upload) -> ModelVersionRecord:
        """Verify and store an upload (``caller``: an operator, or "control-plane")."""
        audit = self.ctx.audit
        published_by = caller.actor if isinstance(caller, pki.Identity) else caller
        try:
            digest = upload.finish()
            trust = publisher_trust(self.ctx)
            try:
                verified = verify_upload(upload, digest, trust.pems, trust.threshold)
            except UntrustedInputError as exc:
                audit.record(caller, "models.publish", digest, AuditOutcome.DENIED,
                             {"reason": str(exc)[:500]})
                raise
            manifest = verified.manifest
            record = ModelVersionRecord(
                name=str(manifest["name"]), version=int(manifest["version"]), digest=digest,
                length=verified.length, created_at=self.ctx.clock(), published_by=published_by,
                publisher_key=verified.publisher_key, manifest=manifest_json(manifest),
            )
            pki.validate_name(record.name, "model name")
            self.ctx.blobs.put_file(upload.path, digest, verified.length)
            self.store.add_model_version(record)
            self.store.set_version_signers(record.name, record.version, verified.signer_keyids)
        finally:
            upload.discard()
        audit.record(caller, "models.publish", f"{record.name}:{record.version}",
                     AuditOutcome.ALLOWED, {"digest": digest, "length": record.length,
                                            "publisher_key": record.publisher_key,
                                            "signer_keyids": list(verified.signer_keyids)})
        log.info("published %s v%d (%s, %d bytes)", record.name, record.version, digest,
                 record.length)
        # The listing's form: the whole manifest may be megabytes (`fleet models show`).
        (stored,) = [m for m in self.store.list_model_versions(record.name)
                     if m.version == record.version]
        return stored if len(stored.manifest) <= MAX_SUMMARY_BYTES else replace(
            stored, manifest="{}")

    def publish_dir(self, caller: pki.Identity | str, bundle: Path) -> ModelVersionRecord:
        """Pack a bundle directory on this host and publish it like an upload."""
        ensure_private_dir(self.ctx.config.layout.scratch)  # the first bundle of a fleet
        with tempfile.TemporaryDirectory(dir=self.ctx.config.layout.scratch) as tmp:
            archive = Path(tmp) / "bundle.tar"
            pack_bundle(bundle, archive)
            upload = self.new_upload()
            with archive.open("rb") as fh:
                while data := fh.read(1 << 20):
                    upload.write(data)
            return self.publish(caller, upload)

    def list_versions(self, caller: pki.Identity, name: str) -> list[ModelVersionRecord]:
        """Every version with a summary of its manifest, each at most ``MAX_SUMMARY_BYTES``
        (a reply for many versions stays far below gRPC's message limit)."""
        self.ctx.authorize(caller, "models.list", name)
        return [m if len(m.manifest) <= MAX_SUMMARY_BYTES else replace(m, manifest="{}")
                for m in self.store.list_model_versions(name or None)]

    def get_version(self, caller: pki.Identity, name: str, version: int) -> ModelVersionRecord:
        """One version with its whole manifest."""
        self.ctx.authorize(caller, "models.list", name)
        found = self.store.get_model_version(name, version) if 0 < version < 2**31 else None
        if found is None:
            raise NotFoundError(f"no model {name!r} version {version}")
        return found
