"""Tamper evidence on PostgreSQL: edits, deletes, reorders and tail cuts are detected; retention is a signed purge."""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import select, text
from sqlalchemy.orm import Session

from audit import integrity
from audit import service as audit_service
from audit.integrity import event_hash
from audit.schemas import AdminEventType, Decision, ExportFilters, ExportFormat, RetrievalRecord
from authz.identity import Identity
from bench.common import libpq_dsn
from core import migrate
from core.db import get_session_factory
from core.errors import unavailable_dependency
from core.models import AuditCheckpoint, RetrievalEvent, utcnow
from core.settings import Settings
from tests.conftest import allow_connections

ADMIN = Identity(subject="root-admin", groups=(), is_platform_admin=True)
AUDIT_DOC = Path(__file__).resolve().parents[2] / "docs" / "audit.md"


@pytest.fixture(scope="module")
def ledger_url(make_pg_database: Callable[[], str]) -> str:
    """A migrated PostgreSQL database of this module's own (these tests tamper with it)."""
    url = make_pg_database()
    migrate.upgrade(url)
    return url


@pytest.fixture
def ledger(ledger_url: str, tmp_path: Path) -> Iterator[Settings]:
    """An empty ledger (ids from 1) and a fresh checkpoint mirror file for each test; no stored keys or master key
    verifiers either: each test's data dir has a master key of its own, which what an earlier test's master key
    sealed does not open (a CLI command would refuse it)."""
    settings = Settings(data_dir=tmp_path, database_url=ledger_url, audit_checkpoint_every=5)
    _sql(settings, "TRUNCATE retrieval_events, audit_checkpoints, wrapped_keys, master_key_verifiers RESTART IDENTITY")
    yield settings


def _record(n: int, *, subject: str = "alice", document_id: str = "doc-1") -> RetrievalRecord:
    return RetrievalRecord(
        request_id=f"req-{n}", subject=subject, groups=["hr-staff"], departments_requested=[],
        departments_searched=["hr"], decision=Decision.answered, reason=None, question_masked=f"question {n}",
        purpose="test", latency_ms=1.5, roles=["reader@hr"], policy_version="7",
        guard_verdicts={"firewall": {"verdict": "allow", "score": 0.01}}, model_backend="extractive",
        model_id="none", kill_switch_mode="normal",
        chunks=[{"document_id": document_id, "chunk_id": f"{document_id}:0", "score": 0.8, "cited": True,
                 "content_sha256": "a" * 64}])


def _append(settings: Settings, count: int) -> None:
    with get_session_factory(settings.resolved_database_url)() as session:
        for n in range(count):
            audit_service.record_retrieval(session=session, record=_record(n), settings=settings)


def _verify(settings: Settings) -> dict[str, object]:
    with get_session_factory(settings.resolved_database_url)() as session:
        return audit_service.verify(session=session, settings=settings).model_dump()


def _sql(settings: Settings, statement: str) -> None:
    dsn = libpq_dsn(settings.resolved_database_url)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(statement)  # type: ignore[arg-type]


def test_an_untouched_chain_verifies_and_carries_the_new_fields(ledger: Settings) -> None:
    _append(ledger, 12)
    with get_session_factory(ledger.resolved_database_url)() as session:
        audit_service.record_admin_event(session=session, identity=ADMIN, event_type=AdminEventType.kill_switch,
                                         details={"mode": "retrieval_only"}, settings=ledger)
    result = _verify(ledger)
    assert uuid.UUID(str(result.pop("deployment_id")))  # minted by the migration, signed into every checkpoint
    assert result == {"ok": True, "checked": 13, "first_broken": None, "reason": None, "checkpoints_checked": 6,
                      "purged_through": None, "unanchored": 0,
                      "mirror_line": None}  # at rows 5, 10 and the admin action, each mirrored


def test_verify_counts_the_rows_past_the_newest_checkpoint(ledger: Settings) -> None:
    """Rows past the newest signed checkpoint can be cut or changed unseen: verify says how many there are, so the
    exposure shows (and a checkpoint, signed on demand, takes it to 0)."""
    _append(ledger, 8)  # signed at row 5
    assert {k: _verify(ledger)[k] for k in ("ok", "checked", "unanchored")} == {"ok": True, "checked": 8,
                                                                                 "unanchored": 3}
    with get_session_factory(ledger.resolved_database_url)() as session:
        audit_service.checkpoint_now(session=session, settings=ledger)
    _sql(ledger, "DELETE FROM audit_checkpoints")  # the mirror still has it
    assert {k: _verify(ledger)[k] for k in ("ok", "unanchored")} == {"ok": True, "unanchored": 0}


def test_editing_a_row_is_detected(ledger: Settings) -> None:
    _append(ledger, 8)
    _sql(ledger, "UPDATE retrieval_events SET subject = 'mallory' WHERE id = 3")
    result = _verify(ledger)
    assert (result["ok"], result["checked"], result["first_broken"], result["reason"]) == (
        False, 2, 3, "content_changed")


def test_editing_a_json_field_is_detected(ledger: Settings) -> None:
    _append(ledger, 4)
    _sql(ledger, """UPDATE retrieval_events SET guard_verdicts = '{"firewall": {"verdict": "block"}}' WHERE id = 2""")
    result = _verify(ledger)
    assert (result["ok"], result["first_broken"]) == (False, 2)


def test_deleting_a_row_is_detected(ledger: Settings) -> None:
    _append(ledger, 8)
    _sql(ledger, "DELETE FROM retrieval_events WHERE id = 4")
    result = _verify(ledger)
    assert (result["ok"], result["first_broken"], result["reason"]) == (False, 5, "chain_link_broken")


def test_reordering_rows_is_detected(ledger: Settings) -> None:
    _append(ledger, 8)
    _sql(ledger, "UPDATE retrieval_events SET id = -1 WHERE id = 3; UPDATE retrieval_events SET id = 3 WHERE id = 4;"
                 "UPDATE retrieval_events SET id = 4 WHERE id = -1")
    result = _verify(ledger)
    assert (result["ok"], result["first_broken"]) == (False, 3)


def test_truncating_the_tail_is_detected_by_the_signed_checkpoint(ledger: Settings) -> None:
    _append(ledger, 12)  # checkpoints at 5 and 10
    _sql(ledger, "DELETE FROM retrieval_events WHERE id > 7")
    result = _verify(ledger)
    assert (result["ok"], result["first_broken"], result["reason"]) == (False, 10, "checkpointed_rows_missing")


def test_a_mirror_line_that_cannot_be_written_is_counted_for_the_alert_and_the_retrieval_still_recorded(
        ledger: Settings, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A checkpoint the mirror file could not take was only logged: in the database alone, a database writer can delete
    it unseen, and no monitor was told. It is now counted (govrag_audit_mirror_write_failures_total, alert
    GovragAuditMirrorWriteFailures); the retrieval is still recorded and returns, the checkpoint in the database.
    The warning names neither the file nor its folder."""
    from core.metrics import REGISTRY

    blocked = tmp_path / "not-a-folder"
    blocked.write_text("")
    settings = ledger.model_copy(update={"audit_checkpoint_file": blocked / "mirror.jsonl"})

    def failures() -> float:
        return REGISTRY.get_sample_value("govrag_audit_mirror_write_failures_total") or 0.0

    before = failures()
    _append(settings, 5)  # signed at row 5: its mirror line fails
    assert failures() == before + 1
    assert {k: _verify(settings)[k] for k in ("ok", "checked", "checkpoints_checked")} == {
        "ok": True, "checked": 5, "checkpoints_checked": 1}
    warned = [r.getMessage() for r in caplog.records if "audit checkpoint mirror" in r.getMessage()]
    assert warned == ["could not append to the audit checkpoint mirror file (FileExistsError): the checkpoint at "
                      "event 5 is in the database only"]
    assert str(tmp_path) not in caplog.text


def test_truncating_tail_and_checkpoints_is_caught_by_the_mirror_file(ledger: Settings) -> None:
    _append(ledger, 12)
    _sql(ledger, "DELETE FROM retrieval_events WHERE id > 7; DELETE FROM audit_checkpoints WHERE last_event_id > 7")
    assert _verify(ledger)["ok"] is False


def test_rewriting_the_whole_chain_without_the_key_is_detected(ledger: Settings) -> None:
    _append(ledger, 6)
    with get_session_factory(ledger.resolved_database_url)() as session:  # forge: edit, then re-hash everything
        _rehash_after_edit(session)
    result = _verify(ledger)
    assert (result["ok"], result["reason"]) == (False, "checkpoint_mismatch")


def _rehash_after_edit(session: Session) -> None:
    previous = "0" * 64
    for event in session.scalars(select(RetrievalEvent).order_by(RetrievalEvent.id)):
        if event.id == 2:
            event.subject = "mallory"
        event.prev_hash = previous
        event.hash = event_hash(event)
        previous = event.hash
    session.commit()


def test_a_forged_checkpoint_is_detected(ledger: Settings) -> None:
    _append(ledger, 6)
    _sql(ledger, "UPDATE audit_checkpoints SET last_event_id = 4")
    result = _verify(ledger)
    assert (result["ok"], result["reason"]) == (False, "checkpoint_signature_invalid")


def test_an_admin_action_cut_from_the_tail_is_detected(ledger: Settings) -> None:
    """Rows past the newest signed checkpoint could be cut unseen: an insider granted a role, used it, and deleted
    both rows (and the checkpoints in the database) before the next checkpoint was due. An admin action is now
    signed as it is committed, so with it everything before it."""
    _append(ledger, 2)
    with get_session_factory(ledger.resolved_database_url)() as session:
        audit_service.record_admin_event(session=session, identity=ADMIN, event_type=AdminEventType.role_granted,
                                         details={"subject": "mallory", "role": "reader"}, settings=ledger)
    _append(ledger, 1)
    _sql(ledger, "DELETE FROM retrieval_events WHERE id >= 3; DELETE FROM audit_checkpoints")
    result = _verify(ledger)
    assert (result["ok"], result["first_broken"], result["reason"]) == (False, 3, "checkpointed_rows_missing")


@pytest.mark.parametrize("forged_id", [3, 0], ids=["below-the-purge-anchor", "id-0"])
def test_a_row_forged_where_the_chain_has_none_is_detected(ledger: Settings, forged_id: int) -> None:
    """Verify walked the rows past the signed purge anchor (and past id 0) only, while an export lists every row up
    to its end: a forged row at an id the purge had emptied was exported as a ledger event, and verify said ok."""
    _append(ledger, 6)
    settings = ledger.model_copy(update={"audit_retention_days": 30})
    with get_session_factory(ledger.resolved_database_url)() as session:
        assert audit_service.purge_expired(session=session, settings=settings, identity=ADMIN,
                                           now=utcnow() + timedelta(days=31)) == 6
        anchor = session.scalar(select(RetrievalEvent.prev_hash))  # the purge event's: the purged tail's hash
        forged = RetrievalEvent(id=forged_id, event_type="retrieval", created_at=utcnow(), prev_hash=anchor,
                                **vars(_record(7, subject="bob")))
        forged.hash = event_hash(forged)
        session.add(forged)
        session.commit()
    result = _verify(settings)
    assert (result["ok"], result["first_broken"], result["reason"]) == (False, forged_id, "chain_link_broken")


def _documented_export_check() -> Callable[..., dict[str, object]]:
    """`check_export` as docs/audit.md prints it for a recipient without the server."""
    snippet = re.search(r"^```python\n(.*?)^```", AUDIT_DOC.read_text(encoding="utf-8"), re.S | re.M)
    assert snippet is not None, "docs/audit.md's export check moved: update this test"
    namespace: dict[str, object] = {}
    exec(snippet.group(1), namespace)  # noqa: S102 - the documented code, as a reader would run it
    return namespace["check_export"]  # type: ignore[return-value]


def _rewritten(path: Path, rows: list[bytes]) -> Path:
    """The export with `rows` as its body and the manifest computed again, as whoever edits it would."""
    manifest = json.loads(path.read_bytes().split(b"\n")[-2])["manifest"]
    body = b"".join(row + b"\n" for row in rows)
    manifest.update(rows=len(rows), body_sha256=hashlib.sha256(body).hexdigest(),
                    first_hash=json.loads(rows[0])["hash"], last_hash=json.loads(rows[-1])["hash"])
    edited = path.with_name("edited.jsonl")
    edited.write_bytes(body + json.dumps({"manifest": manifest}).encode() + b"\n")
    return edited


def _export(settings: Settings, path: Path, *, scope: set[str] | None) -> Path:
    with get_session_factory(settings.resolved_database_url)() as session:
        path.write_text("".join(audit_service.export_events(
            session=session, settings=settings, identity=ADMIN, scope=scope, filters=ExportFilters(),
            fmt=ExportFormat.jsonl)), encoding="utf-8")
    return path


def test_an_export_checks_without_the_server_as_documented(ledger: Settings, tmp_path: Path) -> None:
    """docs/audit.md's check passes an untouched JSONL export (a line break inside a question, an admin row's
    details) and catches a row edited or removed even with the manifest computed again, or marked scoped so the
    links would go unchecked."""
    _append(ledger, 2)
    with get_session_factory(ledger.resolved_database_url)() as session:
        audit_service.record_admin_event(session=session, identity=ADMIN, event_type=AdminEventType.kill_switch,
                                         details={"mode": "retrieval_only"}, settings=ledger)
        audit_service.record_retrieval(session=session, settings=ledger,
                                       record=replace(_record(3), question_masked="caf\u00e9\u2028next line"))
    export = _export(ledger, tmp_path / "export.jsonl", scope=None)
    check = _documented_export_check()
    assert check(str(export), unfiltered=True)["rows"] == 4
    rows = export.read_bytes().split(b"\n")[:-2]
    edited = _rewritten(export, [rows[0], rows[1].replace(b'"alice"', b'"mallory"'), *rows[2:]])
    with pytest.raises(AssertionError, match="row 2 was changed"):
        check(str(edited), unfiltered=True)
    cut = _rewritten(export, [rows[0], *rows[2:]])
    with pytest.raises(AssertionError, match="a row is missing before row 3"):
        check(str(cut), unfiltered=True)
    cut.write_bytes(cut.read_bytes().replace(b'"departments": null', b'"departments": ["hr"]'))  # says scoped
    with pytest.raises(AssertionError, match="the export is scoped or filtered"):
        check(str(cut), unfiltered=True)


def test_a_department_scoped_export_says_so_and_checks_as_documented(ledger: Settings, tmp_path: Path) -> None:
    """A department compliance officer's export skips other departments' rows: its manifest used to name only the
    filters (none), so it read as an export of every event and the documented check reported rows missing."""
    _append(ledger, 1)
    with get_session_factory(ledger.resolved_database_url)() as session:
        audit_service.record_admin_event(session=session, identity=ADMIN, event_type=AdminEventType.kill_switch,
                                         details={"mode": "retrieval_only"}, settings=ledger)
    _append(ledger, 1)
    scoped = _export(ledger, tmp_path / "scoped.jsonl", scope={"hr", "finance"})
    check = _documented_export_check()
    manifest = check(str(scoped), unfiltered=False)
    assert (manifest["rows"], manifest["departments"], manifest["filters"]) == (2, ["finance", "hr"], {})
    with pytest.raises(AssertionError, match="the export is scoped or filtered"):  # not "a row is missing"
        check(str(scoped), unfiltered=True)
    assert check(str(_export(ledger, tmp_path / "all.jsonl", scope=None)), unfiltered=True)["departments"] is None


def _in_threads(work: Callable[[int], None], count: int = 8) -> None:
    """`work(0)` ... `work(count - 1)` at once, each in its own thread; every one returns, none raises."""
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            work(n)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,), daemon=True) for n in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not any(thread.is_alive() for thread in threads), "an append never returned"
    assert errors == []


def test_concurrent_appends_never_fork_the_chain(ledger: Settings) -> None:
    _in_threads(lambda _: _append(ledger, 10))
    assert _verify(ledger)["checked"] == 80
    assert _verify(ledger)["ok"] is True


def test_admin_actions_at_once_beside_queries_are_each_signed_and_mirrored_whole(ledger: Settings) -> None:
    """Every admin action signs a checkpoint as it commits: many at once, beside queries, each gets its own, in the
    database and as one whole line of the mirror (its appends are not serialised by the chain lock)."""
    def worker(n: int) -> None:
        _append(ledger, 3)
        with get_session_factory(ledger.resolved_database_url)() as session:
            audit_service.record_admin_event(session=session, identity=ADMIN, event_type=AdminEventType.reveal,
                                             details={"n": n}, settings=ledger)
        _append(ledger, 3)

    _in_threads(worker)
    with get_session_factory(ledger.resolved_database_url)() as session:
        admin_ids = set(session.scalars(select(RetrievalEvent.id).where(RetrievalEvent.decision == "admin")))
        signed = set(session.scalars(select(AuditCheckpoint.last_event_id)))
    mirrored = {json.loads(line)["last_event_id"] for line in ledger.resolved_checkpoint_file.read_text().splitlines()}
    assert len(admin_ids) == 8 and admin_ids <= signed and admin_ids <= mirrored
    assert {k: _verify(ledger)[k] for k in ("ok", "checked")} == {"ok": True, "checked": 56}


def _append_waiting_together(settings: Settings, records: list[RetrievalRecord]) -> list[str]:
    """Every record appended from its own thread, all queued before any may write: one group commit; each one's
    outcome, `committed` or the name of the error its caller got."""
    return [type(error).__name__ if error else "committed" for error in _errors_waiting_together(settings, records)]


def _errors_waiting_together(settings: Settings, records: list[RetrievalRecord]) -> list[Exception | None]:
    """Every record appended from its own thread, all queued before any may write: one group commit; the error each
    caller got, if any."""
    from audit.repository import local_chain_lock

    outcomes: list[Exception | None] = [None] * len(records)

    def worker(i: int) -> None:
        with get_session_factory(settings.resolved_database_url)() as session:
            try:
                audit_service.record_retrieval(session=session, record=records[i], settings=settings)
            except Exception as exc:  # noqa: BLE001 - reported in outcomes
                outcomes[i] = exc

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(len(records))]
    try:
        with local_chain_lock():  # nobody writes until all are waiting
            for thread in threads:
                thread.start()
            deadline = time.monotonic() + 30
            while len(audit_service._retrievals._waiting) < len(records) and time.monotonic() < deadline:
                time.sleep(0.01)
            assert len(audit_service._retrievals._waiting) == len(records)
    finally:
        for thread in threads:
            thread.join(60)
    assert not any(thread.is_alive() for thread in threads), "an append never returned"
    return outcomes


def test_events_waiting_together_are_committed_in_one_transaction(ledger: Settings) -> None:
    assert _append_waiting_together(ledger, [_record(n) for n in range(6)]) == ["committed"] * 6
    with get_session_factory(ledger.resolved_database_url)() as session:  # xmin: the inserting transaction
        transactions = session.execute(text("SELECT count(*), count(DISTINCT xmin::text) FROM retrieval_events"))
        assert tuple(transactions.one()) == (6, 1)
    assert _verify(ledger)["ok"] is True and _verify(ledger)["checked"] == 6


def test_one_bad_event_in_a_group_fails_only_its_own_request(ledger: Settings) -> None:
    records = [_record(n) for n in range(5)]
    records[2] = _record(2, subject="x" * 300)  # longer than the column: the database refuses this row
    outcomes = _append_waiting_together(ledger, records)
    assert outcomes == ["committed", "committed", "GovragError", "committed", "committed"]
    with get_session_factory(ledger.resolved_database_url)() as session:
        requests = sorted(session.scalars(select(RetrievalEvent.request_id)))
    assert requests == ["req-0", "req-1", "req-3", "req-4"]
    assert _verify(ledger)["ok"] is True


def test_every_request_of_a_group_a_database_outage_failed_is_told_the_database_is_unavailable(
        make_pg_database: Callable[[], str], tmp_path: Path) -> None:
    """The caller whose events rode in another caller's failed write got a bare `unavailable`, so
    `unavailable_dependency` (the API's 503 naming what is away, a run waiting the outage out) saw no database behind
    it. Now every caller of the group gets the error raised from that write's failure, with the same message."""
    url = make_pg_database()
    migrate.upgrade(url)
    database = url.rsplit("/", 1)[1]
    allow_connections(database, False)
    try:
        errors = _errors_waiting_together(Settings(data_dir=tmp_path, database_url=url), [_record(n) for n in range(3)])
    finally:
        allow_connections(database, True)
    assert [unavailable_dependency(error) for error in errors if error] == ["database"] * 3
    assert {str(error) for error in errors} == {audit_service.AUDIT_UNAVAILABLE}


@pytest.mark.parametrize("content", ["\ud800", "\x00"], ids=["lone-surrogate", "nul"])
def test_an_event_that_cannot_be_hashed_or_stored_fails_only_its_own_request(ledger: Settings,
                                                                            content: str) -> None:
    """Whichever caller writes the group, only the bad event's request fails, as `unavailable` (no raw error)."""
    bad = replace(_record(1), question_masked=f"question {content}")  # JSON "\ud800" parses to a lone surrogate
    assert _append_waiting_together(ledger, [bad]) == ["GovragError"]
    outcomes = _append_waiting_together(ledger, [_record(0), bad, _record(2), _record(3)])
    assert outcomes == ["committed", "GovragError", "committed", "committed"]
    with get_session_factory(ledger.resolved_database_url)() as session:
        requests = sorted(session.scalars(select(RetrievalEvent.request_id)))
    assert requests == ["req-0", "req-2", "req-3"]
    assert _verify(ledger)["ok"] is True


def test_retention_is_a_signed_audited_purge_and_verify_still_passes(ledger: Settings) -> None:
    _append(ledger, 6)
    time.sleep(0.05)
    boundary = utcnow()
    time.sleep(0.05)
    _append(ledger, 4)
    settings = ledger.model_copy(update={"audit_retention_days": 30})
    with get_session_factory(ledger.resolved_database_url)() as session:
        removed = audit_service.purge_expired(session=session, settings=settings, identity=ADMIN,
                                              now=boundary + timedelta(days=30))
    assert removed == 6
    result = _verify(settings)
    assert (result["ok"], result["checked"], result["purged_through"]) == (True, 5, 6)
    _sql(ledger, "DELETE FROM retrieval_events WHERE id = 7")  # a silent delete after the purge is still caught
    assert _verify(settings)["ok"] is False


def test_the_longest_retention_period_purges_nothing_recent(ledger: Settings) -> None:
    """The settings' upper bound (a century) is one the purge can compute a cutoff for."""
    _append(ledger, 3)
    settings = ledger.model_copy(update={"audit_retention_days": 36500})
    with get_session_factory(ledger.resolved_database_url)() as session:
        assert audit_service.purge_expired(session=session, settings=settings, identity=ADMIN) == 0
    assert _verify(settings)["checked"] == 3


def test_a_purge_of_every_row_on_sqlite_leaves_no_id_to_be_handed_out_again(tmp_path: Path) -> None:
    """SQLite (the embedded default; no AUTOINCREMENT) hands the highest id out again once its row is gone: after a
    purge of every row, its `retention_purge` event took id 1, it and the events after it up to the purged id went
    unchecked, and the first one past it was reported `chain_link_broken`. The event is now linked before the
    delete, in its transaction: the newest row is never deleted."""
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    migrate.upgrade(url)
    settings = Settings(data_dir=tmp_path, database_url=url, audit_checkpoint_every=3, audit_retention_days=1)
    _append(settings, 4)
    with get_session_factory(url)() as session:
        assert audit_service.purge_expired(session=session, settings=settings, identity=ADMIN,
                                           now=utcnow() + timedelta(days=2)) == 4
        assert session.execute(select(RetrievalEvent.id, RetrievalEvent.event_type)).all() == [(5, "retention_purge")]
    _append(settings, 4)
    result = _verify(settings)
    assert (result["ok"], result["checked"], result["purged_through"]) == (True, 5, 4)


def test_verification_matches_on_sqlite(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    migrate.upgrade(url)
    settings = Settings(data_dir=tmp_path, database_url=url, audit_checkpoint_every=3)
    _append(settings, 7)
    assert _verify(settings)["ok"] is True
    with get_session_factory(url)() as session:
        session.execute(text("UPDATE retrieval_events SET latency_ms = 9 WHERE id = 5"))
        session.commit()
    assert (_verify(settings)["ok"], _verify(settings)["first_broken"]) == (False, 5)


@pytest.mark.parametrize("latency", [3, -0.0], ids=["int", "negative-zero"])
def test_a_latency_the_database_hands_back_otherwise_still_verifies(tmp_path: Path, latency: float) -> None:
    """The row was hashed as given and verified as read back: an int latency came back a float (3.0), and SQLite
    keeps no -0.0; either row failed verification forever (`content_changed`), a false alarm."""
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    migrate.upgrade(url)
    settings = Settings(data_dir=tmp_path, database_url=url)
    with get_session_factory(url)() as session:
        audit_service.record_retrieval(session=session, record=replace(_record(1), latency_ms=latency),
                                       settings=settings)
    assert (_verify(settings)["ok"], _verify(settings)["checked"]) == (True, 1)


def test_cli_verify_export_checkpoint_and_purge(ledger: Settings, monkeypatch: pytest.MonkeyPatch,
                                               tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from api import cli
    from core.settings import get_settings

    _append(ledger, 3)
    monkeypatch.setenv("GOVRAG_DATABASE_URL", ledger.resolved_database_url)
    monkeypatch.setenv("GOVRAG_DATA_DIR", str(ledger.data_dir))
    get_settings.cache_clear()
    try:
        assert cli.main(["audit", "checkpoint"]) == 0
        out = tmp_path / "export.csv"
        assert cli.main(["audit", "export", "--format", "csv", "--user", "alice", "-o", str(out)]) == 0
        manifest = json.loads((tmp_path / "export.csv.manifest.json").read_text())["manifest"]
        assert manifest["rows"] == 3 and out.read_text().count("\n") == 5  # header, 3 rows, manifest
        capsys.readouterr()
        assert cli.main(["audit", "verify"]) == 0
        assert json.loads(capsys.readouterr().out)["checked"] == 4  # 3 queries and the export event
        _sql(ledger, "UPDATE retrieval_events SET decision = 'refused' WHERE id = 2")
        assert cli.main(["audit", "verify"]) == 3
        assert json.loads(capsys.readouterr().out)["first_broken"] == 2
        assert cli.main(["audit", "purge"]) == 2  # no retention configured: nothing is deleted
        assert capsys.readouterr().err == ("refused: no retention period configured (GOVRAG_AUDIT_RETENTION_DAYS); "
                                           "nothing purged\n")
        monkeypatch.setenv("GOVRAG_AUDIT_RETENTION_DAYS", "1")
        monkeypatch.setattr(integrity, "utcnow", lambda: utcnow() + timedelta(days=2))  # two days later
        get_settings.cache_clear()
        assert cli.main(["audit", "purge", "--actor", "ops"]) == 0  # everything so far expires, broken row too
        assert json.loads(capsys.readouterr().out)["purged"] == 4
        assert cli.main(["audit", "verify"]) == 0
        assert json.loads(capsys.readouterr().out)["purged_through"] == 4
    finally:
        get_settings.cache_clear()


@pytest.fixture
def cli_on_ledger(ledger: Settings, monkeypatch: pytest.MonkeyPatch) -> Iterator[Settings]:
    """The CLI configured for the test's ledger."""
    from core.settings import get_settings

    monkeypatch.setenv("GOVRAG_DATABASE_URL", ledger.resolved_database_url)
    monkeypatch.setenv("GOVRAG_DATA_DIR", str(ledger.data_dir))
    get_settings.cache_clear()
    yield ledger
    get_settings.cache_clear()


def test_a_cli_checkpoint_signs_none_when_nothing_was_appended_since_the_newest(
        cli_on_ledger: Settings, capsys: pytest.CaptureFixture[str]) -> None:
    """Run from cron every few minutes, `govrag audit checkpoint` signed one each run, on a quiet ledger too: a
    checkpoint row and a mirror line each time, all held by every verification. Now it says it signed none."""
    from api import cli

    def checkpoint() -> dict[str, object]:
        assert cli.main(["audit", "checkpoint"]) == 0
        return json.loads(capsys.readouterr().out)

    def mirrored() -> int:
        return len(cli_on_ledger.resolved_checkpoint_file.read_text().splitlines())

    assert checkpoint() == {"checkpointed_event_id": None, "signed": False, "note": "the ledger is empty"}
    _append(cli_on_ledger, 3)
    assert checkpoint() == {"checkpointed_event_id": 3, "signed": True}
    assert (checkpoint(), mirrored()) == (
        {"checkpointed_event_id": 3, "signed": False, "note": "nothing appended since the newest checkpoint"}, 1)
    _append(cli_on_ledger, 1)
    assert (checkpoint(), mirrored()) == ({"checkpointed_event_id": 4, "signed": True}, 2)
    assert {k: _verify(cli_on_ledger)[k] for k in ("ok", "checkpoints_checked", "unanchored")} == {
        "ok": True, "checkpoints_checked": 4, "unanchored": 0}


def test_a_cli_export_of_an_inverted_window_is_refused_and_not_recorded(
        cli_on_ledger: Settings, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`--since` after `--until` wrote an empty export (and recorded it), which reads as "nobody accessed it"."""
    from api import cli

    _append(cli_on_ledger, 2)
    exports = tmp_path / "exports"
    exports.mkdir()
    assert cli.main(["audit", "export", "--since", "2027-01-01", "--until", "2026-01-01",
                     "-o", str(exports / "window.jsonl")]) == 2
    assert capsys.readouterr().err.startswith("refused: since is after until")
    assert _verify(cli_on_ledger)["checked"] == 2 and list(exports.iterdir()) == []  # no export row, no file
    assert cli.main(["audit", "export", "--since", "2026-01-01", "--until", "2026-01-01"]) == 0  # an empty window
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["manifest"]["rows"] == 0


@pytest.mark.parametrize("command", [["audit", "export"], ["export", "training-data", "--department"]])
def test_a_cli_export_to_a_missing_folder_fails_cleanly_and_is_not_recorded(
        cli_on_ledger: Settings, tmp_path: Path, capsys: pytest.CaptureFixture[str], command: list[str]) -> None:
    """It crashed with a traceback after the ledger had recorded an export that never produced a file."""
    from api import cli
    from authz import service as authz_service
    from core.db import unit_of_work
    from core.keystore import keystore_for

    department = f"hr{uuid.uuid4().hex[:6]}"
    with unit_of_work(cli_on_ledger.resolved_database_url) as session:
        authz_service.create_department(session=session, keystore=keystore_for(cli_on_ledger), name=department)
    rows = _verify(cli_on_ledger)["checked"]
    argv = [*command, department] if command[0] == "export" else command
    assert cli.main([*argv, "-o", str(tmp_path / "no-such-dir" / "out.jsonl")]) == 2
    said = capsys.readouterr().err
    assert f"the folder does not exist: {tmp_path / 'no-such-dir'}" in said and ".partial" not in said
    assert _verify(cli_on_ledger)["checked"] == rows  # no export row


@pytest.mark.parametrize("command", [["audit", "export"], ["export", "training-data", "--department"]])
@pytest.mark.parametrize("goes", ["before the command", "as the export is recorded"])
def test_a_cli_export_during_a_database_outage_says_it_stopped_on_the_outage_not_refused(
        cli_on_ledger: Settings, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
        command: list[str], goes: str) -> None:
    """The database going as the export was recorded printed "refused: the audit log is unavailable ..." (exit 2, a
    refusal: the command as typed is wrong), as the ledger's `unavailable` is a GovragError; gone before the command,
    the outage's raw error was a traceback. Either way it now says what `govrag ingest` says of an outage (exit 1),
    nothing recorded and an earlier file left as it was."""
    from api import cli
    from authz import service as authz_service
    from core.db import unit_of_work
    from core.keystore import keystore_for

    department, database = f"hr{uuid.uuid4().hex[:6]}", cli_on_ledger.resolved_database_url.rsplit("/", 1)[1]
    with unit_of_work(cli_on_ledger.resolved_database_url) as session:
        authz_service.create_department(session=session, keystore=keystore_for(cli_on_ledger), name=department)
    rows = _verify(cli_on_ledger)["checked"]
    real_record = audit_service.record_admin_event

    def recorded_as_the_database_goes(**kwargs: object) -> None:
        allow_connections(database, False)
        real_record(**kwargs)  # type: ignore[arg-type]

    if goes == "before the command":
        allow_connections(database, False)
    else:
        monkeypatch.setattr(audit_service, "record_admin_event", recorded_as_the_database_goes)
    (exports := tmp_path / "exports").mkdir()  # tmp_path is the data directory too
    earlier = exports / "out.jsonl"
    earlier.write_text("last week's export\n")
    argv = [*command, department] if command[0] == "export" else command
    try:
        assert cli.main([*argv, "-o", str(earlier)]) == 1
    finally:
        allow_connections(database, True)
    assert capsys.readouterr().err == ("stopped: the database is unavailable; run the same command again once it "
                                       "is back\n")
    assert earlier.read_text() == "last week's export\n" and list(exports.iterdir()) == [earlier]
    assert _verify(cli_on_ledger)["checked"] == rows  # no export row


@pytest.mark.parametrize("action", ["verify", "checkpoint", "purge"])
def test_a_cli_audit_command_during_a_database_outage_says_it_stopped_on_the_outage(
        cli_on_ledger: Settings, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
        action: str) -> None:
    """`govrag audit verify|checkpoint|purge` printed the outage's raw traceback, which names the server's address;
    each now says it as `govrag audit export` does (exit 1), nothing signed or purged, nothing of the database's URL
    on either stream."""
    from sqlalchemy.engine import make_url

    from api import cli
    from core.settings import get_settings

    _append(cli_on_ledger, 3)
    monkeypatch.setenv("GOVRAG_AUDIT_RETENTION_DAYS", "1")  # else purge refuses before it asks the database
    monkeypatch.setattr(integrity, "utcnow", lambda: utcnow() + timedelta(days=2))  # the three rows have expired
    get_settings.cache_clear()
    url = make_url(cli_on_ledger.resolved_database_url)
    allow_connections(url.database, False)
    try:
        assert cli.main(["audit", action]) == 1
    finally:
        allow_connections(url.database, True)
    out, err = capsys.readouterr()
    assert (out, err) == ("", "stopped: the database is unavailable; run the same command again once it is back\n")
    named = [cli_on_ledger.resolved_database_url, url.render_as_string(hide_password=False), url.host, url.database,
             f":{url.port}", url.password]
    assert not [part for part in named if part and part in out + err]
    assert {k: _verify(cli_on_ledger)[k] for k in ("ok", "checked", "checkpoints_checked", "purged_through")} == {
        "ok": True, "checked": 3, "checkpoints_checked": 0, "purged_through": None}


def test_a_cli_verify_tells_a_tampered_ledger_from_a_database_outage_by_its_exit_code(
        cli_on_ledger: Settings, capsys: pytest.CaptureFixture[str]) -> None:
    """Both exited 1: a cron job or a monitor reading only the exit code could not tell tampering, the security
    signal, from an outage. A ledger that fails verification now exits 3 (its result on stdout), an outage 1 (the
    "stopped: ..." line on stderr, nothing on stdout)."""
    from sqlalchemy.engine import make_url

    from api import cli

    _append(cli_on_ledger, 3)
    _sql(cli_on_ledger, "UPDATE retrieval_events SET purpose = 'something else' WHERE id = 2")
    assert cli.main(["audit", "verify"]) == 3
    out, err = capsys.readouterr()
    assert (json.loads(out)["ok"], json.loads(out)["first_broken"], json.loads(out)["reason"], err) == (
        False, 2, "content_changed", "")
    database = make_url(cli_on_ledger.resolved_database_url).database
    allow_connections(database, False)
    try:
        assert cli.main(["audit", "verify"]) == 1
    finally:
        allow_connections(database, True)
    assert capsys.readouterr() == ("", "stopped: the database is unavailable; run the same command again once it "
                                       "is back\n")


@pytest.mark.parametrize("goes", ["as its event is written", "as the rows are deleted"])
def test_a_cli_purge_during_a_database_outage_is_undone_whole_never_left_unrecorded(
        cli_on_ledger: Settings, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
        goes: str) -> None:
    """`govrag audit purge` committed the delete and its signed checkpoint, then recorded the `retention_purge`
    event in a transaction of its own: the database going between the two left rows deleted that no event named,
    and the command run again found nothing to purge. The checkpoint, the event and the delete are now one
    transaction: an outage undoes all three (nothing deleted, signed or mirrored), and the command run again purges
    and records it."""
    from sqlalchemy.engine import make_url

    from api import cli
    from audit import repository
    from core.settings import get_settings

    _append(cli_on_ledger, 3)
    monkeypatch.setenv("GOVRAG_AUDIT_RETENTION_DAYS", "1")
    monkeypatch.setattr(integrity, "utcnow", lambda: utcnow() + timedelta(days=2))  # the three rows have expired
    get_settings.cache_clear()
    database = make_url(cli_on_ledger.resolved_database_url).database
    step = "add_events" if goes == "as its event is written" else "delete_through"
    real_step = getattr(repository, step)

    def as_the_database_goes(*args: object) -> object:
        allow_connections(database, False)
        return real_step(*args)

    with monkeypatch.context() as outage:
        outage.setattr(repository, step, as_the_database_goes)
        try:
            assert cli.main(["audit", "purge", "--actor", "ops"]) == 1
        finally:
            allow_connections(database, True)
    assert capsys.readouterr() == ("", "stopped: the database is unavailable; run the same command again once it "
                                       "is back\n")
    assert {k: _verify(cli_on_ledger)[k] for k in ("ok", "checked", "checkpoints_checked", "purged_through")} == {
        "ok": True, "checked": 3, "checkpoints_checked": 0, "purged_through": None}
    assert not cli_on_ledger.resolved_checkpoint_file.exists()
    assert cli.main(["audit", "purge", "--actor", "ops"]) == 0  # run again: purged, and recorded
    assert json.loads(capsys.readouterr().out) == {"purged": 3}
    assert {k: _verify(cli_on_ledger)[k] for k in ("ok", "checked", "checkpoints_checked", "purged_through")} == {
        "ok": True, "checked": 1, "checkpoints_checked": 4, "purged_through": 3}  # the purge's, its event's; mirrored
    with get_session_factory(cli_on_ledger.resolved_database_url)() as session:
        recorded = session.execute(select(RetrievalEvent.event_type, RetrievalEvent.subject,
                                          RetrievalEvent.details)).all()
    assert [tuple(row) for row in recorded] == [
        ("retention_purge", "cli:ops", {"rows": 3, "through_event_id": 3, "retention_days": 1})]


def test_a_cli_verify_whose_checkpoint_mirror_cannot_be_read_says_so(
        cli_on_ledger: Settings, capsys: pytest.CaptureFixture[str]) -> None:
    """It printed a traceback; now one line naming the file, exit 2 (not 3, a ledger failing verification)."""
    from api import cli

    cli_on_ledger.resolved_checkpoint_file.mkdir()
    assert cli.main(["audit", "verify"]) == 2
    assert capsys.readouterr() == ("", f"failed: Is a directory: {cli_on_ledger.resolved_checkpoint_file}\n")


def test_a_refused_cli_export_leaves_an_earlier_file_as_it_was(cli_on_ledger: Settings, tmp_path: Path) -> None:
    from api import cli

    earlier = tmp_path / "hr.jsonl"
    earlier.write_text("last week's export\n")
    assert cli.main(["export", "training-data", "--department", "no-such-department", "-o", str(earlier)]) == 2
    assert earlier.read_text() == "last week's export\n" and list(tmp_path.iterdir()) == [earlier]
