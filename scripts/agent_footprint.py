"""What importing the agent costs: import time, peak resident memory and the modules loaded.

Each run is a fresh interpreter that imports the agent's entry points (``edge_agent.cli`` and
``edge_agent.daemon``) and nothing else; the import time is the median over ``--runs`` runs, the
memory is ``ru_maxrss`` of that interpreter (its peak resident set, so it includes the bare
interpreter, which is reported alongside for comparison). To measure another checkout with
the same virtual environment, put it first on the path:

    PYTHONPATH=/tmp/agent-before .venv/bin/python -m scripts.agent_footprint

The report says which ``edge_agent`` was measured (``edge_agent_file``).
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
    args = parser.parse_args(argv)
    report = measure(args.runs)
    if args.modules:
        probe = _probe(ENTRY_POINTS)
        report["modules"] = [m for m in probe["modules"] if m not in set(_probe(())["modules"])]
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
