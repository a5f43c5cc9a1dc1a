"""A process's private temporary directory (ingestion.scratch): removed by another process only once its owner
has ended, never while it runs."""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from core.errors import ErrorCode, GovragError, Unavailable
from ingestion import legacy_office, parse, sandbox, scratch, sniff
from tests.support import canary_documents
from tests.support.polling import wait_until
from tests.unit.test_legacy_office import FOLDER, libreoffice_pipe
from tests.unit.test_sandbox import FAKE_SOFFICE

ROOT = Path(__file__).resolve().parents[2]
DOC = FOLDER / "fake.doc"
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


def test_a_parse_whose_converter_the_removal_kills_is_an_outage(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A stop removing the directory kills the converters first: a parse whose converter it killed, failing before
    the directory is gone, was a file refused as corrupt. It is the outage the removal is (the job run again)."""
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "soffice").write_text(FAKE_SOFFICE)
    (tmp_path / "bin" / "soffice").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    base = tmp_path / "tmp"
    base.mkdir()
    monkeypatch.setattr(scratch, "_base", str(base))
    monkeypatch.setattr(scratch, "_current", None)
    monkeypatch.setattr(tempfile, "tempdir", tempfile.tempdir)
    failures: list[BaseException] = []

    def parse_the_doc() -> None:
        try:
            parse.parse_document(DOC.read_bytes(), sniff.APPLICATION_DOC)
        except BaseException as failure:  # noqa: BLE001 - the test's to look at
            failures.append(failure)

    parsing = threading.Thread(target=parse_the_doc)
    parsing.start()
    removal = shutil.rmtree

    def removed_once_the_parse_failed(path: str, **options: Any) -> None:  # the parse, woken by the kill, first
        if threading.current_thread() is not parsing:
            parsing.join()
        removal(path, **options)

    try:
        wait_until(lambda: bool(list(base.glob(f"*/{legacy_office.PREFIX}*/lu*.tmp"))), 60, "the converter's copy")
        monkeypatch.setattr(shutil, "rmtree", removed_once_the_parse_failed)
        scratch.remove_own()
    finally:
        parsing.join()
        os.close(scratch._current[2])  # type: ignore[index]
    assert [type(failure) for failure in failures] == [Unavailable]
    assert list(base.iterdir()) == []


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


# A process whose SIGTERM stops it (`stopped_on_sigterm`): one met as a program starts waits until it has started,
# sent again; then, stopped, it says so and ends by the signal, its directory removed
SIGTERMED_AS_A_PROGRAM_STARTS = """
import os, signal, time
from ingestion import sandbox, scratch
print(scratch.private_dir(), flush=True)
try:
    with scratch.stopped_on_sigterm():
        sandbox._starting.now = True
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(1000):  # its handler runs here, as a program starts: a backward jump looks for signals
            pass
        print("started", flush=True)
        sandbox._starting.now = False
        time.sleep(600)
except scratch.Terminated:
    print("stopped", signal.getsignal(signal.SIGTERM) is scratch._remove_and_end, flush=True)
    scratch.end_by_sigterm()
"""


def test_a_sigterm_stops_the_block_then_the_process_ends_by_it_its_directory_removed(tmp_path: Path) -> None:
    """`Terminated` is a KeyboardInterrupt (stopped as on a Ctrl-C), never raised as a program starts (it would run
    on, held by no one) but once it has; a second SIGTERM would end the process at once; the block restores the
    handler it found when no SIGTERM came."""
    assert issubclass(scratch.Terminated, KeyboardInterrupt)
    before = signal.getsignal(signal.SIGTERM)
    with scratch.stopped_on_sigterm():
        assert signal.getsignal(signal.SIGTERM) is not before
    assert signal.getsignal(signal.SIGTERM) is before
    process = subprocess.run([sys.executable, "-c", SIGTERMED_AS_A_PROGRAM_STARTS], cwd=ROOT,  # noqa: S603
                             capture_output=True, text=True, timeout=120, check=False,
                             env={**os.environ, "PYTHONPATH": str(ROOT), "TMPDIR": str(tmp_path)})
    directory, *said = process.stdout.splitlines()
    assert (process.returncode, said) == (-signal.SIGTERM, ["started", "stopped True"]), process.stderr
    assert Path(directory).parent == tmp_path and not Path(directory).exists()


# A process removing its directory on SIGTERM (`removed_on_sigterm`), SIGTERMed as its main thread starts a program,
# once forked but not yet held among the live ones (`sandbox._live_lock` held): the handler waits for the start to be
# done, sent again, then kills it with the others and ends the process by the signal, never deadlocking on that lock
SIGTERMED_MID_START = """
import os, signal, subprocess, sys, time
from ingestion import sandbox, scratch
popen_init = subprocess.Popen.__init__

def started_then_sigtermed(self, *args, **options):
    popen_init(self, *args, **options)
    print(self.pid, flush=True)
    os.kill(os.getpid(), signal.SIGTERM)
    for _ in range(100_000):  # its handler runs here: a backward jump looks for signals
        pass

subprocess.Popen.__init__ = started_then_sigtermed
print(scratch.private_dir(), flush=True)
with scratch.removed_on_sigterm():
    sandbox.ChildPopen(["sleep", "600"])
    print("started", flush=True)
    time.sleep(600)
"""


def test_a_sigterm_met_as_a_program_starts_ends_the_process_once_it_can_kill_it(tmp_path: Path) -> None:
    """Handled as the program was being started (the live programs' lock held by the main thread, where the handler
    runs), the SIGTERM removed the directory with that program, not yet held, running on in it. Now it is sent again
    once the start is done: the program killed, the directory removed, the process ended by the signal."""
    process = subprocess.Popen([sys.executable, "-c", SIGTERMED_MID_START], cwd=ROOT,  # noqa: S603
                               stdout=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONPATH": str(ROOT), "TMPDIR": str(tmp_path)})
    try:
        assert process.stdout is not None
        directory, pid, *said = process.stdout.read().splitlines()
        assert process.wait(timeout=120) == -signal.SIGTERM
        assert said == ["started"]
        assert Path(directory).parent == tmp_path and not Path(directory).exists()
        assert not psutil.pid_exists(int(pid)) or psutil.Process(int(pid)).status() == psutil.STATUS_ZOMBIE
    finally:
        process.kill()
        process.wait()
        process.stdout.close()  # type: ignore[union-attr]


# A worker process parsing each document in a folder, saying what each parse gave (JSON, by file name), then where
# tempfile's default (its private directory) is.
PARSE_ALL_AND_SAY = """
import json, sys, tempfile
from pathlib import Path
from ingestion.parse import parse_document
from ingestion.sniff import sniff_content_type
texts = {}
for path in sorted(Path(sys.argv[1]).iterdir()):
    data = path.read_bytes()
    texts[path.name] = ' '.join(section.text for section in parse_document(data, sniff_content_type(data, path.name)))
print(json.dumps(texts))
print(tempfile.gettempdir())
"""
# What a parse may leave outside the private directory: matplotlib's list of the system's fonts (unstructured's PDF
# partitioner imports it), built once per HOME; no document's text (asserted below)
FONT_CACHE = ("~/.cache", "~/.cache/matplotlib", "~/.cache/matplotlib/fontlist-v*.json", "~/.config",
              "~/.config/matplotlib")


def test_no_parse_writes_a_document_outside_the_private_directory(tmp_path: Path) -> None:
    """Every format parses in the private directory, whatever the environment says of temporary directories. Where it
    set GLOBAL_WORKING_DIR_ENABLED, importing unstructured made ~/.cache/unstructured/tmp/<process group> tempfile's
    default: the private directory, every temporary file of a parse in it, was made there, where the next worker in
    another process group never looks for a killed one's, and that directory was left behind, one per process group.
    Each document holds a line of text found after in no file of HOME, TMPDIR, TMP, TEMP or the working directory."""
    documents, home, temp, other_temp, cwd = (tmp_path / name for name in ("documents", "home", "tmp", "tmp2", "cwd"))
    for folder in (documents, home, temp, other_temp, cwd):
        folder.mkdir()
    lines = canary_documents.write_all(documents, legacy=legacy_office.available(), scan=parse.ocr_available())
    environment = {"HOME": str(home), "TMPDIR": str(temp), "TMP": str(other_temp), "TEMP": str(other_temp),
                   "GLOBAL_WORKING_DIR_ENABLED": "true", "GLOBAL_WORKING_DIR": str(home / "unstructured"),
                   "GLOBAL_WORKING_PROCESS_DIR": str(home / "unstructured-process")}
    said = subprocess.run([sys.executable, "-c", PARSE_ALL_AND_SAY, str(documents)], cwd=cwd,  # noqa: S603
                          capture_output=True, text=True, check=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **environment})
    texts, private = said.stdout.splitlines()[-2:]
    assert {name: lines[name] in text for name, text in json.loads(texts).items()} == dict.fromkeys(lines, True)
    assert Path(private).parent == temp
    assert Path(private).name.startswith(scratch.PREFIX)
    for folder in (temp, other_temp, cwd):
        assert list(folder.iterdir()) == []  # the private directory removed as the process ended
    font_cache = [pattern.replace("~", str(home)) for pattern in FONT_CACHE]
    assert [path for path in home.rglob("*") if not any(fnmatch.fnmatch(str(path), glob) for glob in font_cache)] == []
    assert [path for path in home.rglob("*") if path.is_file()
            and any(line.encode() in path.read_bytes() for line in lines.values())] == []


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


# A process converting a .doc on a thread that ends as soon as LibreOffice's pipe is there, having said which
# conversion's: by `exit` (atexit run), or by `stop`, `remove_own` then `os._exit` (`govrag serve`, a Celery prefork
# child); or says nothing, once that conversion ended first. The pipe of the second soffice.bin: on a new profile the
# first makes it, makes the profile, removes its pipe and ends, for oosplash to start another, which converts.
END_MID_CONVERSION = """
import os, sys, threading, time
from pathlib import Path
import psutil
from ingestion import legacy_office, sandbox, sniff, scratch
private = Path(scratch.private_dir())
data = Path(sys.argv[1]).read_bytes()
conversion = threading.Thread(target=legacy_office.convert, args=(data, sniff.APPLICATION_DOC, sandbox.Deadline(300)),
                              daemon=True)
conversion.start()
first = None
while conversion.is_alive():
    binaries = [process.pid for process in psutil.process_iter(['name', 'cmdline'])
                if process.info['name'] == 'soffice.bin' and str(private) in ' '.join(process.info['cmdline'] or [])]
    first = first or min(binaries, default=None)
    for work in private.glob(legacy_office.PREFIX + '*'):
        if any(os.path.lexists(pipe) for pipe in legacy_office.ipc_pipes(work)) and set(binaries) - {first}:
            print(work, flush=True)
            if sys.argv[2] == 'stop':
                scratch.remove_own()
                os._exit(0)
            sys.exit()
    time.sleep(0.02)
"""


@pytest.mark.parametrize("ending", ["exit", "stop"])
def test_a_process_ending_mid_conversion_takes_libreoffices_pipe_with_its_directory(tmp_path: Path,
                                                                                     ending: str) -> None:
    """A process ending while LibreOffice converts (a conversion on a thread its exit abandons; or `remove_own` at a
    stop) removed its directory and left the pipe in /tmp: LibreOffice, killed as that process died, never removes
    it, and no later process looks for it (its directory is gone). It goes with the directory now. A run whose
    conversion ended before the process (the machine busy), or whose first soffice.bin went unseen, shows nothing: it
    is run again."""
    if not legacy_office.available():
        assert shutil.which("soffice") is None
        return
    work = None
    for _ in range(3):
        said = subprocess.run([sys.executable, "-c", END_MID_CONVERSION, str(DOC), ending], cwd=ROOT,  # noqa: S603
                              capture_output=True, text=True, timeout=300,
                              env={**os.environ, "PYTHONPATH": str(ROOT), "TMPDIR": str(tmp_path)})
        assert said.returncode == 0
        if said.stdout.strip():
            work = Path(said.stdout.strip())
            break
    assert work is not None, "LibreOffice made no pipe (or ended first, three times): nothing here shows it is removed"
    try:
        wait_until(lambda: not any(str(work) in " ".join(process.info["cmdline"] or [])
                                   for process in psutil.process_iter(["cmdline"])),
                   60, "the LibreOffice of the ended process to be gone")
        assert not os.path.lexists(libreoffice_pipe(work))
    finally:
        sandbox.remove_sockets([libreoffice_pipe(work)])  # on the old code: none left behind by this test


def test_removing_the_directory_raises_nothing_when_it_goes_meanwhile(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The removal runs in a SIGTERM's handler, which then ends the process: the directory gone between the look for
    it and the listing of its conversions (removed by hand; scandir's FileNotFoundError) raised out of the handler,
    the process going on, the SIGTERM turned into an exception in whatever code it met."""
    directory = tmp_path / f"{scratch.PREFIX}x"
    directory.mkdir()

    def gone(_path: Path, _pattern: str) -> Iterator[Path]:
        raise FileNotFoundError(2, "No such file or directory")

    monkeypatch.setattr(Path, "glob", gone)
    scratch._remove_at_exit(os.getpid(), str(directory))
    assert not directory.exists()


# A converter standing in for LibreOffice, started as it is (`sandbox.convert`): it writes copies of the document
# (`lu*.tmp`) in its TMPDIR (argv[1], named for the processes that run in it to be found), and makes its pipe
# (argv[2]) again whenever it is not there, as a second soffice.bin does, until it is killed.
STILL_WRITING = """
import os, socket, sys
pipe, listeners, copy = sys.argv[2], [], 0
while True:
    copy = (copy + 1) % 50
    try:
        with open(os.path.join(os.environ["TMPDIR"], f"lu{copy}.tmp"), "wb") as file:
            file.write(b"the document's plaintext")
        if not os.path.lexists(pipe):
            listeners.append(socket.socket(socket.AF_UNIX))
            listeners[-1].bind(pipe)
    except OSError:
        pass
"""
# A process converting a document on a thread (`converter`: the stand-in above, or LibreOffice), which says the
# conversion's folder once its copy of the document and its pipe are there (an empty line: the conversion ended
# first), then ends by `exit` (atexit run), by `stop` (`remove_own` then `os._exit`: `govrag serve`, a Celery prefork
# child) or by the SIGTERM the test sends; and says, its directory gone, which processes of the conversion run still.
END_WHILE_CONVERTING = """
import atexit, os, signal, sys, threading, time
from pathlib import Path
import psutil
from ingestion import legacy_office, sandbox, scratch, sniff
ending, converter = sys.argv[1:3]

def running_in(folder):
    return sorted(process.info['name'] for process in psutil.process_iter(['name', 'cmdline', 'status'])
                  if process.info['status'] != psutil.STATUS_ZOMBIE
                  and folder in ' '.join(process.info['cmdline'] or []))

def say_what_runs(*_):
    print(running_in(str(private)), flush=True)

atexit.register(say_what_runs)  # runs after the directory's removal
ends_by = signal.raise_signal  # as the process ends by the SIGTERM, once its directory went
signal.raise_signal = lambda signum: (say_what_runs(), ends_by(signum))
private = Path(scratch.private_dir())
if converter == 'libreoffice':
    convert = legacy_office.convert
    args = (Path(sys.argv[3]).read_bytes(), sniff.APPLICATION_DOC, sandbox.Deadline(300))
else:
    convert = sandbox.convert
    conversion = sandbox.Conversion(what='stand-in', prefix=legacy_office.PREFIX, source='upload.doc',
                                    output='out.docx', program=sys.executable, sockets=legacy_office.ipc_pipes)
    args = (conversion, b'the document', lambda work: [sys.executable, '-c', converter, str(work),
                                                        str(legacy_office.ipc_pipes(work)[0])], sandbox.Deadline(300))
with scratch.removed_on_sigterm():
    conversion = threading.Thread(target=convert, args=args, daemon=True)
    conversion.start()
    while conversion.is_alive() and not [work for work in private.glob(legacy_office.PREFIX + '*')
                                         if list(work.rglob('lu*.tmp'))
                                         and os.path.lexists(legacy_office.ipc_pipes(work)[0])]:
        time.sleep(0.01)
    if converter == 'libreoffice':  # held mid-conversion, so that it cannot end before the process does
        for process in psutil.process_iter(['name', 'cmdline']):
            if process.info['name'] == 'soffice.bin' and str(private) in ' '.join(process.info['cmdline'] or []):
                process.suspend()
    print(next(private.glob(legacy_office.PREFIX + '*'), '') if conversion.is_alive() else '', flush=True)
    if ending == 'stop':
        scratch.remove_own()
        say_what_runs()
        os._exit(0)
    if ending == 'exit':
        sys.exit()
    time.sleep(600)
"""


def _end_while_converting(tmp_path: Path, ending: str, *converter: str) -> tuple[list[str], Path | None]:
    """Run END_WHILE_CONVERTING with TMPDIR `tmp_path`; what it said once its directory went, and its conversion's
    folder (None: the conversion ended first), once no process of that conversion runs any longer (killed if need
    be)."""
    process = subprocess.Popen([sys.executable, "-c", END_WHILE_CONVERTING, ending, *converter],  # noqa: S603
                               cwd=ROOT, stdout=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONPATH": str(ROOT), "TMPDIR": str(tmp_path)})
    assert process.stdout is not None
    folder = process.stdout.readline().strip()
    try:
        if ending == "sigterm":
            process.send_signal(signal.SIGTERM)
        said = process.stdout.read().splitlines()
        assert process.wait(timeout=120) == (-signal.SIGTERM if ending == "sigterm" else 0)
        return said, Path(folder) if folder else None
    finally:
        process.kill()
        process.wait()
        process.stdout.close()
        for survivor in _running_in(tmp_path):
            survivor.kill()


def _running_in(folder: Path) -> list[psutil.Process]:
    """The processes, not ended, whose command line names `folder`."""
    return [process for process in psutil.process_iter(["cmdline", "status"])
            if process.info["status"] != psutil.STATUS_ZOMBIE
            and str(folder) in " ".join(process.info["cmdline"] or [])]


def _nothing_left(tmp_path: Path, said: list[str], work: Path) -> None:
    """Nothing of the conversion in `work` ran once the directory was removed, nor runs, nor is left."""
    pipe = legacy_office.ipc_pipes(work)[0]
    try:
        assert said == ["[]"]
        assert _running_in(work) == []
        assert list(tmp_path.iterdir()) == []
        assert not os.path.lexists(pipe)
    finally:
        sandbox.remove_sockets([pipe])


ENDINGS = ["exit", "stop", "sigterm"]


@pytest.mark.parametrize("ending", ENDINGS)
def test_a_process_ending_mid_conversion_kills_it_before_its_directory_goes(tmp_path: Path, ending: str) -> None:
    """A process ending while a converter writes in its directory (on a thread its exit abandons; cut by a stop or
    a SIGTERM) removed that directory with the converter still running, which died only with the process: its copies
    of the document written meanwhile kept the directory there (not empty), and its pipe, made again once removed,
    stayed in /tmp. Now it is killed and waited for first."""
    said, work = _end_while_converting(tmp_path, ending, STILL_WRITING)
    assert work is not None
    _nothing_left(tmp_path, said, work)


@pytest.mark.parametrize("ending", ENDINGS)
def test_a_process_ending_mid_conversion_kills_libreoffice_before_its_directory_goes(tmp_path: Path,
                                                                                     ending: str) -> None:
    """The same with LibreOffice converting a .doc (`soffice.bin` stopped once seen, SIGSTOP, as in a long
    conversion): it ran on in the removed directory. A run whose conversion ended before its copy and pipe were seen
    (the machine busy) shows nothing: it is run again."""
    if not legacy_office.available():
        assert shutil.which("soffice") is None
        return
    for _ in range(3):
        said, work = _end_while_converting(tmp_path, ending, "libreoffice", str(DOC))
        if work is not None:
            break
    assert work is not None, "LibreOffice was not seen converting (three times): nothing here shows it is killed"
    _nothing_left(tmp_path, said, work)
