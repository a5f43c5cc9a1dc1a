"""Where the eval corpora live and the eval README's train/eval split. Read by `govrag redteam` and the bench
scripts alike, so it imports nothing heavy (a bench script reading a path must not load spaCy or torch)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

EVAL_DIR = Path(os.environ.get("GOVRAG_EVAL_DIR", Path(__file__).resolve().parents[2] / "shared" / "eval"))


def split_of(text: str) -> str:
    """The eval README's rule: sha256(text) % 4 == 0 is train, the rest eval."""
    return "train" if int(hashlib.sha256(text.encode()).hexdigest(), 16) % 4 == 0 else "eval"
