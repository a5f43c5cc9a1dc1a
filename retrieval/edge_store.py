"""Qdrant Edge backend: Qdrant's embedded Rust engine, one shard per department under the data dir.

Same operations as `retrieval.store.VectorStore`. Filters are built once, as qdrant-client models, in
`retrieval.store` (`AccessFilter.to_qdrant()`, `document_points`, `superseded_points`); this module translates them,
so both backends always enforce and delete by the same filter.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import qdrant_edge as edge
from qdrant_client import models

from core.logs import under_callers_request_id
from retrieval import store as vector_store
from retrieval.store import (
    AccessFilter,
    Hit,
    VectorPoint,
    document_points,
    payload_selection,
    point_id,
    superseded_points,
)

logger = logging.getLogger(__name__)

_INDEXED_FIELDS = (
    ("document_id", edge.PayloadSchemaType.Keyword),
    ("acl_groups", edge.PayloadSchemaType.Keyword),
    ("acl_scope", edge.PayloadSchemaType.Keyword),
    ("classification_rank", edge.PayloadSchemaType.Integer),
)
_OPTIMIZE_AFTER_POINTS = 2_000  # new points before a background index (HNSW) build
# An update is in the shard's write-ahead log when `update` returns, and a killed process replays it on load. Flushing
# the segments (an fsync of every segment file, 40-200 ms) is what survives a power cut: done at most this long after
# an upsert, in the background, instead of once per document.
_FLUSH_AFTER_SECONDS = 1.0


class EdgeVectorStore:
    """Department shards in one directory; HNSW and payload indexes built in the background."""

    def __init__(self, root: Path, dimension: int = 384) -> None:
        self._root = root
        self._dimension = dimension
        self._shards: dict[str, edge.EdgeShard] = {}
        self._pending: dict[str, int] = {}
        self._lock = threading.RLock()
        self._optimizing: set[str] = set()
        self._flush_due: set[str] = set()
        self._closing = threading.Lock()  # a background flush and `close` never overlap

    def upsert(self, department: str, points: list[VectorPoint]) -> None:
        """Insert or overwrite points in the department's shard."""
        if not points:
            return
        shard = self._shard(department, create=True)
        shard.update(edge.UpdateOperation.upsert_points(
            [edge.Point(p.point_id, p.vector, p.payload) for p in points]))
        self._flush_soon(department)
        self._maybe_optimize(department, len(points))

    def search(self, department: str, vector: list[float], access: AccessFilter, limit: int) -> list[Hit]:
        """Nearest chunks that pass the access filter; no unfiltered search exists."""
        shard = self._shard(department, create=False)
        if shard is None:
            return []
        request = edge.QueryRequest(limit=limit, query=edge.Query.Nearest(list(vector)),
                                    filter=_edge_filter(access), with_payload=True)
        return [Hit(point_id=str(point.id), score=point.score, payload=dict(point.payload or {}))
                for point in shard.query(request)]

    def search_many(self, access_by_department: dict[str, AccessFilter], vector: list[float],
                    limit: int) -> list[Hit]:
        """The `limit` nearest chunks over several departments, each searched under its own filter. Payloads
        (sealed text and sentence vectors, ~10 KiB a chunk) are read only for the chunks kept."""
        nearest = edge.Query.Nearest(list(vector))
        scored: list[tuple[float, str, Any]] = []
        for department, access in access_by_department.items():
            shard = self._shard(department, create=False)
            if shard is not None:
                request = edge.QueryRequest(limit=limit, query=nearest, filter=_edge_filter(access),
                                            with_payload=False)
                scored.extend((point.score, department, point.id) for point in shard.query(request))
        kept = sorted(scored, key=lambda item: item[0], reverse=True)[:limit]
        payloads = self._payloads(kept)
        return [Hit(point_id=str(point_id), score=score, payload=payloads[(department, point_id)])
                for score, department, point_id in kept
                if (department, point_id) in payloads]  # a point deleted meanwhile is simply gone

    def _payloads(self, kept: list[tuple[float, str, Any]]) -> dict[tuple[str, Any], dict[str, Any]]:
        payloads: dict[tuple[str, Any], dict[str, Any]] = {}
        for department in {department for _, department, _ in kept}:
            shard = self._shard(department, create=False)
            ids = [point_id for _, owner, point_id in kept if owner == department]
            for record in shard.retrieve(ids, True, False) if shard is not None else []:
                payloads[(department, record.id)] = dict(record.payload or {})
        return payloads

    def delete_document(self, department: str, document_id: str) -> None:
        """Remove every point of a document."""
        self._delete(department, document_points(document_id))

    def delete_superseded(self, department: str, document_id: str, *, served: int | None, through: int) -> None:
        """Remove the document's points of generations up to `through` other than the served one."""
        self._delete(department, superseded_points(document_id, served=served, through=through))

    def _delete(self, department: str, selector: models.Filter) -> None:
        """Remove the department's points that match `selector`."""
        shard = self._shard(department, create=False)
        if shard is None:
            return
        shard.update(edge.UpdateOperation.delete_points_by_filter(to_edge_filter(selector)))
        shard.flush()

    def chunk_payload(self, department: str, document_id: str, chunk_index: int,
                      generation: int) -> dict[str, Any] | None:
        """One chunk's payload of a generation (for explanations), None when the department holds no such chunk."""
        shard = self._shard(department, create=False)
        ids = [point_id(document_id, chunk_index, generation)]
        records = shard.retrieve(ids, True, False) if shard is not None else []
        return dict(records[0].payload or {}) if records else None

    def count(self, department: str) -> int:
        """Points stored for a department."""
        shard = self._shard(department, create=False)
        return 0 if shard is None else shard.count(edge.CountRequest(exact=True))

    def scroll_payloads(self, department: str, fields: Sequence[str] | None = None) -> list[dict[str, Any]]:
        """Every payload of a department (for audits and tests): `iter_payloads`, read whole."""
        return list(self.iter_payloads(department, fields))

    def iter_payloads(self, department: str, fields: Sequence[str] | None = None) -> Iterator[dict[str, Any]]:
        """Every payload of a department, read a page (`SCROLL_PAGE` points) at a time as it is iterated; only
        `fields` of each when given."""
        shard = self._shard(department, create=False)
        if shard is None:
            return
        offset = None
        while True:
            records, offset = shard.scroll(edge.ScrollRequest(offset=offset, limit=vector_store.SCROLL_PAGE,
                                                                   with_payload=payload_selection(fields)))
            yield from (dict(record.payload or {}) for record in records)
            if offset is None:
                return

    def ping(self) -> None:
        """Raise if the store directory is unusable."""
        self._root.mkdir(parents=True, exist_ok=True)

    def close(self) -> None:
        """Flush and close every shard."""
        with self._closing, self._lock:
            for shard in self._shards.values():
                shard.flush()
                shard.close()
            self._shards.clear()

    def optimize(self, department: str) -> None:
        """Build indexes now (blocking); normally done in the background."""
        shard = self._shard(department, create=False)
        if shard is not None:
            shard.optimize()

    def _shard(self, department: str, *, create: bool) -> edge.EdgeShard | None:
        with self._lock:
            if department in self._shards:
                return self._shards[department]
            path = self._root / department
            if path.is_dir() and any(path.iterdir()):
                shard = edge.EdgeShard.load(str(path))
            elif create:
                shard = self._create(path)
            else:
                return None
            self._shards[department] = shard
            return shard

    def _create(self, path: Path) -> edge.EdgeShard:
        path.mkdir(parents=True, exist_ok=True)
        config = edge.EdgeConfig(vectors=edge.EdgeVectorParams(size=self._dimension, distance=edge.Distance.Cosine))
        shard = edge.EdgeShard.create(str(path), config)
        for field, schema in _INDEXED_FIELDS:
            shard.update(edge.UpdateOperation.create_field_index(field, schema))
        return shard

    def _flush_soon(self, department: str) -> None:
        """Flush the department's segments within _FLUSH_AFTER_SECONDS (one pending flush per shard)."""
        with self._lock:
            if department in self._flush_due:
                return
            self._flush_due.add(department)
        # under the writer's request id (only): a failure is logged with the id of the write that made the shard dirty
        flush = under_callers_request_id(self._flush_in_background)
        timer = threading.Timer(_FLUSH_AFTER_SECONDS, flush, args=(department,))
        timer.daemon = True
        timer.start()

    def _flush_in_background(self, department: str) -> None:
        with self._closing:
            with self._lock:
                self._flush_due.discard(department)
                shard = self._shards.get(department)
            if shard is None:
                return  # closed meanwhile: `close` flushed it
            try:
                shard.flush()
            except Exception:  # noqa: BLE001 - the write-ahead log still holds the update
                logger.exception("background flush failed for a department shard")

    def _maybe_optimize(self, department: str, added: int) -> None:
        with self._lock:
            self._pending[department] = self._pending.get(department, 0) + added
            if self._pending[department] < _OPTIMIZE_AFTER_POINTS or department in self._optimizing:
                return
            self._pending[department] = 0
            self._optimizing.add(department)
        # under the writer's request id (only): a failure is logged with the id of the write that crossed the threshold
        build = under_callers_request_id(self._optimize_in_background)
        threading.Thread(target=build, args=(department,), daemon=True).start()

    def _optimize_in_background(self, department: str) -> None:
        try:
            self.optimize(department)
        except Exception:  # noqa: BLE001 - an index build failure must not take the store down
            logger.exception("background index build failed for a department shard")
        finally:
            with self._lock:
                self._optimizing.discard(department)


@lru_cache(maxsize=4096)
def _edge_filter(access: AccessFilter) -> edge.Filter:
    """The access filter as Edge's type, built once per distinct filter (building costs ~0.1 ms)."""
    return to_edge_filter(access.to_qdrant())


def to_edge_filter(source: models.Filter) -> edge.Filter:
    """Translate a qdrant-client filter (as built by AccessFilter) into Qdrant Edge's types."""
    return edge.Filter(
        must=_conditions(source.must), should=_conditions(source.should), must_not=_conditions(source.must_not))


def _conditions(conditions: Any) -> list[Any] | None:
    if conditions is None:
        return None
    items = conditions if isinstance(conditions, list) else [conditions]
    return [_condition(item) for item in items]


def _condition(condition: Any) -> Any:
    if isinstance(condition, models.Filter):
        return to_edge_filter(condition)
    if isinstance(condition, models.FieldCondition):
        return edge.FieldCondition(key=condition.key, match=_match(condition.match), range=_range(condition.range))
    raise TypeError(f"unsupported filter condition for the edge backend: {type(condition).__name__}")


def _match(match: Any) -> Any:
    if match is None:
        return None
    if isinstance(match, models.MatchValue):
        return edge.MatchValue(match.value)
    if isinstance(match, models.MatchAny):
        return edge.MatchAny(list(match.any))
    if isinstance(match, models.MatchExcept):
        return edge.MatchExcept(list(match.except_))
    raise TypeError(f"unsupported match for the edge backend: {type(match).__name__}")


def _range(value: Any) -> Any:
    if value is None:
        return None
    if isinstance(value, models.Range):
        return edge.RangeFloat(gt=value.gt, gte=value.gte, lt=value.lt, lte=value.lte)
    raise TypeError(f"unsupported range for the edge backend: {type(value).__name__}")
