"""`control-plane rotate ca --home DIR`, then `control-plane rotate ca --retire-old --home DIR`.

The first command starts a transition to a new fleet CA; nothing re-enrolls:

1. the current CA moves to ``pki/ca-old.{pem,key}``; a new CA is created in ``pki/ca.{pem,key}``;
2. the server certificate stays one from the old CA, which every agent trusts (an agent that
   has not renewed trusts only it). A new CA cross-certified by the old one would not do:
   the fleet CA carries ``pathlen:0``, so OpenSSL and BoringSSL refuse a chain
   server -> cross -> old CA;
3. client certificates of both CAs are trusted (the API port and the broker's ``cafile``),
   the CRLs of both are published, and every new certificate (enrollment, renewal, operators)
   comes from the new CA;
4. agents move to the new CA on their normal renewal: the answer carries the CA bundle
   (``RenewCertificateResponse.ca_pem``), which they store with the renewed certificate;
   enrollment hands out the bundle too;
5. the operators' configurations in the home and the MQTT bridge's certificate are re-issued
   from the new CA at once.

``--retire-old`` ends the transition: it is refused while a certificate in use (a device's
current one, an operator's latest) still comes from the old CA, unless ``--force``; then the
old CA and its key are deleted (old-CA certificates are refused from then on) and a new server
certificate from the new CA is issued (every agent now trusts the new CA).
Both are audited (``keys.rotate-ca``, ``keys.retire-ca``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import secrets
import time
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec

from control_plane.config import ControlPlaneConfig
from control_plane.domain.records import CertificateRecord
from control_plane.ops import rotate
from control_plane.ops.home import CA_TTL, PRIVATE
from control_plane.ops.rotate_server_cert import rotate_server_cert
from control_plane.services.authority import Authority
from control_plane.services.broker import (
    MAX_BRIDGES,
    MqttSettings,
    bridge_name,
    sync_broker_keys,
)
from control_plane.storage import Store, open_store
from fleetcore import operator_config, pki
from fleetcore.errors import EdgefleetError
from fleetcore.files import atomic_write

__all__ = ["CaRotationError", "retire_old_ca", "rotate_ca"]

ACTOR = "cli:control-plane-rotate"
BRIDGE_CERT_TTL = dt.timedelta(days=365)


class CaRotationError(EdgefleetError):
    """The rotation cannot be done in the home's present state (the message says why and
    what to run)."""


def rotate_ca(cfg: ControlPlaneConfig, now: float) -> str:
    """Start the transition to a new CA; return its key id."""
    lay = cfg.layout
    old = Authority.load(cfg)
    if not isinstance(old.ca_key, ec.EllipticCurvePrivateKey):
        raise CaRotationError("the CA key is in a PKCS#11 token: rotating it is not supported "
                              "yet (rotate ca works with a CA key file)")
    if old.old_ca is not None:
        raise CaRotationError(
            "a CA rotation is already in transition; finish it first: control-plane rotate ca "
            f"--retire-old --home {cfg.home}")
    when = dt.datetime.fromtimestamp(now, dt.UTC)
    stamp = f"{when:%Y-%m-%d} {secrets.token_hex(3)}"
    new_key, new_cert = pki.create_ca(f"Edgefleet fleet CA {stamp}", when, CA_TTL)
    # Each step leaves a home that loads (KeyWatch) as the old or the new state.
    atomic_write(lay.old_ca_key, pki.private_key_pem(old.ca_key), mode=PRIVATE)
    atomic_write(lay.old_ca_cert, pki.certificate_pem(old.ca_cert))
    atomic_write(lay.ca_key, pki.private_key_pem(new_key), mode=PRIVATE)
    atomic_write(lay.ca_cert, pki.certificate_pem(new_cert))
    new = Authority.load(cfg)
    store = open_store(cfg.store_location)
    try:
        operators = _reissue_home_operators(cfg, new, store, now)
        mqtt = MqttSettings.load(cfg.home)
        if mqtt is not None:
            _reissue_bridge(cfg.home, new, now)
            sync_broker_keys(mqtt, new, store, now)
        store.append_audit(now, ACTOR, "keys.rotate-ca", str(cfg.home), "allowed", _json(
            {"old_ca": old.ca_id, "new_ca": new.ca_id, "operators_reissued": operators}))
    finally:
        store.close()
    return new.ca_id


def retire_old_ca(cfg: ControlPlaneConfig, now: float, *, force: bool = False) -> int:
    """End the transition: delete the old CA; return how many old-CA certificates in use
    were cut off (non-zero only with ``force``)."""
    lay = cfg.layout
    authority = Authority.load(cfg)
    if authority.old_ca is None:
        raise CaRotationError(f"no CA rotation is in transition in {cfg.home}; start one with: "
                              f"control-plane rotate ca --home {cfg.home}")
    store = open_store(cfg.store_location)
    try:
        left = store.current_certificates_not_from(authority.ca_id, now)
    finally:
        store.close()
    if left and not force:
        raise CaRotationError(
            f"{len(left)} certificate(s) in use still come from the old CA ({_names(left)}); "
            "wait for those agents to renew (or revoke them), re-issue those operators' "
            "certificates, or pass --force to cut them off")
    # The old CA goes (its certificate first: a home without it loads as "no transition"),
    # then the server certificate comes from the new CA, which every agent trusts now.
    for path in (lay.old_ca_cert, lay.old_ca_key):
        path.unlink(missing_ok=True)
    rotate_server_cert(cfg, [], now)  # also gives the broker its new CA file and CRL
    for name in _home_operators(cfg):  # their CA file: the new CA alone
        atomic_write(lay.operator_dir(name) / operator_config.CA_FILE,
                     pki.certificate_pem(authority.ca_cert))
    store = open_store(cfg.store_location)
    try:
        store.append_audit(now, ACTOR, "keys.retire-ca", str(cfg.home), "allowed", _json(
            {"old_ca": pki.key_id(authority.old_ca[0]), "forced": force,
             "cut_off": [f"{c.kind}:{c.subject}" for c in left]}))
    finally:
        store.close()
    return len(left)


def _names(records: list[CertificateRecord], most: int = 5) -> str:
    names = [f"{c.kind} {c.subject}" for c in records[:most]]
    return ", ".join(names) + (f" and {len(records) - most} more" if len(records) > most else "")


def _home_operators(cfg: ControlPlaneConfig) -> list[str]:
    folder = cfg.home / "operators"
    if not folder.is_dir():
        return []
    return sorted(p.parent.name for p in folder.glob(f"*/{operator_config.CONFIG_FILE}"))


def _reissue_home_operators(cfg: ControlPlaneConfig, authority: Authority, store: Store,
                            now: float) -> list[str]:
    """The operators whose configuration is in the home get a new-CA certificate for their
    key (their old one stays valid until it expires or the old CA is retired)."""
    done = []
    for name in _home_operators(cfg):
        registered = store.get_operator(name)
        if registered is None:
            continue
        folder = cfg.layout.operator_dir(name)
        conf = operator_config.load(folder / operator_config.CONFIG_FILE)
        key = pki.load_private_key(conf.key.read_bytes())
        cert_pem, record = authority.issue(
            key.public_key(), pki.IdentityKind.OPERATOR, name, now,
            cfg.operator_cert_ttl_seconds, role=pki.Role.parse(registered[0]))
        store.add_certificate(record, current_for_device=False)
        atomic_write(conf.cert, cert_pem)
        atomic_write(conf.ca, authority.ca_pem)
        done.append(name)
    return done


def _reissue_bridge(home: Path, authority: Authority, now: float) -> None:
    """Every bridge identity `mqtt-config --bridges` issued (one per replica)."""
    for index in range(1, MAX_BRIDGES + 1):
        if index > 1 and not MqttSettings.bridge_key(home, index).exists():
            break
        key = pki.load_private_key(MqttSettings.bridge_key(home, index).read_bytes())
        cert = pki.issue_service_certificate(
            authority.ca_key, authority.ca_cert, key.public_key(), bridge_name(index),
            dt.datetime.fromtimestamp(now, dt.UTC), BRIDGE_CERT_TTL)
        atomic_write(MqttSettings.bridge_cert(home, index), pki.certificate_pem(cert))


def _json(doc: object) -> str:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"))


def _options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--retire-old", action="store_true",
                   help="end the transition: stop trusting the previous CA")
    p.add_argument("--force", action="store_true",
                   help="with --retire-old: even though certificates in use still come from it")


def _run(args: argparse.Namespace) -> int:
    cfg = ControlPlaneConfig.load(args.home)
    if args.retire_old:
        cut = retire_old_ca(cfg, time.time(), force=args.force)
        print(f"the previous fleet CA is retired; its certificates are refused from now on"
              f"{f' ({cut} still in use were cut off)' if cut else ''}")
        return 0
    ca_id = rotate_ca(cfg, time.time())
    print(f"new fleet CA {ca_id[:16]}; both CAs are trusted until: control-plane rotate ca "
          f"--retire-old --home {cfg.home} (after every agent has renewed)")
    return 0


rotate.ROTATIONS["ca"] = (
    "new fleet CA, cross-signed by the old one; --retire-old ends the transition",
    _options, _run)
