"""Department queries (the only place they are written)."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from core.models import Department


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
