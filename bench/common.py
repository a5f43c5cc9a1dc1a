"""Shared helpers for bench scripts: eval data paths, timing, machine facts, throw-away PostgreSQL databases (the
tests make theirs here too). Figures are printed, never asserted."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg

from guard.eval_corpora import EVAL_DIR  # noqa: F401 (the bench scripts read it from here)

for _name, _value in (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"), ("DO_NOT_TRACK", "1"),
                      ("UNSTRUCTURED_DISABLE_NOTICE", "1"), ("TOKENIZERS_PARALLELISM", "false")):
    os.environ.setdefault(_name, _value)

ROOT = Path(__file__).resolve().parent.parent
# Any database of the PostgreSQL server the throw-away databases are made on (libpq form): it creates and drops them.
PG_ADMIN_DSN = os.environ.get("GOVRAG_TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test")


def read_jsonl(path: Path) -> list[dict]:
    """Rows of a JSON-lines file."""
    with path.open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) by nearest rank."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


@contextmanager
def timed(sink: dict[str, float], name: str) -> Iterator[None]:
    """Add the block's wall time (seconds) to sink[name]."""
    started = time.perf_counter()
    try:
        yield
    finally:
        sink[name] = sink.get(name, 0.0) + time.perf_counter() - started


def libpq_dsn(database_url: str) -> str:
    """The app's SQLAlchemy URL (`postgresql+psycopg://…`) as psycopg.connect takes it: libpq knows no `+driver`."""
    return database_url.replace("postgresql+psycopg://", "postgresql://", 1)


@contextmanager
def throwaway_postgres(prefix: str) -> Iterator[str]:
    """A new empty database `<prefix>_<random>` on PG_ADMIN_DSN's server, as the app's SQLAlchemy URL; dropped when
    the block ends, however it ends (an exception, Ctrl-C), connections still open to it or not."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    url = PG_ADMIN_DSN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1) + f"/{name}"
    try:  # the name is dropped even if Ctrl-C comes just after CREATE DATABASE (DROP … IF EXISTS: or before it)
        with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as admin:
            admin.execute(f'CREATE DATABASE "{name}"')
        yield url
    finally:
        _drop_database(name, url)


def _drop_database(name: str, url: str) -> None:
    """Close the process's pooled connections to it, then drop it, ending any other session still on it."""
    from core.db import get_engine

    get_engine(url).dispose()
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def machine() -> str:
    """One line describing where the figures were taken."""
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,  # noqa: S607
                            check=False).stdout.strip() or "unknown"
    return (f"{platform.processor() or platform.machine()} ({_cpu_model()}), {os.cpu_count()} cores, Python "
            f"{platform.python_version()}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, commit {commit}")


def _cpu_model() -> str:
    """The CPU's model name (figures differ between CPU families: math kernels are chosen per CPU)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return "CPU model unknown"
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")),
                "CPU model unknown")
