"""Per-request stage timings, reported to clients as a `Server-Timing` header (durations only, no content)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

_stages: ContextVar[dict[str, float] | None] = ContextVar("stages", default=None)


def start_request() -> None:
    """Begin collecting stage timings for the current request."""
    _stages.set({})


@contextmanager
def stage(name: str) -> Iterator[None]:
    """Time a block; repeated names add up."""
    started = time.perf_counter()
    try:
        yield
    finally:
        collected = _stages.get()
        if collected is not None:
            collected[name] = collected.get(name, 0.0) + (time.perf_counter() - started) * 1000


def server_timing_header() -> str:
    """`name;dur=ms` entries for the stages recorded so far."""
    collected = _stages.get() or {}
    return ", ".join(f"{name};dur={ms:.2f}" for name, ms in collected.items())
