"""The telemetry outbox: durable, ordered, bounded, and never silent about what it drops."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge_agent.reporting.outbox import Outbox, OutboxRecord
from fleetcore.errors import InvalidInputError

REPO = Path(__file__).resolve().parent.parent
NOW = 1_700_000_000.0


@pytest.fixture
def outbox(tmp_path: Path) -> Iterator[Outbox]:
    with Outbox(tmp_path / "outbox.db") as ob:
        yield ob


def _all(ob: Outbox) -> list[OutboxRecord]:
    return ob.pending(limit=1_000_000, max_bytes=1 << 40)


# -- sequence numbers --


def test_seqs_strictly_increase_and_survive_acking_everything_and_reopening(
    tmp_path: Path,
) -> None:
    path = tmp_path / "outbox.db"
    with Outbox(path) as ob:
        first: list[int | None] = [ob.append("drift", b"a", NOW), ob.append("error", b"b", NOW + 1)]
        first += ob.append_many([("sample", b"c"), ("sample", b"d")], NOW + 2)
        assert first == [1, 2, 3, 4]
        assert ob.ack_through(4) == 4
        assert ob.stats().depth == 0
    with Outbox(path) as ob:
        assert ob.stats().next_seq == 5
        assert ob.append("install", b"e", NOW + 3) == 5


def test_the_file_refuses_a_reused_seq(outbox: Outbox) -> None:
    outbox.append("drift", b"a", NOW)
    outbox.ack_through(1)
    conn = sqlite3.connect(outbox.path)
    with pytest.raises(sqlite3.IntegrityError, match="reused"):
        conn.execute("INSERT INTO outbox (seq, kind, created_at, payload)"
                     " VALUES (1, 'drift', 0, x'00')")
    conn.close()


# -- reading and acknowledging --


def test_pending_is_oldest_first_and_honours_limit_and_max_bytes(outbox: Outbox) -> None:
    for i in range(10):
        outbox.append("sample", bytes(100), NOW + i)
    records = outbox.pending()
    assert [r.seq for r in records] == list(range(1, 11))
    assert [r.created_at for r in records] == [NOW + i for i in range(10)]
    assert records[0] == OutboxRecord(1, "sample", NOW, bytes(100))
    assert [r.seq for r in outbox.pending(limit=3)] == [1, 2, 3]
    assert [r.seq for r in outbox.pending(max_bytes=250)] == [1, 2]
    assert outbox.pending(limit=0) == []


def test_pending_returns_the_oldest_record_even_when_it_exceeds_max_bytes(
    outbox: Outbox,
) -> None:
    outbox.append("sample", bytes(1000), NOW)
    outbox.append("sample", bytes(10), NOW)
    assert [r.seq for r in outbox.pending(max_bytes=100)] == [1]


def test_ack_deletes_exactly_the_given_seqs(outbox: Outbox) -> None:
    for i in range(6):
        outbox.append("sample", b"%d" % i, NOW)
    assert outbox.ack([2, 4, 4, 99]) == 2  # duplicates and unknown seqs are ignored
    assert [r.seq for r in _all(outbox)] == [1, 3, 5, 6]
    assert outbox.ack([]) == 0
    assert outbox.ack([2]) == 0
    stats = outbox.stats()
    assert (stats.depth, stats.depth_bytes, stats.next_seq) == (4, 4, 7)


def test_ack_through_deletes_every_seq_up_to_it(outbox: Outbox) -> None:
    for i in range(6):
        outbox.append("sample", b"x", NOW + i)
    outbox.ack([5])
    assert outbox.ack_through(3) == 3
    assert [r.seq for r in _all(outbox)] == [4, 6]
    assert outbox.stats().oldest_created_at == NOW + 3
    assert outbox.ack_through(100) == 2
    assert outbox.stats().oldest_created_at is None


# -- crashes --

_APPEND_AND_HANG = """
import sys
from pathlib import Path
from edge_agent.reporting.outbox import Outbox
ob = Outbox(Path(sys.argv[1]))
for i in range(int(sys.argv[2])):
    ob.append("sample", b"record-%d" % i, 1000.0 + i)
print("appended", flush=True)
sys.stdin.readline()
"""

_ACK_AND_HANG = """
import sys
from pathlib import Path
from edge_agent.reporting.outbox import Outbox
ob = Outbox(Path(sys.argv[1]))
ob.ack(int(s) for s in sys.argv[2].split(","))
print("acked", flush=True)
sys.stdin.readline()
"""


def _run_then_kill_9(script: str, *args: str, ready: str) -> None:
    """Run ``script`` until it prints ``ready``, then SIGKILL it (no clean close)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", script, *args],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == ready
    finally:
        proc.kill()
        proc.wait()
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                stream.close()
    assert proc.returncode == -9


def test_records_survive_kill_9(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    n = 50
    _run_then_kill_9(_APPEND_AND_HANG, str(path), str(n), ready="appended")
    with Outbox(path) as ob:
        records = _all(ob)
    assert [r.payload for r in records] == [b"record-%d" % i for i in range(n)]
    assert [r.seq for r in records] == list(range(1, n + 1))

    acked = [r.seq for r in records if r.seq % 2]
    _run_then_kill_9(_ACK_AND_HANG, str(path), ",".join(map(str, acked)), ready="acked")
    with Outbox(path) as ob:
        left = _all(ob)
        stats = ob.stats()
    assert [r.seq for r in left] == [r.seq for r in records if not r.seq % 2]
    assert [r.payload for r in left] == [r.payload for r in records if not r.seq % 2]
    assert (stats.depth, stats.next_seq, stats.dropped) == (n // 2, n + 1, 0)


# -- the bound --


def test_max_records_drops_the_oldest_and_counts_them_persistently(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    kinds = ["drift", "sample", "error"]
    with Outbox(path, max_records=10) as ob:
        for i in range(15):
            assert ob.append(kinds[i % 3], b"%d" % i, NOW + i) == i + 1
        assert [r.seq for r in _all(ob)] == list(range(6, 16))
    with Outbox(path, max_records=10) as ob:
        stats = ob.stats()
    assert stats.depth == 10
    assert stats.dropped == 5
    assert stats.dropped_by_kind == {"drift": 2, "sample": 2, "error": 1}
    assert stats.next_seq == 16
    assert stats.oldest_created_at == NOW + 5


def test_max_bytes_drops_as_many_oldest_records_as_needed(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    with Outbox(path, max_bytes=100, max_payload_bytes=100) as ob:
        for i in range(15):
            ob.append("sample" if i % 2 else "drift", bytes(10), NOW + i)
        assert [r.seq for r in _all(ob)] == list(range(6, 16))
        assert ob.stats().depth_bytes == 100
        # A 35-byte record pushes out four 10-byte ones (65 + 35 = 100).
        assert ob.append("error", bytes(35), NOW + 20) == 16
        assert [r.seq for r in _all(ob)] == [10, 11, 12, 13, 14, 15, 16]
    with Outbox(path, max_bytes=100, max_payload_bytes=100) as ob:
        stats = ob.stats()
    assert (stats.depth, stats.depth_bytes) == (7, 95)
    assert stats.dropped == 9
    assert stats.dropped_by_kind == {"drift": 5, "sample": 4}


def test_a_batch_larger_than_the_bound_reports_its_own_dropped_records(outbox: Outbox) -> None:
    path = outbox.path
    outbox.close()
    with Outbox(path, max_records=3) as ob:
        ob.append("drift", b"old", NOW)
        seqs = ob.append_many([("sample", b"%d" % i) for i in range(5)], NOW)
        assert seqs == [None, None, 4, 5, 6]
        assert [r.payload for r in _all(ob)] == [b"2", b"3", b"4"]
        assert ob.stats().dropped_by_kind == {"drift": 1, "sample": 2}


def test_an_oversized_payload_is_refused_and_changes_nothing(outbox: Outbox) -> None:
    path = outbox.path
    outbox.close()
    with Outbox(path, max_records=2, max_payload_bytes=100) as ob:
        ob.append("drift", b"a", NOW)
        ob.append("drift", b"b", NOW)
        before = ob.stats()
        with pytest.raises(InvalidInputError, match="101 bytes"):
            ob.append("sample", bytes(101), NOW)
        with pytest.raises(InvalidInputError):
            ob.append_many([("sample", b"fine"), ("sample", bytes(101))], NOW)
        assert ob.stats() == before
        assert before.dropped == 0
        assert [r.payload for r in _all(ob)] == [b"a", b"b"]


@pytest.mark.parametrize(
    ("kind", "payload", "now"),
    [("", b"x", NOW), ("k" * 65, b"x", NOW), ("drift", "text", NOW), ("drift", b"x", float("nan"))],
    ids=["empty-kind", "long-kind", "str-payload", "nan-time"],
)
def test_malformed_records_are_refused(
    outbox: Outbox, kind: str, payload: bytes, now: float
) -> None:
    with pytest.raises(InvalidInputError):
        outbox.append(kind, payload, now)
    assert outbox.stats().next_seq == 1


def test_inconsistent_bounds_are_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match="max_payload_bytes"):
        Outbox(tmp_path / "outbox.db", max_bytes=10, max_payload_bytes=11)
    with pytest.raises(InvalidInputError, match="max_records"):
        Outbox(tmp_path / "outbox.db", max_records=0)


# -- files that are not an outbox --


def test_a_corrupt_file_is_refused_and_left_untouched(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    junk = b"not a database, but someone's telemetry might be in here\n" * 100
    path.write_bytes(junk)
    with pytest.raises(InvalidInputError, match="not a readable SQLite database"):
        Outbox(path)
    assert path.read_bytes() == junk


def test_another_sqlite_database_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "registry.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE devices (id TEXT)")
    conn.commit()
    conn.close()
    with pytest.raises(InvalidInputError, match="not a telemetry outbox"):
        Outbox(path)
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA user_version = 3")
    conn.close()
    with pytest.raises(InvalidInputError, match="not a telemetry outbox"):
        Outbox(path)


def test_a_closed_outbox_refuses_work(outbox: Outbox) -> None:
    outbox.close()
    outbox.close()
    with pytest.raises(RuntimeError, match="closed"):
        outbox.append("drift", b"x", NOW)


# -- threads --


def test_concurrent_appends_get_unique_gap_free_seqs(outbox: Outbox) -> None:
    threads_n, per_thread = 8, 50
    results: list[list[int | None]] = [[] for _ in range(threads_n)]
    start = threading.Barrier(threads_n + 1)

    def worker(i: int) -> None:
        start.wait()
        for j in range(per_thread):
            if j % 10 == 0:
                results[i] += outbox.append_many([("sample", b"%d" % i)] * 2, NOW)
            else:
                results[i].append(outbox.append("sample", b"%d" % i, NOW))

    def reader() -> None:
        start.wait()
        for _ in range(50):
            outbox.pending(limit=10)
            outbox.stats()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(threads_n)]
    threads.append(threading.Thread(target=reader))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    total = threads_n * (per_thread + per_thread // 10)
    per_worker = [[s for s in r if s is not None] for r in results]
    assert [len(r) for r in per_worker] == [len(r) for r in results]  # nothing dropped
    assert sorted(s for r in per_worker for s in r) == list(range(1, total + 1))
    for r in per_worker:  # each thread sees its own seqs increase
        assert r == sorted(r)
    assert outbox.stats().depth == total
