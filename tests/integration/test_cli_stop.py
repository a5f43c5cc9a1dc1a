"""`govrag ingest` and `govrag demo` stopped as a supervisor stops them (SIGTERM: systemd, docker, Kubernetes) leave no
private temporary directory (`ingestion.scratch`) behind, and die by the signal, as `govrag serve` does: they left it,
with the plaintext copy of the document being parsed in it, for the next process to remove. And a private directory
removed under a parse still running (a second Ctrl-C cuts `govrag serve`'s shutdown short) is the host's fault, never
the document's: it failed the file as "corrupt or malformed". The real commands, each in its own process, with a
temporary directory of their own; the ODT's conversion waits in a pandoc of the test's until the test lets it go on."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pypandoc
from sqlalchemy import select

from ingestion import scratch
from tests.support.conversion_inputs import ODT
from tests.support.govrag_process import govrag_env, run_govrag, start_govrag, stop_govrag
from tests.support.polling import wait_until

# pandoc, once the conversion started (`started` made), waiting for the test (`go`) before it runs
HELD_PANDOC = """#!{python}
import os, pathlib, sys, time
if sys.argv[1:] != ["--version"]:  # what pypandoc asks as it looks for pandoc
    pathlib.Path({started!r}).touch()
    while not os.path.exists({go!r}):
        time.sleep(0.05)
os.execv({real!r}, [{real!r}, *sys.argv[1:]])
"""


def _held_pandoc(tmp_path: Path) -> tuple[dict[str, str], Path, Path]:
    """The environment of an in-process `govrag ingest` (the `cli_env` database and data dir) converting with a held
    pandoc, TMPDIR tmp_path/tmp; the file pandoc makes once it started, and the one that lets it go on."""
    started, go, pandoc = tmp_path / "started", tmp_path / "go", tmp_path / "pandoc"
    real = Path(pypandoc.__file__).parent / "files" / "pandoc"
    pandoc.write_text(HELD_PANDOC.format(python=sys.executable, real=str(real), started=str(started), go=str(go)))
    pandoc.chmod(0o755)
    (tmp_path / "tmp").mkdir()
    return {**os.environ, "TMPDIR": str(tmp_path / "tmp"), "PYPANDOC_PANDOC": str(pandoc)}, started, go


def _private_dirs(temp_dir: Path) -> list[Path]:
    return list(temp_dir.glob(f"{scratch.PREFIX}*"))


@contextmanager
def _said_on_failure(log: Path) -> Iterator[None]:
    """A failure in the block carries the end of the command's `log`: a wait that timed out (under load) said only
    which wait it was, `Popen.wait`'s timeout and a directory count gone wrong not even that."""
    try:
        yield
    except (AssertionError, ValueError, subprocess.TimeoutExpired) as failure:
        raise AssertionError(f"{failure}\n--- the end of {log.name}:\n{log.read_text()[-3000:]}") from failure


def test_a_demo_stopped_by_sigterm_leaves_no_private_temporary_directory(tmp_path: Path) -> None:
    temp_dir, log = tmp_path / "tmp", tmp_path / "demo.log"
    temp_dir.mkdir()
    env = {**govrag_env(data_dir=str(tmp_path / "data")), "TMPDIR": str(temp_dir)}
    demo = start_govrag(["demo"], log=log, env=env)
    try:  # its in-process worker makes the directory as it starts, before the demo uploads its documents
        with _said_on_failure(log):
            wait_until(lambda: bool(_private_dirs(temp_dir)) or demo.poll() is not None, 300, "the demo's worker")
            assert stop_govrag(demo, signal.SIGTERM) == -signal.SIGTERM
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()
    assert _private_dirs(temp_dir) == []


def _held_at_conversion(ingest: subprocess.Popen[bytes], started: Path, temp_dir: Path, log: Path) -> Path:
    """The private directory of `ingest`, once its ODT's conversion started (held), with the copy pandoc converts."""
    with _said_on_failure(log):
        wait_until(lambda: started.exists() or ingest.poll() is not None, 300, "the ODT's conversion to start")
        assert started.exists(), "it ended before its conversion started"
        [private] = _private_dirs(temp_dir)
        assert any(private.rglob("upload.odt"))
    return private


def test_a_private_directory_removed_under_a_parse_fails_no_file_and_sigterm_removes_it(cli_env: str,
                                                                                       tmp_path: Path) -> None:
    """The run stops as on any outage, the file `unavailable`, its job handed back: run again, its parse starts over
    (a file failed would be a duplicate, not parsed again). That run stopped by SIGTERM removes its private directory,
    the copy pandoc converts in it, and dies by the signal."""
    env, started, go = _held_pandoc(tmp_path)
    temp_dir, log = tmp_path / "tmp", tmp_path / "ingest.log"
    argv = ["ingest", str(ODT), "--department", "hr"]
    ingest = start_govrag(argv, log=log, env=env)
    try:
        shutil.rmtree(_held_at_conversion(ingest, started, temp_dir, log))
        go.touch()
        with _said_on_failure(log):
            assert ingest.wait(300) == 1
        said = " ".join(log.read_text().split())  # the summary table's cells, wrapped
        assert "corrupt" not in said, said[-3000:]
        assert "unavailable: 1" in said and "the temporary directory is unavailable" in said, said[-3000:]
        started.unlink()
        go.unlink()
        ingest = start_govrag(argv, log=log, env=env)
        _held_at_conversion(ingest, started, temp_dir, log)
        with _said_on_failure(log):
            assert stop_govrag(ingest, signal.SIGTERM) == -signal.SIGTERM
    finally:
        go.touch()  # a held pandoc left (its death signal is setpriv's) goes on, and ends
        if ingest.poll() is None:
            ingest.kill()
            ingest.wait()
    assert _private_dirs(temp_dir) == []


def _jobs(url: str) -> dict[str, tuple[str, str, int]]:
    """Each document's title → its status, its job's, and the job's crashed runs."""
    from core.db import unit_of_work
    from core.models import Document, IngestionJob

    with unit_of_work(url) as session:
        return {title: (document, job, crashed) for title, document, job, crashed in session.execute(
            select(Document.title, Document.status, IngestionJob.status, IngestionJob.crashed_runs)
            .join(IngestionJob, IngestionJob.document_id == Document.id))}


def test_an_ingest_stopped_by_sigterm_mid_file_hands_it_back_and_a_run_again_finishes(cli_env: str,
                                                                                       tmp_path: Path) -> None:
    """A SIGTERM mid-file removed the private directory and ended the process at once: the file's job was left
    `processing`, marked sent, for an API's stall sweep to find (on the embedded default, nothing at all), and the
    command said nothing. Now the run stops as on a Ctrl-C: the job handed back (`queued`, no crash counted), one line
    saying where and how many files were handed back, the private directory removed, and the process still ends by
    the signal; the same command run again ingests that file and the rest."""
    env, started, go = _held_pandoc(tmp_path)
    temp_dir, log, folder = tmp_path / "tmp", tmp_path / "ingest.log", tmp_path / "inbox"
    folder.mkdir()
    shutil.copy(ODT, folder / "a-minutes.odt")
    (folder / "b-pay.md").write_text("# Pay\n\nPay day is the 25th of each month.\n")
    argv, env = ["ingest", str(folder), "--department", "hr"], {**env, "COLUMNS": "400"}  # its line unwrapped
    ingest = start_govrag(argv, log=log, env=env)
    try:
        _held_at_conversion(ingest, started, temp_dir, log)
        with _said_on_failure(log):
            assert stop_govrag(ingest, signal.SIGTERM) == -signal.SIGTERM
    finally:
        go.touch()  # a held pandoc left goes on, and ends; the run again converts at once
        if ingest.poll() is None:
            ingest.kill()
            ingest.wait()
    said = " ".join(log.read_text().split())
    assert (f"stopped by SIGTERM at {folder / 'a-minutes.odt'} (2 files not done, 1 handed back to wait); run the "
            "same command again to go on") in said, said[-3000:]
    assert "Traceback" not in said, said[-3000:]
    assert _jobs(cli_env) == {"a-minutes.odt": ("processing", "queued", 0)}
    assert _private_dirs(temp_dir) == []

    again = run_govrag(argv, env=env)
    out = " ".join(again.stdout.split())
    assert again.returncode == 0 and "ready: 2" in out and "ingested now" in out, (out, again.stderr[-3000:])
    assert _jobs(cli_env) == {"a-minutes.odt": ("ready", "ready", 0), "b-pay.md": ("ready", "ready", 0)}
    assert _private_dirs(temp_dir) == []
