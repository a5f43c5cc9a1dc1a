"""Departments, roles, role assignments, group mappings, role hierarchy and clearances."""

from __future__ import annotations

from fastapi import APIRouter, Response, status
from sqlalchemy.orm import Session

from api.deps import CurrentUser, EnforcerDep, SessionDep, SettingsDep
from audit import service as audit_service
from audit.schemas import AdminEventType
from authz import service as authz_service
from authz.enforcer import PolicyEnforcer
from authz.identity import Identity
from authz.schemas import (
    ClearanceIn,
    ClearanceKey,
    ClearanceOut,
    DepartmentIn,
    DepartmentOut,
    GroupMapping,
    GroupMappingKey,
    GroupMappingOut,
    PolicyVersionOut,
    RoleAssignment,
    RoleAssignmentKey,
    RoleAssignmentOut,
    RoleDefinition,
    RoleInheritance,
)
from core.keystore import keystore_for
from core.settings import Settings
from core.text import DepartmentName

router = APIRouter(prefix="/v1/admin", tags=["admin"])


@router.post("/departments", status_code=status.HTTP_201_CREATED, response_model=DepartmentOut)
def create_department(body: DepartmentIn, session: SessionDep, settings: SettingsDep,
                      user: CurrentUser) -> DepartmentOut:
    """Create a department (platform admins)."""
    authz_service.require_platform_admin(user)
    authz_service.create_department(session=session, keystore=keystore_for(settings), name=body.name)
    audit_service.record_admin_event(session=session, identity=user, event_type=AdminEventType.department_created,
                                     department=body.name, details={"department": body.name}, settings=settings)
    return DepartmentOut(name=body.name)


@router.get("/departments", response_model=list[DepartmentOut])
def list_departments(session: SessionDep, user: CurrentUser) -> list[DepartmentOut]:
    """All departments (platform admins)."""
    authz_service.require_platform_admin(user)
    return [DepartmentOut(name=name) for name in authz_service.list_departments(session=session)]


# A grant already in place: 200 with it, nothing recorded (201 said something was created).
ALREADY_IN_PLACE = {status.HTTP_200_OK: {"description": "Already in place: nothing changed, nothing recorded"}}


@router.post("/role-assignments", status_code=status.HTTP_201_CREATED, response_model=RoleAssignment,
             responses=ALREADY_IN_PLACE)
def assign_role(body: RoleAssignment, session: SessionDep, enforcer: EnforcerDep, settings: SettingsDep,
                user: CurrentUser, response: Response) -> RoleAssignment:
    """Grant a role in a department (platform admins, or the department's admins); audited by authz."""
    authz_service.require_manage(enforcer, user, body.department)
    if not authz_service.assign_role(ctx=_change(session, enforcer, user, settings), assignment=body):
        response.status_code = status.HTTP_200_OK
    return body


@router.get("/role-assignments", response_model=list[RoleAssignmentOut], response_model_exclude_none=True)
def list_role_assignments(enforcer: EnforcerDep, user: CurrentUser,
                          department: DepartmentName | None = None) -> list[RoleAssignmentOut]:
    """Role assignments: all for platform admins, a department's for its admins; `invalid` marks a stored row that
    grants nothing (revoke it with the body it is listed under)."""
    if department is None:
        authz_service.require_platform_admin(user)
    else:
        authz_service.require_manage(enforcer, user, department)
    return authz_service.list_assignments(enforcer, department)


@router.delete("/role-assignments", status_code=status.HTTP_204_NO_CONTENT)
def revoke_role(body: RoleAssignmentKey, session: SessionDep, enforcer: EnforcerDep, settings: SettingsDep,
                user: CurrentUser) -> None:
    """Withdraw a role (same JSON body as the grant, or as listed); audited by authz."""
    authz_service.require_manage(enforcer, user, body.department)
    authz_service.revoke_role(ctx=_change(session, enforcer, user, settings), assignment=body)


# --- authorization policy (issue 4): every change bumps the policy version and is audited by authz ---

def _change(session: Session, enforcer: PolicyEnforcer, user: Identity,
            settings: Settings) -> authz_service.ChangeContext:
    return authz_service.ChangeContext(session=session, enforcer=enforcer, actor=user, settings=settings)


def _require_scope(enforcer: PolicyEnforcer, user: Identity, department: str | None) -> None:
    """Platform admins see everything; a department's admins see that department."""
    if department is None:
        authz_service.require_platform_admin(user)
    else:
        authz_service.require_manage(enforcer, user, department)


@router.get("/policy-version", response_model=PolicyVersionOut)
def policy_version(enforcer: EnforcerDep, user: CurrentUser) -> PolicyVersionOut:
    """The policy version this process decides with (platform admins)."""
    authz_service.require_platform_admin(user)
    return PolicyVersionOut(version=enforcer.refresh(force=True))


@router.get("/roles", response_model=list[RoleDefinition])
def list_roles(enforcer: EnforcerDep, user: CurrentUser) -> list[RoleDefinition]:
    """Every role with its permissions (platform admins)."""
    authz_service.require_platform_admin(user)
    return authz_service.list_roles(enforcer)


@router.put("/roles/{name}", response_model=RoleDefinition)
def define_role(name: str, body: RoleDefinition, session: SessionDep, enforcer: EnforcerDep, settings: SettingsDep,
                user: CurrentUser) -> RoleDefinition:
    """Create a role or replace its permissions (platform admins); the path and body names must agree. Answers the
    role as stored (each permission once)."""
    authz_service.require_platform_admin(user)
    return authz_service.define_role(ctx=_change(session, enforcer, user, settings),
                                     definition=authz_service.named_definition(name, body))


@router.delete("/roles/{name}", status_code=status.HTTP_204_NO_CONTENT)
def delete_role(name: str, session: SessionDep, enforcer: EnforcerDep, settings: SettingsDep,
                user: CurrentUser) -> None:
    """Remove a role nobody holds (platform admins)."""
    authz_service.require_platform_admin(user)
    authz_service.delete_role(ctx=_change(session, enforcer, user, settings), name=name)


@router.post("/group-mappings", status_code=status.HTTP_201_CREATED, response_model=GroupMapping,
             responses=ALREADY_IN_PLACE)
def map_group(body: GroupMapping, session: SessionDep, enforcer: EnforcerDep, settings: SettingsDep,
              user: CurrentUser, response: Response) -> GroupMapping:
    """Members of an IdP group get a role in a department."""
    authz_service.require_manage(enforcer, user, body.department)
    if not authz_service.map_group(ctx=_change(session, enforcer, user, settings), mapping=body):
        response.status_code = status.HTTP_200_OK
    return body


@router.get("/group-mappings", response_model=list[GroupMappingOut], response_model_exclude_none=True)
def list_group_mappings(enforcer: EnforcerDep, user: CurrentUser,
                        department: DepartmentName | None = None) -> list[GroupMappingOut]:
    """Group → role mappings; `invalid` marks a stored row that grants nothing (revoke it as listed)."""
    _require_scope(enforcer, user, department)
    return authz_service.list_group_mappings(enforcer, department)


@router.delete("/group-mappings", status_code=status.HTTP_204_NO_CONTENT)
def unmap_group(body: GroupMappingKey, session: SessionDep, enforcer: EnforcerDep, settings: SettingsDep,
                user: CurrentUser) -> None:
    """Withdraw a group → role mapping (same JSON body as the mapping, or as listed)."""
    authz_service.require_manage(enforcer, user, body.department)
    authz_service.unmap_group(ctx=_change(session, enforcer, user, settings), mapping=body)


@router.post("/role-inheritance", status_code=status.HTTP_201_CREATED, response_model=RoleInheritance)
def add_inheritance(body: RoleInheritance, response: Response, session: SessionDep, enforcer: EnforcerDep,
                    settings: SettingsDep, user: CurrentUser) -> RoleInheritance:
    """Inside a department, holders of `role` also hold `inherits` (200 when the link was already there)."""
    authz_service.require_manage(enforcer, user, body.department)
    if not authz_service.add_inheritance(ctx=_change(session, enforcer, user, settings), link=body):
        response.status_code = status.HTTP_200_OK
    return body


@router.get("/role-inheritance", response_model=list[RoleInheritance])
def list_inheritance(enforcer: EnforcerDep, user: CurrentUser,
                     department: DepartmentName | None = None) -> list[RoleInheritance]:
    """The role hierarchy per department."""
    _require_scope(enforcer, user, department)
    return authz_service.list_inheritance(enforcer, department)


@router.delete("/role-inheritance", status_code=status.HTTP_204_NO_CONTENT)
def remove_inheritance(body: RoleInheritance, session: SessionDep, enforcer: EnforcerDep, settings: SettingsDep,
                       user: CurrentUser) -> None:
    """Withdraw a role-hierarchy link."""
    authz_service.require_manage(enforcer, user, body.department)
    authz_service.remove_inheritance(ctx=_change(session, enforcer, user, settings), link=body)


@router.put("/clearances", response_model=ClearanceIn)
def set_clearance(body: ClearanceIn, session: SessionDep, enforcer: EnforcerDep, settings: SettingsDep,
                  user: CurrentUser) -> ClearanceIn:
    """Set the highest classification a user or group may read in a department."""
    authz_service.require_manage(enforcer, user, body.department)
    authz_service.set_clearance(ctx=_change(session, enforcer, user, settings), clearance=body)
    return body


@router.get("/clearances", response_model=list[ClearanceOut], response_model_exclude_none=True)
def list_clearances(enforcer: EnforcerDep, user: CurrentUser,
                    department: DepartmentName | None = None) -> list[ClearanceOut]:
    """Explicit clearances (everyone else has the default)."""
    _require_scope(enforcer, user, department)
    return authz_service.list_clearances(enforcer, department)


@router.delete("/clearances", status_code=status.HTTP_204_NO_CONTENT)
def remove_clearance(body: ClearanceKey, session: SessionDep, enforcer: EnforcerDep, settings: SettingsDep,
                     user: CurrentUser) -> None:
    """Fall back to the default clearance."""
    authz_service.require_manage(enforcer, user, body.department)
    authz_service.remove_clearance(ctx=_change(session, enforcer, user, settings), key=body)
