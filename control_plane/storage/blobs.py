"""Bundle archives at rest: content-addressed and encrypted with AES-256-GCM.

File format (``HOME/blobs/<hex digest>``)::

    b"EFB1" | chunk_size (u32 BE) | nonce_prefix (8 random bytes) | chunk_0 | chunk_1 | ...

Each chunk is ``chunk_size`` plaintext bytes (the last one fewer) sealed separately, so any
byte range can be served by decrypting only the chunks it touches. Chunk i's nonce is
``nonce_prefix | i (u32 BE)`` and its associated data binds the blob digest, i and whether it
is the last chunk, so chunks cannot be reordered, truncated or moved to another blob.
The key (32 random bytes) lives in ``HOME/keys/blob.key`` (0600).
"""

from __future__ import annotations

import hashlib
import os
import secrets
import struct
from collections.abc import Iterator
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from fleetcore.errors import InvalidInputError, NotFoundError
from fleetcore.files import atomic_write

__all__ = ["BlobStore", "load_or_create_key"]

MAGIC = b"EFB1"
HEADER = struct.Struct(">4sI8s")
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


def _hex(digest: str) -> str:
    if not digest.startswith("sha256:") or len(digest) != 71:
        raise InvalidInputError(f"expected a sha256:<hex> digest, got {digest!r}")
    value = digest[7:]
    int(value, 16)
    return value


class BlobStore:
    def __init__(self, root: Path, key: bytes, *, chunk_size: int = CHUNK) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._aead = AESGCM(key)
        self.chunk_size = chunk_size

    def path(self, digest: str) -> Path:
        return self.root / _hex(digest)

    def exists(self, digest: str) -> bool:
        return self.path(digest).exists()

    def _aad(self, digest: str, index: int, last: bool) -> bytes:
        return digest.encode() + struct.pack(">I?", index, last)

    def put_file(self, plaintext: Path, digest: str, length: int) -> None:
        """Encrypt ``plaintext`` (already hashed to ``digest``) into the store."""
        if self.exists(digest):
            return
        prefix = secrets.token_bytes(8)
        tmp = self.path(digest).with_suffix(".tmp")
        chunks = max(1, -(-length // self.chunk_size))
        h = hashlib.sha256()
        with plaintext.open("rb") as src, tmp.open("wb") as out:
            out.write(HEADER.pack(MAGIC, self.chunk_size, prefix))
            for i in range(chunks):
                data = src.read(self.chunk_size)
                h.update(data)
                nonce = prefix + struct.pack(">I", i)
                out.write(self._aead.encrypt(nonce, data, self._aad(digest, i, i == chunks - 1)))
            out.flush()
            os.fsync(out.fileno())
        if "sha256:" + h.hexdigest() != digest:
            tmp.unlink()
            raise InvalidInputError(f"blob bytes do not match {digest}")
        os.replace(tmp, self.path(digest))

    def read(self, digest: str, length: int, offset: int, count: int) -> Iterator[bytes]:
        """Yield the plaintext of bytes [offset, offset+count) in chunk-sized pieces."""
        path = self.path(digest)
        if not path.exists():
            raise NotFoundError(f"no blob {digest}")
        end = min(length, offset + count)
        if offset >= end:
            return
        chunks = max(1, -(-length // self.chunk_size))
        with path.open("rb") as fh:
            magic, chunk_size, prefix = HEADER.unpack(fh.read(HEADER.size))
            if magic != MAGIC or chunk_size != self.chunk_size:
                raise InvalidInputError(f"blob {digest} has an unknown format")
            first, last = offset // chunk_size, (end - 1) // chunk_size
            for i in range(first, last + 1):
                fh.seek(HEADER.size + i * (chunk_size + TAG))
                size = min(chunk_size, length - i * chunk_size)
                sealed = fh.read(size + TAG)
                try:
                    data = self._aead.decrypt(prefix + struct.pack(">I", i), sealed,
                                              self._aad(digest, i, i == chunks - 1))
                except InvalidTag:
                    raise InvalidInputError(f"blob {digest} chunk {i} fails authentication") \
                        from None
                lo = max(offset, i * chunk_size) - i * chunk_size
                hi = min(end, (i + 1) * chunk_size) - i * chunk_size
                yield data[lo:hi]
