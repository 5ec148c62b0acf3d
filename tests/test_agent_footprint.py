"""The agent loads only what its configuration needs (issue 19): a real enrolled agent started
in a fresh process, its modules listed once it serves. Not a memory or timing threshold:
``make bench`` measures the resident memory (docs/serving.md, "Agent footprint").
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge_agent.state import AgentConfig, StateDir
from tests.support import LoopThread, RunningControlPlane, start_control_plane

REPO = Path(__file__).resolve().parent.parent

# Starts the agent of argv[1] with the listeners of argv[2:] ("http", "grpc"), waits for it
# to serve, asks its HTTP listener (when it has one) for liveness, prints the loaded modules.
_PROBE = """
import asyncio, json, sys, urllib.request
from pathlib import Path
from edge_agent.daemon import Agent

state, listeners = Path(sys.argv[1]), set(sys.argv[2:])
ports = {}

async def main():
    loop, serving = asyncio.get_running_loop(), asyncio.Event()

    def on_event(kind, data):
        if kind == "serving":
            ports.update(data)
            loop.call_soon_threadsafe(serving.set)

    agent = Agent(state, on_event=on_event,
                  listen="127.0.0.1:0" if "http" in listeners else None,
                  grpc_listen="127.0.0.1:0" if "grpc" in listeners else None)
    task = asyncio.create_task(agent.run())
    await asyncio.wait_for(serving.wait(), 60)
    live = None
    if ports.get("http_port"):
        url = f"http://127.0.0.1:{ports['http_port']}/v2/health/live"
        live = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=30).read())
    modules = sorted(sys.modules)
    agent.request_stop()
    await asyncio.wait_for(task, 30)
    print(json.dumps({"modules": modules, "live": live.decode() if live else None}))

asyncio.run(main())
"""


@pytest.fixture(scope="module")
def control_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningControlPlane]:
    loop = LoopThread()
    cp = start_control_plane(tmp_path_factory.mktemp("footprint") / "cp", loop)
    yield cp
    cp.stop()
    loop.close()


def _modules(state: Path, *listeners: str) -> tuple[set[str], str | None]:
    run = subprocess.run([sys.executable, "-c", _PROBE, str(state), *listeners],
                         capture_output=True, text=True, cwd=REPO, timeout=120, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    doc = json.loads(run.stdout.strip().splitlines()[-1])
    return set(doc["modules"]), doc["live"]


def _loaded(modules: set[str], package: str) -> bool:
    return package in modules or any(m.startswith(package + ".") for m in modules)


@pytest.mark.slow
def test_an_http_only_grpc_transport_agent_loads_no_grpc_server_mqtt_or_verifier(
    control_plane: RunningControlPlane, tmp_path: Path
) -> None:
    control_plane.enroll_agent(tmp_path / "agent")
    modules, live = _modules(tmp_path / "agent", "http")
    assert live == '{"live":true}'
    assert _loaded(modules, "uvicorn") and _loaded(modules, "edge_agent.transport.grpc")
    for absent in ("edge_agent.serving.grpc_server", "edgefleet.v1.grpc_predict_v2_pb2",
                   "paho", "edge_agent.transport.mqtt", "model_signing",
                   "fleetcore.bundle_verify", "edge_agent.enroll", "cryptography"):
        assert not _loaded(modules, absent), absent
    # With its gRPC listener enabled, the gRPC front end is loaded too.
    modules, _ = _modules(tmp_path / "agent", "http", "grpc")
    assert _loaded(modules, "edge_agent.serving.grpc_server")


@pytest.mark.slow
def test_an_mqtt_agent_serving_http_loads_no_grpc_at_all(
    control_plane: RunningControlPlane, tmp_path: Path
) -> None:
    control_plane.enroll_agent(tmp_path / "agent")
    state = StateDir(tmp_path / "agent")
    cfg = AgentConfig.load(state)
    cfg.transport, cfg.mqtt_url = "mqtt", "mqtts://127.0.0.1:9"  # nobody listens: it retries
    cfg.save(state)
    modules, live = _modules(tmp_path / "agent", "http")
    assert live == '{"live":true}'
    assert _loaded(modules, "fleetcore.mqtt_client") and _loaded(modules,
                                                                 "edge_agent.transport.mqtt")
    for absent in ("grpc", "edge_agent.transport.grpc", "edge_agent.serving.grpc_server",
                   "model_signing", "edge_agent.enroll",
                   # MQTT on the agent's own asyncio client, not paho (nor its dnspython);
                   # trust decisions run in the trust child; no bundle unpacked yet; nobody
                   # scraped /metrics
                   "paho", "cryptography", "dns", "tarfile", "prometheus_client"):
        assert not _loaded(modules, absent), absent
    # Nothing served: neither uvicorn nor the Prometheus client.
    modules, live = _modules(tmp_path / "agent")
    assert live is None
    for absent in ("uvicorn", "prometheus_client", "edge_agent.serving.http", "grpc"):
        assert not _loaded(modules, absent), absent


def test_metrics_load_prometheus_client_at_the_first_scrape_and_render_the_same() -> None:
    probe = """
import sys
from edge_agent.serving.core import ServingCore
from edge_agent.serving.metrics import ServingMetrics
metrics = ServingMetrics(ServingCore())
metrics.add_gauge("edgefleet_test_gauge", "a gauge", lambda: 2.5)
before = "prometheus_client" in sys.modules
text, content_type = metrics.render()
import prometheus_client
print(before, "edgefleet_test_gauge 2.5" in text.decode(),
      content_type == prometheus_client.CONTENT_TYPE_LATEST)
"""
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         cwd=REPO, timeout=60, check=True)
    assert run.stdout.split() == ["False", "True", "True"]


def test_weights_are_prepacked_only_for_models_that_run_batches() -> None:
    from edge_agent.serving.runtime import wants_prepacking  # noqa: PLC0415

    assert wants_prepacking({}) is False
    assert wants_prepacking({"runtime": {"onnx": {"file": "model.onnx"}}}) is False
    assert wants_prepacking({"runtime": {"batching": {"max_batch_size": 8}}}) is True
    assert wants_prepacking({"runtime": {"onnx": {"prepack": True}}}) is True
    assert wants_prepacking({"runtime": {"batching": {"max_batch_size": 8},
                                         "onnx": {"prepack": False}}}) is False
    assert wants_prepacking({"runtime": {"onnx": {"prepack": "yes"}}}) is False  # not a bool


def test_heap_trim_returns_memory_on_glibc() -> None:
    from edge_agent.serving.heap import trim  # noqa: PLC0415

    assert trim() is (sys.platform == "linux")
