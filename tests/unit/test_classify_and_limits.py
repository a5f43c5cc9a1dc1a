"""Classification from content and the parse limits (zip bombs, elements, pages, time)."""

from __future__ import annotations

import io
import threading
import time
import zipfile

import pikepdf
import pytest

from core.errors import ErrorCode, GovragError
from ingestion import sandbox
from ingestion.classify import classify, cut_title, keyword_hits, with_title_pii
from ingestion.parse import ParseLimits, check_zip_container, parse_document, run_with_timeout
from ingestion.schemas import Classification


def test_declared_level_is_a_floor() -> None:
    verdict = classify(declared=Classification.restricted, pii_counts={"PERSON": 1}, text_chars=100,
                       keyword_hits={})
    assert verdict.level == Classification.restricted and verdict.reasons == ()


@pytest.mark.parametrize(("counts", "level"), [
    ({}, Classification.public),
    ({"PERSON": 2}, Classification.internal),
    ({"US_SSN": 1}, Classification.confidential),
    ({"EMPLOYEE_ID": 1}, Classification.confidential),
    ({"SECRET": 1, "PERSON": 3}, Classification.restricted),
])
def test_kinds_of_pii_raise_the_level(counts: dict[str, int], level: Classification) -> None:
    verdict = classify(declared=Classification.public, pii_counts=counts, text_chars=2000, keyword_hits={})
    assert verdict.level == level
    if level != Classification.public:
        assert verdict.reasons


def test_many_people_with_contacts_is_confidential() -> None:
    verdict = classify(declared=Classification.internal, pii_counts={"PERSON": 25, "EMAIL_ADDRESS": 25},
                       text_chars=100_000, keyword_hits={})
    assert verdict.level == Classification.confidential
    assert "25 people with contact details" in verdict.reasons


def test_keywords_match_whole_words_in_any_case() -> None:
    hits = keyword_hits(["Notes on PROJECT FALCON.", "falconry club"], {"project falcon": "restricted",
                                                                         "falcon": "confidential"})
    assert hits == {"project falcon": Classification.restricted, "falcon": Classification.confidential}
    assert keyword_hits(["falconry"], {"falcon": "confidential"}) == {}
    verdict = classify(declared=Classification.internal, pii_counts={}, text_chars=10, keyword_hits=hits)
    assert verdict.level == Classification.restricted


@pytest.mark.parametrize("spelling", ["Project\nFalcon", "Project\u00a0Falcon", "Project  Falcon",
                                      "Project\u200bFalcon", "Pro\u00adject Fal\u2060con", "\uff30roject \ufeffFalcon"])
def test_a_multi_word_keyword_matches_across_line_breaks_odd_spaces_and_invisible_characters(spelling: str) -> None:
    """`re.escape("project falcon")` matched one plain space only: a keyword wrapped over a line, written with a
    no-break or double space, or with a zero-width character in it, did not raise the document."""
    hits = keyword_hits([f"The {spelling} budget was approved."], {"project falcon": "restricted"})
    assert hits == {"project falcon": Classification.restricted}
    assert keyword_hits([f"{spelling}ry"], {"project falcon": "restricted"}) == {}  # still whole words


def _zip(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def test_zip_bomb_is_refused_from_the_central_directory() -> None:
    bomb = _zip({"word/document.xml": b"\0" * (12 * 1024 * 1024)})
    with pytest.raises(GovragError) as error:
        check_zip_container(bomb, ParseLimits(max_compression_ratio=100))
    assert error.value.code == ErrorCode.payload_too_large and "decompression bomb" in error.value.message
    with pytest.raises(GovragError) as error:
        check_zip_container(bomb, ParseLimits(max_decompressed_bytes=1024 * 1024))
    assert "decompresses to more than" in error.value.message
    check_zip_container(_zip({"word/document.xml": b"<w:document/>"}), ParseLimits())


def test_text_that_opens_with_pk_is_parsed_as_text_not_checked_as_a_zip() -> None:
    sections = parse_document(b"PKI rollout plan for the Leeds office.\n", "text/plain")
    assert [section.text for section in sections] == ["PKI rollout plan for the Leeds office."]


def test_too_many_elements_fail_with_the_limit() -> None:
    text = "\n\n".join(f"Paragraph number {n} of a long memo." for n in range(60)).encode()
    with pytest.raises(GovragError) as error:
        parse_document(text, "text/plain", ParseLimits(max_elements=10))
    assert "more than 10 elements" in error.value.message


def test_too_many_pdf_pages_fail_with_the_limit() -> None:
    pdf = pikepdf.new()
    for _ in range(3):
        pdf.add_blank_page()
    buffer = io.BytesIO()
    pdf.save(buffer)
    with pytest.raises(GovragError) as error:
        parse_document(buffer.getvalue(), "application/pdf", ParseLimits(max_pages=2))
    assert "more than 2 pages" in error.value.message


def test_parse_timeout_on_the_main_thread_interrupts_the_work() -> None:
    finished: list[bool] = []
    with pytest.raises(GovragError) as error:
        run_with_timeout(lambda: (time.sleep(5), finished.append(True)), sandbox.Deadline(0.2))
    assert "longer than the 0.2 s limit" in error.value.message
    assert finished == []  # interrupted, not waited out


def test_parse_timeout_is_not_swallowed_by_a_parser_that_catches_every_exception() -> None:
    def stubborn_parser() -> None:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                time.sleep(0.05)
            except Exception:  # noqa: BLE001, S112 - what a careless parser does
                continue
        finished.append(True)

    finished: list[bool] = []
    with pytest.raises(GovragError):
        run_with_timeout(stubborn_parser, sandbox.Deadline(0.2))
    assert finished == []  # the timeout got through the parser's catch-all, not waited out


def test_a_ctrl_c_or_sigterm_met_by_the_parse_time_limit_as_its_cleanup_runs_stays_a_stop() -> None:
    """A Ctrl-C (or `govrag ingest`'s SIGTERM, `scratch.Terminated`) whose cleanup (`sandbox.killed_on_failure`
    waiting for the programs it killed) met the parse time limit's alarm became the file's parse timeout: the file
    failed, and the run went on as if no stop had been asked for. The stop goes on up."""
    def interrupted_parser() -> None:
        try:
            raise KeyboardInterrupt
        finally:
            time.sleep(60)  # the cleanup the alarm interrupts

    with pytest.raises(KeyboardInterrupt):
        run_with_timeout(interrupted_parser, sandbox.Deadline(0.2))


def test_parse_timeout_off_the_main_thread_returns_control() -> None:
    outcome: dict[str, str] = {}

    def worker() -> None:
        try:
            run_with_timeout(lambda: time.sleep(3), sandbox.Deadline(0.2))
        except GovragError as exc:
            outcome["message"] = exc.message

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join(2)
    assert not thread.is_alive() and "limit" in outcome["message"]
    assert run_with_timeout(lambda: 41 + 1, sandbox.Deadline(1.0)) == 42


def test_a_cut_title_splits_no_placeholder_and_keeps_every_type_it_held() -> None:
    for title in ["x" * 290 + " <CREDIT_CARD> receipt <PERSON>", "<PERSON> " + "y" * 400 + " <IBAN_CODE>",
                  "z" * 298 + "<EMAIL_ADDRESS>"]:
        kinds = ["CREDIT_CARD", "PERSON", "IBAN_CODE", "EMAIL_ADDRESS"]
        cut = cut_title(title, 300, kinds)
        assert len(cut) <= 300 and not cut.rstrip().endswith(tuple(f"<{k[:n]}" for k in kinds for n in range(12)))
        assert with_title_pii({}, cut, kinds) == with_title_pii({}, title, kinds), cut[-40:]
    assert cut_title("Card <CREDIT_CARD> refund.txt", 300, ["CREDIT_CARD"]) == "Card <CREDIT_CARD> refund.txt"



def test_a_title_of_more_placeholders_than_fit_is_cut_and_the_cut_ends() -> None:
    """An uploader's `<A0> <A1> ...` read as placeholders: cut_title looped for ever when they could not all fit.
    They are text now; the placeholders of the types redaction writes are kept."""
    title = " ".join(f"<A{n}>" for n in range(60)) + " <CREDIT_CARD>"
    cuts: list[str] = []
    worker = threading.Thread(target=lambda: cuts.append(cut_title(title, 300, ["CREDIT_CARD"])), daemon=True)
    worker.start()
    worker.join(timeout=20)  # a hang guard with a huge margin: the cut takes milliseconds
    assert cuts, "cut_title did not return"
    assert len(cuts[0]) <= 300 and cuts[0].endswith(" … <CREDIT_CARD>")
    many_kinds = [f"KIND{n}" for n in range(60)]
    crowded = cut_title(" ".join(f"<{kind}>" for kind in many_kinds) + " x" * 200, 300, many_kinds)
    assert len(crowded) <= 300
    assert all(part.startswith("<") and part.endswith(">") for part in crowded.removeprefix("… ").split())
