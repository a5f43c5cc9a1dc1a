"""Redacted training-data export: the sealed (already redacted) chunks queries may cite, never originals: those of
the index generation each served document serves (`ingestion.repository.SERVED`, `ingestion.service.is_served`), so
a document being re-indexed with `serve_previous` is exported from its previous index, and a withheld one not."""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
from collections.abc import Iterator
from typing import Any

from sqlalchemy.orm import Session

from core import crypto
from core.keystore import DocumentKeyUnreadable, KeyStore, keystore_for
from core.models import Document, utcnow
from core.settings import Settings
from ingestion import service as ingestion_service
from ingestion.pipeline import chunk_context
from retrieval.store import open_vector_store

logger = logging.getLogger(__name__)


def department_payloads(settings: Settings, department: str) -> list[dict[str, Any]]:
    """Every chunk payload of `department`, in document and chunk order (read before the export is recorded, so an
    unavailable store fails the export before the ledger says it happened)."""
    return sorted(open_vector_store(settings).scroll_payloads(department),
                  key=lambda p: (str(p.get("document_id")), int(p.get("chunk_index", 0))))


def training_rows(*, session: Session, settings: Settings, department: str, payloads: list[dict[str, Any]],
                  unreadable: set[str] | None = None) -> Iterator[dict[str, Any]]:
    """One row per chunk (of `payloads`, in document order) that queries may cite, of the documents `department`
    serves, text as redacted at ingestion. A document whose key row or one of whose chunks no longer opens (altered in
    the database or the vector store) is left out whole, as queries leave it out, and its id added to `unreadable`
    (the manifest lists them): never an export cut off at it."""
    served = ingestion_service.served_in_department(session=session, department=department)
    keystore = keystore_for(settings)
    for document_id, chunks in itertools.groupby(payloads, key=lambda p: str(p.get("document_id"))):
        document = served.get(document_id)
        if document is None:
            continue  # not served (deleted, quarantined, failed, withheld, not yet ingested)
        cited = [payload for payload in chunks if ingestion_service.is_served(document, payload)]  # its generation's
        rows = _document_rows(session, keystore, document, cited)
        if rows is None:
            logger.warning("the data key or a chunk of document %s does not open: left out of the training export",
                           document.id)
            if unreadable is not None:
                unreadable.add(document.id)
            continue
        yield from rows


def _document_rows(session: Session, keystore: KeyStore, document: Document,
                   payloads: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
    """The document's rows, every chunk opened before any is returned: None if its key row or a chunk does not open
    (a department key that does not open is no document's damage: it fails the export); none once its key is
    shredded. One document's rows are held at a time: no chunk cap bounds them (the upload and parse limits do), but
    they are smaller than its payloads, which `department_payloads` already holds (about 1.3 kB a chunk against
    1.6 kB, measured at 20,000 chunks of 1,000 characters)."""
    if not payloads:
        return []
    try:
        key = keystore.document_key(session=session, department=document.department, document_id=document.id)
    except DocumentKeyUnreadable:
        return None
    if key is None:
        return []  # crypto-shredded
    rows = []
    for payload in payloads:
        index, level = int(payload["chunk_index"]), str(payload["classification"])
        context = chunk_context(document.id, index, level, str(payload.get("scanned_by", "")))
        try:
            text = crypto.open_text(key, str(payload["sealed_text"]), context)
        except crypto.DecryptionError:  # the payload altered: its ciphertext, level or place
            return None
        rows.append({"department": document.department, "document_id": document.id, "title": document.title,
                     "classification": level, "chunk_id": str(payload["chunk_id"]), "chunk_index": index,
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
