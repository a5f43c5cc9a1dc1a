"""Word 97-2003 (.doc) and PowerPoint 97-2003 (.ppt): converted to DOCX/PPTX by LibreOffice (Debian's `soffice`,
headless, offline, a private profile per conversion, its memory capped, killed with every process it started at the
parse time limit or when the process that started it dies: `ingestion.sandbox`), then parsed like any DOCX/PPTX.
Where LibreOffice is not installed (or no longer there as a conversion starts) they are refused with that reason."""

from __future__ import annotations

import hashlib
import logging
import os
import resource
import shutil
from dataclasses import dataclass
from pathlib import Path

from core.errors import ErrorCode, GovragError
from ingestion import sandbox, sniff

logger = logging.getLogger(__name__)

# RLIMIT_DATA (ulimit -d) of soffice and the soffice.bin it starts: a 4 MB .doc of 40,000 paragraphs peaked at 250 MB,
# the example .doc and .ppt convert from 180 MB. Not RLIMIT_AS, which counts the address space LibreOffice reserves.
MEMORY_LIMIT_MB = 1024
NOT_RUN = "LibreOffice, which this deployment does not run"
PREFIX = "govrag-soffice-"  # of a conversion's directory
# Where soffice.bin makes its pipes, whatever TMPDIR says: /tmp, or /var/tmp where /tmp is not writable
# (LibreOffice's sal/osl/unx/pipe.cxx)
PIPE_FOLDERS = ("/tmp", "/var/tmp")  # noqa: S108


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


def convert(data: bytes, content_type: str, deadline: sandbox.Deadline) -> tuple[bytes, str]:
    """The DOCX/PPTX bytes of a legacy file and their content type, or a GovragError with the reason."""
    legacy = FORMATS[content_type]
    soffice = shutil.which("soffice")
    if soffice is None:
        raise _refused(legacy, NOT_RUN)
    if not _cap_allowed():  # `ulimit -d` would fail, and the file with it as corrupt
        logger.warning("LibreOffice's memory cap of %d MB is above this process's hard data-size limit (RLIMIT_DATA): "
                       "legacy Office files are refused", MEMORY_LIMIT_MB)
        raise _refused(legacy, f"LibreOffice under a {MEMORY_LIMIT_MB} MB memory cap, which this deployment's "
                               "data-size limit does not allow")
    conversion = sandbox.Conversion(what=legacy.name, prefix=PREFIX, source=f"upload.{legacy.extension}",
                                    output=f"out/upload.{legacy.converted_extension}", program=soffice,
                                    sockets=ipc_pipes)

    def command(work: Path) -> list[str]:  # capped, and no core dump (the document's plaintext) should it abort
        return ["/bin/sh", "-c", f'ulimit -c 0 && ulimit -d {MEMORY_LIMIT_MB * 1024} && exec "$@"', "soffice", soffice,
                "--headless", "--norestore", "--nolockcheck", "--nodefault",
                f"-env:UserInstallation={_profile_url(work)}", "--convert-to", legacy.converted_extension,
                "--outdir", str(work / "out"), str(work / conversion.source)]

    try:
        status, converted = sandbox.convert(conversion, data, command, deadline)  # 0 for most failures too
    except sandbox.ProgramMissing:  # removed since (an upgrade): not the file's fault
        raise _refused(legacy, NOT_RUN) from None
    if status != 0:  # an abort, as when it ran out of memory under the cap
        logger.warning("LibreOffice ended with status %d converting a %s file (memory cap %d MB)", status,
                       legacy.name, MEMORY_LIMIT_MB)
    if converted is None:
        raise GovragError(ErrorCode.invalid_request,
                          f"could not convert the {legacy.name} file: it is corrupt or malformed")
    return converted, legacy.converted_type


def _profile_url(work: Path) -> str:
    """The URL of the LibreOffice profile of the conversion in `work`, its own."""
    return (work / "profile").as_uri()


def ipc_pipes(work: Path) -> list[Path]:
    """Where soffice.bin makes the single-instance pipe of the conversion in `work`: a socket left behind when it is
    killed at the parse time limit or aborts under its memory cap. Named, by desktop/source/app/officeipcthread.cxx,
    after this user's id and the MD5 of its profile's URL (UTF-16), each byte in hexadecimal without padding; no
    other LibreOffice uses that profile, in a directory of this process's own (mode 0700), nor its pipe. A worker
    process killed mid-conversion leaves it too: the next removes it with that process's directory (`scratch`)."""
    digest = hashlib.md5(_profile_url(work).encode("utf-16-le"), usedforsecurity=False).digest()
    name = f"OSL_PIPE_{os.getuid()}_SingleOfficeIPC_{''.join(f'{byte:x}' for byte in digest)}"
    return [Path(folder, name) for folder in PIPE_FOLDERS]


def _refused(legacy: LegacyFormat, needs: str) -> GovragError:
    """A legacy file this deployment cannot convert, saying what converting it `needs`."""
    return GovragError(ErrorCode.unsupported_type, f"it is a {legacy.name} file: save it as "
                                                   f"{legacy.converted_extension.upper()}; converting it needs {needs}")


def _cap_allowed() -> bool:
    """Whether LibreOffice can be given its memory cap: not above this process's hard RLIMIT_DATA (a service's
    LimitDATA), which it inherits and, unprivileged, cannot raise."""
    hard = resource.getrlimit(resource.RLIMIT_DATA)[1]
    return hard == resource.RLIM_INFINITY or hard >= MEMORY_LIMIT_MB * 1024 * 1024
