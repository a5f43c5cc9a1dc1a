"""Word 97-2003 (.doc) and PowerPoint 97-2003 (.ppt): converted to DOCX/PPTX by LibreOffice (Debian's `soffice`,
headless, offline, a private profile per conversion, killed at the parse time limit), then parsed like any
DOCX/PPTX. Where LibreOffice is not installed they are refused with that reason."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
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
        try:
            subprocess.run(command, capture_output=True, timeout=timeout_seconds or None, check=False)  # noqa: S603
        except subprocess.TimeoutExpired:  # subprocess.run has killed LibreOffice
            raise GovragError(ErrorCode.invalid_request, f"converting the {legacy.name} file took longer than "
                                                         f"the {timeout_seconds:g} s limit") from None
        converted = output / f"upload.{legacy.converted_extension}"
        if not converted.is_file():
            raise GovragError(ErrorCode.invalid_request,
                              f"could not convert the {legacy.name} file: it is corrupt or malformed")
        return converted.read_bytes(), legacy.converted_type
