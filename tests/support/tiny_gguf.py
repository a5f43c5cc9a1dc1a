"""Tiny GGUF files made in a test, to cut short or spoil: no model and no llama.cpp build needed."""

from __future__ import annotations

import struct

from retrieval import gguf_file


def gguf_string(text: bytes) -> bytes:
    """A GGUF string: its uint64 length, its bytes."""
    return struct.pack("<Q", len(text)) + text


def gguf_tensor(name: bytes, shape: tuple[int, ...], kind: int, offset: int) -> bytes:
    """A tensor info: name, dimensions, ggml type, offset in the data section."""
    return gguf_string(name) + struct.pack(f"<I{len(shape)}QIQ", len(shape), *shape, kind, offset)


def tiny_gguf_parts(alignment: int | None = None) -> tuple[bytes, bytes]:
    """A whole GGUF of three tensors (F32 3x5, Q4_K 256x2, Q8_0 64), each padded to the alignment, with a string, a
    string array and a uint32 array in its metadata (and `general.alignment` unless None): its header to the tensor
    infos' end, and the rest (padding to the alignment, the tensor data), whose last byte is the last tensor's last."""
    metadata = [gguf_string(b"general.name") + struct.pack("<I", gguf_file.STRING) + gguf_string(b"tiny"),
                gguf_string(b"tokenizer.ggml.tokens") + struct.pack("<IIQ", gguf_file.ARRAY, gguf_file.STRING, 3)
                + gguf_string(b"a") + gguf_string(b"") + gguf_string(b"<s>"),
                gguf_string(b"tokenizer.ggml.token_type")
                + struct.pack("<IIQ3I", gguf_file.ARRAY, gguf_file.UINT32, 3, 1, 1, 3)]
    if alignment is not None:
        metadata.append(gguf_string(gguf_file.ALIGNMENT_KEY) + struct.pack("<II", gguf_file.UINT32, alignment))
    aligned = alignment or gguf_file.DEFAULT_ALIGNMENT
    sizes = [3 * 5 * 4, 2 * 144, 2 * 34]  # F32 4 bytes each; Q4_K 144 bytes per 256; Q8_0 34 bytes per 32
    offsets = [0, -(-sizes[0] // aligned) * aligned]
    offsets.append(offsets[1] + -(-sizes[1] // aligned) * aligned)
    tensors = [gguf_tensor(b"a.weight", (3, 5), 0, offsets[0]), gguf_tensor(b"b.weight", (256, 2), 12, offsets[1]),
               gguf_tensor(b"c.weight", (64,), 8, offsets[2])]
    header = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(metadata)) + b"".join(metadata + tensors)
    return header, bytes(-len(header) % aligned + offsets[2] + sizes[2])


def tiny_gguf(alignment: int | None = None) -> bytes:
    """`tiny_gguf_parts` whole."""
    return b"".join(tiny_gguf_parts(alignment))
