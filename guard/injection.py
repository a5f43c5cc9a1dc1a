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
        # Which weights and threshold judged a chunk: ingestion records it, and a chunk judged clean by this very
        # version need not be scanned again at query time (only chunks ingested before a change are).
        self.version = hashlib.sha256(np.ascontiguousarray(model.coef).tobytes()
                                      + repr((model.intercept, model.threshold)).encode()).hexdigest()[:16]
        # The same chunks come back query after query: remember their scores (keyed by a hash, never the text).
        self._scores: BoundedCache[bytes, float] = BoundedCache(SCORE_CACHE_SIZE)

    def score(self, text: str) -> float:
        """Maximum segment score (0 for a text with no segment)."""
        return self.score_many([text])[0]

    def score_many(self, texts: list[str]) -> list[float]:
        """`score` for each text; the segments of all texts not seen before go to the model in one call."""
        keys = [hashlib.sha256(text.encode()).digest() for text in texts]
        values = [self._scores.get(key) for key in keys]
        missing = [i for i, value in enumerate(values) if value is None]
        parts = [segments(texts[i]) for i in missing]
        flat = [part for text_parts in parts for part in text_parts]
        scores = self.model.scores(flat)[0] if flat else np.zeros(0)
        start = 0
        for i, text_parts in zip(missing, parts, strict=True):
            chunk_scores = scores[start:start + len(text_parts)]
            values[i] = float(np.max(chunk_scores)) if len(text_parts) else 0.0
            self._scores.put(keys[i], values[i])
            start += len(text_parts)
        return [float(value) for value in values]  # type: ignore[arg-type]

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
