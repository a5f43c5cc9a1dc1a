"""Output guard: what may not leave in an answer — canaries, the system prompt, raw PII."""

from __future__ import annotations

import codecs
import html
import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

from guard.normalise import encoded_payloads, hidden_texts, strip_invisible
from guard.pii import get_redactor
from guard.placeholders import is_placeholder

SHINGLE_WORDS = 8
_CITATION = re.compile(r"\[\d+\]")
_WORD = re.compile(r"[a-z0-9']+")
_CANARY_SHAPE = re.compile(r"cnry[0-9a-f]{16}")  # a squashed `CNRY-<16 hex>` (guard/controls.py mints them)


@dataclass(frozen=True)
class OutputVerdict:
    """The text allowed out (PII scrubbed) and what the guard found."""

    text: str
    withheld: bool
    reason: str | None = None
    canary_departments: list[str] = field(default_factory=list)
    system_prompt_echo: bool = False
    pii_scrubbed: int = 0

    def as_audit(self) -> dict[str, Any]:
        """Metadata only, for the audit event."""
        return {"withheld": self.withheld, "reason": self.reason, "canary_departments": self.canary_departments,
                "system_prompt_echo": self.system_prompt_echo, "pii_scrubbed": self.pii_scrubbed}


def _squash(text: str) -> str:
    """Lower-case letters and digits only: survives spacing, punctuation and zero-width tricks."""
    return re.sub(r"[^a-z0-9]", "", strip_invisible(text).lower())


def _canary_secret(token: str) -> str:
    """The random part of a canary token (`CNRY-<hex>`): the prefix is public, the hex alone gives it away."""
    return _squash(token.rpartition("-")[2])


def _decoded(text: str) -> str:
    """`text` with HTML character references and %-escapes decoded: its visible letters, then each text hidden in it
    in Unicode tag characters or variation selectors (invisible, but a model or a client reads them: `hidden_texts`)."""
    decoded = unquote(html.unescape(text))
    return "\n".join([strip_invisible(decoded), *hidden_texts(decoded)])


@dataclass(frozen=True)
class AnswerViews:
    """An answer as the guard reads it, decoded once and read by every check: `decoded` (`_decoded`), and
    `readings`, each view of it a reader could recover, squashed (`_readings`)."""

    decoded: str
    readings: tuple[str, ...]

    @classmethod
    def of(cls, text: str) -> AnswerViews:
        decoded = _decoded(text)
        return cls(decoded=decoded, readings=_readings(decoded))


def _readings(decoded: str) -> tuple[str, ...]:
    """The decoded answer squashed as a reader could recover it: without the citation markers, HTML character
    references and %-escapes that can split or spell a value; reversed; rot13'd; and each base64 (standard or
    URL-safe) or hex payload in it decoded. Hidden text (tag characters, variation selectors), also written as
    references or escapes (decoded first, as `normalise` does), is read in each way too."""
    plain = _CITATION.sub("", decoded)
    views = [plain, plain[::-1], codecs.decode(plain, "rot13"), *encoded_payloads(plain)]
    return tuple(_squash(view) for view in views)


def leaked_canaries(views: AnswerViews, canaries: dict[str, str]) -> list[str]:
    """Departments whose canary secret appears in the answer, with or without its prefix, however spaced, disguised
    or encoded (`AnswerViews.readings`)."""
    secrets = {dept: _canary_secret(token) for dept, token in canaries.items()}
    return sorted(dept for dept, secret in secrets.items()
                  if secret and any(secret in seen for seen in views.readings))


def has_canary_shape(text: str) -> bool:
    """True when `text` holds something shaped like a canary (`CNRY-<16 hex>`), however spaced, disguised or encoded
    (read as `leaked_canaries` reads an answer: `AnswerViews.readings`): the check for a caller that does not know
    the canaries themselves (the red team, outside the API)."""
    return any(_CANARY_SHAPE.search(seen) for seen in AnswerViews.of(text).readings)


def echoes_system_prompt(views: AnswerViews, system_prompt: str) -> bool:
    """True when any run of SHINGLE_WORDS consecutive words of the system prompt appears in the answer (invisible
    characters dropped, look-alike letters read as Latin, references and %-escapes decoded, text hidden in tag
    characters or variation selectors read too: `AnswerViews.decoded`)."""
    prompt_words = _WORD.findall(system_prompt.lower())
    answer = " ".join(_WORD.findall(views.decoded.lower()))
    return any(" ".join(prompt_words[i:i + SHINGLE_WORDS]) in answer
               for i in range(max(0, len(prompt_words) - SHINGLE_WORDS + 1)))


def quotes_context_only(text: str, context: str) -> bool:
    """True when every piece of `text` between citation markers appears in the context word for word
    (as an extractive answer does): such a text can hold no value the context does not."""
    pieces = [" ".join(piece.split()) for piece in _CITATION.split(text)]
    flat = " ".join(context.split())
    return any(pieces) and all(piece in flat for piece in pieces)


def scrub_pii(text: str, context: str) -> tuple[str, int]:
    """Replace raw PII that the (already redacted) context does not contain; placeholders pass."""
    if quotes_context_only(text, context):
        return text, 0  # the analyzer could only find values that the context holds: nothing to scrub
    spans = []
    for result in get_redactor().analyze(text):
        value = text[result.start:result.end]
        if is_placeholder(value.strip()) or (value.strip() and value.strip() in context):
            continue
        spans.append((result.start, result.end, result.entity_type))
    spans.sort(reverse=True)
    last_start = len(text) + 1
    for start, end, entity in spans:
        if end <= last_start:
            text = f"{text[:start]}<{entity}>{text[end:]}"
            last_start = start
    return text, len(spans)


def withholding(text: str, *, canaries: dict[str, str], system_prompt: str) -> OutputVerdict | None:
    """The verdict that withholds `text` for a canary or a system-prompt echo, both read from one `AnswerViews`;
    None when it holds neither."""
    views = AnswerViews.of(text)
    leaked = leaked_canaries(views, canaries)
    if leaked:
        return OutputVerdict(text="", withheld=True, reason="canary", canary_departments=leaked)
    if system_prompt and echoes_system_prompt(views, system_prompt):
        return OutputVerdict(text="", withheld=True, reason="system_prompt", system_prompt_echo=True)
    return None


def check_output(text: str, *, canaries: dict[str, str], system_prompt: str, context: str) -> OutputVerdict:
    """Withhold on a canary or a system-prompt echo (`withholding`); otherwise scrub raw PII and let it out."""
    if (withheld := withholding(text, canaries=canaries, system_prompt=system_prompt)) is not None:
        return withheld
    scrubbed, count = scrub_pii(text, context)
    return OutputVerdict(text=scrubbed, withheld=False, pii_scrubbed=count)
