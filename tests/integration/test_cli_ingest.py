"""`govrag ingest PATH` in-process and `govrag keys rotate`, against their own PostgreSQL database and data dir."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from api.cli import main
from core.db import unit_of_work
from core.models import Document
from core.settings import get_settings
from tests.conftest import damaged_doc


@pytest.fixture
def cli_env(make_pg_database: Callable[[], str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """GOVRAG_* variables for a fresh database and data dir; the department `hr` exists."""
    from authz import service as authz_service
    from core import migrate
    from core.keystore import keystore_for

    url = make_pg_database()
    migrate.upgrade(url)
    monkeypatch.setenv("GOVRAG_DATABASE_URL", url)
    monkeypatch.setenv("GOVRAG_DATA_DIR", str(tmp_path / "data"))
    get_settings.cache_clear()
    settings = get_settings()
    with unit_of_work(url) as session:
        authz_service.create_department(session=session, keystore=keystore_for(settings), name="hr")
    yield url
    from retrieval.store import close_vector_store

    close_vector_store(settings)
    get_settings.cache_clear()


def test_ingest_folder_reports_each_outcome(cli_env: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "inbox"
    folder.mkdir()
    (folder / "leave.md").write_text("# Parental leave\n\nParents get sixteen weeks of paid leave.\n")
    (folder / "leave-copy.md").write_text("# Parental leave\n\nParents get sixteen weeks of paid leave.\n")
    (folder / "photo.txt").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    (folder / "keys.txt").write_text("Deploy with AKIAIOSFODNN7EXAMPLE tonight.")
    code = main(["ingest", str(folder), "--department", "hr", "--acl-group", "hr-staff"])
    out = capsys.readouterr().out
    assert code == 1  # one file was refused
    assert "ready: 1" in out and "duplicate: 1" in out and "refused: 1" in out and "quarantined: 1" in out
    assert "PNG" in out and "AKIAIOSFODNN7EXAMPLE" not in out

    assert main(["keys", "rotate", "--department", "hr"]) == 0
    rotated = capsys.readouterr().out
    assert "hr" in rotated and "2" in rotated


def test_ingesting_a_path_that_does_not_exist_is_an_error(cli_env: str, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """A mistyped path exited 0 with an empty table."""
    missing = tmp_path / "no-such-folder"
    assert main(["ingest", str(missing), "--department", "hr"]) == 2
    assert str(missing) in capsys.readouterr().err


def test_rotating_an_unknown_department_names_it_and_rotates_nothing(cli_env: str,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """A typo exited 1 without a word, or 0 next to a real department, silently skipping it."""
    for departments in (["hrr"], ["hr", "hrr"]):
        assert main(["keys", "rotate", *(f"--department={d}" for d in departments)]) == 2
        captured = capsys.readouterr()
        assert "no such department: hrr" in captured.err and "key rotation" not in captured.out


def test_a_file_that_fails_unexpectedly_is_failed_and_the_rest_are_ingested(
        cli_env: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """One file whose accepting or ingesting raised anything but a refusal ended the run with a traceback: no table,
    the files after it never ingested, its document left `processing`."""
    from ingestion import service

    canary, real_sniff, real_protect = uuid.uuid4().hex, service.sniff_content_type, service.protect

    def sniff_crashes(data: bytes, filename: str | None) -> str:
        if data.startswith(b"UNREADABLE"):
            raise RuntimeError(f"a library quoting the file: {canary}")
        return real_sniff(data, filename)

    def protect_crashes(data: bytes, *args: object, **kwargs: object) -> object:
        if data.startswith(b"CRASHES"):
            raise RuntimeError(f"a library quoting the file: {canary}")
        return real_protect(data, *args, **kwargs)

    monkeypatch.setattr(service, "sniff_content_type", sniff_crashes)
    monkeypatch.setattr(service, "protect", protect_crashes)
    folder = tmp_path / "inbox"
    folder.mkdir()
    (folder / "a-minutes.doc").write_bytes(damaged_doc())
    (folder / "b-notes.txt").write_text(f"UNREADABLE notes {canary}")
    (folder / "c-memo.txt").write_text(f"CRASHES the parser {canary}")
    (folder / "d-leave.md").write_text("# Parental leave\n\nParents get sixteen weeks of paid leave.\n")
    assert main(["ingest", str(folder), "--department", "hr"]) == 1
    out = capsys.readouterr().out
    assert "refused: 1" in out and "failed: 2" in out and "ready: 1" in out and canary not in out
    with unit_of_work(cli_env) as session:
        statuses = sorted(session.scalars(select(Document.status)))
    assert statuses == ["failed", "ready"]  # the memo failed; the notes and the damaged .doc were never accepted


def test_a_file_the_cli_is_ingesting_is_not_sent_to_a_worker_as_well(
        cli_env: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """The in-process CLI never marked the jobs it ran (an upload's, its attachments') as sent: the sweep of an API
    on the same database took any run longer than its grace for a job the broker never got, and a worker ran the
    same document at once, its claim counting a crash that never happened. Now they are marked taken."""
    from email.message import EmailMessage

    from kombu.transport import memory

    from core.models import IngestionJob
    from ingestion import service
    from workers.celery_app import create_celery
    from workers.dispatch import send_unsent

    settings, real_protect, swept = get_settings(), service.protect, []

    def protect_while_the_api_sweeps(data: bytes, *args: object, **kwargs: object) -> object:
        swept.append(send_unsent(create_celery(settings), older_than_seconds=0))  # the run is longer than the grace
        return real_protect(data, *args, **kwargs)

    monkeypatch.setattr(service, "protect", protect_while_the_api_sweeps)
    mail = EmailMessage()
    mail["From"], mail["To"], mail["Subject"] = "desk@example.org", "hr@example.org", "Rota"
    mail.set_content("The new rota is attached.")
    mail.add_attachment(b"The Porto desk rota changes on Fridays.", maintype="text", subtype="plain",
                        filename="rota.txt")
    (tmp_path / "rota.eml").write_bytes(mail.as_bytes())
    try:
        assert main(["ingest", str(tmp_path / "rota.eml"), "--department", "hr"]) == 0, capsys.readouterr().out
    finally:
        memory.Channel.queues.pop(settings.task_queue, None)
    with unit_of_work(cli_env) as session:
        jobs = sorted((job.status, job.attempts, job.crashed_runs) for job in session.scalars(select(IngestionJob)))
    assert swept == [0, 0]  # neither the e-mail's job nor its attachment's was sent while the CLI ran it
    assert jobs == [("ready", 1, 0), ("ready", 1, 0)]


def test_the_cli_reads_acl_groups_like_the_api(cli_env: str, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """`--acl-group hr-staff,payroll` was stored as one group nobody has, and a malformed name was not refused."""
    (tmp_path / "pay.md").write_text("# Pay\n\nPay day is the 25th.\n")
    assert main(["ingest", str(tmp_path / "pay.md"), "--department", "hr", "--acl-group", "bad group"]) == 2
    assert "acl_groups: group names are" in capsys.readouterr().err
    assert main(["ingest", str(tmp_path / "pay.md"), "--department", "hr", "--acl-group", "hr-staff,payroll",
                 "--acl-group", "managers"]) == 0
    with unit_of_work(cli_env) as session:
        assert session.scalars(select(Document.acl_groups)).one() == ["hr-staff", "managers", "payroll"]


@pytest.mark.parametrize("hidden", [[], [".DS_Store"], [".notes.md", ".git/config"]])
def test_a_folder_with_nothing_to_ingest_is_an_error_that_counts_the_hidden_files(
        cli_env: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], hidden: list[str]) -> None:
    """An empty folder, or one of hidden files only, exited 0 with an empty table: a wrong folder looked done."""
    folder = tmp_path / "inbox"
    folder.mkdir()
    for name in hidden:
        (folder / name).parent.mkdir(exist_ok=True)
        (folder / name).write_text("# Notes\n\nNothing to see.\n")
    assert main(["ingest", str(folder), "--department", "hr"]) == 2
    captured = capsys.readouterr()
    err = " ".join(captured.err.split())
    assert f"no files found under {folder}" in err and "ingestion summary" not in captured.out
    assert (f"{len(hidden)} hidden file" in err) == bool(hidden)


def test_a_relative_path_climbing_out_of_the_working_folder_is_ingested(
        cli_env: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """`govrag ingest ../inbox` took `..` for a hidden folder: every file was skipped and the run exited 0."""
    (tmp_path / "inbox").mkdir()
    (tmp_path / "inbox" / "leave.md").write_text("# Parental leave\n\nParents get sixteen weeks of paid leave.\n")
    (tmp_path / "inbox" / ".draft.md").write_text("# Draft\n\nNot yet.\n")
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    assert main(["ingest", "../inbox", "--department", "hr"]) == 0
    captured = capsys.readouterr()
    assert "ready: 1" in captured.out and "1 hidden file skipped" in " ".join(captured.err.split())


def test_ingesting_into_a_department_that_does_not_exist_names_it_and_ingests_nothing(
        cli_env: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A typo in --department failed every file with "internal error while ingesting the file" (exit 1)."""
    (tmp_path / "pay.md").write_text("# Pay\n\nPay day is the 25th.\n")
    assert main(["ingest", str(tmp_path / "pay.md"), "--department", "hrr"]) == 2
    captured = capsys.readouterr()
    assert "no such department: hrr" in " ".join(captured.err.split()) and "ingestion summary" not in captured.out
    with unit_of_work(cli_env) as session:
        assert session.scalars(select(Document.id)).all() == []


def test_ingesting_while_the_blob_volume_is_not_mounted_says_so_and_ingests_nothing(
        cli_env: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Started with the volume away (documents in the database, no marker), the in-process CLI logged the error and
    went on: every file "failed" with "internal error while ingesting the file" (exit 1), the cause known from the
    start. Now it stops there, as for an unknown department."""
    (tmp_path / "pay.md").write_text("# Pay\n\nPay day is the 25th.\n")
    (tmp_path / "leave.md").write_text("# Leave\n\nParents get sixteen weeks of paid leave.\n")
    assert main(["ingest", str(tmp_path / "pay.md"), "--department", "hr"]) == 0
    blob_dir = get_settings().blob_dir
    blob_dir.rename(tmp_path / "volume")  # not mounted at the next start
    capsys.readouterr()
    assert main(["ingest", str(tmp_path / "leave.md"), "--department", "hr"]) == 1
    captured = capsys.readouterr()
    said = " ".join(captured.err.split())
    assert f"the blob volume is not mounted at {blob_dir}; nothing ingested" in said, said
    assert "ingestion summary" not in captured.out and "internal error" not in captured.out + said
    assert not blob_dir.exists()
    with unit_of_work(cli_env) as session:
        assert len(session.scalars(select(Document.id)).all()) == 1


def test_refused_settings_are_named_in_one_clear_line_each_and_never_quoted(
        cli_env: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    secret_looking = "c2VjcmV0c2VjcmV0"
    monkeypatch.setenv("GOVRAG_MASTER_KEY", secret_looking)
    get_settings.cache_clear()
    (tmp_path / "note.txt").write_text("nothing to see")

    assert main(["ingest", str(tmp_path / "note.txt"), "--department", "hr"]) == 2

    refusal = capsys.readouterr().err
    assert "settings were refused" in refusal
    assert "GOVRAG_MASTER_KEY:" in refusal
    assert secret_looking not in refusal and "Traceback" not in refusal
