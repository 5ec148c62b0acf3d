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
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from control_plane.domain.records import CertificateRecord
from control_plane.services.authority import Authority
from control_plane.storage import Store
from fleetcore import pki, tomlfile
from fleetcore.errors import InvalidInputError
from fleetcore.files import atomic_write

__all__ = [
    "BRIDGE_NAME",
    "CRL_DAYS",
    "MAX_BRIDGES",
    "MqttSettings",
    "bridge_name",
    "crl_is_current",
    "refresh_crl",
    "reload_broker",
    "sync_broker_keys",
    "write_crl",
]

log = logging.getLogger(__name__)

# The bridge's CN: the ':' keeps it from ever being a device id or an operator name.
BRIDGE_NAME = "edgefleet:bridge"
# Replicas share the device topics, each with a bridge identity of its own (the broker makes a
# client's id its username, so two bridges under one name would disconnect each other):
# bridge 1 is BRIDGE_NAME, bridge N > 1 is "edgefleet:bridge-N" (`mqtt-config --bridges`).
MAX_BRIDGES = 64


def bridge_name(index: int = 1) -> str:
    return BRIDGE_NAME if index == 1 else f"{BRIDGE_NAME}-{index}"
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
    def server_cert(self) -> Path:
        return self.out / "server.pem"

    @property
    def server_key(self) -> Path:
        return self.out / "server.key"

    @property
    def crl(self) -> Path:
        return self.out / "crl.pem"

    @property
    def pid_file(self) -> Path:
        return self.out / "mosquitto.pid"

    @staticmethod
    def bridge_cert(home: Path, index: int = 1) -> Path:
        return home / "pki" / f"mqtt-bridge{_suffix(index)}.pem"

    @staticmethod
    def bridge_key(home: Path, index: int = 1) -> Path:
        return home / "pki" / f"mqtt-bridge{_suffix(index)}.key"

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


def write_crl(authority: Authority, store: Store, path: Path, now: float,
              revoked: Sequence[CertificateRecord] | None = None) -> int:
    """Write the fleet CA's CRL with every revoked, unexpired certificate (``revoked``, when
    the caller already has them); return how many."""
    if revoked is None:
        revoked = store.revoked_certificates(now)
    when = dt.datetime.fromtimestamp(now, dt.UTC)
    listed = [(c.serial, dt.datetime.fromtimestamp(c.revoked_at or now, dt.UTC))
              for c in revoked]
    # One CRL per trusted CA (a broker that checks CRLs refuses a client whose CA has none);
    # serials are random, so listing each revoked serial under every CA is harmless.
    pem = b"".join(pki.certificate_revocation_list(key, cert, listed, when,
                                                   dt.timedelta(days=CRL_DAYS))
                   for key, cert in authority.crl_signers)
    atomic_write(path, pem)
    return len(revoked)


def crl_is_current(path: Path, revoked_serials: set[str], now: float,
                   issuers: list[x509.Name] | None = None) -> bool:
    """Whether the CRLs at ``path`` (one per CA in ``issuers``, when given) list exactly these
    serials and have more than half of their life left: then neither a rewrite nor a broker
    reload is needed."""
    marker = b"-----BEGIN X509 CRL-----"
    try:
        crls = [x509.load_pem_x509_crl(marker + part)
                for part in path.read_bytes().split(marker)[1:]]
    except (OSError, ValueError):
        return False
    if not crls or (issuers is not None
                    and sorted(c.issuer.rfc4514_string() for c in crls)
                    != sorted(n.rfc4514_string() for n in issuers)):
        return False
    wanted = {int(s, 16) for s in revoked_serials}
    for crl in crls:
        next_update = crl.next_update_utc
        if ({r.serial_number for r in crl} != wanted or next_update is None
                or next_update.timestamp() - now <= CRL_DAYS * 86400 / 2):
            return False
    return True


def refresh_crl(settings: MqttSettings, authority: Authority, store: Store, now: float) -> bool:
    """Rewrite the CRL and tell the broker (SIGHUP) when it changed or is half way to expiry;
    True if a broker was signalled. Reloads are kept to what is needed: each control-plane
    start used to send one, and a SIGHUP is where Mosquitto has had its crashes."""
    count = _rewrite_crl(settings, authority, store, now)
    return count is not None and reload_broker(settings, f"CRL rewritten ({count} revoked)")


def _rewrite_crl(settings: MqttSettings, authority: Authority, store: Store,
                 now: float) -> int | None:
    """Rewrite the CRL file unless it is current; how many it lists (None: not rewritten)."""
    revoked = store.revoked_certificates(now)
    issuers = [cert.subject for _, cert in authority.crl_signers]
    if crl_is_current(settings.crl, {c.serial for c in revoked}, now, issuers):
        log.info("CRL current (%d revoked); the broker is not reloaded", len(revoked))
        return None
    return write_crl(authority, store, settings.crl, now, revoked)


def reload_broker(settings: MqttSettings, why: str) -> bool:
    """SIGHUP the broker in ``mosquitto.pid`` (it rereads its CRL, CA file and listener
    certificate); True if one was signalled."""
    try:
        pid = int(settings.pid_file.read_text().strip())
    except (OSError, ValueError):
        log.info("%s; no broker PID in %s to signal", why, settings.pid_file)
        return False
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, signal.SIGHUP)
        log.info("%s; broker %d reloads", why, pid)
        return True
    log.warning("%s, but broker PID %d from %s is not running", why, pid, settings.pid_file)
    return False


def sync_broker_keys(settings: MqttSettings, authority: Authority, store: Store,
                     now: float) -> bool:
    """Give the broker the control plane's current server certificate (chain), key, client
    CA bundle and CRLs, and reload it once when any of them changed; True if signalled."""
    wanted = [(settings.ca, authority.ca_pem, 0o644),
              (settings.server_cert, authority.server_cert_pem, 0o644),
              (settings.server_key, authority.server_key_pem, 0o600)]
    changed = _rewrite_crl(settings, authority, store, now) is not None
    for path, data, mode in wanted:
        try:
            same = path.read_bytes() == data
        except OSError:
            same = False
        if not same:
            atomic_write(path, data, mode=mode)
            changed = True
    return changed and reload_broker(settings, "server certificate, CAs or CRL changed")


def _suffix(index: int) -> str:
    return "" if index == 1 else f"-{index}"
