"""Word/PowerPoint 97-2003 files: converted by LibreOffice where it is installed (`.ci/run` installs it), refused
with that reason where it is not; a conversion that overruns the parse time limit is killed."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import psutil
import pytest

from core.errors import ErrorCode, GovragError
from ingestion import legacy_office, sniff
from ingestion.parse import ParseLimits, parse_document

FOLDER = Path(__file__).resolve().parents[3] / "shared" / "eval" / "enterprise_docs_ingestion"
FOLDER = FOLDER / "unstructured_example_docs"
LEGACY = {"fake.doc": (sniff.APPLICATION_DOC, "Lorem ipsum dolor sit amet."),
          "fake-power-point.ppt": (sniff.APPLICATION_PPT, "Adding a Bullet Slide")}


@pytest.mark.parametrize("name", sorted(LEGACY))
def test_legacy_office_files_are_sniffed_then_converted_or_refused_with_the_reason(name: str) -> None:
    data = (FOLDER / name).read_bytes()
    content_type, expected_text = LEGACY[name]
    assert sniff.sniff_content_type(data, "upload.bin") == content_type  # from the bytes, not the name
    if not legacy_office.available():
        with pytest.raises(GovragError) as refused:
            parse_document(data, content_type)
        assert "needs LibreOffice" in refused.value.message
        return
    sections = parse_document(data, content_type)
    assert expected_text in " ".join(section.text for section in sections)


def test_without_libreoffice_the_refusal_names_the_format_and_the_way_out(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(legacy_office.shutil, "which", lambda _name: None)
    with pytest.raises(GovragError) as refused:
        parse_document((FOLDER / "fake.doc").read_bytes(), sniff.APPLICATION_DOC)
    assert refused.value.code == ErrorCode.unsupported_type
    assert refused.value.message.startswith("it is a Word 97-2003 (.doc) file: save it as DOCX")


def test_a_conversion_past_the_time_limit_is_killed_and_fails_clearly() -> None:
    if not legacy_office.available():
        assert shutil.which("soffice") is None
        return
    with pytest.raises(GovragError) as slow:
        parse_document((FOLDER / "fake-power-point.ppt").read_bytes(), sniff.APPLICATION_PPT,
                       ParseLimits(timeout_seconds=0.05))
    assert "took longer than the 0.05 s limit" in slow.value.message
    time.sleep(0.5)
    assert not [p for p in psutil.process_iter(["cmdline"]) if "govrag-soffice-" in " ".join(p.info["cmdline"] or [])]


def test_a_corrupt_legacy_file_fails_with_a_reason_not_a_crash() -> None:
    data = bytearray((FOLDER / "fake.doc").read_bytes())
    data[2048:] = bytes(len(data) - 2048)  # the header and directory survive, the content is gone
    with pytest.raises(GovragError) as broken:
        parse_document(bytes(data), sniff.APPLICATION_DOC)
    assert broken.value.code in (ErrorCode.invalid_request, ErrorCode.unsupported_type)
