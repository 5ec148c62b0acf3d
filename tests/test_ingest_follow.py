"""`trainer ingest --follow` against a real Mosquitto and the machine's NATS JetStream: killed
with SIGKILL and restarted it loses and duplicates nothing, a crash between staging and
acknowledging doubles nothing, malformed messages are counted and skipped, SIGTERM exits
cleanly with what was staged cut into a snapshot, and PII is never written in the clear."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from examples.pipelines.publish_stream import payloads, publish, wine_rows
from tests.ingest_support import files_containing, write_pipeline
from tests.support import WAIT
from tests.test_ingest_streams import (
    PASSWORD,
    Broker,
    JetStream,
    broker,
    jetstream,
    password_env,
)
from trainer.config import Pipeline
from trainer.ingest.batch import source_key
from trainer.ingest.follow import follow
from trainer.ingest.streams import StreamMessage
from trainer.store import FeatureStore, Snapshot

__all__ = ["broker", "jetstream", "password_env"]  # fixtures

FEATURES = ["alcohol", "malic_acid", "ash", "alcalinity_of_ash", "magnesium", "total_phenols",
            "flavanoids", "nonflavanoid_phenols", "proanthocyanins", "color_intensity", "hue",
            "od280_od315_of_diluted_wines", "proline", "shop"]
DATA = {"label": "cultivar", "pii": ["customer_email"], "categorical": ["shop"],
        "timestamp": "created_at", "features": FEATURES, "snapshot_seconds": 0.3}
TRAINER = str(Path(sys.executable).parent / "trainer")


def _stream(kind: str, request: pytest.FixtureRequest) -> tuple[str, dict[str, Any],
                                                                   dict[str, Any]]:
    """(url, [data] keys, publisher settings) for a fresh topic or JetStream stream."""
    if kind == "mqtt":
        b: Broker = request.getfixturevalue("broker")
        creds = request.getfixturevalue("password_env")
        topic = f"follow/{request.node.name[-12:].strip('[]')}/{os.getpid()}"
        return b.url(topic), {**creds}, dict(creds)
    js: JetStream = request.getfixturevalue("jetstream")
    return js.url, {"stream": js.stream, "ack_wait_s": 1}, {}


class Follower:
    """`trainer ingest --follow` as a process; its stderr lines on a queue."""

    def __init__(self, pipeline: Path, work: Path) -> None:
        self.proc = subprocess.Popen([TRAINER, "ingest", "--follow", str(pipeline),
                                      "--workdir", str(work)], stderr=subprocess.PIPE,
                                     text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self.proc.stderr or []:
            self.lines.put(line)

    def wait_for(self, predicate: Any) -> str:
        while True:
            line = self.lines.get(timeout=WAIT)
            self.seen.append(line)
            if predicate(line):
                return line

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        assert self.proc.wait(WAIT) == -signal.SIGKILL

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(WAIT)


def _rows_in(line: str) -> int:
    """'[follow] snapshot sha256:... (120 rows, ...' -> 120."""
    return int(line.split("(", 1)[1].split(" rows", 1)[0])


def _newest(work: Path, pipeline: Path) -> Snapshot:
    with FeatureStore(work / "store") as store:
        found = store.cursor(source_key(Pipeline.load(pipeline).data))
        assert found is not None
        return store.get(found[0])


def _ids_of(snap: Snapshot, ids: Sequence[int], work: Path) -> list[int]:
    """Which of ``ids`` the snapshot holds, and how often (by their pseudonymized e-mails)."""
    with FeatureStore(work / "store") as store:
        pseudonyms = store.pseudonymize([f"customer{i}@example.com" for i in ids])
    held = snap.pii["customer_email"].tolist()
    return [held.count(p) for p in pseudonyms]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["mqtt", "nats"])
def test_sigkill_and_restart_lose_and_duplicate_nothing(kind: str, request: pytest.FixtureRequest,
                                                        tmp_path: Path) -> None:
    url, keys, pub = _stream(kind, request)
    pipeline = write_pipeline(tmp_path, {"source": url, **DATA, "snapshot_rows": 40, **keys})
    work = tmp_path / "work"
    first = Follower(pipeline, work)
    first.wait_for(lambda line: "[follow] consuming" in line)
    sender = threading.Thread(target=publish, args=(url, list(payloads(wine_rows(150), 1)), pub))
    sender.start()
    first.wait_for(lambda line: "[follow] snapshot" in line)
    first.kill()  # mid-stream: the publisher is still sending
    sender.join(WAIT)
    publish(url, list(payloads(wine_rows(50, offset=150), 5)), pub)
    second = Follower(pipeline, work)
    second.wait_for(lambda line: "[follow] snapshot" in line and _rows_in(line) >= 200)
    assert second.stop() == 0
    assert any("[follow] stopped" in line for line in [*second.seen, *second.lines.queue])
    snap = _newest(work, pipeline)
    assert len(snap.y) == 200
    assert _ids_of(snap, range(200), work) == [1] * 200  # every row exactly once
    assert files_containing(work, b"customer7@example.com") == []
    assert files_containing(tmp_path, PASSWORD.encode()) == []
    assert PASSWORD not in "".join([*first.seen, *second.seen])
    origins = [s["origin"] for s in _chain(work, snap)]
    assert all(o["kind"] == "stream" for o in origins)
    assert sum(o["rows_new"] for o in origins) == 200


def _chain(work: Path, snap: Snapshot) -> list[dict[str, Any]]:
    with FeatureStore(work / "store") as store:
        return store.chain(snap.id)


class _CrashAfterStaging:
    """A real source whose first ack never happens: the process 'dies' right after the rows
    were made durable, before the broker heard of it."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.crashed = inner, False
        self.url = inner.url

    @property
    def oversized(self) -> int:
        return int(self.inner.oversized)

    def open(self) -> None:
        self.inner.open()

    def fetch(self, max_messages: int, timeout_s: float) -> list[StreamMessage]:
        return list(self.inner.fetch(max_messages, timeout_s))

    def ack(self, messages: Sequence[StreamMessage]) -> None:
        if not self.crashed:
            self.crashed = True
            raise _Crash
        self.inner.ack(messages)

    def close(self) -> None:
        self.inner.close()


class _Crash(Exception):
    pass


class _AfterAck(_CrashAfterStaging):
    """A real source that calls ``then`` after every acknowledgement."""

    def __init__(self, inner: Any, then: Any) -> None:
        super().__init__(inner)
        self.crashed, self.then, self.redelivered = True, then, 0

    def ack(self, messages: Sequence[StreamMessage]) -> None:
        self.inner.ack(messages)
        self.redelivered += sum(m.redelivered for m in messages)
        self.then(self)


@pytest.mark.parametrize("kind", ["mqtt", "nats"])
def test_a_crash_between_staging_and_ack_doubles_nothing(
        kind: str, request: pytest.FixtureRequest, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    url, keys, pub = _stream(kind, request)
    pipeline = Pipeline.load(write_pipeline(tmp_path, {"source": url, **DATA, **keys,
                                                       "snapshot_rows": 1000,
                                                       "snapshot_seconds": 3600}))
    key = source_key(pipeline.data)
    from trainer.ingest import streams  # noqa: PLC0415

    real_open = streams.open_stream
    monkeypatch.setattr(streams, "open_stream",
                        lambda *a, **k: _CrashAfterStaging(real_open(*a, **k)))
    with FeatureStore(tmp_path / "store") as store:
        stop, consuming = threading.Event(), threading.Event()
        crashed: list[BaseException] = []

        def first() -> None:
            try:
                follow(store, pipeline.data, tmp_path, stop,
                       lambda m: consuming.set() if "consuming" in m else None)
            except _Crash as exc:
                crashed.append(exc)

        thread = threading.Thread(target=first)
        thread.start()
        assert consuming.wait(WAIT)  # subscribed: an MQTT session keeps what comes from now
        publish(url, list(payloads(wine_rows(30), 3)), pub)
        thread.join(WAIT)
        assert crashed and not thread.is_alive()
        assert store.inbox_rows(key) > 0  # durable, not acknowledged
        publish(url, list(payloads(wine_rows(3, offset=30), 3)), pub)

        def done(source: _AfterAck) -> None:  # after each ack of the second run
            if store.inbox_rows(key) >= 33 and source.redelivered:
                stop.set()  # every row staged, and the redelivered messages came back

        monkeypatch.setattr(streams, "open_stream",
                            lambda *a, **k: _AfterAck(real_open(*a, **k), done))
        stats: list[Any] = []
        thread = threading.Thread(target=lambda: stats.append(
            follow(store, pipeline.data, tmp_path, stop, lambda m: None)))
        thread.start()
        thread.join(WAIT)
        assert not thread.is_alive()
        snap = store.get(store.cursor(key)[0])  # type: ignore[index]
    assert _ids_of(snap, range(33), tmp_path) == [1] * 33
    assert stats[0].duplicates > 0  # the redelivered messages were recognised


def test_malformed_messages_are_counted_and_skipped(request: pytest.FixtureRequest,
                                                    tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    url, keys, pub = _stream("nats", request)
    pipeline = write_pipeline(tmp_path, {"source": url, **DATA, **keys, "snapshot_rows": 1000,
                                         "snapshot_seconds": 3600})
    rows = wine_rows(20)
    rows[4]["alcohol"] = "strong"  # the wrong type: the message is malformed too
    publish(url, [*payloads(rows, 1, bad=2), json.dumps([]).encode()], pub)
    data = Pipeline.load(pipeline).data
    from trainer.ingest import streams  # noqa: PLC0415

    real_open = streams.open_stream
    skipped: list[str] = []
    with FeatureStore(tmp_path / "work" / "store") as store:
        stop = threading.Event()

        def done(source: _AfterAck) -> None:
            if store.inbox_rows(source_key(data)) >= 19 and len(skipped) >= 4:
                stop.set()

        monkeypatch.setattr(streams, "open_stream",
                            lambda *a, **k: _AfterAck(real_open(*a, **k), done))
        stats = follow(store, data, tmp_path, stop,
                       lambda line: skipped.append(line) if "[follow] skipped" in line else None)
        snap = store.get(store.cursor(source_key(data))[0])  # type: ignore[index]
    assert stats.malformed == 4 and len(snap.y) == 19
    assert snap.lineage["origin"]["malformed"] == 4
    assert any("'alcohol'" in line for line in skipped)


def test_follow_refuses_a_region_outside_the_policy_and_a_batch_source(
        request: pytest.FixtureRequest, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    from trainer.cli import main as trainer_main  # noqa: PLC0415

    url, keys, _ = _stream("nats", request)
    outside = write_pipeline(tmp_path, {"source": url, **DATA, **keys, "region": "us-east"},
                             regions=["eu-west"])
    assert trainer_main(["ingest", "--follow", str(outside), "--workdir",
                         str(tmp_path / "w")]) == 1
    assert "us-east" in capsys.readouterr().err
    batch = write_pipeline(tmp_path, {"source": "parquet:x", "label": "y"}, name="b.toml")
    assert trainer_main(["ingest", "--follow", str(batch), "--workdir", str(tmp_path / "w")]) == 1
    assert "is not a stream" in capsys.readouterr().err
