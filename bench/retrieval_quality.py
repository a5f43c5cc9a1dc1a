"""Retrieval quality with and without redaction: recall@10 / MRR@10 on ClapNQ, nDCG@10 on Cranfield.

Both datasets are eval-only (../shared/eval/README.md). Dense = all-MiniLM-L6-v2 through govrag's embedder and
vector store (Qdrant Edge); hybrid = dense + BM25 fused by reciprocal rank. Usage: python bench/retrieval_quality.py
"""

from __future__ import annotations

import math
import re
import sys
import tempfile
from collections import Counter, defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import EVAL_DIR, machine, read_jsonl  # noqa: E402
from guard.pii import PlaceholderMap, get_redactor  # noqa: E402
from retrieval.edge_store import EdgeVectorStore  # noqa: E402
from retrieval.embeddings import get_embedder  # noqa: E402
from retrieval.store import AccessFilter, VectorPoint  # noqa: E402

K = 10
RRF_K = 60
_TOKEN = re.compile(r"[a-z0-9]+")


def load_clapnq() -> tuple[dict[str, str], dict[str, str], dict[str, dict[str, int]]]:
    folder = EVAL_DIR / "clapnq_rag_dev"
    corpus = {row["_id"]: f"{row.get('title', '')}. {row['text']}" for row in read_jsonl(folder / "corpus.jsonl")}
    queries = {row["_id"]: row["text"] for row in read_jsonl(folder / "queries.jsonl") if row.get("answerable")}
    return corpus, queries, _qrels(folder / "qrels" / "dev.tsv")


def load_cranfield() -> tuple[dict[str, str], dict[str, str], dict[str, dict[str, int]]]:
    folder = EVAL_DIR / "cranfield_ir"
    corpus = {str(row["_id"]): f"{row.get('title', '')}. {row['text']}" for row in read_jsonl(folder / "corpus.jsonl")}
    queries = {str(row["_id"]): row["text"] for row in read_jsonl(folder / "queries.jsonl")}
    return corpus, queries, _qrels(folder / "qrels" / "test.tsv")


def _qrels(path: Path) -> dict[str, dict[str, int]]:
    judged: dict[str, dict[str, int]] = defaultdict(dict)
    for line in path.read_text().splitlines()[1:]:
        query_id, doc_id, score = line.split("\t")
        if int(score) > 0:
            judged[query_id][doc_id] = int(score)
    return judged


def dense_rankings(corpus: dict[str, str], queries: dict[str, str], root: Path) -> dict[str, list[str]]:
    """Top-K document ids per query through the real store with an open access filter."""
    embedder, store = get_embedder(), EdgeVectorStore(root, dimension=384)
    ids = list(corpus)
    vectors = embedder.embed([corpus[i] for i in ids])
    store.upsert("bench", [VectorPoint(document_id=doc_id, chunk_index=0, vector=vector.tolist(),
                                       payload={"document_id": doc_id, "acl_groups": [], "acl_scope": "open",
                                                "classification_rank": 0})
                           for doc_id, vector in zip(ids, vectors, strict=True)])
    query_ids = list(queries)
    query_vectors = embedder.embed([queries[q] for q in query_ids])
    access = AccessFilter(groups=(), max_classification_rank=0)
    rankings = {q: [str(hit.payload["document_id"]) for hit in store.search("bench", v.tolist(), access, K * 3)]
                for q, v in zip(query_ids, query_vectors, strict=True)}
    store.close()
    return rankings


def bm25_rankings(corpus: dict[str, str], queries: dict[str, str], k1: float = 1.2,
                  b: float = 0.75) -> dict[str, list[str]]:
    """Plain BM25 over lower-cased alphanumeric tokens."""
    docs = {doc_id: Counter(_TOKEN.findall(text.lower())) for doc_id, text in corpus.items()}
    lengths = {doc_id: sum(tf.values()) for doc_id, tf in docs.items()}
    average = sum(lengths.values()) / len(lengths)
    frequency = Counter(term for tf in docs.values() for term in tf)
    idf = {t: math.log(1 + (len(docs) - n + 0.5) / (n + 0.5)) for t, n in frequency.items()}
    rankings = {}
    for query_id, text in queries.items():
        terms = set(_TOKEN.findall(text.lower()))
        scores = {doc_id: sum(idf[t] * tf[t] * (k1 + 1) / (tf[t] + k1 * (1 - b + b * lengths[doc_id] / average))
                              for t in terms if t in tf) for doc_id, tf in docs.items()}
        rankings[query_id] = [d for d, s in sorted(scores.items(), key=lambda kv: -kv[1])[:K * 3] if s > 0]
    return rankings


def fuse(*rankings: dict[str, list[str]]) -> dict[str, list[str]]:
    """Reciprocal-rank fusion."""
    fused = {}
    for query_id in rankings[0]:
        scores: dict[str, float] = defaultdict(float)
        for ranking in rankings:
            for rank, doc_id in enumerate(ranking.get(query_id, [])):
                scores[doc_id] += 1 / (RRF_K + rank + 1)
        fused[query_id] = [d for d, _ in sorted(scores.items(), key=lambda kv: -kv[1])]
    return fused


def recall_mrr(rankings: dict[str, list[str]], qrels: dict[str, dict[str, int]]) -> tuple[float, float]:
    judged = [q for q in rankings if q in qrels]
    recall = sum(bool(set(rankings[q][:K]) & set(qrels[q])) for q in judged) / len(judged)
    mrr = sum(next((1 / (i + 1) for i, d in enumerate(rankings[q][:K]) if d in qrels[q]), 0.0)
              for q in judged) / len(judged)
    return recall, mrr


def ndcg(rankings: dict[str, list[str]], qrels: dict[str, dict[str, int]]) -> float:
    judged = [q for q in rankings if q in qrels]
    total = 0.0
    for q in judged:
        gains = [qrels[q].get(d, 0) for d in rankings[q][:K]]
        ideal = sorted(qrels[q].values(), reverse=True)[:K]
        dcg = sum((2 ** g - 1) / math.log2(i + 2) for i, g in enumerate(gains))
        idcg = sum((2 ** g - 1) / math.log2(i + 2) for i, g in enumerate(ideal))
        total += dcg / idcg if idcg else 0.0
    return total / len(judged)


def redact_corpus(corpus: dict[str, str]) -> dict[str, str]:
    """Each document redacted with its own placeholder map, as ingestion does."""
    redactor = get_redactor()
    return {doc_id: redactor.redact_many([text], PlaceholderMap())[0] for doc_id, text in corpus.items()}


def evaluate(name: str, loader, metric) -> list[str]:  # type: ignore[no-untyped-def]
    corpus, queries, qrels = loader()
    rows = []
    for variant, texts in (("plain", corpus), ("redacted", redact_corpus(corpus))):
        with tempfile.TemporaryDirectory() as root:
            dense = dense_rankings(texts, queries, Path(root))
        hybrid = fuse(dense, bm25_rankings(texts, queries))
        rows.append(f"| {name} | {variant} | {metric(dense)} | {metric(hybrid)} |")
    return rows


def main() -> None:
    print(f"# Retrieval quality ({machine()})\n")
    print("| dataset | corpus | dense | hybrid (dense+BM25, RRF) |\n| --- | --- | --- | --- |")
    for row in evaluate("ClapNQ dev (answerable, 300 q)", load_clapnq,
                        lambda r: "recall@10 {:.3f} · MRR@10 {:.3f}".format(*recall_mrr(r, load_clapnq()[2]))):
        print(row)
    for row in evaluate("Cranfield (225 q, graded)", load_cranfield,
                        lambda r: f"nDCG@10 {ndcg(r, load_cranfield()[2]):.3f}"):
        print(row)


if __name__ == "__main__":
    main()
