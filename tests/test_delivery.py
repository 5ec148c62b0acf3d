"""Secure model delivery end to end: publish → rollout → signed release → download → install.

Real control plane, real agents, real TLS, real bundles from the trainer.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import grpc
import pytest
from edgefleet.v1 import agent_pb2, agent_pb2_grpc

from edge_agent.cli import main as agent_main
from edge_agent.install.download import fetch_bundle
from edge_agent.transport import MAX_CHUNK_BYTES
from fleet.cli import main as fleet_main
from fleetcore import pki
from fleetcore.archive import pack_bundle
from fleetcore.errors import InvalidInputError, TransportError, UntrustedInputError
from tests.support import (
    WAIT,
    FakeBundleServer,
    LoopThread,
    RunningAgent,
    RunningControlPlane,
    device_credentials,
    start_agent,
)
from trainer.bundle import sign_bundle

MODEL_SIGNING = str(Path(sys.executable).parent / "model_signing")


def _bundle_for(cp: RunningControlPlane, source: Path, dest: Path, version: int = 1) -> Path:
    """A copy of the trained bundle as `version`, signed with the control plane's publisher."""
    shutil.copytree(source, dest)
    manifest = json.loads((dest / "manifest.json").read_text())
    manifest["version"] = version
    (dest / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
    sign_bundle(dest, cp.home / "publisher" / "publisher.key")
    return dest


def _fleet(cp: RunningControlPlane, *args: str) -> int:
    return fleet_main(["--config", str(cp.home / "operators/admin/fleet.toml"), "--api", cp.api,
                       *args])


def _wait_models(agent: RunningAgent, predicate: Any) -> list[dict[str, Any]]:
    while True:
        models = agent.wait_for("models")["models"]
        if predicate(models):
            return models


def _serving(models: list[dict[str, Any]], name: str = "digits") -> dict[str, Any] | None:
    return next((m for m in models if m["name"] == name and m["serving"]), None)


def _committed(version: int) -> Any:
    def check(models: list[dict[str, Any]]) -> bool:
        s = _serving(models)
        return s is not None and s["version"] == version and s["state"] == "committed"
    return check


def test_publish_rollout_installs_and_commits_on_every_matching_agent(
    cp_any: RunningControlPlane, tmp_path: Path, trained_bundle: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    cp = cp_any  # over gRPC and over MQTT
    bundle = _bundle_for(cp, trained_bundle, tmp_path / "v1")
    assert _fleet(cp, "models", "publish", str(bundle), "--json") == 0
    published = json.loads(capsys.readouterr().out)
    assert (published["name"], published["version"]) == ("digits", 1)

    a = cp.enroll_agent(tmp_path / "a", labels={"site": "paris"})
    b = cp.enroll_agent(tmp_path / "b", labels={"site": "paris"})
    c = cp.enroll_agent(tmp_path / "c", labels={"site": "lyon"})
    agents = [start_agent(tmp_path / n, cp.loop, probation_seconds=0.0, transport=cp.transport)
              for n in ("a", "b", "c")]
    try:
        assert _fleet(cp, "rollouts", "start", "--model", "digits", "--version", "1",
                      "--selector", "site=paris") == 0
        for agent in agents[:2]:
            _wait_models(agent, _committed(1))
        # Each agent reports it; the rollout status shows it per device.
        for agent in agents[:2]:
            agent.wait_for("heartbeat")
        capsys.readouterr()
        assert _fleet(cp, "rollouts", "status", "--model", "digits", "--json") == 0
        status = json.loads(capsys.readouterr().out)
        assert {d["id"]: (d["serving_version"], d["state"]) for d in status["devices"]} == {
            a.device_id: (1, "committed"), b.device_id: (1, "committed"),
        }
        assert c.device_id not in {d["id"] for d in status["devices"]}
        assert agents[2].agent.models.active("digits") is None
        # The fleet shows how each device reaches it (from the path, not the agent's word).
        assert _fleet(cp, "devices", "list", "--json") == 0
        seen = {d["id"]: d["transport"] for d in json.loads(capsys.readouterr().out)}
        assert seen[a.device_id] == seen[b.device_id] == cp.transport
        assert _fleet(cp, "devices", "show", a.device_id, "--json") == 0
        shown = json.loads(capsys.readouterr().out)
        assert [(m["name"], int(m["version"]), m["state"], m["serving"])
                for m in shown["models"]] == [("digits", 1, "committed", True)]
        if cp.transport == "mqtt":  # the heartbeats came through the bridge
            assert cp.cp.bridge is not None
            assert cp.cp.bridge.presence.get(a.device_id) is True
            assert agents[0].agent.transport.name == "mqtt"
    finally:
        for agent in agents:
            agent.stop()
    # The agent's own status shows the model and its state.
    assert agent_main(["status", "--state-dir", str(tmp_path / "a"), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [(m["name"], m["version"], m["state"], m["serving"]) for m in doc["models"]] == [
        ("digits", 1, "committed", True)
    ]
    assert doc["release_serial"] >= 1


def test_bundles_are_encrypted_at_rest(cp: RunningControlPlane, tmp_path: Path,
                                       trained_bundle: Path) -> None:
    bundle = _bundle_for(cp, trained_bundle, tmp_path / "v1")
    assert _fleet(cp, "models", "publish", str(bundle)) == 0
    blobs = list((cp.home / "blobs").iterdir())
    assert len(blobs) == 1
    stored = blobs[0].read_bytes()
    onnx = (bundle / "model.onnx").read_bytes()
    assert onnx[:64] not in stored and b"manifest.json" not in stored
    key = cp.home / "keys" / "blob.key"
    assert key.stat().st_mode & 0o777 == 0o600 and len(key.read_bytes()) == 32


def test_untrusted_publisher_is_refused_and_nothing_is_stored(
    cp: RunningControlPlane, tmp_path: Path, trained_bundle: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    bundle = tmp_path / "evil"
    shutil.copytree(trained_bundle, bundle)
    evil = tmp_path / "evil.key"
    evil.write_bytes(pki.private_key_pem(pki.generate_key()))
    sign_bundle(bundle, evil)
    assert _fleet(cp, "models", "publish", str(bundle)) == 1
    assert "trusted publisher" in capsys.readouterr().err
    assert cp.cp.store.list_model_versions() == []
    assert not any((cp.home / "blobs").iterdir()) if (cp.home / "blobs").exists() else True
    assert not any((cp.home / "tmp").iterdir())
    assert cp.cp.store.list_audit(1)[0].outcome == "denied"


def test_same_version_with_other_content_is_refused(
    cp: RunningControlPlane, tmp_path: Path, trained_bundle: Path
) -> None:
    first = _bundle_for(cp, trained_bundle, tmp_path / "one")
    assert _fleet(cp, "models", "publish", str(first)) == 0
    assert _fleet(cp, "models", "publish", str(first)) == 0  # the same bundle again: no-op
    second = tmp_path / "two"
    shutil.copytree(first, second)
    (second / "profile.json").write_text("{}")
    sign_bundle(second, cp.home / "publisher" / "publisher.key")
    assert _fleet(cp, "models", "publish", str(second)) == 1
    assert len(cp.cp.store.list_model_versions()) == 1


def test_viewer_cannot_publish(cp: RunningControlPlane, tmp_path: Path,
                               trained_bundle: Path) -> None:
    assert _fleet(cp, "operators", "create", "vic", "--role", "viewer", "--out",
                  str(tmp_path / "vic")) == 0
    bundle = _bundle_for(cp, trained_bundle, tmp_path / "v1")
    rc = fleet_main(["--config", str(tmp_path / "vic" / "fleet.toml"), "--api", cp.api,
                     "models", "publish", str(bundle)])
    assert rc == 1
    assert cp.cp.store.list_model_versions() == []


def test_directory_signed_by_the_reference_tool_installs(
    cp: RunningControlPlane, tmp_path: Path, trained_bundle: Path
) -> None:
    bundle = tmp_path / "by-cli"
    shutil.copytree(trained_bundle, bundle)
    (bundle / "model.sig").unlink()
    r = subprocess.run(
        [MODEL_SIGNING, "sign", "key", str(bundle), "--signature", str(bundle / "model.sig"),
         "--private_key", str(cp.home / "publisher" / "publisher.key")],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert r.returncode == 0, r.stderr
    assert _fleet(cp, "models", "publish", str(bundle)) == 0
    cp.enroll_agent(tmp_path / "a")
    agent = start_agent(tmp_path / "a", cp.loop, probation_seconds=0.0)
    try:
        assert _fleet(cp, "rollouts", "start", "--model", "digits", "--version", "1") == 0
        _wait_models(agent, _committed(1))
    finally:
        agent.stop()


def test_device_cannot_fetch_a_bundle_outside_its_release(
    cp: RunningControlPlane, tmp_path: Path, trained_bundle: Path
) -> None:
    bundle = _bundle_for(cp, trained_bundle, tmp_path / "v1")
    assert _fleet(cp, "models", "publish", str(bundle)) == 0
    digest = cp.cp.store.list_model_versions()[0].digest
    cp.enroll_agent(tmp_path / "a")
    creds = device_credentials(tmp_path / "a")
    with grpc.secure_channel(cp.api, creds) as channel:
        stub = agent_pb2_grpc.AgentServiceStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            list(stub.FetchBundle(agent_pb2.FetchBundleRequest(digest=digest), timeout=WAIT))
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


# ---------------------------------------------------------------- download behaviour


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def test_resume_after_broken_download_transfers_only_missing_bytes(tmp_path: Path) -> None:
    blob = bytes(range(256)) * 40  # 10,240 bytes
    server = FakeBundleServer(blob, break_after=4)
    part = tmp_path / "b.part"
    with pytest.raises(TransportError):
        asyncio.run(fetch_bundle(server, _digest(blob), len(blob), part))
    assert part.stat().st_size == 4000
    asyncio.run(fetch_bundle(server, _digest(blob), len(blob), part))
    assert part.read_bytes() == blob
    assert server.requests == [(0, len(blob)), (4000, len(blob) - 4000)]
    assert server.sent == len(blob)  # nothing was transferred twice


def test_endless_data_attack_stops_at_the_declared_length(tmp_path: Path) -> None:
    blob = b"x" * 5000
    server = FakeBundleServer(blob, extra=b"y" * 10_000_000, chunk=3000)
    part = tmp_path / "b.part"
    asyncio.run(fetch_bundle(server, _digest(blob), len(blob), part))
    assert part.read_bytes() == blob
    assert server.sent <= 6000  # reading stopped at the declared length


def test_substituted_bundle_fails_the_digest_and_is_deleted(tmp_path: Path) -> None:
    blob, other = b"a" * 3000, b"b" * 3000
    part = tmp_path / "b.part"
    with pytest.raises(UntrustedInputError, match="digest"):
        asyncio.run(fetch_bundle(FakeBundleServer(other), _digest(blob), len(blob), part))
    assert not part.exists()


def test_stalled_server_times_out_and_keeps_the_partial_download(tmp_path: Path) -> None:
    blob = b"z" * 5000
    server = FakeBundleServer(blob, stall_after=2)
    part = tmp_path / "b.part"
    with pytest.raises(TransportError, match="stalled"):
        asyncio.run(fetch_bundle(server, _digest(blob), len(blob), part, chunk_timeout=0.2))
    assert part.stat().st_size == 2000


def test_oversized_chunk_is_refused_by_the_transport_base(tmp_path: Path) -> None:
    blob = b"q" * (MAX_CHUNK_BYTES + 10)
    server = FakeBundleServer(blob, chunk=MAX_CHUNK_BYTES + 1)
    with pytest.raises(InvalidInputError, match="limit"):
        asyncio.run(fetch_bundle(server, _digest(blob), len(blob), tmp_path / "b.part"))
    assert (tmp_path / "b.part").stat().st_size == 0  # nothing of it was written


def test_failed_download_keeps_the_old_model_serving(
    cp: RunningControlPlane, tmp_path: Path, trained_bundle: Path, loop: LoopThread
) -> None:
    v1 = _bundle_for(cp, trained_bundle, tmp_path / "v1", version=1)
    assert _fleet(cp, "models", "publish", str(v1)) == 0
    cp.enroll_agent(tmp_path / "a")
    agent = start_agent(tmp_path / "a", cp.loop, probation_seconds=0.0,
                        download_chunk_timeout_seconds=0.2)
    try:
        assert _fleet(cp, "rollouts", "start", "--model", "digits", "--version", "1") == 0
        _wait_models(agent, _committed(1))
        # v2's blob goes missing from the store: the server cannot send it (the agent's
        # download fails; the old model keeps serving and the download is retried later).
        v2 = _bundle_for(cp, trained_bundle, tmp_path / "v2", version=2)
        assert _fleet(cp, "models", "publish", str(v2)) == 0
        digest = cp.cp.store.get_model_version("digits", 2).digest  # type: ignore[union-attr]
        cp.cp.services.ctx.blobs.path(digest).unlink()
        assert _fleet(cp, "rollouts", "start", "--model", "digits", "--version", "2") == 0
        while (event := agent.wait_for("models"))["serial"] < 2:
            pass  # events from before the v2 release
        models = event["models"]
        assert _serving(models)["version"] == 1  # type: ignore[index]
        v2 = next(m for m in models if m["version"] == 2)
        assert v2["state"] == "downloading" and not v2["serving"]  # resumes on the next sync
        assert agent.agent.models.active("digits")[0] == 1  # type: ignore[index]
    finally:
        agent.stop()


def test_archive_digest_matches_what_the_release_declares(
    cp: RunningControlPlane, tmp_path: Path, trained_bundle: Path
) -> None:
    bundle = _bundle_for(cp, trained_bundle, tmp_path / "v1")
    digest, length = pack_bundle(bundle, tmp_path / "b.tar")
    assert _fleet(cp, "models", "publish", str(bundle)) == 0
    record = cp.cp.store.get_model_version("digits", 1)
    assert record is not None and (record.digest, record.length) == (digest, length)


def test_rollback_to_a_kept_version_needs_no_download(
    cp_any: RunningControlPlane, tmp_path: Path, trained_bundle: Path
) -> None:
    cp = cp_any
    for version in (1, 2):
        bundle = _bundle_for(cp, trained_bundle, tmp_path / f"v{version}", version=version)
        assert _fleet(cp, "models", "publish", str(bundle)) == 0
    cp.enroll_agent(tmp_path / "a")
    agent = start_agent(tmp_path / "a", cp.loop, probation_seconds=0.0, transport=cp.transport)
    try:
        for version in (1, 2):
            assert _fleet(cp, "rollouts", "start", "--model", "digits",
                          "--version", str(version)) == 0
            _wait_models(agent, _committed(version))
        # v1's bytes are gone from the control plane: only the copy kept on the device remains.
        v1 = cp.cp.store.get_model_version("digits", 1)
        assert v1 is not None
        cp.cp.services.ctx.blobs.path(v1.digest).unlink()
        assert _fleet(cp, "rollouts", "start", "--model", "digits", "--version", "1") == 0
        _wait_models(agent, _committed(1))
    finally:
        agent.stop()


def test_revoked_device_sync_stream_ends(
    cp: RunningControlPlane, tmp_path: Path
) -> None:
    cfg = cp.enroll_agent(tmp_path / "a")
    creds = device_credentials(tmp_path / "a")

    async def watch() -> grpc.StatusCode:
        async with grpc.aio.secure_channel(cp.api, creds) as channel:
            stub = agent_pb2_grpc.AgentServiceStub(channel)
            call = stub.Sync(agent_pb2.SyncRequest())
            await call.initial_metadata()  # sent once the server has subscribed the stream
            assert cp.cp.notifier.subscribers(cfg.device_id) == 1
            cp.loop.loop.call_soon_threadsafe(
                lambda: cp.cp.services.identity.revoke_device(_admin(cp), cfg.device_id, "lost"))
            with pytest.raises(grpc.aio.AioRpcError) as err:
                async for _ in call:
                    pass
            return err.value.code()

    assert asyncio.run(asyncio.wait_for(watch(), WAIT)) == grpc.StatusCode.UNAUTHENTICATED


def _admin(cp: RunningControlPlane) -> pki.Identity:
    cert = pki.load_certificate(cp.admin.cert.read_bytes())
    return pki.identity_from_certificate(cert)


def test_a_version_pruned_from_the_device_is_downloaded_again(
    cp: RunningControlPlane, tmp_path: Path, trained_bundle: Path
) -> None:
    """The agent keeps the newest three committed versions on disk; going back to an older
    one must download it again, not try to serve files that were deleted (seen under stress:
    'digits v3 is not a committed version kept on disk', then a missing manifest.json)."""
    for version in range(1, 6):
        bundle = _bundle_for(cp, trained_bundle, tmp_path / f"v{version}", version=version)
        assert _fleet(cp, "models", "publish", str(bundle)) == 0
    cp.enroll_agent(tmp_path / "a")
    agent = start_agent(tmp_path / "a", cp.loop, probation_seconds=0.0)
    try:
        for version in range(1, 6):
            assert _fleet(cp, "rollouts", "start", "--model", "digits",
                          "--version", str(version)) == 0
            _wait_models(agent, _committed(version))
        assert not (tmp_path / "a" / "models" / "digits" / "versions" / "1").exists()
        assert _fleet(cp, "rollouts", "start", "--model", "digits", "--version", "1") == 0
        _wait_models(agent, _committed(1))
        assert agent.agent.supervisor.core.stats()["models"]["digits"]["arms"].keys() == {"1"}
    finally:
        agent.stop()
