"""Extractive answerer and embedder, exercised with the real all-MiniLM-L6-v2 model."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import random
import re
from typing import Any

import numpy as np
import pytest

from guard.placeholders import document_placeholder
from retrieval.answer import (
    ExtractiveAnswer,
    Passage,
    content_terms,
    extractive_answer,
    find_words,
    quote_window,
    split_sentences,
)
from retrieval.embeddings import Embedder, get_embedder
from retrieval.prompting import qualify_placeholders

ANNUAL = (
    "# Annual leave\n"
    "Full-time employees are entitled to 25 days of paid annual leave per calendar year. "
    "Part-time staff receive leave pro rata, e.g. an employee working 3.5 days a week receives 17.5 days. "
    "Unused leave of up to 5 days may be carried over, but it must be taken before 31 March."
)
PARENTAL = (
    "# Parental leave\n"
    "Employees who become parents are entitled to 16 weeks of fully paid parental leave. "
    "The leave may be taken in one block or split into two periods within the first year. "
    "<PERSON_1>, the HR director, approves any extension beyond 16 weeks."
)
SICK = (
    "# Sick leave\n"
    "If you are ill, notify your line manager before 10 a.m. on the first day of absence. "
    "A medical certificate is required for absences longer than three consecutive working days. "
    "Sick leave is paid at full salary for up to 30 days per year, and at 50% thereafter."
)
MARKER = re.compile(r"\[(\d+)\]")


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    """The process-wide embedder (loaded once for the module)."""
    return get_embedder()


def _passages(embedder: Embedder, question: str, texts: list[str]) -> list[Passage]:
    """Number texts from 1 and score them against the question as vector search would."""
    question_vector = np.asarray(embedder.embed_one(question), dtype=np.float32)
    vectors = embedder.embed(texts)
    return [Passage(n=i + 1, text=t, score=float(vectors[i] @ question_vector)) for i, t in enumerate(texts)]


def _ask(embedder: Embedder, question: str, texts: list[str], **options: Any) -> ExtractiveAnswer | None:
    """Run the answerer the way the query service does."""
    passages = _passages(embedder, question, texts)
    return extractive_answer(question, embedder.embed_one(question), passages, embedder, **options)


def test_answer_cites_the_passage_that_answers(embedder: Embedder) -> None:
    answer = _ask(embedder, "How many weeks of parental leave do new parents get?", [ANNUAL, PARENTAL, SICK])
    assert answer is not None
    assert 2 in answer.cited
    assert "entitled to 16 weeks of fully paid parental leave. [2]" in answer.text


def test_answer_follows_the_passage_wherever_it_is_ranked(embedder: Embedder) -> None:
    answer = _ask(embedder, "Is sick leave paid?", [PARENTAL, ANNUAL, SICK])
    assert answer is not None
    assert answer.cited[0] == 3
    assert "Sick leave is paid at full salary for up to 30 days per year, and at 50% thereafter. [3]" in answer.text


def test_who_question_prefers_the_sentence_naming_someone(embedder: Embedder) -> None:
    answer = _ask(embedder, "Who approves an extension of parental leave?", [ANNUAL, PARENTAL, SICK], max_sentences=1)
    assert answer is not None
    assert answer.text == "<PERSON_1>, the HR director, approves any extension beyond 16 weeks. [2]"
    assert answer.cited == (2,)


def test_unrelated_question_is_refused_at_default_threshold(embedder: Embedder) -> None:
    assert _ask(embedder, "What is on the cafeteria menu this week?", [ANNUAL, PARENTAL, SICK]) is None
    assert _ask(embedder, "How do I reset my VPN token?", [ANNUAL, PARENTAL, SICK]) is None


def test_threshold_is_honoured(embedder: Embedder) -> None:
    question = "How many days of annual leave do full-time employees get?"
    assert _ask(embedder, question, [ANNUAL, PARENTAL, SICK]) is not None
    assert _ask(embedder, question, [ANNUAL, PARENTAL, SICK], min_relevance=1.5) is None


def test_markers_match_cited_and_passages(embedder: Embedder) -> None:
    answer = _ask(embedder, "What are the rules for leave?", [ANNUAL, PARENTAL, SICK], min_relevance=0.0)
    assert answer is not None
    markers = [int(m) for m in MARKER.findall(answer.text)]
    assert markers
    assert tuple(dict.fromkeys(markers)) == answer.cited
    assert set(answer.cited) <= {1, 2, 3}
    assert len(markers) <= 3


def test_a_bracketed_number_in_quoted_text_is_no_citation_marker(embedder: Embedder) -> None:
    claims = "Travel expense claims must be filed within 30 days of the trip, as section [4] of the handbook says."
    answer = _ask(embedder, "Within how many days must travel expense claims be filed?", [claims, SICK])
    assert answer is not None and answer.cited == (1,)
    assert "as section (4) of the handbook says. [1]" in answer.text
    assert [int(m) for m in MARKER.findall(answer.text)] == [1]


def test_max_sentences_and_near_duplicates(embedder: Embedder) -> None:
    question = "How many days of annual leave do full-time employees get?"
    answer = _ask(embedder, question, [ANNUAL, ANNUAL, SICK], max_sentences=2, min_relevance=0.0)
    assert answer is not None
    assert len(MARKER.findall(answer.text)) <= 2
    assert answer.text.count("Full-time employees are entitled to 25 days") == 1


def test_deterministic_across_calls(embedder: Embedder) -> None:
    question = "When must carried-over leave be taken?"
    first = _ask(embedder, question, [ANNUAL, PARENTAL, SICK])
    second = _ask(embedder, question, [ANNUAL, PARENTAL, SICK])
    assert first is not None
    assert first == second


def test_no_passages_and_bad_vector(embedder: Embedder) -> None:
    assert extractive_answer("Is sick leave paid?", [0.0] * embedder.dimension, [], embedder) is None
    with pytest.raises(ValueError, match="dimension"):
        extractive_answer("Is sick leave paid?", [1.0, 0.0], [Passage(1, SICK, 0.5)], embedder)


def test_split_sentences_spares_abbreviations_and_decimals() -> None:
    text = "Dr. Smith approved the plan, e.g. a budget of 3.5 million euros. The next review is due in 2025."
    assert split_sentences(text) == [
        "Dr. Smith approved the plan, e.g. a budget of 3.5 million euros.",
        "The next review is due in 2025.",
    ]


def test_split_sentences_on_terminal_punctuation() -> None:
    text = "The rate rose to 4.25% in Q3. It was 3.9% before, i.e. a small rise! Was that expected by everyone?"
    assert split_sentences(text) == [
        "The rate rose to 4.25% in Q3.",
        "It was 3.9% before, i.e. a small rise!",
        "Was that expected by everyone?",
    ]


def test_split_sentences_lists_headings_and_wrapped_lines() -> None:
    text = (
        "## Device rules\n"
        "This policy applies to all staff members.\n"
        "- Laptops must be encrypted at all times\n"
        "* USB sticks are forbidden on site\n"
        "1. Report a lost device within one hour\n"
        "A wrapped sentence continues\n"
        "on the next line of the page.\n"
        "Short.\n"
        "12345 6789 0000 1111 2222"
    )
    assert split_sentences(text) == [
        "This policy applies to all staff members.",
        "Laptops must be encrypted at all times",
        "USB sticks are forbidden on site",
        "Report a lost device within one hour",
        "A wrapped sentence continues on the next line of the page.",
    ]


def test_every_sentence_includes_the_short_ones_and_the_headings_own() -> None:
    """`every` is what the output guard checks: a heading is read as well as the sentences under it."""
    text = "# Device rules\nShort.\n## Lost devices. Report them\n- USB sticks are forbidden on site\n\n#"
    assert split_sentences(text, every=True) == [
        "Device rules", "Short.", "Lost devices.", "Report them", "USB sticks are forbidden on site", "#"]
    assert split_sentences(text) == ["USB sticks are forbidden on site"]


def test_split_sentences_keeps_placeholders() -> None:
    text = "Please contact <PERSON_1> about leave. <PERSON_2> signed the form on <DATE_TIME_1>."
    assert split_sentences(text) == [
        "Please contact <PERSON_1> about leave.",
        "<PERSON_2> signed the form on <DATE_TIME_1>.",
    ]


def test_embedder_returns_normalised_vectors(embedder: Embedder) -> None:
    vectors = embedder.embed(
        [
            "How much paid holiday do staff get?",
            "Employees receive 25 days of annual leave.",
            "The canteen serves soup.",
        ]
    )
    assert embedder.dimension == 384
    assert vectors.shape == (3, 384)
    assert vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert float(vectors[0] @ vectors[1]) > float(vectors[0] @ vectors[2]) + 0.1


def test_embed_one_and_empty_batch(embedder: Embedder) -> None:
    single = embedder.embed_one("Employees receive 25 days of annual leave.")
    assert len(single) == 384
    assert all(isinstance(x, float) for x in single)
    assert embedder.embed([]).shape == (0, 384)
    assert get_embedder() is embedder


def test_find_words_finds_what_the_whitespace_regex_finds() -> None:
    """`find_words` replaces a compiled `\\s+`-joined pattern per sentence: same spans on random texts."""
    rng = random.Random(11)
    vocabulary = ["a", "an", "ab", "b", "ba", "c.", "(c)", "a*b", "\u00e9t\u00e9"]
    gaps = [" ", "  ", "\n", "\t", "\u00a0", "", "-"]
    for _ in range(3000):
        text = "".join(rng.choice(vocabulary) + rng.choice(gaps) for _ in range(rng.randint(0, 12)))
        words = [rng.choice(vocabulary) for _ in range(rng.randint(0, 3))]
        position = rng.randint(0, len(text))
        match = re.compile(r"\s+".join(re.escape(word) for word in words)).search(text, position)
        assert find_words(text, words, position) == (match.span() if match else None), (text, words, position)


def test_content_terms_are_words_in_any_script() -> None:
    assert content_terms("Всем сотрудникам положена премия") == {"всем", "сотрудникам", "положена", "премия"}
    assert content_terms("Reisekosten für Zürich") == {"reisekosten", "für", "zürich"}
    assert content_terms("The employee's claims, I'm sure") == {"employe", "claim", "sur"}  # stemmed


def test_content_terms_of_scripts_without_spaces_are_character_bigrams() -> None:
    """A Chinese or Japanese sentence is not one long word: its runs are cut into overlapping character pairs."""
    assert content_terms("酒店住宿费") == {"酒店", "店住", "住宿", "宿费"}
    assert content_terms("报销180欧元。") == {"报销", "180", "欧元"}
    assert content_terms("出張費は、税") == {"出張", "張費", "費は", "税"}
    assert content_terms("Hotel 酒店 costs") == {"hotel", "酒店", "cost"}


FILLER = " ".join(f"Filler sentence {i} says nothing in particular about the office." for i in range(8))


@pytest.mark.parametrize(("text", "sentence"), [
    (FILLER + " The bicycle room opens at seven.", "The bicycle room opens at seven."),  # near the end
    ("The bicycle room opens at seven. " + FILLER, "The bicycle room opens at seven."),  # at the start
    (FILLER + " The bicycle room opens at seven. " + FILLER, "The bicycle room opens at seven."),  # in the middle
    (FILLER, None),  # nothing quoted: the start
    (FILLER, "A sentence the chunk does not hold."),
])
def test_a_quote_window_holds_the_sentence_on_word_boundaries(text: str, sentence: str | None) -> None:
    window = quote_window(text, sentence, 120)
    assert len(window) <= 120
    core = window.removeprefix("…").removesuffix("…")
    assert core in text and core == core.strip()
    assert window.startswith("…") == (not text.startswith(core))
    assert window.endswith("…") == (not text.endswith(core))
    start = text.index(core)
    assert start == 0 or text[start - 1].isspace()  # never a word cut in half
    assert start + len(core) == len(text) or text[start + len(core)].isspace()
    if sentence is not None and sentence in text:
        assert sentence in core
    else:
        assert start == 0


def test_a_quote_window_of_a_short_text_is_the_text() -> None:
    assert quote_window("Short text.", "Short text.", 120) == "Short text."


def test_a_sentence_longer_than_the_window_shows_its_start() -> None:
    sentence = " ".join(["word"] * 60) + "."
    window = quote_window("Lead in. " + sentence, sentence, 120)
    assert window.startswith("…word word") and window.endswith("…") and len(window) <= 120


@pytest.mark.parametrize(("answer", "documents", "expected"), [
    ("<PERSON_1> chaired it. [1] <PERSON_1> led it. [2]", ["a", "b"],
     "<PERSON_1·1> chaired it. [1] <PERSON_1·2> led it. [2]"),
    ("<PERSON_1> chaired it. [1] <PERSON_1> led it. [2]", ["a", "a"],  # one document: one numbering, left alone
     "<PERSON_1> chaired it. [1] <PERSON_1> led it. [2]"),
    ("<PERSON_1> chaired it. [3] <EMAIL_ADDRESS_2> wrote. [2] <PERSON_1> led it. [1]", ["a", "b", "a"],
     "<PERSON_1·3> chaired it. [3] <EMAIL_ADDRESS_2·2> wrote. [2] <PERSON_1·3> led it. [1]"),  # its first citation
])
def test_placeholders_are_qualified_by_their_documents_citation(answer: str, documents: list[str],
                                                                 expected: str) -> None:
    assert qualify_placeholders(answer, documents) == expected


def test_a_placeholder_as_an_answer_shows_it_names_the_documents_own() -> None:
    """Reveal took only `<PERSON_1>`, not the `<PERSON_1·2>` an answer citing two documents shows."""
    shown = qualify_placeholders("<PERSON_1> chaired it. [1] <CREDIT_CARD_12> paid. [2]", ["a", "b"])
    assert shown == "<PERSON_1·1> chaired it. [1] <CREDIT_CARD_12·2> paid. [2]"
    assert [document_placeholder(p) for p in ("<PERSON_1·1>", "<CREDIT_CARD_12·2>", "<PERSON_1>", "<EMP2_3·2>")] == [
        "<PERSON_1>", "<CREDIT_CARD_12>", "<PERSON_1>", "<EMP2_3>"]


@pytest.mark.parametrize("malformed", ["PERSON_1", "<PERSON>", "<person_1>", "<PERSON_1·>", "<PERSON_1·0>",
                                       "<PERSON_1·2·3>", "<PERSON_1.2>", " <PERSON_1>", "<PERSON_1>x",
                                       "<PERSON_\u0661>", "<PERSON_0>", "<PERSON_01>", "<X_1>"])  # none minted
def test_anything_else_is_no_placeholder(malformed: str) -> None:
    with pytest.raises(ValueError, match="<TYPE_N>"):
        document_placeholder(malformed)
