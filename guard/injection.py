"""Retrieved-text scanner: instructions hidden in documents, scored per segment, dropped before a model sees them."""

from __future__ import annotations

import bisect
import functools
import hashlib
import re
from dataclasses import dataclass

import numpy as np

from core.cache import BoundedCache
from core.text import LINE_BREAKS
from guard.firewall import HARD_SCORE, FirewallModel, fires_hard_rule, rule_hits
from guard.normalise import normalise

_SENTENCE = re.compile(r"(?<=[.!?])\s+")
_LINE_BREAK = re.compile("|".join(map(re.escape, ["\r\n", *sorted(LINE_BREAKS)])))
_WORD = re.compile(r"\S+")
MAX_SEGMENT_CHARS = 400
# Consecutive windows of a long run share at least this many characters: any phrase up to this long (a rule's match
# in practice) lies whole in one of them.
SEGMENT_OVERLAP = 200
MIN_SEGMENT_CHARS = 12
SCORE_CACHE_SIZE = 50_000
# Bump when what a chunk is judged on changes (segmentation, normalisation): chunks an older revision passed at
# ingestion are then scanned again at query time. 3: the text spelled in Unicode tag characters is judged too. 4: and
# the text hidden in variation selectors, and URL-safe base64 decoded. 5: chat-template control tokens fire a hard rule
# (chat_template), and every default-ignorable character is dropped (`normalise._ZERO_WIDTH`). 6: chat_template reads
# a reasoning tag going on in the model's voice and look-alike, %-escaped or split markers. 7: and Qwen's tool tags
# (`<tool_call>`, `</tool_response>`) so; "you" only in an instruction, a tag ending a sentence only before one.
SEGMENTATION_REVISION = 7
# What `neutralise` puts in place of a removed span. No word of it is in any rule's phrase ("instruction" was: "Please
# ignore all previous" + the marker fired ignore_instructions, so neutralised text was flagged again), and it has more
# words (5) than any rule lets stand between two of a phrase's (4), so it cannot join the words left on either side.
# It changes no scan, so no SEGMENTATION_REVISION: neutralised text is never stored, only shown to a model.
REMOVED = "[removed: words the scanner flagged]"


@dataclass(frozen=True)
class Segment:
    """A part of a text that is scored on its own: where it lies in the text, and the words it holds as scored."""

    start: int
    end: int
    text: str
    across_lines: bool  # a window of the whole text read as one line, not a piece of one line


def segment_spans(text: str) -> list[Segment]:
    """What the scanner scores in `text`, so that no part of it escapes a reading whole:

    - each line (at every break `str.splitlines` knows, U+2028 and the like too), split at sentence ends, a long
      sentence in overlapping windows, for the classifier; fragments under MIN_SEGMENT_CHARS are left to the next;
    - the whole text as a model reads it, every line break and run of spaces one space (a list of short items, words
      split over separators, a sentence across lines or sentences), in overlapping windows, for the hard rules."""
    found: list[Segment] = []
    for line_start, line_end in _between(_LINE_BREAK, text, 0, len(text)):
        for start, end in _between(_SENTENCE, text, line_start, line_end):
            found += [Segment(a, b, text[a:b], False) for a, b in _windows(_words(text, start, end))]
    seen = {(segment.start, segment.end) for segment in found}
    for a, b in _windows(_words(text, 0, len(text))):
        if (a, b) not in seen:
            found.append(Segment(a, b, _as_one_line(text, a, b), True))
    return [segment for segment in found if len(segment.text) >= MIN_SEGMENT_CHARS]


def _as_one_line(text: str, start: int, end: int) -> str:
    """text[start:end] as a model reads it: every line break and run of spaces one space."""
    return " ".join(text[start:end].split())


def _fires_hard_rule(line: str) -> bool:
    """Whether a hard rule fires on `line` (text read across lines, which the classifier is not trusted with)."""
    return fires_hard_rule(rule_hits(normalise(line)))


def segments(text: str) -> list[str]:
    """The pieces of lines `segment_spans` finds: what the classifier scores (and is trained on)."""
    return [segment.text for segment in segment_spans(text) if not segment.across_lines]


def _between(separator: re.Pattern[str], text: str, start: int, end: int) -> list[tuple[int, int]]:
    """The spans of text[start:end] between matches of `separator`."""
    spans, at = [], start
    for match in separator.finditer(text, start, end):
        spans.append((at, match.start()))
        at = match.end()
    return [*spans, (at, end)]


def _words(text: str, start: int, end: int) -> list[tuple[int, int]]:
    """The words of text[start:end]; a word longer than MAX_SEGMENT_CHARS in overlapping pieces."""
    words = []
    for match in _WORD.finditer(text, start, end):
        first, last = match.span()
        while last - first > MAX_SEGMENT_CHARS:
            words.append((first, first + MAX_SEGMENT_CHARS))
            first += MAX_SEGMENT_CHARS - SEGMENT_OVERLAP
        words.append((first, last))
    return words


def _windows(words: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Runs of consecutive `words` of at most MAX_SEGMENT_CHARS (joined by single spaces), each sharing its last
    words, SEGMENT_OVERLAP characters or more, with the next; as (start, end) of the text they span."""
    windows, first = [], 0
    while first < len(words):
        last, length = first, words[first][1] - words[first][0]
        while last + 1 < len(words) and length + 1 + words[last + 1][1] - words[last + 1][0] <= MAX_SEGMENT_CHARS:
            last += 1
            length += 1 + words[last][1] - words[last][0]
        windows.append((words[first][0], words[last][1]))
        if last + 1 == len(words):
            break
        shared, following = 0, last + 1
        while following > first + 1 and shared < SEGMENT_OVERLAP:
            following -= 1
            shared += 1 + words[following][1] - words[following][0]
        first = following
    return windows


def _firing_runs(text: str, start: int, end: int) -> list[tuple[int, int]]:
    """The shortest runs of the words of text[start:end] that fire a hard rule read as one line, left to right, each
    after the last. What is left between them fires none (a rule that fires on some words fires on more): each run
    ends at the first word where the words since the last run fire one, and starts at the last word from which they
    still do; each is found by bisection, a few readings of a 400-character window."""
    words, runs, first = _words(text, start, end), [], 0

    def fires(a: int, b: int) -> bool:
        return _fires_hard_rule(_as_one_line(text, words[a][0], words[b][1]))

    while first < len(words) and fires(first, len(words) - 1):
        last = first + bisect.bisect_left(range(first, len(words)), True, key=lambda i: fires(first, i))
        begin = last - bisect.bisect_left(range(last, first - 1, -1), True, key=lambda i: fires(i, last))
        runs.append((words[begin][0], words[last][1]))
        first = last + 1
    return runs


def _merged(spans: list[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    """`spans` in order, those that overlap or touch as one."""
    merged: list[tuple[int, int]] = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return tuple(merged)


@dataclass(frozen=True, slots=True)
class ScanResult:
    """The highest segment score, whether it crosses the threshold, and the spans of the text `neutralise` replaces,
    in order and apart (each flagged piece of a line, and the words that fire a hard rule in each flagged window
    across lines, also where a flagged piece of a line lies in that window)."""

    score: float
    flagged: bool
    removed: tuple[tuple[int, int], ...] = ()


class InjectionScanner:
    """Scores documents by their most instruction-like segment."""

    def __init__(self, model: FirewallModel) -> None:
        self.model = model
        self.threshold = model.threshold
        # Which weights and threshold judged a chunk: ingestion records it, and a chunk judged clean by this very
        # version need not be scanned again at query time (only chunks ingested before a change are).
        self.version = hashlib.sha256(np.ascontiguousarray(model.coef).tobytes() + repr(
            (model.intercept, model.threshold, SEGMENTATION_REVISION)).encode()).hexdigest()[:16]
        # The same chunks come back query after query: remember their scans (keyed by a hash, never the text).
        self._scans: BoundedCache[bytes, ScanResult] = BoundedCache(SCORE_CACHE_SIZE)

    def score(self, text: str) -> float:
        """Maximum segment score (0 for a text with no segment)."""
        return self.scan(text).score

    def scan(self, text: str) -> ScanResult:
        """Score `text` and compare with the shipped threshold."""
        return self.scan_many([text])[0]

    def scan_many(self, texts: list[str]) -> list[ScanResult]:
        """`scan` for each text; the segments of all texts not seen before are scored in one call."""
        keys = [hashlib.sha256(text.encode()).digest() for text in texts]
        results = [self._scans.get(key) for key in keys]
        missing = [i for i, result in enumerate(results) if result is None]
        parts = [segment_spans(texts[i]) for i in missing]
        scores = self._segment_scores([part for text_parts in parts for part in text_parts])
        start = 0
        for i, text_parts in zip(missing, parts, strict=True):
            results[i] = self._judged(texts[i], text_parts, scores[start:start + len(text_parts)])
            self._scans.put(keys[i], results[i])
            start += len(text_parts)
        return results  # type: ignore[return-value]

    def _judged(self, text: str, parts: list[Segment], scores: np.ndarray) -> ScanResult:
        """One text's scan from its segments and their scores: what made a segment flagged is removed, each flagged
        piece of a line whole and, in a window across lines, the runs of words that fire its hard rules."""
        score = float(np.max(scores)) if len(parts) else 0.0
        flagged = [part for part, value in zip(parts, scores, strict=True) if value >= self.threshold]
        removed = [(part.start, part.end) for part in flagged if not part.across_lines]
        for part in flagged:
            if part.across_lines:
                removed += _firing_runs(text, part.start, part.end)
        return ScanResult(score=score, flagged=score >= self.threshold, removed=_merged(removed))

    def _segment_scores(self, parts: list[Segment]) -> np.ndarray:
        """The classifier's score of each piece of a line (what it was trained on), and, for a window across lines,
        HARD_SCORE where a hard rule fires (0 otherwise): the classifier reads flattened code and tables as
        instructions far more often than it reads any instruction there (BIPIA eval: 14 clean documents flagged
        instead of 6, for 3 more of 456 injections), the rules do not."""
        scores = np.zeros(len(parts))
        own = [i for i, part in enumerate(parts) if not part.across_lines]
        if own:
            scores[own] = self.model.scores([parts[i].text for i in own])[0]
        for i, part in enumerate(parts):
            if part.across_lines and _fires_hard_rule(part.text):
                scores[i] = HARD_SCORE
        return scores

    def neutralise(self, text: str) -> str:
        """The text with each span its scan flagged replaced by a marker (a text scanned just before is not scored
        again)."""
        pieces, copied = [], 0
        for start, end in self.scan(text).removed:
            pieces += [text[copied:start], REMOVED]
            copied = end
        return "".join([*pieces, text[copied:]])


@functools.lru_cache(maxsize=1)
def get_scanner() -> InjectionScanner:
    """The process-wide scanner with the shipped weights."""
    return InjectionScanner(FirewallModel.load("scanner"))
