"""The root of trust on live agents: pinned at enrollment, rotated release keys adopted over
gRPC and MQTT, attacks refused with the agent's state unchanged, and the recovery drill
(compromise -> `control-plane rotate release-key` -> the fleet installs a new release, with no
device re-enrolled)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from control_plane.cli import main as cp_main
from edge_agent.cli import main as agent_main
from edge_agent.install.release_trust import ReleaseTrust
from edge_agent.install.root_trust import RootTrust
from edge_agent.state import StateDir
from fleetcore import pki, signing
from fleetcore import root as fleet_root
from fleetcore.errors import BadSignatureError, InvalidInputError, RollbackError
from fleetcore.release import sign_release
from fleetcore.signing import TrustedKeys
from tests.support import RunningAgent, RunningControlPlane, start_agent
from tests.test_delivery import _bundle_for, _committed, _fleet, _wait_models


def _snapshot(state: Path) -> dict[str, bytes]:
    s = StateDir(state)
    return {p.name: p.read_bytes() for p in (s.release, s.root_file) if p.exists()}


def _wait_root(agent: RunningAgent, version: int) -> None:
    while agent.agent.root_version < version:
        agent.wait_for("root")


def _rotate(cp: RunningControlPlane, *extra: str) -> None:
    assert cp_main(["rotate", "release-key", "--home", str(cp.home), *extra]) == 0


def _forged_release(cp: RunningControlPlane, device_id: str, key: Any, serial: int) -> Any:
    """A release for ``device_id`` at ``serial``, as the control plane builds it, signed by
    ``key`` (what an attacker holding that key can make)."""
    existing = cp.cp.store.get_release(device_id)
    assert existing is not None
    doc = json.loads(existing.document)
    doc["serial"] = serial
    doc["expires_at"] = time.time() + 3600
    data = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    return sign_release(data, key)


def test_init_makes_root_keys_and_root_v1_and_enrollment_pins_it(
        cp: RunningControlPlane, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    keys = sorted((cp.home / "root-keys").glob("*.key"))
    assert len(keys) == 3 and all(k.stat().st_mode & 0o777 == 0o600 for k in keys)
    assert (cp.home / "keys" / "audit.key").exists()
    assert cp_main(["root", "show", "--home", str(cp.home)]) == 0
    out = capsys.readouterr().out
    assert "root version 1" in out and "2 of 3" in out
    cp.enroll_agent(tmp_path / "a")
    trust = RootTrust(StateDir(tmp_path / "a").root_file)
    assert trust.version == 1
    assert agent_main(["status", "--state-dir", str(tmp_path / "a"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["root_version"] == 1


def test_a_root_staged_with_too_few_keys_waits_for_root_sign(
        cp: RunningControlPlane, capsys: pytest.CaptureFixture[str]) -> None:
    old_pub = (cp.home / "keys" / "release.pub").read_bytes()
    one = str(cp.home / "root-keys" / "root-1.key")
    _rotate(cp, "--root-key", one)
    assert "staged with 1 signatures" in capsys.readouterr().out
    assert cp.cp.services.ctx.roots.version() == 1
    assert (cp.home / "keys" / "release.pub").read_bytes() == old_pub  # not in use yet
    assert cp_main(["root", "sign", "--home", str(cp.home), "--root-key",
                    str(cp.home / "root-keys" / "root-2.key")]) == 0
    assert "published" in capsys.readouterr().out
    assert cp.cp.services.ctx.roots.version() == 2
    assert (cp.home / "keys" / "release.pub").read_bytes() != old_pub
    events = [e for e in cp.cp.store.list_audit(50) if e.action == "keys.rotate-release-key"]
    assert len(events) == 1


def test_recovery_drill_a_stolen_release_key_is_rotated_out_without_re_enrolling(
        cp_any: RunningControlPlane, tmp_path: Path, trained_bundle: Path) -> None:
    cp = cp_any  # over gRPC and over MQTT
    bundle = _bundle_for(cp, trained_bundle, tmp_path / "v1")
    assert _fleet(cp, "models", "publish", str(bundle)) == 0
    cp.enroll_agent(tmp_path / "a")
    agent = start_agent(tmp_path / "a", cp.loop, probation_seconds=0.0, transport=cp.transport)
    try:
        assert _fleet(cp, "rollouts", "start", "--model", "digits", "--version", "1") == 0
        _wait_models(agent, _committed(1))
        device_id = agent.agent.config.device_id
        # Compromise: the attacker holds the release key and signs serial 99999; the device
        # accepts it (it is validly signed by the fleet's release key).
        stolen = pki.load_private_key((cp.home / "keys" / "release.key").read_bytes())
        forged = _forged_release(cp, device_id, stolen, 99_999)
        agent.agent.trust.accept(forged, time.time())
        assert agent.agent.trust.mark is not None and agent.agent.trust.mark.serial == 99_999

        # The operator rotates the release key; the fleet adopts root v2 and installs v2.
        _rotate(cp)
        _wait_root(agent, 2)
        bundle2 = _bundle_for(cp, trained_bundle, tmp_path / "v2", version=2)
        assert _fleet(cp, "models", "publish", str(bundle2)) == 0
        assert _fleet(cp, "rollouts", "start", "--model", "digits", "--version", "2") == 0
        _wait_models(agent, _committed(2))
        # The serial held under the stolen key was forgotten: the agent holds the release the
        # control plane signed with the new key (whatever its serial).
        mark = agent.agent.trust.mark
        record = cp.cp.store.get_release(device_id)
        assert mark is not None and record is not None and mark.serial == record.serial
        new_key = pki.load_private_key((cp.home / "keys" / "release.key").read_bytes())
        signing.verify(new_key.public_key(), "release", record.document, record.signature)

        # From now on a release signed by the rotated-out key is refused, state unchanged.
        before = _snapshot(tmp_path / "a")
        replay = _forged_release(cp, device_id, stolen, 200_000)
        with pytest.raises(BadSignatureError):
            agent.agent.trust.accept(replay, time.time())
        assert agent.agent.trust.mark == mark and _snapshot(tmp_path / "a") == before
        # The device view shows the root version it reported (no device re-enrolled).
        deadline = time.monotonic() + 30
        while cp.device(device_id).root_version != 2:
            agent.wait_for("heartbeat")
            assert time.monotonic() < deadline
        assert len(cp.cp.store.list_devices()) == 1
    finally:
        agent.stop()


def test_a_release_signed_by_a_rotated_out_key_is_refused(
        cp: RunningControlPlane, tmp_path: Path) -> None:
    cp.enroll_agent(tmp_path / "a")
    old = pki.load_private_key((cp.home / "keys" / "release.key").read_bytes())
    _rotate(cp)
    state = StateDir(tmp_path / "a")
    roots = RootTrust(state.root_file)
    result = roots.update(cp.cp.services.ctx.roots.newer_than(1), time.time())
    assert result.error is None and roots.version == 2
    release_keys = roots.release_keys()
    assert release_keys is not None
    trust = ReleaseTrust(state.release, release_keys, "whatever-device")
    doc = json.dumps({"format": "edgefleet.release/v1", "device_id": "whatever-device",
                      "serial": 1, "issued_at": time.time(), "expires_at": time.time() + 60,
                      "models": []}).encode()
    before = _snapshot(tmp_path / "a")
    with pytest.raises(BadSignatureError):
        trust.accept(sign_release(doc, old), time.time())
    assert trust.mark is None and _snapshot(tmp_path / "a") == before
    new = pki.load_private_key((cp.home / "keys" / "release.key").read_bytes())
    assert trust.accept(sign_release(doc, new), time.time())[1]


def test_root_attacks_on_a_live_agent_leave_its_state_unchanged(
        cp: RunningControlPlane, tmp_path: Path) -> None:
    cp.enroll_agent(tmp_path / "a")
    keys = [pki.load_private_key(p.read_bytes())
            for p in sorted((cp.home / "root-keys").glob("*.key"))]
    agent = start_agent(tmp_path / "a", cp.loop)
    try:
        agent.wait_for("heartbeat")
        v1 = RootTrust(StateDir(tmp_path / "a").root_file).current  # what the agent persisted
        assert v1 is not None
        now = time.time()

        def root(version: int) -> fleet_root.RootDocument:
            return fleet_root.build_root(version, now, now + 3600, {
                role: ([v1.root.keys[k] for k in spec.keyids], spec.threshold)
                for role, spec in v1.root.roles.items()})

        before = _snapshot(tmp_path / "a")
        attacks = [
            (fleet_root.sign_root(root(2), keys[:1]), "the threshold is 2"),  # too few keys
            (fleet_root.sign_root(root(3), keys), "skips ahead"),             # a version skip
        ]
        for envelope, message in attacks:
            agent.agent._adopt_roots([envelope])
            assert message in agent.wait_for("root-refused")["error"]
            assert agent.agent.root_version == 1 and _snapshot(tmp_path / "a") == before
        # A rollback: after v2, the old v1 is ignored or refused; v2 stays.
        _rotate(cp)
        _wait_root(agent, 2)
        after_v2 = _snapshot(tmp_path / "a")
        v2 = RootTrust(StateDir(tmp_path / "a").root_file).current
        assert v2 is not None
        with pytest.raises(RollbackError):
            fleet_root.verify_root_update(v2, v1.envelope, time.time())
        agent.agent._adopt_roots([v1.envelope])
        assert agent.agent.root_version == 2 and _snapshot(tmp_path / "a") == after_v2
    finally:
        agent.stop()


def test_an_agent_enrolled_before_roots_accepts_only_a_first_root_listing_its_release_key(
        tmp_path: Path) -> None:
    release, other = pki.generate_key(), pki.generate_key()
    root_keys = [pki.generate_key() for _ in range(2)]

    def first_root(release_key: Any) -> bytes:
        now = time.time()
        pubs = [k.public_key() for k in root_keys]
        return fleet_root.sign_root(fleet_root.build_root(1, now, now + 3600, {
            "root": (pubs, 2), "release": ([release_key.public_key()], 1),
            "publisher": ([release_key.public_key()], 1), "audit": (pubs[:1], 1)}), root_keys)

    trust = RootTrust(tmp_path / "root.json")
    with pytest.raises(BadSignatureError, match="does not list the release key pinned"):
        trust.pin(first_root(other), pinned_release_key=release.public_key())
    assert trust.version == 0 and not (tmp_path / "root.json").exists()
    trust.pin(first_root(release), pinned_release_key=release.public_key())
    assert RootTrust(tmp_path / "root.json").version == 1  # persisted, re-verified on load


def test_a_corrupt_root_file_is_an_error_never_a_reset(tmp_path: Path) -> None:
    path = tmp_path / "root.json"
    path.write_text('{"format": "edgefleet.root-trust/v1", "chain": ["e30="]}')
    with pytest.raises(InvalidInputError, match="refusing to forget"):
        RootTrust(path)


def test_a_release_signed_by_a_threshold_of_release_keys_survives_a_restart(
        tmp_path: Path) -> None:
    keys = [pki.generate_key() for _ in range(2)]
    trusted = TrustedKeys({signing.keyid(k.public_key()): k.public_key() for k in keys}, 2)
    doc = json.dumps({"format": "edgefleet.release/v1", "device_id": "dev-1", "serial": 3,
                      "issued_at": time.time(), "expires_at": time.time() + 60,
                      "models": []}).encode()
    trust = ReleaseTrust(tmp_path / "release.json", trusted, "dev-1")
    trust.accept(sign_release(doc, keys), time.time())
    again = ReleaseTrust(tmp_path / "release.json", trusted, "dev-1")
    assert again.mark == trust.mark and again.mark is not None and again.mark.serial == 3


def test_an_agent_enrolled_before_roots_adopts_the_fleets_root_live(
        cp: RunningControlPlane, tmp_path: Path) -> None:
    cp.enroll_agent(tmp_path / "a")
    StateDir(tmp_path / "a").root_file.unlink()  # as enrolled by an agent older than roots
    agent = start_agent(tmp_path / "a", cp.loop)
    try:
        _wait_root(agent, 1)
        assert RootTrust(StateDir(tmp_path / "a").root_file).version == 1
        _rotate(cp)
        _wait_root(agent, 2)
    finally:
        agent.stop()
