"""The control plane's SQLite schema, as ordered migrations (each applied exactly once)."""

from __future__ import annotations

__all__ = ["MIGRATIONS"]

MIGRATIONS: list[str] = [
    # 1: registry, PKI bookkeeping, append-only audit log
    """
    CREATE TABLE enrollment_tokens (
        token_hash TEXT PRIMARY KEY,
        labels TEXT NOT NULL,
        created_at REAL NOT NULL,
        expires_at REAL NOT NULL,
        created_by TEXT NOT NULL,
        used_at REAL,
        used_by TEXT
    );
    CREATE TABLE devices (
        id TEXT PRIMARY KEY,
        labels TEXT NOT NULL,
        enrolled_at REAL NOT NULL,
        last_seen REAL,
        agent_version TEXT NOT NULL DEFAULT '',
        host TEXT NOT NULL DEFAULT '{}',
        models TEXT NOT NULL DEFAULT '[]',
        revoked_at REAL,
        cert_serial TEXT NOT NULL DEFAULT '',
        cert_not_after REAL NOT NULL DEFAULT 0
    );
    CREATE TABLE certificates (
        serial TEXT PRIMARY KEY,
        kind TEXT NOT NULL,
        subject TEXT NOT NULL,
        not_before REAL NOT NULL,
        not_after REAL NOT NULL,
        issued_at REAL NOT NULL,
        revoked_at REAL
    );
    CREATE INDEX certificates_subject ON certificates(kind, subject);
    CREATE TABLE operators (
        name TEXT PRIMARY KEY,
        role TEXT NOT NULL,
        created_at REAL NOT NULL,
        created_by TEXT NOT NULL
    );
    CREATE TABLE audit_events (
        seq INTEGER PRIMARY KEY,
        time REAL NOT NULL,
        actor TEXT NOT NULL,
        action TEXT NOT NULL,
        target TEXT NOT NULL,
        outcome TEXT NOT NULL,
        detail TEXT NOT NULL,
        prev_hash TEXT NOT NULL,
        hash TEXT NOT NULL
    );
    CREATE TRIGGER audit_events_no_update BEFORE UPDATE ON audit_events
    BEGIN SELECT RAISE(ABORT, 'audit_events is append-only'); END;
    CREATE TRIGGER audit_events_no_delete BEFORE DELETE ON audit_events
    BEGIN SELECT RAISE(ABORT, 'audit_events is append-only'); END;
    """,
    # 2: model registry, rollouts, per-device arms and signed release documents
    """
    CREATE TABLE model_versions (
        name TEXT NOT NULL,
        version INTEGER NOT NULL,
        digest TEXT NOT NULL,
        length INTEGER NOT NULL,
        created_at REAL NOT NULL,
        published_by TEXT NOT NULL,
        publisher_key TEXT NOT NULL,
        manifest TEXT NOT NULL,
        PRIMARY KEY (name, version)
    );
    CREATE TABLE rollouts (
        id INTEGER PRIMARY KEY,
        model TEXT NOT NULL,
        version INTEGER NOT NULL,
        selector TEXT NOT NULL,
        state TEXT NOT NULL,
        created_at REAL NOT NULL,
        created_by TEXT NOT NULL,
        device_ids TEXT NOT NULL,
        FOREIGN KEY (model, version) REFERENCES model_versions(name, version)
    );
    CREATE INDEX rollouts_model ON rollouts(model, id);
    CREATE TABLE device_arms (
        device_id TEXT NOT NULL REFERENCES devices(id),
        model TEXT NOT NULL,
        version INTEGER NOT NULL,
        weight REAL NOT NULL,
        shadow INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (device_id, model, version)
    );
    CREATE TABLE releases (
        device_id TEXT PRIMARY KEY REFERENCES devices(id),
        serial INTEGER NOT NULL,
        document BLOB NOT NULL,
        signature BLOB NOT NULL,
        issued_at REAL NOT NULL,
        expires_at REAL NOT NULL,
        content TEXT NOT NULL
    );
    """,
    # 3: telemetry (deduplicated on (device, seq)), drift windows, arm stats, experiments
    """
    CREATE TABLE telemetry (
        device_id TEXT NOT NULL,
        seq INTEGER NOT NULL,
        kind TEXT NOT NULL,
        created_at REAL NOT NULL,
        received_at REAL NOT NULL,
        payload BLOB NOT NULL,
        PRIMARY KEY (device_id, seq)
    );
    CREATE TABLE telemetry_status (
        device_id TEXT PRIMARY KEY,
        dropped INTEGER NOT NULL,
        depth INTEGER NOT NULL,
        updated_at REAL NOT NULL
    );
    CREATE TABLE drift_windows (
        device_id TEXT NOT NULL,
        seq INTEGER NOT NULL,
        model TEXT NOT NULL,
        version INTEGER NOT NULL,
        start REAL NOT NULL,
        "end" REAL NOT NULL,
        rows INTEGER NOT NULL,
        score REAL NOT NULL,
        drifted INTEGER NOT NULL,
        prediction_psi REAL NOT NULL,
        drifted_features TEXT NOT NULL,
        PRIMARY KEY (device_id, seq)
    );
    CREATE INDEX drift_windows_model ON drift_windows(model, device_id, "end");
    CREATE TABLE arm_stats (
        device_id TEXT NOT NULL,
        model TEXT NOT NULL,
        version INTEGER NOT NULL,
        requests INTEGER NOT NULL,
        errors INTEGER NOT NULL,
        p50_ms REAL NOT NULL,
        p95_ms REAL NOT NULL,
        labelled INTEGER NOT NULL,
        correct INTEGER NOT NULL,
        updated_at REAL NOT NULL,
        seq INTEGER NOT NULL,
        PRIMARY KEY (device_id, model, version)
    );
    CREATE TABLE experiments (
        model TEXT PRIMARY KEY,
        champion INTEGER NOT NULL,
        challenger INTEGER NOT NULL,
        weight REAL NOT NULL,
        state TEXT NOT NULL,
        selector TEXT NOT NULL,
        device_ids TEXT NOT NULL,
        created_at REAL NOT NULL,
        created_by TEXT NOT NULL
    );
    """,
    # 4: the operator's role in each audit entry
    """
    ALTER TABLE audit_events ADD COLUMN role TEXT NOT NULL DEFAULT '';
    """,
    # 5: the statistical decision of an experiment
    """
    ALTER TABLE experiments ADD COLUMN decision TEXT NOT NULL DEFAULT '';
    ALTER TABLE experiments ADD COLUMN p_value REAL;
    ALTER TABLE experiments ADD COLUMN decision_reason TEXT NOT NULL DEFAULT '';
    ALTER TABLE experiments ADD COLUMN decided_at REAL;
    """,
    # 6: staged rollouts
    """
    ALTER TABLE rollouts ADD COLUMN steps TEXT NOT NULL DEFAULT '[100]';
    ALTER TABLE rollouts ADD COLUMN step INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE rollouts ADD COLUMN step_started_at REAL NOT NULL DEFAULT 0;
    ALTER TABLE rollouts ADD COLUMN bake_seconds REAL NOT NULL DEFAULT 0;
    ALTER TABLE rollouts ADD COLUMN gates TEXT NOT NULL DEFAULT '[]';
    ALTER TABLE rollouts ADD COLUMN on_failure TEXT NOT NULL DEFAULT 'pause';
    ALTER TABLE rollouts ADD COLUMN previous_version INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE rollouts ADD COLUMN reason TEXT NOT NULL DEFAULT '';
    ALTER TABLE rollouts ADD COLUMN history TEXT NOT NULL DEFAULT '[]';
    ALTER TABLE rollouts ADD COLUMN device_timeout_seconds REAL NOT NULL DEFAULT 600;
    UPDATE rollouts SET state = 'running' WHERE state = 'active';
    """,
    # 7: drift policies and retraining jobs
    """
    CREATE TABLE drift_policies (
        model TEXT PRIMARY KEY,
        pipeline TEXT NOT NULL,
        threshold REAL NOT NULL,
        device_fraction REAL NOT NULL,
        windows INTEGER NOT NULL,
        canary_weight REAL NOT NULL,
        auto_canary INTEGER NOT NULL
    );
    CREATE TABLE retrain_jobs (
        id INTEGER PRIMARY KEY,
        model TEXT NOT NULL,
        state TEXT NOT NULL,
        reason TEXT NOT NULL,
        version INTEGER NOT NULL,
        created_at REAL NOT NULL,
        finished_at REAL,
        detail TEXT NOT NULL DEFAULT ''
    );
    """,
    # 8: labelled samples from devices, refused-sample counters, sampling and acceptance policy
    """
    ALTER TABLE drift_policies ADD COLUMN sample_rate REAL NOT NULL DEFAULT 0;
    ALTER TABLE drift_policies ADD COLUMN margin REAL NOT NULL DEFAULT 0;
    CREATE TABLE samples (
        device_id TEXT NOT NULL,
        seq INTEGER NOT NULL,
        model TEXT NOT NULL,
        version INTEGER NOT NULL,
        region TEXT NOT NULL,
        received_at REAL NOT NULL,
        features TEXT NOT NULL,   -- JSON [[float, ...], ...]
        labels TEXT NOT NULL,     -- JSON [int, ...]
        pii TEXT NOT NULL,        -- JSON {column: [hex HMAC, ...]} (pseudonyms made on the device)
        job_id INTEGER,           -- the retraining job that used it
        PRIMARY KEY (device_id, seq)
    );
    CREATE INDEX samples_model ON samples(model, job_id);
    CREATE TABLE sample_refusals (
        model TEXT NOT NULL,
        region TEXT NOT NULL,
        reason TEXT NOT NULL,
        count INTEGER NOT NULL,
        PRIMARY KEY (model, region, reason)
    );
    """,
    # 9: reports refused from each device (arm statistics or drift windows outside its release,
    # out-of-range times, malformed payloads), counted per category
    """
    CREATE TABLE report_refusals (
        device_id TEXT NOT NULL,
        kind TEXT NOT NULL,
        reason TEXT NOT NULL,
        count INTEGER NOT NULL,
        last_at REAL NOT NULL,
        PRIMARY KEY (device_id, kind, reason)
    );
    """,
    # 10: retention: when each drift window arrived (the control plane's clock, not the
    # device's), and what expired raw telemetry is rolled up into (records and bytes per device,
    # kind and UTC day)
    """
    ALTER TABLE drift_windows ADD COLUMN received_at REAL NOT NULL DEFAULT 0;
    UPDATE drift_windows SET received_at = COALESCE((SELECT t.received_at FROM telemetry t
        WHERE t.device_id = drift_windows.device_id AND t.seq = drift_windows.seq), 0);
    CREATE INDEX drift_windows_received ON drift_windows(received_at);
    CREATE INDEX telemetry_received ON telemetry(received_at);
    CREATE TABLE telemetry_rollup (
        device_id TEXT NOT NULL,
        kind TEXT NOT NULL,
        day INTEGER NOT NULL,     -- UTC days since 1970-01-01 of received_at
        records INTEGER NOT NULL,
        bytes INTEGER NOT NULL,   -- payload bytes
        PRIMARY KEY (device_id, kind, day)
    );
    """,
    # 11: a regression model's arms: the sums of absolute and squared errors of labelled rows
    """
    ALTER TABLE arm_stats ADD COLUMN abs_error_sum REAL NOT NULL DEFAULT 0;
    ALTER TABLE arm_stats ADD COLUMN sq_error_sum REAL NOT NULL DEFAULT 0;
    """,
    # 12: history (docs/observability.md): each drift window's per-feature PSI; every arm
    # snapshot a device sent, kept as long as drift windows; daily roll-ups of both once they
    # pass that retention
    """
    ALTER TABLE drift_windows ADD COLUMN feature_psi TEXT NOT NULL DEFAULT '{}';
    CREATE INDEX drift_windows_history ON drift_windows(model, "end");
    CREATE TABLE arm_stats_history (
        device_id TEXT NOT NULL,
        seq INTEGER NOT NULL,
        model TEXT NOT NULL,
        version INTEGER NOT NULL,
        requests INTEGER NOT NULL,
        errors INTEGER NOT NULL,
        p50_ms REAL NOT NULL,
        p95_ms REAL NOT NULL,
        labelled INTEGER NOT NULL,
        correct INTEGER NOT NULL,
        abs_error_sum REAL NOT NULL,
        sq_error_sum REAL NOT NULL,
        created_at REAL NOT NULL,   -- the device's clock: when the snapshot was taken
        received_at REAL NOT NULL,  -- the control plane's: retention counts from it
        PRIMARY KEY (device_id, seq)
    );
    CREATE INDEX arm_stats_history_model ON arm_stats_history(model, created_at);
    CREATE INDEX arm_stats_history_received ON arm_stats_history(received_at);
    CREATE TABLE drift_rollup (
        device_id TEXT NOT NULL,
        model TEXT NOT NULL,
        version INTEGER NOT NULL,
        day INTEGER NOT NULL,       -- UTC days since 1970-01-01 of the windows' end
        windows INTEGER NOT NULL,
        drifted INTEGER NOT NULL,
        rows INTEGER NOT NULL,
        score_sum REAL NOT NULL,
        score_max REAL NOT NULL,
        PRIMARY KEY (device_id, model, version, day)
    );
    CREATE TABLE arm_stats_rollup (   -- each arm's last snapshot of the day on each device
        device_id TEXT NOT NULL,
        model TEXT NOT NULL,
        version INTEGER NOT NULL,
        day INTEGER NOT NULL,
        seq INTEGER NOT NULL,
        requests INTEGER NOT NULL,
        errors INTEGER NOT NULL,
        labelled INTEGER NOT NULL,
        correct INTEGER NOT NULL,
        abs_error_sum REAL NOT NULL,
        p95_ms REAL NOT NULL,
        PRIMARY KEY (device_id, model, version, day)
    );
    """,
    # 13, issue 16 (detection): what detection flagged per device (clone
    # suspected; delivery problems the device reported), and when an operator was revoked.
    """
    CREATE TABLE device_alerts (
        device_id TEXT NOT NULL REFERENCES devices(id),
        kind TEXT NOT NULL,         -- clone-suspected | freeze | slow-retrieval
        detail TEXT NOT NULL,       -- JSON object
        since REAL NOT NULL,
        updated_at REAL NOT NULL,
        PRIMARY KEY (device_id, kind)
    );
    ALTER TABLE operators ADD COLUMN revoked_at REAL;
    """,
    # 14, issue 16 (root of trust): every signed root, published or staged for offline signing
    # ("pending": not yet signed by both thresholds); the root version each device reported.
    """
    CREATE TABLE roots (
        version INTEGER PRIMARY KEY,
        envelope BLOB NOT NULL,
        state TEXT NOT NULL,        -- published | pending
        created_at REAL NOT NULL
    );
    CREATE TABLE device_roots (
        device_id TEXT PRIMARY KEY,
        version INTEGER NOT NULL,
        reported_at REAL NOT NULL
    );
    """,
    # 15, issue 16 (publishers): the ids of the publisher keys whose signatures verified each
    # version at publish ("" for versions published before: unknown, left alone by --rollback).
    """
    ALTER TABLE model_versions ADD COLUMN signer_keyids TEXT NOT NULL DEFAULT '';
    """,
    # 16, issue 16 (CA rotation): which fleet CA issued each certificate ('' = the first one).
    """
    ALTER TABLE certificates ADD COLUMN issuer TEXT NOT NULL DEFAULT '';
    """,
    # 17, issue 18 (replicas): sealed bundle blobs in the database, in parts, for control
    # planes that share a PostgreSQL database (SQLite keeps them as files in HOME/blobs).
    """
    CREATE TABLE blob_parts (
        digest TEXT NOT NULL,
        part INTEGER NOT NULL,
        data BLOB NOT NULL,
        PRIMARY KEY (digest, part)
    );
    """,
    # 18, issue 18 (telemetry throughput): raw telemetry as one row per stored batch, its new
    # records in one segment (control_plane/domain/telemetry_segment.py); rows of `telemetry`
    # written before stay where they are, read and expired with the segments.
    """
    CREATE TABLE telemetry_segments (
        device_id TEXT NOT NULL,
        first_seq INTEGER NOT NULL,  -- the lowest and highest seq in the segment: a
        last_seq INTEGER NOT NULL,   -- device's segments never share a seq
        records INTEGER NOT NULL,
        received_at REAL NOT NULL,
        body BLOB NOT NULL,
        PRIMARY KEY (device_id, last_seq)
    );
    CREATE INDEX telemetry_segments_received ON telemetry_segments(received_at);
    """,
    # 19, issue 18 (telemetry throughput): on SQLite a segment's body lives in the store's
    # segment files (control_plane/storage/segment_files.py), its row holding an empty body and
    # where the bytes are; NULL body_file: the body is in the row (PostgreSQL, rows before).
    """
    ALTER TABLE telemetry_segments ADD COLUMN body_file INTEGER;
    ALTER TABLE telemetry_segments ADD COLUMN body_offset INTEGER;
    ALTER TABLE telemetry_segments ADD COLUMN body_length INTEGER;
    CREATE INDEX telemetry_segments_file ON telemetry_segments(body_file);
    """,
]
