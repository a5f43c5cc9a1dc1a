"""PII engine speed-ups: the NER's matrix products on numpy's BLAS (one thread), same redactions as blis."""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
from thinc.api import NumpyOps
from threadpoolctl import threadpool_info

from guard.pii import LANGUAGE, MAX_BLAS_THREADS, PiiRedactor, PlaceholderMap, get_redactor

TEXTS = [
    "Owner: Maria Gonzalez, maria.gonzalez@example.com, +44 20 7946 1234",
    "Questions go to Samuel Okafor before the quarterly review; Aiko Tanaka signs off.",
    "Call Liam O'Brien on 555-201-3344 or write to Elena Petrova about card 4111 1111 1111 1111.",
    "The travel policy rules for team 12 change on day 3.",
]


@pytest.fixture(scope="module")
def redactor() -> PiiRedactor:
    return get_redactor()


def _blas_threads() -> list[int]:
    """Threads of numpy's own BLAS, the one the NER's products run on (libraries loaded later, such as scipy's
    copy, are not the NER's)."""
    return [pool["num_threads"] for pool in threadpool_info()
            if pool["user_api"] == "blas" and f"{os.sep}numpy.libs{os.sep}" in pool["filepath"]]


def _ner_nodes(redactor: PiiRedactor) -> list:  # type: ignore[type-arg]
    return list(redactor._analyzer.nlp_engine.nlp[LANGUAGE].get_pipe("ner").model.walk())


def test_the_ner_runs_on_numpy_blas_not_blis(redactor: PiiRedactor) -> None:
    nodes = _ner_nodes(redactor)
    assert nodes and all(isinstance(node.ops, NumpyOps) and not node.ops.use_blis for node in nodes)


def test_redactions_match_the_blis_kernels(redactor: PiiRedactor) -> None:
    nodes = _ner_nodes(redactor)
    numpy_ops = nodes[0].ops
    faster = redactor.redact_many(TEXTS, PlaceholderMap())
    try:
        for node in nodes:
            node.ops = NumpyOps()  # blis
        reference = redactor.redact_many(TEXTS, PlaceholderMap())
    finally:
        for node in nodes:
            node.ops = numpy_ops
    assert faster == reference
    assert "Maria Gonzalez" not in faster[0] and "<PERSON_1>" in faster[0]


def test_blas_is_capped_for_the_process_from_any_thread(redactor: PiiRedactor) -> None:
    seen: list[list[int]] = []
    worker = threading.Thread(target=lambda: seen.append(_blas_threads()))
    worker.start()
    worker.join()
    assert _blas_threads() and set(_blas_threads()) == {MAX_BLAS_THREADS}
    assert set(seen[0]) == {MAX_BLAS_THREADS}


def test_documents_redacted_at_once_in_threads_match_one_at_a_time(redactor: PiiRedactor) -> None:
    """The API masks questions in its threads while the in-process worker redacts a document in another, all
    sharing one redactor (and one spaCy pipeline): each text's redaction and placeholder numbering must be what
    it is alone."""
    documents = [TEXTS[i:] + TEXTS[:i] for i in range(len(TEXTS))] * 3

    def redact(texts: list[str]) -> tuple[list[str], dict[str, str]]:
        placeholders = PlaceholderMap()
        return redactor.redact_many(texts, placeholders), placeholders.mapping()

    alone = [redact(texts) for texts in documents]
    with ThreadPoolExecutor(max_workers=4) as pool:
        at_once = list(pool.map(redact, documents))
    assert at_once == alone
    assert all("Maria Gonzalez" not in " ".join(texts) for texts, _ in at_once)
