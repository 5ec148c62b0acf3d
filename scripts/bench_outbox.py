"""What draining the agent's outbox costs per record: the reads the sender makes and the
acknowledgements it deletes, without a broker or a control plane.

``python -m scripts.bench_outbox`` pre-fills a fresh outbox with ``--records`` records (~110
bytes of payload each, as in ``scripts/bench_mqtt.py``) in one ``append_many``, then reads it
500 records at a time as the sender does (``next_batch``, ``after`` moving on) and acknowledges
each batch (``ack``), timing both; median of ``--repeat`` runs, each on a new file.

``--tree DIR`` runs the same in another checkout (its ``edge_agent`` first on the path), so two
versions are compared on the same machine in the same way; a checkout from before sealed
batches is read with ``pending_wire``, the method its sender used.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _payloads(n: int) -> list[bytes]:
    """``scripts/bench_mqtt.py``'s records (~110 bytes, as ``telemetry.encode`` writes them)."""
    return [json.dumps({"where": "bench", "error": f"record {i:08d} " + "x" * 64},
                       sort_keys=True, separators=(",", ":")).encode() for i in range(n)]


def _one(records: int) -> tuple[float, float]:
    """Seconds to read every batch and to acknowledge them, on a fresh outbox."""
    from edge_agent.reporting.outbox import Outbox  # noqa: PLC0415  (from the tree asked for)

    with tempfile.TemporaryDirectory() as work, Outbox(Path(work) / "outbox.db") as box:
        box.append_many([("error", p) for p in _payloads(records)], 1.0)
        read = getattr(box, "next_batch", None) or box.pending_wire  # type: ignore[attr-defined]
        batches: list[list[int]] = []
        after = 0
        t0 = time.perf_counter()
        while True:
            seqs, _ = read(500, after=after)
            if not seqs:
                break
            batches.append(seqs)
            after = seqs[-1]
        t1 = time.perf_counter()
        for seqs in batches:
            box.ack(seqs)
        t2 = time.perf_counter()
        if sum(map(len, batches)) != records or box.stats().depth:
            raise RuntimeError("the outbox was not drained")
    return t1 - t0, t2 - t1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--tree", type=Path, help="measure this checkout's outbox instead")
    args = parser.parse_args(argv)
    if args.tree is not None:
        tree = args.tree.resolve()
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tree), str(tree / "protos")])}
        # This file by its path: its folder first on the path, then the tree's, whatever the
        # working directory (``-m`` would put the working directory's packages first).
        return subprocess.run([sys.executable, str(Path(__file__).resolve()), "--records",
                               str(args.records), "--repeat", str(args.repeat)],
                              cwd=tree, env=env, check=False).returncode
    runs = [_one(args.records) for _ in range(args.repeat)]
    read = statistics.median(r for r, _ in runs) / args.records * 1e6
    ack = statistics.median(a for _, a in runs) / args.records * 1e6
    import edge_agent.reporting.outbox as module  # noqa: PLC0415

    print(json.dumps({"outbox": str(Path(module.__file__).resolve()),
                      "records": args.records, "repeat": args.repeat,
                      "read_us_per_record": round(read, 3), "ack_us_per_record": round(ack, 3),
                      "total_us_per_record": round(read + ack, 3)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
