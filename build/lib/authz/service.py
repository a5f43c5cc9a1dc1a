"""Authorization decisions, departments and role assignments. Deny by default."""

from __future__ import annotations

import casbin
from sqlalchemy.orm import Session

from authz import repository
from authz.enforcer import ROLE_PERMISSIONS
from authz.identity import Identity
from authz.schemas import RoleAssignment
from core.errors import ErrorCode, GovragError
from core.keystore import KeyStore


def is_allowed(enforcer: casbin.SyncedEnforcer, identity: Identity, action: str, department: str) -> bool:
    """True when the user, or one of their groups, holds a role granting `action` in `department`."""
    return any(enforcer.enforce(subject, department, action) for subject in identity.subjects)


def require(enforcer: casbin.SyncedEnforcer, identity: Identity, action: str, department: str) -> None:
    """Raise forbidden unless `is_allowed`; the message does not reveal whether the department exists."""
    if not is_allowed(enforcer, identity, action, department):
        raise GovragError(ErrorCode.forbidden, f"not allowed to {action} in this department")


def allowed_departments(
    *, session: Session, enforcer: casbin.SyncedEnforcer, identity: Identity, action: str,
    requested: list[str] | None = None,
) -> list[str]:
    """Existing departments where `action` is allowed, narrowed to `requested` when given."""
    candidates = repository.department_names(session)
    if requested is not None:
        wanted = set(requested)
        candidates = [name for name in candidates if name in wanted]
    return [name for name in candidates if is_allowed(enforcer, identity, action, name)]


def require_manage(enforcer: casbin.SyncedEnforcer, identity: Identity, department: str) -> None:
    """Platform admins manage everything; a department `admin` manages that department."""
    if not identity.is_platform_admin:
        require(enforcer, identity, "manage", department)


def require_platform_admin(identity: Identity) -> None:
    """Only platform admins (GOVRAG_ADMINS) may create departments."""
    if not identity.is_platform_admin:
        raise GovragError(ErrorCode.forbidden, "only platform admins may do this")


def create_department(*, session: Session, keystore: KeyStore, name: str) -> None:
    """A new department with its own wrapped key."""
    if repository.department_exists(session, name):
        raise GovragError(ErrorCode.conflict, "department already exists")
    repository.add_department(session, name)
    keystore.create_department_key(session=session, department=name)


def list_departments(*, session: Session) -> list[str]:
    """All department names."""
    return repository.department_names(session)


def assign_role(*, session: Session, enforcer: casbin.SyncedEnforcer, assignment: RoleAssignment) -> bool:
    """Grant a role in a department; False when it was already granted."""
    _validate_assignment(session, assignment)
    return bool(enforcer.add_grouping_policy(assignment.subject, assignment.role, assignment.department))


def revoke_role(*, session: Session, enforcer: casbin.SyncedEnforcer, assignment: RoleAssignment) -> None:
    """Withdraw a role; not_found when it was not granted."""
    _validate_assignment(session, assignment)
    if not enforcer.remove_grouping_policy(assignment.subject, assignment.role, assignment.department):
        raise GovragError(ErrorCode.not_found, "no such role assignment")


def list_assignments(enforcer: casbin.SyncedEnforcer, department: str | None = None) -> list[RoleAssignment]:
    """Role assignments, optionally for one department."""
    rows = enforcer.get_grouping_policy()
    return [
        RoleAssignment(subject=subject, role=role, department=dept)
        for subject, role, dept in rows
        if department is None or dept == department
    ]


def _validate_assignment(session: Session, assignment: RoleAssignment) -> None:
    if assignment.role not in ROLE_PERMISSIONS:
        raise GovragError(ErrorCode.invalid_request, f"unknown role; expected one of {sorted(ROLE_PERMISSIONS)}")
    if not repository.department_exists(session, assignment.department):
        raise GovragError(ErrorCode.not_found, "no such department")
