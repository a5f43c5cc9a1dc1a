"""The policy enforcer: Casbin RBAC with domains, reloaded whenever the stored policy version moves.

Every process keeps the whole policy (Casbin rules and clearances) in memory and compares the
version row in the database with its own: at most every `check_seconds` on ordinary checks, and
on every query (`refresh(force=True)`), so a revoked role stops working on the next query in every
process. Policy rows are only ever written through authz.service, in the same transaction as the
version bump and the admin audit event; the in-memory copy is never edited directly.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import casbin
from casbin import persist
from casbin.model import fast_policy_filter
from sqlalchemy.orm import Session
from sqlalchemy_adapter import Adapter

from authz import repository
from authz.identity import ROLE_PREFIX
from core import forksafe
from core.db import get_engine
from core.models import CasbinRule
from ingestion.schemas import Classification

MODEL_PATH = Path(__file__).with_name("rbac_model.conf")
logger = logging.getLogger(__name__)
__all__ = ["ROLE_PERMISSIONS", "ROLE_PREFIX", "PolicyEnforcer", "get_enforcer", "rank"]

# Built-in roles (seeded by migration 0003). Deny by default: nothing else is allowed.
ROLE_PERMISSIONS: dict[str, tuple[str, ...]] = {
    "reader": ("read",),
    "editor": ("read", "upload", "delete"),
    "compliance": ("export_audit",),
    "privacy_officer": ("read", "reveal"),
    "admin": ("manage",),
}


# Casbin reloads stored rows from "ptype, v0, v1, …" text split on commas outside ( ) and [ ], and trims each value: a
# value holding one of these, or spaces at either end, cannot come back as stored (one stopped every policy load).
_BREAKS_POLICY_TEXT = frozenset(",()[]")
UNLOADABLE_ROW = ("stored before such names were refused: a value holds ',', '(', ')', '[' or ']' or spaces at "
                  "either end, so the policy leaves it out and it grants nothing; revoke it")


def rank(level: str) -> int:
    """The order of a classification or clearance level (public 0 … restricted 3)."""
    return Classification(level).rank


_MAX_REMEMBERED_DECISIONS = 100_000  # per policy version; beyond it, start again (memory stays bounded)


class _PolicyAdapter(Adapter):
    """The SQLAlchemy adapter, except that a stored row Casbin's text reload cannot give back as stored (stored before
    such names were refused) is left out, so it grants nothing, and kept in `unloadable` for the listings."""

    unloadable: tuple[tuple[str, ...], ...] = ()

    def load_policy(self, model: Any) -> None:
        with Session(self._engine) as session:
            rows = repository.policy_rows(session)
        unloadable = []
        for row in rows:
            if all(_survives_policy_text(value) for value in row):
                persist.load_policy_line(", ".join(row), model)
            else:
                unloadable.append(row)
        self.unloadable = tuple(unloadable)
        if unloadable:
            logger.warning("%d stored policy rows cannot be loaded and grant nothing until revoked (the listings of "
                           "role assignments and group mappings mark them invalid)", len(unloadable))


def _survives_policy_text(value: str) -> bool:
    return value == value.strip() and not _BREAKS_POLICY_TEXT.intersection(value)


@dataclass(frozen=True)
class Grant:
    """What one principal holds in one department: its roles (inherited included) and their actions."""

    roles: tuple[str, ...]
    actions: frozenset[str]


@dataclass(frozen=True)
class Snapshot:
    """One policy version as loaded; swapped whole, so one decision never mixes two versions."""

    version: int = 0
    grants: dict[str, dict[str, Grant]] = field(default_factory=dict)  # principal → department → grant
    clearances: dict[tuple[str, str], str] = field(default_factory=dict)  # (principal, department) → level
    permissions: tuple[tuple[str, str], ...] = ()  # (action, role:<name>)
    departments: frozenset[str] = frozenset()  # those that exist (creating one moves the version)
    decisions: dict[tuple[str, str, str], bool] = field(default_factory=dict)  # Casbin's answers, this version
    unloadable: tuple[tuple[str, ...], ...] = ()  # stored rows left out of the policy: (ptype, v0, v1, …)


@dataclass(frozen=True)
class ReadDecision:
    """Where a caller may read, with its clearance rank and roles there, under one policy version."""

    version: int
    clearance_by_department: dict[str, int]
    roles_by_department: dict[str, tuple[str, ...]]


class PolicyEnforcer:
    """Thread-safe decisions over one database's policy; FastEnforcer behind one lock."""

    def __init__(self, database_url: str, *, default_clearance: str = "internal", check_seconds: float = 0.5) -> None:
        self._engine = get_engine(database_url)
        self._adapter = _PolicyAdapter(self._engine, db_class=CasbinRule, create_table=False)
        # FastEnforcer filters policies in place during enforce, so every call holds the lock.
        self._casbin = casbin.FastEnforcer(str(MODEL_PATH), self._adapter, cache_key_order=[0])
        self._lock = threading.Lock()
        self._reload_lock = threading.Lock()  # one reload at a time, so none installs a version older than loaded
        self._default_rank = rank(default_clearance)
        self._check_seconds = check_seconds
        self._checked_at = float("-inf")
        self._snapshot = Snapshot()
        forksafe.renewed(self, PolicyEnforcer._forked)
        self.refresh(force=True)

    def _forked(self) -> None:
        """In a forked child: locks of its own; and, where a thread of the parent held the lock (Casbin's policy
        may be half loaded, or filtered in place by `matched_rule`), nothing granted until the next refresh loads the
        policy again."""
        if self._lock.locked():
            self._snapshot, self._checked_at = Snapshot(version=-1), float("-inf")
        self._lock, self._reload_lock = threading.Lock(), threading.Lock()

    @property
    def version(self) -> int:
        """The policy version this process decides with."""
        return self._snapshot.version

    @property
    def max_inheritance_links(self) -> int:
        """The longest role-inheritance chain Casbin's matcher follows, read from its role manager: its
        max_hierarchy_level counts the subject itself and its granted role, then one level per inherited role."""
        return int(self._casbin.get_role_manager().max_hierarchy_level) - 2

    def refresh(self, *, force: bool = False, session: Session | None = None) -> int:
        """Reload if the stored version moved; read the database at most every check_seconds unless forced.

        `session`, when given, is the caller's (one connection per request instead of two)."""
        now = time.monotonic()
        if not force and now - self._checked_at < self._check_seconds:
            return self._snapshot.version
        stored = self._stored_version(session)
        self._checked_at = now
        if stored != self._snapshot.version:
            self._reload()
        return self._snapshot.version

    def _stored_version(self, session: Session | None) -> int:
        if session is not None:
            return repository.policy_version(session)
        with Session(self._engine) as own:
            return repository.policy_version(own)

    def _reload(self) -> None:
        """Load the stored policy unless its version is loaded already. The version is read again under the reload
        lock: a thread that saw an older version, then waited while another loaded a newer one, installs nothing."""
        with self._reload_lock, Session(self._engine) as session:
            version = repository.policy_version(session)
            if version != self._snapshot.version:
                self._load(session, version)

    def _load(self, session: Session, version: int) -> None:
        """Read the policy and install it as `version`, read before it: the rules are never older than their label."""
        clearances = repository.clearance_levels(session)
        permissions = tuple(repository.permission_rows(session))
        departments = frozenset(repository.department_names(session))
        with self._lock:
            self._casbin.load_policy()
            self._snapshot = Snapshot(version=version, grants=self._index_grants(permissions),
                                      clearances=clearances, permissions=permissions, departments=departments,
                                      unloadable=self._adapter.unloadable)

    def _index_grants(self, permissions: tuple[tuple[str, str], ...]) -> dict[str, dict[str, Grant]]:
        """principal → department → roles and permissions, resolved once per policy version (lock held)."""
        by_role: dict[str, set[str]] = {}
        for action, role in permissions:
            by_role.setdefault(role, set()).add(action)
        index: dict[str, dict[str, Grant]] = {}
        for subject, _role, department in self._casbin.get_grouping_policy():
            if subject.startswith(ROLE_PREFIX) or department in index.get(subject, {}):
                continue
            roles = set(self._casbin.get_implicit_roles_for_user(subject, department))
            allowed = frozenset(a for r in roles for a in by_role.get(r, ()))
            index.setdefault(subject, {})[department] = Grant(
                roles=tuple(sorted(r[len(ROLE_PREFIX):] for r in roles if r.startswith(ROLE_PREFIX))),
                actions=allowed)
        return index

    def read_decision(self, subjects: tuple[str, ...]) -> ReadDecision:
        """Existing departments where any principal may read, with clearance and roles, from one snapshot."""
        snap = self._snapshot
        roles: dict[str, set[str]] = {}
        for subject in subjects:
            for department, grant in snap.grants.get(subject, {}).items():
                if "read" in grant.actions and department in snap.departments:
                    roles.setdefault(department, set())
        for subject in subjects:
            for department, grant in snap.grants.get(subject, {}).items():
                if department in roles:
                    roles[department].update(grant.roles)
        return ReadDecision(
            version=snap.version,
            clearance_by_department={d: self._clearance(snap, subjects, d) for d in roles},
            roles_by_department={d: tuple(sorted(r)) for d, r in roles.items()})

    def enforce(self, subject: str, department: str, action: str) -> bool:
        """Whether this one principal holds a role granting `action` in `department`.

        Casbin's matcher answers once per request shape and policy version; the answer is kept with the
        snapshot it was given under, so a reload starts from nothing (Casbin's own enforce costs ~1 ms)."""
        key = (subject, department, action)
        with self._lock:
            decisions = self._snapshot.decisions
            if key not in decisions:
                if len(decisions) >= _MAX_REMEMBERED_DECISIONS:
                    decisions.clear()
                decisions[key] = bool(self._casbin.enforce(action, subject, department))
            return decisions[key]

    def matched_rule(self, subject: str, department: str, action: str) -> list[str]:
        """The permission row that allowed the request, or [] when none did."""
        with self._lock, fast_policy_filter(self._casbin.model.model["p"]["p"].policy, action):
            allowed, rule = self._casbin.enforce_ex(action, subject, department)
        return list(rule) if allowed else []

    def roles(self, subject: str, department: str) -> list[str]:
        """Roles (inherited ones included) that one principal holds in a department, unprefixed."""
        with self._lock:
            implicit = self._casbin.get_implicit_roles_for_user(subject, department)
        return sorted({r[len(ROLE_PREFIX):] for r in implicit if r.startswith(ROLE_PREFIX)})

    def clearance_rank(self, subjects: tuple[str, ...], department: str) -> int:
        """The highest clearance any of the principals holds in the department, else the default."""
        return self._clearance(self._snapshot, subjects, department)

    def _clearance(self, snap: Snapshot, subjects: tuple[str, ...], department: str) -> int:
        levels = [snap.clearances.get((subject, department)) for subject in subjects]
        return max([rank(level) for level in levels if level], default=self._default_rank)

    def grouping_rows(self) -> list[list[str]]:
        """Every g row: [subject or role:<name>, role:<name>, department]."""
        with self._lock:
            return [list(row) for row in self._casbin.get_grouping_policy()]

    def unloadable_grouping_rows(self) -> list[list[str]]:
        """Every stored g row left out of the policy (`UNLOADABLE_ROW`): [subject, role:<name>, department]."""
        return [list(row[1:]) for row in self._snapshot.unloadable if row[0] == "g" and len(row) == 4]

    def permission_rows(self) -> list[list[str]]:
        """Every p row: [action, role:<name>] (kept at load: FastPolicy cannot be listed unfiltered)."""
        return [list(row) for row in self._snapshot.permissions]

    def clearances(self) -> dict[tuple[str, str], str]:
        """(subject, department) → level, as loaded."""
        return dict(self._snapshot.clearances)


@lru_cache
def get_enforcer(database_url: str, default_clearance: str = "internal",
                 check_seconds: float = 0.5) -> PolicyEnforcer:
    """The process's enforcer for a database."""
    return PolicyEnforcer(database_url, default_clearance=default_clearance, check_seconds=check_seconds)
