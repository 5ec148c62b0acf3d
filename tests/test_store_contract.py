"""The storage contract: every test here runs on SQLite and on PostgreSQL (``store`` fixture,
tests/store_support.py), and a backend that lacks a method of ``Store`` or a migration fails."""

from __future__ import annotations

import asyncio
import inspect
import json
import multiprocessing
import sqlite3
import threading
from pathlib import Path
from typing import Any

import psycopg
import pytest

from control_plane.domain.audit_chain import verify_chain
from control_plane.domain.record_columns import TelemetryWrite
from control_plane.domain.records import (
    ArmStatsRecord,
    CertificateRecord,
    Derived,
    DeviceRecord,
    DriftWindowRecord,
    ExperimentRecord,
    ExperimentState,
    InstalledModel,
    JobState,
    ModelVersionRecord,
    ReleaseRecord,
    ReportRefusal,
    RolloutState,
    SampleRecord,
    TelemetryRecord,
)
from control_plane.domain.retraining import DriftPolicy
from control_plane.storage import Store, open_store
from control_plane.storage import sqlite as sqlite_store
from control_plane.storage.heartbeats import HeartbeatWriter
from control_plane.storage.migrations import MIGRATIONS
from control_plane.storage.pg_migrations import pg_migrations, translate
from control_plane.storage.postgres import PostgresStore, redact
from control_plane.storage.sqlite import SqliteStore
from fleetcore.errors import AlreadyExistsError, NotFoundError, TokenError
from tests.store_support import pg_database, store, store_url

DAY = 86400.0

__all__ = ["pg_database", "store", "store_url"]  # fixtures (tests/store_support.py)


def _device(store: Store, device_id: str = "dev-1", labels: dict[str, str] | None = None) -> None:
    store.add_token(f"tok-{device_id}", labels or {"site": "a"}, 0, 100, "admin")
    store.enroll(f"tok-{device_id}", 1, DeviceRecord(device_id, {}, 1.0),
                 CertificateRecord(f"serial-{device_id}", "device", device_id, 0, 10 * DAY, 1))


def _model(store: Store, version: int = 1, manifest: dict[str, object] | None = None) -> None:
    store.add_model_version(ModelVersionRecord(
        "digits", version, f"sha256:{version:064x}", 1000 + version, float(version), "alice",
        "key", json.dumps(manifest or {"name": "digits", "version": version,
                                       "metrics": {"accuracy": 0.9}, "lineage": "x" * 100})))


# --- what every backend must have ---

@pytest.mark.parametrize("backend", [SqliteStore, PostgresStore])
def test_every_backend_implements_every_method_of_store(backend: type[Store]) -> None:
    assert Store.__abstractmethods__  # the interface is abstract ...
    assert not backend.__abstractmethods__, f"{backend.__name__} lacks methods"  # ... they aren't
    for name in sorted(Store.__abstractmethods__):
        assert callable(getattr(backend, name)), name


SQLITE_ONLY = ("INSERT OR ", "OR REPLACE", "rowid", "json_extract", "json_object", "lastrowid",
               "PRAGMA", "CAST(", "GROUP_CONCAT", "strftime")


def test_postgresql_inherits_no_sqlite_only_sql() -> None:
    """A method PostgresStore takes from SqliteStore as is runs its SQL on PostgreSQL: it must
    use what both speak (or be overridden in postgres.py). Catches a new method before its
    contract test is written."""
    checked = 0
    for name, member in vars(SqliteStore).items():
        function = getattr(member, "__func__", member)  # a staticmethod's function
        if not inspect.isfunction(function) or name in vars(PostgresStore):
            continue  # not a method, or overridden
        checked += 1
        source = inspect.getsource(function)
        found = [token for token in SQLITE_ONLY if token in source]
        assert not found, f"SqliteStore.{name} uses {found}: portable SQL, or override it"
    assert checked > 50


def test_every_migration_has_a_postgresql_version() -> None:
    assert len(pg_migrations()) == len(MIGRATIONS)
    for script in pg_migrations():
        assert "REAL " not in script.replace("DOUBLE PRECISION", "")
        assert " BLOB" not in script and "RAISE(" not in script


def test_a_sqlite_only_migration_fails_until_it_is_written_for_postgresql() -> None:
    with pytest.raises(ValueError, match="OVERRIDES"):
        translate("CREATE TABLE t (id INTEGER PRIMARY KEY AUTOINCREMENT);")
    with pytest.raises(ValueError, match="OVERRIDES"):
        translate("CREATE TRIGGER t AFTER INSERT ON x BEGIN UPDATE y SET n = n + 1; END;")


def test_both_backends_reach_the_same_schema_version(tmp_path: Path, pg_database: str) -> None:
    sqlite_store = open_store(tmp_path / "registry.db")
    pg_store = open_store(pg_database)
    try:
        assert isinstance(sqlite_store, SqliteStore) and isinstance(pg_store, PostgresStore)
        (user_version,) = sqlite_store._conn.execute("PRAGMA user_version").fetchone()
        assert user_version == pg_store.schema_version() == len(MIGRATIONS)
    finally:
        sqlite_store.close()
        pg_store.close()
    again = open_store(pg_database)  # reopening applies nothing twice
    assert isinstance(again, PostgresStore) and again.schema_version() == len(MIGRATIONS)
    again.close()


def test_a_store_url_names_its_backend(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="postgresql://"):
        open_store("mysql://root@127.0.0.1/x")
    assert redact("postgresql://ef:secret@db:5432/fleet") == "postgresql://ef:***@db:5432/fleet"
    assert redact("postgresql://ef@db/fleet") == "postgresql://ef@db/fleet"


# --- the contract, on both backends ---

def test_enrollment_consumes_a_token_once(store: Store) -> None:
    store.add_token("t1", {"site": "a"}, 0, 100, "admin")
    assert store.token_labels("t1", 1) == {"site": "a"}
    dev = store.enroll("t1", 1, DeviceRecord("dev-1", {"site": "b", "x": "y"}, 1.0),
                       CertificateRecord("s1", "device", "dev-1", 0, 50, 1))
    assert dev.labels == {"site": "a", "x": "y"} and dev.cert_serial == "s1"
    with pytest.raises(TokenError, match="already"):
        store.enroll("t1", 2, DeviceRecord("dev-2", {}, 2.0),
                     CertificateRecord("s2", "device", "dev-2", 0, 50, 2))
    assert store.get_device("dev-2") is None and store.get_certificate("s2") is None
    store.add_token("t2", {}, 0, 100, "admin")
    with pytest.raises(TokenError, match="expired"):
        store.token_labels("t2", 100)


def test_heartbeats_devices_and_revocation(store: Store) -> None:
    _device(store, "dev-1")
    _device(store, "dev-2")
    models = [InstalledModel("digits", 1, "committed", "sha256:ab", serving=True)]
    store.record_heartbeat("dev-1", 5.0, "1.2", {"cpus": 2}, models)
    errors = store.record_heartbeats([("dev-2", 6.0, "1.3", {}, []),
                                      ("ghost", 6.0, "1.3", {}, [])])
    assert errors[0] is None and isinstance(errors[1], NotFoundError)
    with pytest.raises(NotFoundError):
        store.record_heartbeat("ghost", 5.0, "1", {}, [])
    one = store.get_device("dev-1")
    assert one is not None and one.models == models and one.host == {"cpus": 2}
    assert [d.id for d in store.list_devices()] == ["dev-1", "dev-2"]
    revoked = store.revoke_device("dev-1", 7.0)
    assert revoked.revoked_at == 7.0
    assert store.revoke_device("dev-1", 8.0).revoked_at == 7.0  # the first time is kept
    assert [c.serial for c in store.revoked_certificates(8.0)] == ["serial-dev-1"]
    assert store.revoked_certificates(11 * DAY) == []  # expired: no longer on the CRL
    store.add_certificate(CertificateRecord("serial-2b", "device", "dev-2", 0, DAY, 9),
                          current_for_device=True)
    two = store.get_device("dev-2")
    assert two is not None and two.cert_serial == "serial-2b"


def test_operators_and_alerts(store: Store) -> None:
    store.add_operator("bob", "viewer", 1.0, "admin")
    with pytest.raises(AlreadyExistsError):
        store.add_operator("bob", "admin", 2.0, "admin")
    store.add_certificate(CertificateRecord("op-1", "operator", "bob", 0, DAY, 1),
                          current_for_device=False)
    assert store.get_operator("bob") == ("viewer", 1.0)
    assert store.list_operators()[0].certificate_serials == ("op-1",)
    assert not store.operator_revoked("bob")
    assert store.revoke_operator("bob", 3.0).revoked_at == 3.0
    assert store.operator_revoked("bob")
    with pytest.raises(NotFoundError):
        store.revoke_operator("nobody", 3.0)
    _device(store)
    assert store.flag_device("dev-1", "clone-suspected", "{}", 4.0)
    assert not store.flag_device("dev-1", "clone-suspected", '{"n":2}', 5.0)
    (alert,) = store.device_alerts("dev-1")
    assert (alert.since, alert.updated_at, alert.detail) == (4.0, 5.0, '{"n":2}')
    store.clear_device_alerts("dev-1", ["clone-suspected"])
    assert store.device_alerts() == []


def test_the_audit_log_is_a_hash_chain_that_refuses_changes(store: Store) -> None:
    for i in range(5):
        store.append_audit(float(i), "alice", "device.revoke", f"dev-{i}", "allowed", "{}",
                           role="admin")
    chain = store.audit_chain()
    assert [r.seq for r in chain] == [1, 2, 3, 4, 5] and verify_chain(chain).ok
    assert [r.seq for r in store.list_audit(2)] == [4, 5]
    refused = (sqlite3.IntegrityError, psycopg.errors.RestrictViolation)
    for statement in ("UPDATE audit_events SET actor = 'mallory'", "DELETE FROM audit_events"):
        with pytest.raises(refused, match="append-only"), \
                store._tx() as c:  # type: ignore[attr-defined]
            c.execute(statement)
    assert store.audit_chain() == chain


def test_registry_rollouts_and_releases(store: Store) -> None:
    _device(store)
    _model(store, 1)
    _model(store, 1)  # the same bundle again: nothing changes
    with pytest.raises(AlreadyExistsError):
        store.add_model_version(ModelVersionRecord("digits", 1, "sha256:" + "f" * 64, 1, 1.0,
                                                   "a", "k", "{}"))
    _model(store, 2)
    summary = store.list_model_versions("digits")
    assert [m.version for m in summary] == [1, 2]
    assert json.loads(summary[0].manifest)["task"] == "classification"
    assert json.loads(summary[0].manifest)["metrics"] == {"accuracy": 0.9}
    assert "lineage" not in json.loads(summary[0].manifest)
    whole = store.get_model_version("digits", 1)
    assert whole is not None and summary[0].manifest_bytes == len(whole.manifest)
    first = store.start_rollout("digits", 1, {"site": "a"}, ["dev-1"], 10.0, "alice",
                                steps=(50, 100), bake_seconds=5.0)
    assert first.id >= 1 and first.state is RolloutState.RUNNING and first.steps == (50, 100)
    assert [(a.version, a.weight) for a in store.device_arms("dev-1")] == [(1, 1.0)]
    second = store.start_rollout("digits", 2, {}, ["dev-1"], 20.0, "alice")
    assert second.id > first.id and second.previous_version == 1
    store.update_rollout(second.id, state="completed", history=["done"])
    latest = store.get_rollout("digits")
    assert latest is not None and latest.state is RolloutState.COMPLETED
    assert latest.history == ("done",) and store.running_rollouts() == []
    store.assign_version("digits", 0, ["dev-1"])
    assert store.device_arms("dev-1") == []
    store.put_release(ReleaseRecord("dev-1", 1, b"\x00doc\xff", b"sig", 1.0, 2.0, "c1"))
    store.put_release(ReleaseRecord("dev-1", 2, b"doc2", b"sig2", 3.0, 4.0, "c2"))
    with pytest.raises(AlreadyExistsError):
        store.put_release(ReleaseRecord("dev-1", 2, b"old", b"s", 5.0, 6.0, "c"))
    assert store.get_release("dev-1") == ReleaseRecord("dev-1", 2, b"doc2", b"sig2", 3.0, 4.0,
                                                       "c2")


def test_telemetry_is_stored_once_and_rolled_up_when_it_expires(store: Store) -> None:
    _device(store)
    drift = DriftWindowRecord("dev-1", "digits", 1, 0.0, 60.0, 100, 0.3, True, 0.1, ("f1",),
                              {"f1": 0.3})
    arms = ArmStatsRecord("dev-1", "digits", 1, 10, 1, 2.0, 5.0, 4, 3, 61.0)
    records = [TelemetryRecord(1, "drift", 60.0, b"\x01" * 10),
               TelemetryRecord(2, "arm_stats", 61.0, b"\x02" * 20)]
    refusal = ReportRefusal("dev-1", "arm_stats", "not-in-release")
    assert store.ingest_telemetry("dev-1", records, {1: drift, 2: arms}, 100.0, 3, 7,
                                  [refusal]) == [1, 2]
    assert store.ingest_telemetry("dev-1", records, {1: drift, 2: arms}, 101.0, 0, 0) == [1, 2]
    assert store.telemetry_counts()["telemetry"] == 2
    assert store.outbox_status() == {"dev-1": (0, 0)}
    assert store.report_refusals("dev-1") == {"arm_stats/not-in-release": 1}
    assert store.refusal_totals() == {"dev-1": 1}
    store.count_refusals([refusal], 102.0)
    assert store.all_report_refusals() == {"dev-1": {"arm_stats/not-in-release": 2}}
    (latest,) = store.latest_drift("digits")
    assert latest.score == 0.3 and latest.drifted_features == ("f1",)
    assert store.recent_drift("digits", 5)["dev-1"][0].rows == 100
    windows, more = store.drift_history("digits", "", 0.0, 10)
    assert len(windows) == 1 and not more and windows[0].feature_psi == {"f1": 0.3}
    assert store.arm_stats("digits")[0].requests == 10 == store.all_arm_stats()[0].requests
    history, cut = store.arm_history("digits", 0.0, 10)
    assert [h.requests for h in history] == [10] and not cut
    assert store.expire_telemetry(raw_before=200.0, drift_before=200.0) == 4
    assert store.telemetry_rollup("dev-1") == {"drift": (1, 10), "arm_stats": (1, 20)}
    (day,) = store.drift_days("digits", "dev-1", 0.0)
    assert (day.windows, day.drifted, day.rows, day.max_score) == (1, 1, 100, 0.3)
    assert store.telemetry_counts()["drift_windows"] == 0


def test_telemetry_groups_commit_together_and_store_each_record_once(store: Store) -> None:
    _device(store)
    _device(store, "dev-2")
    drift = DriftWindowRecord("dev-1", "digits", 1, 0.0, 60.0, 100, 0.3, True, 0.1, ("f1",),
                              {"f1": 0.3})
    plain = [TelemetryRecord(s, "error", 1.0, b"x%d" % s) for s in (2, 3)]
    first = TelemetryWrite("dev-1", [TelemetryRecord(1, "drift", 60.0, b"d"), *plain],
                           {1: drift}, 100.0, 0, 5)
    # The same batch again in the group (a redelivery), one overlapping it, another device's.
    overlap = TelemetryWrite("dev-1", [plain[1], TelemetryRecord(4, "error", 1.0, b"x4")], {},
                             101.0, 1, 2, [ReportRefusal("dev-1", "error", "too-large")])
    other = TelemetryWrite("dev-2", plain, {}, 101.0, 0, 0)
    store.ingest_telemetry_many([first, first, overlap, other])
    assert store.telemetry_counts()["telemetry"] == 6  # dev-1: 1..4, dev-2: 2, 3
    assert len(store.recent_drift("digits", 5)["dev-1"]) == 1  # its derived row once
    assert store.outbox_status() == {"dev-1": (1, 2), "dev-2": (0, 0)}  # the last write's
    assert store.report_refusals("dev-1") == {"error/too-large": 1}
    store.ingest_telemetry_many([])
    assert store.telemetry_counts()["telemetry"] == 6


def test_a_batch_mixing_stored_and_new_records_writes_derived_rows_of_the_new_ones_only(
        store: Store) -> None:
    _device(store)

    def arms(seq: int, requests: int) -> tuple[TelemetryRecord, ArmStatsRecord]:
        return (TelemetryRecord(seq, "arm_stats", float(seq), b"a%d" % seq),
                ArmStatsRecord("dev-1", "digits", 1, requests, 0, 1.0, 2.0, 0, 0, float(seq)))

    (r1, a1), (r2, a2), (r3, a3) = arms(1, 10), arms(2, 20), arms(3, 5)
    store.ingest_telemetry("dev-1", [r1, r2], {1: a1, 2: a2}, 100.0, 0, 0)
    # seq 2 again with other numbers (ignored: stored already), seq 3 new, seq 3 twice in one
    # batch (stored once), and a plain record between them.
    changed2 = ArmStatsRecord("dev-1", "digits", 1, 999, 0, 1.0, 2.0, 0, 0, 2.0)
    store.ingest_telemetry("dev-1", [r2, TelemetryRecord(9, "error", 1.0, b"e"), r3, r3],
                           {2: changed2, 3: a3}, 101.0, 0, 0)
    history, _ = store.arm_history("digits", 0.0, 10)
    assert sorted(h.requests for h in history) == [5, 10, 20]
    assert store.arm_stats("digits")[0].requests == 5  # the newest snapshot (seq 3)
    assert store.telemetry_counts()["telemetry"] == 4
    # A flood of refused records counts each one, into one counter per reason.
    flood = [ReportRefusal("dev-1", "arm_stats", "not-in-release")] * 300
    store.ingest_telemetry("dev-1", [], {}, 102.0, 0, 0,
                           [*flood, ReportRefusal("dev-1", "drift", "too-large", 2)])
    store.count_refusals(flood[:5], 103.0)
    assert store.report_refusals("dev-1") == {"arm_stats/not-in-release": 305,
                                              "drift/too-large": 2}


def _batch(device_id: str, seqs: Any, tag: str, now: float = 100.0,
           derived: dict[int, Derived] | None = None) -> TelemetryWrite:
    """A write whose records carry ``tag``: which batch stored a seq shows in its payload."""
    return TelemetryWrite(device_id, [TelemetryRecord(s, "error", 1.0, f"{tag}:{s}".encode())
                                      for s in seqs], derived or {}, now, 0, 0)


def _tags(store: Store, device_id: str) -> dict[int, str]:
    return {r.seq: r.payload.decode().split(":")[0] for r in store.telemetry_records(device_id)}


def test_a_group_is_checked_against_what_was_stored_a_chunk_of_batches_at_a_time(
        store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """A group's stored seqs are looked up in one query a chunk of batches (two here, so a
    group of five takes three): resends across groups and within one, ranges overlapping out
    of order, two devices; the first batch to carry a seq is the one stored."""
    monkeypatch.setattr(sqlite_store, "_STORED_CHUNK", 2)
    _device(store)
    _device(store, "dev-2")
    arm = ArmStatsRecord("dev-1", "digits", 1, 7, 0, 1.0, 2.0, 0, 0, 8.0)
    store.ingest_telemetry_many([_batch("dev-1", range(1, 6), "a"),
                                 _batch("dev-2", range(1, 4), "a")])
    store.ingest_telemetry_many([
        _batch("dev-1", [10, 11, 12], "b", 101.0),
        _batch("dev-1", [4, 5, 6, 7], "c", 101.0),  # 4 and 5 stored before
        _batch("dev-2", [3, 4], "d", 102.0),  # 3 stored before
        # 7 and 11 came earlier in this group, 8 is new: only its arm row is written
        _batch("dev-1", [11, 8, 7, 9], "e", 103.0, {7: arm, 8: arm}),
        _batch("dev-2", [2, 5, 5, 6], "f", 104.0),  # 2 stored before; 5 twice in the batch
    ])
    assert _tags(store, "dev-1") == {1: "a", 2: "a", 3: "a", 4: "a", 5: "a", 6: "c", 7: "c",
                                     8: "e", 9: "e", 10: "b", 11: "b", 12: "b"}
    assert _tags(store, "dev-2") == {1: "a", 2: "a", 3: "a", 4: "d", 5: "f", 6: "f"}
    history, _ = store.arm_history("digits", 0.0, 10)
    assert [h.updated_at for h in history] == [8.0]  # once, for seq 8
    assert store.outbox_status() == {"dev-1": (0, 0), "dev-2": (0, 0)}
    assert store.telemetry_counts()["telemetry"] == 18


def test_a_group_the_database_refuses_stores_nothing_and_the_store_goes_on(store: Store) -> None:
    """One write of a group fails in the database (a seq past a 64-bit signed integer): the
    whole group is rolled back (on PostgreSQL its statements went out pipelined), and the
    next group is stored on the same store."""
    _device(store)
    _device(store, "dev-2")
    with pytest.raises((OverflowError, psycopg.Error)):
        store.ingest_telemetry_many([_batch("dev-1", [1, 2], "a"),
                                     _batch("dev-2", [2**63 + 1], "a")])
    assert store.telemetry_records("dev-1") == [] and store.outbox_status() == {}
    for _ in range(3):  # every connection the pool may hand out next
        store.ingest_telemetry_many([_batch("dev-1", [1, 2], "b"), _batch("dev-2", [1], "b")])
    assert _tags(store, "dev-1") == {1: "b", 2: "b"} and _tags(store, "dev-2") == {1: "b"}


def test_experiments(store: Store) -> None:
    _device(store)
    _model(store, 1)
    _model(store, 2)
    exp = ExperimentRecord("digits", 1, 2, 0.2, ExperimentState.RUNNING, {}, ("dev-1",), 1.0,
                           "alice")
    store.start_experiment(exp)
    assert sorted((a.version, a.weight) for a in store.device_arms("dev-1")) == [(1, 0.8),
                                                                                 (2, 0.2)]
    store.record_decision("digits", "promote", 0.01, "better", 2.0, ExperimentState.PROMOTED)
    decided = store.get_experiment("digits")
    assert decided is not None and decided.p_value == 0.01
    store.start_experiment(exp)  # a new experiment forgets the old decision
    again = store.get_experiment("digits")
    assert again is not None and again.decision == "" and again.p_value is None
    stopped = store.stop_experiment("digits", 3.0)
    assert stopped.state is ExperimentState.STOPPED
    assert [(a.version, a.weight) for a in store.device_arms("dev-1")] == [(1, 1.0)]
    with pytest.raises(NotFoundError):
        store.stop_experiment("digits", 4.0)


def test_retraining_policies_jobs_and_samples(store: Store) -> None:
    _device(store)
    store.set_policy(DriftPolicy("digits", "/p/PIPELINE.toml", sample_rate=0.5))
    store.set_policy(DriftPolicy("digits", "/q/PIPELINE.toml", margin=0.1))
    policy = store.get_policy("digits")
    assert policy is not None and policy.pipeline == "/q/PIPELINE.toml" and policy.margin == 0.1
    first = store.add_job("digits", "drift", 1, 1.0)
    second = store.add_job("digits", "drift", 1, 2.0)
    assert second > first
    store.update_job(first, JobState.FAILED, 3.0, "boom")
    assert [j.id for j in store.jobs("digits")] == [second, first]
    assert [j.id for j in store.jobs(states=(JobState.FAILED,))] == [first]
    samples = [TelemetryRecord(s, "sample", 1.0, b"{}") for s in (1, 2)]
    derived = {s: SampleRecord("dev-1", "digits", 1, [[0.0]] * s, [1] * s, {}, "eu")
               for s in (1, 2)}
    store.ingest_telemetry("dev-1", samples, dict(derived), 5.0, 0, 0)
    (summary,) = store.sample_summary("digits")
    assert (summary.stored, summary.unused, summary.devices) == (3, 3, 1)
    assert store.unused_sample_regions("digits") == ["eu"]
    assert len(store.take_samples("digits", second)) == 2
    store.release_samples(second)
    assert store.refuse_samples("digits", {"eu": "too few"}, "sample-refused", 6.0) == 2
    (summary,) = store.sample_summary("digits")
    assert summary.stored == 0 and summary.refused == {"too few": 2}
    store.ping()


# --- PostgreSQL under concurrent writers ---

def _append_many(url: str, worker: int, count: int) -> None:
    s = open_store(url)
    try:
        for i in range(count):
            s.append_audit(float(i), f"worker-{worker}", "test.append", str(i), "allowed", "{}")
    finally:
        s.close()


def test_concurrent_audit_appends_from_several_processes_keep_one_chain(pg_database: str) -> None:
    open_store(pg_database).close()  # migrated once, before the writers race
    ctx = multiprocessing.get_context("spawn")
    workers = [ctx.Process(target=_append_many, args=(pg_database, w, 25)) for w in range(4)]
    for p in workers:
        p.start()
    for p in workers:
        p.join(60)
        assert p.exitcode == 0
    s = open_store(pg_database)
    try:
        chain = s.audit_chain()
    finally:
        s.close()
    assert len(chain) == 100 and verify_chain(chain).ok
    assert {r.actor for r in chain} == {f"worker-{w}" for w in range(4)}


def test_replicas_starting_together_migrate_once(pg_database: str) -> None:
    ctx = multiprocessing.get_context("spawn")
    starters = [ctx.Process(target=_append_many, args=(pg_database, w, 1)) for w in range(3)]
    for p in starters:
        p.start()
    for p in starters:
        p.join(60)
        assert p.exitcode == 0
    s = open_store(pg_database)
    assert isinstance(s, PostgresStore) and s.schema_version() == len(MIGRATIONS)
    assert verify_chain(s.audit_chain()).ok
    s.close()


def test_postgresql_compresses_segment_bodies_with_lz4_set_once_at_start(pg_database: str
                                                                         ) -> None:
    """TUNING (pg_migrations.py): segment bodies are TOAST-compressed with lz4, which this
    machine's server has; a replica starting on a tuned database leaves it as it is."""
    s = open_store(pg_database)
    try:
        _device(s)
        s.ingest_telemetry_many([_batch("dev-1", range(1, 501), "a" * 100)])
    finally:
        s.close()
    again = open_store(pg_database)  # the settings are applied again: nothing changes
    try:
        assert len(again.telemetry_records("dev-1")) == 500
    finally:
        again.close()
    with psycopg.connect(pg_database) as c:
        method = c.execute("SELECT attcompression FROM pg_attribute WHERE attrelid ="
                           " 'telemetry_segments'::regclass AND attname = 'body'").fetchall()
        stored = c.execute("SELECT pg_column_compression(body) FROM telemetry_segments"
                           ).fetchall()
    assert (method, stored) == ([("l",)], [("lz4",)])


def test_a_token_raced_by_concurrent_enrollments_enrolls_one_device(store: Store) -> None:
    """Devices present the same token at once: one is enrolled, the others refused (on
    PostgreSQL without the writer lock, most rounds enrolled several)."""
    for round_ in range(3):
        token = f"shared-{round_}"
        store.add_token(token, {}, 0, 100, "admin")
        barrier = threading.Barrier(6)
        outcomes: list[str] = []

        def enroll(device: str, token: str = token, barrier: threading.Barrier = barrier,
                   outcomes: list[str] = outcomes) -> None:
            barrier.wait()
            try:
                store.enroll(token, 1, DeviceRecord(device, {}, 1.0),
                             CertificateRecord(f"s-{device}", "device", device, 0, 50, 1))
                outcomes.append("enrolled")
            except TokenError:
                outcomes.append("refused")

        threads = [threading.Thread(target=enroll, args=(f"dev-{round_}-{n}",))
                   for n in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert sorted(outcomes) == ["enrolled"] + ["refused"] * 5
    assert len(store.list_devices()) == 3


def test_heartbeats_written_together_fail_alone(store: Store) -> None:
    """HeartbeatWriter's group commit on both backends (the commit count on SQLite:
    tests/test_bench_fleet.py)."""
    for i in range(3):
        _device(store, f"dev-{i}")
    writer = HeartbeatWriter(store)

    async def beats() -> list[Any]:
        return await asyncio.gather(
            *(writer.record(f"dev-{i}", 5.0, "2", {"os": "Linux"}, []) for i in range(3)),
            writer.record("dev-unknown", 5.0, "2", {}, []), return_exceptions=True)

    results = asyncio.run(beats())
    assert results[:3] == [None, None, None] and isinstance(results[3], NotFoundError)
    assert all(d.last_seen == 5.0 and d.agent_version == "2" for d in store.list_devices())


def test_raw_records_kept_a_row_each_and_in_segments_read_dedupe_and_expire_as_one(
        store: Store) -> None:
    """Raw telemetry is stored one segment per batch (migration 18); rows written a record
    each before it stay readable, count against duplicates and expire with the segments."""
    _device(store)
    with store._tx() as c:  # type: ignore[attr-defined]  # rows from before migration 18
        c.executemany("INSERT INTO telemetry(device_id, seq, kind, created_at, received_at,"
                      " payload) VALUES (?,?,?,?,?,?)",
                      [("dev-1", s, "error", 1.0, 50.0, b"old%d" % s) for s in (1, 2)])
    arms: dict[int, Derived] = {
        s: ArmStatsRecord("dev-1", "digits", 1, 10 * s, 0, 1.0, 2.0, 0, 0, float(s))
        for s in (2, 3)}

    def rec(seq: int, kind: str = "error") -> TelemetryRecord:
        return TelemetryRecord(seq, kind, float(seq), b"new%d" % seq)

    store.ingest_telemetry("dev-1", [rec(1), rec(2, "arm_stats"), rec(3, "arm_stats"),
                                     rec(4)], arms, 100.0, 0, 0)
    history, _ = store.arm_history("digits", 0.0, 10)
    assert [h.requests for h in history] == [30]  # seq 2 was stored before: no derived row
    store.ingest_telemetry("dev-1", [rec(3), rec(4), rec(5)], {}, 101.0, 0, 0)  # a resend
    store.ingest_telemetry("dev-1", [rec(10), rec(6), rec(8), rec(6)], {}, 102.0, 0, 0)
    kept = store.telemetry_records("dev-1")
    assert [r.seq for r in kept] == [1, 2, 3, 4, 5, 6, 8, 10]
    assert [r.payload for r in kept[:3]] == [b"old1", b"old2", b"new3"]  # first stored wins
    assert kept[2] == TelemetryRecord(3, "arm_stats", 3.0, b"new3")
    assert store.telemetry_counts()["telemetry"] == 8
    # Expiry takes the old rows and the segments received before its cut, oldest first.
    assert store.expire_telemetry(raw_before=101.5, drift_before=0.0) == 2 + 2 + 1
    assert [r.seq for r in store.telemetry_records("dev-1")] == [6, 8, 10]
    assert store.telemetry_rollup("dev-1") == {"error": (4, 16), "arm_stats": (1, 4)}
    assert store.expire_telemetry(raw_before=200.0, drift_before=0.0) == 3
    assert store.telemetry_records("dev-1") == [] and store.telemetry_counts()["telemetry"] == 0
    assert store.telemetry_rollup("dev-1")["error"] == (7, 29)
