"""Signed export manifests and checkpoints bound to the deployment, on PostgreSQL and SQLite: `govrag audit
verify-export` tells a whole, unchanged export of this deployment from a cut, reordered, edited or foreign one."""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import io
import itertools
import json
import logging
import os
import re
import shutil
import string
import subprocess
import sys
import threading
import time
import tracemalloc
import uuid
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, BinaryIO

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from fastapi.testclient import TestClient
from pydantic import SecretStr
from sqlalchemy import insert, select, text

from audit import service as audit_service
from audit.integrity import (
    LEGACY_GRACE,
    Signer,
    load_public_key,
    load_public_keys,
    manifest_signatures,
    public_key_pem,
    sign_manifest,
)
from audit.schemas import (
    LATER_FIELDS,
    RETRIEVAL_EVENT,
    Decision,
    ExportCheck,
    ExportFilters,
    ExportFormat,
    RetrievalRecord,
)
from authz.identity import Identity
from core import migrate
from core.db import get_engine, get_session_factory, unit_of_work
from core.models import AuditCheckpoint, RetrievalEvent, utcnow
from core.settings import Settings
from tests.support.legacy_checkpoint import add_v1_checkpoint

ADMIN = Identity(subject="root-admin", groups=(), is_platform_admin=True)
SHARED_KEY = base64.b64encode(b"k" * 32).decode()  # two deployments configured with one checkpoint key
AUDIT_DOC = Path(__file__).resolve().parents[2] / "docs" / "audit.md"


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
            session.execute(text("TRUNCATE retrieval_events, audit_checkpoints, wrapped_keys, master_key_verifiers "
                                 "RESTART IDENTITY"))
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


def _export(settings: Settings, path: Path, fmt: ExportFormat = ExportFormat.jsonl) -> Path:
    with get_session_factory(settings.resolved_database_url)() as session:
        path.write_text("".join(audit_service.export_events(
            session=session, settings=settings, identity=ADMIN, scope=None, filters=ExportFilters(), fmt=fmt)),
            encoding="utf-8")
    return path


@pytest.fixture
def audit_cli(monkeypatch: pytest.MonkeyPatch,
              capsys: pytest.CaptureFixture[str]) -> Iterator[Callable[..., tuple]]:
    """`govrag audit ACTION [args]` configured for a deployment: (exit code, its JSON report, or its stderr when it
    printed none; public-key: its stdout and stderr)."""
    from api import cli as govrag
    from core.settings import get_settings

    def run(settings: Settings, *argv: str) -> tuple[int, Any]:
        monkeypatch.setenv("GOVRAG_DATABASE_URL", settings.resolved_database_url)
        monkeypatch.setenv("GOVRAG_DATA_DIR", str(settings.data_dir))
        if settings.audit_checkpoint_key is not None:
            monkeypatch.setenv("GOVRAG_AUDIT_CHECKPOINT_KEY", settings.audit_checkpoint_key.get_secret_value())
        get_settings.cache_clear()
        code = govrag.main(["audit", *argv])
        out, err = capsys.readouterr()
        if argv[0] == "public-key":
            return code, (out, err)
        return code, json.loads(out) if out else err

    yield run
    get_settings.cache_clear()


@pytest.fixture
def cli(audit_cli: Callable[..., tuple]) -> Callable[..., tuple]:
    """`govrag audit verify-export FILE [args]` configured for a deployment: (exit code, its JSON report)."""
    return lambda settings, path, *args: audit_cli(settings, "verify-export", str(path), *args)


def _lines(path: Path) -> list[bytes]:
    return path.read_bytes().split(b"\n")[:-1]


def _written(path: Path, lines: list[bytes]) -> Path:
    edited = path.with_name("edited" + path.suffix)
    edited.write_bytes(b"".join(line + b"\n" for line in lines))
    return edited


def _rehashed(row: bytes, old: bytes, new: bytes) -> bytes:
    """The JSONL row with `old` replaced and its own hash computed again, as whoever edits it would."""
    data = json.loads(row.replace(old, new))
    content = {k: v for k, v in data.items()
               if k not in ("id", "hash") and not (k in LATER_FIELDS and v in (None, [], {}))}
    canonical = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    data["hash"] = hashlib.sha256(canonical.encode()).hexdigest()
    return json.dumps(data, ensure_ascii=False).encode()


def _manifest_recomputed(rows: list[bytes], manifest_line: bytes) -> bytes:
    """The manifest made to agree with `rows` again (count, body hash, first and last hash), its signature kept."""
    manifest = json.loads(manifest_line)["manifest"]
    body = b"".join(row + b"\n" for row in rows)
    manifest.update(rows=len(rows), body_sha256=hashlib.sha256(body).hexdigest(),
                    first_hash=json.loads(rows[0])["hash"], last_hash=json.loads(rows[-1])["hash"])
    return json.dumps({"manifest": manifest}).encode()


def _unsigned(manifest_line: bytes) -> bytes:
    manifest = json.loads(manifest_line)["manifest"]
    del manifest["signature"]
    return json.dumps({"manifest": manifest}).encode()


TAMPERINGS: dict[str, tuple[Callable[[list[bytes], bytes], list[bytes]], str, int | None]] = {
    # what is done to the rows (r) and manifest line (m): the reason reported and the row id named
    "tail cut": (lambda r, m: [*r[:-1], m], "rows_removed", None),
    "middle row cut": (lambda r, m: [r[0], *r[2:], m], "rows_removed", None),
    "rows swapped": (lambda r, m: [r[1], r[0], *r[2:], m], "rows_reordered", 1),
    "row edited": (lambda r, m: [r[0], r[1].replace(b'"alice"', b'"mallory"'), *r[2:], m], "row_changed", 2),
    "row edited and rehashed": (lambda r, m: [r[0], _rehashed(r[1], b'"alice"', b'"mallory"'), *r[2:], m],
                                "body_changed", None),
    "row cut, manifest recomputed": (lambda r, m: [r[0], *r[2:], _manifest_recomputed([r[0], *r[2:]], m)],
                                     "manifest_signature_invalid", None),
    "manifest scope edited": (lambda r, m: [*r, m.replace(b'"departments": null', b'"departments": ["hr"]')],
                              "manifest_signature_invalid", None),
    "signature removed": (lambda r, m: [*r, _unsigned(m)], "manifest_unsigned", None),
    "manifest removed": (lambda r, _m: r, "manifest_missing", None),
    # lines no export writes, each a reason too, not a traceback (RecursionError, TypeError, UnicodeEncodeError)
    "row nested past the parser's depth": (lambda r, m: [r[0], b"[" * 100_000, *r[2:], m], "rows_unreadable", None),
    "manifest nested past the parser's depth": (lambda r, _m: [*r, b'{"manifest": ' + b"[" * 100_000],
                                                "manifest_missing", None),
    "signature not ASCII": (lambda r, m: [*r, m.replace(b'"signature": "v1.', '"signature": "v1.\u00e9'.encode())],
                            "manifest_signature_invalid", None),
    "lone surrogate in the manifest": (lambda r, m: [*r, m.replace(b'"filters": {}', b'"filters": {"x": "\\ud800"}')],
                                       "manifest_signature_invalid", None),
    "a manifest key given twice": (lambda r, m: [*r, m.replace(b'{"manifest": {', b'{"manifest": {"rows": 3, ')],
                                   "manifest_missing", None),
}


def test_an_untouched_export_verifies_with_its_deployment_id(ledger: Settings, tmp_path: Path,
                                                             cli: Callable[..., tuple]) -> None:
    _append(ledger, 4)
    export = _export(ledger, tmp_path / "export.jsonl")
    manifest = json.loads(_lines(export)[-1])["manifest"]
    assert manifest["signature"].startswith("v1.") and manifest["rows"] == 4
    code, report = cli(ledger, export)
    assert (code, report["ok"], report["rows"], report["reason"]) == (0, True, 4, None)
    with unit_of_work(ledger.resolved_database_url) as session:
        assert report["deployment_id"] == manifest["deployment_id"] == audit_service.verify(
            session=session, settings=ledger).deployment_id


@pytest.mark.parametrize("tampering", list(TAMPERINGS))
def test_each_tampering_of_an_export_is_told_with_exit_3(ledger: Settings, tmp_path: Path,
                                                         cli: Callable[..., tuple], tampering: str) -> None:
    """The manifest was not signed: whoever handed an export over could cut, reorder or edit rows, compute the
    manifest again and the recipient could not tell. Each is now a failure that says what was found."""
    _append(ledger, 4)
    export = _export(ledger, tmp_path / "export.jsonl")
    *rows, manifest = _lines(export)
    change, reason, row_id = TAMPERINGS[tampering]
    code, report = cli(ledger, _written(export, change(rows, manifest)))
    assert (code, report["ok"], report["reason"], report["first_broken"]) == (3, False, reason, row_id)
    assert report["message"]


@pytest.mark.parametrize("fmt", [ExportFormat.csv, ExportFormat.ocsf])
def test_csv_and_ocsf_exports_are_checked_too(ledger: Settings, tmp_path: Path, cli: Callable[..., tuple],
                                              fmt: ExportFormat) -> None:
    _append(ledger, 3)
    export = _export(ledger, tmp_path / f"export.{fmt.value}", fmt)
    assert cli(ledger, export)[0] == 0
    *rows, manifest = _lines(export)
    first = 1 if fmt is ExportFormat.csv else 0  # the CSV header
    cut = cli(ledger, _written(export, [*rows[:-1], manifest]))[1]
    swapped = cli(ledger, _written(export, [*rows[:first], rows[first + 1], rows[first], *rows[first + 2:],
                                            manifest]))[1]
    edited = cli(ledger, _written(export, [*rows[:first], rows[first].replace(b"question 0", b"question 9"),
                                           *rows[first + 1:], manifest]))[1]
    assert [report["reason"] for report in (cut, swapped, edited)] == ["rows_removed", "rows_reordered",
                                                                      "body_changed"]


def test_a_csv_export_of_a_user_in_thousands_of_groups_verifies(ledger: Settings, tmp_path: Path,
                                                                 cli: Callable[..., tuple]) -> None:
    """The groups cell is past the csv module's default field limit (128 KiB): checking the export was a traceback."""
    groups = [f"directory-group-{n:05d}" for n in range(8000)]
    with get_session_factory(ledger.resolved_database_url)() as session:
        audit_service.record_retrieval(session=session, record=replace(_record(0), groups=groups),
                                       settings=ledger)
    export = _export(ledger, tmp_path / "export.csv", ExportFormat.csv)
    code, report = cli(ledger, export)
    assert (code, report["ok"], report["rows"]) == (0, True, 1)


def test_an_export_read_from_a_pipe_is_checked(ledger: Settings, tmp_path: Path, cli: Callable[..., tuple]) -> None:
    """`govrag audit verify-export <(zcat export.jsonl.gz)`: read whole, a pipe did; read from its end, it failed
    ("UnsupportedOperation"). A pipe is copied to a temporary file first; a cut one is still manifest_missing."""
    _append(ledger, 2)
    *rows, manifest = _lines(_export(ledger, tmp_path / "export.jsonl"))
    for lines, expected in ((rows + [manifest], (0, True)), (rows, (3, False))):
        pipe = tmp_path / "pipe"
        os.mkfifo(pipe)
        writer = threading.Thread(target=pipe.write_bytes, args=(b"".join(line + b"\n" for line in lines),),
                                  daemon=True)
        writer.start()
        code, report = cli(ledger, pipe)
        os.close(os.open(pipe, os.O_RDONLY | os.O_NONBLOCK))  # a writer still waiting for a reader is let go
        writer.join()
        pipe.unlink()
        assert (code, report["ok"]) == expected
    assert report["reason"] == "manifest_missing"


def _append_many(settings: Settings, count: int, question: str) -> None:
    """`count` retrievals asking `question`, linked and committed at once (one checkpoint, not one every 5 rows)."""
    events = [RetrievalEvent(event_type=RETRIEVAL_EVENT, **vars(replace(_record(n), question_masked=question)))
              for n in range(count)]
    with get_session_factory(settings.resolved_database_url)() as session:
        audit_service._append(session, settings, events)


@pytest.mark.parametrize("fmt", list(ExportFormat))
def test_a_large_export_is_checked_a_line_at_a_time(ledger: Settings, tmp_path: Path, cli: Callable[..., tuple],
                                                    fmt: ExportFormat) -> None:
    """`govrag audit verify-export` read the whole file into memory (then its text, then every row parsed), where the
    export streams: a large export held several times its size. It now reads the manifest from the end and the rows
    a line at a time: what it holds at its peak is a small part of the file. The question spans lines (a CSV cell
    then does too)."""
    settings = _keyed(ledger, SHARED_KEY)
    _append_many(settings, 3000, "how many days of leave\n" + "x" * 1500)
    export = _export(settings, tmp_path / f"export.{fmt.value}", fmt)
    deployment_id = json.loads(_lines(export)[-1].removeprefix(b"# manifest "))["manifest"]["deployment_id"]
    auditor = Settings(data_dir=tmp_path / "auditor", database_url=f"sqlite:///{tmp_path}/nowhere/no.db",
                       audit_checkpoint_key=SHARED_KEY)
    assert cli(auditor, export, "--deployment-id", deployment_id)[1]["ok"] is True  # imports done before measuring
    tracemalloc.start()
    try:
        code, report = cli(auditor, export, "--deployment-id", deployment_id)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    size = export.stat().st_size
    assert (code, report["ok"], report["rows"]) == (0, True, 3000)
    assert size > 4_000_000 and peak < size / 8, (peak, size)
    *rows, manifest = _lines(export)
    assert cli(auditor, _written(export, [*rows[:1500], *rows[1501:], manifest]), "--deployment-id",
               deployment_id)[1]["reason"] == "rows_removed"


@pytest.mark.parametrize(("signature", "told"), [(7, ("mirror_line_unreadable", None, 2)),
                                                ("v2.\u00e9", ("checkpoint_signature_invalid", 5, None)),
                                                (None, ("mirror_line_unreadable", None, 2))])
def test_a_mirror_line_no_writer_wrote_fails_verification_in_one_line(ledger: Settings, signature: object,
                                                                      told: tuple[str, int | None, int | None]) -> None:
    """A mirror line whose signature is no string, or not ASCII, or one nested past the parser's depth (None), ended
    `govrag audit verify` in a traceback; it is an unreadable line (its number said), as a line that does not parse
    is, or a checkpoint whose signature fails (not ASCII: no signature a writer wrote)."""
    _append(ledger, 5)  # signed and mirrored at row 5
    mirror = ledger.resolved_checkpoint_file
    line = json.loads(mirror.read_text().splitlines()[0])
    with mirror.open("a", encoding="utf-8") as handle:
        handle.write(("[" * 100_000 if signature is None else json.dumps(line | {"signature": signature})) + "\n")
    with unit_of_work(ledger.resolved_database_url) as session:
        result = audit_service.verify(session=session, settings=ledger)
    assert (result.ok, result.checkpoints_checked) == (False, 2)
    assert (result.reason, result.first_broken, result.mirror_line) == told


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


def test_an_export_of_another_deployment_sharing_the_key_is_not_taken_for_this_ones(
        ledger: Settings, tmp_path: Path, cli: Callable[..., tuple]) -> None:
    ours = _keyed(ledger, SHARED_KEY)
    theirs = _other(tmp_path, audit_checkpoint_key=SHARED_KEY)
    _append(theirs, 2)
    export = _export(theirs, tmp_path / "theirs.jsonl")
    assert cli(theirs, export)[0] == 0
    code, report = cli(ours, export)
    assert (code, report["reason"]) == (3, "other_deployment")
    assert report["deployment_id"] in report["message"]
    unshared = _keyed(ledger, base64.b64encode(b"z" * 32).decode())
    assert cli(unshared, export)[1]["reason"] == "manifest_signature_invalid"


def test_an_auditor_with_the_key_and_deployment_id_checks_an_export_without_the_database(
        ledger: Settings, tmp_path: Path, cli: Callable[..., tuple]) -> None:
    settings = _keyed(ledger, SHARED_KEY)
    _append(settings, 2)
    export = _export(settings, tmp_path / "export.jsonl")
    deployment_id = json.loads(_lines(export)[-1])["manifest"]["deployment_id"]
    auditor = Settings(data_dir=tmp_path / "auditor", database_url=f"sqlite:///{tmp_path}/nowhere/no.db",
                       audit_checkpoint_key=SHARED_KEY)  # a database it cannot open: none is read
    code, report = cli(auditor, export, "--deployment-id", deployment_id)
    assert (code, report["ok"]) == (0, True)
    code, report = cli(auditor, export, "--deployment-id", "00000000-0000-0000-0000-000000000000")
    assert (code, report["reason"]) == (3, "other_deployment")


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


def _set_deployment_id(url: str, deployment_id: str) -> None:
    with unit_of_work(url) as session:
        session.execute(text("UPDATE deployment SET deployment_id = :id"), {"id": deployment_id})
        session.commit()


def test_verify_pinned_to_the_recorded_deployment_id_tells_a_database_set_to_another_deployments(
        ledger: Settings, tmp_path: Path, audit_cli: Callable[..., tuple]) -> None:
    """A ledger replaced by another deployment's (one checkpoint key for both), the `deployment` row set to the other's
    id too, verifies: only the id tells. `govrag audit verify --deployment-id` (the id recorded) now fails it, exit 3,
    reason other_deployment, naming the id found."""
    ours = _keyed(ledger, SHARED_KEY)
    theirs = _other(tmp_path, audit_checkpoint_key=SHARED_KEY)
    recorded = audit_cli(ours, "verify")[1]["deployment_id"]
    assert audit_cli(ours, "verify", "--deployment-id", recorded)[0] == 0
    _append(theirs, 6)
    _copy_ledger(theirs, ours)
    their_id = audit_cli(theirs, "verify")[1]["deployment_id"]
    _set_deployment_id(ours.resolved_database_url, their_id)
    try:
        assert audit_cli(ours, "verify")[1]["ok"] is True
        code, report = audit_cli(ours, "verify", "--deployment-id", recorded)
    finally:
        _set_deployment_id(ours.resolved_database_url, recorded)
    assert (code, report["ok"], report["reason"], report["deployment_id"]) == (3, False, "other_deployment", their_id)


def _checkpointed_before(tmp_path: Path, revision: str, add_checkpoint: Callable[..., None]) -> Settings:
    """A SQLite ledger of 3 rows made at `revision`, checkpointed at row 2 a minute ago as that release signed
    (`add_checkpoint`), then upgraded to the code's revision; no periodic checkpoints."""
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    migrate.upgrade(url, revision)
    settings = Settings(data_dir=tmp_path, database_url=url, audit_checkpoint_every=0)
    _append(settings, 3)
    add_checkpoint(settings, at=2, created_at=utcnow().replace(microsecond=0) - timedelta(minutes=1))
    migrate.upgrade(url)
    return settings


def test_checkpoints_signed_before_the_deployment_id_still_verify_and_later_ones_must_carry_it(
        tmp_path: Path) -> None:
    """A ledger checkpointed at revision 0015 verifies after the upgrade, and so does a v1 checkpoint the previous
    release signed as the migration ran (its API processes serve until readiness drains them: they were reported as
    forged); one dated past LEGACY_GRACE after the id was minted (another deployment sharing the key, still on the old
    release) is not taken."""
    settings = _checkpointed_before(tmp_path, "0015", add_v1_checkpoint)
    url = settings.resolved_database_url
    with unit_of_work(url) as session:
        result = audit_service.verify(session=session, settings=settings)
    assert (result.ok, result.checkpoints_checked) == (True, 1)
    add_v1_checkpoint(settings, at=2, created_at=utcnow().replace(microsecond=0) + timedelta(minutes=1))
    with unit_of_work(url) as session:
        result = audit_service.verify(session=session, settings=settings)
    assert (result.ok, result.checkpoints_checked) == (True, 2)
    add_v1_checkpoint(settings, at=3, created_at=utcnow().replace(microsecond=0) + LEGACY_GRACE + timedelta(minutes=1))
    with unit_of_work(url) as session:
        result = audit_service.verify(session=session, settings=settings)
    assert (result.ok, result.reason, result.first_broken) == (False, "checkpoint_signature_invalid", 3)
    get_engine(url).dispose()


LOST_ROW = ("govrag: the database records no deployment id (the `deployment` row migration 0016 minted is missing, "
            "as after a partial restore): put it back as docs/audit.md says (\"A lost deployment row\")")


def _lose_deployment_row(url: str) -> None:
    with unit_of_work(url) as session:
        session.execute(text("DELETE FROM deployment"))
        session.commit()


@pytest.fixture(params=["pg", "sqlite"])
def fresh_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A database of this test's own at the code's revision: a throwaway PostgreSQL one, or a SQLite file."""
    url = (request.getfixturevalue("make_pg_database")() if request.param == "pg"
           else f"sqlite:///{tmp_path / 'govrag.db'}")
    migrate.upgrade(url)
    yield url
    get_engine(url).dispose()


@pytest.fixture
def govrag_on_fresh(fresh_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                    monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., tuple[int, list[str], str]]]:
    """`govrag ARGV` configured for `fresh_url`: (exit code, its stderr lines, its stdout)."""
    from api import cli as govrag
    from core.settings import get_settings

    monkeypatch.setenv("GOVRAG_DATABASE_URL", fresh_url)
    monkeypatch.setenv("GOVRAG_DATA_DIR", str(tmp_path))

    def run(*argv: str) -> tuple[int, list[str], str]:
        get_settings.cache_clear()
        try:
            code = govrag.main(list(argv))
        except SystemExit as usage_error:  # argparse's
            code = int(usage_error.code or 0)
        captured = capsys.readouterr()
        return code, captured.err.strip().splitlines(), captured.out

    yield run
    get_settings.cache_clear()


def _drop_deployment_table(url: str) -> None:
    with unit_of_work(url) as session:
        session.execute(text("DROP TABLE deployment"))
        session.commit()


LEFT_OUT = LOST_ROW.replace("row migration 0016 minted", "table migration 0016 created")


def test_a_database_whose_deployment_row_was_lost_is_refused_at_start_in_one_line(
        fresh_url: str, tmp_path: Path, govrag_on_fresh: Callable[..., tuple[int, list[str], str]],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A partial restore without the `deployment` row: `govrag serve` started and /readyz said ready, and queries
    failed (503) once a checkpoint was due. It is now a schema problem: serve and each command on the database refuse
    (exit 2) in one line pointing to the restore."""
    _append(Settings(data_dir=tmp_path, database_url=fresh_url, audit_checkpoint_every=5), 2)
    _lose_deployment_row(fresh_url)
    monkeypatch.setattr("uvicorn.Server.run", lambda *_a, **_k: pytest.fail("govrag serve started"))
    for argv in (["serve", "--port", "0"], ["audit", "verify"], ["audit", "checkpoint"]):
        assert govrag_on_fresh(*argv) == (2, [LOST_ROW], "")


def test_a_database_whose_deployment_table_was_left_out_is_refused_in_one_line(
        fresh_url: str, govrag_on_fresh: Callable[..., tuple[int, list[str], str]]) -> None:
    """A restore at the code's revision without the `deployment` table at all: the schema check's query of the row
    failed, a traceback (UndefinedTable, or SQLite's "no such table") at each start. It is refused as a lost row is."""
    _drop_deployment_table(fresh_url)
    assert govrag_on_fresh("audit", "verify") == (2, [LEFT_OUT], "")


@pytest.mark.parametrize(("lose", "said"), [(_lose_deployment_row, LOST_ROW), (_drop_deployment_table, LEFT_OUT)],
                         ids=["row", "table"])
def test_migrate_refuses_a_database_at_head_whose_deployment_id_was_lost(
        lose: Callable[[str], None], said: str, fresh_url: str,
        govrag_on_fresh: Callable[..., tuple[int, list[str], str]]) -> None:
    """`govrag migrate` on a database at head without its `deployment` row (or table) printed "already at head 0018"
    and exited 0, and `govrag serve` then refused to start. It now refuses as serve does: what is lost and where the
    way to put it back is, exit 2, no "at head" line; nothing minted, so it says so again when run again."""
    lose(fresh_url)
    assert govrag_on_fresh("migrate") == (2, [said], "")
    assert govrag_on_fresh("migrate") == (2, [said], "")


def test_the_commands_read_a_deployment_id_pin_as_the_api_does(
        fresh_url: str, tmp_path: Path, govrag_on_fresh: Callable[..., tuple[int, list[str], str]]) -> None:
    """`--deployment-id` of `govrag audit verify` and `verify-export` was compared as text: the recorded id written in
    capitals, braced or without hyphens (each taken by `GET /v1/audit/verify?deployment_id=`) failed as another
    deployment's, exit 3, and so did `staging` or a typo, as if the database were another deployment. The pin is now
    read as the API reads it: a UUID, however written, matches the id recorded; anything else is a usage error, exit 2,
    nothing verified (the API's 422)."""
    recorded = json.loads(govrag_on_fresh("audit", "verify")[2])["deployment_id"]
    exported = tmp_path / "ledger.jsonl"
    assert govrag_on_fresh("audit", "export", "--output", str(exported))[0] == 0
    for action in (["verify"], ["verify-export", str(exported)]):
        for spelling in (recorded.upper(), f"{{{recorded}}}", recorded.replace("-", "")):
            code, _, out = govrag_on_fresh("audit", *action, "--deployment-id", spelling)
            assert (code, json.loads(out)["ok"]) == (0, True), (action, spelling, out)
        for bad in ("staging", recorded + "0", f" {recorded}", ""):
            code, said, out = govrag_on_fresh("audit", *action, "--deployment-id", bad)
            assert (code, said[-1], out) == (2, f"govrag audit {action[0]}: error: argument --deployment-id: not a "
                                                "UUID; give the deployment_id that `govrag audit verify` prints", "")


def test_readyz_reports_a_deployment_row_lost_under_the_running_api(
        fresh_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from api.app import create_app
    from retrieval.store import close_vector_store

    monkeypatch.setattr(migrate, "SCHEMA_CHECK_SECONDS", 0.0)
    settings = Settings(data_dir=tmp_path, database_url=fresh_url, broker_url="memory://", inprocess_worker=False)
    try:
        with TestClient(create_app(settings)) as client:
            assert client.get("/readyz").json()["checks"]["schema"] == "ok"
            _lose_deployment_row(fresh_url)
            response = client.get("/readyz")
    finally:
        close_vector_store(settings)
    assert (response.status_code, response.json()["checks"]["schema"]) == (503, "mismatch")
    assert response.json()["reason"] == LOST_ROW.removeprefix("govrag: ")


# --- Ed25519: an export checked with the public key alone ---

def _auditor(tmp_path: Path) -> Settings:
    """An auditor's machine: no checkpoint key, no master key, a database it cannot open."""
    return Settings(data_dir=tmp_path / "auditor", database_url=f"sqlite:///{tmp_path}/nowhere/no.db")


def _published(audit_cli: Callable[..., tuple], settings: Settings, path: Path) -> tuple[Path, str]:
    """`govrag audit public-key > path`: the path and the deployment id it says on stderr (the auditor keeps both)."""
    code, (pem, said) = audit_cli(settings, "public-key")
    assert code == 0 and pem.startswith("-----BEGIN PUBLIC KEY-----")
    path.write_text(pem, encoding="ascii")
    found = re.fullmatch(r"key_id [0-9a-f]{16}, deployment_id (\S+)\n", said)
    assert found is not None, said
    return path, found[1]


def test_an_export_verifies_with_the_public_key_alone_and_says_which_signature(
        ledger: Settings, tmp_path: Path, audit_cli: Callable[..., tuple], cli: Callable[..., tuple]) -> None:
    """Checking an export took the checkpoint key, which also signs: an auditor able to check one could forge one.
    The manifest is now signed with Ed25519 too, and the public key (`govrag audit public-key`) checks it with no
    secret and no database; the key holder checks both signatures, and the report names those checked."""
    _append(ledger, 4)
    export = _export(ledger, tmp_path / "export.jsonl")
    public, deployment = _published(audit_cli, ledger, tmp_path / "audit.pub")
    auditor = _auditor(tmp_path)
    code, report = cli(auditor, export, "--public-key", str(public), "--deployment-id", deployment)
    manifest = json.loads(_lines(export)[-1])["manifest"]
    assert (code, report["ok"], report["rows"], report["signatures"]) == (0, True, 4, ["ed25519"])
    assert report["key_id"] == manifest["key_id"] and report["deployment_id"] == manifest["deployment_id"] == deployment
    assert not (auditor.data_dir / "master.key").exists()  # no key made or read on the auditor's machine
    code, report = cli(ledger, export)
    assert (code, report["signatures"]) == (0, ["hmac-sha256", "ed25519"])
    code, report = cli(auditor, export, "--public-key", str(public), "--deployment-id", str(uuid.uuid4()))
    assert (code, report["reason"]) == (3, "other_deployment")


def test_the_public_key_check_refuses_to_run_without_the_deployment_pin(
        ledger: Settings, tmp_path: Path, audit_cli: Callable[..., tuple], cli: Callable[..., tuple]) -> None:
    """Deployments sharing a checkpoint key (a clone configured with one, or given a copy of the master key) share the
    public key: a staging export would read as production's. With the public key the deployment id is required (the
    key holder's check pins this database's own)."""
    settings = _keyed(ledger, SHARED_KEY)
    _append(settings, 2)
    export = _export(settings, tmp_path / "export.jsonl")
    public, _ = _published(audit_cli, settings, tmp_path / "ours.pub")
    other, clone = _published(audit_cli, _keyed(_other(tmp_path), SHARED_KEY), tmp_path / "clone.pub")
    assert other.read_text() == public.read_text()  # one key, two deployments
    code, said = cli(_auditor(tmp_path), export, "--public-key", str(public))
    assert (code, said) == (2, "refused: checking with the public key takes the deployment id the export "
                               "must come from (--deployment-id): deployments sharing a checkpoint key share the "
                               "public key\n")
    code, report = cli(_auditor(tmp_path), export, "--public-key", str(public), "--deployment-id", clone)
    assert (code, report["ok"], report["reason"]) == (3, False, "other_deployment")


def test_the_documented_public_key_check_verifies_with_plain_cryptography_and_openssl(
        ledger: Settings, tmp_path: Path, audit_cli: Callable[..., tuple]) -> None:
    """docs/audit.md's recipe, as an auditor runs it: Python's `cryptography`, then `openssl pkeyutl`."""
    _append(ledger, 2)
    export = _export(ledger, tmp_path / "export.jsonl")
    public, deployment = _published(audit_cli, ledger, tmp_path / "audit.pub")
    namespace: dict[str, Any] = {}
    exec(_documented("python", "def verify_manifest"), namespace)  # noqa: S102 - the documented code, as run
    assert namespace["verify_manifest"](str(export), str(public), deployment)["rows"] == 2
    edited = _written(export, [*_lines(export)[:-1], _lines(export)[-1].replace(b'"rows": 2', b'"rows": 1')])
    with pytest.raises(InvalidSignature):
        namespace["verify_manifest"](str(edited), str(public), deployment)
    with pytest.raises(AssertionError, match="another deployment"):
        namespace["verify_manifest"](str(export), str(public), str(uuid.uuid4()))
    script = _documented("bash", "openssl pkeyutl")
    cases = ((export, deployment, 0, True), (edited, deployment, 1, False), (export, str(uuid.uuid4()), 1, True))
    for path, pinned, exit_code, signature_holds in cases:
        run = subprocess.run(["bash", "-c", script], cwd=tmp_path, capture_output=True, text=True,  # noqa: S603, S607
                             check=False, env={**os.environ, "EXPORT": str(path), "PUBLIC_KEY": str(public),
                                               "DEPLOYMENT_ID": pinned,
                                               "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"})
        assert (run.returncode, "Signature Verified Successfully" in run.stdout) == (exit_code, signature_holds), run


def _documented(language: str, holding: str) -> str:
    """The code block of docs/audit.md in `language` that holds `holding`."""
    blocks = re.findall(rf"^```{language}\n(.*?)^```", AUDIT_DOC.read_text(encoding="utf-8"), re.S | re.M)
    found = [block for block in blocks if holding in block]
    assert len(found) == 1, "docs/audit.md's public-key check moved: update this test"
    return found[0]


def test_any_byte_changed_in_an_export_fails_the_public_key_check(ledger: Settings, tmp_path: Path) -> None:
    """Each byte of the file, rows and manifest (its HMAC too, which the public key cannot check), changed."""
    _append(ledger, 3)
    data = _export(ledger, tmp_path / "export.jsonl").read_bytes()
    with unit_of_work(ledger.resolved_database_url) as session:
        published = audit_service.public_key(session=session, settings=ledger)
    public_key, deployment = load_public_key(published.public_key_pem.encode()), published.deployment_id

    def verified(export: bytes) -> bool:
        return audit_service.verify_export(export_file=io.BytesIO(export), settings=ledger, session=None,
                                           public_key=public_key, deployment_id=deployment).ok

    assert verified(data)
    assert [at for at in range(len(data)) if verified(data[:at] + bytes([data[at] ^ 1]) + data[at + 1:])] == []


def test_only_the_written_base64_of_the_ed25519_signature_is_taken() -> None:
    """The signature's bytes spelled otherwise (padding dropped, a line break, the URL-safe alphabet, the trailing
    bits the encoder leaves zero set) are refused, as is no signature at all: one manifest, one spelling."""
    signer = Signer(b"k" * 32, "deployment-1")
    manifest: dict[str, Any] = {"rows": 1, "deployment_id": "deployment-1", "key_id": "0" * 16}
    manifest |= sign_manifest(signer, manifest)
    written = manifest["signature_ed25519"]
    raw = base64.b64decode(written)
    last = _BASE64.index(written[-3])  # 64 bytes: 86 characters, the last holding 4 bits the encoder leaves 0
    spellings = [written.rstrip("="), f"{written[:40]}\n{written[40:]}", f" {written}",
                 written.replace("+", "-").replace("/", "_") if {"+", "/"} & set(written) else written[:-3] + "-==",
                 f"{written[:-3]}{_BASE64[last | 1]}=="]
    assert base64.b64decode(spellings[-1]) == raw  # the same signature bytes
    assert manifest_signatures(signer.public_key(), manifest) == ["ed25519"]
    assert [manifest_signatures(signer.public_key(), manifest | {"signature_ed25519": spelling})
            for spelling in [*spellings, None, 1]] == [None] * (len(spellings) + 2)


_BASE64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def test_a_signer_derives_its_ed25519_key_once() -> None:
    """Each signature and each public key derived the Ed25519 key from the checkpoint key (HKDF) again; a Signer now
    derives it once and keeps it, out of its repr, signing as before."""
    signer = Signer(b"k" * 32, "deployment-1")
    assert signer.signing_key() is signer.signing_key()
    raw = serialization.Encoding.Raw, serialization.PublicFormat.Raw
    assert signer.public_key().public_bytes(*raw) == Signer(b"k" * 32, "other").public_key().public_bytes(*raw)
    assert "kkkk" not in repr(signer) and "PrivateKey" not in repr(signer)


def test_a_public_key_derived_from_another_master_key_fails(ledger: Settings, tmp_path: Path,
                                                             audit_cli: Callable[..., tuple],
                                                             cli: Callable[..., tuple]) -> None:
    _append(ledger, 2)
    export = _export(ledger, tmp_path / "export.jsonl")
    ours, deployment = _published(audit_cli, ledger, tmp_path / "ours.pub")
    theirs, _ = _published(audit_cli, _other(tmp_path), tmp_path / "theirs.pub")  # its own master key file
    assert ours.read_text() != theirs.read_text()
    code, report = cli(_auditor(tmp_path), export, "--public-key", str(theirs), "--deployment-id", deployment)
    assert (code, report["ok"], report["reason"]) == (3, False, "manifest_signature_invalid")


def test_the_public_key_outlives_a_master_key_rotation(tmp_path: Path, audit_cli: Callable[..., tuple],
                                                       cli: Callable[..., tuple]) -> None:
    """Derived from the checkpoint key, which a master rotation keeps (wrapped): exports signed before it still check
    with the key published after it."""
    from ingestion import keys

    settings = _other(tmp_path)
    _append(settings, 2)
    export = _export(settings, tmp_path / "export.jsonl")
    before, deployment = _published(audit_cli, settings, tmp_path / "before.pub")
    published = before.read_text()
    keys.rotate_master_key(settings=settings, identity=ADMIN)
    after, _ = _published(audit_cli, settings, tmp_path / "after.pub")
    assert after.read_text() == published
    assert cli(_auditor(tmp_path), export, "--public-key", str(after), "--deployment-id", deployment)[1]["ok"] is True


def _signed_before_ed25519(export: Path, key: bytes) -> Path:
    """The export as a release before Ed25519 signatures wrote it: no key id, the HMAC alone."""
    *rows, line = _lines(export)
    manifest = json.loads(line)["manifest"]
    for name in ("key_id", "signature", "signature_ed25519"):
        manifest.pop(name, None)
    canonical = json.dumps(manifest, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    mac = hmac.new(key, f"govrag-export-manifest|v1|{canonical}".encode(), hashlib.sha256).digest()
    manifest["signature"] = "v1." + base64.urlsafe_b64encode(mac).decode()
    return _written(export, [*rows, json.dumps({"manifest": manifest}).encode()])


def test_an_export_signed_before_ed25519_still_verifies_with_the_key(ledger: Settings, tmp_path: Path,
                                                                       audit_cli: Callable[..., tuple],
                                                                       cli: Callable[..., tuple]) -> None:
    """An HMAC-only export checks as before, the report saying so; the public key alone cannot check it (said as
    such, not as tampering)."""
    settings = _keyed(ledger, SHARED_KEY)
    _append(settings, 3)
    old = _signed_before_ed25519(_export(settings, tmp_path / "export.jsonl"), base64.b64decode(SHARED_KEY))
    code, report = cli(settings, old)
    assert (code, report["ok"], report["rows"], report["signatures"], report["key_id"]) == (
        0, True, 3, ["hmac-sha256"], None)
    public, deployment = _published(audit_cli, settings, tmp_path / "audit.pub")
    code, report = cli(_auditor(tmp_path), old, "--public-key", str(public), "--deployment-id", deployment)
    assert (code, report["ok"], report["reason"]) == (3, False, "ed25519_signature_missing")


def test_no_private_key_bytes_in_an_export_the_public_key_a_report_or_a_log(
        ledger: Settings, tmp_path: Path, audit_cli: Callable[..., tuple], cli: Callable[..., tuple],
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    settings = _keyed(ledger, SHARED_KEY)
    signer = Signer(base64.b64decode(SHARED_KEY), "deployment-1")
    private = signer.signing_key().private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                                 serialization.NoEncryption())
    spellings = [private, private.hex().encode(), base64.b64encode(private).rstrip(b"="),
                 base64.urlsafe_b64encode(private).rstrip(b"=")]
    _append(settings, 2)
    export = _export(settings, tmp_path / "export.jsonl")
    public, deployment = _published(audit_cli, settings, tmp_path / "audit.pub")
    reports = [cli(settings, export)[1],
               cli(_auditor(tmp_path), export, "--public-key", str(public), "--deployment-id", deployment)[1]]
    shown = b"".join([export.read_bytes(), public.read_bytes(), json.dumps(reports).encode(), caplog.text.encode(),
                      repr(signer).encode(), repr(signer.signing_key()).encode()])
    assert b"PRIVATE" not in public.read_bytes() and all(reports[n]["ok"] for n in (0, 1))
    assert [spelling for spelling in spellings if spelling in shown] == []


# --- Ed25519: checkpoints, in the database and the mirror file, checked with the public key alone ---

def _mirror_lines(settings: Settings) -> list[dict[str, Any]]:
    return [json.loads(line) for line in settings.resolved_checkpoint_file.read_text().splitlines()]


def _write_mirror(settings: Settings, lines: list[dict[str, Any]]) -> None:
    settings.resolved_checkpoint_file.write_text("".join(json.dumps(line) + "\n" for line in lines))


def _verified(settings: Settings) -> tuple[bool, str | None, int]:
    with unit_of_work(settings.resolved_database_url) as session:
        result = audit_service.verify(session=session, settings=settings)
    return result.ok, result.reason, result.checkpoints_checked


def test_a_checkpoint_is_signed_with_ed25519_too_and_one_stripped_of_it_fails_verification(
        ledger: Settings, audit_cli: Callable[..., tuple]) -> None:
    """Checkpoints carried an HMAC only. Each is now signed with Ed25519 too, in its row and its mirror line, and its
    HMAC (`v3.`) says so: one whose Ed25519 signature is removed, or whose HMAC is relabelled `v2.` with it, or whose
    Ed25519 signature is changed, fails `govrag audit verify` (exit 3)."""
    _append(ledger, 5)
    with unit_of_work(ledger.resolved_database_url) as session:
        (stored,) = session.scalars(select(AuditCheckpoint)).all()
        assert stored.signature.startswith("v3.") and len(base64.b64decode(stored.signature_ed25519)) == 64
    (line,) = _mirror_lines(ledger)
    assert (line["signature"], line["signature_ed25519"]) == (stored.signature, stored.signature_ed25519)
    assert _verified(ledger) == (True, None, 2)
    flipped = base64.b64encode(bytes([base64.b64decode(line["signature_ed25519"])[0] ^ 1])
                               + base64.b64decode(line["signature_ed25519"])[1:]).decode()
    mirror_tamperings = [{k: v for k, v in line.items() if k != "signature_ed25519"},
                         {k: v for k, v in line.items() if k != "signature_ed25519"}
                         | {"signature": "v2." + line["signature"][3:]},
                         line | {"signature_ed25519": flipped}]
    for tampered in mirror_tamperings:
        _write_mirror(ledger, [tampered])
        assert _verified(ledger) == (False, "checkpoint_signature_invalid", 1), tampered
    _write_mirror(ledger, [line])
    with unit_of_work(ledger.resolved_database_url) as session:
        session.execute(text("UPDATE audit_checkpoints SET signature_ed25519 = NULL"))
        session.commit()
    assert _verified(ledger) == (False, "checkpoint_signature_invalid", 1)
    code, report = audit_cli(ledger, "verify")
    assert (code, report["reason"]) == (3, "checkpoint_signature_invalid")


def test_checkpoints_signed_before_0019_still_verify_beside_those_signed_with_ed25519(tmp_path: Path) -> None:
    """A ledger checkpointed at revision 0018 (v2, HMAC only, in the database and the mirror) verifies after the
    upgrade beside the checkpoints signed with Ed25519 since, by the key and by the public key alone (its v2 line
    counted as one only the key checks)."""
    from tests.support.legacy_checkpoint import add_v2_checkpoint

    settings = _checkpointed_before(tmp_path, "0018", add_v2_checkpoint).model_copy(
        update={"audit_checkpoint_every": 5})
    url = settings.resolved_database_url
    _append(settings, 7)  # signed at row 7, five past the v2 checkpoint at row 2
    assert _verified(settings) == (True, None, 4)
    with unit_of_work(url) as session:
        published = audit_service.public_key(session=session, settings=settings)
    with settings.resolved_checkpoint_file.open("rb") as mirror:
        report = audit_service.verify_mirror(mirror=mirror, deployment_id=published.deployment_id,
                                             public_keys=[load_public_key(published.public_key_pem.encode())])
    assert (report.ok, report.lines, report.checked, report.hmac_only, report.through_event_id) == (
        True, 2, 1, 1, 7)
    get_engine(url).dispose()


def _signed_line(key: bytes, deployment_id: str, *, at: int, last_hash: str, created_at: datetime | None = None,
                 kind: str = "manual", event_count: int = 0) -> dict[str, Any]:
    """A mirror line as the checkpoint key's holder signs one (now, or at `created_at`: aware, whole seconds)."""
    from audit import integrity

    checkpoint = AuditCheckpoint(created_at=created_at or utcnow().replace(microsecond=0), kind=kind,
                                 last_event_id=at, last_hash=last_hash, event_count=event_count)
    checkpoint.signature, checkpoint.signature_ed25519 = integrity.sign(Signer(key, deployment_id), checkpoint)
    return integrity._as_json(checkpoint)


MIRROR_TAMPERINGS: dict[str, tuple[Callable[[list[dict[str, Any]]], list[Any]], str, int | None]] = {
    # what is done to the lines (each a dict; a str is written as it is): the reason reported and the line named
    "hash edited": (lambda ls: [ls[0] | {"last_hash": "0" * 64}, *ls[1:]], "checkpoint_signature_invalid", 1),
    "event id edited": (lambda ls: [ls[0], ls[1] | {"last_event_id": 4}], "checkpoint_signature_invalid", 2),
    "Ed25519 stripped": (lambda ls: [ls[0], {k: v for k, v in ls[1].items() if k != "signature_ed25519"}],
                         "ed25519_signature_missing", 2),
    "relabelled v2": (lambda ls: [ls[0] | {"signature": "v2." + ls[0]["signature"][3:]}, ls[1]],
                      "checkpoint_signature_invalid", 1),
    # the earliest broken line is named, whichever check finds it (the stripped one is told on a second look)
    "stripped, then one edited": (lambda ls: [{k: v for k, v in ls[0].items() if k != "signature_ed25519"},
                                              ls[1] | {"last_hash": "0" * 64}], "ed25519_signature_missing", 1),
    "Ed25519 not a string": (lambda ls: [ls[0] | {"signature_ed25519": 7}, ls[1]], "line_unreadable", 1),
    "a line no writer wrote": (lambda ls: [*ls, "{"], "line_unreadable", 3),
    "every line stripped": (lambda ls: [{k: v for k, v in line.items() if k != "signature_ed25519"} | {
        "signature": "v2." + line["signature"][3:]} for line in ls], "ed25519_signature_missing", None),
    "emptied": (lambda _ls: [], "mirror_empty", None),
}


def _write_lines(path: Path, lines: list[Any]) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


@pytest.mark.parametrize("tampering", list(MIRROR_TAMPERINGS))
def test_a_mirror_file_is_checked_with_the_public_key_alone_and_each_tampering_told_with_exit_3(
        ledger: Settings, tmp_path: Path, audit_cli: Callable[..., tuple], tampering: str) -> None:
    """Only the checkpoint key's holder could check a checkpoint, and that key also signs. `govrag audit
    verify-mirror FILE --public-key PEM --deployment-id ID` checks the mirror with no secret and no database."""
    _append(ledger, 10)  # signed at rows 5 and 10
    public, deployment = _published(audit_cli, ledger, tmp_path / "audit.pub")
    auditor = _auditor(tmp_path)
    code, report = audit_cli(auditor, "verify-mirror", str(ledger.resolved_checkpoint_file), "--public-key",
                             str(public), "--deployment-id", deployment)
    assert (code, report["ok"], report["lines"], report["checked"], report["hmac_only"]) == (0, True, 2, 2, 0)
    assert (report["through_event_id"], report["deployment_id"]) == (10, deployment)
    assert not (auditor.data_dir / "master.key").exists()  # no key made or read on the auditor's machine
    tamper, reason, line = MIRROR_TAMPERINGS[tampering]
    edited = _write_lines(tmp_path / "edited.jsonl", tamper(_mirror_lines(ledger)))
    code, report = audit_cli(auditor, "verify-mirror", str(edited), "--public-key", str(public), "--deployment-id",
                             deployment)
    assert (code, report["ok"], report["reason"], report["first_broken"]) == (3, False, reason, line)


def test_the_mirror_check_tells_another_deployment_another_key_and_two_hashes_for_one_event(
        tmp_path: Path, audit_cli: Callable[..., tuple]) -> None:
    """Deployments sharing a checkpoint key share the public key: only the deployment id, which each checkpoint signs,
    tells their mirrors apart. Two lines signed by the key that give one event two hashes are told too."""
    settings = _keyed(_other(tmp_path), SHARED_KEY)
    _append(settings, 5)
    public, deployment = _published(audit_cli, settings, tmp_path / "audit.pub")
    mirror, auditor = settings.resolved_checkpoint_file, _auditor(tmp_path)

    def check(path: Path, pinned: str, key: Path = public) -> tuple[int, Any]:
        return audit_cli(auditor, "verify-mirror", str(path), "--public-key", str(key), "--deployment-id", pinned)

    assert check(mirror, deployment)[0] == 0
    assert check(mirror, str(uuid.uuid4()))[1]["reason"] == "checkpoint_signature_invalid"
    other_key, _ = _published(audit_cli, _keyed(_other(tmp_path / "c"), base64.b64encode(b"z" * 32).decode()),
                              tmp_path / "other.pub")
    assert check(mirror, deployment, other_key)[1]["reason"] == "checkpoint_signature_invalid"
    (line,) = _mirror_lines(settings)
    forked = _signed_line(base64.b64decode(SHARED_KEY), deployment, at=5, last_hash="f" * 64)
    code, report = check(_write_lines(tmp_path / "forked.jsonl", [line, forked]), deployment)
    assert (code, report["reason"], report["first_broken"]) == (3, "checkpoint_conflict", 2)
    with pytest.raises(SystemExit) as usage:  # the deployment id is required: a usage error, exit 2
        audit_cli(auditor, "verify-mirror", str(mirror), "--public-key", str(public))
    assert usage.value.code == 2


def test_an_hmac_only_mirror_line_dated_after_ed25519_signing_began_fails_the_public_key_check(
        ledger: Settings, tmp_path: Path, audit_cli: Callable[..., tuple]) -> None:
    """A line without an Ed25519 signature is taken, unchecked, as one the previous release signed while it was
    drained (LEGACY_GRACE after the earliest line signed with Ed25519), not later: made up then, it would pass."""
    from tests.support.legacy_checkpoint import v2_signature

    _append(ledger, 5)
    public, deployment = _published(audit_cli, ledger, tmp_path / "audit.pub")
    (line,) = _mirror_lines(ledger)
    signed_at = datetime.fromisoformat(line["created_at"])

    def hmac_only(at: datetime) -> dict[str, Any]:
        checkpoint = AuditCheckpoint(created_at=at.replace(tzinfo=None), kind="manual", last_event_id=5,
                                     last_hash=line["last_hash"], event_count=0)
        return {"created_at": at.isoformat(), "kind": "manual", "last_event_id": 5, "last_hash": line["last_hash"],
                "event_count": 0, "signature": v2_signature(b"x" * 32, deployment, checkpoint)}

    def check(lines: list[Any]) -> dict[str, Any]:
        path = _write_lines(tmp_path / "mirror.jsonl", lines)
        return audit_cli(_auditor(tmp_path), "verify-mirror", str(path), "--public-key", str(public),
                         "--deployment-id", deployment)[1]

    drained = check([line, hmac_only(signed_at + LEGACY_GRACE)])
    assert (drained["ok"], drained["checked"], drained["hmac_only"]) == (True, 1, 1)
    late = check([line, hmac_only(signed_at + LEGACY_GRACE + timedelta(seconds=1))])
    assert (late["ok"], late["reason"], late["first_broken"]) == (False, "ed25519_signature_missing", 2)


def test_the_documented_mirror_line_check_verifies_with_plain_cryptography(
        ledger: Settings, tmp_path: Path, audit_cli: Callable[..., tuple]) -> None:
    """docs/audit.md's recipe for a mirror line, as an auditor runs it with Python's `cryptography`."""
    _append(ledger, 10)
    public, deployment = _published(audit_cli, ledger, tmp_path / "audit.pub")
    namespace: dict[str, Any] = {}
    exec(_documented("python", "def verify_checkpoint_line"), namespace)  # noqa: S102 - the documented code, as run
    check = namespace["verify_checkpoint_line"]
    lines = ledger.resolved_checkpoint_file.read_text().splitlines()
    assert [check(line, str(public), deployment)["last_event_id"] for line in lines] == [5, 10]
    edited = json.dumps(json.loads(lines[0]) | {"last_hash": "0" * 64})
    with pytest.raises(InvalidSignature):
        check(edited, str(public), deployment)
    with pytest.raises(InvalidSignature):
        check(lines[0], str(public), str(uuid.uuid4()))


def _hmac_only(line: dict[str, Any], dated: datetime) -> dict[str, Any]:
    """The line without its Ed25519 signature, its HMAC labelled `v2.`, dated `dated`: to the public key, a line the
    previous release signed (HMAC only) and a `v3.` line stripped and relabelled are alike."""
    stripped = {name: value for name, value in line.items() if name != "signature_ed25519"}
    return stripped | {"signature": "v2." + line["signature"][3:], "created_at": dated.isoformat()}


def test_an_hmac_only_mirror_line_below_one_signed_after_the_drain_is_a_downgrade(
        tmp_path: Path, audit_cli: Callable[..., tuple]) -> None:
    """A `v3.` line stripped of its Ed25519 signature, relabelled `v2.` and dated within LEGACY_GRACE of the first
    line signed with Ed25519 (a date the public key cannot check on it) was counted hmac_only. Lines are appended as
    they are signed: one below a line signed after the previous release was drained was written when no release signs
    HMAC only, whatever date it gives itself. v2 lines above the first signed line (an older release's), or among
    those signed while the previous release was drained, are still the deployment's own."""
    settings = _keyed(_other(tmp_path), SHARED_KEY)
    _append(settings, 5)  # signed at row 5
    public, deployment = _published(audit_cli, settings, tmp_path / "audit.pub")
    (first,) = _mirror_lines(settings)
    began = datetime.fromisoformat(first["created_at"])
    after_drain = _signed_line(base64.b64decode(SHARED_KEY), deployment, at=5, last_hash=first["last_hash"],
                               created_at=began + LEGACY_GRACE + timedelta(seconds=1))

    def check(lines: list[dict[str, Any]]) -> tuple[int, Any]:
        return audit_cli(_auditor(tmp_path), "verify-mirror", str(_write_lines(tmp_path / "mirror.jsonl", lines)),
                         "--public-key", str(public), "--deployment-id", deployment)

    code, report = check([first, after_drain, _hmac_only(after_drain, began)])
    assert (code, report["ok"], report["reason"], report["first_broken"]) == (3, False, "ed25519_signature_missing", 3)
    assert "follows a line signed with Ed25519 after the previous release was drained" in report["message"]
    older_release = _hmac_only(first, began - timedelta(days=1))
    while_drained = _hmac_only(first, began + LEGACY_GRACE / 2)
    for legitimate in ([older_release, first, after_drain], [first, while_drained, after_drain]):
        code, report = check(legitimate)
        assert (code, report["ok"], report["checked"], report["hmac_only"]) == (0, True, 2, 1), report


NUMBER_SPELLINGS = {"last_event_id": ['"5"', '" 5"', '"+5"', '"05"', '"0_5"', "5.0", "5e0"],
                    "event_count": ['"0"', '"-0"', "-0", "false", "0.0", '"0_0"']}


def test_a_mirror_line_whose_numbers_are_not_spelt_as_written_is_refused(
        tmp_path: Path, audit_cli: Callable[..., tuple]) -> None:
    """A mirror line's event id and row count were read with int(): "5", " 5", "+5", 5.0, `false` (0), -0 were taken
    for the numbers signed, so a line no writer wrote verified, by the public key and by the checkpoint key. Only a
    JSON integer as json.dumps writes it is read now; any other spelling is a line no writer wrote."""
    settings = _keyed(_other(tmp_path), SHARED_KEY)
    _append(settings, 5)  # signed at row 5, its count 0
    public, deployment = _published(audit_cli, settings, tmp_path / "audit.pub")
    (line,) = _mirror_lines(settings)
    assert (line["last_event_id"], line["event_count"]) == (5, 0)
    mirror = settings.resolved_checkpoint_file

    def told(field: str, spelling: str) -> tuple[Any, ...]:
        mirror.write_text(json.dumps(line | {field: "SPELT"}).replace('"SPELT"', spelling) + "\n")
        code, report = audit_cli(_auditor(tmp_path), "verify-mirror", str(mirror), "--public-key", str(public),
                                 "--deployment-id", deployment)
        return code, report["reason"], report["first_broken"], _verified(settings)[:2]

    refused = (3, "line_unreadable", 1, (False, "mirror_line_unreadable"))
    assert {(field, spelling): found for field, spellings in NUMBER_SPELLINGS.items() for spelling in spellings
            if (found := told(field, spelling)) != refused} == {}
    assert told("last_event_id", "5") == (0, None, None, (True, None))  # as written


@pytest.fixture
def new_york(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The process's local time zone America/New_York (UTC-5 or -4) while the test runs, UTC's again after."""
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def test_a_checkpoint_read_back_from_sqlite_is_mirrored_at_its_utc_time(tmp_path: Path, new_york: None) -> None:
    """SQLite hands created_at back naive (UTC): the mirror line took it for local time (astimezone), so on a host
    east or west of UTC the line was dated hours off the time signed, and its signatures failed."""
    from audit import integrity, repository

    settings = _keyed(_other(tmp_path), SHARED_KEY)
    _append(settings, 5)  # signed at row 5
    with unit_of_work(settings.resolved_database_url) as session:
        (stored,) = repository.checkpoints(session)
        signer = integrity.signer_for(settings, session)
    assert stored.created_at.tzinfo is None  # as SQLite reads it back
    line = json.dumps(integrity._as_json(stored))
    assert json.loads(line)["created_at"] == stored.created_at.replace(tzinfo=UTC).isoformat()
    found = integrity.check_mirror([line], public_keys=[signer.public_key()], deployment_id=signer.deployment_id)
    assert (found.ok, found.checked) == (True, 1), found


@pytest.mark.parametrize("created_at", ["9999-12-31T23:59:59-01:00", "0001-01-01T00:00:00+01:00"])
@pytest.mark.parametrize("signed", [True, False])
def test_a_mirror_line_dated_outside_what_utc_can_hold_is_unreadable(created_at: str, signed: bool) -> None:
    """A date no UTC time is (year 9999 west of UTC, year 1 east of it) raised OverflowError out of the mirror check
    (and the keyed verify) instead of telling the line no writer wrote."""
    from audit import integrity

    signer = Signer(b"k" * 32, "deployment-1")
    line = {"created_at": created_at, "kind": "manual", "last_event_id": 5, "last_hash": "h", "event_count": 0,
            "signature": "v2.x"} | ({"signature": "v3.x", "signature_ed25519": "AAAA"} if signed else {})
    assert integrity._from_json(json.dumps(line)) is None
    found = integrity.check_mirror([json.dumps(line)], public_keys=[signer.public_key()],
                                   deployment_id="deployment-1")
    assert (found.ok, found.reason, found.first_broken) == (False, "line_unreadable", 1)


OLD_KEY, NEW_KEY = base64.b64encode(b"o" * 32).decode(), base64.b64encode(b"n" * 32).decode()


def test_a_changed_checkpoint_key_verifies_what_the_previous_one_signed_through_the_checkpoint_cut_after_it(
        ledger: Settings, tmp_path: Path, audit_cli: Callable[..., tuple], monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """Changing GOVRAG_AUDIT_CHECKPOINT_KEY left every checkpoint signed before failing verification, and the mirror
    the new public key: no rotation short of losing the ledger's proof. The previous key
    (GOVRAG_AUDIT_CHECKPOINT_PREVIOUS_KEYS) checks what it signed through the checkpoint the new key signs at the end
    of the chain at once, and no later one (a purge made up with the leaked key); several public keys check a mirror."""
    old = _keyed(ledger, OLD_KEY)
    _append(old, 10)  # signed at rows 5 and 10 with the old key
    old_public, deployment = _published(audit_cli, old, tmp_path / "old.pub")
    new = _keyed(ledger, NEW_KEY)
    assert audit_cli(new, "verify")[1]["reason"] == "checkpoint_signature_invalid"  # what a change alone does
    monkeypatch.setenv("GOVRAG_AUDIT_CHECKPOINT_PREVIOUS_KEYS", f"{base64.b64encode(b'x' * 32).decode()},{OLD_KEY}")
    code, report = audit_cli(new, "verify")
    assert (code, report["reason"]) == (3, "checkpoint_signature_invalid")  # not yet cut with the new key
    assert audit_cli(new, "checkpoint") == (0, {"checkpointed_event_id": 10, "signed": True})
    code, report = audit_cli(new, "verify")
    assert (code, report["ok"], report["checkpoints_checked"]) == (0, True, 6)  # each in the database and mirror
    new_public, _ = _published(audit_cli, new, tmp_path / "new.pub")
    mirror, auditor = str(new.resolved_checkpoint_file), _auditor(tmp_path)
    code, report = audit_cli(auditor, "verify-mirror", mirror, "--public-key", str(new_public), "--public-key",
                             str(old_public), "--deployment-id", deployment)
    assert (code, report["ok"], report["checked"], report["through_event_id"]) == (0, True, 3, 10)
    code, report = audit_cli(auditor, "verify-mirror", mirror, "--public-key", str(new_public), "--deployment-id",
                             deployment)
    assert (code, report["reason"], report["first_broken"]) == (3, "checkpoint_signature_invalid", 1)
    _append(new, 2)
    made_up = _signed_line(base64.b64decode(OLD_KEY), deployment, at=12, last_hash="f" * 64)
    _write_lines(new.resolved_checkpoint_file, [*_mirror_lines(new), made_up | {"kind": "purge"}])
    code, report = audit_cli(new, "verify")
    assert (code, report["reason"], report["first_broken"]) == (3, "checkpoint_signature_invalid", 12)
    said = caplog.text + json.dumps(report)
    assert OLD_KEY not in said and NEW_KEY not in said


def test_a_previous_checkpoint_key_that_does_not_parse_is_refused_without_quoting_it() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as refused:
        Settings(audit_checkpoint_previous_keys=SecretStr(f"{OLD_KEY},not-a-key-c2VjcmV0"))
    assert "GOVRAG_AUDIT_CHECKPOINT_PREVIOUS_KEYS must be comma-separated base64" in str(refused.value)
    assert "not-a-key" not in str(refused.value) and OLD_KEY not in str(refused.value)


def _shell(settings: Settings, tmp_path: Path) -> dict[str, str]:
    """The environment of a shell running docs/audit.md's commands on the deployment: `govrag` (a shim calling this
    checkout's CLI) on its database, with its checkpoint key."""
    shim = tmp_path / "bin" / "govrag"
    shim.parent.mkdir(exist_ok=True)
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m api.cli "$@"\n')
    shim.chmod(0o755)
    assert settings.audit_checkpoint_key is not None
    return {**os.environ, "GOVRAG_DATABASE_URL": settings.resolved_database_url,
            "GOVRAG_DATA_DIR": str(settings.data_dir),
            "GOVRAG_AUDIT_CHECKPOINT_KEY": settings.audit_checkpoint_key.get_secret_value(),
            "PYTHONPATH": str(AUDIT_DOC.parents[1]),
            "PATH": f"{shim.parent}:{Path(sys.executable).parent}:{os.environ['PATH']}"}


def test_the_documented_rotation_runs_and_leaves_the_ledger_verified(
        ledger: Settings, tmp_path: Path, audit_cli: Callable[..., tuple]) -> None:
    """docs/audit.md's rotation steps, run as written with `govrag` on the deployment's database."""
    old = _keyed(ledger, OLD_KEY)
    _append(old, 5)
    env = _shell(old, tmp_path)
    env.pop("GOVRAG_AUDIT_CHECKPOINT_PREVIOUS_KEYS", None)
    run = subprocess.run(["bash", "-ec", _documented("bash", "GOVRAG_AUDIT_CHECKPOINT_PREVIOUS_KEYS")],  # noqa: S603, S607
                         cwd=tmp_path, capture_output=True, text=True, check=False, env=env)
    assert run.returncode == 0, run.stderr
    checkpointed, verified = (json.loads(line) for line in run.stdout.splitlines())
    assert checkpointed["signed"] is True and verified["ok"] is True
    assert (tmp_path / "govrag-audit.pub").read_bytes() != (tmp_path / "govrag-audit-old.pub").read_bytes()
    assert OLD_KEY not in run.stdout + run.stderr
    deployment = verified["deployment_id"]
    code, report = audit_cli(_auditor(tmp_path), "verify-mirror", str(old.resolved_checkpoint_file), "--public-key",
                             str(tmp_path / "govrag-audit.pub"), "--public-key", str(tmp_path / "govrag-audit-old.pub"),
                             "--deployment-id", deployment)
    assert (code, report["checked"]) == (0, 2)


def test_a_mirror_line_of_the_previous_key_holds_only_through_the_current_keys_lines() -> None:
    """verify-mirror took a line under any public key given: whoever holds the leaked previous key could add a line for
    an event past the rotation (the hash of rows made up, or of a purge) that an auditor would check exports against.
    A previous key's line is taken as `verify` takes its checkpoints: up to the newest event a current-key line
    anchors."""
    from audit import integrity

    old, new = base64.b64decode(OLD_KEY), base64.b64decode(NEW_KEY)
    lines = [_signed_line(old, "deployment-1", at=5, last_hash="a" * 64),
             _signed_line(old, "deployment-1", at=10, last_hash="b" * 64),
             _signed_line(new, "deployment-1", at=10, last_hash="b" * 64)]
    keys = [Signer(new, "deployment-1").public_key(), Signer(old, "deployment-1").public_key()]
    found = integrity.check_mirror(map(json.dumps, lines), public_keys=keys, deployment_id="deployment-1")
    assert (found.ok, found.checked, found.through_event_id) == (True, 3, 10), found
    forged = [*lines, _signed_line(old, "deployment-1", at=12, last_hash="f" * 64)]
    found = integrity.check_mirror(map(json.dumps, forged), public_keys=keys, deployment_id="deployment-1")
    assert (found.ok, found.reason, found.first_broken) == (False, "checkpoint_signature_invalid", 4), found
    before_the_cut = integrity.check_mirror(map(json.dumps, lines[:2]), public_keys=keys, deployment_id="deployment-1")
    assert (before_the_cut.ok, before_the_cut.first_broken) == (False, 1), before_the_cut


def test_the_current_checkpoint_key_among_the_previous_ones_is_refused_without_quoting_it() -> None:
    """The same key in both settings (the new one never set) left the old key signing, the rotation seeming done."""
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as refused:
        Settings(audit_checkpoint_key=SecretStr(OLD_KEY),
                 audit_checkpoint_previous_keys=SecretStr(f"{NEW_KEY}, {OLD_KEY} "))
    assert "GOVRAG_AUDIT_CHECKPOINT_PREVIOUS_KEYS holds GOVRAG_AUDIT_CHECKPOINT_KEY itself" in str(refused.value)
    assert OLD_KEY not in str(refused.value) and NEW_KEY not in str(refused.value)


@pytest.mark.parametrize(("given", "keys"), [(", ,", 0), ("", 0), (f" {OLD_KEY} ,, ", 1), (f"{OLD_KEY},{OLD_KEY}", 2)])
def test_blank_entries_of_the_previous_checkpoint_keys_are_skipped(given: str, keys: int) -> None:
    from audit import integrity

    settings = Settings(audit_checkpoint_key=SecretStr(NEW_KEY), audit_checkpoint_previous_keys=SecretStr(given))
    previous = integrity.previous_signers(settings, "deployment-1")
    assert [signer.key for signer in previous] == [base64.b64decode(OLD_KEY)] * keys
    assert OLD_KEY not in repr(settings) + repr(previous) + settings.model_dump_json()


def _purged_with_cli(audit_cli: Callable[..., tuple], settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Any:
    """`govrag audit purge` two days later, with one day's retention: every row so far expires but the newest."""
    from audit import integrity

    monkeypatch.setenv("GOVRAG_AUDIT_RETENTION_DAYS", "1")
    monkeypatch.setattr(integrity, "utcnow", lambda: utcnow() + timedelta(days=2))
    try:
        return audit_cli(settings, "purge", "--actor", "ops")
    finally:
        monkeypatch.setattr(integrity, "utcnow", utcnow)
        monkeypatch.delenv("GOVRAG_AUDIT_RETENTION_DAYS")


def _rotated_after_a_purge(ledger: Settings, audit_cli: Callable[..., tuple],
                           monkeypatch: pytest.MonkeyPatch) -> tuple[Settings, str]:
    """Rows 1 to 5 purged with the old key (its `retention_purge` event row 6), rows 7 to 10 added, then the key
    changed and `govrag audit checkpoint` run: the new key's settings and the deployment id."""
    old = _keyed(ledger, OLD_KEY)
    _append(old, 5)
    assert _purged_with_cli(audit_cli, old, monkeypatch) == (0, {"purged": 5})
    _append(old, 4)
    new = _keyed(ledger, NEW_KEY)
    monkeypatch.setenv("GOVRAG_AUDIT_CHECKPOINT_PREVIOUS_KEYS", OLD_KEY)
    assert audit_cli(new, "checkpoint") == (0, {"checkpointed_event_id": 10, "signed": True})
    code, report = audit_cli(new, "verify")
    assert (code, report["ok"], report["purged_through"]) == (0, True, 5), report  # the old key's purge holds
    return new, report["deployment_id"]


def test_a_purge_the_leaked_previous_key_signs_before_the_cut_fails_verification(
        ledger: Settings, audit_cli: Callable[..., tuple], monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """After a rotation, whoever held the old key could sign a purge checkpoint at an event before the new key's
    checkpoint (the cut), delete the rows up to it, and `verify` passed: nothing tied a purge to its `retention_purge`
    event. A purge only a previous key signed is taken now only if such an event, before the cut, records it (else
    `purge_unrecorded`: its signature holds)."""
    new, deployment = _rotated_after_a_purge(ledger, audit_cli, monkeypatch)
    row_8 = _sql_rows(new, "SELECT hash FROM retrieval_events WHERE id = 8")[0][0]
    forged = _signed_line(base64.b64decode(OLD_KEY), deployment, at=8, last_hash=row_8, kind="purge", event_count=7)
    _write_lines(new.resolved_checkpoint_file, [*_mirror_lines(new), forged])
    _sql_rows(new, "DELETE FROM retrieval_events WHERE id <= 8")
    code, report = audit_cli(new, "verify")
    assert (code, report["ok"], report["reason"], report["first_broken"]) == (
        3, False, "purge_unrecorded", 8), report
    said = caplog.text + json.dumps(report)
    assert OLD_KEY not in said and NEW_KEY not in said


def test_rows_left_below_a_purge_no_event_records_are_told_as_that_purge(
        ledger: Settings, audit_cli: Callable[..., tuple], monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows at or below the newest purge fail the walk (`chain_link_broken` at the lowest): none may be left there.
    Below a purge only a previous key signed and no event records, they are what that purge does not account for (made
    up with the leaked key, or one cut short before its rows went): the purge is what failed, not a row. Walking the
    rows below a failing checkpoint too must not name the lowest row instead: `purge_unrecorded` at the purge's event,
    as with the rows deleted."""
    new, deployment = _rotated_after_a_purge(ledger, audit_cli, monkeypatch)
    row_8 = _sql_rows(new, "SELECT hash FROM retrieval_events WHERE id = 8")[0][0]
    forged = _signed_line(base64.b64decode(OLD_KEY), deployment, at=8, last_hash=row_8, kind="purge", event_count=7)
    _write_lines(new.resolved_checkpoint_file, [*_mirror_lines(new), forged])  # rows 6 to 8 left
    code, report = audit_cli(new, "verify")
    assert (code, report["ok"], report["reason"], report["first_broken"]) == (
        3, False, "purge_unrecorded", 8), report


def test_a_checkpoint_giving_the_purged_event_another_hash_fails_verification(
        ledger: Settings, audit_cli: Callable[..., tuple], monkeypatch: pytest.MonkeyPatch) -> None:
    """Verification starts past the newest purge, so no row is left to check a checkpoint at the purged event
    against: the old key's holder could add one giving it another hash (the walk checks only events past the purge),
    and `verify` passed. Two accepted checkpoints that disagree on the purged event now fail it
    (`checkpoint_conflict`)."""
    new, deployment = _rotated_after_a_purge(ledger, audit_cli, monkeypatch)
    other = _signed_line(base64.b64decode(OLD_KEY), deployment, at=5, last_hash="ab" * 32, kind="purge",
                         event_count=5)
    _write_lines(new.resolved_checkpoint_file, [*_mirror_lines(new), other])
    code, report = audit_cli(new, "verify")
    assert (code, report["ok"], report["reason"], report["first_broken"]) == (
        3, False, "checkpoint_conflict", 5), report


def test_a_purge_the_new_key_signs_after_a_rotation_verifies_beside_the_old_keys(
        ledger: Settings, audit_cli: Callable[..., tuple], monkeypatch: pytest.MonkeyPatch) -> None:
    new, _ = _rotated_after_a_purge(ledger, audit_cli, monkeypatch)
    _append(new, 2)  # rows 11 and 12
    assert _purged_with_cli(audit_cli, new, monkeypatch) == (0, {"purged": 7})
    code, report = audit_cli(new, "verify")
    assert (code, report["ok"], report["purged_through"], report["checked"]) == (0, True, 12, 1), report


def _sql_rows(settings: Settings, statement: str) -> list[Any]:
    with unit_of_work(settings.resolved_database_url) as session:
        result = session.execute(text(statement))
        rows = list(result) if result.returns_rows else []
        session.commit()
    return rows


def _purged_without_its_event(settings: Settings) -> None:
    """Rows 1 to 5 purged as a release before one-transaction purges left a purge an outage cut short: its checkpoint
    signed, committed and mirrored, the rows deleted, and no `retention_purge` event recording it."""
    from audit import integrity, repository

    with unit_of_work(settings.resolved_database_url) as session:
        row_5 = session.get(RetrievalEvent, 5)
        assert row_5 is not None
        checkpoint = integrity.make_checkpoint(session=session, settings=settings, event=row_5, kind="purge",
                                               event_count=5)
        repository.delete_through(session, 5)
        session.commit()
    integrity.mirror_checkpoint(settings, checkpoint)


def test_a_purge_of_the_previous_key_no_event_records_is_told_apart_from_a_bad_signature(
        ledger: Settings, audit_cli: Callable[..., tuple], monkeypatch: pytest.MonkeyPatch) -> None:
    """After a rotation, a purge only the previous key signed and no `retention_purge` event records failed as
    `checkpoint_signature_invalid`, though its signatures hold: an auditor looked for an edited checkpoint. It is
    `purge_unrecorded` now; a purge checkpoint whose signature fails is still `checkpoint_signature_invalid`, and a
    purge with the new key moves verification past the unrecorded one, as docs/audit.md says."""
    old = _keyed(ledger, OLD_KEY)
    _append(old, 6)
    _purged_without_its_event(old)
    _append(old, 4)  # rows 7 to 10
    new = _keyed(ledger, NEW_KEY)
    monkeypatch.setenv("GOVRAG_AUDIT_CHECKPOINT_PREVIOUS_KEYS", OLD_KEY)
    assert audit_cli(new, "checkpoint") == (0, {"checkpointed_event_id": 10, "signed": True})
    code, report = audit_cli(new, "verify")
    assert (code, report["ok"], report["reason"], report["first_broken"]) == (3, False, "purge_unrecorded", 5), report
    lines = _mirror_lines(new)
    (purge_line,) = [line for line in lines if line["kind"] == "purge"]
    _write_lines(new.resolved_checkpoint_file, [line | {"last_hash": "0" * 64} if line is purge_line else line
                                                for line in lines])
    code, report = audit_cli(new, "verify")
    assert (code, report["reason"], report["first_broken"]) == (3, "checkpoint_signature_invalid", 5), report
    _write_lines(new.resolved_checkpoint_file, lines)
    assert _purged_with_cli(audit_cli, new, monkeypatch) == (0, {"purged": 5})
    code, report = audit_cli(new, "verify")
    assert (code, report["ok"], report["purged_through"]) == (0, True, 10), report


@pytest.mark.parametrize("where", ["database", "mirror"])
def test_two_checkpoints_giving_one_event_two_hashes_fail_verification(
        ledger: Settings, audit_cli: Callable[..., tuple], where: str) -> None:
    """The walk held one hash per event, the last checkpoint read for it: a signed checkpoint giving an event another
    hash than the row (by a previous key's holder, before the cut) went unseen as long as another checkpoint, read
    after it, gave the row's. Verify told it only on the purged event; now any event two accepted checkpoints give two
    hashes fails with `checkpoint_conflict` at that event, as verify-mirror tells two lines."""
    from audit import integrity

    settings = _keyed(ledger, NEW_KEY)
    _append(settings, 10)  # signed at rows 5 and 10
    assert _verified(settings) == (True, None, 4)
    with unit_of_work(settings.resolved_database_url) as session:
        deployment = integrity.signer_for(settings, session).deployment_id
    forked = _signed_line(base64.b64decode(NEW_KEY), deployment, at=5, last_hash="f" * 64)
    if where == "mirror":  # read before the lines the ledger wrote
        _write_lines(settings.resolved_checkpoint_file, [forked, *_mirror_lines(settings)])
    else:  # read before every mirror line
        forked_row = integrity._from_json(json.dumps(forked))
        with unit_of_work(settings.resolved_database_url) as session:
            session.add(forked_row)
            session.commit()
    code, report = audit_cli(settings, "verify")
    assert (code, report["ok"], report["reason"], report["first_broken"]) == (
        3, False, "checkpoint_conflict", 5), report


def test_public_key_all_prints_each_previous_key_after_the_current_one(
        ledger: Settings, tmp_path: Path, audit_cli: Callable[..., tuple], monkeypatch: pytest.MonkeyPatch) -> None:
    """`govrag audit public-key` printed the current key alone: after a rotation, an operator who had not kept the
    old public key could not hand auditors the one checking what was signed before it. `--all` prints the public key
    of each previous checkpoint key (GOVRAG_AUDIT_CHECKPOINT_PREVIOUS_KEYS) after the current one, each key id on
    stderr, and never a secret; without it the output is as it was. docs/audit.md's recipe splits them into the files
    verify-mirror takes."""
    old = _keyed(ledger, OLD_KEY)
    _append(old, 5)  # signed at row 5 with the old key
    code, (old_pem, old_said) = audit_cli(old, "public-key")
    old_key_id = re.fullmatch(r"key_id ([0-9a-f]{16}), deployment_id \S+\n", old_said)[1]  # type: ignore[index]
    new = _keyed(ledger, NEW_KEY)
    monkeypatch.setenv("GOVRAG_AUDIT_CHECKPOINT_PREVIOUS_KEYS", OLD_KEY)
    assert audit_cli(new, "checkpoint") == (0, {"checkpointed_event_id": 5, "signed": True})
    current_pem, deployment = _published(audit_cli, new, tmp_path / "current.pub")
    current = current_pem.read_text(encoding="ascii")
    code, (printed, said) = audit_cli(new, "public-key", "--all")
    assert (code, printed) == (0, current + old_pem) and current != old_pem
    assert said.splitlines()[1:] == [f"previous key_id {old_key_id}"], said
    assert said.splitlines()[0] == audit_cli(new, "public-key")[1][1].rstrip("\n")
    assert "PRIVATE" not in printed and OLD_KEY not in printed + said and NEW_KEY not in printed + said
    run = subprocess.run(["bash", "-ec", _documented("bash", "public-key --all")],  # noqa: S603, S607
                         cwd=tmp_path, capture_output=True, text=True, check=False, env=_shell(new, tmp_path))
    assert run.returncode == 0, run.stderr
    split = sorted(tmp_path.glob("govrag-audit-key-*.pub"))
    assert [path.read_text(encoding="ascii") for path in split] == [current, old_pem]
    keys = [arg for path in split for arg in ("--public-key", str(path))]
    code, report = audit_cli(_auditor(tmp_path), "verify-mirror", str(new.resolved_checkpoint_file), *keys,
                             "--deployment-id", deployment)
    assert (code, report["ok"], report["checked"]) == (0, True, 2), report


def test_the_lowest_of_two_broken_is_named_by_verify_verify_export_and_verify_mirror(
        ledger: Settings, tmp_path: Path, audit_cli: Callable[..., tuple], cli: Callable[..., tuple]) -> None:
    """`first_broken` is the lowest row, event or line found broken, whichever check found it. `verify` named the
    last checkpoint whose signature failed (in the order read: the database's, then the mirror's), and verify-export
    a pair of rows out of order below a changed row: each names the lowest now."""
    ledger = _keyed(ledger, NEW_KEY)
    _append(ledger, 10)  # signed at rows 5 and 10
    public, deployment = _published(audit_cli, ledger, tmp_path / "audit.pub")
    export = _export(ledger, tmp_path / "export.jsonl")  # rows 1 to 10; the export itself is row 11
    *rows, manifest = _lines(export)
    edited = [rows[0], rows[1].replace(b'"alice"', b'"mallory"'), *rows[2:4], rows[5], rows[4], *rows[6:], manifest]
    code, report = cli(_auditor(tmp_path), _written(export, edited), "--public-key", str(public), "--deployment-id",
                       deployment)
    assert (code, report["reason"], report["first_broken"]) == (3, "row_changed", 2), report
    lines = _mirror_lines(ledger)
    mirror = _write_lines(tmp_path / "edited-mirror.jsonl",
                          [line | {"last_hash": "0" * 64} if n < 2 else line for n, line in enumerate(lines)])
    code, report = audit_cli(_auditor(tmp_path), "verify-mirror", str(mirror), "--public-key", str(public),
                             "--deployment-id", deployment)
    assert (code, report["reason"], report["first_broken"]) == (3, "checkpoint_signature_invalid", 1), report
    _sql_rows(ledger, "UPDATE audit_checkpoints SET last_hash = 'tampered' WHERE last_event_id IN (5, 10)")
    code, report = audit_cli(ledger, "verify")
    assert (code, report["reason"], report["first_broken"]) == (3, "checkpoint_signature_invalid", 5), report


def test_verify_names_a_changed_row_below_a_failing_checkpoint(
        ledger: Settings, audit_cli: Callable[..., tuple]) -> None:
    """`verify` checked the checkpoints before any row and, one failing, said it without reading a row: a row changed
    below it went unnamed, `first_broken` the checkpoint's event. The rows are walked too now, and the lowest event
    either check finds broken is named (the checkpoint's reason at its own event)."""
    ledger = _keyed(ledger, NEW_KEY)
    _append(ledger, 10)  # signed at rows 5 and 10
    _sql_rows(ledger, "UPDATE audit_checkpoints SET last_hash = 'tampered' WHERE last_event_id = 5")
    for changed, told in ((7, ("checkpoint_signature_invalid", 5)), (5, ("checkpoint_signature_invalid", 5)),
                          (2, ("content_changed", 2))):
        with unit_of_work(ledger.resolved_database_url) as session:
            session.execute(text("UPDATE retrieval_events SET latency_ms = 9 WHERE id = :id"), {"id": changed})
            session.commit()
        code, report = audit_cli(ledger, "verify")
        assert (code, report["reason"], report["first_broken"]) == (3, *told), report


@pytest.mark.parametrize("line", [b"{", b"\xff"], ids=["no checkpoint", "not UTF-8"])
def test_verify_names_a_mirror_line_that_reads_as_no_checkpoint_by_its_line_number(
        ledger: Settings, audit_cli: Callable[..., tuple], line: bytes) -> None:
    """`verify` took a mirror line that reads as no checkpoint for a checkpoint at event 0 whose signature fails:
    `first_broken` 0, an event no ledger holds, and nothing said where the line is (a line not UTF-8 ended the command
    in an error). It is `mirror_line_unreadable` now, no event named, `mirror_line` its line number as verify-mirror
    numbers it (blank lines counted)."""
    _append(ledger, 10)  # signed and mirrored at rows 5 and 10: lines 1 and 2
    with ledger.resolved_checkpoint_file.open("ab") as mirror:
        mirror.write(b"\n" + line + b"\n")  # line 3 blank
    code, report = audit_cli(ledger, "verify")
    assert (code, report["ok"], report["reason"], report["first_broken"], report["mirror_line"]) == (
        3, False, "mirror_line_unreadable", None, 4), report


def _rotated(ledger: Settings, audit_cli: Callable[..., tuple], monkeypatch: pytest.MonkeyPatch,
             tmp_path: Path) -> tuple[Settings, Path, str]:
    """Rows 1 to 5 signed with the old key and exported, then the key changed and the end checkpointed with the new
    one: the new key's settings (the old one in GOVRAG_AUDIT_CHECKPOINT_PREVIOUS_KEYS), the export and the old key's
    PEM."""
    old = _keyed(ledger, OLD_KEY)
    _append(old, 5)
    export = _export(old, tmp_path / "signed-before.jsonl")
    old_pem = audit_cli(old, "public-key")[1][0]
    new = Settings(data_dir=ledger.data_dir, database_url=ledger.resolved_database_url, audit_checkpoint_every=5,
                   audit_checkpoint_key=SecretStr(NEW_KEY), audit_checkpoint_previous_keys=SecretStr(OLD_KEY),
                   admins=[ADMIN.subject], broker_url="memory://", inprocess_worker=False)
    monkeypatch.setenv("GOVRAG_AUDIT_CHECKPOINT_PREVIOUS_KEYS", OLD_KEY)
    assert audit_cli(new, "checkpoint") == (0, {"checkpointed_event_id": 6, "signed": True})
    return new, export, old_pem


def test_verify_mirror_reads_every_key_of_the_file_public_key_all_writes(
        ledger: Settings, tmp_path: Path, audit_cli: Callable[..., tuple], monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """`--public-key` read the first key of a PEM file alone: the file `govrag audit public-key --all` writes, given
    whole, checked the mirror with the current key only, and the lines the previous key signed failed. Every key in
    the file is taken now, in its order (the current one first); verify-export, which checks with one key, refuses a
    file holding several, saying so (exit 2), rather than check with its first."""
    new, export, old_pem = _rotated(ledger, audit_cli, monkeypatch, tmp_path)
    code, (printed, said) = audit_cli(new, "public-key", "--all")
    every = tmp_path / "every.pub"
    every.write_text(printed, encoding="ascii")
    deployment = re.match(r"key_id ([0-9a-f]{16}), deployment_id (\S+)\n", said)
    assert code == 0 and deployment is not None and printed.endswith(old_pem), said
    code, report = audit_cli(_auditor(tmp_path), "verify-mirror", str(new.resolved_checkpoint_file), "--public-key",
                             str(every), "--deployment-id", deployment[2])
    assert (code, report["ok"], report["checked"], report["key_id"]) == (0, True, 3, deployment[1]), report
    with pytest.raises(SystemExit) as usage:
        audit_cli(_auditor(tmp_path), "verify-export", str(export), "--public-key", str(every), "--deployment-id",
                  deployment[2])
    assert usage.value.code == 2
    assert "holds 2 public keys; give the file of the one key the manifest's key_id names" in capsys.readouterr().err


def test_the_api_serves_the_previous_public_keys_after_a_rotation(
        ledger: Settings, tmp_path: Path, audit_cli: Callable[..., tuple], monkeypatch: pytest.MonkeyPatch,
        clean_logging: None) -> None:
    """`GET /v1/audit/public-key` served the current key alone, where `govrag audit public-key --all` also prints
    the previous ones: after a rotation an auditor going through the API could not get the key that checks an export
    signed before it. The response now lists them in `previous` (each as the current key is given, in the order of
    GOVRAG_AUDIT_CHECKPOINT_PREVIOUS_KEYS), its other fields as they were, under the same authorisation."""
    from api.app import create_app
    from retrieval.store import close_vector_store
    from tests.conftest import auth

    new, export, old_pem = _rotated(ledger, audit_cli, monkeypatch, tmp_path)
    current_pem, said = audit_cli(new, "public-key")[1]  # before the app logs to stderr too
    try:
        with TestClient(create_app(new)) as client:
            issuer = client.app.state.dev_issuer  # type: ignore[attr-defined]
            admin, stranger = (auth(issuer.issue(subject, [])) for subject in (ADMIN.subject, "stranger"))
            assert client.get("/v1/audit/public-key").status_code == 401
            assert client.get("/v1/audit/public-key", headers=stranger).status_code == 403
            response = client.get("/v1/audit/public-key", headers=admin)
            schema = client.app.openapi()["components"]["schemas"]["PublishedKeys"]  # type: ignore[attr-defined]
    finally:
        close_vector_store(new)
    assert response.status_code == 200, response.text
    published = response.json()
    assert (published["algorithm"], published["public_key_pem"]) == ("Ed25519", current_pem)
    assert said == f"key_id {published['key_id']}, deployment_id {published['deployment_id']}\n"
    (previous,) = published["previous"]
    assert set(previous) == {"algorithm", "key_id", "public_key_pem", "deployment_id"}
    assert (previous["public_key_pem"], previous["deployment_id"]) == (old_pem, published["deployment_id"])
    manifest = json.loads(_lines(export)[-1])["manifest"]
    assert manifest["key_id"] == previous["key_id"] != published["key_id"]
    with export.open("rb") as opened:
        checked = audit_service.verify_export(export_file=opened, settings=_auditor(tmp_path), session=None,
                                              public_key=load_public_key(previous["public_key_pem"].encode()),
                                              deployment_id=published["deployment_id"])
    assert (checked.ok, checked.signatures) == (True, ["ed25519"]), checked
    assert OLD_KEY not in response.text and NEW_KEY not in response.text and "PRIVATE" not in response.text
    assert set(schema["required"]) == {"key_id", "public_key_pem", "deployment_id", "previous"}, schema


def test_a_pem_file_cut_short_or_mismatched_is_refused_not_read_for_its_whole_blocks() -> None:
    """load_public_keys took each BEGIN-to-END block a backtracking pattern found (seconds for a 100 KB file of BEGIN
    lines, growing with the square of its size) and passed over the rest: an `--all` file cut short in its second key
    was read as the current key alone. The markers are read in one pass and must pair up, BEGIN then its END."""
    current, previous = (public_key_pem(Signer(base64.b64decode(key), "d").public_key()).encode()
                         for key in (NEW_KEY, OLD_KEY))
    assert len(load_public_keys(current + previous)) == 2
    for broken in (current + previous[:40], current + previous.replace(b"END PUBLIC", b"END PRIVATE"),
                   previous.replace(b"-----END PUBLIC KEY-----", b""), b"no key here"):
        with pytest.raises(ValueError, match="no PEM block, or one not closed by its END line"):
            load_public_keys(broken)


HUGE_LINE = 40 * 1024 * 1024  # bytes of one line without a newline: far past any line govrag writes


def _with_huge_line(path: Path, filler: bytes) -> None:
    """HUGE_LINE bytes of `filler` appended to `path`, no newline after them: a file cut, or hostile."""
    with path.open("ab") as handle:
        handle.write(filler * HUGE_LINE)


def _peak_while(run: Callable[[], Any]) -> tuple[Any, int]:
    """What `run` returned, and the most memory Python held for it at once (bytes)."""
    tracemalloc.start()
    try:
        return run(), tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("filler", [b"\0", b" "], ids=["no text", "blank"])
def test_a_huge_mirror_line_is_unreadable_and_never_read_whole_by_verify(ledger: Settings, filler: bytes) -> None:
    """`verify` read each mirror line whole: a mirror ending in 40 MiB without a newline (corrupt or hostile) was
    held in memory at once, and a blank one that long passed as a blank line. A line is read with a bound now
    (LONGEST_MIRROR_LINE bytes): a longer one, blank or not, is `mirror_line_unreadable`, its number said, and neither
    its rest nor the file's is read."""
    _append(ledger, 10)  # signed and mirrored at rows 5 and 10: lines 1 and 2
    _with_huge_line(ledger.resolved_checkpoint_file, filler)
    with unit_of_work(ledger.resolved_database_url) as session:
        result, peak = _peak_while(lambda: audit_service.verify(session=session, settings=ledger))
    assert (result.ok, result.reason, result.mirror_line) == (False, "mirror_line_unreadable", 3)
    assert peak < HUGE_LINE / 8, peak


@pytest.mark.parametrize("filler", [b"\0", b" "], ids=["no text", "blank"])
def test_a_huge_mirror_line_is_unreadable_and_never_read_whole_by_verify_mirror(
        tmp_path: Path, audit_cli: Callable[..., tuple], filler: bytes) -> None:
    """`govrag audit verify-mirror` iterated the file, a whole line at a time, however long: a newline-free 40 MiB
    was held in memory at once (a blank one then passed). A line longer than LONGEST_MIRROR_LINE is `line_unreadable`
    now, its number said, read no further."""
    settings = _keyed(_other(tmp_path), SHARED_KEY)
    _append(settings, 5)  # signed at row 5: line 1
    public, deployment = _published(audit_cli, settings, tmp_path / "audit.pub")
    mirror = settings.resolved_checkpoint_file
    _with_huge_line(mirror, filler)
    (code, report), peak = _peak_while(lambda: audit_cli(
        _auditor(tmp_path), "verify-mirror", str(mirror), "--public-key", str(public), "--deployment-id", deployment))
    assert (code, report["reason"], report["first_broken"], report["lines"]) == (3, "line_unreadable", 2, 2), report
    assert peak < HUGE_LINE / 8, peak


def test_an_export_ending_in_a_huge_line_is_read_no_further_than_a_manifest_can_be(tmp_path: Path) -> None:
    """verify-export read the export's last line (its manifest) from the end, whole, however long: a file ending in
    40 MiB without a newline (cut, or hostile) was held in memory whole, copied again at each 64 KiB read. A last line
    longer than LONGEST_MANIFEST_LINE is no manifest (`manifest_missing`), and no more of it is read."""
    from audit.export import check_export

    export = tmp_path / "export.jsonl"
    export.write_bytes(b'{"row": 1}\n')
    _with_huge_line(export, b" ")
    with export.open("rb") as export_file:
        found, peak = _peak_while(lambda: check_export(export_file, by=Signer(b"k" * 32, "deployment-1"),
                                                       deployment_id=None))
    assert (found.ok, found.reason) == (False, "manifest_missing")
    assert peak < HUGE_LINE / 4, peak


def test_an_export_whose_manifest_would_be_longer_than_verify_export_reads_is_refused_unrecorded(
        ledger: Settings, tmp_path: Path) -> None:
    """verify-export reads a last line of at most LONGEST_MANIFEST_LINE as a manifest. A manifest lists the departments
    of its export's scope, its one part with no bound of its own: a compliance officer holding the role in some
    hundred thousand departments was given an export whose manifest no check would read. It is refused (conflict)
    before anything is recorded or read; a scope that fits is exported, and checks."""
    from audit import repository
    from core.errors import ErrorCode, GovragError

    _append(ledger, 2)
    # 2 ** 17 names of 63 characters, 67 bytes each as listed: 8.4 MiB, past LONGEST_MANIFEST_LINE (8 MiB)
    scopes = {"huge": {f"d{n:062d}" for n in range(2 ** 17)}, "fits": {"hr"}}
    with get_session_factory(ledger.resolved_database_url)() as session:
        newest = repository.max_event_id(session)
        with pytest.raises(GovragError) as refused:
            audit_service.export_events(session=session, settings=ledger, identity=ADMIN, scope=scopes["huge"],
                                        filters=ExportFilters(), fmt=ExportFormat.jsonl)
        assert (refused.value.code, repository.max_event_id(session)) == (ErrorCode.conflict, newest)
        export = tmp_path / "fits.jsonl"
        export.write_text("".join(audit_service.export_events(
            session=session, settings=ledger, identity=ADMIN, scope=scopes["fits"], filters=ExportFilters(),
            fmt=ExportFormat.jsonl)), encoding="utf-8")
        with export.open("rb") as export_file:
            assert audit_service.verify_export(export_file=export_file, settings=ledger, session=session).ok


def _with_hole_lines(path: Path, after: int, lengths: list[int], opening: bytes) -> int:
    """`path` with a line of each of `lengths` bytes (the first starting with `opening`, the rest NULs, read but never
    written: holes) put after its first `after` lines, its other lines (the manifest among them) after them; the
    number of the first line put."""
    lines = path.read_bytes().splitlines(keepends=True)
    with path.open("wb") as handle:
        handle.write(b"".join(lines[:after]) + opening)
        handle.seek(lengths[0] - len(opening) - 1, os.SEEK_CUR)
        handle.write(b"\n")
        for length in lengths[1:]:
            handle.seek(length - 1, os.SEEK_CUR)
            handle.write(b"\n")
        handle.write(b"".join(lines[after:]))
    return after + 1


def _largest_scope() -> set[str]:
    """As many 63-character department names as a manifest may list (`scope_fits_a_manifest`): some 124,000."""
    from audit.export import LONGEST_MANIFEST_LINE, scope_fits_a_manifest

    scope = {f"d{n:062d}" for n in range((LONGEST_MANIFEST_LINE - 64 * 1024) // 67)}
    assert scope_fits_a_manifest(scope) and not scope_fits_a_manifest(scope | {f"e{n:062d}" for n in range(1000)})
    return scope


# The longest row's line verify-export reads (audit.export.LONGEST_EXPORT_ROW), as README and docs/audit.md say it:
# written out here, so that on a version without the bound the tests below fail on what it does (the line read whole,
# `rows_unreadable`), not on a name it lacks.
LONGEST_EXPORT_ROW = 40 * 1024 * 1024


def test_an_export_row_is_read_within_the_longest_an_export_writes_and_no_further(
        ledger: Settings, tmp_path: Path, cli: Callable[..., tuple]) -> None:
    """verify-export read each row's line whole, however long: a line of 160 MiB in an export (edited, or hostile)
    was held in memory at once, the check then failing it as unreadable. A line is read with a bound now,
    LONGEST_EXPORT_ROW (40 MiB): a longer one is `row_too_long`, its line number said (`line`), not its content,
    neither its rest nor the file's read. The bound is the longest row an export writes: the `export` event of an
    export whose scope is as large as a manifest may list, which lists it three times, is read and checks in CSV."""
    from audit.export import LONGEST_MANIFEST_LINE

    _append(ledger, 2)
    for fmt in ExportFormat:
        export = _export(ledger, tmp_path / f"export.{fmt.value}", fmt)
        line = _with_hole_lines(export, 2, [4 * LONGEST_EXPORT_ROW], b'{"id": 3, "forged": "')
        (code, report), peak = _peak_while(functools.partial(cli, ledger, export))
        assert (code, report["reason"]) == (3, "row_too_long"), (fmt, report, peak)
        assert (report["line"], report["first_broken"]) == (line, None), report
        assert report["message"].startswith(f"line {line} is longer than {LONGEST_EXPORT_ROW} bytes"), report
        assert peak < 3 * LONGEST_EXPORT_ROW, (fmt, peak)  # readline joins what it read: twice the bound
        assert "forged" not in json.dumps(report), report
        export.unlink()
    with get_session_factory(ledger.resolved_database_url)() as session:
        audit_service.export_events(session=session, settings=ledger, identity=ADMIN, scope=_largest_scope(),
                                    filters=ExportFilters(), fmt=ExportFormat.jsonl)  # recorded, its rows unread
    largest = _export(ledger, tmp_path / "largest.csv", ExportFormat.csv)
    with largest.open("rb") as export_file:
        assert 3 * LONGEST_MANIFEST_LINE < max(map(len, export_file)) < LONGEST_EXPORT_ROW
    assert cli(ledger, largest)[1]["ok"] is True


def test_a_csv_record_is_read_within_the_longest_row_an_export_writes_over_many_lines(
        ledger: Settings, tmp_path: Path, cli: Callable[..., tuple]) -> None:
    """A CSV cell holds line breaks (a question's): a record spans lines, and a quote never closed gathered every line
    after it, each within the bound, into one cell, the file's rest in memory. A record is bounded as a line is: past
    LONGEST_EXPORT_ROW bytes it is `row_too_long`, naming the line where it went past."""
    _append(ledger, 2)
    export = _export(ledger, tmp_path / "export.csv", ExportFormat.csv)
    piece = LONGEST_EXPORT_ROW // 16  # lines well within the bound: 16 of them reach it, the 17th goes past
    first = _with_hole_lines(export, 2, [piece] * 24, b'3,"forged')  # after the header and one row
    code, report = cli(ledger, export)
    assert (code, report["reason"]) == (3, "row_too_long"), report
    assert report["line"] == first + 16, report
    assert "forged" not in json.dumps(report)


_SOME_MIB = 8 * 1024 * 1024  # a line well within LONGEST_EXPORT_ROW, yet parsed into many times that
# Lines within the bound that no export writes: the parser built each value of the dense ones as an object (a dict of
# `{}` some 30 times its 3 bytes, a string of `"ab"` some 12 times its 5), before the check said the row was changed;
# the nested one it refuses past its depth (RecursionError, which must not end the command).
_NO_EXPORT_ROWS = {
    "empty objects": (b"{}," * (_SOME_MIB // 3))[:-1],
    "a list of empty objects": b'{"id": 3, "forged": [' + b"{}," * (_SOME_MIB // 3) + b"{}]}",
    "a list of short strings": b'{"id": 3, "forged": [' + b'"ab",' * (_SOME_MIB // 5) + b'"ab"]}',
    "nested past the parser's depth": b'{"id": 3, "forged": ' + b"[" * 50_000 + b"]" * 50_000 + b"}",
    "nested as deep as the line is long": b'{"id": 3, "forged": ' + b"[" * _SOME_MIB + b"}",
    "a CSV record of short cells": b"3,forged," + b"ab," * (_SOME_MIB // 3),
}


def _densest_row(settings: Settings) -> None:
    """A retrieval by a reader holding a role in each of 100,000 departments of 4 characters: lists of values as dense
    as a row an export writes has them (`"abcd", `)."""
    names = ["".join(letters) for letters in itertools.islice(itertools.product(string.ascii_lowercase, repeat=4),
                                                               100_000)]
    with get_session_factory(settings.resolved_database_url)() as session:
        audit_service.record_retrieval(session=session, settings=settings, record=replace(
            _record(0), departments_searched=names, roles=[f"r@{name}" for name in names]))


@pytest.mark.parametrize(("shape", "fmt"), [
    *((shape, fmt) for shape in _NO_EXPORT_ROWS if "CSV" not in shape
      for fmt in (ExportFormat.jsonl, ExportFormat.ocsf)),
    ("a CSV record of short cells", ExportFormat.csv)])
def test_a_row_shaped_as_no_export_row_is_told_by_its_line_unparsed(
        ledger: Settings, tmp_path: Path, cli: Callable[..., tuple], shape: str, fmt: ExportFormat) -> None:
    """verify-export parsed each row before anything said whether the rows were those signed: a hand-edited line
    within LONGEST_EXPORT_ROW made of tiny values had the parser hold some 25 times its length (a GiB for 39 MiB)
    before the check failed it as unreadable, naming no line. The body's raw bytes are hashed first: those signed
    are parsed as written; any other row is refused unparsed when its shape is none an export writes, `rows_unreadable`
    naming its line (`line`), not its content, with the memory of the line read alone; one nested past the parser's
    depth is the same report, not a RecursionError. The densest row an export writes, before it, is parsed, not
    refused: the report names the line after it."""
    _densest_row(ledger)
    _append(ledger, 2)
    export = _export(ledger, tmp_path / f"export.{fmt.value}", fmt)
    assert cli(ledger, export)[1]["ok"] is True
    *rows, manifest = _lines(export)
    after = 2 if fmt is ExportFormat.csv else 1  # the CSV header, then the densest row
    edited = _written(export, [*rows[:after], _NO_EXPORT_ROWS[shape], *rows[after:], manifest])
    (code, report), peak = _peak_while(functools.partial(cli, ledger, edited))
    line = after + 1
    assert (code, report["reason"], report["line"], report["first_broken"]) == (3, "rows_unreadable", line, None)
    assert report["message"].startswith(f"line {line} "), report
    assert "forged" not in json.dumps(report), report
    assert peak < 5 * _SOME_MIB, peak  # the line read (readline joins what it read: twice), the densest row parsed


# The most a row's line costs, in times its length, to check: the line read (readline joins what it read: twice), its
# text (Latin-1: as long), its values parsed; a CSV cell goes through the csv module's buffer, 4 bytes a character
# and grown by doubling. Decoded as UTF-8, one 4-byte character made the text 4 times the line, and its value too.
_WIDENED_AT_MOST = {ExportFormat.jsonl: 5, ExportFormat.ocsf: 5, ExportFormat.csv: 15}


@pytest.mark.parametrize("fmt", list(ExportFormat))
def test_a_row_with_one_character_beyond_latin_1_costs_no_more_to_check_than_one_without(
        ledger: Settings, tmp_path: Path, cli: Callable[..., tuple], fmt: ExportFormat) -> None:
    """verify-export decoded each line as UTF-8: one 4-byte character in a line (an emoji at the end of 8 MiB of
    ASCII) made the whole text 4 bytes a character, and the value parsed from it too, a line of 8 MiB held 9 times
    (21 in CSV, whose io.StringIO held it 4 bytes a character again). Lines are decoded a character a byte now
    (Latin-1): the rows parse as from UTF-8 (every byte JSON and CSV read is ASCII, no byte of a wider UTF-8
    character is), and an export whose rows hold characters of every width (a question, a group) still checks, each
    JSONL row's own hash computed again over its bytes."""
    with get_session_factory(ledger.resolved_database_url)() as session:
        audit_service.record_retrieval(session=session, settings=ledger, record=replace(
            _record(0), question_masked="où est l'été, 5 € ? \U0001F600 \u4e2d", groups=["équipe-\U0001F600"]))
    _append(ledger, 2)
    export = _export(ledger, tmp_path / f"export.{fmt.value}", fmt)
    assert cli(ledger, export)[1]["ok"] is True
    *rows, manifest = _lines(export)
    wide = "forged" + "a" * _SOME_MIB + "\U0001F600"
    line = (f'4,"{wide}"'.encode() if fmt is ExportFormat.csv else
            json.dumps(json.loads(rows[-1]) | {"forged": wide}, ensure_ascii=False).encode())
    (code, report), peak = _peak_while(functools.partial(cli, ledger, _written(export, [*rows, line, manifest])))
    assert (code, report["ok"]) == (3, False), report
    assert "forged" not in json.dumps(report), report
    assert peak < _WIDENED_AT_MOST[fmt] * _SOME_MIB, peak


@pytest.mark.parametrize("character", ["\u00e9", "\u20ac", "\U0001F600"], ids=["latin-1", "bmp", "astral"])
def test_a_jsonl_export_its_characters_escaped_is_body_changed_and_no_row_said_changed(
        ledger: Settings, tmp_path: Path, cli: Callable[..., tuple], character: str) -> None:
    """A JSONL row read a byte a character (Latin-1) is hashed again as its UTF-8 bytes: exact for the rows an export
    writes, whose characters beyond ASCII are those bytes (ensure_ascii=False), not for a row where a tool
    re-serialising the file (Python's json.dumps by default, jq -a) wrote them as escapes, `\\u00e9`: its content
    the very one signed, its row was said changed (`row_changed`, an escape within Latin-1) or unparsed
    (`rows_unreadable`, one beyond: the Latin-1 encoding failed), where docs/audit.md's check without the key finds
    that row's hash right. Such a row is left to the body's hash: `body_changed`, no row named. An escaped
    backslash's text (`\\\\u00e9`, a question's) is no escape: that export checks."""
    with get_session_factory(ledger.resolved_database_url)() as session:
        audit_service.record_retrieval(session=session, settings=ledger, record=replace(
            _record(0), question_masked=f"où, {character} ? C:\\u00e9"))
    _append(ledger, 2)
    export = _export(ledger, tmp_path / "export.jsonl")
    assert cli(ledger, export)[1]["ok"] is True
    *rows, manifest = _lines(export)
    escaped = [json.dumps(json.loads(row)).encode() for row in rows]  # ensure_ascii: escapes, all else as written
    assert escaped[0] != rows[0] and escaped[1:] == rows[1:]
    code, report = cli(ledger, _written(export, [*escaped, manifest]))
    assert (code, report["reason"], report["first_broken"], report["line"]) == (3, "body_changed", None, None), report


def test_a_csv_line_of_many_carriage_returns_is_cut_a_piece_at_a_time(ledger: Settings, tmp_path: Path,
                                                                       cli: Callable[..., tuple]) -> None:
    """A CSV line is cut at each \\r too before the csv module reads it (a cell's line break may be one): cut with
    bytes.splitlines, every piece of a line was listed at once, an object each, before the first was read, 22 times
    the line for one of `a\\r` (io.StringIO, before, held its text 4 bytes a character: 6 times). The pieces are
    found one at a time: the line is refused at its first piece, held about as the line and its text."""
    _append(ledger, 2)
    export = _export(ledger, tmp_path / "export.csv", ExportFormat.csv)
    *rows, manifest = _lines(export)
    edited = _written(export, [*rows, b"a\r" * (_SOME_MIB // 2), manifest])
    (code, report), peak = _peak_while(functools.partial(cli, ledger, edited))
    assert (code, report["reason"], report["line"]) == (3, "rows_unreadable", len(rows) + 1), report
    assert peak < 4 * _SOME_MIB, peak


class _RewrittenAsItIsRead(io.FileIO):
    """An export file a writer rewrites in place (`rewritten`, the same length) when its reader comes to the line at
    offset `at` for the `nth` time: what a file on a share another machine writes, or a FUSE file, can do between two
    reads, or during one. Counts the bytes its lines gave (`lines_read`)."""

    def __init__(self, path: Path, rewritten: bytes, *, at: int, nth: int) -> None:
        super().__init__(path, "rb")
        self.path, self.rewritten, self.at, self.nth = path, rewritten, at, nth
        self.lines_read, self.reached, self.rewrites = 0, 0, 0

    def readline(self, size: int | None = -1, /) -> bytes:
        start = self.tell()
        self.reached += start == self.at
        if self.reached == self.nth and not self.rewrites:
            self.path.write_bytes(self.rewritten)  # truncated and written again: the reader's file still
            self.rewrites += 1
        ahead = self.read(size if size is not None and size >= 0 else 1 << 30)
        line = ahead[:ahead.find(b"\n") + 1 or len(ahead)]  # a read and a seek back: FileIO's own goes byte by byte
        self.seek(start + len(line))
        self.lines_read += len(line)
        return line


def _checked(settings: Settings, export_file: BinaryIO) -> ExportCheck:
    with unit_of_work(settings.resolved_database_url) as session:
        return audit_service.verify_export(export_file=export_file, settings=settings, session=session)


@pytest.mark.parametrize("fmt", list(ExportFormat))
def test_an_export_rewritten_as_it_is_read_is_never_passed(ledger: Settings, tmp_path: Path,
                                                          fmt: ExportFormat) -> None:
    """The hash that says whether the rows are those signed is the hash of the bytes parsed, as they are read: a file
    rewritten as it is read (a row edited, and in JSONL its own hash computed again, the length unchanged) is
    `body_changed`, though each row parsed is whole and in order."""
    _append(ledger, 4)
    export = _export(ledger, tmp_path / f"export.{fmt.value}", fmt)
    signed = export.read_bytes()
    edited = (_rehashed(_lines(export)[1], b'"alice"', b'"alicf"') if fmt is ExportFormat.jsonl else
              _lines(export)[1].replace(b"alice", b"alicf"))
    rewritten = signed.replace(_lines(export)[1], edited)
    assert rewritten != signed and len(rewritten) == len(signed)
    with _RewrittenAsItIsRead(export, rewritten, at=len(_lines(export)[0]) + 1, nth=1) as export_file:
        checked = _checked(ledger, export_file)
    assert export_file.rewrites == 1
    assert (checked.ok, checked.reason, checked.first_broken) == (False, "body_changed", None), checked


def _values_made_denser(line: bytes) -> bytes:
    """The densest row's line (_densest_row) with its list of departments searched made a list of 1s as long, as dense
    as no export row is, each field of the row still there: it parses as a row, its hash not matching."""
    first = re.search(rb'"{1,2}aaaa"{1,2}, "{1,2}aaab', line).start()  # its first names, quoted (twice in CSV)
    end = line.index(b"]", first)
    filler = (b"1," * (end - first))[:end - first - 1] + b" "
    return line[:first] + filler + line[end:]


@pytest.mark.parametrize("fmt", list(ExportFormat))
def test_an_export_body_is_read_once_and_each_line_refused_by_its_shape_whatever_was_read_before(
        ledger: Settings, tmp_path: Path, fmt: ExportFormat) -> None:
    """verify-export read the body twice: its raw bytes hashed, then parsed, each line checked for a shape no export
    row has only when the first read had found the body not the one signed. A file rewritten once the first read had
    found it signed (a line of values denser than any row swapped in) was parsed unchecked, with what a hostile line
    costs the parser (a GiB for 39 MiB of empty objects): here `row_changed` or `body_changed`, the line parsed whole.
    The body is read once now, its hash and its rows from the same bytes, so no later read is taken on an earlier
    one's word (the file is read once, never rewritten, and passes); every line is shape-checked, so a line swapped
    in as the body is read is refused unparsed: `rows_unreadable`, its line number said, never its content."""
    _densest_row(ledger)
    _append(ledger, 2)
    export = _export(ledger, tmp_path / f"export.{fmt.value}", fmt)
    signed, (*rows, manifest) = export.read_bytes(), _lines(export)
    denser = 1 if fmt is ExportFormat.csv else 0  # the line of the densest row, after the CSV header
    rewritten = signed.replace(rows[denser], _values_made_denser(rows[denser]))
    assert len(rewritten) == len(signed) and rewritten.count(b"1,") > 100_000
    at = sum(len(row) + 1 for row in rows[:denser])
    with _RewrittenAsItIsRead(export, rewritten, at=at, nth=2) as export_file:  # when read again
        checked = _checked(ledger, export_file)
    assert (checked.ok, export_file.rewrites, export_file.lines_read) == (True, 0, len(signed) - len(manifest) - 1)
    export.write_bytes(signed)
    with _RewrittenAsItIsRead(export, rewritten, at=at, nth=1) as export_file:  # as it is read
        checked = _checked(ledger, export_file)
    assert (checked.ok, checked.reason, checked.line, checked.first_broken) == (False, "rows_unreadable",
                                                                                 denser + 1, None), checked
    assert checked.message.startswith(f"line {denser + 1} is shaped as no export row is"), checked
    assert "1,1" not in checked.message and "aaaa" not in checked.message


def _outcome(run: Callable[[], Any], release: Callable[[], None]) -> Any:
    """What `run` returned or raised, run in a thread that must end by itself. A minute bounds the test, no time is
    asserted: `run` waiting on a named pipe is let go by `release` (opening the pipe's other end), and fails the
    test."""
    outcome: list[Any] = []

    def target() -> None:
        try:
            outcome.append(run())
        except Exception as exc:
            outcome.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(60)
    waited = thread.is_alive()
    if waited:
        release()
        thread.join(60)
    assert not waited, "waited on the named pipe"
    return outcome[0]


def test_a_named_pipe_in_place_of_the_mirror_is_not_waited_on_by_the_append(
        ledger: Settings, caplog: pytest.LogCaptureFixture) -> None:
    """Each checkpoint's mirror line was appended to whatever was at the mirror's path: a named pipe put there made
    the append, in the request that signed the checkpoint, wait for a reader for good. The mirror is opened without
    waiting now and refused unless it is a regular file: the append is counted as failed, its warning says why, and
    the retrieval is recorded, the checkpoint in the database."""
    from core.metrics import REGISTRY

    mirror = ledger.resolved_checkpoint_file
    os.mkfifo(mirror)
    before = REGISTRY.get_sample_value("govrag_audit_mirror_write_failures_total") or 0.0
    appended = _outcome(lambda: _append(ledger, 5), lambda: os.close(os.open(mirror, os.O_RDONLY | os.O_NONBLOCK)))
    assert appended is None
    assert REGISTRY.get_sample_value("govrag_audit_mirror_write_failures_total") == before + 1
    assert [r.getMessage() for r in caplog.records if "audit checkpoint mirror" in r.getMessage()] == [
        "could not append to the audit checkpoint mirror file (NotARegularFile): the checkpoint at event 5 is in the "
        "database only"]
    mirror.unlink()
    assert _verified(ledger)[:2] == (True, None)  # signed at row 5, in the database


def test_a_named_pipe_in_place_of_the_mirror_is_refused_by_verify_not_waited_on(
        ledger: Settings, audit_cli: Callable[..., tuple]) -> None:
    """`verify` read the mirror after an exists() check: a named pipe put in its place made `verify` (and `GET
    /v1/audit/verify`) wait for a writer for good. The mirror is opened once now, without waiting, and refused unless
    it is a regular file (MirrorUnreadable): `govrag audit verify` fails in one line that says why and names the file
    (exit 2)."""
    from audit.exceptions import MirrorUnreadable

    _append(ledger, 5)  # signed and mirrored at row 5
    mirror = ledger.resolved_checkpoint_file
    mirror.unlink()
    os.mkfifo(mirror)

    def verify() -> Any:
        with unit_of_work(ledger.resolved_database_url) as session:
            return audit_service.verify(session=session, settings=ledger)

    refused = _outcome(verify, lambda: os.close(os.open(mirror, os.O_WRONLY | os.O_NONBLOCK)))
    assert isinstance(refused, MirrorUnreadable), refused
    assert audit_cli(ledger, "verify") == (
        2, f"failed: not a regular file (a named pipe or a device is there): {mirror}\n")
