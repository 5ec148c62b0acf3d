"""`control-plane migrate`: a SQLite home's fleet moved into an empty PostgreSQL database.

Every table copied with the same rows and the audit chain intact; a broken chain, a database
that holds a fleet, a home in use refused; a migration killed midway (SIGKILL) or failing
midway leaves the home on SQLite as it was and the target retryable; and a live agent notices
nothing (tests/test_migrate.py::test_a_live_agent_notices_nothing_when_its_fleet_moves...)."""

from __future__ import annotations

import hashlib
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psycopg
import pytest
from sklearn.datasets import load_digits

from control_plane.cli import main as cp_main
from control_plane.config import ControlPlaneConfig
from control_plane.domain.audit_chain import verify_chain
from control_plane.ops.home import init_home
from control_plane.ops.migrate import migrate
from control_plane.ops.serve_lock import hold_serving
from control_plane.server import ControlPlane
from control_plane.storage import SqliteStore, open_store
from control_plane.storage.migrations import MIGRATIONS
from control_plane.storage.postgres import PostgresStore
from control_plane.storage.segment_files import SegmentFiles, body_in_row, segment_dir
from fleetcore.errors import EdgefleetError
from fleetcore.sqlite import connect
from fleetcore.sqlite import migrate as sqlite_migrate
from tests.store_support import pg_database
from tests.support import LoopThread, fleet_json, start_agent, start_control_plane
from tests.test_delivery import _committed, _wait_models
from tests.test_serving_fleet import _infer, _publish

__all__ = ["pg_database"]  # fixtures (tests/store_support.py)

REPO = Path(__file__).resolve().parent.parent


def _sqlite_home(home: Path) -> Path:
    """A stopped SQLite home with tokens and a few audit entries; its database file."""
    cfg = init_home(home, config=ControlPlaneConfig(home=home))
    store = SqliteStore(cfg.database)
    try:
        for i in range(5):
            store.add_token(f"hash-{i}", {"site": f"s{i}"}, 1000.0 + i, 9e9, "admin")
            store.append_audit(1000.0 + i, "admin", "token.create", f"t{i}", "ok", "{}", "admin")
    finally:
        store.close()
    return cfg.database


def _keys(home: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in [*home.glob("pki/*"), *home.glob("keys/*")]}


def _normal(values: Any) -> tuple[Any, ...]:
    return tuple(bytes(v) if isinstance(v, memoryview) else v for v in values)


def _all_rows_sqlite(database: Path) -> dict[str, list[tuple[Any, ...]]]:
    conn = sqlite3.connect(f"file:{database}?mode=ro", uri=True)
    try:
        tables = [r[0] for r in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'")]
        files = SegmentFiles(segment_dir(database))
        out = {}
        for t in tables:
            names = [r[1] for r in conn.execute(f'PRAGMA table_info("{t}")')]
            rows = conn.execute(f'SELECT {_cols(conn, t)} FROM "{t}"').fetchall()  # noqa: S608
            if t == "telemetry_segments":  # PostgreSQL keeps the bodies in the rows
                rows = [body_in_row(r, names, files) for r in rows]
            out[t] = sorted((_normal(r) for r in rows), key=repr)
        files.close()
        return out
    finally:
        conn.close()


def _cols(conn: sqlite3.Connection, table: str) -> str:
    return ", ".join(f'"{r[1]}"' for r in conn.execute(f'PRAGMA table_info("{table}")'))


def _all_rows_pg(url: str) -> dict[str, list[tuple[Any, ...]]]:
    out = {}
    with psycopg.connect(url) as pg:
        tables = [r[0] for r in pg.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'"
            " AND table_name <> 'edgefleet_schema'")]
        for t in tables:
            cols = [r[0] for r in pg.execute(
                "SELECT column_name FROM information_schema.columns WHERE table_name = %s"
                " ORDER BY ordinal_position", (t,))]
            names = ", ".join(f'"{c}"' for c in cols)
            out[t] = sorted((_normal(r) for r in pg.execute(
                f'SELECT {names} FROM "{t}"')), key=repr)  # noqa: S608
    return out


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _pg_tables(url: str) -> list[str]:
    with psycopg.connect(url) as conn:
        return [r[0] for r in conn.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'")]


def _one_error(capsys: pytest.CaptureFixture[str], *words: str) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    for word in words:
        assert word in err, err
    return err


def _still_on_sqlite(home: Path, database: Path, sha: str) -> None:
    assert ControlPlaneConfig.load(home).database_url == ""
    assert _sha(database) == sha


def test_migrate_copies_every_table_and_switches_the_home_last(
    tmp_path: Path, pg_database: str, capsys: pytest.CaptureFixture[str],
) -> None:
    database = _sqlite_home(tmp_path / "cp")
    sha = _sha(database)
    before = SqliteStore(database)
    chain, operators = before.audit_chain(), before.list_operators()
    before.close()
    capsys.readouterr()
    assert cp_main(["migrate", "--home", str(tmp_path / "cp"), "--to", pg_database]) == 0
    out = capsys.readouterr().out
    assert "copied enrollment_tokens: 5 rows" in out and "copied audit_events: 6 rows" in out
    assert f"audit chain intact: 6 entries, head {chain[-1].hash[:16]}" in out
    assert "edgefleet.db is kept" in out
    assert ControlPlaneConfig.load(tmp_path / "cp").database_url == pg_database
    assert _sha(database) == sha  # the way back: the SQLite file, untouched
    store = open_store(ControlPlaneConfig.load(tmp_path / "cp").store_location)
    try:
        assert isinstance(store, PostgresStore)
        assert store.audit_chain() == chain and store.list_operators() == operators
        # The chain continues on PostgreSQL from the copied head.
        store.append_audit(2000.0, "admin", "after.migrate", "", "ok", "{}", "admin")
        after = store.audit_chain()
        assert len(after) == 7 and verify_chain(after).ok
    finally:
        store.close()
    # Run twice: the home is on PostgreSQL now, and says so.
    assert cp_main(["migrate", "--home", str(tmp_path / "cp"), "--to", pg_database]) == 1
    _one_error(capsys, "already uses")
    # The way back (docs/operator-guide.md, "Move to PostgreSQL"): the runbook's sed.
    subprocess.run(["sed", "-i", 's|^database = "postgresql://.*"|database = "edgefleet.db"|',
                    str(tmp_path / "cp" / "config.toml")], check=True)
    cfg = ControlPlaneConfig.load(tmp_path / "cp")
    assert cfg.database_url == "" and cfg.database == database
    back = open_store(cfg.store_location)
    try:
        assert not isinstance(back, PostgresStore) and back.audit_chain() == chain
    finally:
        back.close()


def test_a_broken_audit_chain_is_not_copied(
    tmp_path: Path, pg_database: str, capsys: pytest.CaptureFixture[str],
) -> None:
    database = _sqlite_home(tmp_path / "cp")
    raw = sqlite3.connect(database)
    raw.executescript("DROP TRIGGER audit_events_no_update;"
                      "UPDATE audit_events SET actor = 'mallory' WHERE seq = 3;")
    raw.close()
    sha = _sha(database)
    capsys.readouterr()
    assert cp_main(["migrate", "--home", str(tmp_path / "cp"), "--to", pg_database]) == 1
    _one_error(capsys, "audit chain is broken at entry 3", "refusing to copy")
    _still_on_sqlite(tmp_path / "cp", database, sha)
    assert _pg_tables(pg_database) == []  # nothing was created


def test_a_value_postgresql_refuses_rolls_everything_back(
    tmp_path: Path, pg_database: str, capsys: pytest.CaptureFixture[str],
) -> None:
    """SQLite keeps any value in any column; one PostgreSQL's types refuse aborts the copy."""
    database = _sqlite_home(tmp_path / "cp")
    raw = sqlite3.connect(database)
    raw.execute("UPDATE enrollment_tokens SET created_at = 'yesterday' WHERE token_hash = 'hash-2'")
    raw.commit()
    raw.close()
    sha = _sha(database)
    capsys.readouterr()
    assert cp_main(["migrate", "--home", str(tmp_path / "cp"), "--to", pg_database]) == 1
    _one_error(capsys, "failed", "yesterday", "nothing was committed", "still uses SQLite")
    _still_on_sqlite(tmp_path / "cp", database, sha)
    assert _pg_tables(pg_database) == []


def test_a_damaged_sqlite_file_is_one_error_line(
    tmp_path: Path, pg_database: str, capsys: pytest.CaptureFixture[str],
) -> None:
    database = _sqlite_home(tmp_path / "cp")
    database.write_bytes(b"not a database, " * 512)
    capsys.readouterr()
    assert cp_main(["migrate", "--home", str(tmp_path / "cp"), "--to", pg_database]) == 1
    _one_error(capsys, "nothing was committed")
    assert ControlPlaneConfig.load(tmp_path / "cp").database_url == ""
    assert _pg_tables(pg_database) == []


def test_a_target_that_holds_a_fleet_is_refused(
    tmp_path: Path, pg_database: str, capsys: pytest.CaptureFixture[str],
) -> None:
    database = _sqlite_home(tmp_path / "cp")
    sha = _sha(database)
    assert cp_main(["init", "--home", str(tmp_path / "other"), "--database", pg_database]) == 0
    theirs = open_store(pg_database)
    chain = theirs.audit_chain()
    theirs.close()
    capsys.readouterr()
    assert cp_main(["migrate", "--home", str(tmp_path / "cp"), "--to", pg_database]) == 1
    _one_error(capsys, "is not empty", "CREATE DATABASE")
    _still_on_sqlite(tmp_path / "cp", database, sha)
    theirs = open_store(pg_database)
    try:
        assert theirs.audit_chain() == chain  # the other fleet, untouched
    finally:
        theirs.close()


def test_a_home_in_use_is_refused(
    tmp_path: Path, pg_database: str, capsys: pytest.CaptureFixture[str],
) -> None:
    home = tmp_path / "cp"
    database = _sqlite_home(home)
    sha = _sha(database)
    # A control plane serving the home holds serve.lock (ControlPlane does, while it runs).
    serving = hold_serving(home)
    capsys.readouterr()
    assert cp_main(["migrate", "--home", str(home), "--to", pg_database]) == 1
    _one_error(capsys, "is serving", "stop it")
    serving.release()
    # Any other program with the database open: SQLite's exclusive lock is refused.
    other = SqliteStore(database)
    try:
        assert cp_main(["migrate", "--home", str(home), "--to", pg_database]) == 1
        _one_error(capsys, "in use by another process")
    finally:
        other.close()
    _still_on_sqlite(home, database, sha)
    assert _pg_tables(pg_database) == []


def test_a_home_whose_control_plane_was_killed_moves_with_its_last_writes(
    tmp_path: Path, pg_database: str,
) -> None:
    """Writes committed to SQLite's WAL by a control plane killed with SIGKILL (never
    checkpointed into the file) are copied too."""
    home = tmp_path / "cp"
    database = _sqlite_home(home)
    script = textwrap.dedent(f"""
        import os, signal
        from control_plane.storage import SqliteStore
        store = SqliteStore({str(database)!r})
        for i in range(3):
            store.add_token(f"late-{{i}}", {{}}, 2000.0, 9e9, "admin")
            store.append_audit(2000.0 + i, "admin", "token.create", "late", "ok", "{{}}", "admin")
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, check=False)
    assert proc.returncode == -signal.SIGKILL
    assert Path(f"{database}-wal").stat().st_size > 0  # the last writes are in the WAL only
    done = migrate(home, pg_database)
    assert done.rows["enrollment_tokens"] == 8 and done.audit_entries == 9
    store = open_store(pg_database)
    try:
        assert {a.target for a in store.audit_chain()} >= {"late"}
    finally:
        store.close()


def test_an_older_sqlite_schema_is_brought_up_to_date_first(
    tmp_path: Path, pg_database: str,
) -> None:
    """A home last served by older software: its schema is upgraded (as serving it would),
    then copied."""
    home = tmp_path / "cp"
    database = _sqlite_home(home)
    older = len(MIGRATIONS) - 2
    database.unlink()
    conn = connect(database)
    sqlite_migrate(conn, MIGRATIONS[:older])
    conn.close()
    done = migrate(home, pg_database)
    assert done.audit_entries == 0 and len(done.rows) >= 20
    raw = sqlite3.connect(database)
    assert raw.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
    raw.close()


def test_an_error_midway_rolls_the_target_back_and_a_retry_succeeds(
    tmp_path: Path, pg_database: str,
) -> None:
    home = tmp_path / "cp"
    database = _sqlite_home(home)
    sha = _sha(database)

    def fail(table: str, rows: int) -> None:
        if table == "enrollment_tokens":
            raise EdgefleetError("injected: the disk is full")

    with pytest.raises(EdgefleetError, match="injected"):
        migrate(home, pg_database, on_table=fail)
    _still_on_sqlite(home, database, sha)
    assert _pg_tables(pg_database) == []  # schema and rows rolled back together
    done = migrate(home, pg_database)
    assert done.rows["enrollment_tokens"] == 5 and done.audit_entries == 6
    assert ControlPlaneConfig.load(home).database_url == pg_database


@pytest.mark.slow
def test_a_migration_killed_midway_leaves_the_home_on_sqlite_and_the_target_droppable(
    tmp_path: Path, pg_database: str,
) -> None:
    home = tmp_path / "cp"
    database = _sqlite_home(home)
    sha = _sha(database)
    script = textwrap.dedent(f"""
        import sys, threading
        from pathlib import Path
        from control_plane.ops.migrate import migrate
        def pause(table, rows):
            if table == "enrollment_tokens":
                print("paused", flush=True)
                threading.Event().wait()  # until SIGKILL
        migrate(Path({str(home)!r}), {pg_database!r}, on_table=pause)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "paused\n"
        # Meanwhile a control plane cannot start on the home.
        with pytest.raises(EdgefleetError, match="being migrated"):
            ControlPlane(ControlPlaneConfig.load(home))
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(30)
    _still_on_sqlite(home, database, sha)
    hold_serving(home).release()  # the dead process's lock went with it
    # Drop and create the target again (the runbook's retry), then migrate.
    name = pg_database.rsplit("/", 1)[1]
    admin = pg_database.rsplit("/", 1)[0] + "/test"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    done = migrate(home, pg_database)
    assert done.rows["enrollment_tokens"] == 5 and done.audit_entries == 6


@pytest.mark.slow
def test_a_live_agent_notices_nothing_when_its_fleet_moves_to_postgresql(
    tmp_path: Path, loop: LoopThread, pg_database: str, trained_bundle: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    cp = start_control_plane(tmp_path / "cp", loop)
    try:
        keys = _keys(cp.home)
        _publish(cp, trained_bundle, tmp_path, 1, 2)
        cfg = cp.enroll_agent(tmp_path / "a", labels={"site": "paris"})
        agent = start_agent(tmp_path / "a", cp.loop, probation_seconds=0.0,
                            drift_window_requests=50)
        try:
            port = agent.wait_for("serving")["http_port"]
            fleet_json(cp, capsys, "rollouts", "start", "--model", "digits", "--version", "1")
            _wait_models(agent, _committed(1))
            # Telemetry, arm statistics and drift windows in the SQLite fleet too.
            X = load_digits().data.astype(np.float32)
            with httpx.Client(timeout=30) as client:
                for i in range(50):
                    _infer(client, port, X[i : i + 1], f"req-{i}")
            agent.agent.supervisor.core.flush(30)
            while not (cp.cp.store.latest_drift("digits") and cp.cp.store.arm_stats("digits")):
                agent.wait_for("heartbeat")  # each heartbeat sends the outbox
            # While it serves, the home is refused.
            capsys.readouterr()
            assert cp_main(["migrate", "--home", str(cp.home), "--to", pg_database]) == 1
            _one_error(capsys, "is serving")
            cp.stop()
            assert cp_main(["migrate", "--home", str(cp.home), "--to", pg_database]) == 0
            capsys.readouterr()
            # Every table, row for row (read here, apart from migrate's own checks).
            copied = _all_rows_pg(pg_database)
            assert copied == _all_rows_sqlite(cp.home / "edgefleet.db")
            assert {t for t, rows in copied.items() if rows} >= {
                "devices", "certificates", "operators", "enrollment_tokens", "model_versions",
                "releases", "rollouts", "device_arms", "roots", "audit_events",
                "telemetry_segments", "arm_stats", "drift_windows"}
            cp.restart()  # same home, same ports, now on PostgreSQL
            assert isinstance(cp.cp.store, PostgresStore)
            assert _keys(cp.home) == keys  # the same CA, server, release and audit keys
            back = time.time()
            for _ in range(2):  # heartbeats answered by the control plane on PostgreSQL
                while agent.wait_for("heartbeat")["server_time"] < back:
                    pass  # one answered before the move, still queued
            device = fleet_json(cp, capsys, "devices", "show", cfg.device_id)
            assert [(m["name"], int(m["version"]), m["state"]) for m in device["models"]] == [
                ("digits", 1, "committed")]  # its release kept
            # A new rollout reaches it: the next release (serial above the copied one) is
            # accepted by the agent.
            fleet_json(cp, capsys, "rollouts", "start", "--model", "digits", "--version", "2")
            _wait_models(agent, _committed(2))
        finally:
            agent.stop()
        verdict = fleet_json(cp, capsys, "audit", "verify")
        assert verdict["ok"] and verdict["entries"] >= 6, verdict
    finally:
        cp.stop()
