"""The control plane's home directory layout and its config.toml."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fleetcore import tomlfile
from fleetcore.addresses import parse_hostport
from fleetcore.errors import InvalidInputError

__all__ = ["DEFAULT_API", "DEFAULT_ENROLL", "RETRAIN_RUNNERS", "ControlPlaneConfig", "HomeLayout",
           "RetrainCluster", "parse_hostport"]

DEFAULT_API = "127.0.0.1:7443"
DEFAULT_ENROLL = "127.0.0.1:7444"
RETRAIN_RUNNERS = ("local", "kubernetes", "argo")
_K8S_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|Ki|Mi|Gi|Ti|k|M|G|T)?$")


PKCS11_KEYS = ("ca", "release", "audit")


@dataclass(frozen=True)
class Pkcs11Settings:
    """[pki.pkcs11]: keys kept in a PKCS#11 token (control_plane/services/hsm.py) instead of
    files. The PIN is read from the environment variable ``pin_env``, never from this file."""

    module: Path  # the token's PKCS#11 library, e.g. /usr/lib/softhsm/libsofthsm2.so
    token: str  # the token's label
    pin_env: str  # the environment variable holding the user PIN
    keys: tuple[str, ...] = ("ca", "release")  # which keys live in the token (PKCS11_KEYS)

    @classmethod
    def parse(cls, doc: Any) -> Pkcs11Settings:
        if not isinstance(doc, dict):
            raise InvalidInputError("config [pki.pkcs11] must be a table")
        for name in ("module", "token", "pin_env"):
            if not isinstance(doc.get(name), str) or not doc[name]:
                raise InvalidInputError(f"config pki.pkcs11.{name} must be a non-empty string")
        keys = doc.get("keys", ["ca", "release"])
        if not isinstance(keys, list) or not set(keys) <= set(PKCS11_KEYS):
            raise InvalidInputError(f"config pki.pkcs11.keys must list some of {PKCS11_KEYS}")
        if "pin" in doc:
            raise InvalidInputError("config pki.pkcs11: never write the PIN in the file; name "
                                    "an environment variable in pin_env")
        return cls(module=Path(doc["module"]), token=doc["token"], pin_env=doc["pin_env"],
                   keys=tuple(dict.fromkeys(str(k) for k in keys)))

    def to_toml(self) -> dict[str, Any]:
        return {"module": str(self.module), "token": self.token, "pin_env": self.pin_env,
                "keys": list(self.keys)}

    def holds(self, name: str) -> bool:
        return name in self.keys


@dataclass(frozen=True)
class RetrainCluster:
    """How a retraining job runs on a cluster ([retrain] with runner "kubernetes" or "argo").

    The job's work directory is HOME/retrain/job-N on both sides: the control plane mounts the
    ReadWriteMany claim ``work_claim`` (sub-path ``work_subpath``) at HOME/retrain, and the
    job mounts job-N of it at the same path, so it reads the samples and baseline the control
    plane wrote and leaves its bundle where the control plane publishes it from."""

    namespace: str = "edgefleet"
    image: str = "edgefleet/trainer:0.1.0"
    kubeconfig: str = ""  # empty: the pod's in-cluster service account
    work_claim: str = "edgefleet-training"
    work_subpath: str = "retrain"
    # The Secret (a name, not a secret) holding publisher.key, mounted in the pod at /keys.
    publisher_secret: str = "edgefleet-publisher"  # noqa: S105
    service_account: str = "edgefleet-workflow"  # the Argo executor's (runner "argo")
    deadline_seconds: int = 6 * 3600
    cpu: str = "4"
    memory: str = "8Gi"
    gpus: int = 0

    @classmethod
    def from_toml(cls, table: dict[str, Any]) -> RetrainCluster:
        d = cls()
        out: dict[str, Any] = {}
        for name in ("namespace", "work_claim", "publisher_secret", "service_account"):
            value = table.get(name, getattr(d, name))
            if not isinstance(value, str) or not _K8S_NAME.match(value):
                raise InvalidInputError(f"config retrain.{name} must be a Kubernetes name "
                                        f"(a-z, 0-9, '-'); got {value!r}")
            out[name] = value
        for name in ("image", "kubeconfig", "work_subpath"):
            value = table.get(name, getattr(d, name))
            if not isinstance(value, str) or any(c.isspace() for c in value) or (
                    name != "kubeconfig" and not value) or ".." in value.split("/"):
                raise InvalidInputError(f"config retrain.{name} must be a string without "
                                        f"spaces; got {value!r}")
            out[name] = value
        for name in ("cpu", "memory"):
            value = table.get(name, getattr(d, name))
            if not isinstance(value, str) or not _QUANTITY.match(value):
                raise InvalidInputError(f"config retrain.{name} must be a Kubernetes quantity "
                                        f"such as \"4\" or \"8Gi\"; got {value!r}")
            out[name] = value
        out["deadline_seconds"] = _positive_int(table, "deadline_seconds", d.deadline_seconds)
        gpus = table.get("gpus", d.gpus)
        if not isinstance(gpus, int) or isinstance(gpus, bool) or gpus < 0:
            raise InvalidInputError(f"config retrain.gpus must be an integer >= 0; got {gpus!r}")
        out["gpus"] = gpus
        return cls(**out)

    def to_toml(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


@dataclass(frozen=True)
class HomeLayout:
    """Where `control-plane init` puts things under --home."""

    home: Path

    @property
    def config(self) -> Path:
        return self.home / "config.toml"

    @property
    def ca_cert(self) -> Path:
        return self.home / "pki" / "ca.pem"

    @property
    def ca_key(self) -> Path:
        return self.home / "pki" / "ca.key"

    @property
    def server_cert(self) -> Path:
        return self.home / "pki" / "server.pem"

    @property
    def server_key(self) -> Path:
        return self.home / "pki" / "server.key"

    @property
    def old_ca_cert(self) -> Path:
        """The previous fleet CA while a CA rotation is in transition (until --retire-old)."""
        return self.home / "pki" / "ca-old.pem"

    @property
    def old_ca_key(self) -> Path:
        return self.home / "pki" / "ca-old.key"

    @property
    def release_key(self) -> Path:
        return self.home / "keys" / "release.key"

    @property
    def release_pub(self) -> Path:
        return self.home / "keys" / "release.pub"

    @property
    def audit_key(self) -> Path:
        return self.home / "keys" / "audit.key"

    @property
    def audit_pub(self) -> Path:
        return self.home / "keys" / "audit.pub"

    @property
    def root_keys(self) -> Path:
        """The root keys made by init (move them offline: only signed roots are needed)."""
        return self.home / "root-keys"

    @property
    def publisher_key(self) -> Path:
        return self.home / "publisher" / "publisher.key"

    @property
    def publisher_pub(self) -> Path:
        return self.home / "publisher" / "publisher.pub"

    @property
    def database(self) -> Path:
        return self.home / "edgefleet.db"

    @property
    def blob_key(self) -> Path:
        return self.home / "keys" / "blob.key"

    @property
    def blobs(self) -> Path:
        return self.home / "blobs"

    @property
    def scratch(self) -> Path:
        return self.home / "tmp"

    def operator_dir(self, name: str) -> Path:
        return self.home / "operators" / name


def _api_addresses(value: Any) -> list[str]:
    """``[server] api_addresses``: every replica's HOST:PORT (or one name for them all)."""
    if not isinstance(value, list) or not all(isinstance(a, str) for a in value):
        raise InvalidInputError('config server.api_addresses must be a list of "HOST:PORT"')
    for address in value:
        parse_hostport(address)
    return list(value)


@dataclass
class ControlPlaneConfig:
    home: Path
    api_listen: str = DEFAULT_API
    # What enrollment tells agents to dial; empty means the API's bound address.
    api_advertise: str = ""
    # Every replica's API address, handed to agents at enrollment so that they fail over
    # (docs/operator-guide.md, "Several replicas: agent failover"); empty: the advertised one.
    api_addresses: list[str] = field(default_factory=list)
    enroll_listen: str = DEFAULT_ENROLL
    mqtt_url: str = ""
    # Which bridge identity this replica's MQTT bridge uses (`serve --bridge N`; not saved:
    # each replica of a home picks its own among those `mqtt-config --bridges` issued).
    mqtt_bridge: int = 1
    database: Path = field(default=Path("edgefleet.db"))
    # A database server instead of the SQLite file: postgresql://USER@HOST:PORT/DB ("" = SQLite).
    database_url: str = ""
    publisher_keys: list[Path] = field(default_factory=list)
    device_cert_ttl_seconds: int = 7 * 24 * 3600
    operator_cert_ttl_seconds: int = 365 * 24 * 3600
    token_ttl_seconds: int = 3600
    max_token_ttl_seconds: int = 30 * 24 * 3600
    heartbeat_interval_seconds: int = 10
    # Release documents live this long; they are renewed once half of it is left.
    release_ttl_seconds: int = 24 * 3600
    max_bundle_bytes: int = 2 * 1024**3
    # A device not heard from for this long is shown offline.
    offline_after_seconds: int = 35
    # What a suspected cloned device certificate leads to: "flag" (flagged and audited) or
    # "revoke" (also revoked). docs/security.md, "Detection".
    on_clone: str = "flag"
    # Experiments decide once both arms have this many labelled requests, at this alpha.
    experiment_min_samples: int = 200
    experiment_alpha: float = 0.05
    # ... and once this many devices gave feedback on each arm: no single device decides.
    experiment_min_devices: int = 3
    # Staged rollouts: how often the scheduler looks, and how long a device may stay silent
    # in a step before it counts as failed.
    rollout_tick_seconds: float = 2.0
    # The key retraining jobs sign their bundles with (the publisher key init made; point it
    # at the training environment's key, or run jobs on Kubernetes, to keep it off this host).
    retrain_publisher_key: Path = field(default=Path("publisher/publisher.key"))
    # Where retraining jobs run: "local" (a child process), "kubernetes" (a batch/v1 Job) or
    # "argo" (an Argo Workflow); the last two are described by retrain_cluster.
    retrain_runner: str = "local"
    retrain_cluster: RetrainCluster = field(default_factory=RetrainCluster)
    rollout_device_timeout_seconds: float = 600.0
    # Telemetry quota per device (token buckets: a rate and a burst, of records and of bytes)
    # and retention (raw rows, then a daily roll-up; drift windows), checked this often.
    telemetry_records_per_second: float = 2.0
    telemetry_bytes_per_second: float = 4096.0
    telemetry_burst_records: float = 2000.0
    telemetry_burst_bytes: float = 4.0 * 1024 * 1024
    telemetry_raw_retention_seconds: float = 7 * 86400.0
    telemetry_drift_retention_seconds: float = 30 * 86400.0
    telemetry_expire_every_seconds: float = 300.0
    # Prometheus /metrics, /healthz and /readyz (HTTP, no TLS: bind it where only the
    # monitoring network reaches); empty: not served.
    metrics_listen: str = ""
    # The [otel] section as written (fleetcore.otel.OtelSettings checks it at start); the
    # standard OTEL_* variables work without it.
    otel: dict[str, Any] = field(default_factory=dict)
    # [pki.pkcs11]: the CA, release (and audit) keys in a PKCS#11 token; None: key files.
    pkcs11: Pkcs11Settings | None = None

    @property
    def layout(self) -> HomeLayout:
        return HomeLayout(self.home)

    @property
    def store_location(self) -> Path | str:
        """What ``open_store`` opens: the database URL where one is set, else the SQLite file."""
        return self.database_url or self.database

    @classmethod
    def load(cls, home: Path) -> ControlPlaneConfig:
        home = Path(home).resolve()
        path = HomeLayout(home).config
        if not path.exists():
            raise InvalidInputError(
                f"{home} is not a control-plane home (no config.toml); run `control-plane init`"
            )
        doc = tomlfile.load(path)
        server = doc.get("server", {})
        pki = doc.get("pki", {})
        agents = doc.get("agents", {})
        cfg = cls(home=home)
        cfg.api_listen = str(server.get("api", cfg.api_listen))
        cfg.api_advertise = str(server.get("api_advertise", cfg.api_advertise))
        cfg.api_addresses = _api_addresses(server.get("api_addresses", []))
        cfg.enroll_listen = str(server.get("enroll", cfg.enroll_listen))
        cfg.mqtt_url = str(server.get("mqtt", cfg.mqtt_url))
        cfg.metrics_listen = str(server.get("metrics", cfg.metrics_listen))
        otel = doc.get("otel", {})
        if not isinstance(otel, dict):
            raise InvalidInputError("config [otel] must be a table")
        cfg.otel = dict(otel)
        _load_database(cfg, str(server.get("database", "edgefleet.db")))
        cfg.max_bundle_bytes = _positive_int(server, "max_bundle_bytes", cfg.max_bundle_bytes)
        cfg.publisher_keys = [home / p for p in pki.get("publisher_keys", [])]
        if "pkcs11" in pki:
            cfg.pkcs11 = Pkcs11Settings.parse(pki["pkcs11"])
        _load_retrain(cfg, doc.get("retrain", {}))
        for name in (
            "device_cert_ttl_seconds",
            "operator_cert_ttl_seconds",
            "token_ttl_seconds",
            "max_token_ttl_seconds",
        ):
            setattr(cfg, name, _positive_int(pki, name, getattr(cfg, name)))
        for name in ("heartbeat_interval_seconds", "offline_after_seconds",
                     "release_ttl_seconds"):
            setattr(cfg, name, _positive_int(agents, name, getattr(cfg, name)))
        cfg.on_clone = str(agents.get("on_clone", cfg.on_clone))
        if cfg.on_clone not in ON_CLONE:
            raise InvalidInputError(f"config agents.on_clone must be one of "
                                    f"{', '.join(ON_CLONE)}; got {cfg.on_clone!r}")
        _load_experiments(cfg, doc.get("experiments", {}))
        rollouts = doc.get("rollouts", {})
        for key, name in (("tick_seconds", "rollout_tick_seconds"),
                          ("device_timeout_seconds", "rollout_device_timeout_seconds")):
            value = rollouts.get(key, getattr(cfg, name))
            if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                raise InvalidInputError(f"config rollouts.{key} must be a positive number")
            setattr(cfg, name, float(value))
        telemetry = doc.get("telemetry", {})
        for key in _TELEMETRY_KEYS:
            name = f"telemetry_{key}"
            value = telemetry.get(key, getattr(cfg, name))
            if isinstance(value, bool) or not isinstance(value, int | float) or not (
                    0 < value < float("inf")):
                raise InvalidInputError(f"config telemetry.{key} must be a positive number")
            setattr(cfg, name, float(value))
        parse_hostport(cfg.api_listen)
        parse_hostport(cfg.enroll_listen)
        if cfg.metrics_listen:
            parse_hostport(cfg.metrics_listen)
        return cfg

    def to_toml(self) -> dict[str, Any]:
        return {
            "server": {
                "api": self.api_listen,
                "api_advertise": self.api_advertise,
                **({"api_addresses": self.api_addresses} if self.api_addresses else {}),
                "enroll": self.enroll_listen,
                "mqtt": self.mqtt_url,
                "metrics": self.metrics_listen,
                "database": self.database_url or (
                    str(self.database.relative_to(self.home))
                    if self.database.is_absolute()
                    else str(self.database)),
                "max_bundle_bytes": self.max_bundle_bytes,
            },
            "pki": {
                "publisher_keys": [
                    str(p.relative_to(self.home)) if p.is_absolute() else str(p)
                    for p in self.publisher_keys
                ],
                "device_cert_ttl_seconds": self.device_cert_ttl_seconds,
                "operator_cert_ttl_seconds": self.operator_cert_ttl_seconds,
                "token_ttl_seconds": self.token_ttl_seconds,
                "max_token_ttl_seconds": self.max_token_ttl_seconds,
                **({"pkcs11": self.pkcs11.to_toml()} if self.pkcs11 is not None else {}),
            },
            "agents": {
                "heartbeat_interval_seconds": self.heartbeat_interval_seconds,
                "offline_after_seconds": self.offline_after_seconds,
                "release_ttl_seconds": self.release_ttl_seconds,
                "on_clone": self.on_clone,
            },
            "experiments": {
                "min_samples": self.experiment_min_samples,
                "min_devices": self.experiment_min_devices,
                "alpha": self.experiment_alpha,
            },
            "retrain": {
                "publisher_key": str(self.retrain_publisher_key.relative_to(self.home))
                if self.retrain_publisher_key.is_absolute() else str(self.retrain_publisher_key),
                "runner": self.retrain_runner,
                **self.retrain_cluster.to_toml(),
            },
            "rollouts": {
                "tick_seconds": self.rollout_tick_seconds,
                "device_timeout_seconds": self.rollout_device_timeout_seconds,
            },
            "telemetry": {key: getattr(self, f"telemetry_{key}") for key in _TELEMETRY_KEYS},
            **({"otel": self.otel} if self.otel else {}),
        }

    def save(self) -> None:
        tomlfile.write(self.layout.config, self.to_toml())


ON_CLONE = ("flag", "revoke")
_TELEMETRY_KEYS = ("records_per_second", "bytes_per_second", "burst_records", "burst_bytes",
                   "raw_retention_seconds", "drift_retention_seconds", "expire_every_seconds")


def _load_experiments(cfg: ControlPlaneConfig, experiments: dict[str, Any]) -> None:
    cfg.experiment_min_samples = _positive_int(experiments, "min_samples",
                                               cfg.experiment_min_samples)
    cfg.experiment_min_devices = _positive_int(experiments, "min_devices",
                                               cfg.experiment_min_devices)
    alpha = experiments.get("alpha", cfg.experiment_alpha)
    if not isinstance(alpha, float) or not 0 < alpha < 0.5:
        raise InvalidInputError(f"config experiments.alpha must be in (0, 0.5); got {alpha!r}")
    cfg.experiment_alpha = alpha


def _load_database(cfg: ControlPlaneConfig, database: str) -> None:
    """A URL (postgresql://...) names a database server; anything else is the SQLite file,
    relative to the home."""
    if "://" in database:
        cfg.database_url = database
    else:
        cfg.database = cfg.home / database


def _load_retrain(cfg: ControlPlaneConfig, retrain: dict[str, Any]) -> None:
    """[retrain]: the jobs' signing key, where they run, and how on a cluster."""
    cfg.retrain_publisher_key = cfg.home / str(retrain.get(
        "publisher_key", "publisher/publisher.key"))
    cfg.retrain_runner = str(retrain.get("runner", cfg.retrain_runner))
    if cfg.retrain_runner not in RETRAIN_RUNNERS:
        raise InvalidInputError(f"config retrain.runner must be one of "
                                f"{', '.join(RETRAIN_RUNNERS)}; got {cfg.retrain_runner!r}")
    cfg.retrain_cluster = RetrainCluster.from_toml(retrain)


def _positive_int(table: dict[str, Any], key: str, default: int) -> int:
    value = table.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise InvalidInputError(f"config {key} must be a positive integer; got {value!r}")
    return value
