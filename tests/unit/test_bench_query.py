"""bench/query.py's ungoverned baseline server leaves no file behind once the bench has stopped it."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from bench import query


def test_the_baseline_server_stopped_leaves_its_shard_only_in_the_benchs_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The baseline kept its Qdrant Edge shard in a temporary directory of its own and never removed it: stopped by
    SIGTERM, it ends by that signal (uvicorn raises it again once it has shut down), so a /tmp/tmpXXXXXXXX/shard
    stayed after every run. Now the shard is in the bench's directory, which the bench removes once the server has
    ended."""
    temp, workdir = tmp_path / "tmp", tmp_path / "bench"
    temp.mkdir()
    workdir.mkdir()
    corpus = workdir / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": text, "department": "hr"}) + "\n"
                              for text in ("Annual leave is 25 days.", "Expenses are paid monthly.")))
    monkeypatch.setenv("TMPDIR", str(temp))  # the server's temporary directory
    server, url = query.start_baseline(corpus, workdir)
    try:
        hits = httpx.post(f"{url}/search", json={"question": "How many days of leave?", "top_k": 1}).json()["hits"]
        assert hits[0]["text"] == "Annual leave is 25 days."
    finally:
        query.stop(server)
    assert list(temp.iterdir()) == []
    assert sorted(path.name for path in workdir.iterdir()) == ["baseline-shard", "corpus.jsonl"]
