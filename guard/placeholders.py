"""The shape of a redaction placeholder: the one definition that minting (guard/pii.py) and every reader share.

In a document's text a value is `<TYPE_N>`, numbered from 1 per document and type (`<PERSON_1>`, a department's
own type `<EMP2_3>`); in a title, redacted on its own, `<TYPE>`. An answer citing more than one document shows each
as `<TYPE_N·C>`, C the first citation number of its document (`<PERSON_1·2>`): two documents' `<PERSON_1>` are two
people. Imports nothing of the project, so any layer may read it.
"""

from __future__ import annotations

import re

ENTITY_TYPE = r"[A-Z][A-Z0-9_]{1,40}"  # a type's name, built in (EMAIL_ADDRESS) or a department's own (EMP2)
QUALIFIER = "·"
_NUMBER = r"[1-9][0-9]*"  # ASCII digits, counted from 1: per document for N, citations for C

NUMBERED = re.compile(rf"<(?P<type>{ENTITY_TYPE})_(?P<number>{_NUMBER})>")  # as a document's text holds it
UNNUMBERED = re.compile(rf"<(?P<type>{ENTITY_TYPE})>")  # as a title holds it
_AS_SHOWN = re.compile(rf"(?P<own><{ENTITY_TYPE}_{_NUMBER})(?:{QUALIFIER}{_NUMBER})?>")


def numbered(entity_type: str, number: int) -> str:
    """The document's `number`th placeholder of `entity_type`: `<PERSON_1>`."""
    return f"<{entity_type}_{number}>"


def type_and_number(placeholder: str) -> tuple[str, int]:
    """The type and number of a document's placeholder: ("PERSON", 2) for `<PERSON_2>`. ValueError for anything
    else."""
    match = NUMBERED.fullmatch(placeholder)
    if match is None:
        raise ValueError("not a document's placeholder")
    return match["type"], int(match["number"])


def unnumbered(entity_type: str) -> str:
    """The placeholder of a value redacted on its own (a title): `<PERSON>`."""
    return f"<{entity_type}>"


def qualify(text: str, citation: int) -> str:
    """`text` with each of a document's placeholders in it as an answer citing several documents shows them,
    `citation` the document's first citation number: `<PERSON_1>` becomes `<PERSON_1·2>`."""
    return NUMBERED.sub(lambda found: f"{found.group()[:-1]}{QUALIFIER}{citation}>", text)


def numbered_pattern(*entity_types: str) -> str:
    """A regex matching the numbered placeholders of the types named (`<DATE_3>`), to join into another regex."""
    return rf"<(?:{'|'.join(map(re.escape, entity_types))})_{_NUMBER}>"


def is_placeholder(text: str) -> bool:
    """True when `text` is, as a whole, a placeholder as an answer shows it (qualified or not)."""
    return _AS_SHOWN.fullmatch(text) is not None


def document_placeholder(shown: str) -> str:
    """The document's own placeholder that `shown` names as an answer shows it: `<PERSON_1>` for itself and for
    `<PERSON_1·2>` (which document citation [2] is, only that answer knows). ValueError for anything else."""
    match = _AS_SHOWN.fullmatch(shown)
    if match is None:
        raise ValueError(f"a placeholder is written <TYPE_N>, or <TYPE_N{QUALIFIER}C> as an answer citing several "
                         "documents shows it")
    return f"{match.group('own')}>"
