"""Ingestion-time injection detection on BIPIA (eval split): the shared guard.injection scanner applied the way
ingestion applies it (parse → chunk → redact → score each chunk; a document is flagged by its worst chunk).

Prints ROC-AUC, TPR at the threshold that keeps false positives ≤ 1% on the clean eval documents, and TPR/FPR at
the shipped threshold ingestion uses, by injection position.
Usage: .venv/bin/python bench/injection_scan_eval.py [--limit N]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from sklearn.metrics import roc_auc_score  # noqa: E402

from bench.eval_data import bipia_documents  # noqa: E402
from guard.injection import get_scanner  # noqa: E402
from guard.pii import PlaceholderMap, get_redactor  # noqa: E402
from ingestion.chunk import chunk_sections  # noqa: E402
from ingestion.parse import parse_document  # noqa: E402

MAX_FPR = 0.01


def chunk_scores(text: str) -> float:
    """The worst chunk's score for one document, as ingestion computes it."""
    chunks = chunk_sections(parse_document(text.encode(), "text/plain"), max_chars=1000)
    redacted = get_redactor().redact_many([c.text for c in chunks], PlaceholderMap())
    scanner = get_scanner()
    return max((scanner.score(t) for t in redacted), default=0.0)


def threshold_at_fpr(clean: np.ndarray, max_fpr: float = MAX_FPR) -> float:
    """The lowest threshold flagging at most `max_fpr` of the clean scores."""
    ordered = np.sort(clean)[::-1]
    allowed = int(np.floor(max_fpr * len(ordered)))
    return float(np.nextafter(ordered[allowed], np.inf)) if allowed < len(ordered) else 0.0


def main(argv: list[str] | None = None) -> int:
    """Score every eval document and print the figures."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--limit", type=int, default=0, help="only the first N eval documents (smoke runs)")
    args = parser.parse_args(argv)
    rows = [r for r in bipia_documents() if r.split == "eval"]
    rows = rows[: args.limit] if args.limit else rows
    started = time.perf_counter()
    scores = np.array([chunk_scores(r.text) for r in rows])
    labels = np.array([r.label for r in rows])
    elapsed = time.perf_counter() - started
    print(f"BIPIA eval split: {labels.sum()} injected, {(labels == 0).sum()} clean documents, "
          f"{elapsed:.1f}s ({len(rows) / elapsed:.1f} docs/s incl. parse+chunk+redact)")
    print(f"ROC-AUC (worst-chunk score): {roc_auc_score(labels, scores):.4f}")
    for name, threshold in (("threshold at <=1% FPR on clean eval docs", threshold_at_fpr(scores[labels == 0])),
                            ("shipped threshold (what ingestion flags)", get_scanner().threshold)):
        flagged = scores >= threshold
        print(f"{name} = {threshold:.4f}: TPR {flagged[labels == 1].mean():.4f}, "
              f"FPR {flagged[labels == 0].mean():.4f}")
        by_position: dict[str, list[bool]] = defaultdict(list)
        for row, hit in zip(rows, flagged, strict=True):
            if row.label == 1:
                by_position[row.category].append(bool(hit))
        print("   by position: " + ", ".join(f"{k} {np.mean(v):.3f} (n={len(v)})"
                                             for k, v in sorted(by_position.items())))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
