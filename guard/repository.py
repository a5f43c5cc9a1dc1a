"""Queries of the guard domain: the guard_controls rows."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from core.db import transaction_lock
from core.models import GuardControl


def all_controls(session: Session) -> list[GuardControl]:
    """Every scope's row."""
    return list(session.scalars(select(GuardControl)))


def get_or_create(session: Session, scope: str) -> GuardControl:
    """The row of `scope`, added to the session if it did not exist (the caller commits). Changes of one scope run
    one after the other: two admins pulling the same kill switch at once both succeed, the second recording the
    first's mode as the previous one."""
    transaction_lock(session, f"guard:{scope}")
    # populate_existing: a row this session already holds (kept across commits) takes the values read under the lock
    query = select(GuardControl).where(GuardControl.scope == scope).execution_options(populate_existing=True)
    row = session.scalars(query).first()
    if row is None:
        row = GuardControl(scope=scope, kill_mode="normal", updated_by="")
        session.add(row)
        session.flush()
    return row
