"""The embedded SQLite ledger shared by processes: `govrag audit export|purge|checkpoint` (from cron) append to
the chain while `govrag serve` runs; an append never reads a chain end another process is about to move."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy.orm import Session

from audit import repository
from audit import service as audit_service
from audit.schemas import AdminEventType
from authz.identity import Identity
from core import migrate
from core.db import get_session_factory
from core.models import RetrievalEvent
from core.settings import Settings

ADMIN = Identity(subject="root-admin", groups=(), is_platform_admin=True)
WORKTREE = Path(__file__).resolve().parents[2]

# Another process appending an admin event; it waits at most 0.2 s for the database's write lock, then reports.
OTHER_PROCESS = """
import sys
from sqlalchemy import event
from audit import service as audit_service
from authz.identity import Identity
from core.db import get_engine, get_session_factory
from core.errors import GovragError
from core.settings import Settings
settings = Settings(data_dir=sys.argv[1], database_url=sys.argv[2], audit_checkpoint_every=0)
event.listen(get_engine(sys.argv[2]), "connect", lambda connection, _: connection.execute("PRAGMA busy_timeout=200"))
try:
    with get_session_factory(sys.argv[2])() as session:
        audit_service.record_admin_event(session=session, identity=Identity("cli:ops", (), True),
                                         event_type="export", settings=settings)
    print("committed")
except GovragError as exc:
    print(exc.code.name)
"""


def _append_from_other_process(settings: Settings) -> str:
    """Run the other process to its end; what became of its append."""
    done = subprocess.run([sys.executable, "-c", OTHER_PROCESS, str(settings.data_dir),  # noqa: S603 (fixed argv)
                           settings.resolved_database_url], cwd=WORKTREE, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def _record_kill_switch(settings: Settings, mode: str) -> None:
    with get_session_factory(settings.resolved_database_url)() as session:
        audit_service.record_admin_event(session=session, identity=ADMIN, event_type=AdminEventType.kill_switch,
                                         details={"mode": mode}, settings=settings)


def test_another_process_cannot_append_between_reading_the_chain_end_and_inserting(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    migrate.upgrade(url)
    settings = Settings(data_dir=tmp_path, database_url=url, audit_checkpoint_every=0)
    _record_kill_switch(settings, "normal")
    real_add_events = repository.add_events
    outcomes: list[str] = []

    def add_events_after_other_process(session: Session, events: list[RetrievalEvent]) -> None:
        if not outcomes:  # this process has read the chain end and not yet inserted
            outcomes.append(_append_from_other_process(settings))
        real_add_events(session, events)

    monkeypatch.setattr(repository, "add_events", add_events_after_other_process)
    _record_kill_switch(settings, "disabled")
    monkeypatch.setattr(repository, "add_events", real_add_events)
    outcomes.append(_append_from_other_process(settings))  # once this process has committed
    assert outcomes == ["unavailable", "committed"]
    with get_session_factory(url)() as session:
        result = audit_service.verify(session=session, settings=settings)
    assert result.ok is True and result.checked == 3, result
