"""Sentence vectors stored at ingestion: packing, and answers that need no embedding at query time."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import dataclasses

import numpy as np
import pytest

from retrieval import sentence_vectors
from retrieval.answer import Passage, extractive_answer, scored_sentences, sentence_key
from retrieval.embeddings import TextEmbedder, get_embedder
from tests.unit.test_answer import ANNUAL, PARENTAL, SICK


class CountingEmbedder:
    """The real embedder, counting the texts it is asked to embed."""

    def __init__(self, inner: TextEmbedder) -> None:
        self.inner, self.dimension, self.embedded = inner, inner.dimension, 0

    def embed(self, texts: list[str]) -> np.ndarray:
        self.embedded += len(texts)
        return self.inner.embed(texts)

    def embed_one(self, text: str) -> list[float]:
        self.embedded += 1
        return self.inner.embed_one(text)


@pytest.fixture(scope="module")
def embedder() -> TextEmbedder:
    return get_embedder()


def test_chunk_vectors_are_unchanged_and_every_sentence_gets_one(embedder: TextEmbedder) -> None:
    vectors, [packed] = sentence_vectors.embed_chunks(embedder, [PARENTAL])
    assert float(vectors[0] @ embedder.embed([PARENTAL])[0]) > 0.99999
    unpacked = sentence_vectors.unpack(packed)
    sentences = scored_sentences(PARENTAL)
    assert set(unpacked) == {sentence_key(s) for s in sentences} and len(sentences) == 3
    alone = embedder.embed(sentences)
    for sentence, vector in zip(sentences, alone, strict=True):
        stored = unpacked[sentence_key(sentence)]
        assert abs(float(np.linalg.norm(stored)) - 1.0) < 1e-3
        assert float(stored @ vector) > 0.6  # read in context, close to the sentence on its own
    assert PARENTAL.split()[3].encode() not in packed  # keys are digests, not text


def test_without_token_states_sentences_are_embedded_on_their_own(embedder: TextEmbedder) -> None:
    plain = CountingEmbedder(embedder)  # no embed_with_spans: e.g. the sentence-transformers backend
    _, [packed] = sentence_vectors.embed_chunks(plain, [SICK])
    unpacked, sentences = sentence_vectors.unpack(packed), scored_sentences(SICK)
    for sentence, vector in zip(sentences, embedder.embed(sentences), strict=True):
        assert float(unpacked[sentence_key(sentence)] @ vector) > 0.999


def test_sentences_past_the_token_window_are_left_for_query_time(embedder: TextEmbedder) -> None:
    long_text = " ".join(f"Clause {i} of the travel policy sets out rule number {i} for claims." for i in range(60))
    _, [packed] = sentence_vectors.embed_chunks(embedder, [long_text])
    unpacked, sentences = sentence_vectors.unpack(packed), scored_sentences(long_text)
    assert sentence_key(sentences[0]) in unpacked and sentence_key(sentences[-1]) not in unpacked
    assert 0 < len(unpacked) < len(sentences)


def test_a_chunk_without_sentences_packs_to_an_empty_map(embedder: TextEmbedder) -> None:
    _, [packed] = sentence_vectors.embed_chunks(embedder, ["42"])
    assert sentence_vectors.unpack(packed) == {}


@pytest.mark.parametrize("cut", [3, 20, -1])
def test_a_truncated_blob_is_refused(embedder: TextEmbedder, cut: int) -> None:
    _, [packed] = sentence_vectors.embed_chunks(embedder, [SICK])
    with pytest.raises(ValueError, match="sentence vectors"):
        sentence_vectors.unpack(packed[:cut])


def _passages(embedder: TextEmbedder, question: str, stored: bool) -> list[Passage]:
    texts = [ANNUAL, PARENTAL, SICK]
    _, packed = sentence_vectors.embed_chunks(embedder, texts)
    q = np.asarray(embedder.embed_one(question), dtype=np.float32)
    chunk_vectors = embedder.embed(texts)
    return [Passage(n=i + 1, text=t, score=float(chunk_vectors[i] @ q),
                    vectors=sentence_vectors.unpack(packed[i]) if stored else None) for i, t in enumerate(texts)]


@pytest.mark.parametrize(("question", "cited", "expected"), [
    ("How many weeks of parental leave do new parents get?", "[2]", "16 weeks"),
    ("When must unused annual leave be taken?", "[1]", "31 March"),
    ("When do I need a medical certificate?", "[3]", "medical certificate"),
])
def test_stored_vectors_answer_without_embedding_anything(embedder: TextEmbedder, question: str, cited: str,
                                                          expected: str) -> None:
    vector = embedder.embed_one(question)
    counting = CountingEmbedder(embedder)
    answer = extractive_answer(question, vector, _passages(embedder, question, stored=True), counting)
    assert counting.embedded == 0
    assert answer is not None and cited in answer.text and expected in answer.text


def test_without_stored_vectors_the_sentences_are_embedded_at_query_time(embedder: TextEmbedder) -> None:
    question = "How many weeks of parental leave do new parents get?"
    counting = CountingEmbedder(embedder)
    answer = extractive_answer(question, embedder.embed_one(question), _passages(embedder, question, False), counting)
    assert counting.embedded == sum(len(scored_sentences(text)) for text in (ANNUAL, PARENTAL, SICK))
    assert answer is not None and "[2]" in answer.text


def test_a_changed_sentence_misses_its_stored_vector_and_is_embedded(embedder: TextEmbedder) -> None:
    question = "When must unused annual leave be taken?"
    passages = _passages(embedder, question, stored=True)
    edited = ANNUAL.replace("31 March", "30 April")  # e.g. neutralised or re-split since ingestion
    passages[0] = dataclasses.replace(passages[0], text=edited)
    counting = CountingEmbedder(embedder)
    answer = extractive_answer(question, embedder.embed_one(question), passages, counting)
    assert counting.embedded == 1  # only the changed sentence
    assert answer is not None and "30 April" in answer.text
