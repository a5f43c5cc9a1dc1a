"""classify_chunks: each chunk at the level its own content shows, never below the declared one."""

from __future__ import annotations

from ingestion.classify import Verdict, classify_chunks
from ingestion.pipeline import IngestionRules, review_reason
from ingestion.schemas import Classification as C


def _verdict(texts: list[str], redacted: list[str], counts: dict[str, int], minted: set[str],
             declared: C = C.public, keywords: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    return classify_chunks(declared=declared, texts=texts, redacted=redacted, pii_counts=counts,
                           placeholders=minted, keywords=keywords or {})


def test_each_chunk_gets_its_own_level_and_the_document_the_highest() -> None:
    texts = ["The canteen opens at eight.", "SSN 536-22-8741 for Maria Lopez.", "Ask Maria about parking."]
    redacted = ["The canteen opens at eight.", "SSN <US_SSN_1> for <PERSON_1>.", "Ask <PERSON_1> about parking."]
    verdict = _verdict(texts, redacted, {"US_SSN": 1, "PERSON": 1}, {"<US_SSN_1>", "<PERSON_1>"})
    assert verdict.chunk_levels == (C.public, C.confidential, C.internal)
    assert verdict.level is C.confidential and verdict.chunk_level(1) is C.confidential
    assert any(reason.startswith("us_ssn") for reason in verdict.reasons)


def test_never_below_the_declared_level_and_literal_placeholders_do_not_count() -> None:
    texts = ["Template: write <US_SSN_7> here.", "Nothing here."]
    verdict = _verdict(texts, texts, {}, set(), declared=C.internal)
    assert verdict.chunk_levels == (C.internal, C.internal) and verdict.level is C.internal
    assert verdict.reasons == ()


def test_keywords_raise_only_the_chunk_that_holds_them() -> None:
    texts = ["Project Falcon budget.", "Holiday rota."]
    verdict = _verdict(texts, texts, {}, set(), keywords={"project falcon": "restricted"})
    assert verdict.chunk_levels == (C.restricted, C.public) and verdict.level is C.restricted


def test_a_keyword_split_across_chunks_raises_the_document() -> None:
    """The document's keywords were looked for chunk by chunk: one cut by a chunk boundary raised nothing."""
    texts = ["The budget of Project", "Falcon was approved."]
    verdict = _verdict(texts, texts, {}, set(), keywords={"project falcon": "restricted"})
    assert verdict.level is C.restricted and "keyword 'project falcon'" in verdict.reasons
    assert verdict.chunk_levels == (C.public, C.public)  # neither chunk holds it on its own


def test_what_only_the_whole_document_shows_raises_every_chunk() -> None:
    people = [f"<PERSON_{n}> <EMAIL_ADDRESS_{n}>" for n in range(1, 25)]
    redacted = [" ".join(people[:12]) + " " + "filler " * 400, " ".join(people[12:]) + " " + "filler " * 400]
    minted = {p for pair in people for p in pair.split()}
    verdict = _verdict(redacted, redacted, {"PERSON": 24, "EMAIL_ADDRESS": 24}, minted)
    assert verdict.level is C.confidential
    assert verdict.chunk_levels == (C.confidential, C.confidential)  # a personnel list, split across chunks


def test_a_keyword_in_the_title_raises_the_document_not_its_chunks() -> None:
    """Only chunk texts were matched: a restricted topic named in the title left the document (whose level decides
    who sees the title) at its declared level."""
    texts = ["The canteen opens at eight."]
    verdict = classify_chunks(declared=C.public, texts=texts, redacted=texts, pii_counts={}, placeholders=set(),
                              keywords={"project falcon": "restricted"}, title="Project\u200bFalcon  acquisition")
    assert verdict.level is C.restricted and verdict.reasons == ("keyword 'project falcon'",)
    assert verdict.chunk_levels == (C.public,)


def test_a_review_reason_names_the_level_what_raised_it_and_why_the_document_is_held() -> None:
    """A level over the department's limit, or over the one an admin approved, reads alike: the level, what raised
    it (the declared level when nothing did), why it is held; within 500 characters."""
    raised = Verdict(level=C.restricted, reasons=("US_SSN x1", "keyword: merger"))
    below = IngestionRules(ai_max_level=C.internal)
    assert review_reason(raised, (), below) == \
        "classified restricted (US_SSN x1; keyword: merger); the department approves AI use up to internal"
    assert review_reason(raised, (), below, approved_level=C.confidential) == \
        "classified restricted (US_SSN x1; keyword: merger); the level rose since its approval at confidential"
    assert review_reason(Verdict(level=C.confidential, reasons=()), (), below) == \
        "classified confidential (declared level); the department approves AI use up to internal"
    reason = review_reason(Verdict(level=C.restricted, reasons=("x" * 600,)), (), below)
    assert reason is not None and len(reason) == 500 and reason.startswith("classified restricted (xxx")
