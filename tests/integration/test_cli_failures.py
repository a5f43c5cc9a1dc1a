"""What each `govrag` command says of a known failure (a Ctrl-C, a department key that does not open, a file it cannot
write): one line and README's exit code, never a traceback; against a PostgreSQL database of the test's own."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from sqlalchemy import event, select
from sqlalchemy.pool import Pool

from api.cli import main
from core.db import unit_of_work
from core.models import Document, RetrievalEvent
from core.settings import get_settings
from tests.support.file_permissions import permission_bits_bind
from tests.support.govrag_process import ROOT, govrag_env
from tests.support.key_rotation import alter_key_row, department_key_deleted, exit_code_unless_interrupted
from tests.support.polling import lines_until

INTERRUPTED = "interrupted; run the same command again to go on\n"
# What `govrag ingest` says of a department key that does not open, in process and through `--api-url` alike, exit 2
DEPARTMENT_KEY_ALTERED = (
    "failed: the key of department hr does not open under the master key (its key row was altered in the database): "
    "restore that row from a backup; nothing ingested: run the same command again once that row is restored")
DEPARTMENT_KEY_MISSING = (
    "failed: the key of department hr is missing from the database (its key row was deleted): restore that row from "
    "a backup; nothing ingested: run the same command again once that row is restored")


@contextmanager
def ctrl_c_at_the_first_database_connection() -> Iterator[None]:
    """A real SIGINT, as a Ctrl-C sends, the first time a connection is taken from any pool (a command's first step on
    the database); Python's own handler is installed for it (CI starts pytest with SIGINT ignored)."""
    sent: list[bool] = []

    def ctrl_c(*_: object) -> None:
        if not sent:
            sent.append(True)
            signal.raise_signal(signal.SIGINT)

    handler = signal.signal(signal.SIGINT, signal.default_int_handler)
    event.listen(Pool, "checkout", ctrl_c)
    try:
        yield
    finally:
        event.remove(Pool, "checkout", ctrl_c)
        signal.signal(signal.SIGINT, handler)
    assert sent, "no connection was taken"


def _events(url: str) -> int:
    with unit_of_work(url) as session:
        return len(session.scalars(select(RetrievalEvent.id)).all())


@pytest.mark.parametrize("command", [["audit", "verify"], ["audit", "checkpoint"], ["audit", "purge"],
                                     ["audit", "export", "-o", "{out}"],
                                     ["export", "training-data", "--department", "hr", "-o", "{out}"]])
def test_a_ctrl_c_in_an_audit_or_export_command_is_one_line_and_exit_130(
        cli_env: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
        command: list[str]) -> None:
    """A Ctrl-C in `govrag audit ...` or `govrag export training-data` ended it in a traceback (they said an outage,
    a refusal or a path in one line, an interrupt not); now it is one line, exit 130 as `govrag keys rotate` and
    `govrag ingest` say theirs, nothing recorded and no file (nor its partial copy) left."""
    monkeypatch.setenv("GOVRAG_AUDIT_RETENTION_DAYS", "30")
    get_settings.cache_clear()
    out = tmp_path / "out.jsonl"
    recorded = _events(cli_env)
    with ctrl_c_at_the_first_database_connection():
        code = exit_code_unless_interrupted(lambda: main([argument.format(out=out) for argument in command]))
    assert (code, capsys.readouterr()) == (130, ("", INTERRUPTED))
    assert list(tmp_path.glob("*out.jsonl*")) == [] and _events(cli_env) == recorded


def test_a_ctrl_c_as_an_ingest_starts_is_one_line_and_exit_130(cli_env: str, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    """A Ctrl-C while `govrag ingest` checked the database, the master key or the stores, before its progress bar,
    ended it in a traceback; a Ctrl-C in the run already said where it stopped, exit 130. Now so does this one."""
    (tmp_path / "pay.md").write_text("# Pay\n\nPay day is the 25th.\n")
    with ctrl_c_at_the_first_database_connection():
        code = exit_code_unless_interrupted(lambda: main(["ingest", str(tmp_path / "pay.md"), "--department", "hr"]))
    said = capsys.readouterr()
    assert (code, " ".join(said.err.split())) == (
        130, "interrupted; nothing ingested: run the same command again to go on"), said.err
    with unit_of_work(cli_env) as session:
        assert session.scalars(select(Document.id)).all() == []


def test_a_ctrl_c_as_a_worker_starts_is_one_line_and_exit_130(cli_env: str, monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    """A command that says nothing of a Ctrl-C itself (`govrag worker` checking its database before Celery starts)
    ended in a traceback; `cli.main` now says it in one line, exit 130."""
    monkeypatch.setenv("GOVRAG_QDRANT_URL", "http://127.0.0.1:9")  # a worker's setting: never reached here
    get_settings.cache_clear()
    with ctrl_c_at_the_first_database_connection():
        code = exit_code_unless_interrupted(lambda: main(["worker"]))
    assert (code, capsys.readouterr()) == (130, ("", f"govrag: {INTERRUPTED}"))


def test_ingesting_into_a_department_whose_key_does_not_open_is_one_line_and_exit_2(
        cli_env: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The department's key row altered in the database, `govrag ingest` failed every file with "internal error while
    ingesting the file", exit 1, where `govrag keys rotate` and `govrag export training-data` say the key in one
    line, exit 2. Now ingest says it too, before any file, nothing written; the row restored, the file is ingested."""
    (tmp_path / "pay.md").write_text("# Pay\n\nPay day is the 25th.\n")
    settings = get_settings()
    with unit_of_work(cli_env) as session:
        alter_key_row(settings, session, "hr", kind="department")
    code = main(["ingest", str(tmp_path / "pay.md"), "--department", "hr"])
    said = capsys.readouterr()
    assert (code, " ".join(said.err.split())) == (2, DEPARTMENT_KEY_ALTERED), said.err
    assert "ingestion summary" not in said.out
    with unit_of_work(cli_env) as session:
        assert session.scalars(select(Document.id)).all() == []
        alter_key_row(settings, session, "hr", kind="department")  # the same bit flipped back
    assert main(["ingest", str(tmp_path / "pay.md"), "--department", "hr"]) == 0


def test_ingesting_into_a_department_without_a_key_row_is_one_line_and_exit_2(
        cli_env: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The department's key row deleted in the database, `govrag ingest` ended in a LookupError traceback as it
    started (exit 1). Now it says which key is missing and what to do in one line, exit 2 as for an altered row,
    nothing written; the row put back, the file is ingested."""
    (tmp_path / "pay.md").write_text("# Pay\n\nPay day is the 25th.\n")
    with department_key_deleted(get_settings(), "hr"):
        code = main(["ingest", str(tmp_path / "pay.md"), "--department", "hr"])
        said = capsys.readouterr()
        with unit_of_work(cli_env) as session:
            assert session.scalars(select(Document.id)).all() == []
    assert (code, " ".join(said.err.split())) == (2, DEPARTMENT_KEY_MISSING), said.err
    assert "ingestion summary" not in said.out
    assert main(["ingest", str(tmp_path / "pay.md"), "--department", "hr"]) == 0


def test_a_master_rotation_that_cannot_write_the_key_file_is_one_line_and_exit_2(
        cli_env: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """`govrag keys rotate --master` whose key file's folder this user may not write ended in a traceback (exit 1),
    then named the hidden temporary file it writes first (`.master.key.tmp`), a file the user never made. Now it
    names the folder (a real one, its permission bits binding even for root) and what to do, and says that nothing
    was rotated, exit 2 as any path to fix."""
    monkeypatch.setenv("COLUMNS", "400")  # the line unwrapped
    folder = get_settings().resolved_master_key_file.parent
    folder.chmod(0o555)
    try:
        with permission_bits_bind():
            code = main(["keys", "rotate", "--master"])
    finally:
        folder.chmod(0o755)
    assert (code, capsys.readouterr().err) == (
        2, f"failed: cannot write in the folder {folder} (Permission denied): make it writable for this user; the "
           "master key is not rotated (nothing audited, every key stays readable): run the same command again once "
           "that is fixed\n")
    assert main(["keys", "rotate", "--master"]) == 0


@pytest.mark.parametrize("command", [["audit", "export", "-o", "{out}"],
                                     ["export", "training-data", "--department", "hr", "-o", "{out}"]])
def test_an_export_into_a_folder_that_does_not_exist_names_that_folder(
        cli_env: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], command: list[str]) -> None:
    """An export to a file in a folder that does not exist said "No such file or directory" of the hidden
    `.out.jsonl.partial` it writes first, a file the user never named. Now it says the folder the user gave does not
    exist, exit 2 (a path to fix), nothing recorded and nothing made."""
    missing = tmp_path / "reports" / "2026"
    recorded = _events(cli_env)
    code = main([argument.format(out=missing / "out.jsonl") for argument in command])
    assert (code, capsys.readouterr()) == (2, ("", f"failed: the folder does not exist: {missing}\n"))
    assert not (tmp_path / "reports").exists() and _events(cli_env) == recorded

    (tmp_path / "reports").write_text("a file where the folder was meant\n")  # "Not a directory" of the hidden file
    code = main([argument.format(out=tmp_path / "reports" / "out.jsonl") for argument in command])
    assert (code, capsys.readouterr()) == (2, ("", f"failed: not a folder: {tmp_path / 'reports'}\n"))
    assert _events(cli_env) == recorded


@pytest.mark.parametrize("command", [["audit", "export", "-o", "{out}"],
                                     ["export", "training-data", "--department", "hr", "-o", "{out}"]])
def test_an_export_to_a_path_that_is_a_folder_names_that_folder_and_records_nothing(
        cli_env: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], command: list[str]) -> None:
    """An export whose `-o` is a folder wrote the whole export into the hidden `.reports.partial` beside it, recorded
    the export in the ledger, then failed to rename it: "Is a directory" of the hidden file, the ledger saying an
    export was made that no file holds. Now it is refused before anything is recorded, naming the folder, exit 2."""
    (tmp_path / "reports").mkdir()
    recorded = _events(cli_env)
    code = main([argument.format(out=tmp_path / "reports") for argument in command])
    assert (code, capsys.readouterr()) == (2, ("", f"failed: a folder, not a file (give a file's path): "
                                                   f"{tmp_path / 'reports'}\n"))
    assert list(tmp_path.glob(".reports*")) == [] and _events(cli_env) == recorded  # no hidden file beside it


@pytest.mark.parametrize("command", [["audit", "export", "-o", "{out}"],
                                     ["export", "training-data", "--department", "hr", "-o", "{out}"]])
def test_an_export_into_a_folder_this_user_may_not_write_names_that_folder(
        cli_env: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], command: list[str]) -> None:
    """An export into a folder this user may not write said "Permission denied" of the hidden `.out.jsonl.partial`
    it writes first, a file the user never named. Now it names the folder (a real one, its permission bits binding
    even for root) and what to do, exit 2, nothing recorded and nothing made."""
    reports = tmp_path / "reports"
    reports.mkdir()
    reports.chmod(0o555)
    recorded = _events(cli_env)
    try:
        with permission_bits_bind():
            code = main([argument.format(out=reports / "out.jsonl") for argument in command])
    finally:
        reports.chmod(0o755)
    assert (code, capsys.readouterr()) == (2, ("", f"failed: cannot write in the folder {reports} (Permission denied): "
                                                   "make it writable for this user\n"))
    assert list(reports.iterdir()) == [] and _events(cli_env) == recorded


@pytest.mark.parametrize("hidden", [".master.key.lock", ".master.key.tmp"])
def test_a_master_rotation_whose_hidden_key_file_is_a_folder_names_what_is_in_the_way(
        cli_env: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, hidden: str) -> None:
    """A folder named like the hidden lock or temporary copy `govrag keys rotate --master` makes beside the key file
    had it say "failed: Is a directory: FOLDER" of the key file's folder, naming nothing in the way. Now it names the
    folder in the way and what to do, nothing rotated, exit 2; once it is removed the rotation is made."""
    monkeypatch.setenv("COLUMNS", "400")  # the line unwrapped
    key_file = get_settings().resolved_master_key_file
    (in_the_way := key_file.with_name(hidden)).unlink(missing_ok=True)  # the lock file, kept since the key was made
    in_the_way.mkdir()
    ring = key_file.read_text()
    assert main(["keys", "rotate", "--master"]) == 2
    assert capsys.readouterr().err == (
        f"failed: cannot write in the folder {key_file.parent}: a folder named {hidden} is in the way there (govrag "
        "writes a hidden file of that name first): move it away or remove it; the master key is not rotated (nothing "
        "audited, every key stays readable): run the same command again once that is fixed\n")
    assert key_file.read_text() == ring
    in_the_way.rmdir()
    assert main(["keys", "rotate", "--master"]) == 0 and key_file.read_text() != ring


@pytest.mark.parametrize("module", ["sqlalchemy", "api.cli_audit"], ids=["as it starts", "as it parses arguments"])
@pytest.mark.parametrize("command", [
    ["redteam", "--department", "hr", "--token", "t", "--corpus", "{tmp}/corpus", "--url", "http://127.0.0.1:9"],
    ["audit", "export", "-o", "{tmp}/out/events.jsonl"],
    ["serve", "--port", "0"],
], ids=["redteam", "audit export", "serve"])
def test_a_ctrl_c_while_a_command_imports_what_it_runs_is_one_line_and_exit_130(
        tmp_path: Path, command: list[str], module: str) -> None:
    """A Ctrl-C in a command's first seconds, as `api.cli` or its argument parser imported the libraries it runs
    (`govrag redteam` before it loads its corpus, `govrag audit export`, `govrag serve` starting), ended in a
    KeyboardInterrupt traceback and death by the signal: they said a Ctrl-C in one line only once the command itself
    ran. Now it is one line and exit 130 from the first import on, and nothing is made: no data dir, no export nor
    its partial copy. The real command in a process of its own, stopped as it imports `module`."""
    (tmp_path / "out").mkdir()
    argv = [argument.format(tmp=tmp_path) for argument in command]
    process = subprocess.Popen(  # noqa: S603 (the test's own command)
        [sys.executable, "-m", "tests.support.cli_stopped_at", "import", module, *argv], cwd=ROOT,
        env=govrag_env(data_dir=str(tmp_path / "data")), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines_until(process, "stopped")
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert (process.returncode, out, err) == (130, "", f"govrag: {INTERRUPTED}")
    assert not (tmp_path / "data").exists() and list((tmp_path / "out").iterdir()) == []
