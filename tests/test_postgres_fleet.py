"""A control plane on PostgreSQL serves a real agent end to end: enrollment, publish, rollout,
telemetry (arm statistics and drift), and an audit chain `fleet audit verify` accepts."""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import pytest
from sklearn.datasets import load_digits

from control_plane.cli import main as cp_main
from control_plane.config import ControlPlaneConfig
from control_plane.storage import open_store
from control_plane.storage.postgres import PostgresStore
from tests.store_support import pg_database
from tests.support import LoopThread, fleet_json, start_agent, start_control_plane
from tests.test_delivery import _committed, _wait_models
from tests.test_serving_fleet import _infer, _publish

__all__ = ["pg_database"]  # fixtures (tests/store_support.py)


def test_init_on_postgresql_records_the_url_and_refuses_a_database_in_use(
    tmp_path: Path, pg_database: str, capsys: pytest.CaptureFixture[str],
) -> None:
    assert cp_main(["init", "--home", str(tmp_path / "cp"), "--database", pg_database]) == 0
    cfg = ControlPlaneConfig.load(tmp_path / "cp")
    assert cfg.database_url == pg_database and not (tmp_path / "cp" / "edgefleet.db").exists()
    store = open_store(cfg.store_location)
    try:
        assert [o.name for o in store.list_operators()] == ["admin"]
        assert [e.action for e in store.audit_chain()] == ["control-plane.init"]
    finally:
        store.close()
    capsys.readouterr()
    # backup copies SQLite homes only: it says what to use instead.
    assert cp_main(["backup", "--home", str(tmp_path / "cp"), "--out",
                    str(tmp_path / "b.tar.gz")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "pg_dump" in err and err.count("\n") == 1
    assert not (tmp_path / "b.tar.gz").exists()
    # A second home on the same database: refused before it makes a key.
    assert cp_main(["init", "--home", str(tmp_path / "other"), "--database", pg_database]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "holds a fleet already" in err and err.count("\n") == 1
    assert list((tmp_path / "other").iterdir()) == []
    # A database that does not exist: one line naming it.
    missing = pg_database.rsplit("/", 1)[0] + "/no_such_database"
    assert cp_main(["init", "--home", str(tmp_path / "third"), "--database", missing]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: cannot connect to PostgreSQL") and "no_such_database" in err
    assert err.count("\n") == 1


@pytest.mark.slow
@pytest.mark.parametrize("transport", ["grpc", "mqtt"])
def test_a_control_plane_on_postgresql_serves_a_real_agent(
    tmp_path: Path, loop: LoopThread, pg_database: str, trained_bundle: Path,
    capsys: pytest.CaptureFixture[str], transport: str,
) -> None:
    if transport == "grpc":
        cp = start_control_plane(tmp_path / "cp", loop, database_url=pg_database)
    else:  # a real Mosquitto and the bridge writing telemetry to PostgreSQL
        from tests.mqtt_support import start_mqtt_control_plane  # noqa: PLC0415

        cp = start_mqtt_control_plane(tmp_path / "cp", loop, database_url=pg_database)
    try:
        assert isinstance(cp.cp.store, PostgresStore)
        assert ControlPlaneConfig.load(cp.home).database_url == pg_database  # recorded
        assert not (cp.home / "edgefleet.db").exists()  # nothing went to SQLite
        _publish(cp, trained_bundle, tmp_path, 1)
        cfg = cp.enroll_agent(tmp_path / "a", labels={"site": "paris"})
        agent = start_agent(tmp_path / "a", cp.loop, probation_seconds=0.0,
                            drift_window_requests=100, transport=cp.transport)
        try:
            port = agent.wait_for("serving")["http_port"]
            fleet_json(cp, capsys, "rollouts", "start", "--model", "digits", "--version", "1")
            _wait_models(agent, _committed(1))
            X = load_digits().data.astype(np.float32)
            with httpx.Client(timeout=30) as client:
                for i in range(100):
                    _infer(client, port, X[i : i + 1], f"req-{i}")
            agent.agent.supervisor.core.flush(30)
            for _ in range(10):  # each heartbeat sends the outbox
                agent.wait_for("heartbeat")
                stats = cp.cp.store.arm_stats("digits")
                if stats and stats[0].requests >= 100 and cp.cp.store.latest_drift("digits"):
                    break
            assert [(s.device_id, s.version, s.requests) for s in stats] == [
                (cfg.device_id, 1, 100)]
            assert cp.cp.store.latest_drift("digits")[0].device_id == cfg.device_id
            device = fleet_json(cp, capsys, "devices", "show", cfg.device_id)
            assert [(m["name"], int(m["version"]), m["state"]) for m in device["models"]] == [
                ("digits", 1, "committed")]
        finally:
            agent.stop()
        verdict = fleet_json(cp, capsys, "audit", "verify")
        assert verdict["ok"] and verdict["entries"] >= 4, verdict
    finally:
        cp.stop()
        if cp.broker is not None:
            cp.broker.stop()
