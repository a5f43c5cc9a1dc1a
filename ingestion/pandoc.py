"""ODT, RTF and EPUB: converted to DOCX or HTML by the pandoc that pypandoc-binary ships, then parsed like any DOCX or
HTML. Run here, not through unstructured's own pypandoc call, which waits for pandoc with no limit: at the parse time
limit (SIGALRM in a Celery prefork child) pandoc ran on, alone with the document, for minutes and with a heap that
grew with it. Each conversion is sandboxed (no file or network access beyond its input), its heap capped, and killed
with every process of its session at the time limit or when the process that started it dies (`ingestion.sandbox`)."""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

from core.errors import ErrorCode, GovragError
from ingestion import sandbox, sniff

HEAP_LIMIT_MB = 1024  # pandoc's documented guard for untrusted input (+RTS -M); a 5 MB ODT took 600 MB and counting
_HEAP_EXHAUSTED = 251  # the exit status of a Haskell program out of heap (GHC's EXIT_HEAPOVERFLOW)


@dataclass(frozen=True)
class PandocFormat:
    name: str
    reader: str
    writer: str
    converted_type: str


FORMATS = {
    sniff.APPLICATION_ODT: PandocFormat("ODT", "odt", "docx", sniff.APPLICATION_DOCX),
    sniff.APPLICATION_RTF: PandocFormat("RTF", "rtf", "html", sniff.TEXT_HTML),
    sniff.APPLICATION_EPUB: PandocFormat("EPUB", "epub", "html", sniff.TEXT_HTML),
}


def convert(data: bytes, content_type: str, deadline: sandbox.Deadline) -> tuple[bytes, str]:
    """The DOCX/HTML bytes of an ODT, RTF or EPUB file and their content type, or a GovragError with the reason."""
    source_format = FORMATS[content_type]
    try:
        pandoc = _pandoc()
    except OSError:  # pypandoc found none it could run: pypandoc-binary missing, or PYPANDOC_PANDOC wrong
        raise _needs_pandoc(source_format) from None
    conversion = sandbox.Conversion(what=source_format.name, prefix="govrag-pandoc-",
                                    source=f"upload.{source_format.reader}", output=f"out.{source_format.writer}",
                                    program=pandoc)

    def command(work: Path) -> list[str]:
        return [pandoc, "--sandbox", f"--from={source_format.reader}", f"--to={source_format.writer}",
                str(work / conversion.source), f"--output={work / conversion.output}", "+RTS", f"-M{HEAP_LIMIT_MB}m",
                "-RTS"]

    try:
        status, converted = sandbox.convert(conversion, data, command, deadline)
    except sandbox.ProgramMissing:  # gone since it was found (an upgrade): look again for the next file
        _pandoc.cache_clear()
        raise _needs_pandoc(source_format) from None
    if status == _HEAP_EXHAUSTED:
        raise GovragError(ErrorCode.payload_too_large, f"converting the {source_format.name} file needs more than "
                                                       f"{HEAP_LIMIT_MB} MB of memory")
    if status != 0 or converted is None:
        raise GovragError(ErrorCode.invalid_request,
                          f"could not parse the {source_format.name}: the file is corrupt or malformed")
    return converted, source_format.converted_type


def _needs_pandoc(source_format: PandocFormat) -> GovragError:
    """The refusal of a file this deployment has no pandoc to convert."""
    return GovragError(ErrorCode.unsupported_type, f"converting the {source_format.name} file needs pandoc (the "
                                                   "pypandoc-binary package), which this deployment does not have")


@functools.cache
def _pandoc() -> str:
    """pypandoc-binary's own pandoc (the one its version is pinned for, known to take --sandbox and +RTS -M), unless
    PYPANDOC_PANDOC names another; the one pypandoc finds (on PATH) only where that package ships none. pypandoc
    itself prefers a pandoc on PATH of an equal or higher version, which may refuse the heap cap and fail every file
    as corrupt. OSError when there is none it can run."""
    import pypandoc

    bundled = Path(pypandoc.__file__).parent / "files" / "pandoc"
    if not os.environ.get("PYPANDOC_PANDOC") and os.access(bundled, os.X_OK):
        return str(bundled)
    return str(pypandoc.get_pandoc_path())
