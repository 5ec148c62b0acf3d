"""`control-plane rotate bundle-key`: stored bundles re-encrypted to a new key, resumable after
an interruption, while the running control plane keeps serving them; an agent installs a
bundle afterwards."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from edgefleet.v1 import admin_pb2

from control_plane.cli import main as cp_main
from control_plane.config import ControlPlaneConfig
from control_plane.ops.rotate_bundle_key import rotate_bundle_key
from control_plane.storage.blobs import key_id, old_key_path
from tests.support import WAIT, RunningControlPlane, start_agent
from tests.test_delivery import _bundle_for, _committed, _fleet, _wait_models


class Interrupted(Exception):
    pass


def _served(cp: RunningControlPlane, digest: str, length: int) -> str:
    """The running control plane's blob store reads the whole bundle; its digest."""
    h = hashlib.sha256()
    for piece in cp.cp.services.ctx.blobs.read(digest, length, 0, length):
        h.update(piece)
    return "sha256:" + h.hexdigest()


def test_rotate_bundle_key_resumes_after_an_interruption_and_agents_still_install(
    cp_any: RunningControlPlane, tmp_path: Path, trained_bundle: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    cp = cp_any  # the agent at the end installs over gRPC and over MQTT
    for version in (1, 2, 3):
        bundle = _bundle_for(cp, trained_bundle, tmp_path / f"v{version}", version=version)
        assert _fleet(cp, "models", "publish", str(bundle)) == 0
    models = {(m.digest, m.length) for m in cp.admin_stub().ListModels(
        admin_pb2.ListModelsRequest(), timeout=WAIT).models}
    assert len(models) == 3
    cfg = ControlPlaneConfig.load(cp.home)
    key_file = cfg.layout.blob_key
    first_key = key_file.read_bytes()

    # Runbook "Rotate the bundle key" (docs/operator-guide.md), interrupted after one blob.
    done: list[str] = []

    def interrupt(digest: str) -> None:
        done.append(digest)
        raise Interrupted

    with pytest.raises(Interrupted):
        rotate_bundle_key(cfg, after_each=interrupt)
    assert old_key_path(key_file).read_bytes() == first_key  # kept until every blob is done
    new_key = key_file.read_bytes()
    assert new_key != first_key
    store = cp.cp.services.ctx.blobs
    kids = {d: store.key_of(d) for d, _ in models}
    assert sorted(kids.values()).count(key_id(new_key)) == 1  # one blob moved so far
    # Meanwhile the running control plane serves every bundle, under either key.
    for digest, length in models:
        assert _served(cp, digest, length) == digest

    # The rerun (the CLI) finishes it and deletes the old key.
    capsys.readouterr()
    assert cp_main(["rotate", "bundle-key", "--home", str(cp.home)]) == 0
    out = capsys.readouterr().out
    assert "an interrupted rotation finished" in out and "2 of 3" in out
    assert not old_key_path(key_file).exists()
    assert key_file.read_bytes() == new_key
    assert {store.key_of(d) for d, _ in models} == {key_id(new_key)}
    for digest, length in models:
        assert _served(cp, digest, length) == digest
    events = [e for e in cp.admin_stub().ListAuditEvents(
        admin_pb2.ListAuditEventsRequest(limit=1000), timeout=WAIT).events
        if e.action == "keys.rotate-bundle-key"]
    assert [(e.actor, e.outcome) for e in events] == [("control-plane", "allowed")]
    detail = json.loads(events[0].detail)
    assert (detail["key_id"], detail["previous_key_id"], detail["resumed"]) == (
        key_id(new_key).hex(), key_id(first_key).hex(), True)

    # An agent installs a bundle from the re-encrypted store; a bundle published now is
    # sealed with the new key.
    cp.enroll_agent(tmp_path / "a")
    assert _fleet(cp, "rollouts", "start", "--model", "digits", "--version", "3") == 0
    agent = start_agent(tmp_path / "a", cp.loop, probation_seconds=0.0, transport=cp.transport)
    try:
        _wait_models(agent, _committed(3))
    finally:
        agent.stop()
    bundle = _bundle_for(cp, trained_bundle, tmp_path / "v4", version=4)
    assert _fleet(cp, "models", "publish", str(bundle)) == 0
    v4 = cp.admin_stub().GetModel(admin_pb2.GetModelRequest(name="digits", version=4),
                                  timeout=WAIT)
    assert store.key_of(v4.digest) == key_id(new_key)


def test_a_second_rotation_after_a_finished_one_makes_another_key(
    cp: RunningControlPlane, tmp_path: Path, trained_bundle: Path,
) -> None:
    bundle = _bundle_for(cp, trained_bundle, tmp_path / "v1")
    assert _fleet(cp, "models", "publish", str(bundle)) == 0
    cfg = ControlPlaneConfig.load(cp.home)
    first = rotate_bundle_key(cfg)
    second = rotate_bundle_key(cfg)
    assert not first.resumed and not second.resumed
    assert second.previous_key_id == first.key_id != second.key_id
    assert (first.resealed, second.resealed) == (1, 1)


def test_blobs_written_before_key_ids_are_read_and_re_encrypted(tmp_path: Path) -> None:
    """An EFB1 blob (no key id in its header: what stores held before rotation existed)."""
    import secrets  # noqa: PLC0415
    import struct  # noqa: PLC0415

    from cryptography.hazmat.primitives.ciphers.aead import AESGCM  # noqa: PLC0415

    from control_plane.storage.blobs import HEADER_V1, MAGIC_V1, BlobStore  # noqa: PLC0415

    old, new = secrets.token_bytes(32), secrets.token_bytes(32)
    data = secrets.token_bytes(2500)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    prefix = secrets.token_bytes(8)
    sealed = [AESGCM(old).encrypt(prefix + struct.pack(">I", i), data[i * 1000:(i + 1) * 1000],
                                  digest.encode() + struct.pack(">I?", i, i == 2))
              for i in range(3)]
    (tmp_path / digest[7:]).write_bytes(HEADER_V1.pack(MAGIC_V1, 1000, prefix) + b"".join(sealed))
    store = BlobStore(tmp_path, new, chunk_size=1000)
    store.use_key(old)
    assert b"".join(store.read(digest, 2500, 1500, 1000)) == data[1500:2500]
    store.use_key(new)
    assert store.key_of(digest) == b""
    assert store.reseal(digest) and store.key_of(digest) == key_id(new)
    assert not store.reseal(digest)
    assert b"".join(BlobStore(tmp_path, new, chunk_size=1000).read(digest, 2500, 0, 2500)) == data


def test_rotate_bundle_key_killed_with_sigkill_midway_is_finished_by_a_rerun(
    cp: RunningControlPlane, tmp_path: Path, trained_bundle: Path,
) -> None:
    """kill -9 of the rotation process right after its first blob: a rerun finishes it."""
    import signal  # noqa: PLC0415
    import subprocess  # noqa: PLC0415
    import sys  # noqa: PLC0415

    for version in (1, 2):
        bundle = _bundle_for(cp, trained_bundle, tmp_path / f"v{version}", version=version)
        assert _fleet(cp, "models", "publish", str(bundle)) == 0
    script = (
        "import os, signal, sys\n"
        "from control_plane.config import ControlPlaneConfig\n"
        "from control_plane.ops.rotate_bundle_key import rotate_bundle_key\n"
        "rotate_bundle_key(ControlPlaneConfig.load(sys.argv[1]),\n"
        "                  after_each=lambda d: os.kill(os.getpid(), signal.SIGKILL))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script, str(cp.home)], check=False,
                          timeout=WAIT)
    assert proc.returncode == -signal.SIGKILL
    key_file = ControlPlaneConfig.load(cp.home).layout.blob_key
    assert old_key_path(key_file).exists()
    store = cp.cp.services.ctx.blobs
    digests = [m.digest for m in cp.cp.store.list_model_versions()]
    assert len({store.key_of(d) for d in digests}) == 2  # half done
    assert cp_main(["rotate", "bundle-key", "--home", str(cp.home)]) == 0
    assert not old_key_path(key_file).exists()
    assert {store.key_of(d) for d in digests} == {key_id(key_file.read_bytes())}
    for m in cp.cp.store.list_model_versions():
        assert _served(cp, m.digest, m.length) == m.digest
