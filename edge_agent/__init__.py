"""The Edgefleet edge agent: enrollment, staying in touch, installing and serving models.

* ``cli``, ``daemon``, ``enroll``, ``identity``, ``state``: the ``edge-agent`` command, its loop
  (heartbeats, release sync, certificate renewal), enrollment and the state directory.
* ``transport/``: gRPC or MQTT to the control plane.
* ``install/``: release trust, download, verification, smoke test, model store, probation.
* ``serving/``: Open Inference Protocol over HTTP and gRPC, the A/B router, per-arm stats.
* ``supervisor``: the glue between installed models and serving (arms, probation, samples).
* ``reporting/``: drift, the telemetry outbox and its sender.

The names below are loaded on first use: importing one module of the agent (its ``cli`` for
``edge-agent run``) does not import the others, so an agent loads only what its configuration
needs (grpc only to enroll or for the gRPC transport or listener; docs/serving.md, "Agent
footprint").
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from edge_agent._version import __version__

if TYPE_CHECKING:
    from edge_agent.daemon import Agent
    from edge_agent.enroll import enroll
    from edge_agent.state import AgentConfig, StateDir

__all__ = ["Agent", "AgentConfig", "StateDir", "__version__", "enroll"]

_WHERE = {"Agent": "daemon", "enroll": "enroll", "AgentConfig": "state", "StateDir": "state"}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'edge_agent' has no attribute {name!r}")
    return getattr(importlib.import_module(f"edge_agent.{module}"), name)
