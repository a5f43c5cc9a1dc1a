"""The programs a parse runs (ingestion.sandbox): they die with the worker process that started it, and a parse
abandoned at its time limit starts none after it."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from core.errors import GovragError
from ingestion import sandbox, sniff
from ingestion.parse import run_with_timeout
from tests.support.conversion_inputs import FOLDER, drawing_only_pdf, long_odt
from tests.support.polling import wait_until

ROOT = Path(__file__).resolve().parents[2]
# Like soffice: a launcher whose own child (soffice.bin, here `sleep`) does the work and outlives a kill of it, with a
# copy of the document in TMPDIR (LibreOffice's lu*.tmp).
FAKE_SOFFICE = '#!/bin/sh\nfor last; do :; done\ncp "$last" "$TMPDIR/lu1234abcd.tmp"\n( exec sleep 300 ) &\nwait\n'
# A tesseract that never ends reading the page (`sleep`); what pytesseract asks before the work, the real one answers.
FAKE_TESSERACT = '#!/bin/sh\ncase "$1" in -v|--version|--list-langs) exec {real} "$@";; esac\nexec sleep 300\n'


def _gone(process: psutil.Process) -> bool:
    try:
        return process.status() == psutil.STATUS_ZOMBIE  # ended; reaped by whichever process adopted it
    except psutil.NoSuchProcess:
        return True


def _working(parent: psutil.Process, name: str) -> list[psutil.Process]:
    """The processes below `parent` once one of them is called `name` (the one doing the work), else []."""
    below = parent.children(recursive=True)
    return below if any(_named(process) == name for process in below) else []


def _named(process: psutil.Process) -> str | None:
    """Its name; None once it has ended (pdfinfo and pdftoppm end while the test looks)."""
    try:
        return process.name()
    except psutil.NoSuchProcess:
        return None


def _scenario(kind: str, tmp_path: Path) -> tuple[bytes, str, str]:
    """(document, content type, name of the process doing the work) for pandoc, LibreOffice and OCR, the fakes on
    PATH written to `tmp_path`."""
    if kind == "pandoc":
        return long_odt(), sniff.APPLICATION_ODT, "pandoc"
    if kind == "soffice":
        (tmp_path / "soffice").write_text(FAKE_SOFFICE)
        return (FOLDER / "unstructured_example_docs" / "fake.doc").read_bytes(), sniff.APPLICATION_DOC, "sleep"
    (tmp_path / "tesseract").write_text(FAKE_TESSERACT.format(real=shutil.which("tesseract")))
    return drawing_only_pdf(), sniff.APPLICATION_PDF, "sleep"


def _files(folder: Path) -> list[Path]:
    """The files below `folder`."""
    return [path for path in folder.rglob("*") if not path.is_dir()]


@pytest.mark.parametrize("kind", ["pandoc", "soffice", "tesseract"])
def test_a_conversion_dies_with_the_worker_process_that_started_it(kind: str, tmp_path: Path) -> None:
    """The Celery hard time limit SIGKILLs the worker child mid-parse: pandoc, `soffice.bin` (soffice's own child)
    or tesseract, adopted by init, went on with the document for minutes. And what the parse had written to disk,
    the document's plaintext, stayed there: the converter's private directory, unstructured's copy of the scan and
    its page image, pytesseract's input. Now the worker process that replaces it removes them as it starts."""
    data, content_type, worker_name = _scenario(kind, tmp_path)
    for fake in tmp_path.iterdir():
        fake.chmod(0o755)
    document, temp_dir = tmp_path / "upload", tmp_path / "tmp"
    document.write_bytes(data)
    temp_dir.mkdir()
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}", "PYTHONPATH": str(ROOT), "TMPDIR": str(temp_dir)}
    worker = subprocess.Popen([sys.executable, "-m", "tests.support.parse_process", str(document), content_type],  # noqa: S603
                              cwd=ROOT, env=env)
    left: list[psutil.Process] = []
    try:
        wait_until(lambda: bool(_working(psutil.Process(worker.pid), worker_name)), 180,
                   f"the worker to start {worker_name}")
        left = _working(psutil.Process(worker.pid), worker_name)
        worker.send_signal(signal.SIGKILL)
        worker.wait()
        wait_until(lambda: all(_gone(process) for process in left), 30, f"{kind}'s processes to die with the worker")
        assert _files(temp_dir), "the killed worker left no file: nothing below shows they are removed"
        (tmp_path / "next.txt").write_text("The next document.")
        subprocess.run([sys.executable, "-m", "tests.support.parse_process", str(tmp_path / "next.txt"),  # noqa: S603
                        sniff.TEXT_PLAIN], cwd=ROOT, env=env, check=True)
        assert list(temp_dir.iterdir()) == []
    finally:
        worker.kill()
        worker.wait()
        for process in left:
            if not _gone(process):
                process.kill()


def test_a_cancelled_parse_is_refused_the_program_it_would_start(tmp_path: Path) -> None:
    cancellation = sandbox.Cancellation()
    cancellation.cancel()
    with sandbox.cancelled_by(cancellation), pytest.raises(sandbox.Abandoned):
        sandbox.ChildPopen(["touch", str(tmp_path / "started")])  # noqa: S607
    assert not (tmp_path / "started").exists()


_FORKED_CHILDREN_MARKED: list[Path] = []
os.register_at_fork(after_in_child=lambda: [marker.touch() for marker in _FORKED_CHILDREN_MARKED])


def test_no_python_code_runs_in_a_program_before_it_starts(tmp_path: Path) -> None:
    """PR_SET_PDEATHSIG was asked for in a preexec_fn, Python code run between fork and exec, which Python's
    documentation calls unsafe in a threaded process (a worker is one): the child runs the at-fork hooks, and could
    hang on a lock another thread held. Here an at-fork hook marks a child that runs them; util-linux's setpriv now
    asks in the child, and the program still dies with the worker (the test above)."""
    marker = tmp_path / "python ran in the child"
    _FORKED_CHILDREN_MARKED.append(marker)
    try:
        assert sandbox.ChildPopen(["true"]).wait() == 0  # noqa: S607
    finally:
        _FORKED_CHILDREN_MARKED.clear()
    assert not marker.exists()


def test_a_time_limit_falling_while_a_program_starts_leaves_it_held_and_killed() -> None:
    """SIGALRM, the parse time limit on a worker's main thread, raised wherever it fell: in the middle of starting an
    OCR tool, the start was abandoned with the tool already forked, held by no one, and nothing killed it. Here the
    start takes a second (the child waits before its exec) and the limit falls during it: the limit waits for the
    start to end, and the program is killed with the block."""

    def slow_start() -> None:  # in the child, before its exec: test-only, a start that takes time
        time.sleep(1)

    before = set(psutil.Process().children())
    with pytest.raises(GovragError) as late, sandbox.killed_on_failure():
        run_with_timeout(lambda: sandbox.ChildPopen(["sleep", "60"], preexec_fn=slow_start).wait(),  # noqa: S607
                         sandbox.Deadline(0.2))
    left = set(psutil.Process().children()) - before
    for process in left:
        process.kill()
    assert late.value.message == "parsing took longer than the 0.2 s limit"
    assert not left, "the program whose start the limit interrupted runs on"


def test_a_killed_programs_unflushed_input_does_not_replace_the_blocks_error() -> None:
    """The pipes of the programs a failing block kills are closed with them: input still buffered for one, its flush
    to the killed program (a broken pipe) raised from the cleanup in place of the block's error. The block's error
    is raised, the pipe closed all the same."""
    with pytest.raises(RuntimeError, match="the block's own"), sandbox.killed_on_failure():
        program = sandbox.ChildPopen(["sleep", "60"], stdin=subprocess.PIPE)  # noqa: S607
        program.stdin.write(b"never flushed")  # type: ignore[union-attr]
        raise RuntimeError("the block's own")
    assert program.stdin.closed and program.returncode == -signal.SIGKILL  # type: ignore[union-attr]


@pytest.mark.parametrize("failure", [KeyboardInterrupt, RuntimeError])
def test_a_start_ended_once_the_program_is_forked_leaves_it_killed_and_reaped(
        failure: type[BaseException], monkeypatch: pytest.MonkeyPatch) -> None:
    """A Ctrl-C (or any failure) falling after subprocess.Popen had forked the program and before the program was
    held (among this process's live ones, in its `killed_on_failure` block) ended the start with the program running
    on, held by no one: nothing ever killed it. Here it falls as Popen returns: the program is killed and reaped."""
    pid = _started_then_ended_by(failure, monkeypatch)
    assert _reaped(pid), "the program whose start was interrupted runs on"


def test_a_start_ended_before_the_program_made_its_session_leaves_it_killed_and_reaped(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """subprocess.Popen forking (not vforking) the program, a Ctrl-C as Popen waits for its exec may fall before the
    program has made its session (setsid): the kill of that session missed it, and it ran on. Here it never makes
    one: the program, killed by its pid, is reaped all the same."""
    pid = _started_then_ended_by(KeyboardInterrupt, monkeypatch, start_new_session=False)
    assert _reaped(pid), "the program interrupted before it made its session runs on"


def test_a_ctrl_c_falling_as_the_fork_ends_leaves_the_program_killed_and_reaped(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A Ctrl-C falling as subprocess.Popen forks the program is raised as its fork and exec returns, before Popen
    keeps the pid: ChildPopen had no pid to kill, and the program ran on, known to no one. Here it falls there."""
    forked: list[int] = []
    fork_exec = subprocess._fork_exec  # type: ignore[attr-defined]

    def interrupted_as_it_returns(*args: object) -> int:
        forked.append(fork_exec(*args))
        raise KeyboardInterrupt

    monkeypatch.setattr(subprocess, "_fork_exec", interrupted_as_it_returns)
    with pytest.raises(KeyboardInterrupt):
        sandbox.ChildPopen(["sleep", "60"])  # noqa: S607
    monkeypatch.undo()
    [pid] = forked
    assert _reaped(pid), "the program whose pid the Ctrl-C kept from Popen runs on"


def test_the_sandbox_imported_again_leaves_every_program_starting() -> None:
    """subprocess's fork and exec is replaced once, by a function calling subprocess's own: imported again
    (importlib.reload), the sandbox wrapped its own wrapper, which then called itself, and every subprocess.Popen of
    the process failed (RecursionError)."""
    _python_runs("import importlib, subprocess\n"
                 "from ingestion import sandbox\n"
                 "importlib.reload(sandbox)\n"
                 "subprocess.run(['true'], check=True)\n"
                 "assert sandbox.ChildPopen(['true']).wait() == 0\n")


def test_a_python_without_subprocess_s_fork_and_exec_imports_the_sandbox() -> None:
    """`subprocess._fork_exec` is private: a Python without it (none before 3.11, or a later one renaming it) imports
    the sandbox, which leaves subprocess as it is, rather than failing with AttributeError."""
    _python_runs("import subprocess\n"
                 "del subprocess._fork_exec\n"
                 "from ingestion import sandbox\n"
                 "assert not hasattr(subprocess, '_fork_exec')\n")


def _python_runs(code: str) -> None:
    """Run `code` in a Python of its own (the sandbox imported afresh), which must end well."""
    ran = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(ROOT)},  # noqa: S603
                         capture_output=True, text=True, timeout=120, check=False)
    assert ran.returncode == 0, ran.stderr[-2000:]


def _started_then_ended_by(failure: type[BaseException], monkeypatch: pytest.MonkeyPatch, **popen: object) -> int:
    """The pid of a program whose start (subprocess.Popen's, with `popen` in place of what ChildPopen asks for)
    `failure` ended as Popen returned."""
    forked: list[int] = []
    popen_start = subprocess.Popen.__init__

    def interrupted_once_forked(process: subprocess.Popen[bytes], *args: object, **options: object) -> None:
        popen_start(process, *args, **{**options, **popen})  # type: ignore[arg-type]
        forked.append(process.pid)
        raise failure

    monkeypatch.setattr(subprocess.Popen, "__init__", interrupted_once_forked)
    with pytest.raises(failure):
        sandbox.ChildPopen(["sleep", "60"])  # noqa: S607
    monkeypatch.undo()
    [pid] = forked
    return pid


def _reaped(child: int) -> bool:
    """Whether this process's `child` has ended and been reaped; else it is killed (by pid: it may lead no session,
    and `sleep` runs in its place, none other in its session) and reaped now (the cleanup)."""
    try:
        ended, _status = os.waitpid(child, os.WNOHANG)
    except ChildProcessError:  # no longer a child of this process: reaped
        return True
    if not ended:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)
    return False


def test_a_missing_program_is_refused_as_it_starts_not_left_to_the_shell(tmp_path: Path) -> None:
    """Started through setpriv and a shell, a missing program was the shell's exit status 127 (pytesseract reported
    a TesseractError, pdf2image a page count it could not read), where subprocess.Popen, as without setpriv, raises
    FileNotFoundError (pytesseract: its tool not installed). Now `ProgramMissing`, a FileNotFoundError, either way."""
    for missing in (str(tmp_path / "tesseract"), "govrag-no-such-program"):
        with pytest.raises(sandbox.ProgramMissing) as refused:
            sandbox.ChildPopen([missing, "--version"])
        assert isinstance(refused.value, FileNotFoundError)
        assert refused.value.filename == missing


@pytest.fixture
def without_setpriv(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A system with no util-linux setpriv (not Linux), the warning about it not yet given in this process."""
    monkeypatch.setattr(sandbox, "_SETPRIV", None)
    sandbox._warn_started_unwrapped.cache_clear()  # noqa: SLF001
    yield
    sandbox._warn_started_unwrapped.cache_clear()  # noqa: SLF001


@pytest.mark.usefixtures("without_setpriv")
def test_without_setpriv_programs_start_as_they_are_and_that_is_said_once(caplog: pytest.LogCaptureFixture) -> None:
    """Without setpriv the programs started as they are, outliving a worker killed mid-parse, and nothing said so."""
    with caplog.at_level(logging.WARNING, logger="ingestion.sandbox"):
        for _ in range(2):
            assert sandbox.ChildPopen(["true"]).wait() == 0  # noqa: S607
    assert [record.getMessage() for record in caplog.records if record.name == "ingestion.sandbox"] == [
        f"util-linux's setpriv is not available ({sys.platform}): the programs a parse runs (converters, OCR tools) "
        "are not killed with a worker process killed at the hard time limit"]


def test_only_this_users_sockets_are_removed_never_what_takes_their_name(tmp_path: Path) -> None:
    """A converter's socket left outside its directory (LibreOffice's pipe in /tmp) is removed after the run; at its
    name, a symbolic link (to a socket of ours), a file, a folder or another user's socket stays, and so does what a
    link points to."""
    ours, target = tmp_path / "ours", tmp_path / "target"
    link, file, folder, theirs = tmp_path / "link", tmp_path / "file", tmp_path / "folder", tmp_path / "theirs"
    with contextlib.ExitStack() as sockets:
        for path in (ours, target, theirs):
            listener = sockets.enter_context(socket.socket(socket.AF_UNIX))
            listener.bind(str(path))
        link.symlink_to(target)
        file.write_text("someone's file")
        folder.mkdir()
        if os.geteuid() == 0:  # only root can make a socket another user's
            os.chown(theirs, 65534, 65534)
        else:
            theirs.unlink()
        sandbox.remove_sockets([ours, link, file, folder, theirs, tmp_path / "never-made"])
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(
        ["file", "folder", "link", "target"] + (["theirs"] if os.geteuid() == 0 else []))


def test_a_program_whose_temporary_directory_was_removed_does_not_start(tmp_path: Path) -> None:
    """A conversion whose start waited for its process's directory to be removed (`sessions_ended`) then started
    LibreOffice there, which made the directory's path again for its profile, and its pipe. Now it is refused."""
    with pytest.raises(FileNotFoundError, match="the program's temporary directory is gone"):
        sandbox.ChildPopen(["touch", str(tmp_path / "started")], temp_dir=str(tmp_path / "removed"))  # noqa: S607
    assert not (tmp_path / "started").exists()
