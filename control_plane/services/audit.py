"""The audit log for operators: list it, verify the whole hash chain, sign checkpoints of its
head and check one later (the chain's rules: ``domain/audit_chain.py``)."""

from __future__ import annotations

from control_plane.domain.audit_chain import (
    ChainVerdict,
    check_checkpoint,
    make_checkpoint,
    verify_chain,
)
from control_plane.domain.records import AuditRecord
from control_plane.services.context import Context
from fleetcore import pki

__all__ = ["MAX_AUDIT_LIST", "AuditService"]

MAX_AUDIT_LIST = 10_000


class AuditService:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.store = ctx.store

    def verify(self, caller: pki.Identity, checkpoint: bytes,
               signature: bytes) -> tuple[ChainVerdict, tuple[bool, str] | None]:
        """Walk the whole chain; also check a checkpoint when one is given."""
        self.ctx.authorize(caller, "audit.verify", "")
        chain = self.store.audit_chain()
        checked = None
        if checkpoint:
            keys = self.ctx.roots.audit_keys() or [self.ctx.audit_key().public_key()]
            checked = check_checkpoint(checkpoint, signature, keys, chain)
        return verify_chain(chain), checked

    def checkpoint(self, caller: pki.Identity) -> tuple[bytes, bytes]:
        self.ctx.authorize(caller, "audit.checkpoint", "")
        return make_checkpoint(self.store.audit_chain(), self.ctx.clock(),
                               self.ctx.audit_key())

    def list_events(self, caller: pki.Identity, limit: int) -> list[AuditRecord]:
        self.ctx.authorize(caller, "audit.list", "")
        return self.store.list_audit(min(limit or 100, MAX_AUDIT_LIST))
