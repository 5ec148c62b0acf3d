"""The root's own keys and the audit key rotate, the root renews, and a home made before roots
gets one — each on a live agent, none re-enrolled (docs/operator-guide.md, Rotate)."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest

from control_plane.cli import main as cp_main
from edge_agent.install.root_trust import RootTrust
from edge_agent.state import StateDir
from fleetcore import pki
from fleetcore import root as fleet_root
from tests.support import RunningAgent, RunningControlPlane, start_agent, wait_until

ADMIN = pki.Identity(pki.IdentityKind.OPERATOR, "admin", serial="", role=pki.Role.ADMIN)


def _wait_root(agent: RunningAgent, version: int) -> None:
    deadline = time.monotonic() + 60
    while agent.agent.root_version < version:
        agent.wait_for("root")
        assert time.monotonic() < deadline


def _root_keys(cp: RunningControlPlane) -> set[str]:
    current = cp.cp.services.ctx.roots.current()
    assert current is not None
    return set(current.root.roles["root"].keyids)


def test_rotated_root_keys_sign_the_next_root_and_the_old_ones_no_longer_can(
        cp_any: RunningControlPlane, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cp = cp_any  # the live agent follows over gRPC and over MQTT
    cp.enroll_agent(tmp_path / "a")
    agent = start_agent(tmp_path / "a", cp.loop, transport=cp.transport)
    try:
        old_files = {p.name: p.read_bytes() for p in (cp.home / "root-keys").glob("*.key")}
        before = _root_keys(cp)
        assert cp_main(["rotate", "root-keys", "--home", str(cp.home), "--count", "2",
                        "--threshold", "1"]) == 0
        assert "published" in capsys.readouterr().out
        _wait_root(agent, 2)
        after = _root_keys(cp)
        assert len(after) == 2 and not after & before
        new_files = {p.name: p.read_bytes() for p in (cp.home / "root-keys").glob("*.key")}
        assert set(new_files) == {"root-1.key", "root-2.key"}
        assert all(new_files[n] != old_files[n] for n in new_files)
        # The chain goes on with the new keys: the next rotation reaches the live agent.
        assert cp_main(["rotate", "release-key", "--home", str(cp.home)]) == 0
        _wait_root(agent, 3)
        # The retired keys alone can only stage a root, never publish one.
        retired = tmp_path / "retired"
        retired.mkdir()
        for name, data in old_files.items():
            (retired / name).write_bytes(data)
        args = [a for name in old_files for a in ("--root-key", str(retired / name))]
        assert cp_main(["root", "renew", "--home", str(cp.home), *args]) == 0
        assert "staged" in capsys.readouterr().out
        assert cp.cp.services.ctx.roots.version() == 3
        assert RootTrust(StateDir(tmp_path / "a").root_file).version == 3
        actions = [e.action for e in cp.cp.store.list_audit(100)]
        assert "keys.rotate-root-keys" in actions
    finally:
        agent.stop()


def test_a_rotated_audit_key_signs_new_checkpoints_and_old_ones_still_verify(
        cp: RunningControlPlane) -> None:
    audit = cp.cp.services.audit
    old_doc, old_sig = audit.checkpoint(ADMIN)
    old_pub = (cp.home / "keys" / "audit.pub").read_bytes()
    assert cp_main(["rotate", "audit-key", "--home", str(cp.home)]) == 0
    new_pub = (cp.home / "keys" / "audit.pub").read_bytes()
    assert new_pub != old_pub
    assert not (cp.home / "keys" / "pending-audit.key").exists()
    wait_until(lambda: cp.cp.services.ctx.audit_key().public_key()
               == pki.load_public_key(new_pub), what="the new audit key in use")
    new_doc, new_sig = audit.checkpoint(ADMIN)
    signer = pki.load_public_key(new_pub)
    fleet_root_audit = cp.cp.services.ctx.roots.audit_keys()
    assert any(k == signer for k in fleet_root_audit)
    for doc, sig in ((old_doc, old_sig), (new_doc, new_sig)):
        _, checked = audit.verify(ADMIN, doc, sig)
        assert checked is not None and checked[0], checked


def test_root_renew_extends_the_expiry_with_the_same_keys(cp: RunningControlPlane,
                                                         tmp_path: Path) -> None:
    first = cp.cp.services.ctx.roots.current()
    assert first is not None
    assert cp_main(["root", "renew", "--home", str(cp.home)]) == 0
    renewed = cp.cp.services.ctx.roots.current()
    assert renewed is not None and renewed.version == 2
    assert renewed.root.expires_at > first.root.expires_at
    assert renewed.root.roles == first.root.roles


def test_root_init_gives_a_home_made_before_roots_a_root_its_agents_adopt(
        cp: RunningControlPlane, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # A home and an agent as they were before roots: no root keys, no root, no root file.
    for path in (cp.home / "root-keys").iterdir():
        path.unlink()
    with sqlite3.connect(cp.home / "edgefleet.db") as db:
        db.execute("DELETE FROM roots")
    cp.enroll_agent(tmp_path / "a")
    StateDir(tmp_path / "a").root_file.unlink(missing_ok=True)
    agent = start_agent(tmp_path / "a", cp.loop)
    try:
        assert cp_main(["root", "init", "--home", str(cp.home)]) == 0
        assert "root version 1 published" in capsys.readouterr().out
        _wait_root(agent, 1)
        assert len(list((cp.home / "root-keys").glob("*.key"))) == 3
        # A second init is refused with one line; nothing changes.
        assert cp_main(["root", "init", "--home", str(cp.home)]) != 0
        assert "error:" in capsys.readouterr().err
        assert cp.cp.services.ctx.roots.version() == 1
        current = cp.cp.services.ctx.roots.current()
        assert current is not None
        release = pki.load_public_key((cp.home / "keys" / "release.pub").read_bytes())
        assert fleet_root.keyid(release) in current.root.roles["release"].keyids
    finally:
        agent.stop()
