"""The Edgefleet edge agent: enrollment, staying in touch, installing and serving models.

* ``cli``, ``daemon``, ``enroll``, ``identity``, ``state``: the ``edge-agent`` command, its loop
  (heartbeats, release sync, certificate renewal), enrollment and the state directory.
* ``transport/``: gRPC or MQTT to the control plane.
* ``install/``: release trust, download, verification, smoke test, model store, probation.
* ``serving/``: Open Inference Protocol over HTTP and gRPC, the A/B router, per-arm stats.
* ``supervisor``: the glue between installed models and serving (arms, probation, samples).
* ``reporting/``: drift, the telemetry outbox and its sender.
"""

from edge_agent._version import __version__
from edge_agent.daemon import Agent
from edge_agent.enroll import enroll
from edge_agent.state import AgentConfig, StateDir

__all__ = ["Agent", "AgentConfig", "StateDir", "__version__", "enroll"]
