"""Query request and response."""

from __future__ import annotations

import re

from pydantic import BaseModel, Field, field_validator

from authz.schemas import DEPARTMENT_PATTERN
from core.text import RequestModel


class QueryRequest(RequestModel):
    question: str = Field(min_length=1, max_length=2000)
    departments: list[str] | None = Field(default=None, max_length=50)
    top_k: int | None = Field(default=None, ge=1, le=50)
    purpose: str | None = Field(default=None, max_length=200)

    @field_validator("question")
    @classmethod
    def _not_blank(cls, question: str) -> str:
        if not question.strip():
            raise ValueError("the question is blank")
        return question

    def department_names(self) -> list[str] | None:
        """Requested departments, de-duplicated; malformed names can never match a department."""
        if self.departments is None:
            return None
        pattern = re.compile(DEPARTMENT_PATTERN)
        return sorted({name for name in self.departments if pattern.match(name)})


class Citation(BaseModel):
    n: int
    document_id: str
    chunk_id: str
    title: str
    department: str
    snippet: str
    score: float


class QueryResponse(BaseModel):
    answer: str
    citations: list[Citation]
    refused: bool
    reason: str | None
    request_id: str
