"""Ingestion throughput: (a) embed-only vs (b) the full governed pipeline, in the same run, on the enterprise docs
and on a generated corpus. Prints documents/s, KB/s, the ratio (goal: full ≥ 0.6× embed-only) and where the
time goes (parse, pii, scan, embed, encrypt, upsert).

(a) embeds the chunk texts of already-parsed documents (what an ungoverned RAG pipeline must do at least);
(b) runs ingestion.pipeline.protect on the raw bytes (sniff, parse, chunk, redact, classify, scan, embed, seal)
and upserts into an embedded vector store in a temporary directory, whose department shard (with its payload
indexes) is created before the timed run, as a department's is once, when its first document arrives. (b) runs in
two shapes: GOVRAG_INGEST_CONCURRENCY worker processes (default: the number of cores), as `govrag worker` runs
documents, so one document's PII detection (one core) overlaps another's embedding; and one document at a time,
as the embedded default's in-process worker runs them.
Usage: .venv/bin/python bench/ingest.py [--generated N] [--repeat N]
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import random
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import EVAL_DIR, machine  # noqa: E402
from core import crypto  # noqa: E402
from core.errors import GovragError  # noqa: E402
from core.settings import Settings, get_settings  # noqa: E402
from guard.injection import get_scanner  # noqa: E402
from guard.pii import get_redactor  # noqa: E402
from ingestion.chunk import chunk_sections  # noqa: E402
from ingestion.parse import parse_document  # noqa: E402
from ingestion.pipeline import DocumentFacts, Protected, protect  # noqa: E402
from ingestion.schemas import Classification  # noqa: E402
from ingestion.sniff import sniff_content_type  # noqa: E402
from retrieval.embeddings import get_embedder  # noqa: E402
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
    embedder = get_embedder(get_settings().embedding_backend)
    started = time.perf_counter()
    embedder.embed(texts)
    return time.perf_counter() - started


SHAPES = ("worker processes", "one at a time")


def full_pipeline(docs: list[tuple[str, bytes]], shape: str,
                  in_flight: int) -> tuple[float, dict[str, float], float]:
    """Seconds for sniff → protect → upsert of every document, the seconds per stage (added up over the
    documents), and the one-off seconds to create the department's shard (its payload indexes), which happens once
    per department, before the timed run.

    `shape` is how a worker runs documents: `in_flight` worker processes, each with its own models, as
    `govrag worker` does (its store is then a server; here this process upserts what they return), or one at a
    time, as the in-process worker of the embedded default does."""
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(data_dir=Path(tmp))
        store = open_vector_store(settings)
        shard_started = time.perf_counter()
        store.upsert(DEPARTMENT, _protected(("first.txt", b"a department's first document")).points)
        shard_seconds = time.perf_counter() - shard_started
        with _runner(shape, in_flight) as run:
            started = time.perf_counter()
            per_document = []
            for result in run(_protected, docs):
                upsert_started = time.perf_counter()
                store.upsert(DEPARTMENT, result.points)
                per_document.append({**result.stage_seconds, "upsert": time.perf_counter() - upsert_started})
            elapsed = time.perf_counter() - started
        close_vector_store(settings)
    stages = {stage: sum(seconds.get(stage, 0.0) for seconds in per_document) for stage in per_document[0]}
    return elapsed, stages, shard_seconds


@contextlib.contextmanager
def _runner(shape: str, in_flight: int) -> Iterator[Callable[..., Iterator[Protected]]]:
    """A `map` running documents in the given shape, its workers started and their models loaded."""
    if shape == "one at a time":
        yield map
    else:
        context = multiprocessing.get_context("spawn")
        warmed = context.Barrier(in_flight + 1)
        with context.Pool(in_flight, initializer=_warm_worker, initargs=(warmed,)) as processes:
            warmed.wait()
            yield processes.imap


def _warm_worker(warmed: threading.Barrier) -> None:
    """A worker process's start: load its models, then report ready."""
    warm_models()
    warmed.wait()


def _protected(named: tuple[str, bytes]) -> Protected:
    name, data = named
    facts = DocumentFacts(document_id=str(uuid.uuid4()), department=DEPARTMENT, title=name,
                          content_type=sniff_content_type(data, name), acl_groups=(),
                          classification=Classification.internal, approved_level=Classification.restricted)
    return protect(data, facts, key=crypto.new_key(), embedder=get_embedder(get_settings().embedding_backend),
                   redactor=get_redactor(), max_chars=MAX_CHARS, scanner=get_scanner())


def report(label: str, docs: list[tuple[str, bytes]], in_flight: int, repeat: int) -> None:
    """Run embed-only and the full pipeline in each shape on one corpus, `repeat` times in turn, and print the
    fastest run of each (a shared machine only ever slows a run down)."""
    kilobytes = sum(len(d) for _, d in docs) / 1024
    rounds = [(embed_only(docs), [(shape, *full_pipeline(docs, shape, in_flight)) for shape in SHAPES])
              for _ in range(repeat)]
    embed_seconds = min(seconds for seconds, _ in rounds)
    runs = [min((runs[i] for _, runs in rounds), key=lambda run: run[1]) for i in range(len(SHAPES))]
    print(f"\n{label}: {len(docs)} documents, {kilobytes:.0f} KB (fastest of {repeat} runs each)")
    print(f"  {'(a) embed-only':<30} {embed_seconds:7.1f} s  {len(docs) / embed_seconds:7.2f} docs/s  "
          f"{kilobytes / embed_seconds:8.1f} KB/s")
    for shape, seconds, _, _ in runs:
        print(f"  {'(b) full, ' + shape:<30} {seconds:7.1f} s  {len(docs) / seconds:7.2f} docs/s  "
              f"{kilobytes / seconds:8.1f} KB/s   ratio to (a) {embed_seconds / seconds:.2f}x (goal >= 0.6x)")
    _, _, stages, shard_seconds = runs[-1]
    total = sum(stages.values())
    print("  where one document at a time spends its time: " + ", ".join(
        f"{stage} {seconds:.1f}s ({100 * seconds / total:.0f}%)" for stage, seconds in stages.items()))
    print(f"  (not timed: creating the department's shard and payload indexes, once per department: "
          f"{shard_seconds:.1f} s)")


def warm_models() -> None:
    """Load every model the pipeline uses, so no run pays for loading them."""
    get_redactor().redact("warm up Maria Gonzalez")
    get_embedder(get_settings().embedding_backend).embed(["warm up"])
    get_scanner().score("warm up")
    parse_document(b"warm up", "text/plain")


def main(argv: list[str] | None = None) -> int:
    """Warm the models, then measure both corpora."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--generated", type=int, default=60, help="generated documents (default 60)")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each measurement; the fastest is kept")
    args = parser.parse_args(argv)
    print(machine())
    in_flight = get_settings().ingest_concurrency
    print(f"(b) runs GOVRAG_INGEST_CONCURRENCY={in_flight} documents at once in worker processes, as `govrag worker` "
          f"does, then one at a time, as the embedded default's in-process worker does")
    warm_models()
    report("enterprise docs (those that parse)", enterprise_corpus(), in_flight, args.repeat)
    report("generated memos", generated_corpus(args.generated), in_flight, args.repeat)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
