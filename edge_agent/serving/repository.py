"""The protocol's server metadata, statistics and model-repository documents.

* Server metadata: ``SERVER_NAME``, ``EXTENSIONS`` (HTTP ``GET /v2`` and gRPC ServerMetadata):
  binary tensors (the HTTP extension; gRPC has ``raw_input_contents``), request parameters,
  statistics.

* Statistics (``GET /v2/models/stats``, ``/v2/models/{name}[/versions/{v}]/stats``): the
  shape Triton's statistics extension gives (what ``tritonclient``'s
  ``get_inference_statistics`` reads), one entry per served version (shadow arms included):
  ``inference_count`` rows answered, ``execution_count`` runtime calls (fewer than requests
  when dynamic batching joins them), ``success`` / ``compute_infer`` the answered requests and
  the runtime's time for them, ``fail`` the failed ones (their time is not kept: 0 ns),
  ``queue`` the time waited for a batch (not split out: 0 ns). ``last_inference`` is
  milliseconds since the epoch.
* Repository index (``POST /v2/repository/index``): every served version, ``READY``.
  Loading and unloading are not served: what a device serves is decided by the control
  plane's signed releases (an install verifies, smoke-tests and probates a version), so a
  local client may not change it (403 with that reason).
"""

from __future__ import annotations

from typing import Any

from edge_agent.serving.errors import ModelNotFoundError

__all__ = ["EXTENSIONS", "REPOSITORY_REFUSAL", "SERVER_NAME", "repository_index", "statistics"]

SERVER_NAME = "edgefleet-agent"
EXTENSIONS = ("binary_tensor_data", "parameters", "statistics")

REPOSITORY_REFUSAL = ("models are installed and removed by the control plane's signed "
                      "releases (verified, smoke-tested, probated), not by local clients")


def _duration(count: int, seconds: float) -> dict[str, int]:
    return {"count": count, "ns": round(seconds * 1e9)}


def statistics(stats: dict[str, Any], name: str | None = None,
               version: int | None = None) -> dict[str, Any]:
    """``{"model_stats": [...]}`` for every model, or one model (and version)."""
    models = stats["models"]
    if name is not None and name not in models:
        raise ModelNotFoundError(f"{name} is not served")
    out = []
    for model_name, model in models.items():
        if name is not None and model_name != name:
            continue
        for ver, arm in sorted(model["arms"].items(), key=lambda item: int(item[0])):
            if version is not None and int(ver) != version:
                continue
            ok = arm["requests"] - arm["errors"]
            spent = arm["latency_sum_s"]
            out.append({
                "name": model_name, "version": ver,
                "last_inference": round(arm["last_inference_s"] * 1000),
                "inference_count": arm["rows"], "execution_count": arm["executions"],
                "inference_stats": {
                    "success": _duration(ok, spent), "fail": _duration(arm["errors"], 0.0),
                    "queue": _duration(ok, 0.0), "compute_input": _duration(ok, 0.0),
                    "compute_infer": _duration(ok, spent), "compute_output": _duration(ok, 0.0),
                },
                "batch_stats": [],
            })
    if version is not None and not out:
        raise ModelNotFoundError(f"{name} v{version} is not served")
    return {"model_stats": out}


def repository_index(models: dict[str, dict[str, Any]]) -> list[dict[str, str]]:
    """Every served (model, version), ``READY`` (``ServingCore.models()``)."""
    return [{"name": name, "version": version, "state": "READY"}
            for name, meta in sorted(models.items()) for version in meta["versions"]]
