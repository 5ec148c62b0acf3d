"""Who is speaking and what they may hold: authentication against the registry, enrollment
with one-time tokens, certificate renewal, operators and device revocation.

A certificate proves who is speaking; both front ends (gRPC's TLS peer, MQTT's topic that the
broker's ACL ties to the certificate) turn it into a ``pki.Identity`` and pass it through
``authenticate`` before anything else.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from control_plane.domain.enrollment import DenialTally, RateLimits, granted_labels
from control_plane.domain.records import (
    AuditOutcome,
    DeviceAlert,
    DeviceRecord,
    DeviceView,
    OperatorRecord,
)
from control_plane.services.context import Context
from fleetcore import pki
from fleetcore.addresses import failover_addresses
from fleetcore.errors import (
    AuthenticationError,
    InvalidInputError,
    NotFoundError,
    RateLimitedError,
    RevokedError,
    TokenError,
)
from fleetcore.labels import matches, validate_labels

__all__ = ["EnrollResult", "IdentityService", "hash_token"]

log = logging.getLogger(__name__)

MAX_TOKEN_BYTES = 256
TOKEN_PREFIX = "eft_"  # noqa: S105 (a prefix, not a secret)


def hash_token(token: str) -> str:
    """Tokens are stored only as their SHA-256 (they are 256-bit random, so no salt needed)."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class EnrollResult:
    device: DeviceRecord
    certificate_pem: bytes
    ca_pem: bytes
    release_public_pem: bytes
    publisher_public_pems: tuple[bytes, ...]
    api_address: str
    mqtt_url: str
    heartbeat_interval_seconds: int
    root: bytes = b""  # the newest signed root, pinned by the agent ("" before roots exist)
    api_addresses: tuple[str, ...] = ()  # every replica's API address (failover), api first


class IdentityService:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.store = ctx.store
        self.limits = RateLimits()
        self.denials = DenialTally()

    # ------------------------------------------------------------------ authentication
    def authenticate(self, identity: pki.Identity, expected: pki.IdentityKind) -> pki.Identity:
        """Check a verified identity against the registry; refuse revoked or unknown ones."""
        return self._authenticated(identity, expected)

    def _authenticated(self, identity: pki.Identity, expected: pki.IdentityKind,
                       device: DeviceRecord | None = None) -> pki.Identity:
        """``authenticate``; ``device``: the device's row, read already by the caller."""
        if identity.kind is not expected:
            raise AuthenticationError(
                f"this API needs a {expected.value} certificate; got a {identity.kind.value} one"
            )
        cert = self.store.get_certificate(identity.serial)
        if cert is None or cert.kind != identity.kind.value or cert.subject != identity.name:
            raise AuthenticationError(
                f"certificate {identity.serial} was not issued by this control plane"
            )
        if cert.revoked_at is not None:
            raise RevokedError(f"certificate {identity.serial} of {identity.actor} is revoked")
        if identity.kind is pki.IdentityKind.DEVICE:
            if device is None or device.id != identity.name:
                device = self.store.get_device(identity.name)
            if device is None:
                raise AuthenticationError(f"device {identity.name} is not registered")
            if device.revoked_at is not None:
                raise RevokedError(f"device {identity.name} is revoked")
        elif self.store.get_operator(identity.name) is None:
            raise AuthenticationError(f"operator {identity.name} is not registered")
        elif self.store.operator_revoked(identity.name):
            raise RevokedError(f"operator {identity.name} is revoked")
        return identity

    def device_by_id(self, device_id: str) -> pki.Identity:
        """A device named by a channel the broker ties to its certificate (an MQTT topic):
        its current certificate, through the same checks as a TLS peer."""
        device = self.store.get_device(device_id)
        if device is None:
            raise AuthenticationError(f"device {device_id} is not registered")
        identity = pki.Identity(pki.IdentityKind.DEVICE, device_id, device.cert_serial)
        return self._authenticated(identity, pki.IdentityKind.DEVICE, device)

    # ------------------------------------------------------------------ devices
    def enroll(self, token: str, csr_pem: bytes, labels: Mapping[str, str],
               host: Mapping[str, Any], agent_version: str, peer: str = "") -> EnrollResult:
        """Enroll a device. In this order (``domain/enrollment.py``): the attempt limits, the
        token (read only), the labels it may claim, and only then the CSR and a signature."""
        now = self.ctx.clock()
        if not self.limits.allow(peer or "-", now):
            self._refused(now, "rate limited", peer)
            raise RateLimitedError("too many enrollment attempts; try again in a minute")
        try:
            if not token or len(token) > MAX_TOKEN_BYTES:
                raise TokenError("enrollment token is missing or malformed")
            token_hash = hash_token(token)
            granted = self.store.token_labels(token_hash, now)
        except TokenError as exc:
            self._refused(now, str(exc), peer)
            raise
        actor = f"token:{token_hash[:12]}"
        requested = granted_labels(granted, validate_labels(labels))
        public_key = pki.parse_csr(csr_pem)
        device_id = "dev-" + secrets.token_hex(8)
        cert_pem, cert_record = self.ctx.keys.issue(
            public_key, pki.IdentityKind.DEVICE, device_id, now,
            self.ctx.config.device_cert_ttl_seconds,
        )
        try:
            device = self.store.enroll(
                token_hash, now,
                DeviceRecord(id=device_id, labels=requested, enrolled_at=now,
                             agent_version=agent_version, host=dict(host)),
                cert_record,
            )
        except TokenError as exc:  # used by a concurrent attempt since the check
            self._refused(now, str(exc), peer)
            raise
        self.ctx.audit.record(actor, "devices.enroll", device_id, AuditOutcome.ALLOWED,
                              {"labels": device.labels, "serial": cert_record.serial})
        log.info("enrolled device %s labels=%s", device_id, device.labels)
        keys = self.ctx.keys
        return EnrollResult(
            device=device, certificate_pem=cert_pem, ca_pem=keys.ca_pem,
            release_public_pem=keys.release_public_pem,
            publisher_public_pems=keys.publisher_public_pems,
            api_address=self.ctx.api_address, mqtt_url=self.ctx.config.mqtt_url,
            heartbeat_interval_seconds=self.ctx.config.heartbeat_interval_seconds,
            root=(current.envelope if (current := self.ctx.roots.current()) else b""),
            api_addresses=failover_addresses(self.ctx.api_address,
                                             self.ctx.config.api_addresses),
        )

    def _refused(self, now: float, reason: str, peer: str) -> None:
        """A failed attempt: counted against the caller's limits, and in the audit log in
        aggregate (``DenialTally``)."""
        self.limits.failed(peer or "-", now)
        log.warning("enrollment refused (%s) from %s", reason, peer or "-")
        attempts = self.denials.refused(now)
        if attempts:
            self.ctx.audit.record("enroll", "devices.enroll", "", AuditOutcome.DENIED,
                                  {"reason": reason, "attempts": attempts,
                                   "window_seconds": self.denials.window})

    def renew_certificate(self, caller: pki.Identity, csr_pem: bytes) -> tuple[bytes, bytes]:
        """A new certificate for the caller's new key, and the CA bundle to trust with it."""
        public_key = pki.parse_csr(csr_pem)
        now = self.ctx.clock()
        cert_pem, record = self.ctx.keys.issue(
            public_key, pki.IdentityKind.DEVICE, caller.name, now,
            self.ctx.config.device_cert_ttl_seconds,
        )
        self.store.add_certificate(record, current_for_device=True)
        self.ctx.audit.record(caller, "devices.renew", caller.name, AuditOutcome.ALLOWED,
                              {"previous": caller.serial, "serial": record.serial})
        return cert_pem, self.ctx.keys.ca_pem

    def list_devices(self, caller: pki.Identity, selector: Mapping[str, str]) -> list[DeviceView]:
        self.ctx.authorize(caller, "devices.list", "")
        now = self.ctx.clock()
        refused = self.store.all_report_refusals()  # one read for the whole list
        alerts: dict[str, list[DeviceAlert]] = {}
        for alert in self.store.device_alerts():
            alerts.setdefault(alert.device_id, []).append(alert)
        return [replace(self.ctx.view(d, now), refused=refused.get(d.id, {}),
                        alerts=tuple(alerts.get(d.id, ())))
                for d in self.store.list_devices() if matches(d.labels, selector)]

    def get_device(self, caller: pki.Identity, device_id: str) -> DeviceView:
        self.ctx.authorize(caller, "devices.show", device_id)
        device = self.store.get_device(device_id)
        if device is None:
            raise NotFoundError(f"no device {device_id!r}")
        view = self.ctx.view(device, self.ctx.clock())
        return replace(view, refused=self.store.report_refusals(device_id),
                       alerts=tuple(self.store.device_alerts(device_id)))

    def revoke_device(self, caller: pki.Identity, device_id: str, reason: str) -> DeviceView:
        self.ctx.authorize(caller, "devices.revoke", device_id)
        try:
            device = self.store.revoke_device(device_id, self.ctx.clock())
        except NotFoundError as exc:
            self.ctx.audit.record(caller, "devices.revoke", device_id, AuditOutcome.FAILED,
                                  {"reason": str(exc)})
            raise
        self.ctx.audit.record(caller, "devices.revoke", device_id, AuditOutcome.ALLOWED,
                              {"reason": reason[:500]})
        self.ctx.device_changed(device_id)
        log.warning("device %s revoked by %s", device_id, caller.actor)
        return self.ctx.view(device, self.ctx.clock())

    # ------------------------------------------------------------------ operators
    def create_token(self, caller: pki.Identity, ttl_seconds: int,
                     labels: Mapping[str, str]) -> tuple[str, float]:
        self.ctx.authorize(caller, "tokens.create", "")
        config = self.ctx.config
        ttl = ttl_seconds or config.token_ttl_seconds
        if not 0 < ttl <= config.max_token_ttl_seconds:
            raise InvalidInputError(
                f"token TTL must be 1..{config.max_token_ttl_seconds} seconds; got {ttl}"
            )
        clean = validate_labels(labels)
        # A fixed prefix makes tokens recognisable to secret scanners and keeps them from
        # starting with "-", which command lines would take for an option.
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        now = self.ctx.clock()
        token_hash = hash_token(token)
        self.store.add_token(token_hash, clean, now, now + ttl, caller.actor)
        self.ctx.audit.record(caller, "tokens.create", f"token:{token_hash[:12]}",
                              AuditOutcome.ALLOWED, {"labels": clean, "ttl_seconds": ttl})
        return token, now + ttl

    def create_operator(self, caller: pki.Identity, name: str, role_text: str,
                        csr_pem: bytes) -> bytes:
        self.ctx.authorize(caller, "operators.create", f"operator:{name}")
        pki.validate_name(name, "operator name")
        role = pki.Role.parse(role_text)
        public_key = pki.parse_csr(csr_pem)
        now = self.ctx.clock()
        self.store.add_operator(name, role.label, now, caller.actor)
        cert_pem, record = self.ctx.keys.issue(
            public_key, pki.IdentityKind.OPERATOR, name, now,
            self.ctx.config.operator_cert_ttl_seconds, role=role,
        )
        self.store.add_certificate(record, current_for_device=False)
        self.ctx.audit.record(caller, "operators.create", f"operator:{name}",
                              AuditOutcome.ALLOWED, {"role": role.label, "serial": record.serial})
        return cert_pem

    def list_operators(self, caller: pki.Identity) -> list[OperatorRecord]:
        self.ctx.authorize(caller, "operators.list", "")
        return self.store.list_operators()

    def revoke_operator(self, caller: pki.Identity, name: str, reason: str) -> OperatorRecord:
        """Revoke an operator: every certificate issued to it is refused from its next call
        (``authenticate`` runs on each one, also on an open connection)."""
        target = f"operator:{name}"
        self.ctx.authorize(caller, "operators.revoke", target)
        if name == caller.name:
            self.ctx.audit.record(caller, "operators.revoke", target, AuditOutcome.DENIED,
                                  {"reason": "an operator cannot revoke itself"})
            raise InvalidInputError("an operator cannot revoke itself; ask another admin")
        try:
            record = self.store.revoke_operator(name, self.ctx.clock())
        except NotFoundError as exc:
            self.ctx.audit.record(caller, "operators.revoke", target, AuditOutcome.FAILED,
                                  {"reason": str(exc)})
            raise
        self.ctx.audit.record(caller, "operators.revoke", target, AuditOutcome.ALLOWED,
                              {"reason": reason[:500],
                               "serials": list(record.certificate_serials)})
        log.warning("operator %s revoked by %s", name, caller.actor)
        return record
