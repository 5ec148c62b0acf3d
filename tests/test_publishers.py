"""Publishers in the root of trust: `fleet publishers list|add|revoke [--rollback]`, k-of-n
publisher signatures on bundles (each distinct key counts once), and the attacks: a revoked
publisher's bundle refused at publish and by a live agent, a bundle short of the threshold
refused, the same key twice counted once. Refusals leave the agent's state unchanged."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from control_plane.cli import main as cp_main
from fleetcore import pki, signing
from fleetcore.bundle_verify import verify_bundle_dir, verify_bundle_signers
from fleetcore.errors import BadSignatureError, InvalidInputError
from fleetcore.files import atomic_write
from tests.support import RunningAgent, RunningControlPlane, start_agent
from tests.support import fleet_json as _fleet_json
from tests.test_delivery import _bundle_for, _committed, _fleet, _serving, _wait_models
from trainer.bundle import cosign_bundle, sign_bundle
from trainer.cli import main as trainer_main


def _publisher(directory: Path, name: str) -> tuple[Path, Path]:
    """A publisher key pair (what `trainer keygen` writes): (private key, public PEM)."""
    key = pki.generate_key()
    directory.mkdir(parents=True, exist_ok=True)
    priv, pub = directory / f"{name}.key", directory / f"{name}.pub"
    atomic_write(priv, pki.private_key_pem(key), mode=0o600)
    atomic_write(pub, pki.public_key_pem(key))
    return priv, pub


def _resign(source: Path, dest: Path, version: int, key: Path) -> Path:
    shutil.copytree(source, dest)
    manifest = json.loads((dest / "manifest.json").read_text())
    manifest["version"] = version
    (dest / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
    sign_bundle(dest, key)
    return dest


def _keyid(pub: Path) -> str:
    return signing.keyid(pki.load_public_key(pub.read_bytes()))


def _wait_root(agent: RunningAgent, version: int) -> None:
    while agent.agent.root_version < version:
        agent.wait_for("root")


def _models_snapshot(state: Path) -> dict[str, bytes]:
    """What the agent serves: each model's active pointer and installed versions (not the
    install log, which records the refusal)."""
    models = state / "models"
    return {str(p.relative_to(models)): p.read_bytes() if p.is_file() else b"dir"
            for p in sorted(models.rglob("*"))
            if p.name == "active.json" or "versions" in p.parts} if models.exists() else {}


# --- k-of-n on bundles (fleetcore/bundle_verify.py, trainer cosign) ---------------------


def test_k_of_n_bundle_signatures_each_distinct_key_counts_once(
        tmp_path: Path, trained_bundle: Path) -> None:
    a_key, a_pub = _publisher(tmp_path / "keys", "a")
    b_key, b_pub = _publisher(tmp_path / "keys", "b")
    trusted = [a_pub.read_bytes(), b_pub.read_bytes()]
    bundle = _resign(trained_bundle, tmp_path / "bundle", 1, a_key)

    # 1 of 2 required signatures: refused.
    with pytest.raises(BadSignatureError, match=r"1 distinct trusted .*2 are required"):
        verify_bundle_dir(bundle, trusted, 2)
    # The same key twice (a second signature by A, A listed twice): still one key.
    cosign_bundle(bundle, a_key)
    assert (bundle / "model.sig.2").is_file()
    with pytest.raises(BadSignatureError, match="2 are required"):
        verify_bundle_dir(bundle, [*trusted, a_pub.read_bytes()], 2)
    # Two distinct keys: accepted, and both are named.
    assert trainer_main(["cosign", str(bundle), "--key", str(b_key)]) == 0
    verified = verify_bundle_signers(bundle, trusted, 2)
    assert set(verified.keyids) == {_keyid(a_pub), _keyid(b_pub)}
    # A signature file outside the scheme is refused, not taken for data.
    (bundle / "model.sig.99").write_bytes(b"{}")
    with pytest.raises(InvalidInputError, match="looks like a signature"):
        verify_bundle_dir(bundle, trusted, 2)


# --- the control plane and live agents -----------------------------------------------------


def test_fleet_publishers_add_makes_a_new_root_and_a_threshold_of_2_is_enforced_at_publish_and_on_the_agent(  # noqa: E501
        cp: RunningControlPlane, tmp_path: Path, trained_bundle: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    a_key = cp.home / "publisher" / "publisher.key"
    b_key, b_pub = _publisher(tmp_path / "keys", "b")
    listing = _fleet_json(cp, capsys, "publishers", "list")
    assert listing["threshold"] == 1 and len(listing["publishers"]) == 1
    added = _fleet_json(cp, capsys, "publishers", "add", str(b_pub), "--threshold", "2")
    assert added["change_published"] and added["change_root_version"] == "2"
    assert {p["keyid"] for p in added["publishers"]} >= {_keyid(b_pub)}
    assert added["threshold"] == 2
    assert [e.action for e in cp.cp.store.list_audit(20)].count("publishers.add") == 1

    cp.enroll_agent(tmp_path / "a")
    agent = start_agent(tmp_path / "a", cp.loop, probation_seconds=0.0)
    try:
        _wait_root(agent, 2)
        one = _resign(trained_bundle, tmp_path / "one", 1, a_key)
        twice = _resign(trained_bundle, tmp_path / "twice", 1, a_key)
        cosign_bundle(twice, a_key)
        both = _resign(trained_bundle, tmp_path / "both", 1, a_key)
        cosign_bundle(both, b_key)
        before = _models_snapshot(tmp_path / "a")
        for refused in (one, twice):
            assert _fleet(cp, "models", "publish", str(refused)) == 1
            assert "2 are required" in capsys.readouterr().err
            with pytest.raises(BadSignatureError, match="2 are required"):
                agent.agent._verify_bundle(refused)
        assert cp.cp.store.list_model_versions("digits") == []
        assert _models_snapshot(tmp_path / "a") == before
        assert agent.agent._verify_bundle(both)["version"] == 1
        published = _fleet_json(cp, capsys, "models", "publish", str(both))
        assert published["version"] == 1
        assert set(cp.cp.store.version_signers()[("digits", 1)]) == {
            _keyid(cp.home / "publisher" / "publisher.pub"), _keyid(b_pub)}
    finally:
        agent.stop()


def test_a_revoked_publisher_s_bundle_is_refused_at_publish_and_by_agents(
        cp_any: RunningControlPlane, tmp_path: Path, trained_bundle: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    cp = cp_any  # the revocation reaches the agent through the root over gRPC and over MQTT
    b_key, b_pub = _publisher(tmp_path / "keys", "b")
    assert _fleet(cp, "publishers", "add", str(b_pub)) == 0
    v1 = _bundle_for(cp, trained_bundle, tmp_path / "v1")                   # signed by A
    v2 = _resign(trained_bundle, tmp_path / "v2", 2, b_key)                 # signed by B only
    assert _fleet(cp, "models", "publish", str(v1)) == 0
    assert _fleet(cp, "models", "publish", str(v2)) == 0
    device = cp.enroll_agent(tmp_path / "a").device_id
    agent = start_agent(tmp_path / "a", cp.loop, probation_seconds=0.0,
                        transport=cp.transport)
    try:
        assert _fleet(cp, "rollouts", "start", "--model", "digits", "--version", "1") == 0
        _wait_models(agent, _committed(1))

        revoked = _fleet_json(cp, capsys, "publishers", "revoke", _keyid(b_pub)[:12])
        assert revoked["changed_keyid"] == _keyid(b_pub) and revoked["change_published"]
        _wait_root(agent, 3)
        assert [e.action for e in cp.cp.store.list_audit(30)].count("publishers.revoke") == 1

        # At publish: a new bundle signed only by the revoked key is refused (and audited).
        v3 = _resign(trained_bundle, tmp_path / "v3", 3, b_key)
        assert _fleet(cp, "models", "publish", str(v3)) == 1
        assert "does not verify" in capsys.readouterr().err
        assert cp.cp.store.get_model_version("digits", 3) is None
        # v2 (signed only by B) is not given to devices again...
        assert _fleet(cp, "rollouts", "start", "--model", "digits", "--version", "2") == 1
        assert "revoked publisher" in capsys.readouterr().err
        # ...and an agent told to install it anyway (a release naming it) refuses it and
        # keeps serving v1: its models are unchanged.
        before = _models_snapshot(tmp_path / "a")
        cp.cp.store.assign_version("digits", 2, [device])
        cp.cp.services.ctx.push([device], cp.cp.services.ctx.clock())
        while True:
            event = agent.wait_for("install")
            if event["version"] == 2 and event["state"] == "failed":
                break
        assert "does not verify" in event["reason"]
        assert _serving(agent.agent.updater.report())["version"] == 1  # type: ignore[index]
        assert _models_snapshot(tmp_path / "a") == before
    finally:
        agent.stop()


def test_revoke_with_rollback_moves_a_serving_device_back_to_the_last_version_signed_by_a_trusted_key(  # noqa: E501
        cp: RunningControlPlane, tmp_path: Path, trained_bundle: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    b_key, b_pub = _publisher(tmp_path / "keys", "b")
    assert _fleet(cp, "publishers", "add", str(b_pub)) == 0
    assert _fleet(cp, "models", "publish",
                  str(_bundle_for(cp, trained_bundle, tmp_path / "v1"))) == 0
    assert _fleet(cp, "models", "publish",
                  str(_resign(trained_bundle, tmp_path / "v2", 2, b_key))) == 0
    device = cp.enroll_agent(tmp_path / "a").device_id
    agent = start_agent(tmp_path / "a", cp.loop, probation_seconds=0.0)
    try:
        assert _fleet(cp, "rollouts", "start", "--model", "digits", "--version", "2") == 0
        _wait_models(agent, _committed(2))
        out = _fleet_json(cp, capsys, "publishers", "revoke", _keyid(b_pub), "--rollback")
        assert out["rolled_back"] == [f"{device} digits v2 -> v1"]
        _wait_models(agent, _committed(1))
        event = [e for e in cp.cp.store.list_audit(30) if e.action == "publishers.revoke"]
        assert len(event) == 1
    finally:
        agent.stop()


def test_a_publisher_change_with_too_few_root_keys_at_hand_is_staged_until_root_sign(
        cp: RunningControlPlane, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, b_pub = _publisher(tmp_path / "keys", "b")
    offline = tmp_path / "offline"
    shutil.move(cp.home / "root-keys", offline)  # the root keys went offline, as documented
    (cp.home / "root-keys").mkdir()
    shutil.copy(offline / "root-1.key", cp.home / "root-keys" / "root-1.key")
    staged = _fleet_json(cp, capsys, "publishers", "add", str(b_pub))
    assert not staged["change_published"] and staged["pending_version"] == "2"
    assert len(staged["publishers"]) == 1  # not trusted before the root is published
    assert cp_main(["root", "sign", "--home", str(cp.home), "--root-key",
                    str(offline / "root-2.key")]) == 0
    listing = _fleet_json(cp, capsys, "publishers", "list")
    assert {p["keyid"] for p in listing["publishers"]} >= {_keyid(b_pub)}
    assert listing["pending_version"] == "0"


def test_publisher_commands_refuse_bad_input_with_one_error_line(
        cp: RunningControlPlane, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pub = cp.home / "publisher" / "publisher.pub"
    assert _fleet(cp, "publishers", "add", str(pub)) == 1
    assert "trusted already" in capsys.readouterr().err
    assert _fleet(cp, "publishers", "revoke", _keyid(pub)) == 1
    assert "only publisher key" in capsys.readouterr().err
    assert _fleet(cp, "publishers", "revoke", "00ff") == 1
    err = capsys.readouterr().err
    assert "no trusted publisher key" in err and "Traceback" not in err
    garbage = tmp_path / "garbage.pem"
    garbage.write_bytes(b"not a key")
    assert _fleet(cp, "publishers", "add", str(garbage)) == 1
    assert "PEM" in capsys.readouterr().err


def test_revoking_a_publisher_pauses_a_running_rollout_of_its_version_and_refuses_resume(
        cp: RunningControlPlane, tmp_path: Path, trained_bundle: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    b_key, b_pub = _publisher(tmp_path / "keys", "b")
    assert _fleet(cp, "publishers", "add", str(b_pub)) == 0
    assert _fleet(cp, "models", "publish",
                  str(_resign(trained_bundle, tmp_path / "v1", 1, b_key))) == 0
    for name in ("a", "b"):
        cp.enroll_agent(tmp_path / name)  # not started: the rollout waits on its first step
    assert _fleet(cp, "rollouts", "start", "--model", "digits", "--version", "1",
                  "--steps", "50,100", "--bake", "3600") == 0
    assert cp.cp.store.get_rollout("digits").state.value == "running"  # type: ignore[union-attr]
    assert _fleet(cp, "publishers", "revoke", _keyid(b_pub)) == 0
    rollout = cp.cp.store.get_rollout("digits")
    assert rollout is not None and rollout.state.value == "paused"
    assert "revoked" in rollout.reason
    capsys.readouterr()
    assert _fleet(cp, "rollouts", "resume", "--model", "digits") == 1
    assert "no longer signed" in capsys.readouterr().err
