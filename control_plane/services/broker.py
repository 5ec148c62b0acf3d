"""The fleet's MQTT broker as the serving control plane sees it: where its files are
(``HOME/mqtt.toml``, written by `control-plane mqtt-config`), and its certificate revocation
list, rewritten on every revocation and on a schedule, after which the broker is told to
reload it (SIGHUP to the PID in ``mosquitto.pid``)."""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import signal
from dataclasses import dataclass
from pathlib import Path

from control_plane.services.authority import Authority
from control_plane.storage import Store
from fleetcore import pki, tomlfile
from fleetcore.errors import InvalidInputError
from fleetcore.files import atomic_write

__all__ = ["BRIDGE_NAME", "CRL_DAYS", "MqttSettings", "refresh_crl", "write_crl"]

log = logging.getLogger(__name__)

# The bridge's CN: the ':' keeps it from ever being a device id or an operator name.
BRIDGE_NAME = "edgefleet:bridge"
CRL_DAYS = 30


@dataclass(frozen=True)
class MqttSettings:
    """Where the broker's files are (``HOME/mqtt.toml``), for the bridge and CRL refreshes."""

    out: Path
    port: int

    @property
    def conf(self) -> Path:
        return self.out / "mosquitto.conf"

    @property
    def acl(self) -> Path:
        return self.out / "acl"

    @property
    def ca(self) -> Path:
        return self.out / "ca.pem"

    @property
    def crl(self) -> Path:
        return self.out / "crl.pem"

    @property
    def pid_file(self) -> Path:
        return self.out / "mosquitto.pid"

    @staticmethod
    def bridge_cert(home: Path) -> Path:
        return home / "pki" / "mqtt-bridge.pem"

    @staticmethod
    def bridge_key(home: Path) -> Path:
        return home / "pki" / "mqtt-bridge.key"

    @staticmethod
    def path(home: Path) -> Path:
        return home / "mqtt.toml"

    @classmethod
    def load(cls, home: Path) -> MqttSettings | None:
        path = cls.path(home)
        if not path.exists():
            return None
        doc = tomlfile.load(path).get("broker", {})
        port = doc.get("port")
        if not isinstance(port, int) or not 0 < port < 65536 or "out" not in doc:
            raise InvalidInputError(f"{path}: broker.out and broker.port (1-65535) are needed")
        return cls(out=Path(str(doc["out"])), port=port)


def write_crl(authority: Authority, store: Store, path: Path, now: float) -> int:
    """Write the fleet CA's CRL with every revoked, unexpired certificate; return how many."""
    revoked = store.revoked_certificates(now)
    when = dt.datetime.fromtimestamp(now, dt.UTC)
    pem = pki.certificate_revocation_list(
        authority.ca_key, authority.ca_cert,
        [(c.serial, dt.datetime.fromtimestamp(c.revoked_at or now, dt.UTC)) for c in revoked],
        when, dt.timedelta(days=CRL_DAYS))
    atomic_write(path, pem)
    return len(revoked)


def refresh_crl(settings: MqttSettings, authority: Authority, store: Store, now: float) -> bool:
    """Rewrite the CRL and tell the broker (SIGHUP); True if a broker was signalled."""
    count = write_crl(authority, store, settings.crl, now)
    try:
        pid = int(settings.pid_file.read_text().strip())
    except (OSError, ValueError):
        log.info("CRL rewritten (%d revoked); no broker PID in %s to signal", count,
                 settings.pid_file)
        return False
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, signal.SIGHUP)
        log.info("CRL rewritten (%d revoked); broker %d reloads it", count, pid)
        return True
    log.warning("CRL rewritten, but broker PID %d from %s is not running", pid,
                settings.pid_file)
    return False
