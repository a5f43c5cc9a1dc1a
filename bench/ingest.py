"""Ingestion throughput: (a) embed-only vs (b) the full governed pipeline, in the same run, on the enterprise docs
and on a generated corpus. Prints documents/s, KB/s, the ratio (goal: full ≥ 0.6× embed-only) and where the
time goes (parse, pii, scan, embed, encrypt, upsert).

(a) embeds the chunk texts of already-parsed documents (what an ungoverned RAG pipeline must do at least);
(b) runs ingestion.pipeline.protect on the raw bytes (sniff, parse, chunk, redact, classify, scan, embed, seal)
and upserts into an embedded vector store in a temporary directory, whose department shard (with its payload
indexes) is created before the timed run, as a department's is once, when its first document arrives.
Usage: .venv/bin/python bench/ingest.py [--generated N]
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import EVAL_DIR, machine  # noqa: E402
from core import crypto  # noqa: E402
from core.errors import GovragError  # noqa: E402
from core.settings import Settings  # noqa: E402
from guard.injection import InjectionScanner, get_scanner  # noqa: E402
from guard.pii import PiiRedactor, get_redactor  # noqa: E402
from ingestion.chunk import chunk_sections  # noqa: E402
from ingestion.parse import parse_document  # noqa: E402
from ingestion.pipeline import DocumentFacts, Protected, protect  # noqa: E402
from ingestion.schemas import Classification  # noqa: E402
from ingestion.sniff import sniff_content_type  # noqa: E402
from retrieval.embeddings import TextEmbedder, get_embedder  # noqa: E402
from retrieval.store import close_vector_store, open_vector_store  # noqa: E402

MAX_CHARS = 1000
DEPARTMENT = "bench"
NAMES = ["Maria Gonzalez", "Liam O'Brien", "Aiko Tanaka", "Samuel Okafor", "Elena Petrova", "Jonas Berg"]
TOPICS = ["travel policy", "expense claims", "onboarding", "security training", "parental leave", "procurement"]


def generated_corpus(count: int, seed: int = 7) -> list[tuple[str, bytes]]:
    """Memo-like markdown documents (~3 KB) with headings, names, e-mails and phone numbers."""
    rng = random.Random(seed)
    docs = []
    for n in range(count):
        topic, person = rng.choice(TOPICS), rng.choice(NAMES)
        email = person.lower().replace(" ", ".").replace("'", "") + "@example.com"
        phone = f"+44 20 7946 {rng.randint(1000, 9999)}"
        paragraphs = [f"# {topic.title()} update {n}", f"Owner: {person}, {email}, {phone}"]
        for section in range(4):
            paragraphs.append(f"## Section {section + 1}")
            paragraphs.append(" ".join(
                f"The {topic} rules for team {rng.randint(1, 40)} change on day {rng.randint(1, 28)}; "
                f"questions go to {rng.choice(NAMES)} before the quarterly review." for _ in range(4)))
        docs.append((f"generated-{n}.md", "\n\n".join(paragraphs).encode()))
    return docs


def enterprise_corpus() -> list[tuple[str, bytes]]:
    """The enterprise docs that parse (the refused ones measure nothing here)."""
    folder = EVAL_DIR / "enterprise_docs_ingestion"
    docs = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = path.read_bytes()
        try:
            parse_document(data, sniff_content_type(data, path.name))
        except GovragError:
            continue
        docs.append((path.name, data))
    return docs


def embed_only(docs: list[tuple[str, bytes]]) -> float:
    """Seconds to embed every document's chunk texts (parsing done beforehand, not timed).

    The same embedder and chunk texts as the pipeline, sorted by length and sent in one call: full batches with
    the least padding, the cheapest way to embed them (an honest floor for the comparison).
    """
    texts = sorted((c.text for n, d in docs
                    for c in chunk_sections(parse_document(d, sniff_content_type(d, n)), max_chars=MAX_CHARS)), key=len)
    embedder = get_embedder(Settings().embedding_backend)
    started = time.perf_counter()
    embedder.embed(texts)
    return time.perf_counter() - started


def full_pipeline(docs: list[tuple[str, bytes]]) -> tuple[float, dict[str, float], float]:
    """Seconds for sniff → protect → upsert per document, the seconds per stage, and the one-off seconds to create
    the department's shard (its payload indexes), which happens once per department, before the timed run."""
    stages: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(data_dir=Path(tmp))
        store = open_vector_store(settings)
        embedder, redactor, scanner = get_embedder(settings.embedding_backend), get_redactor(), get_scanner()
        shard_started = time.perf_counter()
        store.upsert(DEPARTMENT, _protected(b"a department's first document", "first.txt", embedder, redactor,
                                            scanner).points)
        shard_seconds = time.perf_counter() - shard_started
        started = time.perf_counter()
        for name, data in docs:
            result = _protected(data, name, embedder, redactor, scanner)
            upsert_started = time.perf_counter()
            store.upsert(DEPARTMENT, result.points)
            stages["upsert"] = stages.get("upsert", 0.0) + time.perf_counter() - upsert_started
            for stage, seconds in result.stage_seconds.items():
                stages[stage] = stages.get(stage, 0.0) + seconds
        elapsed = time.perf_counter() - started
        close_vector_store(settings)
    return elapsed, stages, shard_seconds


def _protected(data: bytes, name: str, embedder: TextEmbedder, redactor: PiiRedactor,
               scanner: InjectionScanner) -> Protected:
    facts = DocumentFacts(document_id=str(uuid.uuid4()), department=DEPARTMENT, title=name,
                          content_type=sniff_content_type(data, name), acl_groups=(),
                          classification=Classification.internal, approved=True)
    return protect(data, facts, key=crypto.new_key(), embedder=embedder, redactor=redactor, max_chars=MAX_CHARS,
                   scanner=scanner)


def report(label: str, docs: list[tuple[str, bytes]]) -> None:
    """Run both modes on one corpus and print the figures."""
    kilobytes = sum(len(d) for _, d in docs) / 1024
    embed_seconds = embed_only(docs)
    full_seconds, stages, shard_seconds = full_pipeline(docs)
    print(f"\n{label}: {len(docs)} documents, {kilobytes:.0f} KB")
    for mode, seconds in (("(a) embed-only", embed_seconds), ("(b) full pipeline", full_seconds)):
        print(f"  {mode:<18} {seconds:7.1f} s  {len(docs) / seconds:7.2f} docs/s  {kilobytes / seconds:8.1f} KB/s")
    print(f"  ratio full / embed-only throughput: {embed_seconds / full_seconds:.2f}x (goal >= 0.6x)")
    total = sum(stages.values())
    print("  where the full pipeline's time goes: " + ", ".join(
        f"{stage} {seconds:.1f}s ({100 * seconds / total:.0f}%)" for stage, seconds in stages.items()))
    print(f"  (not timed: creating the department's shard and payload indexes, once per department: "
          f"{shard_seconds:.1f} s)")


def main(argv: list[str] | None = None) -> int:
    """Warm the models, then measure both corpora."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--generated", type=int, default=60, help="generated documents (default 60)")
    args = parser.parse_args(argv)
    print(machine())
    get_redactor().redact("warm up Maria Gonzalez")
    get_embedder(Settings().embedding_backend).embed(["warm up"])
    get_scanner().score("warm up")
    parse_document(b"warm up", "text/plain")
    report("enterprise docs (those that parse)", enterprise_corpus())
    report("generated memos", generated_corpus(args.generated))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
