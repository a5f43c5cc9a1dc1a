"""Every file of shared/eval/enterprise_docs_ingestion either parses into chunks or fails with its own reason."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.errors import GovragError
from ingestion import legacy_office
from ingestion.chunk import chunk_sections
from ingestion.parse import ocr_available, parse_document
from ingestion.sniff import sniff_content_type

pytestmark = pytest.mark.corpus
FOLDER = Path(__file__).resolve().parents[3] / "shared" / "eval" / "enterprise_docs_ingestion"
# Files that must be refused, with the words the reason must contain.
EXPECTED_FAILURES = {
    "password.pdf": "password-protected",
    "fake-encrypted.eml": "encrypted",
}
if not legacy_office.available():
    EXPECTED_FAILURES.update({"fake.doc": "Word 97-2003 (.doc)", "fake-power-point.ppt": "PowerPoint 97-2003 (.ppt)"})
if not ocr_available():
    EXPECTED_FAILURES["single_table.pdf"] = "no extractable text (scanned?)"
FILES = sorted(p for p in FOLDER.rglob("*") if p.is_file()) if FOLDER.is_dir() else []


def test_the_folder_is_there() -> None:
    assert len(FILES) >= 60, f"expected the enterprise docs under {FOLDER}"


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_file_ingests_or_fails_with_a_specific_reason(path: Path) -> None:
    data = path.read_bytes()
    expected = EXPECTED_FAILURES.get(path.name)
    try:
        chunks = chunk_sections(parse_document(data, sniff_content_type(data, path.name)), max_chars=1000)
    except GovragError as exc:
        assert expected is not None, f"{path.name} failed: {exc.message}"
        assert expected in exc.message
        return
    assert expected is None, f"{path.name} should have failed with {expected!r}"
    assert chunks and all(chunk.text.strip() for chunk in chunks)


def test_scripts_never_reach_a_chunk() -> None:
    data = (FOLDER / "unstructured_example_docs" / "example-with-scripts.html").read_bytes()
    text = " ".join(c.text for c in chunk_sections(parse_document(data, "text/html"), max_chars=1000))
    assert "function(" not in text and "<script" not in text and "var " not in text


def _text(name: str) -> str:
    data = (FOLDER / "unstructured_example_docs" / name).read_bytes()
    return " ".join(s.text for s in parse_document(data, sniff_content_type(data, name)))


def test_utf16_and_cp1252_variants_decode_to_readable_text() -> None:
    utf16 = _text("eml/fake-email-utf-16.eml")
    assert "\x00" not in utf16 and "Matthew Robinson" in utf16
    assert "Die schöne Frau hat einen Kaffee mit Kuchen gegessen" in _text("fake-html-cp1252.html")


def test_email_attachments_are_extracted_and_headers_kept() -> None:
    from ingestion import formats

    data = (FOLDER / "unstructured_example_docs" / "eml" / "fake-email-attachment.eml").read_bytes()
    assert [name for name, _ in formats.attachments(data, "message/rfc822")] == ["fake-attachment.txt"]
    sections = parse_document(data, sniff_content_type(data, "mail.eml"))
    assert any(s.text.startswith("From: ") for s in sections)
    msg = (FOLDER / "unstructured_example_docs" / "fake-email-attachment.msg").read_bytes()
    assert [name for name, _ in formats.attachments(msg, "application/vnd.ms-outlook")] == ["fake-attachment.txt"]
