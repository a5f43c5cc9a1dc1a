"""Heap a process freed goes back to the system (core.memory): `govrag worker`'s parent after its model check."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.support.govrag_process import govrag_env

ROOT = Path(__file__).resolve().parents[2]
MB = 1024 * 1024

# Frees 100 MB of 2 KB blocks (glibc's heap, below its mmap threshold) under one still held, which keeps glibc from
# trimming the heap's top by itself; prints what release_freed_heap says and how much resident memory it returned.
FREED_UNDER_A_HELD_BLOCK = """
import psutil
from core import memory
blocks = [bytes(2048) for _ in range(50_000)]
held = bytes(2048)
del blocks
before = psutil.Process().memory_info().rss
released = memory.release_freed_heap()
print(released, before - psutil.Process().memory_info().rss)
"""

# `govrag worker`'s check before Celery starts, then what glibc still had to give back.
AFTER_THE_MODEL_CHECK = """
import ctypes
import psutil
from core.settings import get_settings
from ingestion import service
service.check_models(get_settings())
before = psutil.Process().memory_info().rss
ctypes.CDLL(None).malloc_trim(0)
print(before - psutil.Process().memory_info().rss)
"""


def _run(code: str, tmp_path: Path) -> list[str]:
    """The words `code` prints, run in a fresh process (settings: data_dir `tmp_path`)."""
    env = {**govrag_env(data_dir=str(tmp_path)), "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,  # noqa: S603
                            timeout=600, check=True)
    return result.stdout.split()


def test_freed_heap_goes_back_to_the_system(tmp_path: Path) -> None:
    released, returned = _run(FREED_UNDER_A_HELD_BLOCK, tmp_path)
    assert released == "True"
    assert int(returned) > 50 * MB


def test_the_worker_keeps_no_freed_heap_after_its_model_check(tmp_path: Path) -> None:
    """On main a trim after `check_models` returned ~70-90 MB the models had left freed."""
    (returned,) = _run(AFTER_THE_MODEL_CHECK, tmp_path)
    assert int(returned) < 20 * MB
