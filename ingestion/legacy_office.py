"""Word 97-2003 (.doc) and PowerPoint 97-2003 (.ppt): converted to DOCX/PPTX by LibreOffice (Debian's `soffice`,
headless, offline, a private profile per conversion, killed at the parse time limit with every process it started),
then parsed like any DOCX/PPTX. Where LibreOffice is not installed they are refused with that reason."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from core.errors import ErrorCode, GovragError
from ingestion import sniff


@dataclass(frozen=True)
class LegacyFormat:
    name: str
    extension: str
    converted_extension: str
    converted_type: str


FORMATS = {
    sniff.APPLICATION_DOC: LegacyFormat("Word 97-2003 (.doc)", "doc", "docx", sniff.APPLICATION_DOCX),
    sniff.APPLICATION_PPT: LegacyFormat("PowerPoint 97-2003 (.ppt)", "ppt", "pptx", sniff.APPLICATION_PPTX),
}


def available() -> bool:
    """Whether LibreOffice's `soffice` is installed."""
    return shutil.which("soffice") is not None


def convert(data: bytes, content_type: str, timeout_seconds: float) -> tuple[bytes, str]:
    """The DOCX/PPTX bytes of a legacy file and their content type, or a GovragError with the reason."""
    legacy = FORMATS[content_type]
    soffice = shutil.which("soffice")
    if soffice is None:
        raise GovragError(ErrorCode.unsupported_type,
                          f"it is a {legacy.name} file: save it as {legacy.converted_extension.upper()}; converting "
                          "it needs LibreOffice, which this deployment does not run")
    with tempfile.TemporaryDirectory(prefix="govrag-soffice-") as work:
        source, output = Path(work) / f"upload.{legacy.extension}", Path(work) / "out"
        source.write_bytes(data)
        command = [soffice, "--headless", "--norestore", "--nolockcheck", "--nodefault",
                   f"-env:UserInstallation={(Path(work) / 'profile').as_uri()}",
                   "--convert-to", legacy.converted_extension, "--outdir", str(output), str(source)]
        if run_to_the_end(command, timeout_seconds) is None:
            raise GovragError(ErrorCode.invalid_request, f"converting the {legacy.name} file took longer than "
                                                         f"the {timeout_seconds:g} s limit")
        converted = output / f"upload.{legacy.converted_extension}"
        if not converted.is_file():
            raise GovragError(ErrorCode.invalid_request,
                              f"could not convert the {legacy.name} file: it is corrupt or malformed")
        return converted.read_bytes(), legacy.converted_type


GROUP_EXIT_WAIT_SECONDS = 2.0  # after the kill, how long to wait for a converter's (or the OCR tools') processes to go


def run_to_the_end(command: list[str], timeout_seconds: float) -> int | None:
    """Run a converter (LibreOffice, pandoc) in a session of its own; its exit status, or None when it ran past the
    limit. Whatever happens (its end, the limit, the parse's own time limit interrupting the wait), every process of
    the session is killed before the working directory (which holds the plaintext copy) is removed: `soffice` starts
    `soffice.bin`, which a kill of `soffice` alone would leave running, writing into it."""
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,  # noqa: S603
                               stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        return process.wait(timeout=timeout_seconds or None)
    except subprocess.TimeoutExpired:
        return None
    finally:
        _kill_session(process)


def _kill_session(process: subprocess.Popen[bytes]) -> None:
    """Kill every process of the session `process` leads, reap it, and wait (briefly) for the others to be gone."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:  # all of them had ended
        return
    process.wait()
    deadline = time.monotonic() + GROUP_EXIT_WAIT_SECONDS
    while time.monotonic() < deadline and _group_alive(process.pid):
        time.sleep(0.02)


def _group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    return True
