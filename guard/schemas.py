"""Guard requests, responses and modes."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated

from pydantic import AfterValidator, BaseModel, Field

from authz.schemas import GLOBAL_SCOPE as GLOBAL_SCOPE  # the kill switch's global scope, never a department
from core.models import DEPARTMENT_PATTERN
from core.text import DepartmentName, RequestModel
from guard.firewall import GuardMode
from guard.normalise import ShownText, has_hidden_selectors

SCOPE_PATTERN = DEPARTMENT_PATTERN  # "global" or a department name


class KillMode(StrEnum):
    normal = "normal"
    retrieval_only = "retrieval_only"
    disabled = "disabled"

    @property
    def severity(self) -> int:
        return {"normal": 0, "retrieval_only": 1, "disabled": 2}[self.value]


def _printable_reason(reason: str) -> str:
    """A reason people read in the guard listing and the ledger's exports: some text on one printable line (as a
    token's subject is), never only spaces, control or escape characters (a terminal runs those), invisible format
    characters (zero-width, bidi controls), text hidden in variation selectors (`has_hidden_selectors`; an emoji's
    own single selector, U+26A0 U+FE0F, is taken) or spaces other than U+0020 (a non-breaking one pasted from a
    document)."""
    if not reason.strip() or not reason.isprintable() or has_hidden_selectors(reason):
        raise ValueError("a reason is printable text on one line, not only spaces: no line breaks, tabs, control, "
                         "escape, zero-width or bidirectional characters, no text hidden in variation selectors, and "
                         "no spaces but the plain one (a non-breaking space is refused)")
    return reason


class KillSwitchIn(RequestModel):
    scope: str = Field(pattern=SCOPE_PATTERN)
    mode: KillMode
    reason: Annotated[str, Field(min_length=1, max_length=500), AfterValidator(_printable_reason)]


class KillSwitchOut(BaseModel):
    scope: str
    mode: KillMode
    reason: ShownText | None
    updated_by: str


class FirewallModeIn(RequestModel):
    department: DepartmentName
    mode: GuardMode


class GuardStateOut(BaseModel):
    scope: str
    kill_mode: KillMode
    firewall_mode: GuardMode | None
    reason: ShownText | None
