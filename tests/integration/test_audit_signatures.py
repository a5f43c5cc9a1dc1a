"""Checkpoints bound to the deployment, on PostgreSQL and SQLite."""

from __future__ import annotations

import base64
import shutil
from collections.abc import Callable, Iterator
from datetime import UTC, timedelta
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr
from sqlalchemy import insert, select, text

from audit import service as audit_service
from audit.schemas import Decision, RetrievalRecord
from core import migrate
from core.db import get_engine, get_session_factory, unit_of_work
from core.models import AuditCheckpoint, RetrievalEvent, utcnow
from core.settings import Settings
from tests.support.legacy_checkpoint import add_v1_checkpoint

SHARED_KEY = base64.b64encode(b"k" * 32).decode()  # two deployments configured with one checkpoint key


@pytest.fixture(scope="module")
def pg_ledger_url(make_pg_database: Callable[[], str]) -> str:
    """A migrated PostgreSQL database of this module's own (these tests tamper with it)."""
    url = make_pg_database()
    migrate.upgrade(url)
    return url


def _deployment(kind: str, folder: Path, pg_url: str | None, **settings: object) -> Settings:
    """An empty ledger on PostgreSQL (the module's database, emptied) or on a fresh SQLite file in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    if kind == "pg":
        assert pg_url is not None
        with unit_of_work(pg_url) as session:
            session.execute(text("TRUNCATE retrieval_events, audit_checkpoints, wrapped_keys RESTART IDENTITY"))
            session.commit()
        url = pg_url
    else:
        url = f"sqlite:///{folder / 'ledger.db'}"
        migrate.upgrade(url)
    return Settings(data_dir=folder, database_url=url, audit_checkpoint_every=5, **settings)  # type: ignore[arg-type]


@pytest.fixture(params=["pg", "sqlite"])
def ledger(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Settings]:
    pg_url = request.getfixturevalue("pg_ledger_url") if request.param == "pg" else None
    settings = _deployment(request.param, tmp_path / "a", pg_url)
    yield settings
    get_engine(settings.resolved_database_url).dispose()


def _record(n: int) -> RetrievalRecord:
    return RetrievalRecord(
        request_id=f"req-{n}", subject="alice", groups=["hr-staff"], departments_requested=["hr"],
        departments_searched=["hr"], decision=Decision.answered, reason=None, question_masked=f"question {n}",
        purpose="test", latency_ms=1.5, roles=["reader@hr"], policy_version="7",
        chunks=[{"document_id": "doc-1", "chunk_id": f"doc-1:{n}", "score": 0.8, "cited": True,
                 "content_sha256": "a" * 64}])


def _append(settings: Settings, count: int) -> None:
    with get_session_factory(settings.resolved_database_url)() as session:
        for n in range(count):
            audit_service.record_retrieval(session=session, record=_record(n), settings=settings)


def _copy_ledger(source: Settings, target: Settings) -> None:
    """Every ledger row and checkpoint of `source`, and its mirror file, put in place of `target`'s."""
    def rows(table: Any) -> list[dict[str, Any]]:  # times in UTC, as signed (SQLite hands back naive ones)
        found = [dict(row._mapping) for row in reading.execute(select(*table.__table__.columns))]
        return [row | {"created_at": row["created_at"].replace(tzinfo=UTC)} for row in found]

    with unit_of_work(source.resolved_database_url) as reading:
        events, checkpoints = rows(RetrievalEvent), rows(AuditCheckpoint)
    with unit_of_work(target.resolved_database_url) as writing:
        writing.execute(insert(RetrievalEvent), events)
        writing.execute(insert(AuditCheckpoint), checkpoints)
        writing.commit()
    shutil.copyfile(source.resolved_checkpoint_file, target.resolved_checkpoint_file)


def _keyed(settings: Settings, key: str) -> Settings:
    """The same deployment with GOVRAG_AUDIT_CHECKPOINT_KEY set."""
    return settings.model_copy(update={"audit_checkpoint_key": SecretStr(key)})


def _other(tmp_path: Path, **settings: object) -> Settings:
    return _deployment("sqlite", tmp_path / "b", None, **settings)


def test_a_ledger_copied_from_another_deployment_sharing_the_key_fails_verification(ledger: Settings,
                                                                                    tmp_path: Path) -> None:
    """Checkpoints signed the chain's position only: a deployment's ledger replaced by another's (rows, checkpoints
    and mirror, one checkpoint key configured for both) verified as its own. They now sign the deployment id."""
    ours = _keyed(ledger, SHARED_KEY)
    theirs = _other(tmp_path, audit_checkpoint_key=SHARED_KEY)
    _append(theirs, 6)
    _copy_ledger(theirs, ours)
    with unit_of_work(ours.resolved_database_url) as session:
        result = audit_service.verify(session=session, settings=ours)
    assert (result.ok, result.reason) == (False, "checkpoint_signature_invalid")
    with unit_of_work(theirs.resolved_database_url) as session:
        assert audit_service.verify(session=session, settings=theirs).ok


def test_checkpoints_signed_before_the_deployment_id_still_verify_and_later_ones_must_carry_it(
        tmp_path: Path) -> None:
    """A ledger checkpointed at revision 0015 verifies after the upgrade; an unbound (v1) checkpoint dated after the
    id was minted (another deployment sharing the key, still on the old release) is not taken."""
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    migrate.upgrade(url, "0015")
    settings = Settings(data_dir=tmp_path, database_url=url, audit_checkpoint_every=0)
    _append(settings, 3)
    add_v1_checkpoint(settings, at=2, created_at=utcnow().replace(microsecond=0) - timedelta(minutes=1))
    migrate.upgrade(url)
    with unit_of_work(url) as session:
        result = audit_service.verify(session=session, settings=settings)
    assert (result.ok, result.checkpoints_checked) == (True, 1)
    add_v1_checkpoint(settings, at=3, created_at=utcnow().replace(microsecond=0) + timedelta(minutes=1))
    with unit_of_work(url) as session:
        result = audit_service.verify(session=session, settings=settings)
    assert (result.ok, result.reason, result.first_broken) == (False, "checkpoint_signature_invalid", 3)
    get_engine(url).dispose()
