"""Word/PowerPoint 97-2003 files: converted by LibreOffice where it is installed (`.ci/run` installs it), refused
with that reason where it is not; a conversion that overruns the parse time limit is killed."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from core.errors import ErrorCode, GovragError
from ingestion import legacy_office, sandbox, sniff
from ingestion.parse import ParseLimits, parse_document

ROOT = Path(__file__).resolve().parents[2]
FOLDER = Path(__file__).resolve().parents[3] / "shared" / "eval" / "enterprise_docs_ingestion"
FOLDER = FOLDER / "unstructured_example_docs"
LEGACY = {"fake.doc": (sniff.APPLICATION_DOC, "Lorem ipsum dolor sit amet."),
          "fake-power-point.ppt": (sniff.APPLICATION_PPT, "Adding a Bullet Slide")}


@pytest.fixture(autouse=True)
def no_libreoffice_pipe_left(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """After each test, none of the pipes of the LibreOffice conversions it ran is left in /tmp, however the
    conversion ended (converted, killed at the time limit, aborted under the memory cap, corrupt)."""
    conversions: list[Path] = []
    run = sandbox.run_to_the_end

    def recorded(command: list[str], temp_dir: Path, timeout_seconds: float | None) -> int | None:
        if temp_dir.name.startswith(legacy_office.PREFIX):
            conversions.append(temp_dir)
        return run(command, temp_dir, timeout_seconds)

    monkeypatch.setattr(sandbox, "run_to_the_end", recorded)
    yield
    assert [libreoffice_pipe(work) for work in conversions if os.path.lexists(libreoffice_pipe(work))] == []


@pytest.mark.parametrize("name", sorted(LEGACY))
def test_legacy_office_files_are_sniffed_then_converted_or_refused_with_the_reason(name: str) -> None:
    data = (FOLDER / name).read_bytes()
    content_type, expected_text = LEGACY[name]
    assert sniff.sniff_content_type(data, "upload.bin") == content_type  # from the bytes, not the name
    if not legacy_office.available():
        with pytest.raises(GovragError) as refused:
            parse_document(data, content_type)
        assert "needs LibreOffice" in refused.value.message
        return
    sections = parse_document(data, content_type)
    assert expected_text in " ".join(section.text for section in sections)


def test_without_libreoffice_the_refusal_names_the_format_and_the_way_out(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(legacy_office.shutil, "which", lambda _name: None)
    with pytest.raises(GovragError) as refused:
        parse_document((FOLDER / "fake.doc").read_bytes(), sniff.APPLICATION_DOC)
    assert refused.value.code == ErrorCode.unsupported_type
    assert refused.value.message.startswith("it is a Word 97-2003 (.doc) file: save it as DOCX")


def test_a_conversion_past_the_time_limit_is_killed_and_fails_clearly() -> None:
    if not legacy_office.available():
        assert shutil.which("soffice") is None
        return
    with pytest.raises(GovragError) as slow:
        parse_document((FOLDER / "fake-power-point.ppt").read_bytes(), sniff.APPLICATION_PPT,
                       ParseLimits(timeout_seconds=0.05))
    assert "took longer than the 0.05 s limit" in slow.value.message
    time.sleep(0.5)
    assert not [p for p in psutil.process_iter(["cmdline"]) if "govrag-soffice-" in " ".join(p.info["cmdline"] or [])]


def test_libreoffice_converts_under_its_memory_cap_and_fails_clearly_over_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """LibreOffice had no memory cap: a crafted file could make soffice.bin take the machine's memory. Under the
    default cap the example .doc converts; under a cap of 100 MB, soffice.bin aborts and the file fails with the
    conversion's reason, nothing left running."""
    if not legacy_office.available():
        assert shutil.which("soffice") is None
        return
    name = "fake.doc"
    data, (content_type, expected_text) = (FOLDER / name).read_bytes(), LEGACY[name]
    assert expected_text in " ".join(section.text for section in parse_document(data, content_type))
    monkeypatch.setattr(legacy_office, "MEMORY_LIMIT_MB", 100)
    with pytest.raises(GovragError) as over:
        parse_document(data, content_type, ParseLimits(timeout_seconds=300))
    assert over.value.message == "could not convert the Word 97-2003 (.doc) file: it is corrupt or malformed"
    assert not [p for p in psutil.process_iter(["cmdline"]) if "govrag-soffice-" in " ".join(p.info["cmdline"] or [])]


# A worker whose hard RLIMIT_DATA is argv[2] bytes converting the .doc argv[1]: what it answers.
_UNDER_A_DATA_LIMIT = """
import resource, sys
from pathlib import Path
resource.setrlimit(resource.RLIMIT_DATA, (int(sys.argv[2]), int(sys.argv[2])))
from core.errors import GovragError
from ingestion import legacy_office, sandbox, sniff
try:
    legacy_office.convert(Path(sys.argv[1]).read_bytes(), sniff.APPLICATION_DOC, sandbox.Deadline(300))
    print("converted")
except GovragError as exc:
    print(exc.code.name, exc.message)
"""


def test_a_hard_data_limit_below_the_memory_cap_refuses_legacy_files_saying_so() -> None:
    """Under a hard data-size limit below the cap (a service's LimitDATA), `ulimit -d` failed, soffice never ran and
    every .doc failed as "corrupt or malformed" (with CAP_SYS_RESOURCE the shell raised the operator's limit instead).
    Refused, saying what is missing, before LibreOffice starts."""
    if not legacy_office.available():
        assert shutil.which("soffice") is None
        return
    below = (legacy_office.MEMORY_LIMIT_MB - 1) * 1024 * 1024
    run = subprocess.run([sys.executable, "-c", _UNDER_A_DATA_LIMIT, str(FOLDER / "fake.doc"), str(below)],  # noqa: S603
                         cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                         timeout=300, check=True)
    assert run.stdout.strip() == ("unsupported_type it is a Word 97-2003 (.doc) file: save it as DOCX; converting it "
                                  "needs LibreOffice under a 1024 MB memory cap, which this deployment's data-size "
                                  "limit does not allow")


def test_a_corrupt_legacy_file_fails_with_a_reason_not_a_crash() -> None:
    data = bytearray((FOLDER / "fake.doc").read_bytes())
    data[2048:] = bytes(len(data) - 2048)  # the header and directory survive, the content is gone
    with pytest.raises(GovragError) as broken:
        parse_document(bytes(data), sniff.APPLICATION_DOC)
    assert broken.value.code in (ErrorCode.invalid_request, ErrorCode.unsupported_type)


def test_a_converted_file_its_parser_rejects_is_named_as_uploaded(monkeypatch: pytest.MonkeyPatch) -> None:
    """The DOCX LibreOffice made is the uploader's .doc: "could not parse the DOCX" named a file never sent."""
    if not legacy_office.available():
        assert shutil.which("soffice") is None
        return

    def reject(*_args: object, **_kwargs: object) -> None:
        raise ValueError("malformed")

    monkeypatch.setattr("unstructured.partition.docx.partition_docx", reject)
    with pytest.raises(GovragError) as rejected:
        parse_document((FOLDER / "fake.doc").read_bytes(), sniff.APPLICATION_DOC)
    assert rejected.value.message == "could not parse the DOC: the file is corrupt or malformed"


FAKE_SOFFICE = """#!/bin/sh
# Like soffice: copies the document into TMPDIR (LibreOffice's lu*.tmp) and starts a process of its own (soffice.bin)
# that goes on writing into the output directory.
prev=""; for arg in "$@"; do [ "$prev" = "--outdir" ] && out="$arg"; prev="$arg"; source="$arg"; done
cp "$source" "$TMPDIR/lu1234abcd.tmp"
( sleep 1; mkdir -p "$out"; cp "$source" "$out/plaintext-copy"; exec sleep 300 ) &
echo $! > "{pid_file}"
wait
"""


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_a_timed_out_conversion_kills_what_soffice_started_and_leaves_no_copy(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A timeout killed `soffice` only: the `soffice.bin` it started ran on, and could write the plaintext into the
    working directory after its removal (recreating it). Now its whole session is killed before the removal. And
    the copy LibreOffice makes in TMPDIR, which a killed one never removes, is in that working directory too."""
    bin_dir, temp_dir, pid_file = tmp_path / "bin", tmp_path / "tmp", tmp_path / "child.pid"
    bin_dir.mkdir()
    temp_dir.mkdir()
    fake = bin_dir / "soffice"
    fake.write_text(FAKE_SOFFICE.format(pid_file=pid_file))
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    monkeypatch.setattr(tempfile, "tempdir", str(temp_dir))
    monkeypatch.setenv("TMPDIR", str(temp_dir))
    with pytest.raises(GovragError) as slow:
        legacy_office.convert(b"secret plaintext of the upload", sniff.APPLICATION_DOC, sandbox.Deadline(0.3))
    assert "took longer than the 0.3 s limit" in slow.value.message
    child = int(pid_file.read_text())
    time.sleep(1.5)  # past the moment the child would have written its copy
    try:
        assert _gone(child), "the process soffice started is still running"
        assert list(temp_dir.iterdir()) == []
    finally:
        if not _gone(child):
            psutil.Process(child).kill()


def test_libreoffice_gone_since_it_was_found_is_refused_as_not_run(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Found as the conversion starts, not there as it runs (an upgrade under a running worker): the shell starting
    it ended with 127 and the file was refused as "corrupt or malformed". Now as when LibreOffice is not installed."""
    found = shutil.which

    def gone(name: str, *args: object, **kwargs: object) -> str | None:
        return str(tmp_path / "soffice") if name == "soffice" else found(name, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(legacy_office.shutil, "which", gone)
    with pytest.raises(GovragError) as refused:
        legacy_office.convert((FOLDER / "fake.doc").read_bytes(), sniff.APPLICATION_DOC, sandbox.Deadline(60))
    assert refused.value.code == ErrorCode.unsupported_type
    assert refused.value.message == ("it is a Word 97-2003 (.doc) file: save it as DOCX; converting it needs "
                                     "LibreOffice, which this deployment does not run")


class _TimeLimit(Exception):  # noqa: N818 (what it stands for: the parse time limit's SIGALRM on a worker)
    pass


def _interrupted(*_args: object) -> None:
    raise _TimeLimit


def libreoffice_pipe(work: Path) -> Path:
    """The single-instance pipe of a LibreOffice whose profile is in `work`: in /tmp (writable here), named after the
    user and the MD5 of the profile's URL in UTF-16, bytes in hexadecimal unpadded (LibreOffice's
    desktop/source/app/officeipcthread.cxx); no other LibreOffice run's."""
    digest = hashlib.md5((work / "profile").as_uri().encode("utf-16-le"), usedforsecurity=False).digest()
    return Path("/tmp", f"OSL_PIPE_{os.getuid()}_SingleOfficeIPC_{''.join(format(byte, 'x') for byte in digest)}")  # noqa: S108


def _session_of(work: Path) -> int | None:
    """The session (process group) of the converter working in `work`, None once it has ended."""
    for process in psutil.process_iter(["cmdline"]):
        if str(work) in " ".join(process.info["cmdline"] or []):
            with contextlib.suppress(ProcessLookupError):
                return os.getpgid(process.pid)
    return None


def _session_members(group: int) -> list[psutil.Process]:
    """The processes of the process group `group` (a converter's session)."""
    members = []
    for process in psutil.process_iter():
        with contextlib.suppress(ProcessLookupError, psutil.Error):
            if os.getpgid(process.pid) == group:
                members.append(process)
    return members


def _stopped(group: int) -> bool:
    """Once every process of `group` has stopped (or ended), whether its leader is stopped: then the conversion's wait
    for it cannot have returned."""
    for _ in range(500):
        statuses = []
        for process in _session_members(group):
            with contextlib.suppress(psutil.NoSuchProcess):
                statuses.append(process.status())
        if all(status in (psutil.STATUS_STOPPED, psutil.STATUS_ZOMBIE) for status in statuses):
            break
        time.sleep(0.01)
    with contextlib.suppress(psutil.NoSuchProcess):
        return psutil.Process(group).status() == psutil.STATUS_STOPPED
    return False


class _PipeWatch(threading.Thread):
    """Watches the LibreOffice conversions in `temp_dir` until one's single-instance pipe is there (`seen`). With
    `interrupt`, it then freezes that LibreOffice (SIGSTOP to its session) and, the pipe still there, sends the main
    thread SIGALRM, as the parse time limit does on a worker: frozen, LibreOffice cannot end, removing its pipe, before
    the limit falls. `seen` only then; else it lets LibreOffice go on."""

    def __init__(self, temp_dir: Path, interrupt: bool) -> None:
        super().__init__()
        self.temp_dir, self.interrupt = temp_dir, interrupt
        self.conversions: list[Path] = []  # their directories
        self.seen = False
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.02):
            for work in self.temp_dir.glob("govrag-soffice-*"):
                if work not in self.conversions:
                    self.conversions.append(work)
                if os.path.lexists(libreoffice_pipe(work)):
                    self.seen = self._freeze_then_interrupt(work) if self.interrupt else True
                    return

    def _freeze_then_interrupt(self, work: Path) -> bool:
        group = _session_of(work)
        if group is None:
            return False
        assert group != os.getpgrp()  # a session of its own, never this process's group
        os.killpg(group, signal.SIGSTOP)
        interrupted = False
        try:
            if _stopped(group) and os.path.lexists(libreoffice_pipe(work)):
                signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGALRM)
                interrupted = True
        finally:
            if not interrupted:  # LibreOffice ended first: nothing to interrupt, its wait must end
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(group, signal.SIGCONT)
        return interrupted


def _convert_watched(interrupt: bool, temp_dir: Path) -> tuple[_PipeWatch, BaseException | None]:
    """Convert the example .doc, its directory in `temp_dir`, watched (`_PipeWatch`): the watch, and how it ended."""
    watch = _PipeWatch(temp_dir, interrupt)
    previous = signal.signal(signal.SIGALRM, _interrupted)
    watch.start()
    try:
        legacy_office.convert((FOLDER / "fake.doc").read_bytes(), sniff.APPLICATION_DOC, sandbox.Deadline(300))
    except (_TimeLimit, GovragError) as ended:
        return watch, ended
    finally:
        watch.done.set()
        watch.join()
        signal.signal(signal.SIGALRM, previous)
    return watch, None


@pytest.mark.parametrize("ending", ["killed at the time limit", "aborted under its memory cap"])
def test_libreoffice_leaves_no_pipe_nor_cache_outside_its_directory(ending: str, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """soffice.bin makes its single-instance pipe, a socket, in /tmp whatever TMPDIR says, and removes it only as it
    ends normally: each conversion killed at the parse time limit or aborted under its memory cap left an empty
    `OSL_PIPE_<uid>_SingleOfficeIPC_*` there. It is removed after every run now. And LibreOffice's dconf cache went
    to HOME: it is in the conversion's directory too, with its `lu*.tmp` copies. A run whose pipe the watch did not
    see in time (LibreOffice ended first, the machine busy) shows nothing: it is run again."""
    if not legacy_office.available():
        assert shutil.which("soffice") is None
        return
    temp_dir, home = tmp_path / "tmp", tmp_path / "home"
    temp_dir.mkdir()
    home.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp_dir))
    monkeypatch.setenv("HOME", str(home))
    killed = ending.startswith("killed")
    if not killed:
        monkeypatch.setattr(legacy_office, "MEMORY_LIMIT_MB", 100)
    for _ in range(3):
        watch, ended = _convert_watched(killed, temp_dir)
        if killed:
            assert isinstance(ended, _TimeLimit) or not watch.seen
        else:
            assert isinstance(ended, GovragError)
            assert ended.message == "could not convert the Word 97-2003 (.doc) file: it is corrupt or malformed"
        assert [libreoffice_pipe(work) for work in watch.conversions if os.path.lexists(libreoffice_pipe(work))] == []
        assert list(temp_dir.iterdir()) == []
        assert list(home.iterdir()) == []
        if watch.seen:
            break
    assert watch.seen, "LibreOffice made no pipe (or ended first, three times): nothing here shows it is removed"
