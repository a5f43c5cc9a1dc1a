"""A process's private temporary directory (ingestion.scratch): removed by another process only once its owner
has ended, never while it runs."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from core.errors import ErrorCode, GovragError, Unavailable
from ingestion import scratch
from tests.unit.test_legacy_office import libreoffice_pipe

ROOT = Path(__file__).resolve().parents[2]
# A process that makes its private directory in TMPDIR, says which, and runs until killed.
OWNER = "import sys, time; from ingestion import scratch; print(scratch.private_dir(), flush=True); time.sleep(600)"


def _owner(base: Path) -> tuple[subprocess.Popen[str], Path]:
    """A running owner of a private directory in `base`, and that directory, with a page of a scan in it."""
    owner = subprocess.Popen([sys.executable, "-c", OWNER], cwd=ROOT, stdout=subprocess.PIPE, text=True,  # noqa: S603
                             env={**os.environ, "PYTHONPATH": str(ROOT), "TMPDIR": str(base)})
    assert owner.stdout is not None
    directory = Path(owner.stdout.readline().strip())
    assert directory.parent == base
    (directory / "page-1.ppm").write_bytes(b"the scan's plaintext")
    return owner, directory


def test_the_directories_of_ended_processes_are_removed_and_no_other(tmp_path: Path) -> None:
    running, live = _owner(tmp_path)
    killed, of_killed = _owner(tmp_path)
    zombie, of_zombie = _owner(tmp_path)
    try:
        for ended in (killed, zombie):
            ended.send_signal(signal.SIGKILL)
        killed.wait()
        os.waitid(os.P_PID, zombie.pid, os.WEXITED | os.WNOWAIT)  # ended, unreaped: a killed child its pool missed
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        (elsewhere / "keep").write_text("not a private directory")
        (tmp_path / f"{scratch.PREFIX}link").symlink_to(elsewhere)
        unowned = tmp_path / "govrag-pandoc-abc"
        unowned.mkdir()
        assert sorted(scratch.remove_ended(tmp_path)) == sorted([of_killed, of_zombie])
        assert sorted(tmp_path.iterdir()) == sorted([live, elsewhere, tmp_path / f"{scratch.PREFIX}link", unowned])
        assert (live / "page-1.ppm").exists() and (elsewhere / "keep").exists()
    finally:
        for owner in (running, killed, zombie):
            owner.kill()
            owner.wait()
            owner.stdout.close()  # type: ignore[union-attr]


def _converter_directory(base: Path, name: str, modified: float) -> Path:
    """A converter's working directory as older releases left it in TMPDIR, with the upload, last modified then."""
    directory = base / name
    directory.mkdir()
    (directory / "upload.odt").write_bytes(b"the upload's plaintext")
    os.utime(directory, (modified, modified))
    return directory


def test_older_releases_converter_directories_are_removed_a_day_old(tmp_path: Path) -> None:
    """Releases before the private directories made pandoc's and LibreOffice's directories in TMPDIR itself, with no
    owner's lock: those a killed worker left stayed for good. A day old, past any conversion, they are removed."""
    day_old = time.time() - scratch.LEGACY_AGE_SECONDS - 60
    left = [_converter_directory(tmp_path, name, day_old) for name in ("govrag-pandoc-a1b2", "govrag-soffice-c3d4")]
    converting = _converter_directory(tmp_path, "govrag-soffice-e5f6", time.time() - 60)  # may be converting still
    other = _converter_directory(tmp_path, "other-pandoc-a1b2", day_old)
    elsewhere = _converter_directory(tmp_path, "elsewhere", day_old)  # what a link to it must not lead to removing
    link = tmp_path / "govrag-pandoc-link"
    link.symlink_to(elsewhere)
    os.utime(link, (day_old, day_old), follow_symlinks=False)
    assert sorted(scratch.remove_ended(tmp_path)) == sorted(left)
    assert sorted(tmp_path.iterdir()) == sorted([converting, other, elsewhere, link])
    assert (elsewhere / "upload.odt").exists()


def test_a_process_parses_in_a_directory_of_its_own(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """tempfile's default is the process's own directory, held while it runs; a forked child makes its own."""
    monkeypatch.setattr(scratch, "_base", str(tmp_path))
    monkeypatch.setattr(scratch, "_current", None)
    monkeypatch.setattr(tempfile, "tempdir", tempfile.tempdir)
    directory = Path(scratch.private_dir())
    try:
        assert directory.parent == tmp_path
        assert directory.name.startswith(scratch.PREFIX)
        assert tempfile.gettempdir() == str(directory)
        assert scratch.private_dir() == str(directory)
        read, write = os.pipe()
        child = os.fork()
        if child == 0:  # pragma: no cover - the child reports through the pipe
            os.write(write, scratch.private_dir().encode())
            os._exit(0)  # no clean-up: as if killed
        os.close(write)
        os.waitpid(child, 0)
        with os.fdopen(read, "rb") as answer:
            childs = Path(answer.read().decode())
        assert childs.parent == tmp_path
        assert scratch.remove_ended(tmp_path) == [childs]  # this process's, inherited by the child, still held
        assert directory.is_dir()
    finally:
        os.close(scratch._current[2])  # type: ignore[index]


def test_a_parse_whose_directory_went_is_an_outage_and_only_then(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A malformed document is refused as such in its directory; the same failure once the directory, or `$TMPDIR`
    itself, went is the host's outage; once `$TMPDIR` is back the next parse makes a directory again, closing no
    descriptor twice (the missing directory's was closed as it found it gone)."""
    base = tmp_path / "tmp"
    base.mkdir()
    monkeypatch.setattr(scratch, "_base", str(base))
    monkeypatch.setattr(scratch, "_current", None)
    monkeypatch.setattr(tempfile, "tempdir", tempfile.tempdir)
    malformed = GovragError(ErrorCode.unsupported_type, "could not parse the ODT: the file is corrupt or malformed")
    with pytest.raises(GovragError) as refused, scratch.parsing():
        raise malformed
    assert refused.value is malformed
    with pytest.raises(Unavailable, match="^the temporary directory is unavailable$"), scratch.parsing():
        shutil.rmtree(tempfile.gettempdir())  # by hand, or a stop's `remove_own` under a parse it abandoned
        raise malformed
    shutil.rmtree(base)
    stale = scratch._current[2]  # type: ignore[index]
    with (tmp_path / "other").open("w") as other:  # opened before `stale` is closed, so under another number
        with pytest.raises(Unavailable, match="^the temporary directory is unavailable$"), scratch.parsing():
            pass
        base.mkdir()
        os.dup2(other.fileno(), stale)  # the descriptor number closed, now another file's
        try:
            with scratch.parsing():
                assert Path(tempfile.gettempdir()).parent == base
            assert os.path.samestat(os.fstat(stale), os.fstat(other.fileno()))
        finally:
            os.close(stale)
            os.close(scratch._current[2])  # type: ignore[index]


# A process that removes its directory on SIGTERM, SIGTERMed as its main thread holds the lock `private_dir` takes
SIGTERMED_IN_PRIVATE_DIR = """
import time
from ingestion import scratch
print(scratch.private_dir(), flush=True)
with scratch.removed_on_sigterm(), scratch._lock:
    print("held", flush=True)
    time.sleep(600)
"""


def test_a_sigterm_removes_the_directory_and_ends_the_process_by_it(tmp_path: Path) -> None:
    """Even as the main thread, where the handler runs, holds the lock (no deadlock); and the block restores the
    handler it found."""
    before = signal.getsignal(signal.SIGTERM)
    with scratch.removed_on_sigterm():
        assert signal.getsignal(signal.SIGTERM) is not before
    assert signal.getsignal(signal.SIGTERM) is before
    process = subprocess.Popen([sys.executable, "-c", SIGTERMED_IN_PRIVATE_DIR], cwd=ROOT,  # noqa: S603
                               stdout=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONPATH": str(ROOT), "TMPDIR": str(tmp_path)})
    try:
        assert process.stdout is not None
        directory = Path(process.stdout.readline().strip())
        assert directory.parent == tmp_path and process.stdout.readline() == "held\n"
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=120) == -signal.SIGTERM
        assert not directory.exists()
    finally:
        process.kill()
        process.wait()
        process.stdout.close()  # type: ignore[union-attr]


# A worker process parsing a document, then saying where tempfile's default (its private directory) is.
PARSE_AND_SAY = ("import tempfile; from ingestion.parse import parse_document; "
                 "parse_document(b'The text of a document.', 'text/plain'); print(tempfile.gettempdir())")


def test_unstructured_working_directory_setting_moves_no_temporary_file_out(tmp_path: Path) -> None:
    """Where the environment set GLOBAL_WORKING_DIR_ENABLED, importing unstructured made ~/.cache/unstructured/
    tmp/<process group> tempfile's default: the private directory, every temporary file of a parse in it, was made
    there, where the next worker in another process group never looks for a killed one's, and that directory was
    left behind, one per process group."""
    home, temp = tmp_path / "home", tmp_path / "tmp"
    home.mkdir()
    temp.mkdir()
    said = subprocess.run([sys.executable, "-c", PARSE_AND_SAY], cwd=ROOT, capture_output=True, text=True,  # noqa: S603
                          check=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT), "HOME": str(home),
                                                        "TMPDIR": str(temp), "GLOBAL_WORKING_DIR_ENABLED": "true"})
    private = Path(said.stdout.strip())
    assert private.parent == temp
    assert private.name.startswith(scratch.PREFIX)
    assert list(temp.iterdir()) == []  # removed as the process ended
    assert [path for path in home.rglob("*") if "unstructured" in path.parts] == []


@contextlib.contextmanager
def _listening(path: Path) -> Iterator[None]:
    """A Unix socket at `path` (as LibreOffice makes its pipe), closed and removed at the end of the block."""
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(path))
        try:
            yield
        finally:
            path.unlink(missing_ok=True)


def test_libreoffice_pipes_a_killed_process_left_in_tmp_go_with_its_directory(tmp_path: Path) -> None:
    """A worker process killed mid-conversion (the hard time limit) leaves LibreOffice's pipe in /tmp, outside its
    private directory, which the next process removes: the pipe stayed. Now it goes with the directory; a live
    process's conversion keeps its own."""
    running, live = _owner(tmp_path)
    killed, of_killed = _owner(tmp_path)
    try:
        killed.kill()
        killed.wait()
        converting, interrupted = live / "govrag-soffice-a1b2", of_killed / "govrag-soffice-c3d4"
        for work in (converting, interrupted):
            work.mkdir()
        with _listening(libreoffice_pipe(converting)), _listening(libreoffice_pipe(interrupted)):
            assert scratch.remove_ended(tmp_path) == [of_killed]
            assert not os.path.lexists(libreoffice_pipe(interrupted))
            assert os.path.lexists(libreoffice_pipe(converting))
    finally:
        for owner in (running, killed):
            owner.kill()
            owner.wait()
            owner.stdout.close()  # type: ignore[union-attr]
