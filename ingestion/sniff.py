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
# issue 3: more formats
MESSAGE_RFC822 = "message/rfc822"
APPLICATION_MSG = "application/vnd.ms-outlook"
APPLICATION_DOC = "application/msword"  # Word 97-2003, converted by LibreOffice (ingestion.legacy_office)
APPLICATION_PPT = "application/vnd.ms-powerpoint"  # PowerPoint 97-2003, likewise
APPLICATION_PPTX = "application/vnd.openxmlformats-officedocument.presentationml.presentation"
APPLICATION_XLSX = "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"
APPLICATION_XLS = "application/vnd.ms-excel"
APPLICATION_ODT = "application/vnd.oasis.opendocument.text"
APPLICATION_EPUB = "application/epub+zip"
APPLICATION_RTF = "application/rtf"
APPLICATION_XML = "application/xml"
TEXT_CSV = "text/csv"
TEXT_TSV = "text/tab-separated-values"

ZIP_BASED_TYPES = frozenset({APPLICATION_DOCX, APPLICATION_PPTX, APPLICATION_XLSX, APPLICATION_ODT, APPLICATION_EPUB})
SUPPORTED_TYPES = frozenset({
    TEXT_PLAIN, TEXT_MARKDOWN, TEXT_HTML, APPLICATION_PDF, APPLICATION_DOCX, MESSAGE_RFC822, APPLICATION_MSG,
    APPLICATION_PPTX, APPLICATION_XLSX, APPLICATION_XLS, APPLICATION_ODT, APPLICATION_EPUB, APPLICATION_RTF,
    APPLICATION_XML, TEXT_CSV, TEXT_TSV, APPLICATION_DOC, APPLICATION_PPT,
})

_UNSUPPORTED = ("unsupported file type: the content is not text, markdown, HTML, XML, CSV/TSV, PDF, e-mail "
                "(EML/MSG), Word (DOCX/ODT/RTF), PowerPoint (PPTX), Excel (XLSX/XLS) or EPUB")
# Main parts that identify a ZIP-based office file.
_ZIP_PARTS = (("word/document.xml", APPLICATION_DOCX), ("xl/workbook.xml", APPLICATION_XLSX),
              ("ppt/presentation.xml", APPLICATION_PPTX))
_ZIP_MIMETYPES = {b"application/vnd.oasis.opendocument.text": APPLICATION_ODT,
                  b"application/epub+zip": APPLICATION_EPUB}
_MIMETYPE_READ_BYTES = 100  # more than the longest known value, far less than a bomb's member
_OLE_MAGIC = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"
_DELIMITED_SUFFIXES = {".csv": TEXT_CSV, ".tsv": TEXT_TSV, ".tab": TEXT_TSV}
_XML_START = re.compile(r"<(?:\?xml[\s?]|[A-Za-z_][\w.:-]*[\s/>])")
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
    if data.startswith(_OLE_MAGIC):
        return _sniff_ole(data)
    if data.startswith(_RTF_MAGIC):
        return APPLICATION_RTF
    text = _decode_text(data)
    if text is None:
        return _sniff_undecodable(data)
    if _looks_like_mime_message(text):
        return MESSAGE_RFC822
    if _looks_like_html(text, filename):
        return TEXT_HTML
    if _looks_like_xml(text):
        return APPLICATION_XML
    delimited = _delimited_type(text, filename)
    if delimited is not None:
        return delimited
    return TEXT_MARKDOWN if _has_markdown_name(filename) else TEXT_PLAIN


def text_encoding(data: bytes) -> str:
    """Return the codec that decodes sniffed text bytes (BOM-aware, UTF-8 by default)."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        return "utf-16"
    if data.startswith(b"\xef\xbb\xbf"):
        return "utf-8-sig"
    return "utf-8"


def _sniff_zip(data: bytes) -> str:
    """Accept a ZIP only when its members identify a Word, Excel, PowerPoint, OpenDocument or EPUB file."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            names = set(archive.namelist())
            mimetype = _mimetype_head(archive) if "mimetype" in names else b""
    except Exception:  # zipfile and zlib raise many kinds (BadZipFile, zlib.error, EOFError, ...) on damaged bytes
        raise GovragError(ErrorCode.unsupported_type, f"{_UNSUPPORTED} (a damaged ZIP archive)") from None
    for part, content_type in _ZIP_PARTS:
        if part in names:
            return content_type
    if mimetype in _ZIP_MIMETYPES:
        return _ZIP_MIMETYPES[mimetype]
    raise GovragError(ErrorCode.unsupported_type,
                      f"{_UNSUPPORTED} (a ZIP archive that is not a Word document or another office file)")


def _mimetype_head(archive: zipfile.ZipFile) -> bytes:
    """The first bytes of the `mimetype` member: the bomb check comes after sniffing, so never inflate it whole."""
    with archive.open("mimetype") as member:
        return member.read(_MIMETYPE_READ_BYTES).strip()


def _sniff_ole(data: bytes) -> str:
    """Tell Outlook messages, Excel 97 workbooks, and Word/PowerPoint 97-2003 files apart."""
    import olefile

    try:
        with olefile.OleFileIO(io.BytesIO(data)) as ole:
            streams = {"/".join(entry) for entry in ole.listdir()}
    except Exception:  # olefile raises OSError, ValueError, IndexError, ... on damaged bytes
        raise GovragError(ErrorCode.unsupported_type, f"{_UNSUPPORTED} (a damaged legacy Office file)") from None
    if any(name.startswith("__substg1.0_") for name in streams):
        return APPLICATION_MSG
    if {"Workbook", "Book"} & streams:
        return APPLICATION_XLS
    if "WordDocument" in streams:
        return APPLICATION_DOC
    if "PowerPoint Document" in streams:
        return APPLICATION_PPT
    raise GovragError(ErrorCode.unsupported_type, f"{_UNSUPPORTED} (a legacy Office file of no known kind)")


def _looks_like_xml(text: str) -> bool:
    """Tell whether text opens with an XML declaration or a root element (HTML was ruled out before)."""
    head = text[:_SNIFF_WINDOW].lstrip("\ufeff").lstrip()
    return bool(_XML_START.match(head)) and head.rstrip().endswith(">") or head.startswith("<?xml")


def _delimited_type(text: str, filename: str | None) -> str | None:
    """CSV or TSV when the name says so and the first lines agree on a column count above one."""
    suffix = PurePath(filename).suffix.lower() if filename else ""
    content_type = _DELIMITED_SUFFIXES.get(suffix)
    if content_type is None:
        return None
    delimiter = "\t" if content_type == TEXT_TSV else ","
    lines = [line for line in text[:_SNIFF_WINDOW].splitlines()[:10] if line.strip()]
    counts = {line.count(delimiter) for line in lines[:-1] or lines}
    return content_type if lines and min(counts) >= 1 else None


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
