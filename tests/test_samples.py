"""Labelled samples from devices: sampled on the device with PII pseudonymized or dropped per
the manifest, vetted by the control plane (manifest shape, pseudonyms only, region policy),
and turned into a feature-store snapshot whose lineage names the devices' model versions."""

from __future__ import annotations

import hashlib
import hmac
import json
import shutil
import sqlite3
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from edgefleet.v1 import agent_pb2
from sklearn.datasets import load_digits

from edge_agent.reporting.telemetry import encode
from fleet.cli import main as fleet_main
from fleetcore.errors import InvalidInputError
from fleetcore.release import Arm, ModelRelease, encode_document, parse_document
from tests.store_support import raw_telemetry
from tests.support import RunningControlPlane, send_telemetry, start_agent
from tests.test_delivery import _bundle_for, _committed, _wait_models
from tests.trainer_support import write_pipeline
from trainer.samples import load_samples
from trainer.store import FeatureStore

EMAIL, NAME, NOTE = "alice.liddell@example.com", "Alice Liddell", "vip-customer-secret"
RAW_VALUES = (EMAIL, NAME, NOTE)


def _pii_bundle(cp: RunningControlPlane, trained: Path, dest: Path) -> Path:
    """The trained digits bundle, its manifest declaring a hashed and a dropped PII column."""
    staging = dest.with_name(dest.name + "-src")
    shutil.copytree(trained, staging)
    manifest = json.loads((staging / "manifest.json").read_text())
    manifest["input"]["pii_columns"] = [
        {"name": "customer_email", "action": "hmac"},
        {"name": "customer_name", "action": "drop"},
    ]
    (staging / "manifest.json").write_text(json.dumps(manifest))
    return _bundle_for(cp, staging, dest, version=1)


def _fleet(cp: RunningControlPlane, *args: str) -> int:
    return fleet_main(
        ["--config", str(cp.home / "operators/admin/fleet.toml"), "--api", cp.api, *args]
    )


def _sample(
    seq: int, rows: np.ndarray, labels: list[int], pii: dict[str, list[str]]
) -> agent_pb2.TelemetryRecord:
    return agent_pb2.TelemetryRecord(
        seq=seq,
        kind="sample",
        created_at=float(seq),
        payload=encode(
            {
                "model": "digits",
                "version": 1,
                "features": rows.tolist(),
                "labels": labels,
                "pii": pii,
            }
        ),
    )


def test_release_carries_the_sample_rate_and_refuses_a_bad_one() -> None:
    arm = Arm(1, "sha256:" + "a" * 64, 10, 1.0)
    doc = parse_document(encode_document("dev", 1, 1.0, 2.0, [ModelRelease("m", (arm,), 0.25)]))
    assert doc.models[0].sample_rate == 0.25
    plain = encode_document("dev", 1, 1.0, 2.0, [ModelRelease("m", (arm,))])
    assert b"sample_rate" not in plain and parse_document(plain).models[0].sample_rate == 0.0
    for bad in (b"0", b"1.5", b"-0.1", b'"0.5"', b"true"):
        tampered = plain.replace(b'"name":"m"', b'"name":"m","sample_rate":' + bad)
        with pytest.raises(InvalidInputError, match="sample_rate"):
            parse_document(tampered)


def test_pii_never_leaves_the_device_and_refused_samples_are_counted(
    cp: RunningControlPlane,
    tmp_path: Path,
    trained_bundle: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    pipeline = write_pipeline(tmp_path / "pipe", store=str(tmp_path / "store"))
    bundle = _pii_bundle(cp, trained_bundle, tmp_path / "v1")
    assert _fleet(cp, "models", "publish", str(bundle)) == 0
    cp.enroll_agent(tmp_path / "a", labels={"region": "eu-west"})
    cp.enroll_agent(tmp_path / "us", labels={"region": "us-east"})
    agent = start_agent(tmp_path / "a", cp.loop, probation_seconds=0.0)
    digits = load_digits()
    X, y = digits.data.astype(np.float32), digits.target
    try:
        port = agent.wait_for("serving")["http_port"]
        assert _fleet(cp, "rollouts", "start", "--model", "digits", "--version", "1") == 0
        _wait_models(agent, _committed(1))
        assert (
            _fleet(
                cp,
                "retrain",
                "policy",
                "--model",
                "digits",
                "--pipeline",
                str(pipeline),
                "--sample-rate",
                "1.0",
            )
            == 0
        )
        while agent.wait_for("models")["serial"] < 2:
            pass  # the release that turns sampling on, applied
        with httpx.Client(timeout=30) as client:
            for i in range(20):
                body = {
                    "id": f"r{i}",
                    "parameters": {"customer_email": EMAIL, "customer_name": NAME, "note": NOTE},
                    "inputs": [
                        {
                            "name": "input",
                            "shape": [1, 64],
                            "datatype": "FP32",
                            "data": X[i].tolist(),
                        }
                    ],
                }
                assert (
                    client.post(
                        f"http://127.0.0.1:{port}/v2/models/digits/infer", json=body
                    ).status_code
                    == 200
                )
                assert (
                    client.post(
                        f"http://127.0.0.1:{port}/v2/models/digits/feedback",
                        json={"id": f"r{i}", "label": int(y[i])},
                    ).status_code
                    == 200
                )
        assert agent.agent.supervisor.samples_sent == 20
        while True:  # each heartbeat sends the outbox
            agent.wait_for("heartbeat")
            if sum(s.stored for s in cp.cp.store.sample_summary("digits")) >= 20:
                break
    finally:
        agent.stop()

    key = (tmp_path / "a" / "sample.key").read_bytes()
    expected = hmac.new(key, EMAIL.encode(), hashlib.sha256).hexdigest()
    db = cp.home / "edgefleet.db"
    rows = sqlite3.connect(db).execute("SELECT features, labels, pii FROM samples").fetchall()
    assert len(rows) == 20
    for features, labels, pii in rows:
        assert json.loads(pii) == {"customer_email": [expected]}  # name dropped, note never sent
        assert len(json.loads(features)[0]) == 64 and len(json.loads(labels)) == 1
    telemetry = [(r.payload,) for _, r in raw_telemetry(db)]
    for raw in RAW_VALUES:  # not in any table, nor in the raw telemetry the device sent
        assert not _on_disk(cp.home, raw)
        assert all(raw.encode() not in p for (p,) in telemetry)

    # A device outside the store's regions, and one sending a raw value: refused and counted.
    good = _sample(1, X[:2], [int(y[0]), int(y[1])], {"customer_email": [expected] * 2})
    send_telemetry(cp.api, tmp_path / "us", [good])
    send_telemetry(
        cp.api,
        tmp_path / "a",
        [
            _sample(10_000, X[:1], [0], {"customer_email": [EMAIL]}),
            _sample(10_001, X[:1], [0], {"customer_name": [expected]}),
            _sample(10_002, X[:1, :10], [0], {}),
            _sample(10_003, X[:1], [99], {}),
        ],
    )
    send_telemetry(cp.api, tmp_path / "us", [good])  # a resend: deduplicated, not counted twice
    capsys.readouterr()
    assert _fleet(cp, "retrain", "jobs", "--model", "digits", "--json") == 0
    summary = {s["region"]: s for s in json.loads(capsys.readouterr().out)["samples"]}
    assert summary["eu-west"]["stored"] == 20 and summary["eu-west"]["devices"] == 1
    assert sorted(summary["eu-west"]["refused"].values()) == [1, 1, 1, 1]
    assert summary["us-east"]["stored"] == 0
    assert list(summary["us-east"]["refused"].values()) == [1]
    assert "not allowed" in next(iter(summary["us-east"]["refused"]))
    assert not _on_disk(cp.home, EMAIL)


def _on_disk(home: Path, text: str) -> list[Path]:
    """Files under the control-plane home (database, WAL, blobs, logs) that hold ``text``."""
    return [p for p in home.rglob("*") if p.is_file() and text.encode() in p.read_bytes()]


def _samples_file(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text(json.dumps({"model": "digits", "rows": rows}))
    return path


def test_samples_become_a_snapshot_whose_lineage_names_devices_and_versions(
    tmp_path: Path,
) -> None:
    X, y = load_digits(return_X_y=True)
    names = [f"pixel_{i}" for i in range(64)]
    labels = [str(i) for i in range(10)]
    rows = [
        {
            "device": "dev-a",
            "version": 1,
            "region": "eu-west",
            "features": X[:3].tolist(),
            "labels": y[:3].tolist(),
            "pii": {},
        },
        {
            "device": "dev-b",
            "version": 2,
            "region": "eu-west",
            "features": X[3:5].tolist(),
            "labels": y[3:5].tolist(),
            "pii": {},
        },
        {
            "device": "dev-c",
            "version": 1,
            "region": "ap-south",
            "features": X[5:6].tolist(),
            "labels": y[5:6].tolist(),
            "pii": {},
        },
    ]
    groups = load_samples(
        _samples_file(tmp_path / "s.json", rows),
        feature_names=names,
        labels=labels,
        pii=[],
        image_shape=(8, 8),
    )
    assert [(g.region, len(g.table.y)) for g in groups] == [("ap-south", 1), ("eu-west", 5)]
    with FeatureStore(tmp_path / "store", allowed_regions=["eu-west"]) as store:
        eu = groups[1]
        snap = store.ingest(eu.table, region="eu-west", origin=eu.origin)
        assert snap.lineage["origin"]["devices"] == {"dev-a@v1": 3, "dev-b@v2": 2}
        assert snap.lineage["source"] == "device-samples:digits"
        assert store.get(snap.id).lineage["origin"] == eu.origin


@pytest.mark.parametrize(
    "bad",
    [
        {"device": "d", "version": 1, "region": "r", "features": [[1.0] * 63], "labels": [0]},
        {
            "device": "d",
            "version": 1,
            "region": "r",
            "features": [[float("nan")] * 64],
            "labels": [0],
        },
        {"device": "d", "version": 1, "region": "r", "features": [[1.0] * 64], "labels": [10]},
        {"device": "d", "version": True, "region": "r", "features": [[1.0] * 64], "labels": [0]},
        {
            "device": "d",
            "version": 1,
            "region": "r",
            "features": [[1.0] * 64],
            "labels": [0],
            "pii": {"not_declared": ["x"]},
        },
        {"device": "d", "version": 1, "region": "r", "features": [[1.0] * 64], "labels": [0, 1]},
        "not an object",
    ],
    ids=["narrow", "nan", "label", "bool-version", "undeclared-pii", "ragged", "type"],
)
def test_hostile_samples_files_are_refused(tmp_path: Path, bad: Any) -> None:
    path = tmp_path / "s.json"
    path.write_text(json.dumps({"model": "digits", "rows": [bad]}).replace("NaN", "NaN"))
    with pytest.raises(InvalidInputError):
        load_samples(
            path,
            feature_names=[f"p{i}" for i in range(64)],
            labels=[str(i) for i in range(10)],
            pii=[],
            image_shape=None,
        )


def _row_json(features: str = "[" + ", ".join(["1.0"] * 64) + "]") -> str:
    return ('{"device": "d", "version": 1, "region": "eu-west", '
            f'"features": [{features}], "labels": [0]}}')


# Not strict JSON (fleetcore.strict_json): each is refused before any row is looked at.
STRICT_JSON = {
    "duplicate-top-key": b'{"model": "digits", "rows": [], "rows": [' + _row_json().encode()
    + b"]}",
    "duplicate-row-key": b'{"model": "digits", "rows": ['
    + _row_json().replace('"labels": [0]', '"labels": [0], "labels": [1]').encode() + b"]}",
    "nan": b'{"model": "digits", "rows": [' + _row_json(
        "[" + ", ".join(["NaN"] + ["1.0"] * 63) + "]").encode() + b"]}",
    "infinity": b'{"model": "digits", "rows": [' + _row_json(
        "[" + ", ".join(["-Infinity"] + ["1.0"] * 63) + "]").encode() + b"]}",
    "not-utf8": b'{"model": "digits\xff", "rows": []}',
    "deep": b"[" * 100_000 + b"]" * 100_000,
}


@pytest.mark.parametrize(("data", "words"), [
    (STRICT_JSON["duplicate-top-key"], "duplicate key 'rows'"),
    (STRICT_JSON["duplicate-row-key"], "duplicate key 'labels'"),
    (STRICT_JSON["nan"], "NaN is not a JSON number"),
    (STRICT_JSON["infinity"], "-Infinity is not a JSON number"),
    (STRICT_JSON["not-utf8"], "not UTF-8"),
    (STRICT_JSON["deep"], "not valid JSON"),
], ids=list(STRICT_JSON))
def test_samples_files_that_are_not_strict_json_are_refused(
    tmp_path: Path, data: bytes, words: str
) -> None:
    path = tmp_path / "s.json"
    path.write_bytes(data)
    with pytest.raises(InvalidInputError) as refused:
        load_samples(
            path,
            feature_names=[f"p{i}" for i in range(64)],
            labels=[str(i) for i in range(10)],
            pii=[],
            image_shape=None,
        )
    message = str(refused.value)
    assert words in message and f"samples file {path}" in message and "\n" not in message
