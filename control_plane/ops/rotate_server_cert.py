"""`control-plane rotate server-cert --home DIR [--san NAME ...]`: a new server key and
certificate from the fleet CA, with the current certificate's names plus any ``--san``.

The key is written first, then the certificate: a serving control plane (KeyWatch) loads the
pair only once both match, then serves it on new handshakes of the API and enrollment ports
(dynamic gRPC credentials) and gives it to the MQTT broker, which it reloads. Open connections
keep the old certificate until they reconnect; agents verify either against the fleet CA. The
command also updates the broker's files itself, so a fleet whose control plane is down is
rotated too. The old key is overwritten (no copy is kept).
"""

from __future__ import annotations

import argparse
import json
import time

from cryptography import x509

from control_plane.config import ControlPlaneConfig
from control_plane.ops import rotate
from control_plane.ops.home import PRIVATE, SERVER_TTL
from control_plane.services.authority import Authority
from control_plane.services.broker import MqttSettings, sync_broker_keys
from control_plane.storage import open_store
from fleetcore import pki
from fleetcore.files import atomic_write

__all__ = ["rotate_server_cert", "server_names"]

ACTION = "keys.rotate-server-cert"
ACTOR = "cli:control-plane-rotate"


def server_names(cert: x509.Certificate) -> list[str]:
    """The DNS names and IP addresses a server certificate is valid for, in its order."""
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [str(n.value) for n in sans if isinstance(n, x509.DNSName | x509.IPAddress)]


def rotate_server_cert(cfg: ControlPlaneConfig, extra_sans: list[str], now: float) -> str:
    """Issue and write the new pair, update the broker's copy, audit; return the new serial."""
    authority = Authority.load(cfg)
    lay = cfg.layout
    old = pki.load_certificate(authority.server_cert_pem)
    names = [*server_names(old), *extra_sans]
    key = pki.generate_key()
    cert = authority.issue_server(key, names, now, SERVER_TTL)
    atomic_write(lay.server_key, pki.private_key_pem(key), mode=PRIVATE)
    atomic_write(lay.server_cert, pki.certificate_pem(cert))
    serial = pki.serial_hex(cert)
    store = open_store(cfg.store_location)
    try:
        mqtt = MqttSettings.load(cfg.home)
        if mqtt is not None:
            sync_broker_keys(mqtt, Authority.load(cfg), store, now)
        store.append_audit(now, ACTOR, ACTION, str(cfg.home), "allowed", json.dumps(
            {"old_serial": pki.serial_hex(old), "serial": serial, "names": list(dict.fromkeys(
                names))}, sort_keys=True, separators=(",", ":")))
    finally:
        store.close()
    return serial


def _options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--san", action="append", default=[], metavar="NAME",
                   help="a DNS name or IP to add to the current certificate's (repeatable)")


def _run(args: argparse.Namespace) -> int:
    cfg = ControlPlaneConfig.load(args.home)
    serial = rotate_server_cert(cfg, args.san, time.time())
    print(f"new server certificate {serial} in {cfg.layout.server_cert}; a serving control "
          "plane uses it within a second (new connections), the MQTT broker was reloaded")
    return 0


rotate.ROTATIONS["server-cert"] = (
    "new server key and certificate (same names, plus --san), served without a restart",
    _options, _run)
