"""One request to a short-lived child of the agent (``python -m MODULE``), one JSON answer.

Shared by the bundle verifier (``verify_child.py``) and the trust child (``trust_child.py``):
the request goes in on stdin; the answer is the last line of stdout, read with the strict JSON
loader and a size limit (anything else reads as no answer, ``{}``). The child finds this
checkout's packages first on its path, as the parent did.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from fleetcore import strict_json
from fleetcore.errors import EdgefleetError

__all__ = ["answer", "run_child"]


def run_child(module: str, request: bytes, timeout_s: float) -> subprocess.CompletedProcess[bytes]:
    """Run ``python -m module`` with ``request`` on stdin; ``subprocess.TimeoutExpired`` past
    ``timeout_s``."""
    package_root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (package_root, os.environ.get("PYTHONPATH", "")) if p)}
    return subprocess.run([sys.executable, "-m", module], input=request, capture_output=True,
                          env=env, timeout=timeout_s, check=False)


def answer(stdout: bytes, what: str, max_bytes: int) -> dict[str, Any]:
    """The child's answer: its last line as a JSON object, or ``{}``."""
    lines = stdout.strip().splitlines()
    if not lines or len(lines[-1]) > max_bytes:
        return {}
    try:
        doc = strict_json.loads(lines[-1], what=what, max_bytes=max_bytes)
    except EdgefleetError:
        return {}
    return doc if isinstance(doc, dict) else {}
