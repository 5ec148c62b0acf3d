"""Control-plane logic on domain types: no protobuf and no grpc in here.

Servicers authenticate the transport (the verified peer certificate), turn messages into the
arguments below and the results back into messages. Everything else happens here.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from control_plane import authz
from control_plane.audit import ChainVerdict, check_checkpoint, make_checkpoint, verify_chain
from control_plane.authority import Authority
from control_plane.blobstore import BlobStore
from control_plane.config import ControlPlaneConfig
from control_plane.domain import (
    ArmStatsRecord,
    AuditOutcome,
    AuditRecord,
    DeviceRecord,
    DeviceStatus,
    DriftWindowRecord,
    ExperimentRecord,
    ModelVersionRecord,
    ReleaseRecord,
    RolloutRecord,
    TelemetryRecord,
)
from control_plane.experiment_stats import Decision, decide
from control_plane.heartbeats import HeartbeatWriter
from control_plane.registry import Upload, manifest_json, verify_upload
from control_plane.releases import ReleaseIssuer
from control_plane.retrain_service import RetrainService
from control_plane.rollout_plan import parse_gate, parse_steps, step_devices
from control_plane.rollouts import RolloutController
from control_plane.storage import Store
from control_plane.telemetry import derive
from fleetcore import pki
from fleetcore.errors import (
    AuthenticationError,
    InvalidInputError,
    NotFoundError,
    PermissionDeniedError,
    RevokedError,
    TokenError,
    UntrustedInputError,
)
from fleetcore.labels import matches, validate_labels

__all__ = ["DeviceView", "EnrollResult", "Handlers", "hash_token"]

log = logging.getLogger(__name__)

MAX_TOKEN_BYTES = 256
TOKEN_PREFIX = "eft_"  # noqa: S105 (a prefix, not a secret)
MAX_AUDIT_LIST = 10_000


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


@dataclass(frozen=True)
class DeviceView:
    record: DeviceRecord
    status: DeviceStatus


class Handlers:
    def __init__(
        self,
        config: ControlPlaneConfig,
        store: Store,
        authority: Authority,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.store = store
        self.authority = authority
        self.clock = clock
        # Set by the server once the API port is bound (port 0 resolves only then).
        self.api_address = config.api_advertise or config.api_listen
        self.blobs = BlobStore(config.layout.blobs, authority.blob_key)
        # Devices whose MQTT connection dropped (the broker published their will); the bridge
        # keeps it, from the retained status topics, so it is rebuilt when it reconnects.
        self.disconnected: set[str] = set()
        # Called with a device id when its release changes or it is revoked (wakes its streams).
        self.on_device_change: Callable[[str], None] = lambda device_id: None
        self.releases = ReleaseIssuer(store, authority.release_key, config.release_ttl_seconds,
                                      on_change=self._device_changed)
        self.rollouts = RolloutController(self, clock)
        self.heartbeats = HeartbeatWriter(store)
        self.retrain = RetrainService(self)

    def audit_system(self, action: str, target: str, detail: Mapping[str, Any]) -> None:
        """An action the control plane took by itself (a scheduler, a policy)."""
        self._audit("control-plane", action, target, AuditOutcome.ALLOWED, detail)

    allowed = AuditOutcome.ALLOWED

    def authorize(self, caller: pki.Identity, action_name: str, target: str) -> None:
        self._authorize(caller, action_name, target)

    def audit_action(self, who: pki.Identity | str, action: str, target: str,
                     outcome: AuditOutcome, detail: Mapping[str, Any]) -> None:
        self._audit(who, action, target, outcome, detail)

    def _device_changed(self, device_id: str) -> None:
        self.on_device_change(device_id)  # looked up per call: the server rebinds it

    # ------------------------------------------------------------------ identity
    def authenticate(self, identity: pki.Identity, expected: pki.IdentityKind) -> pki.Identity:
        """Check a TLS-verified identity against the registry; refuse revoked or unknown ones."""
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
            device = self.store.get_device(identity.name)
            if device is None:
                raise AuthenticationError(f"device {identity.name} is not registered")
            if device.revoked_at is not None:
                raise RevokedError(f"device {identity.name} is revoked")
        else:
            operator = self.store.get_operator(identity.name)
            if operator is None:
                raise AuthenticationError(f"operator {identity.name} is not registered")
        return identity

    def _authorize(self, caller: pki.Identity, action_name: str, target: str) -> None:
        action = authz.ACTIONS[action_name]
        try:
            authz.check(caller, action)
        except PermissionDeniedError as exc:
            if action.changes_state:
                self._audit(caller, action.name, target, AuditOutcome.DENIED,
                            {"reason": str(exc)})
            raise

    def _audit(
        self,
        who: pki.Identity | str,
        action: str,
        target: str,
        outcome: AuditOutcome,
        detail: Mapping[str, Any] | None = None,
    ) -> None:
        """Append to the hash-chained audit log (who: an identity, or "init"/"token:...")."""
        actor = who.actor if isinstance(who, pki.Identity) else who
        role = who.role.label if isinstance(who, pki.Identity) and who.role else ""
        self.store.append_audit(
            self.clock(),
            actor,
            action,
            target,
            outcome.value,
            json.dumps(dict(detail or {}), sort_keys=True, separators=(",", ":")),
            role,
        )

    # ------------------------------------------------------------------ agents
    def enroll(
        self,
        token: str,
        csr_pem: bytes,
        labels: Mapping[str, str],
        host: Mapping[str, Any],
        agent_version: str,
    ) -> EnrollResult:
        if not token or len(token) > MAX_TOKEN_BYTES:
            raise TokenError("enrollment token is missing or malformed")
        token_hash = hash_token(token)
        actor = f"token:{token_hash[:12]}"
        public_key = pki.parse_csr(csr_pem)
        requested = validate_labels(labels)
        now = self.clock()
        device_id = "dev-" + secrets.token_hex(8)
        cert_pem, cert_record = self.authority.issue(
            public_key, pki.IdentityKind.DEVICE, device_id, now,
            self.config.device_cert_ttl_seconds,
        )
        try:
            device = self.store.enroll(
                token_hash,
                now,
                DeviceRecord(
                    id=device_id,
                    labels=requested,
                    enrolled_at=now,
                    agent_version=agent_version,
                    host=dict(host),
                ),
                cert_record,
            )
        except TokenError as exc:
            self._audit(actor, "devices.enroll", "", AuditOutcome.DENIED, {"reason": str(exc)})
            raise
        self._audit(actor, "devices.enroll", device_id, AuditOutcome.ALLOWED,
                    {"labels": device.labels, "serial": cert_record.serial})
        log.info("enrolled device %s labels=%s", device_id, device.labels)
        return EnrollResult(
            device=device,
            certificate_pem=cert_pem,
            ca_pem=self.authority.ca_pem,
            release_public_pem=self.authority.release_public_pem,
            publisher_public_pems=self.authority.publisher_public_pems,
            api_address=self.api_address,
            mqtt_url=self.config.mqtt_url,
            heartbeat_interval_seconds=self.config.heartbeat_interval_seconds,
        )

    def renew_certificate(self, caller: pki.Identity, csr_pem: bytes) -> bytes:
        public_key = pki.parse_csr(csr_pem)
        now = self.clock()
        cert_pem, record = self.authority.issue(
            public_key, pki.IdentityKind.DEVICE, caller.name, now,
            self.config.device_cert_ttl_seconds,
        )
        self.store.add_certificate(record, current_for_device=True)
        self._audit(caller, "devices.renew", caller.name, AuditOutcome.ALLOWED,
                    {"previous": caller.serial, "serial": record.serial})
        return cert_pem

    def heartbeat(
        self,
        caller: pki.Identity,
        agent_version: str,
        host: Mapping[str, Any],
        models: list[dict[str, Any]],
        have: tuple[int, str] = (0, ""),
    ) -> tuple[float, int, int]:
        """Record the device's report; return (server time, interval, release serial).

        ``have``: (serial, digest) of the newest release the device holds; when it is not one
        we issued (a restored backup), the release is re-issued above it."""
        now = self.clock()
        self.store.record_heartbeat(caller.name, now, agent_version, host, models)
        return self._heartbeat_reply(caller, now, have)

    async def heartbeat_grouped(
        self,
        caller: pki.Identity,
        agent_version: str,
        host: Mapping[str, Any],
        models: list[dict[str, Any]],
        have: tuple[int, str] = (0, ""),
    ) -> tuple[float, int, int]:
        """``heartbeat`` with its write group-committed with the others of this moment."""
        now = self.clock()
        await self.heartbeats.record(caller.name, now, agent_version, host, models)
        return self._heartbeat_reply(caller, now, have)

    def _heartbeat_reply(self, caller: pki.Identity, now: float,
                         have: tuple[int, str]) -> tuple[float, int, int]:
        release = self.releases.current(caller.name, now, have=have)  # renews it when due
        return now, self.config.heartbeat_interval_seconds, release.serial if release else 0

    def current_release(self, caller: pki.Identity, have_serial: int = 0) -> ReleaseRecord | None:
        return self.releases.current(caller.name, self.clock(), have=(have_serial, ""))

    def bundle_for_device(
        self, caller: pki.Identity, digest: str, offset: int, length: int
    ) -> Iterator[bytes]:
        """Bytes of a bundle that the device's release names (and no other)."""
        allowed = {}
        for arm in self.store.device_arms(caller.name):
            mv = self.store.get_model_version(arm.model, arm.version)
            if mv is not None:
                allowed[mv.digest] = mv.length
        if digest not in allowed:
            raise PermissionDeniedError(f"bundle {digest} is not in the release of {caller.name}")
        total = allowed[digest]
        if offset > total:
            raise InvalidInputError(f"offset {offset} is past the end of {digest} ({total} bytes)")
        count = (total - offset) if length == 0 else min(length, total - offset)
        return self.blobs.read(digest, total, offset, count)

    # ------------------------------------------------------------------ models, rollouts
    def begin_upload(self, caller: pki.Identity) -> Upload:
        self._authorize(caller, "models.publish", "")
        return Upload(self.config.layout.scratch, self.config.max_bundle_bytes)

    def publish_model(self, caller: pki.Identity | str, upload: Upload) -> ModelVersionRecord:
        """Verify and store an upload (``caller``: an operator, or "control-plane")."""
        published_by = caller.actor if isinstance(caller, pki.Identity) else caller
        try:
            digest = upload.finish()
            try:
                verified = verify_upload(upload, digest, self.authority.publisher_public_pems)
            except UntrustedInputError as exc:
                self._audit(caller, "models.publish", digest, AuditOutcome.DENIED,
                            {"reason": str(exc)[:500]})
                raise
            manifest = verified.manifest
            record = ModelVersionRecord(
                name=str(manifest["name"]), version=int(manifest["version"]), digest=digest,
                length=verified.length, created_at=self.clock(), published_by=published_by,
                publisher_key=verified.publisher_key, manifest=manifest_json(manifest),
            )
            pki.validate_name(record.name, "model name")
            self.blobs.put_file(upload.path, digest, verified.length)
            self.store.add_model_version(record)
        finally:
            upload.discard()
        self._audit(caller, "models.publish", f"{record.name}:{record.version}",
                    AuditOutcome.ALLOWED, {"digest": digest, "length": record.length,
                                           "publisher_key": record.publisher_key})
        log.info("published %s v%d (%s, %d bytes)", record.name, record.version, digest,
                 record.length)
        stored = self.store.get_model_version(record.name, record.version)
        assert stored is not None
        return stored

    def list_models(self, caller: pki.Identity, name: str) -> list[ModelVersionRecord]:
        self._authorize(caller, "models.list", name)
        return self.store.list_model_versions(name or None)

    def start_rollout(
        self, caller: pki.Identity, model: str, version: int, selector: Mapping[str, str],
        *, steps: Sequence[int] = (100,), bake_seconds: float = 0.0, gates: Sequence[str] = (),
        on_failure: str = "pause",
    ) -> tuple[RolloutRecord, list[DeviceView]]:
        target = f"{model}:{version}"
        self._authorize(caller, "rollouts.start", target)
        if self.store.get_model_version(model, version) is None:
            raise NotFoundError(f"model {model} version {version} is not published")
        clean = validate_labels(selector)
        plan = tuple(parse_steps(list(steps) or [100]))
        checked = tuple(parse_gate(g).text for g in gates)
        if on_failure not in ("pause", "rollback"):
            raise InvalidInputError(f"on-failure must be pause or rollback; got {on_failure!r}")
        if not 0 <= bake_seconds <= 30 * 86400:
            raise InvalidInputError(f"bake must be 0..2592000 seconds; got {bake_seconds}")
        now = self.clock()
        devices = [d.id for d in self.store.list_devices()
                   if d.revoked_at is None and matches(d.labels, clean)]
        first = step_devices(model, devices, plan, 0)
        rollout = self.store.start_rollout(
            model, version, clean, devices, now, caller.actor, first_step=first, steps=plan,
            bake_seconds=bake_seconds, gates=checked, on_failure=on_failure,
            device_timeout_seconds=self.config.rollout_device_timeout_seconds,
        )
        for device_id in first:
            self.releases.current(device_id, now)
        self._audit(caller, "rollouts.start", target, AuditOutcome.ALLOWED,
                    {"selector": clean, "devices": len(devices), "steps": list(plan),
                     "gates": list(checked), "on_failure": on_failure})
        views = [self._view(d, now) for d in (self.store.get_device(i) for i in devices) if d]
        return rollout, views

    def rollout_action(self, caller: pki.Identity, model: str, action: str) -> RolloutRecord:
        self._authorize(caller, f"rollouts.{action}", model)
        rollout = self.store.get_rollout(model)
        if rollout is None:
            raise NotFoundError(f"no rollout for model {model!r}")
        return self.rollouts.act(rollout, action, caller)

    def get_rollout(
        self, caller: pki.Identity, model: str
    ) -> tuple[RolloutRecord, list[DeviceView], dict[str, ReleaseRecord]]:
        self._authorize(caller, "rollouts.status", model)
        rollout = self.store.get_rollout(model)
        if rollout is None:
            raise NotFoundError(f"no rollout for model {model!r}")
        now = self.clock()
        views, releases = [], {}
        for device_id in rollout.device_ids:
            device = self.store.get_device(device_id)
            if device is None:
                continue
            views.append(self._view(device, now))
            release = self.store.get_release(device_id)
            if release is not None:
                releases[device_id] = release
        return rollout, views, releases

    # ------------------------------------------------------------------ operators
    def create_token(
        self, caller: pki.Identity, ttl_seconds: int, labels: Mapping[str, str]
    ) -> tuple[str, float]:
        self._authorize(caller, "tokens.create", "")
        ttl = ttl_seconds or self.config.token_ttl_seconds
        if not 0 < ttl <= self.config.max_token_ttl_seconds:
            raise InvalidInputError(
                f"token TTL must be 1..{self.config.max_token_ttl_seconds} seconds; got {ttl}"
            )
        clean = validate_labels(labels)
        # A fixed prefix makes tokens recognisable to secret scanners and keeps them from
        # starting with "-", which command lines would take for an option.
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        now = self.clock()
        token_hash = hash_token(token)
        self.store.add_token(token_hash, clean, now, now + ttl, caller.actor)
        self._audit(caller, "tokens.create", f"token:{token_hash[:12]}",
                    AuditOutcome.ALLOWED, {"labels": clean, "ttl_seconds": ttl})
        return token, now + ttl

    def _view(self, record: DeviceRecord, now: float) -> DeviceView:
        status = record.status(now, self.config.offline_after_seconds)
        if status is DeviceStatus.ONLINE and record.id in self.disconnected:
            status = DeviceStatus.OFFLINE  # its MQTT will said so, before the heartbeats lapse
        return DeviceView(record, status)

    def list_devices(
        self, caller: pki.Identity, selector: Mapping[str, str]
    ) -> list[DeviceView]:
        self._authorize(caller, "devices.list", "")
        now = self.clock()
        return [
            self._view(d, now) for d in self.store.list_devices() if matches(d.labels, selector)
        ]

    def get_device(self, caller: pki.Identity, device_id: str) -> DeviceView:
        self._authorize(caller, "devices.show", device_id)
        device = self.store.get_device(device_id)
        if device is None:
            raise NotFoundError(f"no device {device_id!r}")
        return self._view(device, self.clock())

    def revoke_device(self, caller: pki.Identity, device_id: str, reason: str) -> DeviceView:
        self._authorize(caller, "devices.revoke", device_id)
        try:
            device = self.store.revoke_device(device_id, self.clock())
        except NotFoundError as exc:
            self._audit(caller, "devices.revoke", device_id, AuditOutcome.FAILED,
                        {"reason": str(exc)})
            raise
        self._audit(caller, "devices.revoke", device_id, AuditOutcome.ALLOWED,
                    {"reason": reason[:500]})
        self.on_device_change(device_id)
        log.warning("device %s revoked by %s", device_id, caller.actor)
        return self._view(device, self.clock())

    def create_operator(
        self, caller: pki.Identity, name: str, role_text: str, csr_pem: bytes
    ) -> bytes:
        self._authorize(caller, "operators.create", f"operator:{name}")
        pki.validate_name(name, "operator name")
        role = pki.Role.parse(role_text)
        public_key = pki.parse_csr(csr_pem)
        now = self.clock()
        self.store.add_operator(name, role.label, now, caller.actor)
        cert_pem, record = self.authority.issue(
            public_key, pki.IdentityKind.OPERATOR, name, now,
            self.config.operator_cert_ttl_seconds, role=role,
        )
        self.store.add_certificate(record, current_for_device=False)
        self._audit(caller, "operators.create", f"operator:{name}", AuditOutcome.ALLOWED,
                    {"role": role.label, "serial": record.serial})
        return cert_pem

    # ------------------------------------------------------------------ telemetry
    def ingest_telemetry(
        self, caller: pki.Identity, records: list[TelemetryRecord], dropped: int, depth: int
    ) -> list[int]:
        records, derived = self.retrain.vet(caller.name, records, derive(caller.name, records))
        acked = self.store.ingest_telemetry(caller.name, records, derived, self.clock(), dropped,
                                            depth)
        for model in {row.model for row in derived.values() if isinstance(row, ArmStatsRecord)}:
            self.evaluate_experiment(model)
        for model in {row.model for row in derived.values() if isinstance(row, DriftWindowRecord)}:
            self.retrain.check(model)
        return acked

    def reissue_model(self, model: str) -> None:
        """Re-issue the release of every device in the model's rollout (its content changed)."""
        rollout = self.store.get_rollout(model)
        if rollout is None:
            return
        now = self.clock()
        for device_id in rollout.device_ids:
            self.releases.current(device_id, now)

    def _arm_counts(self, record: ExperimentRecord) -> dict[int, tuple[int, int]]:
        devices = set(record.device_ids)
        counts = {record.champion: (0, 0), record.challenger: (0, 0)}
        for s in self.store.arm_stats(record.model):
            if s.device_id in devices and s.version in counts:
                c, n = counts[s.version]
                counts[s.version] = (c + s.correct, n + s.labelled)
        return counts

    def experiment_decision(self, record: ExperimentRecord) -> Decision:
        counts = self._arm_counts(record)
        return decide(counts[record.champion], counts[record.challenger],
                      min_samples=self.config.experiment_min_samples,
                      alpha=self.config.experiment_alpha)

    def evaluate_experiment(self, model: str) -> None:
        """Decide a running experiment once enough feedback is in, and act on it."""
        record = self.store.get_experiment(model)
        if record is None or record.state != "running":
            return
        decision = self.experiment_decision(record)
        if decision.verdict == "wait":
            return
        now = self.clock()
        self.store.record_decision(model, decision.verdict, decision.p_value, decision.reason,
                                   now)
        if decision.verdict == "promote":
            self.store.start_rollout(model, record.challenger, record.selector,
                                     list(record.device_ids), now, "control-plane")
        else:
            self.store.stop_experiment(model, now)
        for device_id in record.device_ids:
            self.releases.current(device_id, now)
        self._audit("control-plane", f"experiments.{decision.verdict}",
                    f"{model}:{record.challenger}", AuditOutcome.ALLOWED,
                    {"p_value": decision.p_value, "reason": decision.reason})
        log.info("experiment %s: %s (%s)", model, decision.verdict, decision.reason)

    def drift(self, caller: pki.Identity, model: str) -> list[DriftWindowRecord]:
        self._authorize(caller, "drift.read", model)
        return self.store.latest_drift(model or None)

    # ------------------------------------------------------------------ experiments
    def start_experiment(
        self, caller: pki.Identity, model: str, challenger: int, weight: float,
        selector: Mapping[str, str],
    ) -> ExperimentRecord:
        self._authorize(caller, "experiments.start", f"{model}:{challenger}")
        return self.begin_experiment(caller, model, challenger, weight, selector)

    def begin_experiment(
        self, caller: pki.Identity | str, model: str, challenger: int, weight: float,
        selector: Mapping[str, str],
    ) -> ExperimentRecord:
        """Start an experiment (authorization is the caller's business)."""
        target = f"{model}:{challenger}"
        weight = weight or 0.1
        if not 0.0 < weight < 1.0:
            raise InvalidInputError(f"challenger weight must be in (0, 1); got {weight}")
        rollout = self.store.get_rollout(model)
        if rollout is None or rollout.state not in ("running", "completed"):
            raise NotFoundError(f"model {model!r} has no active rollout to be the champion")
        if challenger == rollout.version:
            raise InvalidInputError(f"version {challenger} is already the champion")
        if self.store.get_model_version(model, challenger) is None:
            raise NotFoundError(f"model {model} version {challenger} is not published")
        clean = validate_labels(selector)
        devices = []
        for device_id in rollout.device_ids:
            device = self.store.get_device(device_id)
            if device is not None and device.revoked_at is None and matches(device.labels,
                                                                            clean):
                devices.append(device_id)
        now = self.clock()
        actor = caller.actor if isinstance(caller, pki.Identity) else caller
        record = ExperimentRecord(model, rollout.version, challenger, weight, "running", clean,
                                  tuple(devices), now, actor)
        self.store.start_experiment(record)
        for device_id in devices:
            self.releases.current(device_id, now)
        self._audit(caller, "experiments.start", target, AuditOutcome.ALLOWED,
                    {"weight": weight, "devices": len(devices), "champion": rollout.version})
        return record

    def stop_experiment(self, caller: pki.Identity, model: str) -> ExperimentRecord:
        self._authorize(caller, "experiments.stop", model)
        now = self.clock()
        record = self.store.stop_experiment(model, now)
        for device_id in record.device_ids:
            self.releases.current(device_id, now)
        self._audit(caller, "experiments.stop", model, AuditOutcome.ALLOWED,
                    {"champion": record.champion, "challenger": record.challenger})
        return record

    def get_experiment(
        self, caller: pki.Identity, model: str
    ) -> tuple[ExperimentRecord, list[ArmStatsRecord]]:
        self._authorize(caller, "experiments.status", model)
        record = self.store.get_experiment(model)
        if record is None:
            raise NotFoundError(f"no experiment for model {model!r}")
        devices = set(record.device_ids)
        stats = [s for s in self.store.arm_stats(model) if s.device_id in devices
                 and s.version in (record.champion, record.challenger)]
        return record, stats

    def verify_audit(
        self, caller: pki.Identity, checkpoint: bytes, signature: bytes
    ) -> tuple[ChainVerdict, tuple[bool, str] | None]:
        """Walk the whole chain; also check a checkpoint when one is given."""
        self._authorize(caller, "audit.verify", "")
        chain = self.store.audit_chain()
        verdict = verify_chain(chain)
        checked = None
        if checkpoint:
            checked = check_checkpoint(checkpoint, signature,
                                       self.authority.release_key.public_key(), chain)
        return verdict, checked

    def checkpoint_audit(self, caller: pki.Identity) -> tuple[bytes, bytes]:
        self._authorize(caller, "audit.checkpoint", "")
        return make_checkpoint(self.store.audit_chain(), self.clock(),
                               self.authority.release_key)

    def list_audit(self, caller: pki.Identity, limit: int) -> list[AuditRecord]:
        self._authorize(caller, "audit.list", "")
        return self.store.list_audit(min(limit or 100, MAX_AUDIT_LIST))
