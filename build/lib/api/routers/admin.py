"""Departments and role assignments."""

from __future__ import annotations

from fastapi import APIRouter, status

from api.deps import CurrentUser, EnforcerDep, SessionDep, SettingsDep
from authz import service as authz_service
from authz.schemas import DepartmentIn, DepartmentOut, RoleAssignment
from core.keystore import keystore_for

router = APIRouter(prefix="/v1/admin", tags=["admin"])


@router.post("/departments", status_code=status.HTTP_201_CREATED, response_model=DepartmentOut)
def create_department(body: DepartmentIn, session: SessionDep, settings: SettingsDep,
                      user: CurrentUser) -> DepartmentOut:
    """Create a department (platform admins)."""
    authz_service.require_platform_admin(user)
    authz_service.create_department(session=session, keystore=keystore_for(settings), name=body.name)
    session.commit()
    return DepartmentOut(name=body.name)


@router.get("/departments", response_model=list[DepartmentOut])
def list_departments(session: SessionDep, user: CurrentUser) -> list[DepartmentOut]:
    """All departments (platform admins)."""
    authz_service.require_platform_admin(user)
    return [DepartmentOut(name=name) for name in authz_service.list_departments(session=session)]


@router.post("/role-assignments", status_code=status.HTTP_201_CREATED, response_model=RoleAssignment)
def assign_role(body: RoleAssignment, session: SessionDep, enforcer: EnforcerDep,
                user: CurrentUser) -> RoleAssignment:
    """Grant a role in a department (platform admins, or the department's admins)."""
    authz_service.require_manage(enforcer, user, body.department)
    authz_service.assign_role(session=session, enforcer=enforcer, assignment=body)
    return body


@router.get("/role-assignments", response_model=list[RoleAssignment])
def list_role_assignments(enforcer: EnforcerDep, user: CurrentUser,
                          department: str | None = None) -> list[RoleAssignment]:
    """Role assignments: all for platform admins, a department's for its admins."""
    if department is None:
        authz_service.require_platform_admin(user)
    else:
        authz_service.require_manage(enforcer, user, department)
    return authz_service.list_assignments(enforcer, department)


@router.delete("/role-assignments", status_code=status.HTTP_204_NO_CONTENT)
def revoke_role(body: RoleAssignment, session: SessionDep, enforcer: EnforcerDep, user: CurrentUser) -> None:
    """Withdraw a role (same JSON body as the grant)."""
    authz_service.require_manage(enforcer, user, body.department)
    authz_service.revoke_role(session=session, enforcer=enforcer, assignment=body)
