"""A model bundle as one archive: deterministic packing and a refuse-by-default extractor.

The control plane stores and serves a bundle as one blob (its digest and length go into signed
release documents); the agent unpacks it before verifying the publisher signature, so the
extractor treats the archive as hostile.

Rules:

* The format is an uncompressed POSIX (PAX) tar. Members are regular files named by canonical
  relative paths ('/'-separated, sorted), with mtime 0, uid/gid 0, empty owner names and mode
  0o644, so that packing the same directory twice gives the same bytes (and digest).
* A name is canonical when it is non-empty, valid UTF-8, relative, and has no empty, '.' or '..'
  component, no backslash and no NUL; one name never has two spellings, so duplicates show.
* Extraction accepts regular files and plain directories only: links, devices, FIFOs, sparse and
  unknown member types are refused. Counts and declared sizes are checked before any data is
  read, and bytes are counted again while copying. After the last member only the zero-filled
  end-of-archive marker may follow, so a truncated or padded archive is refused.
* Extraction goes to a fresh sibling staging directory, renamed to ``dest`` only on success; on
  any refusal or error the staging directory is removed and ``dest`` never appears.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import stat
import tarfile
import tempfile
from pathlib import Path
from typing import IO

from fleetcore.errors import AlreadyExistsError, InvalidInputError
from fleetcore.files import fsync_dir

__all__ = [
    "MAX_ARCHIVE_MEMBERS",
    "MAX_MEMBER_BYTES",
    "MAX_TOTAL_BYTES",
    "UnsafeArchiveError",
    "check_member_name",
    "list_regular_files",
    "pack_bundle",
    "safe_extract",
]

MAX_ARCHIVE_MEMBERS = 256
MAX_MEMBER_BYTES = 4 * 1024**3
MAX_TOTAL_BYTES = 8 * 1024**3

_CHUNK_BYTES = 1 << 20
# Within what every Linux file system accepts (NAME_MAX 255, well under PATH_MAX).
_MAX_COMPONENT_BYTES = 255
_MAX_NAME_BYTES = 1024
# tarfile reads a PAX or GNU long-name header's whole body into memory; real ones are tiny.
_MAX_EXTENDED_HEADER_BYTES = 64 * 1024
_EXTENDED_HEADER_TYPES = frozenset(
    {
        tarfile.XHDTYPE,
        tarfile.XGLTYPE,
        tarfile.SOLARIS_XHDTYPE,
        tarfile.GNUTYPE_LONGNAME,
        tarfile.GNUTYPE_LONGLINK,
    }
)
# Zero padding after the end-of-archive marker (writers round up to a record size).
_MAX_TRAILER_BYTES = 1 << 20


class UnsafeArchiveError(InvalidInputError):
    """An archive (or a directory to pack) holds something that the bundle format refuses."""


def check_member_name(name: str) -> str:
    """Return ``name`` if it is a canonical relative path; raise ``UnsafeArchiveError`` if not."""
    if not name:
        raise UnsafeArchiveError("a member name is empty")
    if "\x00" in name or "\\" in name:
        raise UnsafeArchiveError(f"name {name!r} contains a NUL or a backslash")
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise UnsafeArchiveError(f"name {name!r} is not valid UTF-8") from None
    if name.startswith("/"):
        raise UnsafeArchiveError(f"name {name!r} is absolute")
    parts = name.split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise UnsafeArchiveError(f"name {name!r} has an empty, '.' or '..' component")
    if len(name.encode()) > _MAX_NAME_BYTES or any(
        len(part.encode()) > _MAX_COMPONENT_BYTES for part in parts
    ):
        raise UnsafeArchiveError(
            f"name {name[:64]!r}... is longer than {_MAX_NAME_BYTES} bytes or has "
            f"a component longer than {_MAX_COMPONENT_BYTES}"
        )
    return name


def list_regular_files(root: Path) -> list[str]:
    """Names (relative, '/'-separated, sorted) of the regular files under directory ``root``.

    Walks with ``os.lstat`` and never follows links: a symlink or a special file anywhere (or a
    ``root`` that is not a real directory) raises ``UnsafeArchiveError``.
    """
    root = Path(root)
    if not stat.S_ISDIR(os.lstat(root).st_mode):
        raise UnsafeArchiveError(f"{root} is not a directory (symlinks are refused)")
    found: list[str] = []
    pending = [""]
    while pending:
        prefix = pending.pop()
        for entry in sorted(os.listdir(root / prefix) if prefix else os.listdir(root)):
            rel = f"{prefix}/{entry}" if prefix else entry
            mode = os.lstat(root / rel).st_mode
            if stat.S_ISDIR(mode):
                pending.append(rel)
            elif stat.S_ISREG(mode):
                found.append(check_member_name(rel))
            else:
                raise UnsafeArchiveError(
                    f"{root / rel} is a {_kind(mode)}; only regular files and directories "
                    "are allowed"
                )
    return sorted(found)


def pack_bundle(bundle_dir: Path, out: Path) -> tuple[str, int]:
    """Write the regular files of ``bundle_dir`` to the tar ``out``; return (digest, length).

    The digest is ``"sha256:<hex>"`` of the archive bytes. ``out`` is replaced atomically
    (temp file, fsync, ``os.replace``). Empty directories are not recorded.
    """
    bundle_dir, out = Path(bundle_dir), Path(out)
    if out.resolve().is_relative_to(bundle_dir.resolve()):
        raise ValueError(f"the archive {out} must not be written inside {bundle_dir}")
    names = list_regular_files(bundle_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    try:
        os.fchmod(fd, 0o644)
        with os.fdopen(fd, "w+b") as fh:
            with tarfile.open(fileobj=fh, mode="w", format=tarfile.PAX_FORMAT) as tar:
                for name in names:
                    _add_file(tar, bundle_dir, name)
            fh.flush()
            os.fsync(fh.fileno())
            fh.seek(0)
            digest, length = _sha256(fh)
        os.replace(tmp, out)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(out.parent)
    return "sha256:" + digest, length


def safe_extract(
    archive: Path,
    dest: Path,
    *,
    max_members: int = MAX_ARCHIVE_MEMBERS,
    max_member_bytes: int = MAX_MEMBER_BYTES,
    max_total_bytes: int = MAX_TOTAL_BYTES,
) -> list[str]:
    """Unpack the tar ``archive`` into the new directory ``dest``; return the file names (sorted).

    Raises ``UnsafeArchiveError`` for anything the module rules refuse and ``AlreadyExistsError``
    if ``dest`` exists. Nothing is left behind unless extraction succeeds.
    """
    archive, dest = Path(archive), Path(dest)
    if os.path.lexists(dest):
        raise AlreadyExistsError(f"extraction target {dest} exists already")
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".staging", dir=dest.parent))
    try:
        with archive.open("rb") as fh:
            names = _extract_all(fh, staging, max_members, max_member_bytes, max_total_bytes)
        os.chmod(staging, 0o755)  # noqa: S103 (like the 0o644 files: a model is not secret)
        fsync_dir(staging)
        os.rename(staging, dest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    fsync_dir(dest.parent)
    return names


class _BoundedTarInfo(tarfile.TarInfo):
    """A TarInfo that refuses oversized PAX / GNU long-name headers before tarfile reads them."""

    def _proc_member(self, tar: tarfile.TarFile) -> tarfile.TarInfo:
        if self.type in _EXTENDED_HEADER_TYPES and self.size > _MAX_EXTENDED_HEADER_BYTES:
            raise UnsafeArchiveError(
                f"extended tar header of {self.size} bytes; the limit is "
                f"{_MAX_EXTENDED_HEADER_BYTES}"
            )
        # A private tarfile hook (stable since Python 2), absent from the type stubs.
        result: tarfile.TarInfo = super()._proc_member(tar)  # type: ignore[misc]
        return result


def _extract_all(
    fh: IO[bytes], staging: Path, max_members: int, max_member_bytes: int, max_total_bytes: int
) -> list[str]:
    files: set[str] = set()
    seen: set[str] = set()
    dirs: set[str] = set()
    declared_total = 0
    try:
        with tarfile.open(fileobj=fh, mode="r:", tarinfo=_BoundedTarInfo) as tar:
            for count, member in enumerate(tar, start=1):
                if count > max_members:
                    raise UnsafeArchiveError(f"archive has more than {max_members} members")
                name = check_member_name(member.name)
                if name in seen:
                    raise UnsafeArchiveError(f"archive member {name!r} appears twice")
                seen.add(name)
                parents = name.split("/")[:-1]
                ancestors = {"/".join(parents[: i + 1]) for i in range(len(parents))}
                if ancestors & files:
                    raise UnsafeArchiveError(f"archive member {name!r} is inside a file")
                if member.type == tarfile.DIRTYPE:
                    dirs |= ancestors | {name}
                    (staging / name).mkdir(parents=True, exist_ok=True)
                    continue
                if member.type not in (tarfile.REGTYPE, tarfile.AREGTYPE) or member.sparse:
                    raise UnsafeArchiveError(
                        f"archive member {name!r} is a {_member_kind(member)}; only regular "
                        "files and directories are allowed"
                    )
                if name in dirs:
                    raise UnsafeArchiveError(f"archive member {name!r} is also a directory")
                if member.size > max_member_bytes:
                    raise UnsafeArchiveError(
                        f"archive member {name!r} declares {member.size} bytes; the limit is "
                        f"{max_member_bytes}"
                    )
                declared_total += member.size
                if declared_total > max_total_bytes:
                    raise UnsafeArchiveError(
                        f"archive declares more than {max_total_bytes} bytes in all"
                    )
                dirs |= ancestors
                _copy_member(tar, member, staging, name)
                files.add(name)
            _check_trailer(fh, tar.offset)
    # tarfile reports most malformed input as TarError, but some (a bad sparse map, a NUL in a
    # PAX path, a deep chain of extended headers) as ValueError or RecursionError.
    except (tarfile.TarError, ValueError, RecursionError) as exc:
        raise UnsafeArchiveError(f"not a valid tar archive: {exc}") from None
    return sorted(files)


def _copy_member(tar: tarfile.TarFile, member: tarfile.TarInfo, staging: Path, name: str) -> None:
    """Copy one regular member's bytes into a new 0o644 file, counting what was actually read."""
    src = tar.extractfile(member)
    if src is None:  # only for non-regular members, which were refused already
        raise UnsafeArchiveError(f"archive member {name!r} has no data")
    target = staging / name
    target.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    os.fchmod(fd, 0o644)  # whatever the umask
    copied = 0
    with src, os.fdopen(fd, "wb") as dst:
        while chunk := src.read(min(_CHUNK_BYTES, member.size - copied + 1)):
            copied += len(chunk)
            if copied > member.size:
                raise UnsafeArchiveError(f"archive member {name!r} is longer than it declares")
            dst.write(chunk)
        if copied != member.size:
            raise UnsafeArchiveError(
                f"archive member {name!r} declares {member.size} bytes; got {copied}"
            )
        dst.flush()
        os.fsync(dst.fileno())


def _check_trailer(fh: IO[bytes], offset: int) -> None:
    """After the last member only zero blocks may follow, at least the 1024-byte marker."""
    end = fh.seek(0, os.SEEK_END)
    trailer = end - offset
    if trailer < 2 * tarfile.BLOCKSIZE:
        raise UnsafeArchiveError("archive is truncated: the end-of-archive marker is missing")
    if trailer > _MAX_TRAILER_BYTES:
        raise UnsafeArchiveError(f"archive has {trailer} bytes after its last member")
    fh.seek(offset)
    if fh.read(trailer).strip(b"\x00"):
        raise UnsafeArchiveError("archive has data after its end-of-archive marker")


def _add_file(tar: tarfile.TarFile, root: Path, name: str) -> None:
    info = tarfile.TarInfo(name)
    info.type = tarfile.REGTYPE
    info.mode = 0o644
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    fd = os.open(root / name, os.O_RDONLY | os.O_NOFOLLOW)
    with os.fdopen(fd, "rb") as src:
        st = os.fstat(src.fileno())
        if not stat.S_ISREG(st.st_mode):  # replaced since the walk
            raise UnsafeArchiveError(f"{root / name} is no longer a regular file")
        info.size = st.st_size
        tar.addfile(info, src)


def _sha256(fh: IO[bytes]) -> tuple[str, int]:
    h = hashlib.sha256()
    length = 0
    while chunk := fh.read(_CHUNK_BYTES):
        h.update(chunk)
        length += len(chunk)
    return h.hexdigest(), length


def _kind(mode: int) -> str:
    kinds = {
        stat.S_ISLNK: "symlink",
        stat.S_ISFIFO: "FIFO",
        stat.S_ISCHR: "character device",
        stat.S_ISBLK: "block device",
        stat.S_ISSOCK: "socket",
    }
    return next((kind for test, kind in kinds.items() if test(mode)), "special file")


def _member_kind(member: tarfile.TarInfo) -> str:
    if member.issym():
        return "symlink"
    if member.islnk():
        return "hardlink"
    if member.ischr() or member.isblk():
        return "device"
    if member.isfifo():
        return "FIFO"
    if member.sparse:
        return "sparse file"
    return f"member of type {member.type!r}"
