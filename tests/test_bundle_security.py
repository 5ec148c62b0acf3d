"""Security tests of the bundle archive and of bundle verification, named after the attacks.

A real bundle is built in ``tmp_path`` and signed with the trainer's signer; hostile tars are
crafted in memory with ``tarfile``. After each refused extraction the destination does not exist
and its parent holds exactly what it held before (no staging directory, nothing that escaped);
after each refused verification the bundle's bytes are what they were before the call.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from fleetcore import pki
from fleetcore.archive import (
    MAX_ARCHIVE_MEMBERS,
    UnsafeArchiveError,
    pack_bundle,
    safe_extract,
)
from fleetcore.bundle import BUNDLE_FORMAT, MANIFEST, MODEL_ONNX, PROFILE, SIGNATURE
from fleetcore.bundle_verify import MAX_SIGNATURE_BYTES, verify_bundle_dir
from fleetcore.errors import (
    AlreadyExistsError,
    BadSignatureError,
    InvalidInputError,
    UntrustedInputError,
)
from trainer.bundle import sign_bundle

CLI = Path(sys.executable).parent / "model_signing"


# --- fixtures ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Publisher:
    private_key: Path  # PEM file, as the trainer and the CLI take it
    public_key: Path
    public_pem: bytes


def make_publisher(directory: Path, name: str) -> Publisher:
    key = pki.generate_key()
    directory.mkdir(parents=True, exist_ok=True)
    private, public = directory / f"{name}.key.pem", directory / f"{name}.pub.pem"
    private.write_bytes(pki.private_key_pem(key))
    public.write_bytes(pki.public_key_pem(key))
    return Publisher(private, public, public.read_bytes())


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def manifest_for(bundle: Path, **overrides: Any) -> dict[str, Any]:
    """A minimal manifest that ``parse_manifest`` accepts, with a files table like the trainer's."""
    doc: dict[str, Any] = {
        "format": BUNDLE_FORMAT,
        "name": "digits",
        "version": 3,
        "created": "2025-06-15T12:00:00Z",
        "input": {"features": [{"name": "x0", "dtype": "float32", "pii": False}], "shape": [1]},
        "output": {"labels": ["no", "yes"]},
        "metrics": {"accuracy": 0.97},
        "lineage": {"dataset": "ds-1", "run": "run-1"},
        "compression": {"recipe": "int8"},
        "runtime": {"threads": 1},
        "smoke_test": {"inputs": [[0.0]], "expected": [0], "tolerance": 0.0},
    }
    if "files" not in overrides:
        doc["files"] = {
            name: {"sha256": sha256_hex(data), "size": len(data)}
            for name in (MODEL_ONNX, PROFILE)
            for data in [(bundle / name).read_bytes()]
        }
    doc.update(overrides)
    return doc


def write_manifest(bundle: Path, doc: dict[str, Any]) -> None:
    (bundle / MANIFEST).write_text(json.dumps(doc, indent=2, sort_keys=True))


@pytest.fixture
def publisher(tmp_path: Path) -> Publisher:
    return make_publisher(tmp_path / "keys", "publisher")


@pytest.fixture
def bundle(tmp_path: Path, publisher: Publisher) -> Path:
    path = tmp_path / "bundle"
    path.mkdir()
    (path / MODEL_ONNX).write_bytes(bytes(range(256)) * 9 + b"onnx-tail")
    (path / PROFILE).write_text(json.dumps({"x0": {"mean": 0.5, "std": 0.1}}))
    write_manifest(path, manifest_for(path))
    sign_bundle(path, publisher.private_key)
    return path


def snapshot(root: Path) -> dict[str, object]:
    """Every entry under ``root`` (links not followed): bytes, link target or 'dir'."""
    state: dict[str, object] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            rel = path.relative_to(root).as_posix()
            if path.is_symlink():
                state[rel] = ("link", os.readlink(path))
            elif path.is_dir():
                state[rel] = "dir"
            elif path.is_file():
                state[rel] = path.read_bytes()
            else:
                state[rel] = "special"
    return state


def verify_unchanged(bundle: Path, keys: list[bytes]) -> dict[str, Any]:
    """``verify_bundle_dir``, asserting that it left the bundle as it found it."""
    before = snapshot(bundle)
    try:
        return verify_bundle_dir(bundle, keys)
    finally:
        assert snapshot(bundle) == before


# --- hostile archives -------------------------------------------------------------------------

Member = tuple[tarfile.TarInfo, bytes | None]


def member(
    name: str, data: bytes = b"", *, kind: bytes = tarfile.REGTYPE, linkname: str = ""
) -> Member:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    return info, (data if kind == tarfile.REGTYPE else None)


def tar_bytes(*members: Member) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def assert_refused(tmp_path: Path, blob: bytes, match: str | None = None, **limits: int) -> None:
    """Extraction of ``blob`` raises UnsafeArchiveError and leaves nothing behind."""
    archive = tmp_path / "hostile.tar"
    archive.write_bytes(blob)
    parent = tmp_path / "install"
    parent.mkdir(exist_ok=True)
    before = {path: sorted(os.listdir(path)) for path in (tmp_path, parent)}
    dest = parent / "bundle"
    with pytest.raises(UnsafeArchiveError, match=match):
        safe_extract(archive, dest, **limits)
    assert not os.path.lexists(dest)
    assert {path: sorted(os.listdir(path)) for path in (tmp_path, parent)} == before


@pytest.mark.parametrize(
    "name", ["../evil", "/etc/passwd", "a/../../b", "", "./a", "a//b", "a\\..\\b", "x" * 300]
)
def test_path_traversal_member_refused(tmp_path: Path, bundle: Path, name: str) -> None:
    assert_refused(tmp_path, tar_bytes(member("ok.txt", b"1"), member(name, b"evil")))


@pytest.mark.parametrize("target", ["/etc/passwd", "../../outside", "ok.txt"])
def test_symlink_member_refused(tmp_path: Path, bundle: Path, target: str) -> None:
    blob = tar_bytes(member("ok.txt", b"1"), member("link", kind=tarfile.SYMTYPE, linkname=target))
    assert_refused(tmp_path, blob, match="symlink")


@pytest.mark.parametrize("target", ["/etc/passwd", "ok.txt"])
def test_hardlink_member_refused(tmp_path: Path, bundle: Path, target: str) -> None:
    blob = tar_bytes(member("ok.txt", b"1"), member("link", kind=tarfile.LNKTYPE, linkname=target))
    assert_refused(tmp_path, blob, match="hardlink")


@pytest.mark.parametrize(
    "kind",
    [tarfile.CHRTYPE, tarfile.BLKTYPE, tarfile.FIFOTYPE],
    ids=["char-device", "block-device", "fifo"],
)
def test_device_and_fifo_members_refused(tmp_path: Path, bundle: Path, kind: bytes) -> None:
    assert_refused(tmp_path, tar_bytes(member("dev", kind=kind)), match="device|FIFO")


@pytest.mark.parametrize(
    "kind",
    [tarfile.CONTTYPE, tarfile.GNUTYPE_SPARSE, b"Z"],
    ids=["contiguous", "sparse", "unknown"],
)
def test_other_member_types_refused(tmp_path: Path, bundle: Path, kind: bytes) -> None:
    info = tarfile.TarInfo("odd")
    info.type = kind
    blob = info.tobuf(tarfile.GNU_FORMAT) + b"\0" * (2 * tarfile.BLOCKSIZE)
    assert_refused(tmp_path, blob)


@pytest.mark.parametrize(
    "members",
    [
        [member("a", b"1"), member("a", b"2")],
        [member("d", kind=tarfile.DIRTYPE), member("d", kind=tarfile.DIRTYPE)],
        [member("a", b"1"), member("a/b", b"2")],  # a file used as a directory
        [member("a/b", b"1"), member("a", b"2")],  # a directory overwritten by a file
    ],
    ids=["same-file", "same-dir", "file-then-child", "child-then-file"],
)
def test_duplicate_member_refused(tmp_path: Path, bundle: Path, members: list[Member]) -> None:
    assert_refused(tmp_path, tar_bytes(*members))


def test_too_many_members_refused(tmp_path: Path, bundle: Path) -> None:
    four = tar_bytes(*(member(f"f{i}", b"x") for i in range(4)))
    assert_refused(tmp_path, four, match="more than 3 members", max_members=3)
    many = tar_bytes(*(member(f"f{i}", b"") for i in range(MAX_ARCHIVE_MEMBERS + 1)))
    assert_refused(tmp_path, many, match=f"more than {MAX_ARCHIVE_MEMBERS} members")


def test_oversized_member_refused(tmp_path: Path, bundle: Path) -> None:
    assert_refused(
        tmp_path,
        tar_bytes(member("big", b"x" * 100)),
        match="declares 100 bytes",
        max_member_bytes=99,
    )
    # A header that declares a terabyte with hardly any data behind it: refused unread.
    huge = tarfile.TarInfo("huge")
    huge.size = 1 << 40
    blob = huge.tobuf(tarfile.PAX_FORMAT) + b"x" * tarfile.BLOCKSIZE
    assert_refused(tmp_path, blob, match="declares", max_member_bytes=1 << 20)
    two = tar_bytes(member("a", b"x" * 60), member("b", b"x" * 60))
    assert_refused(tmp_path, two, match="in all", max_member_bytes=100, max_total_bytes=100)
    # tarfile would read a PAX header's whole body into memory.
    fat = tarfile.TarInfo("fat")
    fat.pax_headers = {"comment": "x" * 100_000}
    assert_refused(tmp_path, tar_bytes((fat, b"")), match="extended tar header")


def test_truncated_archive_refused(tmp_path: Path, bundle: Path) -> None:
    whole = tmp_path / "whole.tar"
    pack_bundle(bundle, whole)
    data = whole.read_bytes()
    whole.unlink()
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        members = tar.getmembers()
        end = tar.offset
    cuts = {
        "mid-header": 100,
        "mid-data": members[0].offset_data + 1,
        "between-members": members[1].offset,
        "no-end-marker": end,
        "half-end-marker": end + tarfile.BLOCKSIZE,
    }
    for cut in cuts.values():
        assert_refused(tmp_path, data[:cut])


@pytest.mark.parametrize(
    "blob",
    [
        b"",
        b"not a tar archive\n" * 100,
        bytes(range(256)) * 40,
        gzip.compress(tar_bytes(member("a", b"1")), mtime=0),
        tar_bytes(member("a", b"1")) + b"trailing garbage",
    ],
    ids=["empty", "text", "binary", "gzip", "trailing-garbage"],
)
def test_garbage_archive_refused(tmp_path: Path, bundle: Path, blob: bytes) -> None:
    assert_refused(tmp_path, blob)


def test_existing_destination_refused(tmp_path: Path, bundle: Path) -> None:
    archive = tmp_path / "bundle.tar"
    pack_bundle(bundle, archive)
    dest = tmp_path / "installed"
    dest.mkdir()
    (dest / "keep").write_bytes(b"old")
    with pytest.raises(AlreadyExistsError):
        safe_extract(archive, dest)
    assert snapshot(dest) == {"keep": b"old"}


# --- packing ----------------------------------------------------------------------------------


def test_archive_round_trip(tmp_path: Path, bundle: Path, publisher: Publisher) -> None:
    first, second = tmp_path / "a" / "bundle.tar", tmp_path / "b" / "bundle.tar"
    digest, length = pack_bundle(bundle, first)
    assert pack_bundle(bundle, second) == (digest, length)
    data = first.read_bytes()
    assert data == second.read_bytes()
    assert (digest, length) == ("sha256:" + sha256_hex(data), len(data))
    with tarfile.open(first) as tar:
        infos = tar.getmembers()
    assert [i.name for i in infos] == sorted([MANIFEST, MODEL_ONNX, PROFILE, SIGNATURE])
    assert {(i.type, i.mode, i.mtime, i.uid, i.gid, i.uname, i.gname) for i in infos} == {
        (tarfile.REGTYPE, 0o644, 0, 0, 0, "", "")
    }

    dest = tmp_path / "installed" / "bundle"
    names = safe_extract(first, dest)
    assert names == [i.name for i in infos]
    assert snapshot(dest) == snapshot(bundle)
    assert {(dest / n).stat().st_mode & 0o777 for n in names} == {0o644}
    assert sorted(os.listdir(dest.parent)) == ["bundle"]
    verify_unchanged(dest, [publisher.public_pem])
    # The digest depends on the contents only, not on where or when they were written.
    assert pack_bundle(dest, tmp_path / "c.tar") == (digest, length)


def test_archive_round_trip_nested_directories(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "sub" / "deeper").mkdir(parents=True)
    (src / "sub" / "deeper" / "wéights.bin").write_bytes(b"\x00\x01" * 5000)
    (src / "sub" / "empty.txt").write_bytes(b"")
    (src / "top.txt").write_bytes(b"top")
    digest, _ = pack_bundle(src, tmp_path / "x.tar")
    dest = tmp_path / "out"
    assert safe_extract(tmp_path / "x.tar", dest) == [
        "sub/deeper/wéights.bin",
        "sub/empty.txt",
        "top.txt",
    ]
    assert snapshot(dest) == snapshot(src)
    assert pack_bundle(dest, tmp_path / "y.tar")[0] == digest


@pytest.mark.parametrize("special", ["symlink", "dir-symlink", "fifo"])
def test_pack_refuses_symlink_in_source(tmp_path: Path, bundle: Path, special: str) -> None:
    if special == "symlink":
        (bundle / "link.onnx").symlink_to(bundle / MODEL_ONNX)
    elif special == "dir-symlink":
        (bundle / "etc").symlink_to("/etc")
    else:
        os.mkfifo(bundle / "pipe")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(UnsafeArchiveError):
        pack_bundle(bundle, out_dir / "bundle.tar")
    assert os.listdir(out_dir) == []


# --- verification -----------------------------------------------------------------------------


def test_good_bundle_verifies(bundle: Path, publisher: Publisher) -> None:
    manifest = verify_unchanged(bundle, [publisher.public_pem])
    assert (manifest["name"], manifest["version"]) == ("digits", 3)


def test_prefixed_digests_in_files_table_verify(bundle: Path, publisher: Publisher) -> None:
    doc = manifest_for(bundle)
    for entry in doc["files"].values():
        entry["sha256"] = "sha256:" + entry["sha256"]
    write_manifest(bundle, doc)
    sign_bundle(bundle, publisher.private_key)
    verify_unchanged(bundle, [publisher.public_pem])


@pytest.mark.parametrize("position", ["first", "middle", "last"])
@pytest.mark.parametrize("name", [MANIFEST, MODEL_ONNX, PROFILE])
def test_flipped_byte_in_any_file_fails(
    bundle: Path, publisher: Publisher, name: str, position: str
) -> None:
    data = bytearray((bundle / name).read_bytes())
    index = {"first": 0, "middle": len(data) // 2, "last": len(data) - 1}[position]
    data[index] ^= 0x01
    (bundle / name).write_bytes(bytes(data))
    with pytest.raises(BadSignatureError, match="any of the 1 trusted publisher key"):
        verify_unchanged(bundle, [publisher.public_pem])


@pytest.mark.parametrize(
    "extra", ["extra.bin", "nested/extra.bin", ".gitignore", ".git/config", ".github/workflow.yml"]
)
def test_extra_file_fails(bundle: Path, publisher: Publisher, extra: str) -> None:
    # The library skips git files by itself; an unsigned file must still not get through.
    (bundle / extra).parent.mkdir(parents=True, exist_ok=True)
    (bundle / extra).write_bytes(b"not signed")
    with pytest.raises(BadSignatureError):
        verify_unchanged(bundle, [publisher.public_pem])


@pytest.mark.parametrize("name", [PROFILE, MODEL_ONNX, MANIFEST, SIGNATURE])
def test_missing_file_fails(bundle: Path, publisher: Publisher, name: str) -> None:
    (bundle / name).unlink()
    with pytest.raises(UntrustedInputError):
        verify_unchanged(bundle, [publisher.public_pem])


def test_untrusted_publisher_key_fails(tmp_path: Path, bundle: Path) -> None:
    other = make_publisher(tmp_path / "keys", "other")
    with pytest.raises(BadSignatureError, match="any of the 1 trusted publisher key"):
        verify_unchanged(bundle, [other.public_pem])
    with pytest.raises(BadSignatureError, match="no trusted publisher keys"):
        verify_unchanged(bundle, [])


def test_any_trusted_key_passes(tmp_path: Path, bundle: Path, publisher: Publisher) -> None:
    other = make_publisher(tmp_path / "keys", "other")
    keys = [b"not a PEM key", other.public_pem, publisher.public_pem]
    assert verify_unchanged(bundle, keys)["name"] == "digits"


def test_bundle_signed_by_untrusted_key_fails(
    tmp_path: Path, bundle: Path, publisher: Publisher
) -> None:
    """An attacker who can write the bundle re-signs it with their own key."""
    attacker = make_publisher(tmp_path / "keys", "attacker")
    (bundle / MODEL_ONNX).write_bytes(b"backdoored model")
    write_manifest(bundle, manifest_for(bundle))
    sign_bundle(bundle, attacker.private_key)
    with pytest.raises(BadSignatureError):
        verify_unchanged(bundle, [publisher.public_pem])


@pytest.mark.parametrize("special", ["file-symlink", "dir-symlink", "fifo"])
def test_symlink_in_bundle_fails(
    tmp_path: Path, bundle: Path, publisher: Publisher, special: str
) -> None:
    if special == "file-symlink":
        outside = tmp_path / "profile-elsewhere.json"
        outside.write_bytes((bundle / PROFILE).read_bytes())
        (bundle / PROFILE).unlink()
        (bundle / PROFILE).symlink_to(outside)
    elif special == "dir-symlink":
        (bundle / "data").symlink_to(tmp_path / "keys", target_is_directory=True)
    else:
        os.mkfifo(bundle / "pipe")
    with pytest.raises(InvalidInputError, match="only regular files"):
        verify_unchanged(bundle, [publisher.public_pem])


@pytest.mark.parametrize(
    "table",
    [
        {MODEL_ONNX: {"sha256": "0" * 64, "size": 2313}},
        {MODEL_ONNX: {"sha256": sha256_hex(b"x"), "size": 1}},
        {"ghost.bin": {"sha256": "0" * 64, "size": 0}},
        {"../keys/publisher.pub.pem": {"sha256": "0" * 64, "size": 0}},
        {MODEL_ONNX: {"sha256": "0" * 64}},
        {MODEL_ONNX: {"sha256": "0" * 64, "size": True}},
        [MODEL_ONNX],
    ],
    ids=[
        "wrong-digest",
        "wrong-size",
        "absent-file",
        "outside-file",
        "no-size",
        "bool-size",
        "not-an-object",
    ],
)
def test_manifest_files_table_mismatch_fails(
    bundle: Path, publisher: Publisher, table: object
) -> None:
    write_manifest(bundle, manifest_for(bundle, files=table))
    sign_bundle(bundle, publisher.private_key)  # the signature is good; the manifest is not
    with pytest.raises(InvalidInputError, match="manifest") as excinfo:
        verify_unchanged(bundle, [publisher.public_pem])
    assert not isinstance(excinfo.value, BadSignatureError)


@pytest.mark.parametrize(
    "content",
    [b"{not json", b"[]", json.dumps({"format": BUNDLE_FORMAT}).encode()],
    ids=["not-json", "not-an-object", "missing-fields"],
)
def test_bad_manifest_fails(bundle: Path, publisher: Publisher, content: bytes) -> None:
    (bundle / MANIFEST).write_bytes(content)
    sign_bundle(bundle, publisher.private_key)  # proves the manifest check runs after signing
    with pytest.raises(InvalidInputError, match="manifest") as excinfo:
        verify_unchanged(bundle, [publisher.public_pem])
    assert not isinstance(excinfo.value, BadSignatureError)


@pytest.mark.parametrize(
    "content",
    [b"", b"{}", b'{"dsseEnvelope": {"payload": "!!"}}', b"x" * (MAX_SIGNATURE_BYTES + 1)],
    ids=["empty", "no-envelope", "bad-base64", "oversized"],
)
def test_malformed_signature_fails(bundle: Path, publisher: Publisher, content: bytes) -> None:
    (bundle / SIGNATURE).write_bytes(content)
    with pytest.raises(UntrustedInputError):
        verify_unchanged(bundle, [publisher.public_pem])


def test_signature_with_duplicate_keys_fails(bundle: Path, publisher: Publisher) -> None:
    """Two parsers must never read two different payloads from one signature file."""
    text = (bundle / SIGNATURE).read_text()
    doctored = text.replace('"dsseEnvelope":', '"dsseEnvelope": {}, "dsseEnvelope":', 1)
    assert doctored != text
    (bundle / SIGNATURE).write_text(doctored)
    with pytest.raises(BadSignatureError, match="duplicate key"):
        verify_unchanged(bundle, [publisher.public_pem])


# --- interoperability with the reference CLI --------------------------------------------------


def test_directory_signed_by_reference_cli_verifies(tmp_path: Path, publisher: Publisher) -> None:
    model = tmp_path / "model"
    (model / "extra").mkdir(parents=True)
    (model / MODEL_ONNX).write_bytes(b"onnx bytes")
    (model / "extra" / "vocab.txt").write_text("a\nb\n")
    write_manifest(model, manifest_for(model, files={}))
    result = subprocess.run(
        [
            str(CLI),
            "sign",
            "key",
            str(model),
            "--signature",
            str(model / SIGNATURE),
            "--private_key",
            str(publisher.private_key),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert verify_unchanged(model, [publisher.public_pem])["name"] == "digits"


def test_trainer_bundle_verifies_with_reference_cli(bundle: Path, publisher: Publisher) -> None:
    def cli_verify() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                str(CLI),
                "verify",
                "key",
                str(bundle),
                "--signature",
                str(bundle / SIGNATURE),
                "--public_key",
                str(publisher.public_key),
            ],
            capture_output=True,
            text=True,
            check=False,
        )

    good = cli_verify()
    assert good.returncode == 0, good.stdout + good.stderr
    (bundle / PROFILE).write_text("{}")
    assert cli_verify().returncode != 0
