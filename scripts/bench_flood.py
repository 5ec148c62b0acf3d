"""Database growth under a one-device telemetry flood, with and without the quota.

``python -m scripts.bench_flood [--duration 10]`` starts a real control plane (SQLite file,
mTLS on a real socket) twice: once with the default telemetry quota, once with the quota
opened wide (rates and bursts of 10^12). One enrolled device sends batches of 30 records of
250 kB (``error`` kind: stored raw) back to back for ``--duration`` seconds, ignoring
``RESOURCE_EXHAUSTED`` as a flooder would. The figure is the growth of the database (the
file and its WAL) in bytes per second of flood; the run without quota is the baseline.
Target: with the quota, at most the quota's byte rate plus its burst spread over the run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
from edgefleet.v1 import admin_pb2, admin_pb2_grpc, agent_pb2, agent_pb2_grpc

from control_plane.config import ControlPlaneConfig
from control_plane.ops.home import init_home
from control_plane.server import ControlPlane
from edge_agent.enroll import enroll
from edge_agent.state import StateDir
from fleet.channel import open_channel
from fleetcore import operator_config

__all__ = ["bench_flood"]

RECORD_BYTES = 250_000
BATCH_RECORDS = 30


def _db_bytes(db: Path) -> int:
    return sum(p.stat().st_size for p in (db, db.with_name(db.name + "-wal")) if p.exists())


def _flood(work: Path, duration: float, quota: bool) -> dict[str, float]:
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()

    def on_loop(coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, loop).result(60)

    cfg = ControlPlaneConfig(home=work, api_listen="127.0.0.1:0", enroll_listen="127.0.0.1:0")
    if not quota:
        for name in ("records_per_second", "bytes_per_second", "burst_records", "burst_bytes"):
            setattr(cfg, f"telemetry_{name}", 1e12)
    cfg = init_home(work, config=cfg)
    cp = ControlPlane(cfg)
    on_loop(cp.start())
    try:
        admin = operator_config.load(cfg.layout.operator_dir("admin") / "fleet.toml")
        with open_channel(replace(admin, api=cp.api_address)) as channel:
            token = admin_pb2_grpc.AdminServiceStub(channel).CreateEnrollmentToken(
                admin_pb2.CreateEnrollmentTokenRequest(), timeout=30).token
        state = work / "device"
        enroll(cp.enroll_address, token, cp.authority.ca_pem, state)
        s = StateDir(state)
        device = grpc.ssl_channel_credentials(s.ca.read_bytes(), s.key.read_bytes(),
                                              s.cert.read_bytes())
        payload = json.dumps({"where": "flood", "error": "A" * RECORD_BYTES}).encode()
        before = _db_bytes(cfg.database)
        sent = acked = refused = 0
        with grpc.secure_channel(cp.api_address, device, options=[
                ("grpc.max_send_message_length", 16 * 1024 * 1024)]) as channel:
            call = agent_pb2_grpc.AgentServiceStub(channel).SendTelemetry
            t0 = time.perf_counter()
            while time.perf_counter() - t0 < duration:
                records = [agent_pb2.TelemetryRecord(seq=sent + i + 1, kind="error",
                                                     created_at=time.time(), payload=payload)
                           for i in range(BATCH_RECORDS)]
                sent += BATCH_RECORDS
                try:
                    acked += len(call(agent_pb2.TelemetryBatch(records=records),
                                      timeout=30).acked)
                except grpc.RpcError as exc:
                    if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                        raise
                    refused += 1
            elapsed = time.perf_counter() - t0
        grown = _db_bytes(cfg.database) - before
        return {"bytes_per_s": grown / elapsed, "offered_per_s": sent * len(payload) / elapsed,
                "acked": acked, "refused_batches": refused, "seconds": elapsed,
                "limit_per_s": cfg.telemetry_bytes_per_second
                + cfg.telemetry_burst_bytes / elapsed}
    finally:
        on_loop(cp.stop(grace_seconds=0.5))
        loop.call_soon_threadsafe(loop.stop)


def bench_flood(work: Path, duration: float = 10.0) -> list[dict[str, Any]]:
    open_ = _flood(work / "open", duration, quota=False)
    held = _flood(work / "quota", duration, quota=True)
    ratio = held["bytes_per_s"] / open_["bytes_per_s"] if open_["bytes_per_s"] else 0.0
    return [{
        "name": "DB growth, one-device flood (quota vs none)", "unit": "B/s",
        "figure": round(held["bytes_per_s"]), "baseline": round(open_["bytes_per_s"]),
        "baseline_name": "no quota", "ratio": round(ratio, 4),
        "target": f"<= {held['limit_per_s']:.0f} B/s",
        "pass": held["bytes_per_s"] <= held["limit_per_s"],
        "detail": {"quota": held, "no_quota": open_},
    }]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--duration", type=float, default=10.0)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        rows = bench_flood(Path(tmp), args.duration)
    print(json.dumps(rows, indent=2))
    return 0 if all(r["pass"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
