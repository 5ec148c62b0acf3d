"""`fleet audit verify` finds the first changed, deleted or reordered entry; a checkpoint
exposes truncation."""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from pathlib import Path

import pytest

from fleet.cli import main as fleet_main
from tests.support import RunningControlPlane


def _fleet(cp: RunningControlPlane, *args: str) -> int:
    return fleet_main(["--config", str(cp.home / "operators/admin/fleet.toml"), "--api", cp.api,
                       *args])


def _verify(cp: RunningControlPlane, capsys: pytest.CaptureFixture[str],
            *extra: str) -> tuple[int, dict]:
    capsys.readouterr()
    rc = _fleet(cp, "audit", "verify", "--json", *extra)
    return rc, json.loads(capsys.readouterr().out)


def _tamper(cp: RunningControlPlane, *statements: str) -> None:
    """What an attacker with the database file can do: drop the guards and rewrite rows."""
    conn = sqlite3.connect(cp.home / "edgefleet.db")
    conn.execute("DROP TRIGGER audit_events_no_update")
    conn.execute("DROP TRIGGER audit_events_no_delete")
    for statement in statements:
        conn.execute(statement)
    conn.commit()
    conn.close()


def _some_history(cp: RunningControlPlane) -> None:
    for _ in range(4):
        cp.token()  # each one is an audited state change


@dataclass(frozen=True)
class Tampering:
    name: str
    statements: tuple[str, ...]
    first_bad: int


TAMPERINGS = [
    Tampering("changed", ("UPDATE audit_events SET outcome = 'denied' WHERE seq = 3",), 3),
    Tampering("deleted", ("DELETE FROM audit_events WHERE seq = 2",), 2),
    Tampering("reordered", (
        "UPDATE audit_events SET seq = 100 WHERE seq = 2",
        "UPDATE audit_events SET seq = 2 WHERE seq = 3",
        "UPDATE audit_events SET seq = 3 WHERE seq = 100",
    ), 2),
    Tampering("actor rewritten", ("UPDATE audit_events SET actor = 'operator:nobody' "
                                  "WHERE seq = 4",), 4),
]


def test_intact_chain_verifies(cp: RunningControlPlane,
                               capsys: pytest.CaptureFixture[str]) -> None:
    _some_history(cp)
    rc, doc = _verify(cp, capsys)
    assert rc == 0 and doc["ok"] and doc["entries"] == 5 and doc["first_bad_seq"] is None


@pytest.mark.parametrize("case", TAMPERINGS, ids=lambda c: c.name)
def test_tampering_is_found_at_the_first_bad_entry(
    cp: RunningControlPlane, capsys: pytest.CaptureFixture[str], case: Tampering
) -> None:
    _some_history(cp)
    _tamper(cp, *case.statements)
    rc, doc = _verify(cp, capsys)
    assert rc == 1
    assert not doc["ok"] and doc["first_bad_seq"] == case.first_bad, doc


def test_checkpoint_exposes_truncation(cp: RunningControlPlane, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    _some_history(cp)
    assert _fleet(cp, "audit", "checkpoint", "--out", str(tmp_path / "head.json")) == 0
    cp.token()
    rc, doc = _verify(cp, capsys, "--checkpoint", str(tmp_path / "head.json"))
    assert rc == 0 and doc["checkpoint_ok"]  # growth after a checkpoint is fine
    _tamper(cp, "DELETE FROM audit_events WHERE seq >= 4")  # the tail is cut: still a chain
    rc, doc = _verify(cp, capsys)
    assert rc == 0  # the chain alone cannot tell ...
    rc, doc = _verify(cp, capsys, "--checkpoint", str(tmp_path / "head.json"))
    assert rc == 1 and not doc["checkpoint_ok"]  # ... the checkpoint can
    assert "truncation" in doc["checkpoint_reason"]


def test_forged_checkpoint_is_refused(cp: RunningControlPlane, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    _some_history(cp)
    assert _fleet(cp, "audit", "checkpoint", "--out", str(tmp_path / "head.json")) == 0
    forged = json.loads((tmp_path / "head.json").read_text())
    forged["document"] = forged["document"].replace('"size":5', '"size":2')
    (tmp_path / "forged.json").write_text(json.dumps(forged))
    rc, doc = _verify(cp, capsys, "--checkpoint", str(tmp_path / "forged.json"))
    assert rc == 1 and "signature" in doc["checkpoint_reason"]


def test_viewer_cannot_start_a_rollout_and_the_denial_is_audited(
    cp: RunningControlPlane, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _fleet(cp, "operators", "create", "vic", "--role", "viewer", "--out",
                  str(tmp_path / "vic")) == 0
    rc = fleet_main(["--config", str(tmp_path / "vic" / "fleet.toml"), "--api", cp.api,
                     "rollouts", "start", "--model", "digits", "--version", "1"])
    assert rc == 1
    last = cp.cp.store.list_audit(1)[0]
    assert (last.actor, last.role, last.action, last.outcome) == (
        "operator:vic", "viewer", "rollouts.start", "denied")
    rc, doc = _verify(cp, capsys)
    assert rc == 0 and doc["ok"]
