"""Department, policy-row, clearance and policy-version queries (the only place they are written)."""

from __future__ import annotations

from sqlalchemy import ColumnElement, delete, select, update
from sqlalchemy.orm import Session

from authz.identity import ROLE_PREFIX
from core.models import CasbinRule, Clearance, Department, PolicyState


def department_names(session: Session) -> list[str]:
    """All department names, sorted."""
    return list(session.scalars(select(Department.name).order_by(Department.name)))


def department_exists(session: Session, name: str) -> bool:
    """Whether a department of that name exists."""
    return session.scalar(select(Department.id).where(Department.name == name)) is not None


def add_department(session: Session, name: str) -> None:
    """Insert a department row."""
    session.add(Department(name=name))
    session.flush()


# --- policy rows, clearances and the policy version (issue 4) ---

# Built once: every query runs it (a statement built per call costs its construction and cache key).
_POLICY_VERSION = select(PolicyState.version).where(PolicyState.id == 1)


def policy_version(session: Session) -> int:
    """The stored policy version (1 after migration)."""
    return int(session.scalar(_POLICY_VERSION) or 0)


def bump_policy_version(session: Session) -> int:
    """Raise the version by one in the caller's transaction (the row lock orders concurrent changes)."""
    session.execute(update(PolicyState).where(PolicyState.id == 1).values(version=PolicyState.version + 1))
    return policy_version(session)


def _rule_filter(ptype: str, values: tuple[str, ...]) -> list[ColumnElement[bool]]:
    columns = (CasbinRule.v0, CasbinRule.v1, CasbinRule.v2)
    return [CasbinRule.ptype == ptype, *(column == value for column, value in zip(columns, values, strict=False))]


def rule_exists(session: Session, ptype: str, *values: str) -> bool:
    """Whether a Casbin row with exactly these leading values exists."""
    return session.scalar(select(CasbinRule.id).where(*_rule_filter(ptype, values)).limit(1)) is not None


def add_rule(session: Session, ptype: str, *values: str) -> bool:
    """Insert a Casbin row; False when it is already there."""
    if rule_exists(session, ptype, *values):
        return False
    session.add(CasbinRule(ptype=ptype, **{f"v{i}": value for i, value in enumerate(values)}))
    session.flush()
    return True


def remove_rules(session: Session, ptype: str, *values: str) -> int:
    """Delete Casbin rows matching the leading values; how many went."""
    result = session.execute(delete(CasbinRule).where(*_rule_filter(ptype, values)))
    return int(getattr(result, "rowcount", 0) or 0)


def clearance_levels(session: Session) -> dict[tuple[str, str], str]:
    """Every explicit clearance: (subject, department) → level."""
    rows = session.execute(select(Clearance.subject, Clearance.department, Clearance.level))
    return {(subject, department): level for subject, department, level in rows}


def set_clearance(session: Session, subject: str, department: str, level: str) -> None:
    """Insert or replace a subject's clearance in a department."""
    row = session.scalar(select(Clearance).where(Clearance.subject == subject, Clearance.department == department))
    if row is None:
        session.add(Clearance(subject=subject, department=department, level=level))
    else:
        row.level = level
    session.flush()


def delete_clearance(session: Session, subject: str, department: str) -> bool:
    """Remove a clearance; False when none was set."""
    result = session.execute(delete(Clearance).where(Clearance.subject == subject, Clearance.department == department))
    return bool(getattr(result, "rowcount", 0))


def policy_rows(session: Session) -> list[tuple[str, ...]]:
    """Every Casbin row as (ptype, v0, v1, …), empty columns left out (as the adapter's text form leaves them)."""
    columns = (CasbinRule.ptype, CasbinRule.v0, CasbinRule.v1, CasbinRule.v2, CasbinRule.v3, CasbinRule.v4,
               CasbinRule.v5)
    return [tuple(str(value) for value in row if value is not None)
            for row in session.execute(select(*columns).order_by(CasbinRule.id))]


def permission_rows(session: Session) -> list[tuple[str, str]]:
    """Every (action, role:<name>) permission row."""
    rows = session.execute(select(CasbinRule.v0, CasbinRule.v1).where(CasbinRule.ptype == "p"))
    return [(str(action), str(role)) for action, role in rows]


def inheritance_links(session: Session, department: str) -> list[tuple[str, str]]:
    """Every (role:<name>, inherited role:<name>) link of a department's role hierarchy."""
    rows = session.execute(select(CasbinRule.v0, CasbinRule.v1).where(
        CasbinRule.ptype == "g", CasbinRule.v2 == department, CasbinRule.v0.startswith(ROLE_PREFIX)))
    return [(str(role), str(inherits)) for role, inherits in rows]


def role_in_use(session: Session, role: str) -> bool:
    """Whether any grouping row grants or inherits the role."""
    query = select(CasbinRule.id).where(CasbinRule.ptype == "g", (CasbinRule.v0 == role) | (CasbinRule.v1 == role))
    return session.scalar(query.limit(1)) is not None
