"""Shapes of upload results and document/job status, and an upload's ACL groups. Never any document content."""

from __future__ import annotations

import re
from datetime import datetime
from enum import StrEnum
from typing import Annotated

from pydantic import AfterValidator, BaseModel, Field, field_validator

from core.errors import ErrorCode, GovragError
from core.text import DepartmentName, RequestModel
from guard.normalise import ShownText
from guard.placeholders import ENTITY_TYPE, document_placeholder

GROUP_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@/-]{0,127}$")
MAX_ACL_GROUPS = 256
MAX_KEYWORD_CHARS = 200  # a department classification keyword (a word or a phrase)
MAX_REINDEX_IDS = 10_000  # documents named in one re-index request


class Classification(StrEnum):
    public = "public"
    internal = "internal"
    confidential = "confidential"
    restricted = "restricted"

    @property
    def rank(self) -> int:
        """Order used to compare with a clearance."""
        return list(Classification).index(self)


def parse_acl_groups(values: list[str] | None) -> list[str]:
    """ACL groups from a repeated field and/or comma-separated values; each must be a plain group name."""
    groups = sorted({part.strip() for value in values or [] for part in value.split(",") if part.strip()})
    if any(not GROUP_PATTERN.match(group) for group in groups):
        raise GovragError(ErrorCode.invalid_request, "acl_groups: group names are letters, digits and ._:@/-")
    if len(groups) > MAX_ACL_GROUPS:  # every chunk's payload carries them, and every read re-checks them
        raise GovragError(ErrorCode.invalid_request, f"acl_groups: at most {MAX_ACL_GROUPS} groups per document")
    return groups


class UploadAccepted(BaseModel):
    document_id: str
    job_id: str


class ListedStatus(StrEnum):
    """The states a document listing may be filtered by (deleted documents are never listed)."""

    queued = "queued"
    processing = "processing"
    ready = "ready"
    failed = "failed"
    quarantined = "quarantined"
    rejected = "rejected"


class DocumentSummaryOut(BaseModel):
    """A document as a listing shows it: metadata only, never content. Text a person or a file chose (`ShownText`)
    is shown without the text hidden in it."""

    document_id: str
    department: str
    title: ShownText
    content_type: str
    size_bytes: int
    classification: str
    acl_groups: list[str]
    status: str
    error: ShownText | None
    duplicate_of: str | None = Field(description=(
        "for an e-mail's attachment refused as a duplicate: the id of the department's document that already has its "
        "content; null for any other document, and when that document is deleted or hidden from the caller (its ACL "
        "or level)"))
    chunk_count: int
    parent_id: str | None  # the e-mail this attachment came from
    created_at: datetime
    updated_at: datetime


class DocumentStatusOut(DocumentSummaryOut):
    """A document's status as GET /v1/documents/{id} shows it: the listing's fields and the classifier's findings."""

    declared_classification: str | None = None
    classification_reasons: list[ShownText] = Field(default_factory=list)
    flagged_chunks: int = 0
    review_reason: ShownText | None = None
    attachment_ids: list[str] = Field(default_factory=list)  # an e-mail's attachments, as child documents


class DocumentPage(BaseModel):
    """Up to `limit` documents, newest first; fewer (even none) where some are hidden from the caller. While
    `next_after` is set, pass it as `after` for the next page."""

    documents: list[DocumentSummaryOut]
    next_after: str | None


class JobStatusOut(BaseModel):
    job_id: str
    document_id: str
    status: str
    error: ShownText | None
    attempts: int
    created_at: datetime
    updated_at: datetime


class InjectionAction(StrEnum):
    exclude = "exclude"  # index the document without its instruction-like chunks
    quarantine = "quarantine"  # hold the whole document for review


class CustomRecognizerIn(RequestModel):
    """A department identifier to redact: regex plus an optional checksum (luhn, mod97, mod11)."""

    entity: str = Field(pattern=rf"^{ENTITY_TYPE}$")
    pattern: str = Field(min_length=2, max_length=300)
    checksum: str = "none"
    context: list[str] = Field(default_factory=list, max_length=20)
    score: float = Field(default=0.6, ge=0.1, le=1.0, strict=True)  # a number; a whole one is taken


class IngestionPolicyIn(RequestModel):
    """What a department lets the AI see and how ingestion treats risky content."""

    ai_max_level: Classification = Classification.confidential
    injection_action: InjectionAction = InjectionAction.exclude
    keywords: dict[str, Classification] = Field(default_factory=dict, max_length=500)
    allow_list: list[str] = Field(default_factory=list, max_length=1000)
    recognizers: list[CustomRecognizerIn] = Field(default_factory=list, max_length=50)
    # keep placeholder → original (sealed); only `reveal` holders may read it. true or false, never "yes" or 1
    reversible: bool = Field(default=False, strict=True)

    @field_validator("keywords")
    @classmethod
    def _keywords_have_words(cls, keywords: dict[str, Classification]) -> dict[str, Classification]:
        """A keyword without a letter or digit (blank, punctuation, invisible characters) would match at every word
        boundary and raise every document of the department."""
        if any(not any(ch.isalnum() for ch in keyword) or len(keyword) > MAX_KEYWORD_CHARS for keyword in keywords):
            raise ValueError(f"keywords: each needs a letter or digit, and at most {MAX_KEYWORD_CHARS} characters")
        return keywords


class IngestionPolicyOut(IngestionPolicyIn):
    department: str


class QuarantinedOut(BaseModel):
    """A document held for review: metadata and the reason, never content."""

    document_id: str
    department: str
    title: ShownText
    classification: str
    declared_classification: str | None
    reasons: list[ShownText]
    flagged_chunks: int
    review_reason: ShownText | None
    uploaded_by: str
    created_at: datetime


class ReviewDecision(BaseModel):
    document_id: str
    status: str
    job_id: str | None = None


class ReindexIn(RequestModel):
    department: DepartmentName
    # omitted: all; empty: a 422, not all; more than the maximum: a 422 (send them in several requests)
    document_ids: list[str] | None = Field(default=None, min_length=1, max_length=MAX_REINDEX_IDS)
    # false (after a rule that may tighten what is shown): the documents stop being served until their runs end
    # ready, and a failed run leaves them failed; true (chunk size, model): the previous index is served meanwhile.
    # true or false, never "yes" or 1
    serve_previous: bool = Field(default=False, strict=True)


class ReindexOut(BaseModel):
    queued: list[str]  # job ids to follow: a new one per ready or quarantined document and per failed one named, the
    # running one per document in flight
    # document ids not re-indexed: those named that it does not cover, and any it listed that left the states it
    # covers before it queued them (deleted meanwhile; department-wide, a run ending failed): quarantine.queue_reindex
    skipped: list[str] = []


def _shown_placeholder(value: str) -> str:
    """A placeholder as an answer shows it (`document_placeholder`; anything else is a 422), kept as written."""
    document_placeholder(value)
    return value


class RevealIn(RequestModel):
    # `<PERSON_1>`, or `<PERSON_1·2>` as copied from an answer citing several documents (send it to citation [2]'s)
    placeholders: list[Annotated[str, AfterValidator(_shown_placeholder)]] = Field(min_length=1, max_length=100)


class RevealOut(BaseModel):
    document_id: str
    values: dict[str, ShownText]  # each placeholder as sent → original; those the document does not hold are left out
