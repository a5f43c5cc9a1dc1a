"""Shapes of upload results and document/job status. Never any document content."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum

from pydantic import BaseModel


class Classification(StrEnum):
    public = "public"
    internal = "internal"
    confidential = "confidential"
    restricted = "restricted"

    @property
    def rank(self) -> int:
        """Order used to compare with a clearance."""
        return list(Classification).index(self)


class UploadAccepted(BaseModel):
    document_id: str
    job_id: str


class DocumentStatusOut(BaseModel):
    document_id: str
    department: str
    title: str
    content_type: str
    size_bytes: int
    classification: str
    acl_groups: list[str]
    status: str
    error: str | None
    chunk_count: int
    created_at: datetime
    updated_at: datetime


class JobStatusOut(BaseModel):
    job_id: str
    document_id: str
    status: str
    error: str | None
    attempts: int
    created_at: datetime
    updated_at: datetime
