"""The peer benchmark's report (scripts/bench_peers.py): every figure a ratio against the agent,
oriented so that > 1 means the agent is ahead; a peer that could not be installed says why.
(The measurement itself runs in `make bench`: it installs KServe and MLServer from PyPI.)"""

from __future__ import annotations

from scripts.bench_peers import PEERS, _rows


def _figures(**changes: object) -> dict[str, object]:
    base: dict[str, object] = {
        "http_rps_1": 2000.0, "http_rps_8": 4000.0, "p50_ms": 0.3, "p99_ms": 0.5,
        "grpc_p50_us": 700.0, "rss_mib": 100.0, "cold_start_s": 0.5, "grpc_error": None}
    return {**base, **changes}


def test_ratios_say_how_far_the_agent_is_ahead_and_unavailable_peers_say_why() -> None:
    summary = {"agent": _figures(),
               "kserve": _figures(http_rps_1=1000.0, p50_ms=0.6, rss_mib=50.0,
                                  grpc_p50_us=None, grpc_error="UNIMPLEMENTED")}
    rows = {r["name"]: r for r in _rows(summary, {"mlserver": "pip install failed: x"})}
    label = PEERS["kserve"][0]
    assert rows[f"peer {label}: HTTP throughput, 1 connection"]["ratio"] == 2.0
    assert rows[f"peer {label}: HTTP p50, 1 connection"]["ratio"] == 2.0
    memory = rows[f"peer {label}: resident memory after warm-up"]
    assert memory["ratio"] == 0.5 and memory["pass"] is False  # the peer is ahead
    assert rows[f"peer {label}: gRPC ModelInfer p50"]["note"] == "UNIMPLEMENTED"
    missing = rows[f"peer {PEERS['mlserver'][0]}: not measured"]
    assert missing["pass"] is None and "pip install failed" in missing["note"]
