"""Retrieved-text scanner: instructions hidden in documents, scored per segment, dropped before a model sees them."""

from __future__ import annotations

import functools
import hashlib
import re
from dataclasses import dataclass

import numpy as np

from core.cache import BoundedCache
from guard.firewall import FirewallModel

_SENTENCE = re.compile(r"(?<=[.!?])\s+")
MAX_SEGMENT_CHARS = 400
MIN_SEGMENT_CHARS = 12
SCORE_CACHE_SIZE = 50_000


def segments(text: str) -> list[str]:
    """Lines, split further at sentence ends and cut to a bounded length; tiny fragments skipped."""
    found: list[str] = []
    for line in text.splitlines():
        for sentence in _SENTENCE.split(line.strip()):
            for start in range(0, len(sentence), MAX_SEGMENT_CHARS):
                piece = sentence[start:start + MAX_SEGMENT_CHARS].strip()
                if len(piece) >= MIN_SEGMENT_CHARS:
                    found.append(piece)
    return found


@dataclass(frozen=True)
class ScanResult:
    """The highest segment score and whether it crosses the threshold."""

    score: float
    flagged: bool


class InjectionScanner:
    """Scores documents by their most instruction-like segment."""

    def __init__(self, model: FirewallModel) -> None:
        self.model = model
        self.threshold = model.threshold
        # The same chunks come back query after query: remember their scores (keyed by a hash, never the text).
        self._scores: BoundedCache[bytes, float] = BoundedCache(SCORE_CACHE_SIZE)

    def score(self, text: str) -> float:
        """Maximum segment score (0 for a text with no segment)."""
        key = hashlib.sha256(text.encode()).digest()
        value = self._scores.get(key)
        if value is None:
            value = self._score(text)
            self._scores.put(key, value)
        return value

    def _score(self, text: str) -> float:
        parts = segments(text)
        if not parts:
            return 0.0
        scores, _ = self.model.scores(parts)
        return float(np.max(scores))

    def scan(self, text: str) -> ScanResult:
        """Score `text` and compare with the shipped threshold."""
        value = self.score(text)
        return ScanResult(score=value, flagged=value >= self.threshold)

    def neutralise(self, text: str) -> str:
        """The text without its flagged segments (each replaced by a marker)."""
        parts = segments(text)
        if not parts:
            return text
        scores, _ = self.model.scores(parts)
        for part, value in zip(parts, scores, strict=True):
            if value >= self.threshold:
                text = text.replace(part, "[removed: instruction-like text]")
        return text


@functools.lru_cache(maxsize=1)
def get_scanner() -> InjectionScanner:
    """The process-wide scanner with the shipped weights."""
    return InjectionScanner(FirewallModel.load("scanner"))
