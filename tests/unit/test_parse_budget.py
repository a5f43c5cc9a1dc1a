"""GOVRAG_PARSE_TIMEOUT_SECONDS is one budget per document: each step of a parse (a conversion, the text layer, OCR)
gets what the steps before it left. A .doc had the whole limit for LibreOffice and again for the DOCX it made, a scan
for its text layer and again for OCR. The clock is the test's: each look at it shows the next reading."""

from __future__ import annotations

import shutil
from collections.abc import Callable

import psutil
import pytest

from core.errors import ErrorCode, GovragError
from ingestion import legacy_office, sandbox, sniff
from ingestion.parse import ocr_available, parse_document
from tests.support.conversion_inputs import FOLDER, drawing_only_pdf
from tests.unit.test_legacy_office import no_libreoffice_pipe_left  # noqa: F401 (autouse here too)

DOC = (FOLDER / "unstructured_example_docs" / "fake.doc").read_bytes()


def _clock(*readings: float) -> tuple[Callable[[], float], list[float]]:
    """A clock showing `readings` one look after another, then the last for ever; and the readings it showed."""
    shown: list[float] = []

    def now() -> float:
        shown.append(readings[min(len(shown), len(readings) - 1)])
        return shown[-1]

    return now, shown


def test_a_doc_whose_conversion_used_the_budget_is_refused_the_parse_of_the_docx() -> None:
    if not legacy_office.available():
        assert shutil.which("soffice") is None
        return
    now, shown = _clock(0, 60, 120)  # the start; LibreOffice starts with 40 s left; the DOCX's parse finds none
    with pytest.raises(GovragError) as late:
        parse_document(DOC, sniff.APPLICATION_DOC, deadline=sandbox.Deadline(100, clock=now))
    assert late.value.code is ErrorCode.invalid_request
    assert late.value.message == "parsing took longer than the 100 s limit"
    assert shown == [0, 60, 120], "the conversion ran, and the parse of its DOCX was refused"


def test_a_conversion_gets_only_what_is_left_of_the_limit() -> None:
    """The real LibreOffice, handed the 0.05 s left of 100 s, is killed: with the whole limit it converts the file."""
    if not legacy_office.available():
        assert shutil.which("soffice") is None
        return
    now, _ = _clock(0, 99.95)
    with pytest.raises(GovragError) as late:
        parse_document(DOC, sniff.APPLICATION_DOC, deadline=sandbox.Deadline(100, clock=now))
    assert late.value.message == "converting the Word 97-2003 (.doc) file took longer than the 100 s limit"


def test_ocr_gets_only_what_the_text_layer_left() -> None:
    """A scan: its text layer (none) read with the whole limit, OCR (the real tesseract) with the 0.05 s left."""
    assert ocr_available()
    now, shown = _clock(0, 0, 99.95)
    with pytest.raises(GovragError) as late:
        parse_document(drawing_only_pdf(), sniff.APPLICATION_PDF, deadline=sandbox.Deadline(100, clock=now))
    assert late.value.message == "parsing took longer than the 100 s limit"
    assert len(shown) == 3, "the limit fell during OCR"
    assert not [child for child in psutil.Process().children(recursive=True) if child.name() == "tesseract"]


def test_ocr_is_refused_once_the_text_layer_used_the_budget() -> None:
    now, shown = _clock(0, 60, 120)
    with pytest.raises(GovragError) as late:
        parse_document(drawing_only_pdf(), sniff.APPLICATION_PDF, deadline=sandbox.Deadline(100, clock=now))
    assert late.value.message == "parsing took longer than the 100 s limit"
    assert shown == [0, 60, 120]


def test_a_budget_of_zero_is_no_limit() -> None:
    now, _ = _clock(0, 10**9)
    assert sandbox.Deadline(0, clock=now).remaining() is None
