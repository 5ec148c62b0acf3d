"""The MQTT telemetry path's throughput mechanisms keep its guarantees, on a real Mosquitto and
on both store backends (SQLite and PostgreSQL):

* group commit: telemetry messages waiting in the bridge are stored in one transaction and each
  answered (and acknowledged to the broker) only after it committed; a hostile batch in the
  group is refused alone; a batch sent twice (a redelivery, a resend) is stored once; a group
  is everything waiting, also past what one read of the connection brings (256 KiB);
* the fallback: when the group's transaction fails, each batch is written alone, so one batch
  the store refuses loses none of the others;
* the agent's sliding window: several batches in flight, every record stored once and the
  outbox emptied.
"""

from __future__ import annotations

import asyncio
import fcntl
import socket
import struct
import termios
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from edgefleet.v1 import agent_pb2

from control_plane.api.mqtt_bridge import waiting
from control_plane.domain.record_columns import TelemetryWrite
from edge_agent.reporting.outbox import Outbox
from edge_agent.reporting.telemetry import TelemetrySender, encode
from edge_agent.state import AgentConfig, StateDir
from edge_agent.transport.mqtt import MqttTransport
from fleetcore.mqtt_wire import Leaf, topic
from tests.mqtt_support import Client, connect, connected, start_mqtt_control_plane
from tests.store_support import pg_database
from tests.support import WAIT, LoopThread, RunningControlPlane, wait_until

__all__ = ["pg_database"]  # a fixture (tests/store_support.py)


@pytest.fixture(params=["sqlite", "postgresql"])
def mq(request: pytest.FixtureRequest, tmp_path: Path,
       loop: LoopThread) -> Iterator[RunningControlPlane]:
    overrides = ({"database_url": request.getfixturevalue("pg_database")}
                 if request.param == "postgresql" else {})
    running = start_mqtt_control_plane(tmp_path / "cp", loop, **overrides)
    yield running
    running.stop()
    running.broker.stop()


def _batch(*seqs: int) -> bytes:
    return agent_pb2.TelemetryBatch(records=[
        agent_pb2.TelemetryRecord(seq=s, kind="error", created_at=float(s),
                                  payload=encode({"where": "test", "error": str(s)}))
        for s in seqs]).SerializeToString()


def _seqs(cp: RunningControlPlane, device: str) -> list[int]:
    return [r.seq for r in cp.cp.store.telemetry_records(device)]


class _Gate:
    """Holds the bridge's worker at its first group, before the store, until ``release`` (the
    event loop keeps receiving meanwhile, so the next messages queue up in the bridge); wraps
    the store's ``ingest_telemetry_many`` to record each group's size and to fail every call
    holding a batch with seq ``poison`` (a batch the store refuses)."""

    def __init__(self, cp: RunningControlPlane, poison: int = -1) -> None:
        self.store = cp.cp.store
        self.real = self.store.ingest_telemetry_many
        self.groups: list[int] = []
        self.entered = threading.Event()
        self.release = threading.Event()
        self.poison = poison
        self.store.ingest_telemetry_many = self  # type: ignore[method-assign]
        bridge = cp.cp.bridge
        assert bridge is not None
        calls, real_many = bridge.calls, bridge.calls.telemetry_many
        held = asyncio.Event()
        loop = cp.loop.loop

        async def holding(batches: Any) -> Any:
            if not self.entered.is_set():
                self.entered.set()
                await held.wait()
            return await real_many(batches)

        calls.telemetry_many = holding  # type: ignore[method-assign]

        def release_now() -> None:  # from the test's thread: the held group goes on
            self.release.set()
            loop.call_soon_threadsafe(held.set)

        self.release_now = release_now

    def __call__(self, writes: Sequence[TelemetryWrite]) -> None:
        self.groups.append(len(writes))
        if any(r.seq == self.poison for w in writes for r in w.records):
            raise RuntimeError("the store refuses this batch")
        self.real(writes)


def _arrivals(cp: RunningControlPlane) -> list[int]:
    """Counts the messages the bridge's client hands to its worker (while the worker may be
    busy with an earlier group)."""
    bridge = cp.cp.bridge
    assert bridge is not None
    count = [0]
    inbox = bridge._inbox
    real = inbox.put_nowait

    def counting(msg: Any) -> None:
        count[0] += 1
        real(msg)

    inbox.put_nowait = counting  # type: ignore[method-assign,assignment]
    return count


def _replies(client: Client, n: int) -> dict[bytes, tuple[bytes, str]]:
    out = {}
    for _ in range(n):
        msg = client.messages.get(timeout=WAIT)
        user = dict(getattr(msg.properties, "UserProperty", []) or [])
        out[bytes(msg.properties.CorrelationData)] = (bytes(msg.payload),  # type: ignore[union-attr]
                                                      user.get("error", ""))
    return out


def _acked(payload: bytes) -> list[int]:
    return list(agent_pb2.TelemetryAck.FromString(payload).acked)


def test_waiting_batches_are_committed_together_and_each_answered_after_the_commit(
    mq: RunningControlPlane, tmp_path: Path
) -> None:
    device = mq.enroll_agent(tmp_path / "a").device_id
    state = StateDir(tmp_path / "a")
    gate, arrived = _Gate(mq), _arrivals(mq)
    client, result = connect(mq.cp.mqtt, state.cert, state.key)  # type: ignore[arg-type]
    assert connected(result)
    try:
        assert not client.subscribe(topic(device, Leaf.TELEMETRY_ACK)).is_failure
        name = topic(device, Leaf.TELEMETRY)
        client.publish(name, _batch(1), correlation=b"c1")
        assert gate.entered.wait(WAIT)  # the bridge's worker is inside the first commit
        client.publish(name, _batch(2, 3), correlation=b"c2")
        client.publish(name, b"\xff" * 64, correlation=b"c3")  # hostile: refused alone
        client.publish(name, _batch(2, 3), correlation=b"c4")  # sent again: stored once
        client.publish(name, _batch(4), correlation=b"c5")
        wait_until(lambda: arrived[0] >= 5, what="five messages at the bridge")
        assert client.messages.empty()  # nothing answered before its commit
        gate.release_now()
        replies = _replies(client, 5)
    finally:
        client.close()
    assert gate.groups == [1, 3]  # the four waiting messages: one transaction, hostile left out
    assert _acked(replies[b"c1"][0]) == [1]
    assert _acked(replies[b"c2"][0]) == [2, 3] == _acked(replies[b"c4"][0])
    assert _acked(replies[b"c5"][0]) == [4]
    assert replies[b"c3"][0] == b"" and replies[b"c3"][1].startswith("INVALID_ARGUMENT")
    assert _seqs(mq, device) == [1, 2, 3, 4]


def test_a_batch_the_store_refuses_loses_none_of_the_others_in_its_group(
    mq: RunningControlPlane, tmp_path: Path
) -> None:
    device = mq.enroll_agent(tmp_path / "a").device_id
    state = StateDir(tmp_path / "a")
    gate, arrived = _Gate(mq, poison=66), _arrivals(mq)
    client, result = connect(mq.cp.mqtt, state.cert, state.key)  # type: ignore[arg-type]
    assert connected(result)
    try:
        assert not client.subscribe(topic(device, Leaf.TELEMETRY_ACK)).is_failure
        name = topic(device, Leaf.TELEMETRY)
        client.publish(name, _batch(1), correlation=b"c1")
        assert gate.entered.wait(WAIT)
        client.publish(name, _batch(2), correlation=b"c2")
        client.publish(name, _batch(65, 66), correlation=b"bad")
        client.publish(name, _batch(3), correlation=b"c3")
        wait_until(lambda: arrived[0] >= 4, what="four messages at the bridge")
        gate.release_now()
        # One more batch after the group: the answers come in order on one connection, so
        # once its answer is here, every answer of the group is too.
        client.publish(name, _batch(4), correlation=b"c4")
        replies = _replies(client, 4)
    finally:
        client.close()
    # The group of three failed; then each alone: two stored, the refused one not (and not
    # answered: the agent keeps it and sends it again).
    first, group, *alone = gate.groups  # c4 may have joined the group, or come after it
    assert first == 1 and group in (3, 4) and alone == [1] * 4  # each again alone; c4 too
    assert sorted(replies) == [b"c1", b"c2", b"c3", b"c4"]
    assert _seqs(mq, device) == [1, 2, 3, 4]


def test_a_group_takes_what_the_reads_queued_behind_it_bring_and_ends_at_a_quiet_pass(
) -> None:
    async def scenario() -> list[list[int]]:
        inbox: asyncio.Queue[int] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        inbox.put_nowait(1)
        inbox.put_nowait(2)
        # A read the loop has queued behind the bridge's task: it runs in the next pass.
        def read() -> None:
            inbox.put_nowait(3)
            inbox.put_nowait(4)

        loop.call_soon(read)
        # One two passes later: the pass between brought nothing, so it starts the next group.
        loop.call_soon(lambda: loop.call_soon(lambda: loop.call_soon(inbox.put_nowait, 5)))
        return [await waiting(inbox, 64), await waiting(inbox, 64)]

    assert asyncio.run(scenario()) == [[1, 2, 3, 4], [5]]


def test_a_group_is_at_most_its_limit() -> None:
    async def scenario() -> list[list[int]]:
        inbox: asyncio.Queue[int] = asyncio.Queue()
        for i in range(1, 11):
            inbox.put_nowait(i)
        return [await waiting(inbox, 4) for _ in range(3)]

    assert asyncio.run(scenario()) == [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10]]


def _unread(sock: socket.socket) -> int:
    """Bytes in the socket's receive queue, not read yet."""
    return int(struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0" * 4))[0])


def test_batches_waiting_past_one_read_of_the_connection_are_one_group(
    mq: RunningControlPlane, tmp_path: Path
) -> None:
    """asyncio reads a socket 256 KiB at a time; the bridge's group is not cut there. The
    control plane's loop is held while eight ~70 KB batches reach its socket, then let go:
    one transaction stores them all, and each is answered."""
    device = mq.enroll_agent(tmp_path / "a").device_id
    state = StateDir(tmp_path / "a")
    bridge = mq.cp.bridge
    assert bridge is not None and bridge._client is not None
    sock = bridge._client.socket()
    assert sock is not None
    # Room for all of them unread (autotuning grows the buffer only as a reader reads).
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
    groups: list[int] = []
    store = mq.cp.store
    real = store.ingest_telemetry_many

    def recording(writes: Sequence[TelemetryWrite]) -> None:
        groups.append(len(writes))
        real(writes)

    store.ingest_telemetry_many = recording  # type: ignore[method-assign]
    client, result = connect(mq.cp.mqtt, state.cert, state.key)  # type: ignore[arg-type]
    assert connected(result)
    held, frozen = threading.Event(), threading.Event()

    def hold() -> None:  # the control plane's event loop, stopped until ``held`` is set
        frozen.set()
        held.wait(WAIT)

    payload = encode({"where": "test", "error": "x" * 7_000})
    batches = [agent_pb2.TelemetryBatch(records=[
        agent_pb2.TelemetryRecord(seq=10 * b + i, kind="error", created_at=1.0, payload=payload)
        for i in range(1, 11)]).SerializeToString() for b in range(8)]
    try:
        assert not client.subscribe(topic(device, Leaf.TELEMETRY_ACK)).is_failure
        mq.loop.loop.call_soon_threadsafe(hold)
        assert frozen.wait(WAIT)
        for b, batch in enumerate(batches):
            client.publish(topic(device, Leaf.TELEMETRY), batch, correlation=b"c%d" % b)
        total = sum(len(b) for b in batches)
        assert total > 2 * 256 * 1024
        wait_until(lambda: _unread(sock) >= total, what="the eight batches in the socket")
        held.set()
        replies = _replies(client, 8)
    finally:
        held.set()
        client.close()
    assert groups == [8]
    assert sorted(replies) == [b"c%d" % b for b in range(8)]
    assert all(not error for _, error in replies.values())
    assert _seqs(mq, device) == [10 * b + i for b in range(8) for i in range(1, 11)]


def test_the_agents_window_sends_every_record_once_and_empties_its_outbox(
    mq: RunningControlPlane, tmp_path: Path
) -> None:
    device = mq.enroll_agent(tmp_path / "a").device_id
    state = StateDir(tmp_path / "a")
    config = AgentConfig.load(state)
    sent: list[int] = []
    with Outbox(state.outbox) as outbox:
        outbox.append_many([("error", encode({"where": "test", "error": str(i)}))
                            for i in range(1, 1001)], 1.0)
        transport = MqttTransport(config.mqtt_url, device, state)
        in_flight = [0, 0]  # now, most
        real = transport.send_telemetry_wire

        async def counting(seqs: list[int], wire: bytes) -> list[int]:
            in_flight[0] += 1
            in_flight[1] = max(in_flight)
            try:
                return await real(seqs, wire)
            finally:
                in_flight[0] -= 1

        transport.send_telemetry_wire = counting  # type: ignore[method-assign]
        sender = TelemetrySender(outbox, batch_records=50, in_flight=8, max_batches=100)

        async def send() -> None:
            sent.append(await sender.send(transport))
            await transport.close()

        mq.loop.run(asyncio.wait_for(send(), WAIT))
        assert outbox.stats().depth == 0
    assert sent == [1000]
    assert in_flight[1] > 1  # a window, not one batch at a time
    assert _seqs(mq, device) == list(range(1, 1001))
