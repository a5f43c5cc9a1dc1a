"""Extractive answer quality on ClapNQ dev (eval only): gold-sentence citations and abstention.

For each question the top-5 chunks of the ClapNQ corpus (dense search) go to the extractive answerer. Answerable
questions: share whose answer quotes at least one gold sentence (hit), share of quoted sentences that are gold
(precision), share wrongly abstaining. Unanswerable questions: share abstaining. Two sentence-vector sources are
compared in one run: embedded at query time (one forward pass per sentence) and stored at ingestion (read from
the chunk's own forward pass, `retrieval/sentence_vectors.py`), with the time each costs.
Usage: python -m bench.answer_quality
"""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from bench.common import EVAL_DIR, machine, read_jsonl  # noqa: E402
from retrieval import answer as answer_module  # noqa: E402
from retrieval import sentence_vectors  # noqa: E402
from retrieval.answer import Passage, extractive_answer  # noqa: E402
from retrieval.embeddings import get_embedder  # noqa: E402

TOP_K = 5
CHUNK_CHARS = 1000
GOLD_JACCARD = 0.6  # gold sentences are tokenised differently ("calendar year ."): compare word sets
_WORD = re.compile(r"[a-z0-9]+")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_MARKER = re.compile(r"\s*\[\d+\]\s*")


def chunks(corpus: list[dict]) -> list[str]:  # type: ignore[type-arg]
    """Each passage cut at sentence ends into chunks of at most CHUNK_CHARS, its title as a heading."""
    out = []
    for row in corpus:
        current = ""
        for sentence in _SENTENCE_END.split(row["text"]):
            if current and len(current) + len(sentence) > CHUNK_CHARS:
                out.append(f"# {row.get('title', '')}\n\n{current}")
                current = ""
            current = f"{current} {sentence}".strip()
        if current:
            out.append(f"# {row.get('title', '')}\n\n{current}")
    return out


def _words(text: str) -> set[str]:
    return set(_WORD.findall(text.lower()))


def is_gold(sentence: str, gold: list[str]) -> bool:
    words = _words(sentence)
    return any(len(words & _words(g)) / max(1, len(words | _words(g))) >= GOLD_JACCARD for g in gold)


def evaluate(rows: list[dict], texts: list[str], chunk_vectors: np.ndarray,  # type: ignore[type-arg]
             stored: list[dict] | None) -> dict[str, float]:  # type: ignore[type-arg]
    embedder = get_embedder()
    answer_module._VECTOR_CACHE.clear()  # each source starts cold
    questions = embedder.embed([row["question"] for row in rows])
    counts = {"answerable": 0, "hit": 0, "gold": 0, "quoted": 0, "abstain_answerable": 0, "unanswerable": 0,
              "abstain_unanswerable": 0}
    started = time.perf_counter()
    for row, vector in zip(rows, questions, strict=True):
        scores = chunk_vectors @ vector
        top = np.argsort(-scores)[:TOP_K]
        passages = [Passage(n=i + 1, text=texts[j], score=float(scores[j]), vectors=stored[j] if stored else None)
                    for i, j in enumerate(top)]
        answer = extractive_answer(row["question"], vector, passages, embedder)
        quoted = [s for s in _MARKER.split(answer.text) if s] if answer else []
        if not row["answerable"]:
            counts["unanswerable"] += 1
            counts["abstain_unanswerable"] += answer is None
            continue
        counts["answerable"] += 1
        counts["abstain_answerable"] += answer is None
        gold = [is_gold(s, row["selected_sentences"]) for s in quoted]
        counts["hit"] += any(gold)
        counts["gold"] += sum(gold)
        counts["quoted"] += len(gold)
    elapsed = time.perf_counter() - started
    return {"hit": counts["hit"] / counts["answerable"], "precision": counts["gold"] / max(1, counts["quoted"]),
            "abstain_answerable": counts["abstain_answerable"] / counts["answerable"],
            "abstain_unanswerable": counts["abstain_unanswerable"] / counts["unanswerable"],
            "ms_per_answer": elapsed * 1000 / len(rows)}


def main() -> None:
    folder = EVAL_DIR / "clapnq_rag_dev"
    texts = chunks(read_jsonl(folder / "corpus.jsonl"))
    rows = read_jsonl(folder / "answers.jsonl")
    embedder = get_embedder()
    started = time.perf_counter()
    plain = embedder.embed(texts)
    plain_seconds = time.perf_counter() - started
    started = time.perf_counter()
    chunk_vectors, packed = sentence_vectors.embed_chunks(embedder, texts)
    stored_seconds = time.perf_counter() - started
    stored = [sentence_vectors.unpack(blob) for blob in packed]
    print(f"# Extractive answer quality, ClapNQ dev (eval only) ({machine()})\n")
    print(f"{len(texts)} chunks; {sum(r['answerable'] for r in rows)} answerable and "
          f"{sum(not r['answerable'] for r in rows)} unanswerable questions; top {TOP_K} chunks per question.")
    print(f"Indexing the chunks: {plain_seconds:.1f} s embedding them alone, {stored_seconds:.1f} s with the "
          f"sentence vectors ({len(np.concatenate([list(s) for s in stored if s]))} stored).\n")
    print("| sentence vectors | gold hit | gold precision | abstains (answerable) | abstains (unanswerable) "
          "| answer ms (after retrieval) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, source in (("embedded at query time", None), ("stored at ingestion", stored)):
        result = evaluate(rows, texts, chunk_vectors if source else plain, source)
        print(f"| {name} | {result['hit']:.3f} | {result['precision']:.3f} | {result['abstain_answerable']:.3f} "
              f"| {result['abstain_unanswerable']:.3f} | {result['ms_per_answer']:.1f} |")


if __name__ == "__main__":
    main()
