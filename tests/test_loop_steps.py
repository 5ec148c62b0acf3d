"""``python -m scripts.bench_mqtt --loop-steps``'s timers: every step names a function that
exists, a timed call is counted, and everything is put back afterwards."""

from __future__ import annotations

from edgefleet.v1 import agent_pb2

from control_plane.api import agent_calls
from scripts import loop_steps


def test_every_step_is_timed_while_inside_and_put_back_after() -> None:
    originals = [(owner, attr, getattr(loop_steps._resolve(owner), attr))
                 for _, owner, attr in loop_steps.STEPS]
    batch = agent_pb2.TelemetryBatch(records=[
        agent_pb2.TelemetryRecord(seq=1, kind="error", created_at=1.0, payload=b"{}")])
    with loop_steps.timed() as steps:
        assert all(getattr(loop_steps._resolve(owner), attr) is not fn
                   for owner, attr, fn in originals)
        assert len(agent_calls.telemetry_from_proto(batch)) == 1
    assert all(getattr(loop_steps._resolve(owner), attr) is fn
               for owner, attr, fn in originals)
    calls, cpu, wall = steps["  protobuf -> columns"]
    assert calls == 1 and cpu >= 0 and wall > 0
    assert steps["  answers"][0] == 0
    rows = loop_steps.rows(steps, batches=1)
    assert [r["name"] for r in rows] == [f"loop, per batch: {s[0]}" for s in loop_steps.STEPS]
