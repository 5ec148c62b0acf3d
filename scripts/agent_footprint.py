"""What importing the agent costs: import time, peak resident memory and the modules loaded.

Each run is a fresh interpreter that imports the agent's entry points (``edge_agent.cli`` and
``edge_agent.daemon``) and nothing else; the import time is the median over ``--runs`` runs, the
memory is ``ru_maxrss`` of that interpreter (its peak resident set, so it includes the bare
interpreter, which is reported alongside for comparison). To measure another checkout with
the same virtual environment, put it first on the path:

    PYTHONPATH=/tmp/agent-before .venv/bin/python -m scripts.agent_footprint

The report says which ``edge_agent`` was measured (``edge_agent_file``).

``--by-import``: resident memory import by import, in one fresh interpreter, in the order an
MQTT agent serving HTTP loads them (numpy and ONNX Runtime first: the bare baseline holds
them too); each line is what that import added on top of the ones before it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from typing import Any

ENTRY_POINTS = ("edge_agent.cli", "edge_agent.daemon")
# Packages an agent host should never load just by starting the agent.
HEAVY = ("starlette", "torch", "sklearn", "control_plane", "trainer", "scripts", "tests")

_PROBE = """
import json, resource, sys, time
t0 = time.perf_counter()
for name in {modules!r}:
    __import__(name)
seconds = time.perf_counter() - t0
rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
mods = sorted(sys.modules)
agent = sys.modules.get("edge_agent")
print(json.dumps({{"seconds": seconds, "rss_kib": rss_kib, "modules": mods,
                  "edge_agent_file": getattr(agent, "__file__", None)}}))
"""


# What an agent loads, in load order; the transport and listeners as configured.
BY_IMPORT = ("numpy", "onnxruntime", "cryptography.x509", "google.protobuf.message",
             "edgefleet.v1.agent_pb2", "edge_agent.state", "edge_agent.identity",
             "edge_agent.install.smoke", "edge_agent.install.updater", "edge_agent.reporting.drift",
             "edge_agent.serving.core", "edge_agent.daemon", "edge_agent.cli",
             "edge_agent.transport.mqtt", "edge_agent.transport.grpc", "uvicorn", "httptools",
             "uvloop", "edge_agent.serving.http", "prometheus_client",
             "edge_agent.serving.metrics", "edge_agent.serving.grpc_server", "model_signing")

_BY_IMPORT = """
import importlib, json, sys
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
rows, prev = [], rss()
rows.append(("(bare interpreter)", prev, prev))
for name in {modules!r}:
    importlib.import_module(name)
    now = rss()
    rows.append((name, round(now - prev, 1), round(now, 1)))
    prev = now
print(json.dumps(rows))
"""


def by_import(modules: tuple[str, ...] = BY_IMPORT) -> list[tuple[str, float, float]]:
    """(module, MiB its import added, MiB resident after it), in one fresh interpreter."""
    out = subprocess.run([sys.executable, "-P", "-c", _BY_IMPORT.format(modules=modules)],
                         capture_output=True, text=True, check=True)
    return [tuple(row) for row in json.loads(out.stdout)]


def _probe(modules: tuple[str, ...]) -> dict[str, Any]:
    # -P: the current directory does not go first on the path, so PYTHONPATH decides.
    out = subprocess.run([sys.executable, "-P", "-c", _PROBE.format(modules=modules)],
                         capture_output=True, text=True, check=True)
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def measure(runs: int = 7, modules: tuple[str, ...] = ENTRY_POINTS) -> dict[str, Any]:
    """Median import time and peak RSS over ``runs`` fresh interpreters."""
    samples = [_probe(modules) for _ in range(runs)]
    bare = [_probe(()) for _ in range(runs)]
    loaded = samples[-1]["modules"]
    before = set(bare[-1]["modules"])
    tops = sorted({m.split(".")[0] for m in loaded if m not in before}
                  - set(sys.stdlib_module_names))
    tops = [t for t in tops if not t.startswith("_")]
    return {
        "entry_points": list(modules),
        "runs": runs,
        "import_ms_median": round(statistics.median(s["seconds"] for s in samples) * 1e3, 1),
        "rss_mib_median": round(statistics.median(s["rss_kib"] for s in samples) / 1024, 1),
        "bare_interpreter_rss_mib": round(statistics.median(b["rss_kib"] for b in bare) / 1024,
                                          1),
        "modules_loaded": len(loaded) - len(before),
        "packages_outside_stdlib": tops,
        "heavy_packages_loaded": [t for t in tops if t in HEAVY],
        "edge_agent_file": samples[-1]["edge_agent_file"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--modules", action="store_true",
                        help="also list every module the import loads")
    parser.add_argument("--by-import", action="store_true",
                        help="resident memory import by import (module docstring)")
    args = parser.parse_args(argv)
    if args.by_import:
        for name, added, total in by_import():
            print(f"{name:36s} +{added:6.1f} MiB  {total:6.1f} MiB")
        return 0
    report = measure(args.runs)
    if args.modules:
        probe = _probe(ENTRY_POINTS)
        report["modules"] = [m for m in probe["modules"] if m not in set(_probe(())["modules"])]
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
