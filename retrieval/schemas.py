"""Query request and response."""

from __future__ import annotations

from pydantic import BaseModel, Field, field_validator

from core.text import DepartmentName, RequestModel
from guard.normalise import ShownText, strip_invisible


class QueryRequest(RequestModel):
    question: str = Field(min_length=1, max_length=2000)
    departments: list[DepartmentName] | None = Field(default=None, max_length=50)
    top_k: int | None = Field(default=None, ge=1, le=50, strict=True)  # `true`, "5", 2.0: a client bug
    purpose: str | None = Field(default=None, max_length=200)

    @field_validator("question")
    @classmethod
    def _holds_a_word(cls, question: str) -> str:
        """A question with no letter or digit in any script once invisible characters are dropped (blank, `?`,
        `...`, a lone U+200B) asks nothing: refused here, before the prompt firewall would count it as an attack."""
        if not any(ch.isalnum() for ch in strip_invisible(question)):
            raise ValueError("the question holds no words (it needs at least one letter or digit)")
        return question

    def department_names(self) -> list[str] | None:
        """Requested departments, de-duplicated."""
        return None if self.departments is None else sorted(set(self.departments))


class Citation(BaseModel):
    n: int
    document_id: str
    chunk_id: str
    title: ShownText
    department: str
    snippet: ShownText
    score: float


class QueryResponse(BaseModel):
    answer: str
    citations: list[Citation]
    refused: bool
    reason: str | None
    request_id: str
