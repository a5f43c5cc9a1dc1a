"""The ungoverned baseline for bench/query.py: same embedder, plain vector search, no auth, no audit.

Run as `python bench/baseline_server.py CORPUS.jsonl PORT SHARD_DIR`; it indexes the plaintext chunks into its own
Qdrant Edge shard in SHARD_DIR (what an open RAG stack does) and serves POST /search {"question", "top_k"}. SHARD_DIR
is its caller's to remove: stopped by SIGTERM, the server ends by that signal (uvicorn raises it again once it has
shut down), running no cleanup of its own.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import qdrant_edge as edge  # noqa: E402
import uvicorn  # noqa: E402
from fastapi import FastAPI  # noqa: E402
from pydantic import BaseModel  # noqa: E402

from bench.common import read_jsonl  # noqa: E402
from retrieval.embeddings import get_embedder  # noqa: E402


class Search(BaseModel):
    question: str
    top_k: int = 5


def build(corpus_path: Path, root: Path) -> tuple[FastAPI, int]:
    """Index the corpus and return the app."""
    rows = read_jsonl(corpus_path)
    embedder = get_embedder()
    shard = edge.EdgeShard.create(str(root), edge.EdgeConfig(
        vectors=edge.EdgeVectorParams(size=384, distance=edge.Distance.Cosine)))
    for start in range(0, len(rows), 256):
        batch = rows[start:start + 256]
        vectors = embedder.embed([row["text"] for row in batch])
        shard.update(edge.UpdateOperation.upsert_points([
            edge.Point(start + i, vector.tolist(), {"text": row["text"], "department": row["department"]})
            for i, (row, vector) in enumerate(zip(batch, vectors, strict=True))]))
    shard.optimize()
    app = FastAPI()

    @app.post("/search")
    def search(body: Search) -> dict[str, object]:
        vector = embedder.embed_one(body.question)
        points = shard.query(edge.QueryRequest(limit=body.top_k, query=edge.Query.Nearest(vector),
                                               with_payload=True))
        return {"hits": [{"score": p.score, "text": (p.payload or {}).get("text")} for p in points]}

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app, len(rows)


if __name__ == "__main__":
    application, count = build(Path(sys.argv[1]), Path(sys.argv[3]))
    print(f"baseline indexed {count} chunks", flush=True)
    uvicorn.run(application, host="127.0.0.1", port=int(sys.argv[2]), log_level="warning")
