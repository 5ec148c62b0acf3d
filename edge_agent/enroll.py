"""`edge-agent enroll`: generate the device key here, send only a CSR, store what comes back."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import grpc
from edgefleet.v1 import agent_pb2, agent_pb2_grpc, common_pb2

from edge_agent._version import __version__
from edge_agent.hostinfo import host_facts
from edge_agent.install.root_trust import RootTrust
from edge_agent.state import AgentConfig, StateDir
from fleetcore import pki, signing
from fleetcore import root as fleet_root
from fleetcore.addresses import MAX_API_ADDRESSES, parse_hostport
from fleetcore.errors import (
    AlreadyExistsError,
    AuthenticationError,
    InvalidInputError,
    TokenError,
    TransportError,
)
from fleetcore.files import atomic_write, ensure_private_dir

__all__ = ["enroll"]

log = logging.getLogger(__name__)

ENROLL_TIMEOUT_SECONDS = 30.0
MAX_PUBLISHER_KEYS = 16


def enroll(
    server: str,
    token: str,
    ca_pem: bytes,
    state_dir: Path,
    *,
    labels: Mapping[str, str] | None = None,
    force: bool = False,
    transport: str = "grpc",
) -> AgentConfig:
    """Enroll this host with the control plane at ``server`` (the enrollment port).

    ``transport`` ("grpc" or "mqtt") is what ``edge-agent run`` will use; mqtt needs the
    control plane to name a broker in its answer.
    """
    state = StateDir(Path(state_dir))
    if transport not in ("grpc", "mqtt"):
        raise InvalidInputError(f"transport must be grpc or mqtt; got {transport!r}")
    if state.is_enrolled() and not force:
        raise AlreadyExistsError(
            f"{state.root} is already enrolled; pass --force to enroll again"
        )
    pki.load_certificate(ca_pem)  # fail early on a bad --ca
    key = pki.generate_key()
    request = agent_pb2.EnrollRequest(
        token=token,
        csr_pem=pki.make_csr(key),
        labels=dict(labels or {}),
        host=common_pb2.HostFacts(**host_facts()),
        agent_version=__version__,
    )
    creds = grpc.ssl_channel_credentials(root_certificates=ca_pem)
    try:
        with grpc.secure_channel(server, creds) as channel:
            reply = agent_pb2_grpc.AgentServiceStub(channel).Enroll(
                request, timeout=ENROLL_TIMEOUT_SECONDS
            )
    except grpc.RpcError as exc:
        code, details = exc.code(), exc.details()
        if code == grpc.StatusCode.PERMISSION_DENIED:
            raise TokenError(details) from None
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            raise InvalidInputError(details) from None
        if code == grpc.StatusCode.UNAUTHENTICATED:
            raise AuthenticationError(details) from None
        raise TransportError(f"enrollment at {server} failed: {code.name}: {details}") from None

    # Check the answer before anything reaches the disk.
    cert = pki.load_certificate(reply.certificate_pem)
    identity = pki.identity_from_certificate(cert)
    if identity.kind is not pki.IdentityKind.DEVICE or identity.name != reply.device_id:
        raise InvalidInputError(
            f"enrollment answer names device {reply.device_id!r} but its certificate names "
            f"{identity.actor}"
        )
    if cert.public_key() != key.public_key():
        raise InvalidInputError("enrollment answer certificate is not for the key we sent")
    pinned_root = _check_keys(reply)
    addresses = _check_addresses(reply)
    if transport == "mqtt" and not reply.mqtt_url:
        raise InvalidInputError(
            "--transport mqtt: the control plane names no MQTT broker (start it with --mqtt URL)"
        )

    ensure_private_dir(state.root)
    atomic_write(state.key, pki.private_key_pem(key), mode=0o600)
    atomic_write(state.cert, reply.certificate_pem)
    atomic_write(state.ca, reply.ca_pem or ca_pem)
    atomic_write(state.release_pub, reply.release_public_key_pem)
    for i, pem in enumerate(reply.publisher_public_keys_pem):
        atomic_write(state.publishers_dir / f"publisher-{i}.pub", pem)
    state.root_file.unlink(missing_ok=True)  # --force: a new enrollment, a new chain
    if pinned_root is not None:
        RootTrust(state.root_file).pin(pinned_root.envelope)
    cfg = AgentConfig(
        device_id=reply.device_id,
        api_address=reply.api_address,
        api_addresses=addresses,
        mqtt_url=reply.mqtt_url,
        transport=transport,
        labels=dict(reply.labels),
        heartbeat_interval_seconds=float(reply.heartbeat_interval_seconds or 10),
    )
    cfg.save(state)
    log.info("enrolled as %s; API %s", cfg.device_id,
             ", ".join(cfg.failover_addresses()))
    return cfg


def _check_addresses(reply: agent_pb2.EnrollResponse) -> list[str]:
    """The replicas' API addresses (failover): each HOST:PORT, a bounded number, the
    advertised one among them; [] from a control plane that sends only api_address."""
    parse_hostport(reply.api_address)
    if len(reply.api_addresses) > MAX_API_ADDRESSES:
        raise InvalidInputError(f"more than {MAX_API_ADDRESSES} API addresses in the answer")
    addresses = list(dict.fromkeys(str(a) for a in reply.api_addresses))
    for address in addresses:
        if len(address) > 300:
            raise InvalidInputError("an API address in the answer is longer than 300 bytes")
        parse_hostport(address)
    if addresses and reply.api_address not in addresses:
        addresses.insert(0, reply.api_address)
    return addresses


def _check_keys(reply: agent_pb2.EnrollResponse) -> fleet_root.SignedRoot | None:
    """Check the answer's keys; return the root to pin (None from a control plane older than
    roots): self-signed by a threshold of its root keys, listing the answer's release key."""
    pki.load_public_key(reply.release_public_key_pem)
    if len(reply.publisher_public_keys_pem) > MAX_PUBLISHER_KEYS:
        raise InvalidInputError(f"more than {MAX_PUBLISHER_KEYS} publisher keys in the answer")
    for pem in reply.publisher_public_keys_pem:
        pki.load_public_key(pem)
    if not reply.root:
        return None
    pinned = fleet_root.verify_initial_root(reply.root)
    if signing.keyid(pki.load_public_key(reply.release_public_key_pem)) not in (
            pinned.root.roles["release"].keyids):
        raise InvalidInputError("enrollment answer's root does not list its release key")
    return pinned
