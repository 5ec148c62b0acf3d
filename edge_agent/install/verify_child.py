"""Bundle verification in a child process (docs/serving.md, "Agent footprint").

``model_signing`` (with sigstore, pydantic and the rest) adds ~25 MiB of resident memory to
the process that imports it, and Python never unloads a module: verified in the agent's own
process, every agent that ever installed a version would carry it for good. Here the child
imports it, verifies (``fleetcore.bundle_verify.verify_bundle_dir``, unchanged), answers one
line of JSON and exits, which gives the memory back. It costs a process start per install
(~1-2 s, measured on the 2-core host), next to the smoke test's own child.

Rules: the request (bundle path, publisher PEMs) goes in on stdin; the answer is
``{"ok": true}`` or ``{"error": KIND, "message": ...}``, KIND one of the refusals
``verify_bundle_dir`` raises (``BadSignatureError``, ``InvalidInputError``), which the parent
raises again as such. A child that crashes, answers anything else or overruns
``VERIFY_TIMEOUT_S`` fails the verification (``BadSignatureError``): a bundle is installed only
on a positive answer. The parent then parses the verified manifest from disk itself.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from edge_agent.install.child_call import answer as child_answer
from edge_agent.install.child_call import run_child
from fleetcore.bundle import MANIFEST, parse_manifest
from fleetcore.errors import BadSignatureError, EdgefleetError, InvalidInputError

__all__ = ["VERIFY_TIMEOUT_S", "verify_isolated"]

VERIFY_TIMEOUT_S = 300.0  # hashing a bundle near the size limit on a slow host takes seconds
_MAX_ANSWER_BYTES = 64 * 1024
_REFUSALS: dict[str, type[EdgefleetError]] = {
    "BadSignatureError": BadSignatureError,
    "InvalidInputError": InvalidInputError,
}


def verify_isolated(bundle: Path, publisher_keys: Sequence[bytes], *, threshold: int = 1,
                    timeout_s: float = VERIFY_TIMEOUT_S) -> dict[str, Any]:
    """``verify_bundle_dir(bundle, publisher_keys, threshold)`` run in a child process
    (module rules): at least ``threshold`` distinct keys must have signed the bundle."""
    request = json.dumps({"bundle": str(bundle), "threshold": int(threshold),
                          "keys": [pem.decode("ascii") for pem in publisher_keys]})
    try:
        proc = run_child("edge_agent.install.verify_child", request.encode(), timeout_s)
    except subprocess.TimeoutExpired:
        raise BadSignatureError(f"verifying {bundle} took over {timeout_s:g} s") from None
    answer = child_answer(proc.stdout, "verification answer", _MAX_ANSWER_BYTES)
    if answer.get("ok") is True:
        return parse_manifest((Path(bundle) / MANIFEST).read_bytes())
    kind, message = answer.get("error"), answer.get("message")
    if isinstance(kind, str) and kind in _REFUSALS and isinstance(message, str):
        raise _REFUSALS[kind](message)
    tail = proc.stderr.decode("utf-8", "replace").strip().splitlines()[-1:] or ["no output"]
    raise BadSignatureError(f"verifying {bundle} failed (exit {proc.returncode}): "
                            f"{tail[0][:200]}")


def main() -> int:
    from fleetcore.bundle_verify import verify_bundle_dir  # noqa: PLC0415 (only the child)

    request = json.loads(sys.stdin.buffer.read())
    try:
        verify_bundle_dir(Path(request["bundle"]),
                          [pem.encode("ascii") for pem in request["keys"]],
                          int(request.get("threshold", 1)))
    except (BadSignatureError, InvalidInputError) as exc:
        kind = "BadSignatureError" if isinstance(exc, BadSignatureError) else "InvalidInputError"
        print(json.dumps({"error": kind, "message": str(exc)}))
        return 0
    print(json.dumps({"ok": True}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
