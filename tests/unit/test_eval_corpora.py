"""The eval corpora's location and split rule: defined once, importable by the bench scripts without the models."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

HEAVY = ("spacy", "torch", "transformers", "presidio_analyzer")
REPOSITORY = Path(__file__).resolve().parents[2]


def test_the_bench_helpers_import_no_model_library() -> None:
    """bench.eval_data took EVAL_DIR and split_of from guard.redteam, loading spaCy, torch and Presidio to read a
    path and a hash rule."""
    probe = f"import sys, bench.common, bench.eval_data; print(sorted(set({HEAVY!r}) & set(sys.modules)))"
    loaded = subprocess.run([sys.executable, "-c", probe], cwd=REPOSITORY,  # noqa: S603 (fixed argv)
                            capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "[]"


def test_the_eval_folder_and_split_are_defined_once() -> None:
    """bench.common computed its own EVAL_DIR beside guard.redteam's: two definitions that could drift apart."""
    from bench import common, eval_data
    from guard import eval_corpora, redteam

    assert common.EVAL_DIR is eval_data.EVAL_DIR is eval_corpora.EVAL_DIR
    assert eval_data.split_of is redteam.split_of is eval_corpora.split_of
    assert eval_corpora.EVAL_DIR == Path(os.environ.get("GOVRAG_EVAL_DIR", REPOSITORY.parent / "shared" / "eval"))
