"""Decide a document's content type from its bytes, never from its name."""

from __future__ import annotations

import io
import re
import zipfile
from pathlib import PurePath

from core.errors import ErrorCode, GovragError

TEXT_PLAIN = "text/plain"
TEXT_MARKDOWN = "text/markdown"
TEXT_HTML = "text/html"
APPLICATION_PDF = "application/pdf"
APPLICATION_DOCX = "application/vnd.openxmlformats-officedocument.wordprocessingml.document"

SUPPORTED_TYPES = frozenset({TEXT_PLAIN, TEXT_MARKDOWN, TEXT_HTML, APPLICATION_PDF, APPLICATION_DOCX})

_UNSUPPORTED = "unsupported file type: the content is not text, markdown, HTML, PDF or DOCX"
_MARKDOWN_SUFFIXES = frozenset({".md", ".markdown"})
_ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")
_DOCX_PART = "word/document.xml"
_SNIFF_WINDOW = 4096
# Share of control characters (other than tab, newline, CR, form feed) a text file may hold.
_MAX_CONTROL_RATIO = 0.01

# Magic numbers worth naming in the rejection, so the uploader knows what went wrong.
_KNOWN_BINARIES: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"GIF87a", "a GIF image"),
    (b"GIF89a", "a GIF image"),
    (b"\x7fELF", "an executable"),
    (b"MZ", "an executable"),
    (b"PK", "an archive"),
    (b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1", "a legacy Office file (.doc/.xls/.ppt or .msg)"),
    (b"\x1f\x8b", "a gzip archive"),
)

# Markers that only open an HTML document.
_STRONG_HTML = re.compile(r"<(?:!doctype\s+html|html)[\s>]", re.IGNORECASE)
# Tags that usually open an HTML fragment (but may also open a markdown file).
_WEAK_HTML = re.compile(
    r"<(?:head|body|meta|title|link|style|script|div|p|table|h[1-6]|ul|ol|section|article"
    r"|header|nav|main|span|form|iframe)[\s/>]",
    re.IGNORECASE,
)
_RTF_MAGIC = b"{\\rtf"
_HEADER_LINE = re.compile(r"[!-9;-~]+:(?:[ \t]|$)")
_MIME_HEADERS = ("mime-version:", "content-type:", "content-transfer-encoding:")
_PREAMBLE = re.compile(r"\s*(?:<\?xml[^>]*\?>\s*|<!--.*?-->\s*)*", re.DOTALL)


def sniff_content_type(data: bytes, filename: str | None) -> str:
    """Return the supported content type of the bytes, or raise a GovragError saying why not."""
    if not data:
        raise GovragError(ErrorCode.invalid_request, "the file is empty")
    if data.startswith(b"%PDF-"):
        return APPLICATION_PDF
    if data.startswith(_ZIP_MAGICS):
        return _sniff_zip(data)
    if data.startswith(_RTF_MAGIC):
        raise GovragError(ErrorCode.unsupported_type, f"{_UNSUPPORTED} (it is an RTF document)")
    text = _decode_text(data)
    if text is None:
        return _sniff_undecodable(data)
    if _looks_like_mime_message(text):
        raise GovragError(ErrorCode.unsupported_type, f"{_UNSUPPORTED} (it is an e-mail message)")
    if _looks_like_html(text, filename):
        return TEXT_HTML
    return TEXT_MARKDOWN if _has_markdown_name(filename) else TEXT_PLAIN


def text_encoding(data: bytes) -> str:
    """Return the codec that decodes sniffed text bytes (BOM-aware, UTF-8 by default)."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        return "utf-16"
    if data.startswith(b"\xef\xbb\xbf"):
        return "utf-8-sig"
    return "utf-8"


def _sniff_zip(data: bytes) -> str:
    """Accept a ZIP only when its central directory lists a Word main document part."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError, ValueError):
        raise GovragError(ErrorCode.unsupported_type, f"{_UNSUPPORTED} (a damaged ZIP archive)") from None
    if _DOCX_PART in names:
        return APPLICATION_DOCX
    raise GovragError(ErrorCode.unsupported_type, f"{_UNSUPPORTED} (a ZIP archive that is not a Word document)")


def _binary_reason(data: bytes) -> str:
    """Name a well-known binary signature for the rejection message, if there is one."""
    for magic, description in _KNOWN_BINARIES:
        if data.startswith(magic):
            return f"it looks like {description}"
    return "it is binary or not UTF-8/UTF-16 text"


def _decode_text(data: bytes) -> str | None:
    """Decode UTF-8 (BOM optional) or BOM-marked UTF-16; None unless it is clean text."""
    if data.startswith((b"\xff\xfe\x00\x00", b"\x00\x00\xfe\xff")):
        return None  # UTF-32 is not accepted
    try:
        text = data.decode(text_encoding(data))
    except UnicodeDecodeError:
        return None
    return text if _is_clean_text(text) else None


def _is_clean_text(text: str) -> bool:
    """Tell whether decoded text has no NUL and only a trace of control characters."""
    if "\x00" in text:
        return False
    controls = sum(1 for ch in text if (ord(ch) < 32 and ch not in "\t\n\r\f") or ch == "\x7f")
    return controls <= len(text) * _MAX_CONTROL_RATIO


def _sniff_undecodable(data: bytes) -> str:
    """Accept non-UTF-8 bytes only as an HTML page that declares itself (legacy charsets)."""
    head = data[:_SNIFF_WINDOW]
    if b"\x00" not in head:
        ascii_head = head.decode("latin-1")
        if _STRONG_HTML.match(ascii_head, _markup_start(ascii_head)):
            return TEXT_HTML
    raise GovragError(ErrorCode.unsupported_type, f"{_UNSUPPORTED} ({_binary_reason(data)})")


def _looks_like_mime_message(text: str) -> bool:
    """Tell whether text is a raw MIME e-mail (.eml): a header block that declares MIME."""
    head = text[:_SNIFF_WINDOW].lstrip("\ufeff").replace("\r\n", "\n")
    header_block = head.split("\n\n", 1)[0].splitlines()
    lines = [line for line in header_block if line.strip()]
    if len(lines) < 2 or not all(_HEADER_LINE.match(line) or line[:1] in " \t" for line in lines):
        return False
    return any(line.lower().startswith(_MIME_HEADERS) for line in lines)


def _looks_like_html(text: str, filename: str | None) -> bool:
    """Tell whether text opens like an HTML document (after BOM, whitespace, comments)."""
    head = text[:_SNIFF_WINDOW].lstrip("\ufeff")
    position = _markup_start(head)
    if _STRONG_HTML.match(head, position):
        return True
    # Markdown may open with raw HTML (<p align="center">…); both go through the HTML parser.
    return bool(_WEAK_HTML.match(head, position)) and not _has_markdown_name(filename)


def _markup_start(head: str) -> int:
    """Return where the first tag may start, past whitespace, an XML declaration and comments."""
    preamble = _PREAMBLE.match(head)
    return preamble.end() if preamble else 0


def _has_markdown_name(filename: str | None) -> bool:
    """Tell whether the client-supplied name carries a markdown suffix."""
    return filename is not None and PurePath(filename).suffix.lower() in _MARKDOWN_SUFFIXES
