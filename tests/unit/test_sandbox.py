"""The programs a parse runs (ingestion.sandbox): they die with the worker process that started it, and a parse
abandoned at its time limit starts none after it."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import psutil
import pytest

from core.errors import GovragError
from ingestion import legacy_office, sandbox, sniff
from ingestion.parse import run_with_timeout
from tests.support.conversion_inputs import FOLDER, drawing_only_pdf, long_odt
from tests.support.polling import wait_until

ROOT = Path(__file__).resolve().parents[2]
# Like soffice: a launcher whose own child (soffice.bin, here `sleep`) does the work and outlives a kill of it.
FAKE_SOFFICE = "#!/bin/sh\n( exec sleep 300 ) &\nwait\n"
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
    return below if any(process.name() == name for process in below) else []


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


@pytest.mark.parametrize("kind", ["pandoc", "soffice", "tesseract"])
def test_a_conversion_dies_with_the_worker_process_that_started_it(kind: str, tmp_path: Path) -> None:
    """The Celery hard time limit SIGKILLs the worker child mid-parse: pandoc, `soffice.bin` (soffice's own child)
    or tesseract, adopted by init, went on with the document for minutes."""
    data, content_type, worker_name = _scenario(kind, tmp_path)
    for fake in tmp_path.iterdir():
        fake.chmod(0o755)
    document = tmp_path / "upload"
    document.write_bytes(data)
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}", "PYTHONPATH": str(ROOT)}
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
    finally:
        worker.kill()
        worker.wait()
        for process in left:
            if not _gone(process):
                process.kill()


FAKE_CONVERTER = "#!/bin/sh\ntouch {started}\n"


def test_a_parse_abandoned_at_its_limit_starts_no_converter_after_it(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """On a thread (the in-process worker) a parse past its limit is abandoned, not stopped: it went on to start the
    next program. Here it reaches the converter only after the limit."""
    started = tmp_path / "started"
    (tmp_path / "soffice").write_text(FAKE_CONVERTER.format(started=started))
    (tmp_path / "soffice").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    limit_passed, outcome = threading.Event(), []

    def parse() -> None:
        limit_passed.wait()
        outcome.append(legacy_office.convert(b"plaintext of the upload", sniff.APPLICATION_DOC, 60))

    def worker() -> None:
        with pytest.raises(GovragError) as slow:
            run_with_timeout(parse, 0.2)
        outcome.append(slow.value.message)

    before = set(threading.enumerate())
    caller = threading.Thread(target=worker)
    caller.start()
    caller.join()
    abandoned = [thread for thread in set(threading.enumerate()) - before if thread.name == "govrag-parse"]
    limit_passed.set()
    for thread in abandoned:
        thread.join(60)
    assert outcome == ["parsing took longer than the 0.2 s limit"]
    assert abandoned and not any(thread.is_alive() for thread in abandoned)
    assert not started.exists(), "the abandoned parse started the converter after its limit"


def test_a_cancelled_parse_is_refused_the_program_it_would_start(tmp_path: Path) -> None:
    cancellation = sandbox.Cancellation()
    cancellation.cancel()
    with sandbox.cancelled_by(cancellation), pytest.raises(sandbox.Abandoned):
        sandbox.ChildPopen(["touch", str(tmp_path / "started")])  # noqa: S607
    assert not (tmp_path / "started").exists()
