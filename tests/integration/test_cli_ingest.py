"""`govrag ingest PATH` in-process and `govrag keys rotate`, against their own PostgreSQL database and data dir."""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import socket
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest
from sqlalchemy import select

from api.cli import main
from core.db import unit_of_work
from core.models import Document
from core.settings import get_settings
from tests.conftest import PLATFORM_ADMIN, allow_connections, auth, damaged_doc
from tests.integration.test_cli_failures import DEPARTMENT_KEY_ALTERED, DEPARTMENT_KEY_MISSING
from tests.support.file_permissions import permission_bits_bind
from tests.support.key_rotation import alter_key_row, department_key_deleted
from tests.support.lock_waits import wait_for_a_lock_wait
from tests.support.served import served

if TYPE_CHECKING:
    from email.message import EmailMessage

    from core.settings import Settings
    from workers.celery_app import GovragCelery

ROOT = Path(__file__).resolve().parents[2]


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
    _rota_mail(tmp_path / "rota.eml")
    try:
        assert main(["ingest", str(tmp_path / "rota.eml"), "--department", "hr"]) == 0, capsys.readouterr().out
    finally:
        memory.Channel.queues.pop(settings.task_queue, None)
    with unit_of_work(cli_env) as session:
        jobs = sorted((job.status, job.attempts, job.crashed_runs) for job in session.scalars(select(IngestionJob)))
    assert swept == [0, 0]  # neither the e-mail's job nor its attachment's was sent while the CLI ran it
    assert jobs == [("ready", 1, 0), ("ready", 1, 0)]


def _reindex_hands_it_back_then_lost_jobs_are_looked_for(app: GovragCelery) -> int:
    """A re-index of `hr` (its job handed back: `queued`, sent long ago), then the sweep's look for lost jobs and its
    send; how many jobs they marked and sent."""
    from ingestion import quarantine
    from workers import dispatch

    settings = get_settings()
    with unit_of_work(settings.resolved_database_url) as session:
        quarantine.queue_reindex(session=session, settings=settings, department="hr", document_ids=None,
                                 serve_previous=True)
    return dispatch.resend_lost(app, older_than_seconds=0) + dispatch.send_unsent(app, older_than_seconds=0)


def _stalled_jobs_are_looked_for(app: GovragCelery) -> int:
    """The sweep's look for jobs stalled in processing, as once the run outlasts any worker's, then its send."""
    from workers import dispatch

    return (dispatch.resend_stalled(app, stalled_after_seconds=0)
            + dispatch.send_unsent(app, older_than_seconds=0))


def _an_embedded_api_starts(app: GovragCelery) -> int:
    """An API starting on the embedded broker: every unfinished job sent again; how many were sent."""
    from workers import dispatch

    return dispatch.resend_unfinished(app)


@pytest.mark.parametrize("sweep", [_reindex_hands_it_back_then_lost_jobs_are_looked_for, _stalled_jobs_are_looked_for,
                                   _an_embedded_api_starts])
def test_a_job_the_cli_is_running_is_not_sent_to_a_worker_whatever_the_sweep_looks_for(
        sweep: Callable[[GovragCelery], int], cli_env: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Marked sent, the job the CLI ran was still the sweep's to send again: as lost once a re-index handed it back
    (`queued`, sent long ago, no task on any broker), as stalled once its run outlasted a worker's time limit (the
    CLI has none), as unfinished by an API starting on the embedded broker. A worker then ran the document beside
    the CLI. Now the CLI holds the job while it runs it, and every step of the sweep passes it by."""
    from kombu.transport import memory

    from core.models import IngestionJob
    from ingestion import service
    from workers.celery_app import create_celery

    settings, real_protect, swept = get_settings(), service.protect, []

    def protect_while_the_api_sweeps(data: bytes, *args: object, **kwargs: object) -> object:
        if not swept:
            swept.append(sweep(create_celery(settings)))
        return real_protect(data, *args, **kwargs)

    monkeypatch.setattr(service, "protect", protect_while_the_api_sweeps)
    (tmp_path / "leave.md").write_text("# Parental leave\n\nParents get sixteen weeks of paid leave.\n")
    try:
        assert main(["ingest", str(tmp_path / "leave.md"), "--department", "hr"]) == 0, capsys.readouterr().out
    finally:
        memory.Channel.queues.pop(settings.task_queue, None)
    with unit_of_work(cli_env) as session:
        (job,) = session.scalars(select(IngestionJob)).all()
    assert swept == [0]  # neither marked to be sent again nor sent
    assert (job.status, job.crashed_runs, job.sent_at is not None) == ("ready", 0, True)


def test_an_attachment_waiting_its_turn_in_the_cli_is_not_sent_to_a_worker(
        cli_env: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """An e-mail's attachments are all accepted (their jobs unsent) before the first one runs; the CLI held each only
    as its turn came, so one waiting behind a run longer than the sweep's grace was sent to a worker, which ran it
    beside the CLI. Now the CLI holds them all at once, and the sweep's send passes them by."""
    from kombu.transport import memory

    from core.models import IngestionJob
    from ingestion import service
    from workers.celery_app import create_celery
    from workers.dispatch import send_unsent

    settings, real_protect, swept = get_settings(), service.protect, []

    def the_sweep_sends_as_the_first_attachment_runs(data: bytes, *args: object, **kwargs: object) -> object:
        if b"Porto" in data and not swept:  # as if it had run past the grace: the jobs behind it are old enough
            swept.append(send_unsent(create_celery(settings), older_than_seconds=0))
        return real_protect(data, *args, **kwargs)

    monkeypatch.setattr(service, "protect", the_sweep_sends_as_the_first_attachment_runs)
    _rota_mail(tmp_path / "rota.eml", b"The Lisbon desk rota changes on Mondays.")
    try:
        assert main(["ingest", str(tmp_path / "rota.eml"), "--department", "hr"]) == 0, capsys.readouterr().out
    finally:
        memory.Channel.queues.pop(settings.task_queue, None)
    assert swept == [0]  # nothing sent
    assert sorted(_rows(cli_env).values()) == [("ready", "ready")] * 3
    with unit_of_work(cli_env) as session:
        assert session.scalars(select(IngestionJob.crashed_runs)).all() == [0, 0, 0]


@contextmanager
def _an_embedded_api_starting_at_the_first_hold(url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """An API starting on the embedded broker (`resend_unfinished`) just before the CLI holds its first job
    (`JobsHeld.hold`): in the window between taking that job and holding it, if there is one. The start runs beside
    the CLI until it ends or waits for a lock the CLI holds; yields how many jobs each start sent, once it ended."""
    from workers import dispatch
    from workers.celery_app import create_celery

    real_hold, starts, swept = dispatch.JobsHeld.hold, [], []

    def hold_as_an_api_starts(held: dispatch.JobsHeld, job_id: str) -> None:
        if not starts:
            app = create_celery(get_settings())
            starts.append(threading.Thread(target=lambda: swept.append(dispatch.resend_unfinished(app)), daemon=True))
            starts[0].start()
            wait_for_a_lock_wait(url, starts[0])  # it ended, or it waits for the CLI
        real_hold(held, job_id)

    monkeypatch.setattr(dispatch.JobsHeld, "hold", hold_as_an_api_starts)
    try:
        yield swept
    finally:
        for start in starts:
            start.join(60)
    assert not any(start.is_alive() for start in starts), "the API's start never ended"


def _ingested_beside_an_api_starting(url: str, path: Path, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """`govrag ingest path` with an embedded API starting as it holds its first job; how many jobs the start sent."""
    from kombu.transport import memory

    try:
        with _an_embedded_api_starting_at_the_first_hold(url, monkeypatch) as swept:
            assert main(["ingest", str(path), "--department", "hr"]) == 0
    finally:
        memory.Channel.queues.pop(get_settings().task_queue, None)
    return swept


def _the_one_job(url: str) -> tuple[str, int, bool]:
    from core.models import IngestionJob

    with unit_of_work(url) as session:
        (job,) = session.scalars(select(IngestionJob)).all()
        return job.status, job.crashed_runs, job.sent_at is not None


def test_a_job_the_cli_takes_up_again_is_not_sent_to_a_worker_by_an_api_starting(
        cli_env: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run again after a Ctrl-C, the CLI took the file's job (`take_waiting_job`, its stamp committed) and only then
    held it: an API starting on the embedded broker in between marked it unsent again and sent it to a worker, which
    ran it beside the CLI. Now the job is held before its stamp commits, and the start passes it by."""
    from ingestion import service

    real_protect = service.protect

    def ctrl_c_once(data: bytes, *args: object, **kwargs: object) -> object:
        monkeypatch.setattr(service, "protect", real_protect)
        raise KeyboardInterrupt

    monkeypatch.setattr(service, "protect", ctrl_c_once)
    (tmp_path / "leave.md").write_text("# Parental leave\n\nParents get sixteen weeks of paid leave.\n")
    assert main(["ingest", str(tmp_path / "leave.md"), "--department", "hr"]) == 130
    assert _the_one_job(cli_env) == ("queued", 0, False)  # given back, waiting for the command run again

    assert _ingested_beside_an_api_starting(cli_env, tmp_path / "leave.md", monkeypatch) == [0]
    assert _the_one_job(cli_env) == ("ready", 0, True)


def test_a_job_the_cli_was_running_when_it_was_killed_is_sent_to_a_worker(cli_env: str, tmp_path: Path) -> None:
    """The hold of a `govrag ingest` process on the job it runs keeps an API's sweep off it, and ends with it: killed
    mid-run, its job is found stalled (as a dead worker's run is) and sent to a worker, which ingests it."""
    from kombu.transport import memory

    from core.models import IngestionJob
    from tests.support.polling import lines_until, wait_until
    from workers.celery_app import create_celery
    from workers.dispatch import resend_stalled, send_unsent
    from workers.inprocess import InProcessWorker

    settings = get_settings()
    (tmp_path / "leave.md").write_text("# Parental leave\n\nParents get sixteen weeks of paid leave.\n")
    argv = [sys.executable, "-m", "tests.support.cli_stopped_mid_run", str(tmp_path / "leave.md"), "hr"]
    log = tmp_path / "cli.log"
    with log.open("w") as errors:
        cli = subprocess.Popen(argv, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},  # noqa: S603 (fixed argv)
                               stdout=subprocess.PIPE, stderr=errors, text=True)
    try:
        lines_until(cli, "running", errors=log)
        app = create_celery(settings)
        assert resend_stalled(app, stalled_after_seconds=0) == 0  # held: its run goes on
    finally:
        cli.kill()
        cli.wait(60)
    wait_until(lambda: resend_stalled(app, stalled_after_seconds=0) == 1, 30, "the killed CLI's job found stalled")
    worker = InProcessWorker(app)
    try:
        assert send_unsent(app, older_than_seconds=0) == 1
        worker.start()
        wait_until(lambda: _rows(cli_env) == {"leave.md": ("ready", "ready")}, 300, "the job ingested by a worker")
    finally:
        worker.stop()
        memory.Channel.queues.pop(settings.task_queue, None)
    with unit_of_work(cli_env) as session:
        assert session.scalars(select(IngestionJob.crashed_runs)).all() == [1]  # the killed run


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
    assert f"the blob store at {blob_dir} cannot be used (see the error above); nothing ingested" in said, said
    assert "ingestion summary" not in captured.out and "internal error" not in captured.out + said
    assert not blob_dir.exists()
    with unit_of_work(cli_env) as session:
        assert len(session.scalars(select(Document.id)).all()) == 1


def test_ingesting_while_the_blob_directory_cannot_be_written_says_so_and_ingests_nothing(
        cli_env: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture) -> None:
    """A fresh deployment whose blob directory this process may not write (a read-only volume, another owner): the
    start's marker write raised, and `govrag ingest` ended in a traceback. It stops as for any refused directory,
    the error logged naming the directory and the reason; once the directory can be written, a run ingests."""
    (tmp_path / "pay.md").write_text("# Pay\n\nPay day is the 25th.\n")
    blob_dir = get_settings().blob_dir
    blob_dir.mkdir(parents=True)
    blob_dir.chmod(0o500)
    with permission_bits_bind(), caplog.at_level(logging.ERROR, logger="core.blobs"):
        assert main(["ingest", str(tmp_path / "pay.md"), "--department", "hr"]) == 1
    captured = capsys.readouterr()
    said = " ".join(captured.err.split())
    assert f"the blob store at {blob_dir} cannot be used (see the error above); nothing ingested" in said, said
    assert "ingestion summary" not in captured.out and "Traceback" not in said
    logged = [record.getMessage() for record in caplog.records if record.name == "core.blobs"]
    assert len(logged) == 1, logged
    assert logged[0].startswith(f"the blob store cannot be created or marked in {blob_dir} (Permission denied); ")
    with unit_of_work(cli_env) as session:
        assert session.scalars(select(Document.id)).all() == []
    blob_dir.chmod(0o700)  # as the error says
    assert main(["ingest", str(tmp_path / "pay.md"), "--department", "hr"]) == 0
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


def _three_files(tmp_path: Path, canary: str) -> Path:
    folder = tmp_path / "inbox"
    folder.mkdir()
    (folder / "a-leave.md").write_text("# Parental leave\n\nParents get sixteen weeks of paid leave.\n")
    (folder / "b-pay.md").write_text(f"# Pay\n\nPay day is the 25th of each month. {canary}\n")
    (folder / "c-rota.md").write_text("# Rota\n\nThe desk rota changes on Fridays.\n")
    return folder


def _rows(url: str) -> dict[str, tuple[str, str]]:
    """Each document's title → its status and its job's."""
    from core.models import IngestionJob

    with unit_of_work(url) as session:
        return {title: (document, job) for title, document, job in session.execute(
            select(Document.title, Document.status, IngestionJob.status)
            .join(IngestionJob, IngestionJob.document_id == Document.id))}


def _unmounted_as_the_second_run_starts(monkeypatch: pytest.MonkeyPatch) -> Path:
    """The blob directory renamed away (its volume unmounted) as the command's second run of a document starts, once;
    where it went, to mount it again."""
    from ingestion import service

    settings, real_run, runs = get_settings(), service.run_ingestion, []
    aside = settings.blob_dir.with_name("blobs.unmounted")

    def unmounted_at_the_second_run(**kwargs: str) -> list[object]:
        runs.append(kwargs["document_id"])
        if len(runs) == 2:
            settings.blob_dir.rename(aside)
        return real_run(**kwargs)  # type: ignore[arg-type,no-any-return]

    monkeypatch.setattr(service, "run_ingestion", unmounted_at_the_second_run)
    monkeypatch.setenv("COLUMNS", "400")  # each reason on one line of the table
    return aside


def test_the_blob_volume_going_away_mid_run_stops_the_run_naming_it_and_running_it_again_finishes(
        cli_env: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """The blob volume unmounted under a run: the file being ingested was `failed` with "internal error while
    ingesting the file" (a permanent failure, where the Celery path waits the outage out), and so was every file
    after it. Now the run stops there naming the volume and exits 1; the document waits (its job handed back, not
    failed), and the same command run again once the volume is back ingests it and the files not attempted."""
    settings, canary = get_settings(), uuid.uuid4().hex
    aside = _unmounted_as_the_second_run_starts(monkeypatch)
    folder = _three_files(tmp_path, canary)
    assert main(["ingest", str(folder), "--department", "hr"]) == 1
    captured = capsys.readouterr()
    out, err = " ".join(captured.out.split()), " ".join(captured.err.split())
    assert "the blob volume is unavailable" in out and "internal error" not in out and canary not in out
    assert "ready: 1" in out and "unavailable: 1" in out and "not attempted: 1" in out
    assert "stopped: the blob volume is unavailable" in err and "run the same command again" in err
    assert _rows(cli_env) == {"a-leave.md": ("ready", "ready"), "b-pay.md": ("processing", "queued")}

    aside.rename(settings.blob_dir)  # mounted again
    monkeypatch.setenv("COLUMNS", "400")  # each reason on one line of the table
    assert main(["ingest", str(folder), "--department", "hr"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "duplicate: 1" in out and "ready: 2" in out
    assert out.count("accepted before as document") == 1 and "ingested now" in out  # b-pay.md's upload, not this run's
    assert set(_rows(cli_env).values()) == {("ready", "ready")} and len(_rows(cli_env)) == 3
    from core.models import IngestionJob

    with unit_of_work(cli_env) as session:
        assert session.scalars(select(IngestionJob.crashed_runs)).all() == [0, 0, 0]  # an outage is no crash


def test_the_master_key_refused_mid_run_stops_the_run_and_leaves_nothing_failed(
        cli_env: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """The key file replaced under a run by a keyring without the version the keys are wrapped under: the file being
    ingested and every file after it were `failed` with "internal error while ingesting the file" (their jobs failed
    for good), where a worker waits the master key out. Now the run stops there with the master key's line (never
    the key file's path), exits 1 and leaves the document waiting; run again once the key file is back, the command
    ingests it and the file not attempted."""
    from core import crypto
    from core.keystore import keystore_for
    from ingestion import service

    settings, canary, real_run, runs = get_settings(), uuid.uuid4().hex, service.run_ingestion, []
    key_file = settings.resolved_master_key_file
    right = crypto.parse_master_keyring(key_file.read_text())

    def replaced_at_the_second_run(**kwargs: str) -> list[object]:
        runs.append(kwargs["document_id"])
        if len(runs) == 2:
            with crypto.master_keyring_lock(key_file):
                crypto.write_master_keyring(key_file, {2: crypto.new_key()})
            keystore_for(settings)._cache.clear()  # as a process that never opened the keys
        return real_run(**kwargs)  # type: ignore[arg-type,no-any-return]

    monkeypatch.setattr(service, "run_ingestion", replaced_at_the_second_run)
    monkeypatch.setenv("COLUMNS", "400")  # each reason on one line of the table
    folder = _three_files(tmp_path, canary)
    assert main(["ingest", str(folder), "--department", "hr"]) == 1
    captured = capsys.readouterr()
    out, err = " ".join(captured.out.split()), " ".join(captured.err.split())
    line = ("the master key does not open the stored keys (it has no version 1, which wraps some of them): restore "
            "the master key used to write them (GOVRAG_MASTER_KEY or the master key file)")
    assert f"{line}; accepted, not ingested yet: run the same command again once that is fixed" in out, out
    assert "ready: 1" in out and "unavailable: 1" in out and "not attempted: 1" in out and "failed" not in out
    assert f"stopped: {line} (1 file not attempted); run the same command again once that is fixed" in err, err
    assert str(key_file) not in out + err and "Traceback" not in out + err
    assert _rows(cli_env) == {"a-leave.md": ("ready", "ready"), "b-pay.md": ("queued", "queued")}

    with crypto.master_keyring_lock(key_file):
        crypto.write_master_keyring(key_file, right)
    monkeypatch.setattr(service, "run_ingestion", real_run)
    # run again once the key is back, past the sweep's grace: the refusal came at the claim, so its job never ran
    monkeypatch.setenv("GOVRAG_JOB_RESEND_AFTER_SECONDS", "0")
    get_settings.cache_clear()
    assert main(["ingest", str(folder), "--department", "hr"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "duplicate: 1" in out and "ready: 2" in out
    assert set(_rows(cli_env).values()) == {("ready", "ready")} and len(_rows(cli_env)) == 3


def test_the_database_going_away_mid_run_stops_the_run_naming_it_and_leaves_nothing_failed(
        cli_env: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """PostgreSQL stopped taking connections as a file's run ended: marking it failed needed the database too, and
    the command ended in a traceback. Now the run stops there naming the database (never its URL), exits 1 and
    leaves the document unfinished, not failed; run again, the command says the document is not ingested yet and
    how it will be, and ingests the file not attempted."""
    from ingestion import service

    canary, real_protect, database = uuid.uuid4().hex, service.protect, cli_env.rsplit("/", 1)[1]

    def the_database_goes_as_the_pay_file_is_protected(data: bytes, *args: object, **kwargs: object) -> object:
        protected = real_protect(data, *args, **kwargs)
        if canary.encode() in data:
            allow_connections(database, False)
        return protected

    monkeypatch.setattr(service, "protect", the_database_goes_as_the_pay_file_is_protected)
    folder, (out, err) = _ingest_stopped_by_the_outage(tmp_path, canary, database, capsys, monkeypatch)
    assert "the database is unavailable" in out and "internal error" not in out
    assert "ready: 1" in out and "unavailable: 1" in out and "not attempted: 1" in out
    assert "stopped: the database is unavailable" in err
    assert database not in out + err and canary not in out + err and "Traceback" not in out + err
    assert _rows(cli_env) == {"a-leave.md": ("ready", "ready"), "b-pay.md": ("processing", "processing")}

    assert main(["ingest", str(folder), "--department", "hr"]) == 1
    out = " ".join(capsys.readouterr().out.split())
    assert "duplicate: 1" in out and "ready: 1" in out and "pending: 1" in out and "govrag serve" in out
    assert _rows(cli_env)["c-rota.md"] == ("ready", "ready")


def _ingest_stopped_by_the_outage(tmp_path: Path, canary: str, database: str, capsys: pytest.CaptureFixture[str],
                                  monkeypatch: pytest.MonkeyPatch) -> tuple[Path, tuple[str, str]]:
    """`govrag ingest` of `_three_files` whose canary file takes `database` away (the test's patch does): the run
    stops (exit 1), the database comes back; the folder and what the run printed (stdout, stderr, spaces folded)."""
    monkeypatch.setenv("COLUMNS", "400")  # each reason on one line of the table
    folder = _three_files(tmp_path, canary)
    try:
        assert main(["ingest", str(folder), "--department", "hr"]) == 1
    finally:
        allow_connections(database, True)
    captured = capsys.readouterr()
    return folder, (" ".join(captured.out.split()), " ".join(captured.err.split()))


def test_a_refusal_raised_from_an_outage_stops_the_run_naming_the_outage_and_refuses_nothing(
        cli_env: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Accepting a file caught GovragError (a refusal: a bad file, a limit) before it asked whether the failure was
    raised from an outage: such a file was `refused` for good and the run went on. No path raises one today: the
    acceptance is made to turn the database's real outage into a refusal. Now the run stops there naming the
    database, nothing stored, and run again once it is back ingests that file and the rest."""
    from sqlalchemy.exc import OperationalError

    from core.errors import ErrorCode, GovragError
    from ingestion import service

    canary, real_accept, database = uuid.uuid4().hex, service.accept_upload, cli_env.rsplit("/", 1)[1]

    def refused_from_the_outage(**kwargs: bytes) -> object:
        if canary.encode() in kwargs["data"]:
            allow_connections(database, False)
        try:
            return real_accept(**kwargs)
        except OperationalError as down:
            raise GovragError(ErrorCode.invalid_request, "the file could not be checked") from down

    monkeypatch.setattr(service, "accept_upload", refused_from_the_outage)
    folder, (out, err) = _ingest_stopped_by_the_outage(tmp_path, canary, database, capsys, monkeypatch)
    assert "the database is unavailable; nothing was stored" in out and "refused" not in out
    assert "ready: 1" in out and "unavailable: 1" in out and "not attempted: 1" in out
    assert "stopped: the database is unavailable (1 file not attempted)" in err
    assert _rows(cli_env) == {"a-leave.md": ("ready", "ready")}

    monkeypatch.setattr(service, "accept_upload", real_accept)
    assert main(["ingest", str(folder), "--department", "hr"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "duplicate: 1" in out and "ready: 2" in out


def test_an_attachment_whose_run_met_the_outage_is_ingested_when_the_command_runs_again(
        cli_env: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """An outage in an e-mail's attachment's run left the attachment `processing` for good (the e-mail, whose own run
    had ended, kept `ready`); now its job waits, and the command run again takes it up from the e-mail."""
    settings = get_settings()
    aside = _unmounted_as_the_second_run_starts(monkeypatch)
    _rota_mail(tmp_path / "rota.eml")
    assert main(["ingest", str(tmp_path / "rota.eml"), "--department", "hr"]) == 1
    assert "the blob volume is unavailable" in " ".join(capsys.readouterr().out.split())
    assert sorted(_rows(cli_env).values()) == [("processing", "queued"), ("ready", "ready")]

    aside.rename(settings.blob_dir)
    assert main(["ingest", str(tmp_path / "rota.eml"), "--department", "hr"]) == 0
    assert "duplicate: 1" in capsys.readouterr().out
    assert sorted(_rows(cli_env).values()) == [("ready", "ready"), ("ready", "ready")]


def test_a_ctrl_c_hands_the_file_back_and_running_the_command_again_finishes(
        cli_env: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """A Ctrl-C ended the command in a traceback and left the document being ingested `processing`, its job marked
    sent: nothing took it up until an API's stall sweep (on the embedded default, nothing at all). Now its job is
    handed back, the command says where it stopped and exits 130, and run again it ingests that file and the rest."""
    from core.models import IngestionJob
    from ingestion import service

    canary, real_protect, interrupted = uuid.uuid4().hex, service.protect, []

    def ctrl_c_as_the_pay_file_is_protected(data: bytes, *args: object, **kwargs: object) -> object:
        if canary.encode() in data and not interrupted:
            interrupted.append(canary)
            raise KeyboardInterrupt
        return real_protect(data, *args, **kwargs)

    monkeypatch.setattr(service, "protect", ctrl_c_as_the_pay_file_is_protected)
    monkeypatch.setenv("COLUMNS", "400")  # the line unwrapped
    folder = _three_files(tmp_path, canary)
    try:
        code = main(["ingest", str(folder), "--department", "hr"])
    except KeyboardInterrupt:  # escaping, it would end the test session
        code = None
    captured = capsys.readouterr()
    assert code == 130 and interrupted and "Traceback" not in captured.err
    said = " ".join(captured.err.split())
    assert (f"interrupted at {folder / 'b-pay.md'} (2 files not done, 1 handed back to wait); run the same command "
            "again") in said, said
    assert _rows(cli_env) == {"a-leave.md": ("ready", "ready"), "b-pay.md": ("processing", "queued")}

    assert main(["ingest", str(folder), "--department", "hr"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "duplicate: 1" in out and "ready: 2" in out and "ingested now" in out
    assert set(_rows(cli_env).values()) == {("ready", "ready")} and len(_rows(cli_env)) == 3
    with unit_of_work(cli_env) as session:
        assert session.scalars(select(IngestionJob.crashed_runs)).all() == [0, 0, 0]  # an interrupt is no crash


@pytest.mark.parametrize("dependency", ["database", "vector store"])
def test_a_dependency_unavailable_as_the_command_starts_is_said_in_one_line_and_nothing_is_written(
        cli_env: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
        dependency: str) -> None:
    """The database away as the in-process command started ended it in a traceback (its URL in the error); a Qdrant
    server not answering let the first file be accepted before the run stopped. Now either is one line naming it,
    exit 1, nothing written."""
    from retrieval.store import close_vector_store

    database, nothing_listens = cli_env.rsplit("/", 1)[1], _closed_port()
    (tmp_path / "pay.md").write_text("# Pay\n\nPay day is the 25th.\n")
    if dependency == "vector store":
        monkeypatch.setenv("GOVRAG_QDRANT_URL", f"http://127.0.0.1:{nothing_listens}")
        get_settings.cache_clear()
    else:
        allow_connections(database, False)
    try:
        code = main(["ingest", str(tmp_path / "pay.md"), "--department", "hr"])
    finally:
        allow_connections(database, True)
        if dependency == "vector store":
            close_vector_store(get_settings())
    captured = capsys.readouterr()
    said = " ".join(captured.err.split())
    assert code == 1 and f"the {dependency} is unavailable; nothing ingested" in said, said
    assert "Traceback" not in said and database not in said and str(nothing_listens) not in said
    assert "ingestion summary" not in captured.out
    with unit_of_work(cli_env) as session:
        assert session.scalars(select(Document.id)).all() == []


def _closed_port() -> int:
    """A loopback port nothing listens on."""
    with socket.create_server(("127.0.0.1", 0)) as bound:
        return int(bound.getsockname()[1])


@pytest.fixture
def served_settings(make_pg_database: Callable[[], str], tmp_path: Path) -> Settings:
    """The settings of the `served_api`: its own migrated PostgreSQL database, its data dir tmp_path/served."""
    from core import migrate
    from core.settings import Settings

    url = make_pg_database()
    migrate.upgrade(url)
    return Settings(data_dir=tmp_path / "served", database_url=url, broker_url="memory://", inprocess_worker=True,
                    admins=[PLATFORM_ADMIN])


@pytest.fixture
def served_api(served_settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, str, str]]:
    """An API as `govrag serve` runs it (embedded store, in-process worker) on its own PostgreSQL database
    (`served_settings`), served over HTTP, with the department `hr`: its URL, an editor's token there, and the
    database's name."""
    from api.app import create_app
    from retrieval.store import close_vector_store

    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    settings = served_settings
    app, database = create_app(settings), settings.resolved_database_url.rsplit("/", 1)[1]
    try:
        with served(app) as api_url:
            admin = app.state.dev_issuer.issue(PLATFORM_ADMIN, [])
            with httpx.Client(base_url=api_url, headers=auth(admin)) as http:
                assert http.post("/v1/admin/departments", json={"name": "hr"}).status_code == 201
                assert http.post("/v1/admin/role-assignments", json={
                    "subject": "ingrid", "role": "editor", "department": "hr"}).status_code == 201
            token = app.state.dev_issuer.issue("ingrid", [])
            try:
                yield api_url, token, database
            finally:
                allow_connections(database, True)
    finally:
        close_vector_store(settings)


@pytest.mark.parametrize("when", ["as the file is uploaded", "as its document is polled"])
def test_through_the_api_a_dependency_unavailable_stops_the_run_as_in_process(
        served_api: tuple[str, str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch, when: str) -> None:
    """With `--api-url`, the API's 503 for its database away was shown as `refused` and every file after it was sent
    to meet the same 503 (or, once the file was accepted, polled for ten minutes). Now, as in process, that file is
    `unavailable` with the API's message naming the dependency, the rest `not attempted`, exit 1, the run stopped
    in one line, and the same command run again once it is back goes on."""
    from api.routers import documents
    from ingestion import service

    api_url, token, database = served_api
    canary, real_accept, real_send, seen = uuid.uuid4().hex, service.accept_upload, documents.send_job, []

    def accept_upload(**kwargs: bytes) -> object:
        if canary.encode() in kwargs["data"] and not seen:
            seen.append(when)
            if when == "as the file is uploaded":
                allow_connections(database, False)  # its acceptance fails
        return real_accept(**kwargs)

    def send_job(celery: object, *, document_id: str, job_id: str) -> bool:
        sent = real_send(celery, document_id=document_id, job_id=job_id)  # type: ignore[arg-type]
        if seen == ["as its document is polled"]:
            seen.append("accepted")
            allow_connections(database, False)  # accepted, then the database goes
        return sent

    monkeypatch.setattr(service, "accept_upload", accept_upload)
    monkeypatch.setattr(documents, "send_job", send_job)
    monkeypatch.setenv("COLUMNS", "400")  # each reason on one line of the table
    folder = _three_files(tmp_path, canary)
    command = ["ingest", str(folder), "--department", "hr", "--api-url", api_url, "--token", token]
    assert main(command) == 1
    captured = capsys.readouterr()
    out, err = " ".join(captured.out.split()), " ".join(captured.err.split())
    assert "the database is unavailable; try again shortly" in out and "refused" not in out
    assert ("accepted as document" in out) == (when == "as its document is polled")
    assert "ready: 1" in out and "unavailable: 1" in out and "not attempted: 1" in out
    assert "stopped: the database is unavailable (1 file not attempted); run the same command again" in err, err
    assert "Traceback" not in err

    allow_connections(database, True)
    assert main(command) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert ("duplicate: 1" in out and "ready: 2" in out if when == "as the file is uploaded"
            else "duplicate: 2" in out and "ready: 1" in out), out


def test_through_the_api_a_503_that_says_why_stops_the_run_saying_it(
        served_api: tuple[str, str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The API's 503 for its master key refused (the key file replaced under it) stopped the run saying only "the
    API at URL is unavailable", as if it were down, and to run again "once it is back". Now the stop line relays the
    API's own reason and code (client-safe: no key file path) and says to run again once that is fixed; the key file
    restored, the same command ingests the files."""
    api_url, token, _ = served_api
    monkeypatch.setenv("COLUMNS", "400")
    command = ["ingest", str(_three_files(tmp_path, "")), "--department", "hr", "--api-url", api_url,
               "--token", token]
    with _served_master_key_replaced(tmp_path) as key_file:
        assert main(command) == 1
    captured = capsys.readouterr()
    out, err = " ".join(captured.out.split()), " ".join(captured.err.split())
    reason = ("the master key does not open the stored keys: restore the master key used to write them "
              "(GOVRAG_MASTER_KEY or the master key file)")
    assert f"unavailable │ {reason}" in out and "not attempted: 2" in out, out
    assert (f"stopped: the API at {api_url} answered 503 unavailable: {reason} (2 files not attempted); run the "
            "same command again once that is fixed") in err, err
    assert str(key_file) not in out + err and "Traceback" not in err

    assert main(command) == 0
    assert "ready: 3" in " ".join(capsys.readouterr().out.split())


@contextmanager
def _served_master_key_replaced(tmp_path: Path) -> Iterator[Path]:
    """The `served_api`'s key file (under tmp_path/served) replaced by another key for the block, as under a running
    replica, and restored after it: its path."""
    from core import crypto
    from core.keystore import keystore_for
    from core.settings import Settings

    settings = Settings(data_dir=tmp_path / "served")  # the served API's key file, read by its key store
    key_file = settings.resolved_master_key_file
    right = crypto.parse_master_keyring(key_file.read_text())
    keystore_for(settings)._cache.clear()  # the hr key opened when it was made: as a replica that never opened it
    with crypto.master_keyring_lock(key_file):
        crypto.write_master_keyring(key_file, {1: crypto.new_key()})
    try:
        yield key_file
    finally:
        with crypto.master_keyring_lock(key_file):
            crypto.write_master_keyring(key_file, right)


@pytest.mark.parametrize(("cause", "reworded", "stopped"), [
    ("its database away", "Die Datenbank antwortet nicht; bitte später erneut versuchen",
     "stopped: the database is unavailable (2 files not attempted); run the same command again once it is back"),
    ("its master key refused", "the master key is unavailable: restore the key file",
     "stopped: the API at {api_url} answered 503 unavailable: the master key is unavailable: restore the key file (2 "
     "files not attempted); run the same command again once that is fixed")])
def test_through_the_api_a_503_is_told_by_its_dependency_field_never_by_its_message(
        served_api: tuple[str, str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch, cause: str, reworded: str, stopped: str) -> None:
    """`govrag ingest --api-url` told an outage's 503 from the master key's by matching the API's message against
    "the (.+?) is unavailable" and took the dependency's name from its text: the database's 503 reworded was said as
    a cause to fix ("answered 503 unavailable: ..., once that is fixed"), and a master key's message worded so was
    taken for an outage of "master key", to wait out. Now the API names an outage's dependency in its error body's
    `dependency` and the CLI reads that alone: with every 503 message of the real API reworded, the database away
    still stops the run as its outage (as in process) and the master key refused as the API's reason to fix."""
    from api import errors

    api_url, token, database = served_api
    real_error_response = errors.error_response

    def reworded_503(status: int, code: str, message: str, *args: object, **kwargs: object) -> object:
        return real_error_response(status, code, reworded if status == 503 else message, *args, **kwargs)

    monkeypatch.setattr(errors, "error_response", reworded_503)
    monkeypatch.setenv("COLUMNS", "400")
    command = ["ingest", str(_three_files(tmp_path, "")), "--department", "hr", "--api-url", api_url,
               "--token", token]
    if cause == "its database away":
        allow_connections(database, False)  # the fixture allows them again
        assert main(command) == 1
    else:
        with _served_master_key_replaced(tmp_path):
            assert main(command) == 1
    captured = capsys.readouterr()
    out, err = " ".join(captured.out.split()), " ".join(captured.err.split())
    assert f"unavailable │ {reworded}" in out and "not attempted: 2" in out, out
    assert stopped.format(api_url=api_url) in err, err


@contextmanager
def _department_key_that_does_not_open(settings: Settings, key_row: str) -> Iterator[None]:
    """The `hr` key row of `settings`' database altered (one bit flipped) or deleted, as it was again after the block;
    the API's key store (this process's) forgets the keys it opened."""
    if key_row == "deleted":
        with department_key_deleted(settings, "hr"):
            yield
        return
    with unit_of_work(settings.resolved_database_url) as session:
        alter_key_row(settings, session, "hr", kind="department")
    try:
        yield
    finally:
        with unit_of_work(settings.resolved_database_url) as session:
            alter_key_row(settings, session, "hr", kind="department")  # the same bit flipped back


@pytest.mark.parametrize(("key_row", "line"), [("altered", DEPARTMENT_KEY_ALTERED),
                                               ("deleted", DEPARTMENT_KEY_MISSING)])
def test_through_the_api_a_department_key_that_does_not_open_is_the_in_process_line_and_exit_2(
        served_api: tuple[str, str, str], served_settings: Settings, tmp_path: Path,
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, key_row: str, line: str) -> None:
    """Through `--api-url`, the API's 503 `department_key_unreadable` (the department's key row altered or deleted)
    stopped the run as an outage would, the file `unavailable` in a table, exit 1, where in process the same key is
    one line before any file, exit 2: a row to restore (test_cli_failures). Now it is that line, exit 2, nothing
    ingested; the row restored, the same command ingests the files."""
    api_url, token, _ = served_api
    monkeypatch.setenv("COLUMNS", "400")  # the line unwrapped
    command = ["ingest", str(_three_files(tmp_path, "")), "--department", "hr", "--api-url", api_url,
               "--token", token]
    with _department_key_that_does_not_open(served_settings, key_row):
        code = main(command)
        captured = capsys.readouterr()
        with unit_of_work(served_settings.resolved_database_url) as session:
            assert session.scalars(select(Document.id)).all() == []
    assert (code, captured.err.splitlines()[-1]) == (2, line), captured.err
    assert "ingestion summary" not in captured.out and "Traceback" not in captured.err
    assert main(command) == 0
    assert "ready: 3" in " ".join(capsys.readouterr().out.split())


def test_through_the_api_a_department_key_that_stops_opening_mid_run_stops_it_with_exit_2(
        served_api: tuple[str, str, str], served_settings: Settings, tmp_path: Path,
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """The key row altered once a file was ingested: the run stops there in the API's words, the table says what
    was ingested, and the exit code is the key's, 2 (a row to restore), not an outage's."""
    from ingestion import service

    api_url, token, _ = served_api
    canary, real_accept, altered = uuid.uuid4().hex, service.accept_upload, []

    def accept_upload(**kwargs: bytes) -> object:
        if canary.encode() in kwargs["data"] and not altered:
            altered.append(canary)
            with unit_of_work(served_settings.resolved_database_url) as session:
                alter_key_row(served_settings, session, "hr", kind="department")
        return real_accept(**kwargs)

    monkeypatch.setattr(service, "accept_upload", accept_upload)
    monkeypatch.setenv("COLUMNS", "400")
    command = ["ingest", str(_three_files(tmp_path, canary)), "--department", "hr", "--api-url", api_url,
               "--token", token]
    try:
        code = main(command)
    finally:
        with unit_of_work(served_settings.resolved_database_url) as session:
            alter_key_row(served_settings, session, "hr", kind="department")
    captured = capsys.readouterr()
    out, err = " ".join(captured.out.split()), " ".join(captured.err.split())
    assert code == 2 and altered, err
    assert "ready: 1" in out and "unavailable: 1" in out and "not attempted: 1" in out, out
    assert (f"stopped: the API at {api_url} answered 503 department_key_unreadable: the key of department hr does "
            "not open under the master key") in err, err
    assert "(1 file not attempted); run the same command again once that row is restored" in err, err


def test_through_the_api_an_api_that_cannot_be_reached_stops_the_run_naming_it(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """`--api-url` with no API answering there ended in httpx's traceback. Now the first file is `unavailable`,
    naming the API by its address, the rest `not attempted`, exit 1."""
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("COLUMNS", "400")
    api = f"http://127.0.0.1:{_closed_port()}"
    command = ["ingest", str(_three_files(tmp_path, "")), "--department", "hr", "--api-url", api, "--token", "t0ken"]
    assert main(command) == 1
    captured = capsys.readouterr()
    out, err = " ".join(captured.out.split()), " ".join(captured.err.split())
    assert f"the API at {api} cannot be reached (ConnectError)" in out and "not attempted: 2" in out, out
    assert f"stopped: the API at {api} is unavailable (2 files not attempted)" in err, err
    assert "t0ken" not in out + err and "Traceback" not in err


def _refused_once_accepted(answer: str, monkeypatch: pytest.MonkeyPatch, canary: str) -> list[str]:
    """The API answers `answer` to the requests after it accepted the file holding `canary`: 401, its token refused
    from then on (as one expiring); 404, that document gone; 500, its status read crashing. The document's id,
    once accepted."""
    from authz import tokens
    from core.errors import ErrorCode, GovragError
    from ingestion import service

    real_accept, real_status, real_verify, accepted = service.accept_upload, service.document_status, \
        tokens.TokenVerifier.verify, []

    def accept_upload(**kwargs: bytes) -> object:
        upload = real_accept(**kwargs)  # type: ignore[arg-type]
        if canary.encode() in kwargs["data"]:
            accepted.append(upload.document_id)
        return upload

    def document_status(**kwargs: str) -> object:
        if accepted and kwargs["document_id"] == accepted[0]:
            if answer.startswith("404"):
                raise GovragError(ErrorCode.not_found, "no such document")
            if answer.startswith("500"):
                raise RuntimeError(f"a crash quoting the file: {canary}")
        return real_status(**kwargs)  # type: ignore[arg-type]

    def verify(self: tokens.TokenVerifier, token: str, admins: list[str]) -> object:
        if accepted and answer.startswith("401"):
            raise GovragError(ErrorCode.unauthenticated, "token expired")
        return real_verify(self, token, admins)

    monkeypatch.setattr(service, "accept_upload", accept_upload)
    monkeypatch.setattr(service, "document_status", document_status)
    monkeypatch.setattr(tokens.TokenVerifier, "verify", verify)
    return accepted


@pytest.mark.parametrize("answer", ["401 token expired", "404 no such document", "500 internal error"])
def test_through_the_api_an_error_answer_to_a_poll_ends_that_files_poll_and_a_token_refused_stops_the_run(
        served_api: tuple[str, str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch, answer: str) -> None:
    """Once a file was accepted, an error answer to its poll (a token expired, the document gone, a 500) was read as
    a body with no status: the CLI asked again until its ten-minute timeout, for every file. Now that file is
    `refused` at once with the API's message and the document accepted (`failed` for a 500, the deployment's own
    failure), and the run goes on; a 401 stops it (every request after it would be refused too): the rest `not
    attempted`, exit 1, one line saying so."""
    from api import cli_ingest

    api_url, token, _ = served_api
    canary = uuid.uuid4().hex
    monkeypatch.setattr(cli_ingest._poll, "__defaults__", (60.0,))  # the old code fails in a minute, not ten
    monkeypatch.setenv("COLUMNS", "400")  # each reason on one line of the table
    accepted = _refused_once_accepted(answer, monkeypatch, canary)
    code = main(["ingest", str(_three_files(tmp_path, canary)), "--department", "hr", "--api-url", api_url,
                 "--token", token])
    captured = capsys.readouterr()
    out, err = " ".join(captured.out.split()), " ".join(captured.err.split())
    message = answer.split(" ", 1)[1]
    assert code == 1 and len(accepted) == 1
    said = "failed" if answer.startswith("500") else "refused"  # the deployment's own failure, or the input refused
    assert f"│ {said} │ {message}; accepted as document {accepted[0]}, its outcome not known here" in out, out
    assert "pending" not in out and canary not in out + err and token not in out + err and "Traceback" not in err
    if answer.startswith("401"):
        assert "ready: 1" in out and "refused: 1" in out and "not attempted: 1" in out
        assert ("stopped: the API refused the token (token expired) (1 file not attempted); run the same command "
                "again with a valid token") in err, err
    else:
        assert "ready: 2" in out and f"{said}: 1" in out and "not attempted" not in out and "stopped" not in err


def test_through_the_api_a_token_refused_at_the_first_upload_stops_the_run(
        served_api: tuple[str, str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A token the API refuses had every file sent to meet the same 401, each `refused`. Now the first is, the run
    stops there (exit 1, the rest `not attempted`) saying to run it again with a valid token, never quoting it."""
    api_url, _, _ = served_api
    monkeypatch.setenv("COLUMNS", "400")
    bad_token = f"not-a-token-{uuid.uuid4().hex}"
    assert main(["ingest", str(_three_files(tmp_path, "")), "--department", "hr", "--api-url", api_url,
                 "--token", bad_token]) == 1
    captured = capsys.readouterr()
    out, err = " ".join(captured.out.split()), " ".join(captured.err.split())
    assert "refused: 1" in out and "not attempted: 2" in out, out
    assert ("stopped: the API refused the token (malformed token) (2 files not attempted); run the same command "
            "again with a valid token") in err, err
    assert bad_token not in out + err


@pytest.mark.parametrize("through", ["in process", "--api-url"])
def test_a_duplicate_is_told_by_its_refusals_code_whatever_its_message_says(
        request: pytest.FixtureRequest, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch, through: str) -> None:
    """The CLI took a file for a duplicate when its refusal's message started "duplicate upload" (a 409 `conflict`
    through the API): with that message reworded, the copy was `refused` and the run exited 1. The refusal's code,
    `duplicate_upload` (409 still), says it now: the copy is `duplicate` with the message as the service words it,
    exit 0, in process and through the API alike."""
    from ingestion import repository

    reworded = "the department holds this content already as document "
    monkeypatch.setattr(repository, "DUPLICATE_OF", reworded)
    monkeypatch.setenv("COLUMNS", "400")  # each reason on one line of the table
    folder = tmp_path / "inbox"
    folder.mkdir()
    for name in ("leave.md", "leave-copy.md"):
        (folder / name).write_text("# Parental leave\n\nParents get sixteen weeks of paid leave.\n")
    command = ["ingest", str(folder), "--department", "hr"]
    if through == "--api-url":
        api_url, token, _ = request.getfixturevalue("served_api")
        command += ["--api-url", api_url, "--token", token]
    else:
        request.getfixturevalue("cli_env")
    assert main(command) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "ready: 1" in out and "duplicate: 1" in out and "refused" not in out, out
    assert f"duplicate │ {reworded}" in out, out


@contextmanager
def _document_rows_refused(settings: Settings, data: bytes) -> Iterator[None]:
    """PostgreSQL refuses to store the document row of a file holding `data` while the block runs (a trigger raising:
    the deployment's own database failing, no outage: the connection stays up)."""
    import hashlib

    import psycopg

    from bench.common import libpq_dsn

    with psycopg.connect(libpq_dsn(settings.resolved_database_url), autocommit=True) as conn:
        conn.execute("CREATE FUNCTION refuse_document() RETURNS trigger AS $$ BEGIN RAISE EXCEPTION 'no rows here'; "
                     "END $$ LANGUAGE plpgsql")
        conn.execute(f"CREATE TRIGGER refuse_document BEFORE INSERT ON documents FOR EACH ROW WHEN (NEW.sha256 = "
                     f"'{hashlib.sha256(data).hexdigest()}') EXECUTE FUNCTION refuse_document()")
        try:
            yield
        finally:
            conn.execute("DROP TRIGGER refuse_document ON documents")
            conn.execute("DROP FUNCTION refuse_document()")


def test_through_the_api_a_file_the_deployment_fails_is_failed_not_refused(
        served_api: tuple[str, str, str], served_settings: Settings, tmp_path: Path,
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """A file whose upload the API answered with a failure of its own (a 500: here its database refusing the
    document's row) was `refused` in the table, as if the file or the command were wrong, where `govrag`'s one-line
    failures say such a failure "failed:" (`ErrorCode.refuses_input`). Now it is `failed`, with the API's message,
    and the run goes on, exit 1; nothing of the database's own error is shown."""
    api_url, token, _ = served_api
    monkeypatch.setenv("COLUMNS", "400")  # each reason on one line of the table
    folder = _three_files(tmp_path, uuid.uuid4().hex)
    with _document_rows_refused(served_settings, (folder / "b-pay.md").read_bytes()):
        code = main(["ingest", str(folder), "--department", "hr", "--api-url", api_url, "--token", token])
    captured = capsys.readouterr()
    out, err = " ".join(captured.out.split()), " ".join(captured.err.split())
    assert code == 1 and f"{folder / 'b-pay.md'} │ failed │ internal error │" in out, out
    assert "ready: 2" in out and "failed: 1" in out and "refused" not in out and "stopped" not in err, out + err
    assert "no rows here" not in out + err and token not in out + err


def test_in_process_a_file_the_service_fails_for_its_own_reason_is_failed_not_refused(
        cli_env: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """In process, a file whose acceptance the service failed for a reason of its own (a code that refuses no input:
    here its ledger failing with no outage behind it) was `refused`, as if the file were wrong. Now it is `failed`
    with the service's message, as through the API, and the run goes on, exit 1; a refusal of the input stays
    `refused`."""
    from core.errors import ErrorCode, GovragError
    from ingestion import service

    canary, real_accept = uuid.uuid4().hex, service.accept_upload

    def accept_upload(**kwargs: bytes) -> object:
        if canary.encode() in kwargs["data"]:
            raise GovragError(ErrorCode.unavailable, "the audit log is unavailable")
        if b"rota" in kwargs["data"]:
            raise GovragError(ErrorCode.unsupported_type, "unsupported file type")
        return real_accept(**kwargs)

    monkeypatch.setattr(service, "accept_upload", accept_upload)
    monkeypatch.setenv("COLUMNS", "400")  # each reason on one line of the table
    folder = _three_files(tmp_path, canary)
    assert main(["ingest", str(folder), "--department", "hr"]) == 1
    out = " ".join(capsys.readouterr().out.split())
    assert f"{folder / 'b-pay.md'} │ failed │ the audit log is unavailable │" in out, out
    assert f"{folder / 'c-rota.md'} │ refused │ unsupported file type │" in out, out
    assert "ready: 1" in out and "failed: 1" in out and "refused: 1" in out, out


def test_through_the_api_the_token_can_come_from_the_environment_off_the_command_line(
        served_api: tuple[str, str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """`--token` was the only way to give the token, and a command line is readable by every user (`ps`). Now
    $GOVRAG_INGEST_TOKEN gives it, as $GOVRAG_REDTEAM_TOKEN does redteam's; a `--token` given still wins."""
    api_url, token, _ = served_api
    monkeypatch.setenv("COLUMNS", "400")
    monkeypatch.setenv("GOVRAG_INGEST_TOKEN", token)
    command = ["ingest", str(_three_files(tmp_path, "")), "--department", "hr", "--api-url", api_url]
    assert main(command) == 0
    captured = capsys.readouterr()
    out, err = " ".join(captured.out.split()), " ".join(captured.err.split())
    assert "ready: 3" in out and "refused" not in out, out + err
    assert token not in out + err

    monkeypatch.setenv("GOVRAG_INGEST_TOKEN", f"not-a-token-{uuid.uuid4().hex}")
    assert main([*command, "--token", token]) == 0
    assert "duplicate: 3" in " ".join(capsys.readouterr().out.split())


PROXIED_API = "http://govrag.example:8443"


def _ingest_through_a_proxy(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
                            when: str, answer: httpx.Response) -> tuple[str, str]:
    """`govrag ingest` of three files through a reverse proxy at PROXIED_API that gives `answer` to the upload, or
    accepts it and gives `answer` to its poll, asserting exit 1, no third request and nothing of the token shown; its
    output and error, each read as one line. The proxy is outside the boundary: an httpx MockTransport stands in
    for it."""
    requests: list[str] = []

    def proxy(request: httpx.Request) -> httpx.Response:
        requests.append(request.method)
        if request.method == "POST" and when == "as its document is polled":
            return httpx.Response(202, json={"document_id": "d-1", "job_id": "j-1"})
        return answer

    monkeypatch.setattr(httpx, "Client", functools.partial(httpx.Client, transport=httpx.MockTransport(proxy)))
    monkeypatch.setenv("COLUMNS", "400")
    assert main(["ingest", str(_three_files(tmp_path, "")), "--department", "hr", "--api-url", PROXIED_API,
                 "--token", "t0ken"]) == 1
    captured = capsys.readouterr()
    out, err = " ".join(captured.out.split()), " ".join(captured.err.split())
    assert ("accepted as document d-1" in out) == (when == "as its document is polled")
    assert requests == (["POST"] if when == "as the file is uploaded" else ["POST", "GET"])
    assert "t0ken" not in out + err and "Traceback" not in err
    return out, err


@pytest.mark.parametrize("when", ["as the file is uploaded", "as its document is polled"])
@pytest.mark.parametrize(("status", "phrase"), [(502, "Bad Gateway"), (504, "Gateway Timeout")])
def test_through_the_api_a_gateway_error_stops_the_run_as_an_api_that_cannot_be_reached(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, when: str, status: int,
        phrase: str) -> None:
    """A reverse proxy's 502 or 504 (the API behind it down, or not answering) was `refused` and every file after it
    met the same answer; its HTML page while polling ended the run in a traceback. Now it is the API not reached:
    that file `unavailable`, naming the API by its address, the rest `not attempted`, exit 1."""
    page = httpx.Response(status, html=f"<html><body><h1>{status} {phrase}</h1></body></html>")
    out, err = _ingest_through_a_proxy(tmp_path, capsys, monkeypatch, when, page)
    assert f"the API at {PROXIED_API} cannot be reached ({status} {phrase} from a gateway)" in out, out
    assert "unavailable: 1" in out and "not attempted: 2" in out and "refused" not in out
    assert f"stopped: the API at {PROXIED_API} is unavailable (2 files not attempted)" in err, err


@pytest.mark.parametrize("when", ["as the file is uploaded", "as its document is polled"])
@pytest.mark.parametrize(("body", "media_type"), [
    ("<html><body><h1>503 Service Temporarily Unavailable</h1></body></html>", "text/html"),
    ('{"detail": "Service Unavailable"}', "application/json"), ('{"error": "maintenance"}', "application/json")])
def test_through_the_api_a_503_without_the_apis_error_body_stops_the_run_as_the_api_unavailable(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, when: str, body: str,
        media_type: str) -> None:
    """The other side of a 503 said in the API's words: one whose body is not the API's error (a reverse proxy's page,
    its API in maintenance; a JSON of another shape) has no code or reason to relay, and stops the run as the API
    unavailable, to run again once it is back: that file `unavailable` with the start of what answered, the rest
    `not attempted`, exit 1."""
    answer = httpx.Response(503, text=body, headers={"Content-Type": media_type})
    out, err = _ingest_through_a_proxy(tmp_path, capsys, monkeypatch, when, answer)
    assert f"unavailable │ {body}" in out and "unavailable: 1" in out and "not attempted: 2" in out, out
    assert (f"stopped: the API at {PROXIED_API} is unavailable (2 files not attempted); run the same command again "
            "once it is back") in err, err
    assert "answered 503" not in err and "refused" not in out


@pytest.mark.parametrize(("url", "refusal"), [
    *((f"http://{userinfo}govrag.example:8443", "must not hold a user name or password")
      for userinfo in ("cli:s3cret@", "cli@", ":s3cret@", "@")),
    ("ftp://govrag.example/", "must be an http(s) URL"), ("govrag.example:8443", "must be an http(s) URL"),
    *((f"http://{userinfo}govrag.example:{port}/", "names a port that is not a number from 1 to 65535")
      for userinfo, port in (("", "99999"), ("", "+8443"), ("", "８４４３"), ("", ""), ("cli:s3cret@", "99999")))])
def test_through_the_api_a_url_with_credentials_not_http_or_no_usable_port_is_a_usage_error(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, url: str,
        refusal: str) -> None:
    """httpx sent `--api-url`'s user name and password as an Authorization: Basic header in place of the bearer token
    (the password in clear over http; the API refused it, 401), an empty one (`http://@host`: malformed) was
    taken as none, a URL that is no http(s) one was an API that
    cannot be reached, exit 1, and a port that is not 1 to 65535 in ASCII digits was called as httpx read it (`:+8443`
    and `:８４４３` as 8443, an empty one as 80) or crashed the run (`:99999`). Each is a bad argument, as for `govrag
    redteam --url`: exit 2, the URL not quoted, nothing sent (an httpx MockTransport stands in for the API and records
    what reaches it)."""
    sent: list[str | None] = []

    def api(request: httpx.Request) -> httpx.Response:
        sent.append(request.headers.get("Authorization"))
        return httpx.Response(401, json={"error": {"code": "unauthenticated", "message": "malformed token"}})

    monkeypatch.setattr(httpx, "Client", functools.partial(httpx.Client, transport=httpx.MockTransport(api)))
    with pytest.raises(SystemExit) as exited:
        main(["ingest", str(_three_files(tmp_path, "")), "--department", "hr", "--api-url", url, "--token", "t0ken"])
    captured = capsys.readouterr()
    assert exited.value.code == 2 and captured.out == "" and sent == []
    assert f"--api-url: {refusal}" in captured.err
    assert "govrag.example" not in captured.err and "s3cret" not in captured.err and "t0ken" not in captured.err


def _rota_mail(path: Path, *more: bytes) -> None:
    """An e-mail with one text attachment, then one more for each of `more`, written to `path`."""
    from email.message import EmailMessage

    mail = EmailMessage()
    mail["From"], mail["To"], mail["Subject"] = "desk@example.org", "hr@example.org", "Rota"
    mail.set_content("The new rota is attached.")
    for number, text in enumerate([b"The Porto desk rota changes on Fridays.", *more]):
        mail.add_attachment(text, maintype="text", subtype="plain", filename=f"rota-{number}.txt")
    path.write_bytes(mail.as_bytes())


def _carrying(path: Path, subject: str, attachment: bytes, forwarded: tuple[str, ...] = ()) -> None:
    """An e-mail with one text attachment, then one e-mail per subject in `forwarded` (NAME.eml, its subject's last
    word) carrying the same attachment, written to `path`."""
    mail = _mail_carrying(subject, attachment)
    for inner in forwarded:
        mail.add_attachment(_mail_carrying(inner, attachment), filename=f"{inner.split()[-1]}.eml")
    path.write_bytes(mail.as_bytes())


def _mail_carrying(subject: str, attachment: bytes) -> EmailMessage:
    from email.message import EmailMessage

    mail = EmailMessage()
    mail["From"], mail["To"], mail["Subject"] = "desk@example.org", "hr@example.org", subject
    mail.set_content(f"{subject}: the rota is attached.")
    mail.add_attachment(attachment, maintype="text", subtype="plain", filename="rota.txt")
    return mail


@pytest.mark.parametrize("cli_env", ["postgresql", "embedded"], indirect=True)
def test_content_an_email_whose_run_fails_in_the_cli_passes_on_is_taken_there_with_no_api(
        cli_env: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Three e-mails carried one file, the first's attachment taken; the other two were being re-indexed when it was
    deleted (both passed over), and the third's step then gave up. `govrag ingest` running the second again, its run
    failing, passed the content on to the third (service.mark_failed) but never ran that step, and with no API running
    nothing sent it: the content stayed in no index. Now the command runs it, as it runs the file's own jobs: the
    third takes the content, with its ACL."""
    from core.models import IngestionJob
    from ingestion import quarantine, repository, service

    settings, rota = get_settings(), f"Leeds desk rota {uuid.uuid4().hex}: Ana and Ben.".encode()
    paths = [tmp_path / f"{name}.eml" for name in ("a", "b", "c")]
    for path, group in zip(paths, ("board", "desk", "leads"), strict=True):
        _carrying(path, f"Rota {path.stem}", rota)
        assert main(["ingest", str(path), "--department", "hr", "--acl-group", group]) == 0, capsys.readouterr().out
    with unit_of_work(cli_env) as session:
        by_title = {document.title: document for document in session.scalars(select(Document))}
        emails, taken = [by_title[path.name].id for path in paths], by_title["a.eml / rota.txt"].id
        quarantine.queue_reindex(session=session, settings=settings, department="hr", document_ids=emails[1:],
                                 serve_previous=False)
    with unit_of_work(cli_env) as session:
        assert service.delete_document(session=session, settings=settings, document_id=taken,
                                       can_delete=lambda _: True)[2] == []  # both passed over
    real_spawn, real_protect = service.spawn_attachments, service.protect
    monkeypatch.setenv("GOVRAG_JOB_RESEND_AFTER_SECONDS", "0")  # the re-index's jobs wait with nobody to run them
    get_settings.cache_clear()

    def step_crashes(*, settings: Settings, document_id: str) -> object:
        if document_id == emails[2]:
            raise RuntimeError("the third e-mail's step crashes")
        return real_spawn(settings=settings, document_id=document_id)

    def run_crashes(data: bytes, *args: object, **kwargs: object) -> object:
        if data == paths[1].read_bytes():
            raise RuntimeError("the second e-mail's run crashes")
        return real_protect(data, *args, **kwargs)

    with monkeypatch.context() as patched:
        patched.setattr(service, "spawn_attachments", step_crashes)
        assert main(["ingest", str(paths[2]), "--department", "hr"]) == 0  # its run ended ready, its step gave up
    monkeypatch.setattr(service, "protect", run_crashes)
    assert main(["ingest", str(paths[1]), "--department", "hr"]) == 1
    assert "failed: 1" in capsys.readouterr().out
    with unit_of_work(cli_env) as session:
        live = repository.find_duplicate(session, department="hr", sha256=hashlib.sha256(rota).hexdigest())
        assert live is not None and (live.parent_id, live.acl_groups, live.status) == (emails[2], ["leads"], "ready")
        steps = session.scalars(select(IngestionJob).where(IngestionJob.document_id == emails[2],
                                                           IngestionJob.error == repository.ATTACHMENT_STEP)).all()
        assert [(step.status, step.sent_at is not None) for step in steps] == [("ready", True)]
        assert repository.get_document(session, emails[1]).status == "failed"  # type: ignore[union-attr]


@pytest.mark.parametrize("cli_env", ["postgresql", "embedded"], indirect=True)
def test_in_the_cli_a_finished_job_of_the_file_passes_nothing_on_only_the_one_that_gave_up(
        cli_env: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """E-mail e carries a file and forwards g and i, which carry it too; f carries it as well. The department's copy
    is a.eml's, so the others were refused, in that order. `govrag ingest e.eml` runs a re-index of e and of i: e's run
    and step end (the copy still live), then i's run crashes as the copy is deleted beside it (the deletion asks e,
    the oldest carrier whose run ended). Only i's job gave up: it passes the content on to the next e-mail after its
    own refusal, f, which takes it. e's job, finished, asks no carrier: failed with pass_on as well, it would ask g,
    next after e's refusal, and g would take the content."""
    from core.models import IngestionJob
    from ingestion import formats, quarantine, repository, service

    settings, rota = get_settings(), f"Leeds desk rota {uuid.uuid4().hex}: Ana and Ben.".encode()
    a, e, f = (tmp_path / f"{name}.eml" for name in "aef")
    for path, group in ((a, "board"), (e, "desk"), (f, "leads")):
        _carrying(path, f"Rota {path.stem}", rota, ("Rota g", "Rota i") if path == e else ())
        assert main(["ingest", str(path), "--department", "hr", "--acl-group", group]) == 0, capsys.readouterr().out
    with unit_of_work(cli_env) as session:
        ids = {document.title: document.id for document in session.scalars(select(Document))}
        carriers = {name: ids[title] for name, title in
                    (("e", "e.eml"), ("g", "e.eml / g.eml"), ("i", "e.eml / i.eml"), ("f", "f.eml"))}
        quarantine.queue_reindex(session=session, settings=settings, department="hr",
                                 document_ids=[carriers["e"], carriers["i"]], serve_previous=False)
    inner = dict(formats.attachments(e.read_bytes(), "message/rfc822"))["i.eml"]  # i's bytes, as its run reads them
    real_protect, asked_by_the_deletion = service.protect, []
    monkeypatch.setenv("GOVRAG_JOB_RESEND_AFTER_SECONDS", "0")  # the re-index's jobs wait with nobody to run them
    get_settings.cache_clear()

    def crashes_as_the_copy_is_deleted(data: bytes, *args: object, **kwargs: object) -> object:
        if data != inner:
            return real_protect(data, *args, **kwargs)
        with unit_of_work(cli_env) as session:
            asked_by_the_deletion.extend(service.delete_document(
                session=session, settings=settings, document_id=ids["a.eml / rota.txt"], can_delete=lambda _: True)[2])
        raise RuntimeError("i's run crashes")

    monkeypatch.setattr(service, "protect", crashes_as_the_copy_is_deleted)
    assert main(["ingest", str(e), "--department", "hr"]) == 0  # e's own job ended ready
    assert [email for email, _ in asked_by_the_deletion] == [carriers["e"]]
    with unit_of_work(cli_env) as session:
        live = repository.find_duplicate(session, department="hr", sha256=hashlib.sha256(rota).hexdigest())
        assert live is not None
        assert (live.parent_id, live.acl_groups, live.status) == (carriers["f"], ["leads"], "ready")
        steps = session.scalars(select(IngestionJob).where(IngestionJob.error == repository.ATTACHMENT_STEP)).all()
        by_carrier = {name: [(step.status, step.sent_at is not None) for step in steps if step.document_id == id_]
                      for name, id_ in carriers.items()}
        assert by_carrier == {"e": [("queued", False)], "g": [], "i": [], "f": [("ready", True)]}  # g never asked
        assert [repository.get_document(session, carriers[name]).status  # type: ignore[union-attr]
                for name in ("e", "g", "i")] == ["ready", "ready", "failed"]
