"""Model serving on the agent: runtimes, the A/B router, per-arm stats, HTTP and gRPC front ends.

Use::

    core = ServingCore(on_prediction=drift.update, on_result=probation_record)
    core.set_model("digits", [(3, 0.9, False), (4, 0.1, False), (5, 0.0, True)],
                   {3: dir3, 4: dir4, 5: dir5})          # from a thread: it loads sessions
    metrics = ServingMetrics(core)                        # add_gauge(...) for the daemon's own
    http, http_port = await start_http(core, "127.0.0.1", 8080, metrics=metrics)
    grpc_server, grpc_port = await start_grpc(core, "127.0.0.1", 8081)
    ...
    await http.stop(); await grpc_server.stop(1.0); core.close()

The names are loaded on first use (``__getattr__``): importing one module of the package
does not import the others. Each module's docstring states its rules;
``scripts/bench_agent_serving.py`` (not shipped) measures the docs/design.md §9 targets.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the names below are loaded on first use (module rules)
    from edge_agent.serving.core import InferResult, ModelSignature, ServingCore
    from edge_agent.serving.errors import (
        BadRequestError,
        InferenceError,
        ModelNotFoundError,
        PayloadTooLargeError,
    )
    from edge_agent.serving.grpc_server import start_grpc
    from edge_agent.serving.http import HttpServer, start_http
    from edge_agent.serving.metrics import ServingMetrics
    from edge_agent.serving.router import Router, RouterArm
    from edge_agent.serving.runtime import Runtime, load_runtime

# name -> module: importing the package loads none of them, so an agent that serves only
# HTTP never loads the gRPC front end (and its protobuf and grpc modules), and one that serves
# none never loads uvicorn (docs/serving.md, "Agent footprint").
_WHERE = {
    "InferResult": "core", "ModelSignature": "core", "ServingCore": "core",
    "BadRequestError": "errors", "InferenceError": "errors", "ModelNotFoundError": "errors",
    "PayloadTooLargeError": "errors", "start_grpc": "grpc_server", "HttpServer": "http",
    "start_http": "http", "ServingMetrics": "metrics", "Router": "router",
    "RouterArm": "router", "Runtime": "runtime", "load_runtime": "runtime",
}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'edge_agent.serving' has no attribute {name!r}")
    return getattr(importlib.import_module(f"edge_agent.serving.{module}"), name)

__all__ = [
    "BadRequestError",
    "HttpServer",
    "InferResult",
    "InferenceError",
    "ModelNotFoundError",
    "ModelSignature",
    "PayloadTooLargeError",
    "Router",
    "RouterArm",
    "Runtime",
    "ServingCore",
    "ServingMetrics",
    "load_runtime",
    "start_grpc",
    "start_http",
]
