"""Content types are decided from the bytes; names only pick markdown over plain text."""

from __future__ import annotations

import io
import os
import random
import struct
import tracemalloc
import zipfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import docx
import pikepdf
import pytest

from core.errors import ErrorCode, GovragError
from ingestion.sniff import (
    APPLICATION_DOCX,
    APPLICATION_PDF,
    TEXT_HTML,
    TEXT_MARKDOWN,
    TEXT_PLAIN,
    sniff_content_type,
)
from tests.conftest import damaged_doc

PNG_BYTES = (
    b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01\x00\x00\x00\x01\x08\x06\x00\x00\x00"
    b"\x1f\x15\xc4\x89\x00\x00\x00\rIDATx\x9cc\xf8\x0f\x00\x00\x01\x01\x00\x05\x18\xd8N\x00"
    b"\x00\x00\x00IEND\xaeB`\x82"
)


def _pdf_bytes() -> bytes:
    """Return a one-page PDF made with pikepdf."""
    pdf = pikepdf.new()
    pdf.add_blank_page()
    buffer = io.BytesIO()
    pdf.save(buffer)
    return buffer.getvalue()


def _docx_bytes() -> bytes:
    """Return a small Word document made with python-docx."""
    document = docx.Document()
    document.add_paragraph("Hello from a Word document.")
    buffer = io.BytesIO()
    document.save(buffer)
    return buffer.getvalue()


def _zip_bytes(members: dict[str, bytes]) -> bytes:
    """Return a ZIP archive holding the given members."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, content in members.items():
            archive.writestr(name, content)
    return buffer.getvalue()


def _reason(data: bytes, filename: str | None = None) -> GovragError:
    """Return the error sniffing raises for these bytes."""
    with pytest.raises(GovragError) as caught:
        sniff_content_type(data, filename)
    return caught.value


@pytest.mark.parametrize(
    ("data", "filename", "expected"),
    [
        (b"Plain words in a file.\n", "notes.txt", TEXT_PLAIN),
        (b"Plain words in a file.\n", None, TEXT_PLAIN),
        (b"# Heading\n\nSome *markdown*.\n", "README.md", TEXT_MARKDOWN),
        (b"# Heading\n\nSome *markdown*.\n", "guide.MARKDOWN", TEXT_MARKDOWN),
        (b"# Heading\n\nSome *markdown*.\n", "guide.txt", TEXT_PLAIN),
        ("caf\u00e9 na\u00efve".encode(), "a.txt", TEXT_PLAIN),
        ("\ufeffBOM-marked UTF-8 text".encode(), "a.txt", TEXT_PLAIN),
        ("UTF-16 text with a BOM".encode("utf-16"), "a.txt", TEXT_PLAIN),
        (b"\xfe\xff" + "UTF-16 big endian".encode("utf-16-be"), None, TEXT_PLAIN),
        (b"<!DOCTYPE html><html><body><p>x</p></body></html>", "page.html", TEXT_HTML),
        (b"\n\n  <html lang='en'><p>x</p></html>", None, TEXT_HTML),
        (b"\xef\xbb\xbf<!-- generated --><!doctype html><p>x</p>", None, TEXT_HTML),
        (b"<?xml version='1.0'?>\n<html xmlns='http://www.w3.org/1999/xhtml'></html>", None, TEXT_HTML),
        (b"<div><p>A fragment</p></div>", "fragment.htm", TEXT_HTML),
        (b"<p align='center'>logo</p>\n\n# Project\n", "README.md", TEXT_MARKDOWN),
        ("<html><body>caf\u00e9</body></html>".encode("latin-1"), None, TEXT_HTML),
    ],
)
def test_text_types_are_recognised(data: bytes, filename: str | None, expected: str) -> None:
    assert sniff_content_type(data, filename) == expected


def test_pdf_is_recognised_by_its_header_whatever_the_name() -> None:
    assert sniff_content_type(_pdf_bytes(), "innocent.txt") == APPLICATION_PDF


def test_docx_is_recognised_by_its_main_part_whatever_the_name() -> None:
    assert sniff_content_type(_docx_bytes(), "photo.png") == APPLICATION_DOCX


def test_a_name_cannot_turn_binary_into_text() -> None:
    error = _reason(PNG_BYTES, "notes.md")
    assert error.code is ErrorCode.unsupported_type
    assert "PNG image" in error.message


def test_a_name_cannot_turn_html_into_markdown_when_it_declares_itself() -> None:
    assert sniff_content_type(b"<!doctype html><script>x</script>", "notes.md") == TEXT_HTML


def test_empty_file_is_an_invalid_request() -> None:
    error = _reason(b"", "empty.txt")
    assert error.code is ErrorCode.invalid_request
    assert error.message == "the file is empty"


@pytest.mark.parametrize(
    ("data", "hint"),
    [
        (PNG_BYTES, "PNG image"),
        (b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01", "JPEG image"),
        (b"\x7fELF\x02\x01\x01\x00" + bytes(64), "executable"),
        (b"MZ\x90\x00\x03\x00\x00\x00" + bytes(64), "executable"),
        (b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + bytes(64), "legacy Office"),
        (b"\x1f\x8b\x08\x00" + bytes(32), "gzip"),
    ],
)
def test_known_binaries_are_rejected_with_a_named_reason(data: bytes, hint: str) -> None:
    error = _reason(data, "document.txt")
    assert error.code is ErrorCode.unsupported_type
    assert error.message.startswith("unsupported file type:")
    assert hint in error.message


def test_raw_mime_email_is_an_email_but_a_pasted_email_in_text_is_not() -> None:
    eml = (
        b"From: alice@example.com\r\nTo: bob@example.com\r\nSubject: Hi\r\nMIME-Version: 1.0\r\n"
        b"Content-Type: multipart/mixed; boundary=XYZ\r\n\r\n--XYZ\r\nContent-Type: text/plain\r\n\r\nHello\r\n"
    )
    assert sniff_content_type(eml, "message.eml") == "message/rfc822"
    assert sniff_content_type(b"{\\rtf1\\ansi Hello}", "a.txt") == "application/rtf"
    pasted = b"From: Alice\nSubject: Meeting notes\n\nWe agreed on the budget.\n"
    assert sniff_content_type(pasted, "notes.txt") == TEXT_PLAIN


def test_random_bytes_are_rejected() -> None:
    noise = random.Random(1234).randbytes(4096)
    error = _reason(noise, "data.txt")
    assert error.code is ErrorCode.unsupported_type


def test_zip_that_is_not_docx_is_rejected() -> None:
    archive = _zip_bytes({"word/readme.txt": b"not the main part", "data.csv": b"a,b\n1,2\n"})
    error = _reason(archive, "report.docx")
    assert error.code is ErrorCode.unsupported_type
    assert "ZIP archive that is not a Word document or another office file" in error.message


def test_damaged_zip_is_rejected() -> None:
    error = _reason(b"PK\x03\x04" + bytes(100), "report.docx")
    assert error.code is ErrorCode.unsupported_type


def _deflated_mimetype(value: bytes) -> bytearray:
    """Return a ZIP whose only member, `mimetype`, is deflated (as an .odt or .epub might hold it)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("mimetype", value)
    return bytearray(buffer.getvalue())


def _odt_with_a_corrupt_deflate_stream() -> bytes:
    raw = _deflated_mimetype(b"application/vnd.oasis.opendocument.text" * 40)
    start = 30 + len("mimetype")  # the member's compressed data, after its local header
    raw[start:start + 6] = b"\x04\x00\x05\x00\xff\xff"  # zlib.error while inflating
    return bytes(raw)


def _epub_whose_member_runs_past_the_end() -> bytes:
    raw = _deflated_mimetype(b"application/epub+zip")
    raw[28:30] = struct.pack("<H", 0xFFFF)  # the local header's extra field: the data starts past the end (EOFError)
    return bytes(raw)


@pytest.mark.parametrize(("make", "damage"), [
    (_odt_with_a_corrupt_deflate_stream, "a damaged ZIP archive"),
    (_epub_whose_member_runs_past_the_end, "a damaged ZIP archive"),
    (damaged_doc, "a damaged legacy Office file"),
])
def test_a_damaged_office_container_is_an_unsupported_type(make, damage: str) -> None:  # type: ignore[no-untyped-def]
    error = _reason(make(), "minutes.odt")
    assert error.code is ErrorCode.unsupported_type and error.message.endswith(f"({damage})")


def test_the_sniffer_inflates_only_the_first_bytes_of_a_huge_mimetype_member() -> None:
    """The bomb check runs after sniffing: the sniffer must not inflate a member whole (64 MiB from ~64 KB here)."""
    bomb = bytes(_deflated_mimetype(bytes(64 * 1024 * 1024)))
    assert len(bomb) < 256 * 1024
    tracemalloc.start()
    try:
        error = _reason(bomb, "bomb.epub")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert error.code is ErrorCode.unsupported_type
    assert peak < 4 * 1024 * 1024, f"sniffing held {peak} bytes"


def test_text_with_nul_bytes_is_not_text() -> None:
    error = _reason(b"looks like text\x00\x00but has NULs", "a.txt")
    assert error.code is ErrorCode.unsupported_type


def test_text_with_many_control_characters_is_not_text() -> None:
    error = _reason(b"abc\x01\x02\x03\x04\x05def" * 20, "a.txt")
    assert error.code is ErrorCode.unsupported_type


def test_utf16_without_bom_is_rejected() -> None:
    error = _reason("no byte-order mark".encode("utf-16-le"), "a.txt")
    assert error.code is ErrorCode.unsupported_type


def test_legacy_encoded_plain_text_is_rejected_with_the_encoding_rule() -> None:
    error = _reason("caf\u00e9 cr\u00e8me br\u00fbl\u00e9e".encode("latin-1"), "menu.txt")
    assert error.code is ErrorCode.unsupported_type
    assert "UTF-8" in error.message


def test_rejection_messages_never_echo_the_content() -> None:
    secret = b"\x00TOPSECRET-CANARY-7731\x00"
    error = _reason(secret * 10, "a.txt")
    assert "CANARY" not in error.message
    assert "CANARY" not in str(error)
