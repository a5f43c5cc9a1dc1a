"""Congruence: Qdrant Edge, Qdrant local mode and Qdrant in memory return the same authorised results."""

from __future__ import annotations

import contextvars
import json
import random
import shutil
import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from qdrant_client import QdrantClient

from core import timing
from core.logs import JsonFormatter, MaskingFilter, request_id_var, under_callers_request_id
from retrieval import edge_store
from retrieval.edge_store import EdgeVectorStore
from retrieval.store import AccessFilter, VectorPoint, VectorStore
from tests.support.polling import wait_until

DIM = 16
GROUPS = ["hr-staff", "hr-managers", "payroll", "legal"]


def _corpus(seed: int = 7) -> dict[str, list[VectorPoint]]:
    rng = random.Random(seed)
    corpus: dict[str, list[VectorPoint]] = {}
    for department in ("hr", "finance"):
        points = []
        for doc in range(12):
            acl = rng.sample(GROUPS, rng.choice([0, 0, 1, 2]))
            for chunk in range(5):
                points.append(VectorPoint(
                    document_id=f"{department}-doc-{doc}", chunk_index=chunk,
                    vector=[rng.uniform(-1, 1) for _ in range(DIM)],
                    payload={"document_id": f"{department}-doc-{doc}", "chunk_id": f"{doc}:{chunk}",
                             "department": department, "acl_groups": acl, "acl_scope": "groups" if acl else "open",
                             "classification_rank": rng.randint(0, 3)}))
        corpus[department] = points
    return corpus


@pytest.fixture
def stores(tmp_path: Path):  # type: ignore[no-untyped-def]
    built = {
        "edge": EdgeVectorStore(tmp_path / "edge", dimension=DIM),
        "local": VectorStore(QdrantClient(path=str(tmp_path / "local")), dimension=DIM, payload_indexes=False),
        "memory": VectorStore(QdrantClient(":memory:"), dimension=DIM, payload_indexes=False),
    }
    corpus = _corpus()
    for store in built.values():
        for department, points in corpus.items():
            store.upsert(department, points)
    yield built
    for store in built.values():
        store.close()


def _allowed(payload: dict[str, object], groups: tuple[str, ...], clearance: int) -> bool:
    acl, rank = payload["acl_groups"], payload["classification_rank"]
    assert isinstance(acl, list) and isinstance(rank, int)
    return rank <= clearance and (payload["acl_scope"] == "open" or bool(set(acl) & set(groups)))


@pytest.mark.parametrize(("groups", "clearance"), [((), 3), (("hr-staff",), 1), (("payroll", "legal"), 2),
                                                   (tuple(GROUPS), 0), (tuple(GROUPS), 3)])
def test_backends_agree_and_only_return_authorised_points(stores, groups: tuple[str, ...],  # type: ignore[no-untyped-def]
                                                          clearance: int) -> None:
    rng = random.Random(11)
    access = AccessFilter(groups=groups, max_classification_rank=clearance)
    for _ in range(15):
        query = [rng.uniform(-1, 1) for _ in range(DIM)]
        for department in ("hr", "finance"):
            results = {name: store.search(department, query, access, limit=8) for name, store in stores.items()}
            ids = {name: [hit.payload["chunk_id"] for hit in hits] for name, hits in results.items()}
            assert ids["edge"] == ids["local"] == ids["memory"]
            for hits in results.values():
                assert all(_allowed(hit.payload, groups, clearance) and hit.payload["department"] == department
                           for hit in hits)


def test_backends_agree_across_departments_each_under_its_own_filter(stores) -> None:  # type: ignore[no-untyped-def]
    rng = random.Random(5)
    access = {"hr": AccessFilter(groups=("hr-staff",), max_classification_rank=2),
              "finance": AccessFilter(groups=(), max_classification_rank=1), "nonexistent": AccessFilter((), 3)}
    for _ in range(15):
        query = [rng.uniform(-1, 1) for _ in range(DIM)]
        results = {name: store.search_many(access, query, limit=6) for name, store in stores.items()}
        ids = {name: [(hit.payload["department"], hit.payload["chunk_id"]) for hit in hits]
               for name, hits in results.items()}
        assert ids["edge"] == ids["local"] == ids["memory"] and len(ids["edge"]) == 6
        single = sorted((hit for department in ("hr", "finance")
                         for hit in stores["memory"].search(department, query, access[department], limit=6)),
                        key=lambda hit: hit.score, reverse=True)[:6]
        assert ids["memory"] == [(hit.payload["department"], hit.payload["chunk_id"]) for hit in single]
        for hits in results.values():
            assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
            assert all(_allowed(hit.payload, access[str(hit.payload["department"])].groups,
                                access[str(hit.payload["department"])].max_classification_rank) for hit in hits)


def test_backends_agree_on_delete_and_count(stores) -> None:  # type: ignore[no-untyped-def]
    for store in stores.values():
        store.delete_document("hr", "hr-doc-3")
    counts = {name: store.count("hr") for name, store in stores.items()}
    assert counts == {"edge": 55, "local": 55, "memory": 55}
    for store in stores.values():
        assert all(p["document_id"] != "hr-doc-3" for p in store.scroll_payloads("hr"))
        everything = AccessFilter(groups=(), max_classification_rank=3)
        assert store.search("nonexistent", [0.0] * DIM, everything, limit=3) == []


def _generation(store, generation: int, chunks: int) -> None:  # type: ignore[no-untyped-def]
    """`hr-doc-3`'s chunks written again by a run of `generation` (beside the corpus's, which carry none)."""
    store.upsert("hr", [VectorPoint(document_id="hr-doc-3", chunk_index=chunk, vector=[0.5] * DIM,
                                    payload={"document_id": "hr-doc-3", "generation": generation})
                        for chunk in range(chunks)])


def _generations(store) -> list[int]:  # type: ignore[no-untyped-def]
    return sorted(int(p.get("generation", 0)) for p in store.scroll_payloads("hr") if p["document_id"] == "hr-doc-3")


@pytest.mark.parametrize(("served", "through", "left"), [
    (2, 2, [2, 2, 3, 3, 3]),  # a run of 2 ended ready: 0 and 1 go, 3 (a later run's) stays
    (0, 3, [0, 0, 0, 0, 0]),  # re-indexes that failed: the points without a generation are served and stay
    (1, 3, [1]),  # a failed re-index over generation 1: 2 and 3 go, and the unnumbered ones (superseded by 1)
    (None, 2, [3, 3, 3]),  # quarantined: nothing is served, a later run's points stay
])
def test_backends_agree_on_removing_superseded_generations(stores, served: int | None, through: int,  # type: ignore[no-untyped-def]
                                                           left: list[int]) -> None:
    for store in stores.values():
        for generation, chunks in ((1, 1), (2, 2), (3, 3)):
            _generation(store, generation, chunks)
        store.delete_superseded("hr", "hr-doc-3", served=served, through=through)
    assert {name: _generations(store) for name, store in stores.items()} == dict.fromkeys(stores, left)
    assert {store.count("hr") for store in stores.values()} == {55 + len(left)}  # no other document's is touched


def test_edge_store_persists_and_reopens(tmp_path: Path) -> None:
    store = EdgeVectorStore(tmp_path / "edge", dimension=DIM)
    store.upsert("hr", _corpus()["hr"])
    store.optimize("hr")
    store.close()
    reopened = EdgeVectorStore(tmp_path / "edge", dimension=DIM)
    assert reopened.count("hr") == 60
    reopened.close()


_UPSERT_THEN_DIE = """
import os, sys
sys.path[:0] = [{root!r}, {tests!r}]
from pathlib import Path
from retrieval import edge_store
from retrieval.edge_store import EdgeVectorStore
from test_vector_backends import DIM, _corpus
store = EdgeVectorStore(Path({path!r}), dimension=DIM)
store.upsert("hr", _corpus()["hr"])
os.kill(os.getpid(), 9)  # before any flush: only the write-ahead log holds the points
"""


def test_edge_upsert_survives_a_killed_process_before_its_flush(tmp_path: Path) -> None:
    root, tests = Path(__file__).resolve().parents[2], Path(__file__).resolve().parent
    script = _UPSERT_THEN_DIE.format(root=str(root), tests=str(tests), path=str(tmp_path / "edge"))
    killed = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120,  # noqa: S603
                            check=False)
    assert killed.returncode == -signal.SIGKILL
    reopened = EdgeVectorStore(tmp_path / "edge", dimension=DIM)
    assert reopened.count("hr") == 60
    reopened.close()


def test_edge_flushes_segments_in_the_background(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(edge_store, "_FLUSH_AFTER_SECONDS", 0.05)
    store = EdgeVectorStore(tmp_path / "edge", dimension=DIM)
    flushed = threading.Event()
    shard = store._shard("hr", create=True)  # noqa: SLF001 - the shard whose flush is observed
    store._shards["hr"] = _FlushSpy(shard, flushed)  # noqa: SLF001
    store.upsert("hr", _corpus()["hr"])
    assert flushed.wait(timeout=10)
    store.close()


class _FlushSpy:
    """An Edge shard that reports its flushes."""

    def __init__(self, shard: object, flushed: threading.Event) -> None:
        self._shard, self._flushed = shard, flushed

    def flush(self) -> None:
        self._shard.flush()  # type: ignore[attr-defined]
        self._flushed.set()

    def __getattr__(self, name: str) -> object:
        return getattr(self._shard, name)


@pytest.fixture
def as_a_request() -> Iterator[str]:
    """The test thread under a request id, as the API's middleware sets it for a request (32 hex digits)."""
    token = request_id_var.set(uuid.uuid4().hex)
    try:
        yield request_id_var.get()
    finally:
        request_id_var.reset(token)


def _request_ids_logged(caplog: pytest.LogCaptureFixture, message: str) -> list[str]:
    """The request id of each JSON line logged with `message` (each record stamped as every handler stamps it)."""
    return [json.loads(JsonFormatter().format(record))["request_id"] for record in caplog.records
            if record.getMessage() == message]


def test_a_background_flush_that_fails_is_logged_with_the_writers_request_id(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, as_a_request: str) -> None:
    """The flush's timer thread inherited no context: its failure said `-`, tying it to no request."""
    monkeypatch.setattr(edge_store, "_FLUSH_AFTER_SECONDS", 0.05)
    caplog.handler.addFilter(MaskingFilter())
    store = EdgeVectorStore(tmp_path / "edge", dimension=DIM)
    with store._closing:  # noqa: SLF001 - the flush waits for it: the shard's files are gone before it runs
        store.upsert("hr", _corpus()["hr"])
        shutil.rmtree(tmp_path / "edge" / "hr")
    failed = "background flush failed for a department shard"
    wait_until(lambda: bool(_request_ids_logged(caplog, failed)), 60, "the background flush's failure")
    assert _request_ids_logged(caplog, failed) == [as_a_request]


def test_a_background_index_build_that_fails_is_logged_with_the_writers_request_id(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, as_a_request: str) -> None:
    """The index build's thread inherited no context: its failure said `-`, tying it to no request."""
    monkeypatch.setattr(edge_store, "_OPTIMIZE_AFTER_POINTS", 1)
    caplog.handler.addFilter(MaskingFilter())
    store = EdgeVectorStore(tmp_path / "edge", dimension=DIM)
    with store._lock:  # noqa: SLF001 - the build waits for it to open the shard, which is unreadable by then
        store.upsert("hr", _corpus()["hr"])
        # closed as `close` closes it, which cannot be called here: it would wait for the flush timer, which may hold
        # `_closing` already and wait for this lock
        store._shards.pop("hr").close()  # noqa: SLF001
        shutil.rmtree(tmp_path / "edge" / "hr")
        (tmp_path / "edge" / "hr").mkdir()
        (tmp_path / "edge" / "hr" / "not-a-segment").write_text("x")
    failed = "background index build failed for a department shard"
    wait_until(lambda: bool(_request_ids_logged(caplog, failed)), 60, "the background index build's failure")
    assert _request_ids_logged(caplog, failed) == [as_a_request]


def _handed_over_by_a_traced_write() -> tuple[tuple[str, str, bool], str]:
    """What work wrapped during a write (its stage timed, its span current) sees on a thread of its own: the request
    id, the Server-Timing stages and whether a span is current; and the write's own stages afterwards."""
    timing.start_request()
    with timing.stage("ingest.index"), TracerProvider().get_tracer("test").start_as_current_span("govrag.ingest.index"):
        work = under_callers_request_id(lambda: (request_id_var.get(), timing.server_timing_header(),
                                                 trace.get_current_span().get_span_context().is_valid))
    seen: list[tuple[str, str, bool]] = []
    thread = threading.Thread(target=lambda: seen.append(work()))
    thread.start()
    thread.join()
    return seen[0], timing.server_timing_header()


def test_work_handed_to_a_thread_carries_the_callers_request_id_and_nothing_else_of_its_context(
        as_a_request: str) -> None:
    """The flush and the index build run after the write's request: its Server-Timing stages (read by its response)
    and its tracing span (ended) are not theirs. They ran in a copy of the writer's whole context."""
    seen, writers_stages = contextvars.copy_context().run(_handed_over_by_a_traced_write)  # no stages left behind
    assert seen == (as_a_request, "", False)
    assert writers_stages.startswith("ingest.index;dur=")  # the write's own, kept


def test_every_backend_pages_through_a_department_and_returns_every_payload(
        stores, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    """The Qdrant client backends made one scroll call of 100,000 points: a bigger department's training export left
    the rest out. Now they page (here 7 points a call) until Qdrant says there is no more."""
    from retrieval import store as store_module

    monkeypatch.setattr(store_module, "SCROLL_PAGE", 7)
    for name in ("local", "memory"):
        client, limits = stores[name]._client, []
        real_scroll = client.scroll

        def counted(*args, real_scroll=real_scroll, limits=limits, **kwargs):  # type: ignore[no-untyped-def]
            limits.append(kwargs["limit"])
            return real_scroll(*args, **kwargs)

        monkeypatch.setattr(client, "scroll", counted)
        payloads = stores[name].scroll_payloads("hr")
        assert sorted(p["chunk_id"] for p in payloads) == sorted(f"{d}:{c}" for d in range(12) for c in range(5))
        assert limits == [7] * 9, name  # 60 points: 8 full pages and a short one
    assert len(stores["edge"].scroll_payloads("hr")) == 60
