"""bench/query.py stops its servers: the ungoverned baseline leaves no file behind, and none is left running."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from bench import query
from tests.support.polling import lines_until


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


@contextmanager
def _server(on_sigterm: str) -> Iterator[subprocess.Popen[bytes]]:
    """A stand-in server, once it has set `on_sigterm` (Python naming the handler) as what SIGTERM does to it."""
    code = (f"import os, signal, time; signal.signal(signal.SIGTERM, {on_sigterm}); print('ready', flush=True); "
            "time.sleep(600)")
    server = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)  # noqa: S603
    try:
        lines_until(server, "ready")
        yield server
    finally:
        server.kill()
        server.wait()
        server.stdout.close()  # type: ignore[union-attr]


def test_a_server_that_does_not_end_on_sigterm_is_killed_after_the_grace_period(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Stopping a server waited 30 s for SIGTERM to end it, then raised TimeoutExpired: the bench ended in a
    traceback with the server still running (and the other one, stopped after it, too). Now one that outlives the
    grace period is killed and reaped."""
    monkeypatch.setattr(query, "STOP_GRACE_SECONDS", 1, raising=False)
    with _server("signal.SIG_IGN") as server:
        query.stop(server)
        assert server.returncode == -signal.SIGKILL


def test_a_server_that_ends_on_sigterm_is_not_killed() -> None:
    """The grace period's other side: a server that ends on SIGTERM (as `govrag serve` does, shutting down cleanly)
    is reaped with SIGTERM's status, never killed."""
    with _server("signal.SIG_DFL") as server:
        query.stop(server)
        assert server.returncode == -signal.SIGTERM


def test_a_ctrl_c_while_a_server_is_stopping_kills_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """A Ctrl-C during the wait for a server to end (which on SIGTERM tells the bench so here, and goes on) left it
    running. Now it is killed and reaped, and the Ctrl-C goes on."""
    monkeypatch.setattr(query, "STOP_GRACE_SECONDS", 600, raising=False)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with _server("lambda *_: os.kill(os.getppid(), signal.SIGINT)") as server:
            with pytest.raises(KeyboardInterrupt):
                query.stop(server)
            assert server.returncode == -signal.SIGKILL
    finally:
        signal.signal(signal.SIGINT, previous)
