"""Text the ledger and the catalogue can store: PostgreSQL refuses NUL (U+0000) in text and JSON values.

A NUL that reached a write would fail it late: the audit append (a 503 for that caller, an audit-failure alert for
the operators) or a catalogue insert (a crash). So every request is checked where it enters: request bodies by
`RequestModel`, URLs by the API's request middleware, upload form fields by `require_no_nul`. Names that come from
inside files (an upload's file name, an e-mail attachment's) are not the caller's to fix; `printable_name` cleans them.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from core.errors import ErrorCode, GovragError
from core.models import DEPARTMENT_PATTERN

NUL = "\x00"
NUL_MESSAGE = "text must not contain NUL (\\u0000) characters"
REPLACEMENT = "\ufffd"
BIDI_CONTROLS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")  # LRE..RLO, LRI..PDI
# Variation selectors, as a regular expression's character class: VS1-VS16 (U+FE00-U+FE0F) and VS17-VS256
# (U+E0100-U+E01EF). Each renders as nothing (after a character with variants, it picks one of its glyphs), and
# `isprintable` passes them; a run of them can hide text a model reads (`guard.normalise.hidden_texts`).
VARIATION_SELECTORS = "\ufe00-\ufe0f\U000e0100-\U000e01ef"
VARIATION_SELECTOR = re.compile(f"[{VARIATION_SELECTORS}]")  # any one of them
# Every character `str.splitlines` ends a line at: a reader (and a model) takes each for a line break.
LINE_BREAKS = frozenset("\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029")

# A department's name wherever a request gives one: a body field, a path segment, a query string, an upload's form
# field (`Annotated[DepartmentName, Form()]`). Anything but `DEPARTMENT_PATTERN` (at most 63 characters) is a 422
# naming the field, never the value, before the handler runs; the OpenAPI document shows the pattern.
DepartmentName = Annotated[str, Field(pattern=DEPARTMENT_PATTERN, description="lower-case letters, digits, '-' or '_'")]


def has_nul(value: object) -> bool:
    """Whether a NUL occurs in `value`, or in any string inside its lists, tuples, sets and dicts (keys included).

    Walked with a stack, not recursion: a request body nested a thousand levels deep is valid JSON, and must be
    answered (a 422 where a string was expected), not crash the handler with a RecursionError."""
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, str):
            if NUL in item:
                return True
        elif isinstance(item, dict):
            pending.extend(item.keys())
            pending.extend(item.values())
        elif isinstance(item, list | tuple | set | frozenset):
            pending.extend(item)
    return False


def require_no_nul(**fields: object) -> None:
    """Refuse, naming the field, any of `fields` that holds a NUL (`invalid_request`, a 400)."""
    for name, value in fields.items():
        if has_nul(value):
            raise GovragError(ErrorCode.invalid_request, f"{name}: {NUL_MESSAGE}")


def printable_name(name: str) -> str:
    """A name taken from inside a file, or a title, on one line: each line break (`LINE_BREAKS`, U+2028 and U+2029
    too) a space, and each other control character (NUL, escapes) and each bidirectional embedding, override or
    isolate (which make "report\u202Eexe.pdf" read "reportfdp.exe") replaced by U+FFFD."""
    return "".join(_printable(ch) for ch in name)


def _printable(ch: str) -> str:
    if ch in LINE_BREAKS:
        return " "
    return REPLACEMENT if unicodedata.category(ch) == "Cc" or ch in BIDI_CONTROLS else ch


class RequestModel(BaseModel):
    """Base of every request body: a NUL anywhere in it, or a field the schema does not name (`department` for
    `departments` would otherwise be dropped and the request run without it), is a validation error (a 422), before
    any handler runs."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _refuse_nul(cls, data: Any) -> Any:
        if has_nul(data):
            raise ValueError(NUL_MESSAGE)
        return data
