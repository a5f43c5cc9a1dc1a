"""The ONNX export gives the same vectors as sentence-transformers (cosine within 1e-5)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402

from retrieval.embeddings import get_embedder  # noqa: E402

TEXTS = [
    "Hotel costs are reimbursed up to 180 euros per night in capital cities.",
    "Who chaired the salary review meeting?",
    "<PERSON_1> approved a 6 percent raise for <ORGANIZATION> in March.",
    "x",
    "Ünïcödé, emoji 🙂 and tabs\tinside a sentence.",
    "A very long passage. " * 300,  # truncated at 256 tokens by both runtimes
]


def test_onnx_vectors_match_sentence_transformers() -> None:
    onnx, torch = get_embedder("onnx"), get_embedder("torch")
    a, b = onnx.embed(TEXTS), torch.embed(TEXTS)
    assert a.shape == b.shape == (len(TEXTS), 384)
    cosine = (a * b).sum(axis=1)
    assert np.all(cosine >= 1 - 1e-5), cosine
    assert np.allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)


def test_onnx_embedder_is_cached_per_process_and_batches() -> None:
    assert get_embedder("onnx") is get_embedder("onnx")
    many = [f"sentence number {i} about expenses" for i in range(70)]  # crosses the batch size
    vectors = get_embedder("onnx").embed(many)
    assert vectors.shape == (70, 384)
    assert not np.allclose(vectors[0], vectors[1])
