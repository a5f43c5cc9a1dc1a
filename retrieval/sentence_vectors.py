"""Sentence vectors computed once at ingestion and sealed with their chunk, so answering embeds nothing.

The extractive answer scores each sentence of a retrieved chunk against the question. Embedding those sentences
at query time was most of a query's cost; the ingestion pipeline embeds them once instead. They are stored
keyed by a short digest of the exact text the answer scores, so a chunk whose text or sentence splitting changed
since (a neutralised chunk, a new splitter) simply misses and is embedded at query time as before.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from retrieval.answer import SENTENCE_KEY_BYTES, sentence_key, sentence_spans
from retrieval.embeddings import TextEmbedder

KEY_BYTES = SENTENCE_KEY_BYTES
VECTOR_DTYPE = np.dtype("<f2")  # half precision: ranking is unchanged, the payload is half the size

SentenceVectors = Mapping[bytes, np.ndarray]


def embed_chunks(embedder: TextEmbedder, texts: list[str]) -> tuple[np.ndarray, list[bytes]]:
    """Chunk vectors (exactly `embedder.embed(texts)`) and each chunk's packed sentence vectors.

    With the ONNX embedder a sentence's vector is the mean of its token states in the chunk's own forward pass,
    so it costs nothing extra; other embedders embed the sentences separately, all in one call."""
    located = [sentence_spans(text) for text in texts]
    if hasattr(embedder, "embed_with_spans"):
        vectors, per_chunk = embedder.embed_with_spans(texts, [[span for _, span in spans] for spans in located])
    else:
        vectors = embedder.embed(texts)
        flat = embedder.embed([scored for spans in located for scored, _ in spans])
        bounds = np.cumsum([0] + [len(spans) for spans in located])
        per_chunk = [flat[bounds[i]:bounds[i + 1]] for i in range(len(located))]
    packed = [pack([scored for scored, _ in spans], rows) for spans, rows in zip(located, per_chunk, strict=True)]
    return vectors, packed


def pack(sentences: list[str], vectors: np.ndarray) -> bytes:
    """Keys then half-precision rows: count (4 bytes), dimension (4 bytes), keys, rows. Zero rows (a sentence the
    embedder could not see) and repeated sentences are left out: the answer embeds those at query time."""
    seen: set[str] = set()
    keep = [i for i, sentence in enumerate(sentences)
            if np.any(vectors[i]) and not (sentence in seen or seen.add(sentence))]
    dimension = int(vectors.shape[1]) if keep else 0
    header = np.array([len(keep), dimension], dtype="<u4").tobytes()
    keys = b"".join(sentence_key(sentences[i]) for i in keep)
    rows = np.ascontiguousarray(vectors[keep], dtype=VECTOR_DTYPE).tobytes() if keep else b""
    return header + keys + rows


def unpack(blob: bytes) -> dict[bytes, np.ndarray]:
    """Inverse of `pack`: sentence key → float32 unit vector. A malformed blob raises ValueError."""
    if len(blob) < 8:
        raise ValueError("sentence vectors: truncated header")
    count, dimension = (int(x) for x in np.frombuffer(blob[:8], dtype="<u4"))
    keys_end = 8 + count * KEY_BYTES
    if len(blob) != keys_end + count * dimension * VECTOR_DTYPE.itemsize:
        raise ValueError("sentence vectors: size does not match the header")
    rows = np.frombuffer(blob[keys_end:], dtype=VECTOR_DTYPE).reshape(count, dimension).astype(np.float32)
    return {blob[8 + i * KEY_BYTES: 8 + (i + 1) * KEY_BYTES]: rows[i] for i in range(count)}
