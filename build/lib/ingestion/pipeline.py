"""The ingestion pipeline as a plain function: raw bytes in, protected vector points out."""

from __future__ import annotations

from dataclasses import dataclass

from core import crypto
from guard.pii import PiiRedactor, PlaceholderMap
from ingestion.chunk import Chunk, chunk_sections
from ingestion.parse import parse_document
from ingestion.schemas import Classification
from retrieval.embeddings import Embedder
from retrieval.store import VectorPoint


@dataclass(frozen=True)
class DocumentFacts:
    """What the pipeline needs to know about the document besides its bytes."""

    document_id: str
    department: str
    title: str
    content_type: str
    acl_groups: tuple[str, ...]
    classification: Classification


def protect(data: bytes, facts: DocumentFacts, *, key: bytes, embedder: Embedder, redactor: PiiRedactor,
            max_chars: int) -> list[VectorPoint]:
    """Parse, chunk, redact, embed the redacted text and seal it: nothing in the result is plaintext."""
    chunks = chunk_sections(parse_document(data, facts.content_type), max_chars=max_chars)
    redacted = redactor.redact_many([chunk.text for chunk in chunks], PlaceholderMap())
    vectors = embedder.embed(redacted)
    return [
        VectorPoint(document_id=facts.document_id, chunk_index=chunk.index, vector=vector.tolist(),
                    payload=_payload(facts, chunk, key, text))
        for chunk, text, vector in zip(chunks, redacted, vectors, strict=True)
    ]


def chunk_id(document_id: str, chunk_index: int) -> str:
    """The public id of a chunk, used in citations and audit rows."""
    return f"{document_id}:{chunk_index}"


def chunk_context(document_id: str, chunk_index: int) -> str:
    """Associated data binding a sealed chunk to its place: swapping ciphertexts fails to open."""
    return f"govrag:chunk:{chunk_id(document_id, chunk_index)}"


def _payload(facts: DocumentFacts, chunk: Chunk, key: bytes, redacted_text: str) -> dict[str, object]:
    return {
        "document_id": facts.document_id,
        "chunk_id": chunk_id(facts.document_id, chunk.index),
        "chunk_index": chunk.index,
        "department": facts.department,
        "acl_groups": list(facts.acl_groups),
        "acl_open": not facts.acl_groups,
        "classification": facts.classification.value,
        "classification_rank": facts.classification.rank,
        "page": chunk.page,
        "sealed_text": crypto.seal_text(key, redacted_text, chunk_context(facts.document_id, chunk.index)),
    }
