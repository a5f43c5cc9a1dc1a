"""`govrag demo` prints its story readably: the run logs warnings and errors only, and names the store it uses."""

from __future__ import annotations

from pathlib import Path

import pytest

from api import demo
from core.settings import Settings


def test_the_demo_logs_warnings_only_unless_asked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Its ~80 INFO lines (JSON, one per request and job) were interleaved with the answers the README describes."""
    monkeypatch.delenv("GOVRAG_LOG_LEVEL", raising=False)
    settings = demo.demo_settings(Settings(data_dir=tmp_path))
    assert settings.log_level == "WARNING" and settings.data_dir == tmp_path / "demo"
    monkeypatch.setenv("GOVRAG_LOG_LEVEL", "DEBUG")
    assert demo.demo_settings(Settings(data_dir=tmp_path)).log_level == "DEBUG"


def test_the_demo_names_the_vector_store_it_runs_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The banner said "Qdrant local mode" while the embedded default is Qdrant Edge."""
    monkeypatch.delenv("GOVRAG_VECTOR_BACKEND", raising=False)
    settings = demo.demo_settings(Settings(data_dir=tmp_path))
    assert "Qdrant Edge" in demo.banner(settings) and "local mode" not in demo.banner(settings)
    monkeypatch.setenv("GOVRAG_VECTOR_BACKEND", "qdrant_local")
    assert "Qdrant local mode" in demo.banner(demo.demo_settings(Settings(data_dir=tmp_path)))
