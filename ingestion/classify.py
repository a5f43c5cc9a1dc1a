"""Sensitivity from content: the declared level, raised (never lowered) by PII, secrets and department keywords."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from ingestion.schemas import Classification

# Kinds of value that make a document at least this sensitive on their own.
_KIND_LEVELS: dict[str, Classification] = {
    "SECRET": Classification.restricted,
    "CRYPTO": Classification.restricted,
    "US_SSN": Classification.confidential,
    "US_PASSPORT": Classification.confidential,
    "CREDIT_CARD": Classification.confidential,
    "IBAN_CODE": Classification.confidential,
    "US_BANK_NUMBER": Classification.confidential,
    "PERSON": Classification.internal,
    "EMAIL_ADDRESS": Classification.internal,
    "PHONE_NUMBER": Classification.internal,
    "IP_ADDRESS": Classification.internal,
}
# Department recognizers (employee ids, account numbers…) mark a document confidential.
_CUSTOM_LEVEL = Classification.confidential
# Many distinct people with contact details reads like a personnel list or a customer export.
_MANY_PEOPLE = 20
_CONTACT_KINDS = ("EMAIL_ADDRESS", "PHONE_NUMBER")
# Identifiers per 1,000 characters above which a document is a data dump rather than prose.
_DENSE_PER_KCHAR = 5.0


@dataclass(frozen=True)
class Verdict:
    """The final level and why it is higher than declared (kinds and counts only, never values)."""

    level: Classification
    reasons: tuple[str, ...]


def classify(*, declared: Classification, pii_counts: Mapping[str, int], text_chars: int,
             keyword_hits: Mapping[str, Classification]) -> Verdict:
    """Combine the declared level with what the content shows; the result is never below `declared`."""
    level, reasons = declared, []
    for kind, count in sorted(pii_counts.items()):
        found = _KIND_LEVELS.get(kind, _CUSTOM_LEVEL)
        if count and found.rank > level.rank:
            level = found
        if count and found.rank > declared.rank:
            reasons.append(f"{kind.lower()} x{count}")
    people = pii_counts.get("PERSON", 0)
    if people >= _MANY_PEOPLE and any(pii_counts.get(kind, 0) for kind in _CONTACT_KINDS):
        level = _raise(level, Classification.confidential)
        reasons.append(f"{people} people with contact details")
    total = sum(pii_counts.values())
    if text_chars and total * 1000 / text_chars >= _DENSE_PER_KCHAR and total >= _MANY_PEOPLE:
        level = _raise(level, Classification.confidential)
        reasons.append("dense personal data")
    for keyword, keyword_level in sorted(keyword_hits.items()):
        if keyword_level.rank > declared.rank:
            level = _raise(level, keyword_level)
            reasons.append(f"keyword '{keyword}'")
    return Verdict(level=level, reasons=tuple(reasons) if level != declared else ())


def keyword_hits(texts: list[str], keywords: Mapping[str, str]) -> dict[str, Classification]:
    """The department keywords (whole words, any case) that occur in the texts, with the level each raises to."""
    hits: dict[str, Classification] = {}
    for keyword, level in keywords.items():
        pattern = re.compile(rf"(?<!\w){re.escape(keyword)}(?!\w)", re.IGNORECASE)
        if any(pattern.search(text) for text in texts):
            hits[keyword] = Classification(level)
    return hits


def _raise(level: Classification, to: Classification) -> Classification:
    return to if to.rank > level.rank else level
