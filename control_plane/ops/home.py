"""`control-plane init`: create a control-plane home with its PKI, keys, database and admin."""

from __future__ import annotations

import datetime as dt
import shutil
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec

from control_plane.config import ControlPlaneConfig, HomeLayout, Pkcs11Settings
from control_plane.domain.records import CertificateRecord
from control_plane.services.roots import ROOT_TTL_SECONDS
from control_plane.storage import open_store
from control_plane.storage.blobs import load_or_create_key
from fleetcore import operator_config, pki
from fleetcore import root as fleet_root
from fleetcore.errors import AlreadyExistsError, InvalidInputError
from fleetcore.files import atomic_write, ensure_private_dir

__all__ = ["init_home"]

CA_TTL = dt.timedelta(days=3650)
SERVER_TTL = dt.timedelta(days=825)
PRIVATE = 0o600


def init_home(
    home: Path,
    *,
    sans: list[str] | None = None,
    force: bool = False,
    now: dt.datetime | None = None,
    config: ControlPlaneConfig | None = None,
    root_keys: int = 3,
    root_threshold: int = 2,
    database_url: str = "",
) -> ControlPlaneConfig:
    """``database_url`` (postgresql://...) keeps the fleet in that database instead of the
    home's SQLite file; the database must exist (empty, or an Edgefleet database)."""
    if not 1 <= root_threshold <= root_keys <= 16:
        raise InvalidInputError(
            f"need 1 <= --root-threshold <= --root-keys <= 16; got {root_threshold} of {root_keys}"
        )
    home = Path(home).resolve()
    lay = HomeLayout(home)
    if home.exists() and any(home.iterdir()):
        if not force:
            raise AlreadyExistsError(
                f"{home} exists and is not empty; pass --force to replace it"
            )
        shutil.rmtree(home)
    ensure_private_dir(home)
    now = now or dt.datetime.now(dt.UTC)
    hsm = config.pkcs11 if config is not None else None
    database_url = database_url or (config.database_url if config else "")
    if database_url:
        _check_empty_database(database_url)

    ca_key = _new_key(hsm, "ca", lay.ca_key)
    ca_cert = pki.ca_certificate(ca_key, "Edgefleet fleet CA", now, CA_TTL)
    atomic_write(lay.ca_cert, pki.certificate_pem(ca_cert))

    server_key = pki.generate_key()
    hostnames = ["localhost", "127.0.0.1", *(sans or [])]
    server_cert = pki.issue_server_certificate(
        ca_key, ca_cert, server_key, hostnames, now, SERVER_TTL
    )
    atomic_write(lay.server_key, pki.private_key_pem(server_key), mode=PRIVATE)
    atomic_write(lay.server_cert, pki.certificate_pem(server_cert))

    release_key = _new_key(hsm, "release", lay.release_key)
    atomic_write(lay.release_pub, pki.public_key_pem(release_key.public_key()))
    load_or_create_key(lay.blob_key)  # AES-256-GCM key for bundles at rest

    # Convenience only: the control plane reads just the public half; move the private key
    # to the training environment (or an HSM) and nothing here changes.
    publisher_key = pki.generate_key()
    atomic_write(lay.publisher_key, pki.private_key_pem(publisher_key), mode=PRIVATE)
    atomic_write(lay.publisher_pub, pki.public_key_pem(publisher_key))

    root_envelope = _make_root(lay, now.timestamp(), release_key, publisher_key, root_keys,
                               root_threshold, hsm)

    cfg = config or ControlPlaneConfig(home=home)
    cfg.home = home
    cfg.database = lay.database
    cfg.database_url = database_url
    cfg.publisher_keys = [lay.publisher_pub]
    cfg.save()

    store = open_store(cfg.store_location)
    try:
        admin_key = pki.generate_key()
        admin_cert = pki.issue_client_certificate(
            ca_key, ca_cert, admin_key.public_key(), pki.IdentityKind.OPERATOR, "admin",
            now, dt.timedelta(seconds=cfg.operator_cert_ttl_seconds), role=pki.Role.ADMIN,
        )
        ts = now.timestamp()
        store.add_operator("admin", pki.Role.ADMIN.label, ts, "init")
        store.add_certificate(
            CertificateRecord(
                serial=pki.serial_hex(admin_cert),
                kind=pki.IdentityKind.OPERATOR.value,
                subject="admin",
                not_before=admin_cert.not_valid_before_utc.timestamp(),
                not_after=admin_cert.not_valid_after_utc.timestamp(),
                issued_at=ts,
                issuer=pki.key_id(ca_cert),
            ),
            current_for_device=False,
        )
        store.put_root(1, root_envelope, "published", ts)
        store.append_audit(ts, "init", "control-plane.init", str(home), "allowed", "{}")
    finally:
        store.close()
    api = cfg.api_advertise or cfg.api_listen
    operator_config.write(
        lay.operator_dir("admin"),
        api=api,
        key_pem=pki.private_key_pem(admin_key),
        cert_pem=pki.certificate_pem(admin_cert),
        ca_pem=pki.certificate_pem(ca_cert),
    )
    return cfg


def _make_root(lay: HomeLayout, ts0: float, release_key: pki.SigningKey,
               publisher_key: ec.EllipticCurvePrivateKey, root_keys: int,
               root_threshold: int, hsm: Pkcs11Settings | None) -> bytes:
    """The audit key, the root keys and root v1 (its signed envelope)."""
    # The audit key signs checkpoints (purpose "audit-checkpoint"), never releases.
    audit_key = _new_key(hsm, "audit", lay.audit_key)
    atomic_write(lay.audit_pub, pki.public_key_pem(audit_key.public_key()))

    # Root keys: only their signatures on root documents are needed here; move them offline.
    ensure_private_dir(lay.root_keys)
    roots = [pki.generate_key() for _ in range(root_keys)]
    for i, key in enumerate(roots, start=1):
        atomic_write(lay.root_keys / f"root-{i}.key", pki.private_key_pem(key), mode=PRIVATE)
        atomic_write(lay.root_keys / f"root-{i}.pub", pki.public_key_pem(key))
    root_v1 = fleet_root.build_root(1, ts0, ts0 + ROOT_TTL_SECONDS, {
        "root": ([k.public_key() for k in roots], root_threshold),
        "release": ([release_key.public_key()], 1),
        "publisher": ([publisher_key.public_key()], 1),
        "audit": ([audit_key.public_key()], 1),
    })
    root_envelope = fleet_root.sign_root(root_v1, roots)

    return root_envelope
def _new_key(hsm: Pkcs11Settings | None, name: str, path: Path) -> pki.SigningKey:
    """Key ``name``: generated inside the PKCS#11 token when [pki.pkcs11] keeps it there (no
    file is written), else a new key file at ``path``."""
    if hsm is not None and hsm.holds(name):
        from control_plane.services.hsm import generate_key  # noqa: PLC0415  (token homes)

        return generate_key(hsm, name)
    key = pki.generate_key()
    atomic_write(path, pki.private_key_pem(key), mode=PRIVATE)
    return key


def _check_empty_database(url: str) -> None:
    """Before any key is made: the server answers, and holds no fleet yet (a second home on
    the same database would issue certificates from another CA)."""
    store = open_store(url)
    try:
        if store.list_operators() or store.audit_chain():
            raise AlreadyExistsError(
                "that database holds a fleet already; give init an empty database (CREATE "
                "DATABASE ...), or copy the existing home to run another replica")
    finally:
        store.close()
