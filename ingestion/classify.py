"""Sensitivity from content: the declared level, raised (never lowered) by PII, secrets and department keywords."""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

import regex

from guard.placeholders import NUMBERED, UNNUMBERED
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
_PARTIAL_PLACEHOLDER = re.compile(r"<[A-Z0-9_]*$")  # a placeholder a cut split
# Invisible format characters (zero-width spaces and joiners, word joiner, BOM, soft hyphen…): a keyword matches
# with any of them inside a word, and with any of them or any whitespace (line breaks, no-break spaces) between words
# (so one next to a word also ends it: wrongly raising a document is the safe side).
_FORMAT_CHARACTER = r"\p{Cf}"
_WORD_GAP = r"[\s\p{Cf}]+"


@dataclass(frozen=True)
class Verdict:
    """The final level and why it is higher than declared (kinds and counts only, never values).

    `chunk_levels[i]` is chunk i's own level (empty when classified as a whole); `level` is at least each of them.
    """

    level: Classification
    reasons: tuple[str, ...]
    chunk_levels: tuple[Classification, ...] = ()

    def chunk_level(self, index: int) -> Classification:
        """Chunk `index`'s level; the document's when chunks were not classified one by one."""
        return self.chunk_levels[index] if self.chunk_levels else self.level


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
    for reason in _aggregate_reasons(pii_counts, text_chars):
        level = _raise(level, Classification.confidential)
        reasons.append(reason)
    for keyword, keyword_level in sorted(keyword_hits.items()):
        if keyword_level.rank > declared.rank:
            level = _raise(level, keyword_level)
            reasons.append(f"keyword '{keyword}'")
    return Verdict(level=level, reasons=tuple(reasons) if level != declared else ())


def classify_chunks(*, declared: Classification, texts: Sequence[str], redacted: Sequence[str],
                    pii_counts: Mapping[str, int], placeholders: Collection[str],
                    keywords: Mapping[str, str], title: str = "") -> Verdict:
    """Each chunk's level from its own content (never below `declared`); the document's is the highest of them,
    and at least what a department keyword in its `title` raises it to (the level decides who sees the title).

    `texts` and `redacted` are the chunks before and after redaction, `pii_counts` the document's distinct values
    per kind and `placeholders` every placeholder the redactor minted. What only the whole document shows (many
    people with contact details, dense personal data) raises every chunk, like the declared level does.
    """
    # The whole text, as the chunks split it at whitespace: a keyword across a chunk boundary still raises the document.
    document = classify(declared=declared, pii_counts=pii_counts, text_chars=sum(map(len, texts)),
                        keyword_hits=keyword_hits(["\n".join(texts), title], keywords))
    floor = _raise(declared, Classification.confidential) \
        if _aggregate_reasons(pii_counts, sum(map(len, texts))) else declared
    chunks = [classify(declared=floor, pii_counts=_chunk_pii_counts(text, placeholders), text_chars=len(original),
                       keyword_hits=keyword_hits([original], keywords))
              for original, text in zip(texts, redacted, strict=True)]
    level, reasons = document.level, list(document.reasons)
    for chunk in chunks:
        if chunk.level.rank > level.rank:
            level = chunk.level
        reasons.extend(reason for reason in chunk.reasons if chunk.level.rank > document.level.rank
                       and reason not in reasons)
    return Verdict(level=level, reasons=tuple(reasons) if level != declared else (),
                   chunk_levels=tuple(_raise(chunk.level, declared) for chunk in chunks))


def with_title_pii(pii_counts: Mapping[str, int], title: str, kinds: Collection[str]) -> dict[str, int]:
    """The document's distinct values per kind, counting those redacted from its title too (a card number in the
    file name raises the document, whose level decides who sees the title). `kinds` are the redacted types: other
    `<WORDS>` an uploader typed are no placeholder."""
    counts = dict(pii_counts)
    for kind in {match.group("type") for match in UNNUMBERED.finditer(title)} & set(kinds):
        counts[kind] = counts.get(kind, 0) + 1
    return counts


def cut_title(title: str, limit: int, kinds: Collection[str]) -> str:
    """A redacted `title` within `limit` characters, never cut inside a placeholder, and ending with the placeholder
    of each of `kinds` only the part cut off held: with_title_pii reads the stored title, and a card number at the
    end of a long file name must still raise the document (an uploader's own `<WORDS>` are text, cut like it).
    Each round keeps less of the title, so it ends."""
    if len(title) <= limit:
        return title
    kinds = list(dict.fromkeys(match.group() for match in UNNUMBERED.finditer(title)
                               if match.group("type") in kinds))
    room = limit
    while room > 0:
        head = _PARTIAL_PLACEHOLDER.sub("", title[:room]).rstrip()
        tail = _whole_placeholders([kind for kind in kinds if kind not in head], limit - len(" … "))
        if not tail:
            return head
        if len(head) + len(" … ") + len(tail) <= limit:
            return f"{head} … {tail}".strip()
        room = min(room - 1, limit - len(" … ") - len(tail))
    return _whole_placeholders(kinds, limit)  # no word of the title fits beside the placeholders it holds


def _whole_placeholders(placeholders: list[str], limit: int) -> str:
    """The placeholders, space-separated, as many whole ones as fit in `limit` characters."""
    kept: list[str] = []
    for placeholder in placeholders:
        if len(" ".join([*kept, placeholder])) > limit:
            break
        kept.append(placeholder)
    return " ".join(kept)


def _chunk_pii_counts(redacted_text: str, placeholders: Collection[str]) -> dict[str, int]:
    """Distinct values per kind in one redacted chunk, read from the placeholders the redactor put there."""
    seen = {match.group(): match.group("type") for match in NUMBERED.finditer(redacted_text)
            if match.group() in placeholders}
    return dict(Counter(seen.values()))


def _aggregate_reasons(pii_counts: Mapping[str, int], text_chars: int) -> list[str]:
    """What makes a text confidential as a whole: a personnel list or customer export, or a data dump."""
    reasons = []
    people = pii_counts.get("PERSON", 0)
    if people >= _MANY_PEOPLE and any(pii_counts.get(kind, 0) for kind in _CONTACT_KINDS):
        reasons.append(f"{people} people with contact details")
    total = sum(pii_counts.values())
    if text_chars and total * 1000 / text_chars >= _DENSE_PER_KCHAR and total >= _MANY_PEOPLE:
        reasons.append("dense personal data")
    return reasons


def keyword_hits(texts: list[str], keywords: Mapping[str, str]) -> dict[str, Classification]:
    """The department keywords (whole words, any case, compared NFKC-normalised, whatever whitespace or invisible
    format characters separate or split their words) that occur in the texts, with the level each raises to."""
    normalised = [unicodedata.normalize("NFKC", text) for text in texts]
    hits: dict[str, Classification] = {}
    for keyword, level in keywords.items():
        pattern = _keyword_pattern(keyword)
        if any(pattern.search(text) for text in normalised):
            hits[keyword] = Classification(level)
    return hits


def _keyword_pattern(keyword: str) -> regex.Pattern[str]:
    """A keyword's words, in order, as whole words of an NFKC-normalised text."""
    words = regex.sub(_FORMAT_CHARACTER, "", unicodedata.normalize("NFKC", keyword)).split()
    spelled = _WORD_GAP.join(f"{_FORMAT_CHARACTER}*".join(map(regex.escape, word)) for word in words)
    return regex.compile(rf"(?<!\w){spelled}(?!\w)", regex.IGNORECASE)


def _raise(level: Classification, to: Classification) -> Classification:
    return to if to.rank > level.rank else level
