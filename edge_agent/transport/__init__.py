"""How the agent reaches the control plane: one abstract transport, gRPC and MQTT under it.

``make_transport`` picks one from the agent's config (``agent.transport``, set at enrollment or
by ``edge-agent run --transport``); everything above it (release trust, install, the telemetry
outbox) is the same code for both.
"""

from __future__ import annotations

from collections.abc import Callable

from edge_agent.credentials import Credentials
from edge_agent.state import AgentConfig, StateDir
from edge_agent.transport.base import MAX_CHUNK_BYTES, RefusedError, Transport
from fleetcore.errors import InvalidInputError

__all__ = ["MAX_CHUNK_BYTES", "TRANSPORTS", "RefusedError", "Transport", "make_transport"]

TRANSPORTS = ("grpc", "mqtt")


def make_transport(config: AgentConfig, state: StateDir,
                   credentials: Callable[[], Credentials]) -> Transport:
    """The transport that ``config.transport`` names."""
    if config.transport == "grpc":
        from edge_agent.transport.grpc import GrpcTransport  # noqa: PLC0415

        return GrpcTransport(config.failover_addresses(), credentials)
    if config.transport == "mqtt":
        if not config.mqtt_url:
            raise InvalidInputError(
                "the mqtt transport needs a broker URL (agent.mqtt_url in agent.toml); the "
                "control plane gives one at enrollment when it runs with --mqtt"
            )
        from edge_agent.transport.mqtt import MqttTransport  # noqa: PLC0415

        return MqttTransport(config.mqtt_url, config.device_id, state,
                             reconnect_min_seconds=config.backoff_initial_seconds,
                             reconnect_max_seconds=config.backoff_max_seconds)
    raise InvalidInputError(f"transport must be one of {', '.join(TRANSPORTS)}; "
                            f"got {config.transport!r}")
