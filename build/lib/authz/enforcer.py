"""The Casbin enforcer: model file + policies stored in the database by sqlalchemy-adapter."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import casbin
from sqlalchemy_adapter import Adapter

from core.db import get_engine
from core.models import CasbinRule

MODEL_PATH = Path(__file__).with_name("rbac_model.conf")

# What each role may do inside a department. Deny by default: nothing else is allowed.
ROLE_PERMISSIONS: dict[str, tuple[str, ...]] = {
    "reader": ("read",),
    "editor": ("read", "upload", "delete"),
    "compliance": ("export_audit",),
    "admin": ("manage",),
}


@lru_cache
def get_enforcer(database_url: str) -> casbin.SyncedEnforcer:
    """The process's enforcer for a database; role permissions are seeded idempotently."""
    adapter = Adapter(get_engine(database_url), db_class=CasbinRule, create_table=False)
    enforcer = casbin.SyncedEnforcer(str(MODEL_PATH), adapter)
    _seed_role_permissions(enforcer)
    return enforcer


def _seed_role_permissions(enforcer: casbin.SyncedEnforcer) -> None:
    wanted = [[role, action] for role, actions in ROLE_PERMISSIONS.items() for action in actions]
    missing = [rule for rule in wanted if not enforcer.has_policy(*rule)]
    if missing:
        enforcer.add_policies(missing)
