"""The ingestion pipeline as a plain function: raw bytes in, protected vector points (or a review reason) out."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

from core import crypto
from guard.injection import InjectionScanner
from guard.pii import REDACTED_ENTITIES, Numbering, PiiRedactor, PlaceholderMap
from guard.pii_rules import RedactionRules
from ingestion.chunk import Chunk, chunk_sections
from ingestion.classify import Verdict, classify_chunks, with_title_pii
from ingestion.parse import ParseLimits, parse_document
from ingestion.schemas import Classification
from retrieval import sentence_vectors
from retrieval.embeddings import TextEmbedder
from retrieval.store import GENERATION, VectorPoint


@dataclass(frozen=True)
class DocumentFacts:
    """What the pipeline needs to know about the document besides its bytes."""

    document_id: str
    department: str
    title: str
    content_type: str
    acl_groups: tuple[str, ...]
    classification: Classification  # as declared by the uploader: the floor
    approved_level: Classification | None = None  # an admin released it from quarantine at this level: up to it,
    # the gate is passed; a run that finds it higher holds it for review again
    generation: int = 0  # the run's index generation: its points stand beside the served ones until it ends ready
    maps_unbound_through: int = 0  # the earlier generations whose placeholder maps name no run (core/blobs.py)


@dataclass(frozen=True)
class IngestionRules:
    """A department's ingestion policy as the pipeline needs it."""

    ai_max_level: Classification = Classification.confidential
    injection_action: str = "exclude"  # exclude | quarantine
    keywords: dict[str, str] = field(default_factory=dict)
    redaction: RedactionRules = field(default_factory=RedactionRules)
    reversible: bool = False  # keep placeholder → original, sealed under the document key


@dataclass(frozen=True)
class Protected:
    """The pipeline's result: sealed points to index, or a reason to hold the document for review."""

    points: list[VectorPoint]
    verdict: Verdict
    flagged: tuple[int, ...]  # chunk indices with instruction-like text
    review_reason: str | None  # set: quarantine, index nothing
    stage_seconds: dict[str, float]
    numbering: Numbering = field(default_factory=Numbering)  # this run's placeholders (raw PII: seal them)

    def __repr__(self) -> str:
        # Never show the placeholder values: they are raw PII.
        return f"Protected(points={len(self.points)}, level={self.verdict.level}, flagged={self.flagged})"


def protect(data: bytes, facts: DocumentFacts, *, key: bytes, embedder: TextEmbedder, redactor: PiiRedactor,
            max_chars: int, rules: IngestionRules | None = None, scanner: InjectionScanner | None = None,
            limits: ParseLimits | None = None, previous_numbering: Numbering | None = None) -> Protected:
    """Parse, chunk, redact, classify, scan, then embed the redacted text and seal it: nothing is plaintext. With
    `previous_numbering` (the placeholders an earlier run of the document kept), a value it numbered keeps its
    placeholder and a new one is numbered after the highest ever minted; the counts, the level and the numbering
    returned are this run's values alone."""
    rules = rules or IngestionRules()
    clock = _Stopwatch()
    chunks = chunk_sections(parse_document(data, facts.content_type, limits), max_chars=max_chars)
    clock.lap("parse")
    texts = [chunk.text for chunk in chunks]
    placeholders = PlaceholderMap(previous_numbering)
    redacted = redactor.redact_many(texts, placeholders, rules.redaction)
    clock.lap("pii")
    pii_counts = with_title_pii(placeholders.counts(), facts.title, [*REDACTED_ENTITIES, *rules.redaction.entities])
    verdict = classify_chunks(declared=facts.classification, texts=texts, redacted=redacted,
                              pii_counts=pii_counts, placeholders=placeholders.mapping().keys(),
                              keywords=rules.keywords, title=facts.title)
    flagged = () if scanner is None else tuple(
        c.index for c, scan in zip(chunks, scanner.scan_many(redacted), strict=True) if scan.flagged)
    clock.lap("scan")
    reason = review_reason(verdict, flagged, rules, approved_level=facts.approved_level)
    if reason is not None:
        return Protected(points=[], verdict=verdict, flagged=flagged, review_reason=reason,
                         stage_seconds=clock.laps, numbering=placeholders.numbering())
    kept = [(c, t) for c, t in zip(chunks, redacted, strict=True) if c.index not in set(flagged)]
    vectors, sentences = sentence_vectors.embed_chunks(embedder, [text for _, text in kept])
    clock.lap("embed")
    points = [
        VectorPoint(document_id=facts.document_id, chunk_index=chunk.index, vector=vector.tolist(),
                    payload=_payload(facts, chunk, key, text, packed, verdict.chunk_level(chunk.index),
                                     scanner.version if scanner is not None else ""))
        for (chunk, text), vector, packed in zip(kept, vectors, sentences, strict=True)
    ]
    clock.lap("encrypt")
    return Protected(points=points, verdict=verdict, flagged=flagged, review_reason=None,
                     stage_seconds=clock.laps, numbering=placeholders.numbering())


def review_reason(verdict: Verdict, flagged: tuple[int, ...], rules: IngestionRules, *,
                  approved_level: Classification | None = None) -> str | None:
    """Why a document must wait for an admin (no document text), or None when AI use is approved: by the
    department's policy, or by an admin who released it at `approved_level` or higher."""
    reason = _policy_reason(verdict, flagged, rules)
    if reason is None or approved_level is None:
        return reason
    if verdict.level.rank <= approved_level.rank:
        return None
    return _level_reason(verdict, f"the level rose since its approval at {approved_level.value}")


def _policy_reason(verdict: Verdict, flagged: tuple[int, ...], rules: IngestionRules) -> str | None:
    """Why the department's policy holds a document for review, or None."""
    if verdict.level.rank > rules.ai_max_level.rank:
        return _level_reason(verdict, f"the department approves AI use up to {rules.ai_max_level.value}")
    if flagged and rules.injection_action == "quarantine":
        return f"instruction-like text aimed at a model in {len(flagged)} chunk(s)"
    return None


def _level_reason(verdict: Verdict, why_held: str) -> str:
    """A review reason for the document's level (what raised it, or the declared level), within 500 characters."""
    raised_by = "; ".join(verdict.reasons) or "declared level"
    return f"classified {verdict.level.value} ({raised_by}); {why_held}"[:500]


class _Stopwatch:
    """Seconds spent per pipeline stage (for the benchmark and the logs)."""

    def __init__(self) -> None:
        self.laps: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.laps[stage] = self.laps.get(stage, 0.0) + now - self._last
        self._last = now


def chunk_id(document_id: str, chunk_index: int) -> str:
    """The public id of a chunk, used in citations and audit rows."""
    return f"{document_id}:{chunk_index}"


@dataclass(frozen=True)
class IndexRun:
    """The run a chunk was sealed by, as its context binds it: its document's department and its index generation."""

    department: str
    generation: int


def chunk_context(document_id: str, chunk_index: int, classification: str, scanned_by: str,
                  run: IndexRun | None) -> str:
    """Associated data binding a sealed chunk to its place, its level, the scanner version that passed it and the
    run that sealed it: swapping ciphertexts, altering the level or scanner version in the vector store's payload (to
    slip past the search filter or the query-time scan), or copying an earlier generation's chunk (sealed before a
    re-index redacted more or raised its level) into the served generation's point makes it fail to open. The
    document's data key is the same for every generation, so the run must be in the context. `run` None: the context
    of chunks sealed before 0020, which named no run (`Document.unbound_through` says which generations those are)."""
    if run is None:
        return f"govrag:chunk:{chunk_id(document_id, chunk_index)}:{classification}:{scanned_by}"
    bound = [document_id, chunk_index, run.department, run.generation, classification, scanned_by]
    return f"govrag:chunk:v2:{json.dumps(bound)}"  # JSON: no field's text can pass for another's


def sentences_context(document_id: str, chunk_index: int, classification: str, scanned_by: str,
                      run: IndexRun | None) -> str:
    """Associated data for a chunk's sealed sentence vectors (never interchangeable with its text)."""
    return f"{chunk_context(document_id, chunk_index, classification, scanned_by, run)}:sentences"


def _payload(facts: DocumentFacts, chunk: Chunk, key: bytes, redacted_text: str, packed_sentences: bytes,
             level: Classification, scanned_by: str) -> dict[str, object]:
    context = (facts.document_id, chunk.index, level.value, scanned_by, IndexRun(facts.department, facts.generation))
    return {
        "document_id": facts.document_id,
        "chunk_id": chunk_id(facts.document_id, chunk.index),
        "chunk_index": chunk.index,
        GENERATION: facts.generation,
        "department": facts.department,
        "acl_groups": list(facts.acl_groups),
        "acl_scope": "groups" if facts.acl_groups else "open",  # a keyword: Qdrant Edge cannot match booleans
        "classification": level.value,
        "classification_rank": level.rank,
        "page": chunk.page,
        "scanned_by": scanned_by,
        "sealed_text": crypto.seal_text(key, redacted_text, chunk_context(*context)),
        "sealed_sentences": crypto.seal_blob(key, packed_sentences, sentences_context(*context)),
    }
