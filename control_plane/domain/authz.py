"""Who may do what: the minimum role per AdminService action, as data.

``viewer`` reads; ``operator`` also runs rollouts and experiments; ``admin`` also enrolls,
revokes and manages operators. Actions marked state-changing are audited whether they are
allowed or denied.
"""

from __future__ import annotations

from dataclasses import dataclass

from fleetcore.errors import PermissionDeniedError
from fleetcore.pki import Identity, IdentityKind, Role

__all__ = ["ACTIONS", "Action", "check"]


@dataclass(frozen=True)
class Action:
    name: str
    min_role: Role
    changes_state: bool


ACTIONS: dict[str, Action] = {
    a.name: a
    for a in (
        Action("tokens.create", Role.ADMIN, True),
        Action("devices.list", Role.VIEWER, False),
        Action("devices.show", Role.VIEWER, False),
        Action("devices.revoke", Role.ADMIN, True),
        Action("operators.create", Role.ADMIN, True),
        Action("operators.list", Role.ADMIN, False),
        Action("operators.revoke", Role.ADMIN, True),
        Action("audit.list", Role.VIEWER, False),
        Action("audit.verify", Role.VIEWER, False),
        Action("audit.checkpoint", Role.VIEWER, False),
        Action("models.publish", Role.OPERATOR, True),
        Action("models.list", Role.VIEWER, False),
        Action("rollouts.start", Role.OPERATOR, True),
        Action("rollouts.status", Role.VIEWER, False),
        Action("rollouts.pause", Role.OPERATOR, True),
        Action("rollouts.resume", Role.OPERATOR, True),
        Action("rollouts.abort", Role.OPERATOR, True),
        Action("rollouts.rollback", Role.OPERATOR, True),
        Action("experiments.start", Role.OPERATOR, True),
        Action("experiments.stop", Role.OPERATOR, True),
        Action("experiments.status", Role.VIEWER, False),
        Action("drift.read", Role.VIEWER, False),
        Action("retrain.policy", Role.OPERATOR, True),
        Action("retrain.jobs", Role.VIEWER, False),
        Action("publishers.list", Role.VIEWER, False),
        Action("publishers.add", Role.ADMIN, True),
        Action("publishers.revoke", Role.ADMIN, True),
    )
}


def check(caller: Identity, action: Action) -> None:
    """Raise ``PermissionDeniedError`` unless ``caller`` may perform ``action``."""
    if caller.kind is not IdentityKind.OPERATOR or caller.role is None:
        raise PermissionDeniedError(f"{action.name} needs an operator certificate")
    if caller.role < action.min_role:
        raise PermissionDeniedError(
            f"{action.name} needs role {action.min_role.label} or higher; "
            f"{caller.name} has role {caller.role.label}"
        )
