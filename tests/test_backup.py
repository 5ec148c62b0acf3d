"""Backup of a serving control plane and restore into a new home: nothing lost, nothing
unsafe unpacked, a tampered archive refused before anything is left behind."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest

from control_plane.cli import main as cp_main
from control_plane.config import ControlPlaneConfig
from control_plane.domain.audit_chain import verify_chain
from control_plane.ops.backup import BACKUP_MANIFEST, backup, restore
from control_plane.server import ControlPlane
from fleet.cli import main as fleet_main
from fleetcore.errors import AlreadyExistsError, InvalidInputError
from tests.support import LoopThread, RunningControlPlane, start_control_plane
from tests.test_delivery import _bundle_for


def _fleet(cp: RunningControlPlane, *args: str) -> int:
    return fleet_main(["--config", str(cp.home / "operators/admin/fleet.toml"), "--api", cp.api,
                       *args])


def test_backup_while_serving_restores_into_a_working_home(
    tmp_path: Path, loop: LoopThread, trained_bundle: Path
) -> None:
    cp = start_control_plane(tmp_path / "cp", loop)
    try:
        device = cp.enroll_agent(tmp_path / "a", labels={"site": "paris"}).device_id
        assert _fleet(cp, "models", "publish", str(_bundle_for(cp, trained_bundle,
                                                                tmp_path / "v1"))) == 0
        archive = tmp_path / "backups" / "cp.tar.gz"
        assert cp_main(["backup", "--home", str(cp.home), "--out", str(archive)]) == 0  # live
        assert archive.stat().st_mode & 0o777 == 0o600
        with pytest.raises(InvalidInputError, match="outside the home"):
            backup(cp.home, cp.home / "inside.tar.gz")
    finally:
        cp.stop()

    home = tmp_path / "restored"
    assert cp_main(["restore", "--archive", str(archive), "--home", str(home)]) == 0
    assert not (home / BACKUP_MANIFEST).exists()
    assert (home / "pki" / "ca.key").stat().st_mode & 0o777 == 0o600
    restored = ControlPlane(ControlPlaneConfig.load(home))
    try:
        store = restored.store
        assert store.get_device(device) is not None
        mv = store.get_model_version("digits", 1)
        assert mv is not None
        data = b"".join(restored.services.ctx.blobs.read(mv.digest, mv.length, 0, mv.length))
        assert len(data) == mv.length  # the encrypted blob decrypts with the restored key
        chain = store.audit_chain()
        assert verify_chain(chain).ok
        assert [e.action for e in chain][-3:] == ["tokens.create", "devices.enroll",
                                                  "models.publish"]
    finally:
        restored.store.close()
    with pytest.raises(AlreadyExistsError):
        restore(archive, home)  # never over an existing home


def _evil_archive(path: Path, name: str) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo(BACKUP_MANIFEST)
        data = json.dumps({"format": "edgefleet.backup/v1", "files": {}, "audit": {},
                           "database": "edgefleet.db"}).encode()
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
        evil = tarfile.TarInfo(name)
        evil.size = 4
        tar.addfile(evil, io.BytesIO(b"evil"))
    return path


@pytest.mark.parametrize("name", ["../escaped", "/abs/escaped"])
def test_an_archive_that_escapes_its_home_is_refused_and_leaves_nothing(
    tmp_path: Path, name: str
) -> None:
    archive = _evil_archive(tmp_path / "evil.tar.gz", name)
    home = tmp_path / "new" / "home"
    with pytest.raises(InvalidInputError):
        restore(archive, home)
    assert not home.exists()
    assert not (tmp_path / "new" / "escaped").exists() and not Path("/abs/escaped").exists()
    assert list((tmp_path / "new").iterdir()) == []  # no staging left behind


def test_a_tampered_archive_is_refused(tmp_path: Path, loop: LoopThread) -> None:
    cp = start_control_plane(tmp_path / "cp", loop)
    cp.stop()
    archive = tmp_path / "cp.tar.gz"
    backup(cp.home, archive)
    # Rewrite one member (the release key) without updating the manifest.
    tampered = tmp_path / "tampered.tar.gz"
    with tarfile.open(archive, "r:gz") as src, tarfile.open(tampered, "w:gz") as dst:
        for member in src.getmembers():
            f = src.extractfile(member) if member.isfile() else None
            if member.name == "keys/release.key":
                data = b"not the key"
                member.size = len(data)
                dst.addfile(member, io.BytesIO(data))
            else:
                dst.addfile(member, f)
    with pytest.raises(InvalidInputError, match="does not match"):
        restore(tampered, tmp_path / "home")
    assert not (tmp_path / "home").exists()
