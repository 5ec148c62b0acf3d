"""The agent's state directory: identity, pinned trust roots, config and last status."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fleetcore import strict_json, tomlfile
from fleetcore.addresses import parse_hostport
from fleetcore.errors import InvalidInputError
from fleetcore.files import atomic_write

__all__ = ["AgentConfig", "StateDir"]


@dataclass(frozen=True)
class StateDir:
    root: Path

    @property
    def key(self) -> Path:
        return self.root / "device.key"

    @property
    def cert(self) -> Path:
        return self.root / "device.pem"

    @property
    def ca(self) -> Path:
        return self.root / "ca.pem"

    @property
    def release_pub(self) -> Path:
        return self.root / "trust" / "release.pub"

    @property
    def root_file(self) -> Path:
        """The chain of accepted roots of trust (``install/root_trust.py``)."""
        return self.root / "trust" / "root.json"

    @property
    def publishers_dir(self) -> Path:
        return self.root / "trust" / "publishers"

    @property
    def config(self) -> Path:
        return self.root / "agent.toml"

    @property
    def release(self) -> Path:
        return self.root / "release.json"

    @property
    def models(self) -> Path:
        return self.root / "models"

    @property
    def sample_key(self) -> Path:
        """This device's key for pseudonymizing PII in training samples (never sent)."""
        return self.root / "sample.key"

    @property
    def outbox(self) -> Path:
        return self.root / "outbox.db"

    @property
    def downloads(self) -> Path:
        return self.root / "downloads"

    def publisher_keys(self) -> list[bytes]:
        return [p.read_bytes() for p in sorted(self.publishers_dir.glob("*.pub"))]

    @property
    def status(self) -> Path:
        return self.root / "status.json"

    def is_enrolled(self) -> bool:
        return self.config.exists() and self.cert.exists() and self.key.exists()

    def read_status(self) -> dict[str, Any]:
        try:
            doc = strict_json.loads(self.status.read_bytes(), what="status.json")
        except FileNotFoundError:
            return {}
        except InvalidInputError as exc:
            return {"error": str(exc)}
        return doc if isinstance(doc, dict) else {}

    def write_status(self, doc: dict[str, Any]) -> None:
        atomic_write(self.status, json.dumps(doc, indent=2, sort_keys=True).encode())


@dataclass
class AgentConfig:
    device_id: str
    api_address: str
    mqtt_url: str = ""
    # Every replica's API address (enrollment gives them; docs/operator-guide.md, "Several
    # replicas: agent failover"). Empty (an agent.toml from before): api_address alone.
    api_addresses: list[str] = field(default_factory=list)
    transport: str = "grpc"
    labels: dict[str, str] = field(default_factory=dict)
    heartbeat_interval_seconds: float = 10.0
    # Renew the certificate once this fraction of its lifetime has passed.
    renew_at_fraction: float = 2 / 3
    backoff_initial_seconds: float = 0.5
    backoff_max_seconds: float = 30.0
    # A new model version serves on probation this long before it is committed (when no
    # regression shows first); a download chunk that takes longer than the timeout is a stall.
    probation_seconds: float = 300.0
    download_chunk_timeout_seconds: float = 30.0
    # Slow retrieval (docs/security.md, "Detection"): a download below this rate over each
    # window, or running past the deadline, is aborted, retried later and reported (0: off).
    download_min_bytes_per_second: float = 1024.0
    download_rate_window_seconds: float = 30.0
    download_deadline_seconds: float = 3600.0
    # Drift windows close after this many served rows or seconds, whichever comes first.
    drift_window_requests: float = 500
    drift_window_seconds: float = 300.0
    # Agent starts while a version is on probation before it is rolled back (a crash loop).
    probation_max_restarts: float = 3
    # Smoke test limits (a manifest's smoke_test may only lower them): per call, for starting
    # the test process and loading the model, and the median smoke batch's latency budget.
    smoke_timeout_seconds: float = 10.0
    smoke_load_timeout_seconds: float = 60.0
    smoke_latency_budget_ms: float = 1000.0
    smoke_memory_mb: float = 2048.0  # address space of the smoke test's child process
    # Dynamic batching per model (edge_agent/serving/batching.py), over a manifest's hint:
    # [batching.MODEL] max_batch_size = 32, max_queue_delay_us = 500. Off when absent.
    batching: dict[str, dict[str, int]] = field(default_factory=dict)
    # The [otel] section of agent.toml (fleetcore.otel; the OTEL_* variables work without it).
    otel: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def load(cls, state: StateDir) -> AgentConfig:
        if not state.is_enrolled():
            raise InvalidInputError(
                f"{state.root} holds no enrolled agent; run `edge-agent enroll` first"
            )
        doc = tomlfile.load(state.config)
        agent = doc.get("agent", {})
        try:
            cfg = cls(device_id=str(agent["device_id"]), api_address=str(agent["api_address"]))
        except KeyError as exc:
            raise InvalidInputError(f"{state.config}: missing agent.{exc.args[0]}") from None
        cfg.mqtt_url = str(agent.get("mqtt_url", ""))
        addresses = agent.get("api_addresses", [])
        if not isinstance(addresses, list) or not all(isinstance(a, str) for a in addresses):
            raise InvalidInputError(f"{state.config}: agent.api_addresses must be a list of "
                                    '"HOST:PORT"')
        for address in addresses:
            parse_hostport(address)
        cfg.api_addresses = list(addresses)
        cfg.transport = str(agent.get("transport", "grpc"))
        cfg.labels = {str(k): str(v) for k, v in doc.get("labels", {}).items()}
        for name in ("heartbeat_interval_seconds", "renew_at_fraction",
                     "backoff_initial_seconds", "backoff_max_seconds", "probation_seconds",
                     "download_chunk_timeout_seconds", "download_min_bytes_per_second",
                     "download_rate_window_seconds", "download_deadline_seconds",
                     "drift_window_requests",
                     "drift_window_seconds", "probation_max_restarts", "smoke_timeout_seconds",
                     "smoke_load_timeout_seconds", "smoke_latency_budget_ms",
                     "smoke_memory_mb"):
            value = agent.get(name, getattr(cfg, name))
            if not isinstance(value, int | float) or isinstance(value, bool) or value < 0:
                raise InvalidInputError(f"{state.config}: agent.{name} must be a number >= 0")
            setattr(cfg, name, float(value))
        batching = doc.get("batching", {})
        if not isinstance(batching, dict) or not all(
                isinstance(v, dict) and set(v) <= {"max_batch_size", "max_queue_delay_us"}
                and all(isinstance(n, int) and not isinstance(n, bool) for n in v.values())
                for v in batching.values()):
            raise InvalidInputError(f"{state.config}: [batching.MODEL] takes the integers "
                                    "max_batch_size and max_queue_delay_us")
        cfg.batching = {str(k): dict(v) for k, v in batching.items()}
        otel = doc.get("otel", {})
        if not isinstance(otel, dict):
            raise InvalidInputError(f"{state.config}: [otel] must be a table")
        cfg.otel = dict(otel)
        return cfg

    def failover_addresses(self) -> list[str]:
        """The API addresses to walk: the enrolled list, or api_address alone."""
        return list(dict.fromkeys(self.api_addresses)) or [self.api_address]

    def save(self, state: StateDir) -> None:
        tomlfile.write(
            state.config,
            {
                "agent": {
                    "device_id": self.device_id,
                    "api_address": self.api_address,
                    **({"api_addresses": self.api_addresses} if self.api_addresses else {}),
                    "mqtt_url": self.mqtt_url,
                    "transport": self.transport,
                    "heartbeat_interval_seconds": self.heartbeat_interval_seconds,
                    "renew_at_fraction": self.renew_at_fraction,
                    "backoff_initial_seconds": self.backoff_initial_seconds,
                    "backoff_max_seconds": self.backoff_max_seconds,
                    "probation_seconds": self.probation_seconds,
                    "download_chunk_timeout_seconds": self.download_chunk_timeout_seconds,
                    "download_min_bytes_per_second": self.download_min_bytes_per_second,
                    "download_rate_window_seconds": self.download_rate_window_seconds,
                    "download_deadline_seconds": self.download_deadline_seconds,
                    "drift_window_requests": self.drift_window_requests,
                    "drift_window_seconds": self.drift_window_seconds,
                    "probation_max_restarts": self.probation_max_restarts,
                    "smoke_timeout_seconds": self.smoke_timeout_seconds,
                    "smoke_load_timeout_seconds": self.smoke_load_timeout_seconds,
                    "smoke_latency_budget_ms": self.smoke_latency_budget_ms,
                    "smoke_memory_mb": self.smoke_memory_mb,
                },
                "labels": self.labels,
                **({"batching": self.batching} if self.batching else {}),
                **({"otel": self.otel} if self.otel else {}),
            },
        )
