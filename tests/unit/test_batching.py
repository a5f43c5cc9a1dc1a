"""Micro-batching of the query's model calls: concurrent callers share a call, each gets its own result."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from audit.service import mask_questions
from core.batching import MicroBatcher
from core.settings import Settings
from guard.pii import get_redactor
from retrieval.embeddings import get_embedder

QUESTIONS = [
    "What did Maria Gonzalez say about the travel policy?",
    "Call me on +44 20 7946 0958 about claim 12",
    "When does parental leave start?",
    "Send the report to liam.obrien@example.com and Aiko Tanaka",
]


def test_a_caller_alone_is_served_at_once() -> None:
    batches: list[list[int]] = []
    batcher = MicroBatcher(lambda items: batches.append(list(items)) or [i * 2 for i in items], name="test")
    assert batcher.submit(21).result(5) == 42
    assert batches == [[21]]


def test_callers_arriving_together_share_one_call_and_get_their_own_results() -> None:
    started, release = threading.Event(), threading.Event()
    batches: list[list[int]] = []

    def process(items: list[int]) -> list[int]:
        batches.append(list(items))
        started.set()
        release.wait(5)
        return [i + 100 for i in items]

    batcher = MicroBatcher(process, name="test", max_batch=3)
    first = batcher.submit(0)
    assert started.wait(5)  # the thread is busy with the first item; the next ones queue up meanwhile
    waiting = [batcher.submit(i) for i in range(1, 6)]
    release.set()
    assert first.result(5) == 100
    assert [f.result(5) for f in waiting] == [101, 102, 103, 104, 105]
    assert batches == [[0], [1, 2, 3], [4, 5]]  # capped at max_batch, in arrival order


def test_a_bad_item_fails_only_its_own_caller_and_the_thread_lives_on() -> None:
    started, release = threading.Event(), threading.Event()
    calls: list[list[int]] = []

    def process(items: list[int]) -> list[int]:
        calls.append(list(items))
        if items == [-1]:
            started.set()
            release.wait(5)
        if 0 in items:
            raise ValueError("bad item")
        return items

    batcher = MicroBatcher(process, name="test")
    blocker = batcher.submit(-1)
    assert started.wait(5)
    good, bad, other = batcher.submit(1), batcher.submit(0), batcher.submit(2)  # batched together
    release.set()
    assert blocker.result(5) == -1
    assert good.result(5) == 1 and other.result(5) == 2
    with pytest.raises(ValueError, match="bad item"):
        bad.result(5)
    assert calls == [[-1], [1, 0, 2], [1], [0], [2]]  # the shared call failed: each item again, alone
    assert batcher.submit(7).result(5) == 7


def test_a_process_that_returns_the_wrong_count_fails_its_callers() -> None:
    batcher: MicroBatcher[int, int] = MicroBatcher(lambda items: items[1:], name="test")
    with pytest.raises(RuntimeError, match="0 results for 1 items"):
        batcher.submit(1).result(5)


def test_batched_masking_equals_masking_each_question_alone() -> None:
    redactor = get_redactor()
    alone = [mask_questions([question])[0] for question in QUESTIONS]
    assert mask_questions(QUESTIONS) == alone
    assert redactor.redact_each(QUESTIONS) == [redactor.redact(question) for question in QUESTIONS]
    assert "Maria Gonzalez" not in alone[0] and "<PERSON_1>" in alone[0]
    assert "<PERSON_1>" in alone[3]  # each question numbers its own placeholders


def test_batched_question_vectors_equal_single_ones() -> None:
    embedder = get_embedder(Settings().embedding_backend)
    batched = embedder.embed(QUESTIONS)
    for question, vector in zip(QUESTIONS, batched, strict=True):
        assert float(np.dot(vector, np.asarray(embedder.embed_one(question)))) > 1 - 1e-5
