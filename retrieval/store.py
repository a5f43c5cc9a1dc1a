"""The vector store: one Qdrant collection per department, searched only through an access filter."""

from __future__ import annotations

import fcntl
import threading
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TextIO

from qdrant_client import QdrantClient, models
from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse

from core import forksafe
from core.errors import EmbeddedStoreHeld, Unavailable, UnusablePath
from core.settings import Settings

POINT_NAMESPACE = uuid.UUID("6f1d0c1e-8a4b-4bb0-9a55-2b9c3f1e7a10")
GENERATION = "generation"  # the payload field naming the run that wrote a point (ingestion/service.py)
_OVERLOADED = (502, 503, 504)  # a Qdrant node (or the proxy before it) that cannot serve now
SCROLL_PAGE = 1000  # points per scroll call


@dataclass(frozen=True)
class VectorPoint:
    """One protected chunk: its vector and a payload that never holds plaintext."""

    document_id: str
    chunk_index: int
    vector: list[float]
    payload: dict[str, Any]

    @property
    def point_id(self) -> str:
        """Deterministic, so writing a chunk again overwrites instead of duplicating; a new generation's points
        stand beside the served one's."""
        return point_id(self.document_id, self.chunk_index, payload_generation(self.payload))


def point_id(document_id: str, chunk_index: int, generation: int) -> str:
    """The id of a chunk's point of one generation in its department's collection (generation 0's, written before
    generations, keep the id they had)."""
    name = f"{document_id}:{chunk_index}" + (f":{generation}" if generation else "")
    return str(uuid.uuid5(POINT_NAMESPACE, name))


def payload_generation(payload: Mapping[str, Any]) -> int:
    """The generation a point belongs to: points written before generations carry none and are generation 0; a
    value that is no generation's (an altered payload) is -1, which no document serves."""
    value = payload.get(GENERATION, 0)
    return value if type(value) is int else -1


def payload_selection(fields: Sequence[str] | None) -> bool | list[str]:
    """What a scroll reads of each payload, in both engines' terms: all of it, or only `fields`."""
    return True if fields is None else list(fields)


def _of_document(document_id: str) -> models.FieldCondition:
    return models.FieldCondition(key="document_id", match=models.MatchValue(value=document_id))


def document_points(document_id: str) -> models.Filter:
    """Every point of a document, of every generation."""
    return models.Filter(must=[_of_document(document_id)])


def superseded_points(document_id: str, *, served: int | None, through: int) -> models.Filter:
    """The document's points of every generation up to `through` except the served one: a later generation's
    belong to a run still going. Points without a generation are generation 0."""
    document = _of_document(document_id)
    if served == 0:  # keep the points that carry no generation: select the numbered ones only
        numbered = models.FieldCondition(key=GENERATION, range=models.Range(gt=0, lte=through))
        return models.Filter(must=[document, numbered])
    kept: list[models.Condition] = [models.FieldCondition(key=GENERATION, range=models.Range(gt=through))]
    if served is not None:
        kept.append(models.FieldCondition(key=GENERATION, match=models.MatchValue(value=served)))
    return models.Filter(must=[document], must_not=kept)


@dataclass(frozen=True)
class AccessFilter:
    """What the caller may see inside one department: chunks at or below its clearance there that are
    open or shared with one of its groups. Built from the authorization decision; every search needs one."""

    groups: tuple[str, ...]
    max_classification_rank: int  # the caller's clearance in the department (public 0 … restricted 3)

    def to_qdrant(self) -> models.Filter:
        """The mandatory payload filter: clearance AND (open OR shared group); missing fields never match."""
        conditions: list[models.Condition] = [
            models.FieldCondition(key="acl_scope", match=models.MatchValue(value="open")),
        ]
        if self.groups:
            conditions.append(models.FieldCondition(key="acl_groups", match=models.MatchAny(any=list(self.groups))))
        clearance = models.FieldCondition(key="classification_rank",
                                          range=models.Range(lte=self.max_classification_rank))
        return models.Filter(must=[clearance], should=conditions)


@dataclass(frozen=True)
class Hit:
    """A point a search found: its id tells apart two hits of one chunk (generations) and one hit found twice."""

    point_id: str
    score: float
    payload: dict[str, Any]


def collection_name(department: str) -> str:
    """The department's collection."""
    return f"dept_{department}"


class VectorStore:
    """Thin, department-scoped operations over a Qdrant client (server or local mode)."""

    def __init__(self, client: QdrantClient, dimension: int = 384, *, payload_indexes: bool = True,
                 replication_factor: int | None = None) -> None:
        self._client = client
        self._replication_factor = replication_factor
        self._payload_indexes = payload_indexes  # local mode ignores them (and warns)
        self._dimension = dimension
        # Local mode is pure Python and not safe for concurrent writers; a lock is cheap here.
        self._lock = threading.RLock()

    def upsert(self, department: str, points: list[VectorPoint]) -> None:
        """Insert or overwrite points in the department's collection."""
        if not points:
            return
        with self._calling():
            self._ensure_collection(department)
            self._client.upsert(
                collection_name=collection_name(department),
                points=[models.PointStruct(id=p.point_id, vector=p.vector, payload=p.payload) for p in points],
                wait=True,
            )

    def search(self, department: str, vector: list[float], access: AccessFilter, limit: int) -> list[Hit]:
        """Nearest chunks that pass the access filter; no unfiltered search exists."""
        with self._calling():
            if not self._client.collection_exists(collection_name(department)):
                return []
            response = self._client.query_points(
                collection_name=collection_name(department), query=vector, query_filter=access.to_qdrant(),
                limit=limit, with_payload=True,
            )
        return [Hit(point_id=str(point.id), score=point.score, payload=dict(point.payload or {}))
                for point in response.points]

    def search_many(self, access_by_department: dict[str, AccessFilter], vector: list[float],
                    limit: int) -> list[Hit]:
        """The `limit` nearest chunks over several departments, each searched under its own filter."""
        hits = [hit for department, access in access_by_department.items()
                for hit in self.search(department, vector, access, limit)]
        return sorted(hits, key=lambda hit: hit.score, reverse=True)[:limit]

    def delete_document(self, department: str, document_id: str) -> None:
        """Remove every point of a document."""
        self._delete(department, document_points(document_id))

    def delete_superseded(self, department: str, document_id: str, *, served: int | None, through: int) -> None:
        """Remove the document's points of generations up to `through` other than the served one."""
        self._delete(department, superseded_points(document_id, served=served, through=through))

    def _delete(self, department: str, selector: models.Filter) -> None:
        """Remove the department's points that match `selector`."""
        with self._calling():
            if not self._client.collection_exists(collection_name(department)):
                return
            self._client.delete(collection_name=collection_name(department),
                                points_selector=models.FilterSelector(filter=selector), wait=True)

    def chunk_payload(self, department: str, document_id: str, chunk_index: int,
                      generation: int) -> dict[str, Any] | None:
        """One chunk's payload of a generation (for explanations), None when the department holds no such chunk."""
        with self._calling():
            if not self._client.collection_exists(collection_name(department)):
                return None
            records = self._client.retrieve(collection_name(department),
                                            ids=[point_id(document_id, chunk_index, generation)],
                                            with_payload=True, with_vectors=False)
        return dict(records[0].payload or {}) if records else None

    def count(self, department: str) -> int:
        """Points stored for a department."""
        with self._calling():
            if not self._client.collection_exists(collection_name(department)):
                return 0
            return self._client.count(collection_name(department), exact=True).count

    def scroll_payloads(self, department: str, fields: Sequence[str] | None = None) -> list[dict[str, Any]]:
        """Every payload of a department (for audits and tests): `iter_payloads`, read whole."""
        return list(self.iter_payloads(department, fields))

    def iter_payloads(self, department: str, fields: Sequence[str] | None = None) -> Iterator[dict[str, Any]]:
        """Every payload of a department, read a page (`SCROLL_PAGE` points) at a time as it is iterated (one call
        used to stop at 100,000 points, and a training export then left out the rest under a manifest that vouched
        for it), so a caller that keeps none holds one page; only `fields` of each when given (no sealed text nor
        sentence vectors for a caller that reads none). The client's lock is held per page, not between them."""
        with self._calling():
            if not self._client.collection_exists(collection_name(department)):
                return
        offset: Any = None
        while True:
            with self._calling():
                points, offset = self._client.scroll(collection_name(department), limit=SCROLL_PAGE, offset=offset,
                                                     with_payload=payload_selection(fields))
            yield from (dict(point.payload or {}) for point in points)
            if offset is None:
                return

    def ping(self) -> None:
        """Raise if the store cannot answer."""
        with self._calling():
            self._client.get_collections()

    def close(self) -> None:
        """Close the underlying client."""
        with self._calling():
            self._client.close()

    @contextmanager
    def _calling(self) -> Iterator[None]:
        """Hold the client's lock; a server that does not answer raises `Unavailable` (retry later), not a crash."""
        with self._lock:
            try:
                yield
            except ResponseHandlingException as error:  # the request never got an answer (refused, reset, timed out)
                raise Unavailable("vector store") from error
            except UnexpectedResponse as error:
                if error.status_code in _OVERLOADED:
                    raise Unavailable("vector store") from error
                raise

    def _ensure_collection(self, department: str) -> None:
        name = collection_name(department)
        if self._client.collection_exists(name):
            return
        self._client.create_collection(
            name, vectors_config=models.VectorParams(size=self._dimension, distance=models.Distance.COSINE),
            replication_factor=self._replication_factor)
        if not self._payload_indexes:
            return
        for field, schema in (("document_id", models.PayloadSchemaType.KEYWORD),
                              ("acl_groups", models.PayloadSchemaType.KEYWORD),
                              ("acl_scope", models.PayloadSchemaType.KEYWORD),
                              ("classification_rank", models.PayloadSchemaType.INTEGER)):
            self._client.create_payload_index(name, field_name=field, field_schema=schema)


class VectorIndex(Protocol):
    """What the query and ingestion paths need from a vector engine (Qdrant client or Qdrant Edge)."""

    def upsert(self, department: str, points: list[VectorPoint]) -> None: ...
    def search(self, department: str, vector: list[float], access: AccessFilter, limit: int) -> list[Hit]: ...
    def search_many(self, access_by_department: dict[str, AccessFilter], vector: list[float],
                    limit: int) -> list[Hit]: ...
    def delete_document(self, department: str, document_id: str) -> None: ...
    def delete_superseded(self, department: str, document_id: str, *, served: int | None, through: int) -> None: ...
    def chunk_payload(self, department: str, document_id: str, chunk_index: int,
                      generation: int) -> dict[str, Any] | None: ...
    def count(self, department: str) -> int: ...
    def scroll_payloads(self, department: str, fields: Sequence[str] | None = None) -> list[dict[str, Any]]: ...
    def iter_payloads(self, department: str, fields: Sequence[str] | None = None) -> Iterator[dict[str, Any]]: ...
    def ping(self) -> None: ...
    def close(self) -> None: ...


_STORES: dict[str, VectorIndex] = {}
_HOLDS: dict[str, TextIO] = {}  # an embedded store's lock file, held while this process has the store open
_STORES_LOCK = forksafe.lock()
# A forked child opens its own store: the parent's client connections, engine threads and lock file are the parent's
# (closed in the child, a store would flush into the parent's files and unlock its lock file for it). An embedded store
# stays the parent's: the child's open is EmbeddedStoreHeld.
forksafe.rebuilt_in_child(_STORES)
forksafe.rebuilt_in_child(_HOLDS)


def open_vector_store(settings: Settings) -> VectorIndex:
    """The process's store: a Qdrant server when configured, else the embedded engine under the data dir
    (EmbeddedStoreHeld if another process has that open, UnusablePath if this user may not use its folder)."""
    location = _location(settings)
    with _STORES_LOCK:
        if location not in _STORES:
            with _folder_usable(settings):
                if not settings.qdrant_url:
                    _HOLDS[location] = _hold(settings.resolved_qdrant_path)
                try:
                    _STORES[location] = _build(settings)
                except BaseException:
                    _release(location)
                    raise
        return _STORES[location]


@contextmanager
def _folder_usable(settings: Settings) -> Iterator[None]:
    """An embedded store whose folder (or the lock file beside it) this user may not make, read or write:
    UnusablePath, said in one line, not the engine's traceback."""
    try:
        yield
    except OSError as error:
        if settings.qdrant_url:
            raise
        raise UnusablePath.refused(f"the embedded vector store in {settings.resolved_qdrant_path}", error,
                                   "GOVRAG_QDRANT_PATH") from None


def vector_store_is_open(settings: Settings) -> bool:
    """Whether this process has the store open (`open_vector_store`, not closed since)."""
    with _STORES_LOCK:
        return _location(settings) in _STORES


def close_vector_store(settings: Settings) -> None:
    """Release the store, so another process may open an embedded store's path."""
    location = _location(settings)
    with _STORES_LOCK:
        store = _STORES.pop(location, None)
        try:
            if store is not None:
                store.close()
        finally:
            _release(location)


def _hold(path: Path) -> TextIO:
    """Lock `<path>.lock` for this process, or raise EmbeddedStoreHeld. The engines lock their own files only when
    a shard is first used, and fail then with an engine error in the middle of the work."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = path.with_name(path.name + ".lock").open("a")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise EmbeddedStoreHeld(path) from None
    return handle


def _release(location: str) -> None:
    handle = _HOLDS.pop(location, None)
    if handle is not None:
        handle.close()  # closing the file releases the lock


def _location(settings: Settings) -> str:
    return settings.qdrant_url or f"{settings.vector_backend}:{settings.resolved_qdrant_path.resolve()}"


def _build(settings: Settings) -> VectorIndex:
    if settings.qdrant_url:
        return VectorStore(QdrantClient(url=settings.qdrant_url),
                           replication_factor=settings.qdrant_replication_factor)
    # Embedded engines allow one process per path; inside the process the store is shared.
    path = settings.resolved_qdrant_path
    path.mkdir(parents=True, exist_ok=True)
    if settings.vector_backend == "edge":
        from retrieval.edge_store import EdgeVectorStore  # it builds on this module's types

        return EdgeVectorStore(path)
    return VectorStore(QdrantClient(path=str(path)), payload_indexes=False)
