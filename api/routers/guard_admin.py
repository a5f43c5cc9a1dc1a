"""Guard administration: the kill switch and per-department prompt-firewall modes (issue 5)."""

from __future__ import annotations

from fastapi import APIRouter

from api.deps import CurrentUser, EnforcerDep, SessionDep, SettingsDep
from authz import service as authz_service
from guard import controls
from guard.schemas import GLOBAL_SCOPE, FirewallModeIn, GuardStateOut, KillSwitchIn, KillSwitchOut

router = APIRouter(prefix="/v1/admin", tags=["guard"])


@router.post("/kill-switch", response_model=KillSwitchOut)
def set_kill_switch(body: KillSwitchIn, session: SessionDep, settings: SettingsDep, enforcer: EnforcerDep,
                    user: CurrentUser) -> KillSwitchOut:
    """Set `normal`, `retrieval_only` or `disabled` globally (platform admins) or for a department (its admins)."""
    if body.scope == GLOBAL_SCOPE:
        authz_service.require_platform_admin(user)
    else:
        authz_service.require_manage(enforcer, user, body.scope)
        authz_service.require_department(session, body.scope)
    state = controls.set_kill_switch(session=session, settings=settings, identity=user, scope=body.scope,
                                     mode=body.mode, reason=body.reason)
    return KillSwitchOut(scope=body.scope, mode=state.kill_mode, reason=state.reason, updated_by=user.subject)


@router.put("/firewall-mode", response_model=GuardStateOut)
def set_firewall_mode(body: FirewallModeIn, session: SessionDep, settings: SettingsDep, enforcer: EnforcerDep,
                      user: CurrentUser) -> GuardStateOut:
    """Set a department's prompt-firewall mode: `block`, `flag` or `off` (its admins)."""
    authz_service.require_manage(enforcer, user, body.department)
    authz_service.require_department(session, body.department)
    controls.set_firewall_mode(session=session, settings=settings, identity=user, department=body.department,
                               mode=body.mode)
    state = controls.list_states(session=session, settings=settings)[body.department]
    return GuardStateOut(scope=body.department, kill_mode=state.kill_mode, firewall_mode=state.firewall_mode,
                         reason=state.reason)


@router.get("/guard", response_model=list[GuardStateOut])
def list_guard_state(session: SessionDep, settings: SettingsDep, user: CurrentUser) -> list[GuardStateOut]:
    """Every stored scope's kill-switch and firewall mode (platform admins)."""
    authz_service.require_platform_admin(user)
    return [GuardStateOut(scope=scope, kill_mode=s.kill_mode, firewall_mode=s.firewall_mode, reason=s.reason)
            for scope, s in sorted(controls.list_states(session=session, settings=settings).items())]
