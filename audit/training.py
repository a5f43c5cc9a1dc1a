"""Redacted training-data export: the sealed (already redacted) chunks queries may cite, never originals: those of
the index generation each served document serves (`ingestion.repository.SERVED`, `ingestion.service.is_served`), so
a document being re-indexed with `serve_previous` is exported from its previous index, and a withheld one not."""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from sqlalchemy.orm import Session

from core import crypto
from core.keystore import DocumentKey, KeyState, keystore_for
from core.models import Document, utcnow
from core.settings import Settings
from ingestion import service as ingestion_service
from ingestion.pipeline import chunk_context, chunk_id
from retrieval.store import open_vector_store

logger = logging.getLogger(__name__)


def department_payloads(settings: Settings, department: str) -> list[dict[str, Any]]:
    """Every chunk payload of `department`, in document and chunk order (read before the export is recorded, so an
    unavailable store fails the export before the ledger says it happened)."""
    return sorted(open_vector_store(settings).scroll_payloads(department),
                  key=lambda p: (str(p.get("document_id")), int(p.get("chunk_index", 0))))


@dataclass(frozen=True)
class ExportSource:
    """A served document the training export takes: its data key, and the payloads of its chunks queries may cite."""

    document: Document
    key: DocumentKey
    payloads: list[dict[str, Any]]


def export_sources(*, session: Session, settings: Settings, department: str,
                   payloads: list[dict[str, Any]]) -> list[ExportSource]:
    """The documents `department` serves with chunks (of `payloads`, in document order) that queries may cite, and
    their data keys: read before the export is recorded, so a department key that does not open
    (DepartmentKeyUnreadable: no document's damage) fails the export before the ledger says it happened. A key is
    32 bytes a document, beside payloads `department_payloads` already holds."""
    served = ingestion_service.served_in_department(session=session, department=department)
    keystore = keystore_for(settings)
    sources = []
    for document_id, chunks in itertools.groupby(payloads, key=lambda p: str(p.get("document_id"))):
        document = served.get(document_id)
        if document is None:
            continue  # not served (deleted, quarantined, failed, withheld, not yet ingested)
        cited = [payload for payload in chunks if ingestion_service.is_served(document, payload)]  # its generation's
        if cited:
            key = keystore.document_key(session=session, department=document.department, document_id=document.id)
            sources.append(ExportSource(document=document, key=key, payloads=cited))
    return sources


def training_rows(sources: list[ExportSource], unreadable: set[str] | None = None) -> Iterator[dict[str, Any]]:
    """One row per chunk of `sources`, text as redacted at ingestion. A document whose key row or one of whose chunks
    no longer opens (altered in the database or the vector store) is left out whole, as queries leave it out, and its
    id added to `unreadable` (the manifest lists them): never an export cut off at it."""
    for source in sources:
        rows = _document_rows(source)
        if rows is None:
            logger.warning("the data key or a chunk of document %s does not open: left out of the training export",
                           source.document.id)
            if unreadable is not None:
                unreadable.add(source.document.id)
            continue
        yield from rows


def _document_rows(source: ExportSource) -> list[dict[str, Any]] | None:
    """The document's rows, every chunk opened before any is returned: None if its key row or a chunk does not open;
    none once its key is shredded. One document's rows are held at a time: no chunk cap bounds them (the upload and
    parse limits do), but they are smaller than its payloads, which `department_payloads` already holds (about 1.3 kB
    a chunk against 1.6 kB, measured at 20,000 chunks of 1,000 characters)."""
    document, found = source.document, source.key
    if found.state is KeyState.unreadable:
        return None
    if found.key is None:
        return []  # crypto-shredded
    key, run = found.key, ingestion_service.served_run(document)
    rows = []
    for payload in source.payloads:
        index, level = int(payload["chunk_index"]), str(payload["classification"])
        context = chunk_context(document.id, index, level, str(payload.get("scanned_by", "")), run)
        try:
            text = crypto.open_text(key, str(payload["sealed_text"]), context)
        except crypto.DecryptionError:  # the payload altered: its ciphertext, level or place
            return None
        rows.append({"department": document.department, "document_id": document.id, "title": document.title,
                     "classification": level, "chunk_id": chunk_id(document.id, index), "chunk_index": index,
                     "text": text})
    return rows


def render_jsonl(rows: Iterator[dict[str, Any]], *, department: str,
                 unreadable: set[str] | None = None) -> Iterator[str]:
    """JSON lines, then a manifest line: row count, documents, sha256 of the body, and the documents left out because
    they no longer open (`unreadable`, filled as `rows` is read)."""
    body, count, documents = hashlib.sha256(), 0, set()
    for row in rows:
        line = json.dumps(row, ensure_ascii=False) + "\n"
        body.update(line.encode())
        count += 1
        documents.add(row["document_id"])
        yield line
    manifest = {"rows": count, "documents": len(documents), "department": department, "redacted": True,
                "body_sha256": body.hexdigest(), "generated_at": utcnow().isoformat(),
                "unreadable_documents": sorted(unreadable or ())}
    yield json.dumps({"manifest": manifest}, sort_keys=True) + "\n"
