"""`control-plane mqtt-config`: a Mosquitto 2.0 configuration for the fleet, and its CRL.

What it writes under ``--out``:

* ``mosquitto.conf``: one TLS listener that requires a client certificate from the fleet CA,
  ``use_identity_as_username`` (the certificate's CN, which is the device id for a device) and
  ``use_username_as_clientid`` (so no client can take over another's session), persistence,
  and queue limits sized for the fleet;
* ``acl``: each device may read only its release and reply topics and write only its
  telemetry, status and request topics (patterns with ``%u``); the bridge may do everything;
* ``ca.pem``, ``server.pem``/``server.key`` (the control plane's server certificate, whose SANs
  the agents check), ``crl.pem`` (the fleet CA's revocation list);
* ``data/`` for Mosquitto's persistence, and ``mosquitto.pid``.

The bridge's own client certificate goes to ``HOME/pki/mqtt-bridge.{pem,key}``, and
``HOME/mqtt.toml`` records where all this lives so that ``control-plane serve --mqtt`` finds it.

Revocation: Mosquitto checks client certificates against ``crl.pem`` at each TLS handshake and
reads the file at start-up and on SIGHUP. The control plane rewrites it (atomically) whenever it
revokes a device, and then sends SIGHUP to the PID in ``mosquitto.pid``; a broker that runs
elsewhere needs the file copied and the signal sent by the operator's tooling. A connection
that is already open stays open: the bridge ignores what a revoked device sends on it, clears
its retained release, and the broker refuses its next connect.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import pwd
from pathlib import Path

from control_plane.config import ControlPlaneConfig
from control_plane.services.authority import Authority
from control_plane.services.broker import MAX_BRIDGES, MqttSettings, bridge_name, write_crl
from control_plane.storage import Store
from fleetcore import pki, tomlfile
from fleetcore.errors import InvalidInputError
from fleetcore.files import atomic_write, ensure_private_dir
from fleetcore.mqtt_wire import DEVICE_PREFIX, MAX_MESSAGE_BYTES, ROOTS_TOPIC, Leaf

__all__ = ["write_broker_config"]

log = logging.getLogger(__name__)

BRIDGE_CERT_DAYS = 365
# Per-client queue beyond the 100 messages in flight: a device gets releases and bundle replies;
# the bridge gets what every device sends (heartbeats and telemetry batches), so its backlog
# grows with the fleet: about ten minutes of a device's traffic at one message every five
# seconds. Sessions are clean (fleetcore.mqtt_wire.CLEAN_START): nothing queues for a client
# that is away.
QUEUED_PER_DEVICE = 120
MIN_QUEUED_MESSAGES = 1000

_DEVICE_READS = (Leaf.RELEASE, Leaf.TELEMETRY_ACK, Leaf.BUNDLE_REPLY, Leaf.RENEW_REPLY)
_DEVICE_WRITES = (Leaf.TELEMETRY, Leaf.STATUS, Leaf.BUNDLE_REQUEST, Leaf.RENEW_REQUEST)


def write_broker_config(
    cfg: ControlPlaneConfig, store: Store, out: Path, *, port: int = 8883, bind: str = "",
    fleet_size: int = 0, now: float, broker_dir: Path | None = None,
    data_dir: Path | None = None, bridges: int = 1,
) -> MqttSettings:
    """Write the broker's files under ``out`` and the bridge's certificate under the home.

    ``broker_dir``: where the broker will see these files when that is not ``out`` (a
    container mounting them, e.g. ``/mosquitto/config``); ``data_dir``: a writable directory
    for its persistence and pid file (default ``BROKER_DIR/data``); ``bridges``: how many
    control-plane replicas bridge to this broker (each one's identity: ``serve --bridge N``).
    """
    if not 1 <= bridges <= MAX_BRIDGES:
        raise InvalidInputError(f"bridges must be 1-{MAX_BRIDGES}; got {bridges}")
    if not 0 < port < 65536:
        raise InvalidInputError(f"port must be 1-65535; got {port}")
    authority = Authority.load(cfg)
    out = Path(out).resolve()
    ensure_private_dir(out)
    (out / "data").mkdir(exist_ok=True)
    settings = MqttSettings(out=out, port=port)
    lay = cfg.layout
    atomic_write(settings.ca, authority.ca_pem)
    atomic_write(settings.server_cert, authority.server_cert_pem)
    atomic_write(settings.server_key, authority.server_key_pem, mode=0o600)
    write_crl(authority, store, settings.crl, now)

    when = dt.datetime.fromtimestamp(now, dt.UTC)
    for index in range(1, bridges + 1):
        key = pki.generate_key()
        cert = pki.issue_service_certificate(
            authority.ca_key, authority.ca_cert, key.public_key(), bridge_name(index), when,
            dt.timedelta(days=BRIDGE_CERT_DAYS))
        atomic_write(settings.bridge_key(lay.home, index), pki.private_key_pem(key), mode=0o600)
        atomic_write(settings.bridge_cert(lay.home, index), pki.certificate_pem(cert))

    devices = max(fleet_size, len(store.list_devices()), 1)
    atomic_write(settings.acl, _acl(bridges).encode())
    seen = MqttSettings(out=Path(broker_dir), port=port) if broker_dir is not None else settings
    data = Path(data_dir) if data_dir is not None else seen.out / "data"
    atomic_write(settings.conf, _conf(seen, bind, devices, data).encode())
    tomlfile.write(settings.path(lay.home), {"broker": {"out": str(out), "port": port}})
    log.info("wrote a Mosquitto configuration for about %d devices to %s", devices, out)
    return settings


def _acl(bridges: int = 1) -> str:
    lines = [
        "# Written by `control-plane mqtt-config`. A client's username is the CN of its",
        "# certificate: a device id for devices, so each device is confined to its own subtree.",
    ]
    lines += [f"pattern read {DEVICE_PREFIX}/%u/{leaf.value}" for leaf in _DEVICE_READS]
    lines += [f"pattern write {DEVICE_PREFIX}/%u/{leaf.value}" for leaf in _DEVICE_WRITES]
    lines += ["# Every device reads the fleet's signed roots of trust (retained).",
              f"pattern read {ROOTS_TOPIC}"]
    lines += ["", "# The control plane's bridges (one per replica): every device's topics,",
              "# subscribed through the shared subscription $share/edgefleet/... (mosquitto",
              "# checks a shared subscription against the topic filter after the share name)."]
    for index in range(1, bridges + 1):
        lines += [f"user {bridge_name(index)}", f"topic readwrite {DEVICE_PREFIX}/#",
                  f"topic readwrite {ROOTS_TOPIC}"]
    lines.append("")
    return "\n".join(lines)


def _conf(s: MqttSettings, bind: str, devices: int, data: Path) -> str:
    user = pwd.getpwuid(os.getuid()).pw_name
    queued = max(MIN_QUEUED_MESSAGES, devices * QUEUED_PER_DEVICE)
    return "\n".join([
        "# Written by `control-plane mqtt-config`; run it again rather than editing by hand.",
        f"# Sized for about {devices} devices (--fleet-size).",
        "per_listener_settings false",
        f"user {user}",
        f"pid_file {s.pid_file if data == s.out / 'data' else data / 'mosquitto.pid'}",
        "allow_anonymous false",
        f"acl_file {s.acl}",
        "persistence true",
        f"persistence_location {data}/",
        "autosave_interval 10",
        "log_dest stderr",
        "log_type error",
        "log_type warning",
        "log_type notice",
        "log_type information",
        "connection_messages true",
        f"max_packet_size {MAX_MESSAGE_BYTES + 64 * 1024}",
        "max_inflight_messages 100",
        # Nagle's algorithm off: a telemetry acknowledgement or a release (a small message
        # after a large one) otherwise waits for the peer's delayed ACK, ~40 ms a hop.
        "set_tcp_nodelay true",
        f"max_queued_messages {queued}",
        # Agents and the bridge keep no session; this bounds any left by older agents.
        "persistent_client_expiration 14d",
        "",
        f"listener {s.port}{' ' + bind if bind else ''}",
        "protocol mqtt",
        f"cafile {s.ca}",
        f"certfile {s.out / 'server.pem'}",
        f"keyfile {s.out / 'server.key'}",
        f"crlfile {s.crl}",
        "tls_version tlsv1.2",
        "require_certificate true",
        "use_identity_as_username true",
        "use_username_as_clientid true",
        "",
    ])
