"""Bundle archives at rest: content-addressed and encrypted with AES-256-GCM.

File format (``HOME/blobs/<hex digest>``)::

    b"EFB2" | chunk_size (u32 BE) | nonce_prefix (8 random bytes) | key_id (8 bytes)
            | chunk_0 | chunk_1 | ...

(``EFB1``, written before key ids, has no ``key_id``: every key of the keyring is tried.)

Each chunk is ``chunk_size`` plaintext bytes (the last one fewer) sealed separately, so any
byte range can be served by decrypting only the chunks it touches. Chunk i's nonce is
``nonce_prefix | i (u32 BE)`` and its associated data binds the blob digest, i and whether it
is the last chunk, so chunks cannot be reordered, truncated or moved to another blob.
The key (32 random bytes) lives in ``HOME/keys/blob.key`` (0600); its id is the first 8 bytes
of its SHA-256. During a rotation (`control-plane rotate bundle-key`,
``control_plane/ops/rotate_bundle_key.py``) the previous one is ``blob.key.old``: blobs are
read with whichever key their header names, and the store reloads both files when a blob
names a key it does not hold, and before each write (new blobs use the newest key).

Replicas (several control planes on one PostgreSQL database): the sealed blob is also kept in
the database (``Store.put_blob``, table ``blob_parts``), still encrypted under the bundle key
that only the homes hold; a replica that lacks a blob in its own ``HOME/blobs`` fetches it from
there once, so ``HOME/blobs`` is a cache and the database the copy every replica shares.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from fleetcore.errors import InvalidInputError, NotFoundError
from fleetcore.files import atomic_write

__all__ = ["BlobHeader", "BlobStore", "SharedBlobs", "key_id", "load_or_create_key", "old_key_path",
           "read_header"]

MAGIC_V1 = b"EFB1"
MAGIC = b"EFB2"
HEADER_V1 = struct.Struct(">4sI8s")
HEADER = struct.Struct(">4sI8s8s")
TAG = 16
CHUNK = 1024 * 1024


def load_or_create_key(path: Path) -> bytes:
    if path.exists():
        key = path.read_bytes()
        if len(key) != 32:
            raise InvalidInputError(f"{path} must hold 32 bytes; it holds {len(key)}")
        return key
    key = secrets.token_bytes(32)
    atomic_write(path, key, mode=0o600)
    return key


def key_id(key: bytes) -> bytes:
    return hashlib.sha256(key).digest()[:8]


def old_key_path(path: Path) -> Path:
    """Where the previous bundle key waits while a rotation is under way."""
    return path.with_name(path.name + ".old")


class SharedBlobs(Protocol):
    """Where replicas share sealed blobs (the Store, when it is PostgreSQL)."""

    def put_blob(self, digest: str, sealed: bytes) -> None: ...

    def get_blob(self, digest: str) -> bytes | None: ...


@dataclass(frozen=True)
class BlobHeader:
    chunk_size: int
    prefix: bytes
    key_id: bytes  # empty for EFB1 (any key of the keyring)
    size: int  # bytes of the header


def read_header(fh: BinaryIO, digest: str) -> BlobHeader:
    head = fh.read(HEADER.size)
    if head[:4] == MAGIC and len(head) == HEADER.size:
        _, chunk_size, prefix, kid = HEADER.unpack(head)
        return BlobHeader(chunk_size, prefix, kid, HEADER.size)
    if head[:4] == MAGIC_V1 and len(head) >= HEADER_V1.size:
        _, chunk_size, prefix = HEADER_V1.unpack(head[:HEADER_V1.size])
        return BlobHeader(chunk_size, prefix, b"", HEADER_V1.size)
    raise InvalidInputError(f"blob {digest} has an unknown format")


def _hex(digest: str) -> str:
    if not digest.startswith("sha256:") or len(digest) != 71:
        raise InvalidInputError(f"expected a sha256:<hex> digest, got {digest!r}")
    value = digest[7:]
    int(value, 16)
    return value


class BlobStore:
    def __init__(self, root: Path, key: bytes, *, chunk_size: int = CHUNK,
                 key_file: Path | None = None, shared: SharedBlobs | None = None) -> None:
        """``key``: the key new blobs are sealed with; ``key_file``: where it lives (with the
        previous one beside it during a rotation), reloaded when it changes; ``shared``: the
        database replicas share blobs through (None: the files are the only copy)."""
        self.root = Path(root)
        self.shared = shared
        self.root.mkdir(parents=True, exist_ok=True)
        self.chunk_size = chunk_size
        self.key_file = key_file
        self._keys: dict[bytes, AESGCM] = {}
        self._current = b""
        self._stamp: tuple[int, int, int] | None = None
        self.use_key(key)

    def use_key(self, key: bytes) -> None:
        """Seal new blobs with ``key`` (the ones held before stay readable)."""
        self._current = key_id(key)
        self._keys[self._current] = AESGCM(key)

    @property
    def current_key_id(self) -> bytes:
        return self._current

    def reload(self) -> None:
        """Pick up ``key_file`` (and its ``.old``) when it changed since the last look."""
        if self.key_file is None:
            return
        try:
            st = self.key_file.stat()
        except FileNotFoundError:  # a rotation between its renames: keep what is held
            return
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        if stamp == self._stamp:
            return
        old = old_key_path(self.key_file)
        if old.exists():
            self._keys.setdefault(key_id(old.read_bytes()), AESGCM(old.read_bytes()))
        self.use_key(load_or_create_key(self.key_file))
        self._stamp = stamp

    def _aead_for(self, kid: bytes, digest: str) -> list[AESGCM]:
        """The keys to try for a blob sealed under ``kid`` (EFB1: every key held)."""
        if not kid:
            return list(self._keys.values())
        if kid not in self._keys:
            self.reload()
        if kid not in self._keys:
            raise InvalidInputError(f"blob {digest} is sealed with key {kid.hex()}, which this "
                                    "control plane does not hold")
        return [self._keys[kid]]

    def path(self, digest: str) -> Path:
        return self.root / _hex(digest)

    def exists(self, digest: str) -> bool:
        """Whether the blob is here, fetching it from the shared database when it is there."""
        path = self.path(digest)
        if path.exists():
            return True
        sealed = self.shared.get_blob(digest) if self.shared is not None else None
        if sealed is None:
            return False
        atomic_write(path, sealed)  # cached: a replica published it
        return True

    def _aad(self, digest: str, index: int, last: bool) -> bytes:
        return digest.encode() + struct.pack(">I?", index, last)

    def put_file(self, plaintext: Path, digest: str, length: int) -> None:
        """Encrypt ``plaintext`` (already hashed to ``digest``) into the store."""
        if self.exists(digest):
            return
        self.reload()  # a rotation may have made a new key: seal with the newest
        chunks = max(1, -(-length // self.chunk_size))
        with plaintext.open("rb") as src:
            self._write(digest, (src.read(self.chunk_size) for _ in range(chunks)), chunks)

    def _write(self, digest: str, pieces: Iterable[bytes], chunks: int) -> None:
        """Seal ``chunks`` plaintext pieces under the current key into the blob, atomically
        (a temporary file, fsync'd, renamed over), checking the digest on the way."""
        prefix = secrets.token_bytes(8)
        aead = self._keys[self._current]
        tmp = self.path(digest).with_suffix(".tmp")
        h = hashlib.sha256()
        with tmp.open("wb") as out:
            out.write(HEADER.pack(MAGIC, self.chunk_size, prefix, self._current))
            for i, data in enumerate(pieces):
                h.update(data)
                nonce = prefix + struct.pack(">I", i)
                out.write(aead.encrypt(nonce, data, self._aad(digest, i, i == chunks - 1)))
            out.flush()
            os.fsync(out.fileno())
        if "sha256:" + h.hexdigest() != digest:
            tmp.unlink()
            raise InvalidInputError(f"blob bytes do not match {digest}")
        os.replace(tmp, self.path(digest))
        if self.shared is not None:  # the other replicas read it from there
            self.shared.put_blob(digest, self.path(digest).read_bytes())

    def _usable(self, digest: str) -> None:
        """A cached copy sealed under a key this home no longer holds (a rotation resealed
        the blob on another replica): take the database's copy instead."""
        with self.path(digest).open("rb") as fh:
            kid = read_header(fh, digest).key_id
        if not kid or kid in self._keys or self.shared is None:
            return
        self.reload()
        if kid not in self._keys and (sealed := self.shared.get_blob(digest)) is not None:
            atomic_write(self.path(digest), sealed)

    def key_of(self, digest: str) -> bytes:
        """The id of the key the blob is sealed with (empty: an EFB1 blob)."""
        self.exists(digest)
        with self.path(digest).open("rb") as fh:
            return read_header(fh, digest).key_id

    def reseal(self, digest: str) -> bool:
        """Re-encrypt the blob under the current key (atomically); False when it already
        was. Its plaintext is checked against its digest before the rename."""
        path = self.path(digest)
        self.exists(digest)
        with path.open("rb") as fh:
            header = read_header(fh, digest)
        if header.key_id == self._current:
            return False
        body = path.stat().st_size - header.size
        sealed = header.chunk_size + TAG
        chunks = max(1, -(-body // sealed))
        length = body - chunks * TAG
        if header.chunk_size != self.chunk_size:
            raise InvalidInputError(f"blob {digest} has chunk size {header.chunk_size}")
        self._write(digest, self.read(digest, length, 0, length), chunks)
        return True

    def read(self, digest: str, length: int, offset: int, count: int) -> Iterator[bytes]:
        """Yield the plaintext of bytes [offset, offset+count) in chunk-sized pieces."""
        path = self.path(digest)
        if not self.exists(digest):
            raise NotFoundError(f"no blob {digest}")
        end = min(length, offset + count)
        if offset >= end:
            return
        chunks = max(1, -(-length // self.chunk_size))
        self._usable(digest)
        with path.open("rb") as fh:
            header = read_header(fh, digest)
            chunk_size, prefix = header.chunk_size, header.prefix
            if chunk_size != self.chunk_size:
                raise InvalidInputError(f"blob {digest} has an unknown format")
            aeads = self._aead_for(header.key_id, digest)
            first, last = offset // chunk_size, (end - 1) // chunk_size
            for i in range(first, last + 1):
                fh.seek(header.size + i * (chunk_size + TAG))
                size = min(chunk_size, length - i * chunk_size)
                sealed = fh.read(size + TAG)
                data, aeads = _open(aeads, prefix + struct.pack(">I", i), sealed,
                                    self._aad(digest, i, i == chunks - 1), digest, i)
                lo = max(offset, i * chunk_size) - i * chunk_size
                hi = min(end, (i + 1) * chunk_size) - i * chunk_size
                yield data[lo:hi]


def _open(aeads: list[AESGCM], nonce: bytes, sealed: bytes, aad: bytes, digest: str,
          index: int) -> tuple[bytes, list[AESGCM]]:
    """Decrypt with the first key that authenticates; it alone is tried for the next chunks."""
    for aead in aeads:
        try:
            return aead.decrypt(nonce, sealed, aad), [aead]
        except InvalidTag:
            continue
    raise InvalidInputError(f"blob {digest} chunk {index} fails authentication")
