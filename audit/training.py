"""Redacted training-data export: the sealed (already redacted) chunks queries may cite, never originals: those of
the index generation each served document serves (`ingestion.repository.SERVED`, `ingestion.service.is_served`), so
a document being re-indexed with `serve_previous` is exported from its previous index, and a withheld one not."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from typing import Any

from sqlalchemy.orm import Session

from core import crypto
from core.keystore import keystore_for
from core.models import utcnow
from core.settings import Settings
from ingestion import service as ingestion_service
from ingestion.pipeline import chunk_context
from retrieval.store import open_vector_store


def department_payloads(settings: Settings, department: str) -> list[dict[str, Any]]:
    """Every chunk payload of `department`, in document and chunk order (read before the export is recorded, so an
    unavailable store fails the export before the ledger says it happened)."""
    return sorted(open_vector_store(settings).scroll_payloads(department),
                  key=lambda p: (str(p.get("document_id")), int(p.get("chunk_index", 0))))


def training_rows(*, session: Session, settings: Settings, department: str,
                  payloads: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """One row per chunk (of `payloads`) that queries may cite, of the documents `department` serves, text as
    redacted at ingestion."""
    served = ingestion_service.served_in_department(session=session, department=department)
    keystore = keystore_for(settings)
    for payload in payloads:
        document = served.get(str(payload.get("document_id")))
        if document is None or not ingestion_service.is_served(document, payload):
            continue  # not served (deleted, quarantined, failed, withheld, not yet ingested) or not this generation
        key = keystore.document_key(session=session, department=department, document_id=document.id)
        if key is None:
            continue  # crypto-shredded
        index, level = int(payload["chunk_index"]), str(payload["classification"])
        context = chunk_context(document.id, index, level, str(payload.get("scanned_by", "")))
        text = crypto.open_text(key, str(payload["sealed_text"]), context)
        yield {"department": department, "document_id": document.id, "title": document.title,
               "classification": level, "chunk_id": str(payload["chunk_id"]),
               "chunk_index": index, "text": text}


def render_jsonl(rows: Iterator[dict[str, Any]], *, department: str) -> Iterator[str]:
    """JSON lines, then a manifest line: row count, documents, sha256 of the body."""
    body, count, documents = hashlib.sha256(), 0, set()
    for row in rows:
        line = json.dumps(row, ensure_ascii=False) + "\n"
        body.update(line.encode())
        count += 1
        documents.add(row["document_id"])
        yield line
    manifest = {"rows": count, "documents": len(documents), "department": department, "redacted": True,
                "body_sha256": body.hexdigest(), "generated_at": utcnow().isoformat()}
    yield json.dumps({"manifest": manifest}, sort_keys=True) + "\n"
