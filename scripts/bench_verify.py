"""Bundle verification of a 64 MiB bundle vs `openssl dgst -sha256` on the same bytes.

The bundle is a real signed bundle (a small trained model's manifest, profile and signature)
whose ``model.onnx`` is replaced by 64 MiB of random bytes and re-signed, so that hashing
dominates as it does for a large model. The agent's check (``verify_bundle_dir``: layout,
OpenSSF model-signing signature with the publisher key, file list, manifest and its files
table) is timed in-process; the baseline is the `openssl dgst -sha256` command over every
file of the bundle, process start included. Both read from the page cache (one warm-up run
each); the figure is the median of five runs. Target (docs/design.md §9): <= 1.2x + 5 ms.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fleetcore.bundle_verify import verify_bundle_dir
from fleetcore.files import file_digest
from trainer.bundle import sign_bundle

__all__ = ["bench_verify"]

BUNDLE_MIB = 64
RUNS = 5


def _median(call: Callable[[], object]) -> float:
    call()  # warm the page cache and imports
    times = []
    for _ in range(RUNS):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _big_bundle(source: Path, dest: Path, key: Path) -> Path:
    shutil.copytree(source, dest)
    with (dest / "model.onnx").open("wb") as fh:
        for _ in range(BUNDLE_MIB):
            fh.write(os.urandom(1 << 20))
    manifest = json.loads((dest / "manifest.json").read_text())
    manifest["files"]["model.onnx"] = {
        "sha256": file_digest(dest / "model.onnx").removeprefix("sha256:"),
        "size": (dest / "model.onnx").stat().st_size,
    }
    (dest / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
    sign_bundle(dest, key)
    return dest


def bench_verify(work: Path, source_bundle: Path, key: Path, public_pem: bytes
                 ) -> list[dict[str, Any]]:
    bundle = _big_bundle(source_bundle, work / "big-verify-bundle", key)
    openssl = shutil.which("openssl")
    ours = _median(lambda: verify_bundle_dir(bundle, [public_pem]))
    rows: list[dict[str, Any]] = []
    if openssl is None:
        rows.append({"name": f"bundle verification ({BUNDLE_MIB} MiB)", "unit": "ms",
                     "figure": round(ours * 1e3, 1), "baseline": "-", "ratio": "-",
                     "target": "<= 1.2x + 5 ms", "pass": None,
                     "note": "openssl not installed: no baseline"})
        return rows
    files = sorted(str(p) for p in bundle.iterdir() if p.is_file())
    base = _median(lambda: subprocess.run([openssl, "dgst", "-sha256", *files], check=True,
                                          capture_output=True))
    ok = ours <= 1.2 * base + 0.005
    rows.append({
        "name": f"bundle verification ({BUNDLE_MIB} MiB, signature + files)", "unit": "ms",
        "figure": round(ours * 1e3, 1), "baseline": round(base * 1e3, 1),
        "baseline_name": "openssl dgst -sha256 over the same files",
        "ratio": round(ours / base, 3), "target": "<= 1.2x + 5 ms", "pass": ok,
        "note": "" if ok else "hashing speed: Python's hashlib vs openssl's CLI on these bytes",
    })
    shutil.rmtree(bundle, ignore_errors=True)
    return rows
