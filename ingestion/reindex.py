"""Re-indexes an admin or an operator asks for, each queued and audited as one (`POST /v1/admin/reindex`, `govrag
reindex`), and the served documents whose index this release would write differently: chunks or a placeholder map
sealed before their contexts bound the run (migrations 0020 and 0021: until a re-index, an earlier generation's chunk
or map can stand in for the served one's), or passed by another injection scanner than this one (scanned again at
query time, in every process after each start, until a re-index stamps them). No release rewrites either; a re-index
does."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy.orm import Session

from audit import service as audit_service
from audit.schemas import AdminEventType
from authz.identity import Identity
from core.models import UNFINISHED, Document
from core.settings import Settings
from guard.injection import get_scanner
from ingestion import quarantine
from ingestion import service as ingestion_service
from retrieval.store import GENERATION, open_vector_store

# What a stale-scan check reads of each chunk's payload (never its sealed text nor its sentence vectors)
_SCAN_FIELDS = ("document_id", GENERATION, "scanned_by")


def queue_audited(*, session: Session, settings: Settings, identity: Identity, department: str,
                  document_ids: list[str] | None, serve_previous: bool,
                  selection: list[str] | None = None) -> quarantine.Reindex:
    """Queue the re-index (`quarantine.queue_reindex`) and record it in the ledger in the same commit (the event
    commits the session): the documents, the skipped, `serve_previous` and, for an operator's bulk re-index, what
    chose the documents (`selection`). The new jobs are the caller's to send once this returns."""
    reindex = quarantine.queue_reindex(session=session, settings=settings, department=department,
                                       document_ids=document_ids, serve_previous=serve_previous)
    details: dict[str, object] = {"documents": len(reindex.queued) + len(reindex.rerun),
                                  "skipped": len(reindex.skipped), "serve_previous": serve_previous}
    if selection is not None:
        details["selection"] = selection
    audit_service.record_admin_event(session=session, identity=identity, event_type=AdminEventType.reindex,
                                     department=department, settings=settings, details=details)
    return reindex


@dataclass(frozen=True)
class Outdated:
    """A department's served documents, by id, whose index this release would write differently: sealed before 0020
    or 0021 (`unbound`: `_unbound`), passed by another scanner than this one (`stale_scan`); and its served documents
    being ingested (`being_ingested`, outdated or not)."""

    unbound: frozenset[str]
    stale_scan: frozenset[str]
    being_ingested: frozenset[str]

    @property
    def pending(self) -> frozenset[str]:
        """The outdated documents being ingested: their run writes them anew, so no other job is queued for them."""
        return (self.unbound | self.stale_scan) & self.being_ingested

    def to_queue(self) -> list[str]:
        """The ids to re-index: outdated and not being ingested."""
        return sorted((self.unbound | self.stale_scan) - self.being_ingested)


def outdated(*, session: Session, settings: Settings, department: str, unbound: bool, stale_scan: bool) -> Outdated:
    """The department's served documents outdated in the ways asked for (`Outdated`). The stale-scan check reads the
    vector store: beside a `govrag serve` holding the embedded store it is EmbeddedStoreHeld."""
    served = ingestion_service.served_in_department(session=session, department=department)
    found_unbound = frozenset(i for i, document in served.items() if unbound and _unbound(document))
    found_stale = frozenset(_scanned_by_another(settings, department, served) if stale_scan else ())
    return Outdated(unbound=found_unbound, stale_scan=found_stale,
                    being_ingested=frozenset(i for i, document in served.items() if document.status in UNFINISHED))


def _unbound(document: Document) -> bool:
    """The served generation's chunks were sealed before 0020 (`served_run`: under the context naming no run), or its
    placeholder map before 0021 (`Document.maps_unbound_through`: under the one naming the document only). Read from
    the database alone: whether the generation kept a map at all is not looked up, a re-index binds both."""
    generation = document.served_generation
    return (ingestion_service.served_run(document) is None
            or (generation is not None and generation <= document.maps_unbound_through))


def _scanned_by_another(settings: Settings, department: str, served: dict[str, Document]) -> set[str]:
    """The served documents with a chunk of their served generation that another scanner version passed (or none:
    a chunk sealed before scanning was recorded)."""
    version = get_scanner().version
    payloads = open_vector_store(settings).iter_payloads(department, fields=_SCAN_FIELDS)  # a page held at a time
    return {document.id for payload in payloads
            if (document := served.get(str(payload.get("document_id")))) is not None
            and ingestion_service.is_served(document, payload) and payload.get("scanned_by") != version}
