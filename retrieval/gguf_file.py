"""A GGUF file's header read in pure Python before llama.cpp opens the file: one cut short (an interrupted copy or
download, a full disk), garbled or hostile is refused in one line naming what is wrong, where llama.cpp refuses it with
"Failed to load model from file" alone (its reason goes to stderr, and names tensors). The check is at start only:
llama.cpp memory-maps the file, so one cut short under a running process is a SIGBUS where its pages are touched.

The layout (ggml's docs/gguf.md, versions 2 and 3, little-endian): magic, version, tensor count, metadata count; the
metadata, each a key, a value type and a value; the tensor infos, each a name, its dimensions, its ggml type and the
offset of its data; then the tensor data, from the header's end rounded up to `general.alignment` (32 unless set), each
tensor's right after the one's before it, padded to the alignment (llama.cpp refuses any other offset). Each length is
checked against the bytes the file has left before it is used, and no string is read but the one key wanted: a hostile
header's counts and lengths cost no allocation of their size. A tensor's shape past what ggml counts (INT64_MAX
elements, SIZE_MAX bytes), or rows not whole blocks of its type, and an offset anywhere but where llama.cpp expects it,
are refused as llama.cpp refuses them. The items read one by one (metadata values, the strings of an array, tensors)
each read at least 8 bytes of the file, and are MAX_ITEMS at most: the walk ends at the file's end or after MAX_ITEMS,
whichever comes first (some 16 s of CPU on a slow core for a file of 64 MiB of empty strings, a fraction of a second
for a real model's header).
"""

from __future__ import annotations

import itertools
import math
import operator
import os
import struct
from pathlib import Path
from typing import BinaryIO

MAGIC = b"GGUF"
VERSIONS = (2, 3)  # what llama.cpp reads: version 1 had 32-bit counts, and a later one it refuses
ALIGNMENT_KEY = b"general.alignment"
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
INT64_MAX, SIZE_MAX = 2**63 - 1, 2**64 - 1  # what ggml counts a tensor's elements and bytes in
# Items of a header read one by one: the largest vocabularies (Gemma 3's 262,144 tokens, Qwen's 151,643 and as many
# merges) have well under a million; this many take seconds.
MAX_ITEMS = 2**23

# Metadata value types (gguf_type): the bytes of each fixed-size one; a string is a uint64 length and its bytes, an
# array an element type, a uint64 count and its elements.
VALUE_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
STRING, ARRAY, UINT32 = 8, 9, 4

# ggml tensor types (enum ggml_type): (elements per block, bytes per block), ggml.c's type_traits blck_size and
# type_size, as gguf-py's GGML_QUANT_SIZES lists them, for the llama.cpp that llama-cpp-python 0.3.36 vendors (a type
# it knows and this table not would be refused). The gaps (4, 5, 31-33, 36-38) are types ggml removed from GGUF files,
# which llama.cpp refuses too; QK_K, the k-quants' block, is 256 elements.
QK_K = 256
GGML_BLOCKS = {
    0: (1, 4),  # F32
    1: (1, 2),  # F16
    2: (32, 2 + 16),  # Q4_0
    3: (32, 2 + 2 + 16),  # Q4_1
    6: (32, 2 + 4 + 16),  # Q5_0
    7: (32, 2 + 2 + 4 + 16),  # Q5_1
    8: (32, 2 + 32),  # Q8_0
    9: (32, 2 + 2 + 32),  # Q8_1
    10: (QK_K, 2 + 2 + QK_K // 16 + QK_K // 4),  # Q2_K
    11: (QK_K, 2 + QK_K // 4 + QK_K // 8 + 12),  # Q3_K
    12: (QK_K, 2 + 2 + QK_K // 2 + 12),  # Q4_K
    13: (QK_K, 2 + 2 + QK_K // 2 + QK_K // 8 + 12),  # Q5_K
    14: (QK_K, 2 + QK_K // 2 + QK_K // 4 + QK_K // 16),  # Q6_K
    15: (QK_K, 4 + QK_K + QK_K // 8),  # Q8_K
    16: (QK_K, 2 + QK_K // 4),  # IQ2_XXS
    17: (QK_K, 2 + QK_K // 4 + QK_K // 32),  # IQ2_XS
    18: (QK_K, 2 + QK_K // 4 + QK_K // 8),  # IQ3_XXS
    19: (QK_K, 2 + QK_K // 8 + QK_K // 16),  # IQ1_S
    20: (32, 2 + 16),  # IQ4_NL
    21: (QK_K, 2 + QK_K // 4 + QK_K // 8 + QK_K // 32 + 4),  # IQ3_S
    22: (QK_K, 2 + QK_K // 4 + QK_K // 16),  # IQ2_S
    23: (QK_K, 2 + 2 + QK_K // 2 + QK_K // 64),  # IQ4_XS
    24: (1, 1),  # I8
    25: (1, 2),  # I16
    26: (1, 4),  # I32
    27: (1, 8),  # I64
    28: (1, 8),  # F64
    29: (QK_K, QK_K // 8 + QK_K // 16 + QK_K // 32),  # IQ1_M
    30: (1, 2),  # BF16
    34: (QK_K, 2 + 4 * 13),  # TQ1_0
    35: (QK_K, 2 + 64),  # TQ2_0
    39: (32, 1 + 16),  # MXFP4
    40: (64, 4 + 32),  # NVFP4
    41: (128, 2 + 16),  # Q1_0
    42: (64, 2 + 16),  # Q2_0
}


class NotWholeGGUF(ValueError):
    """What makes a file no whole GGUF, said without its contents: a tensor by its index, never its name."""


class _Reader:
    """A file read forward; a read past its end is a header cut short."""

    def __init__(self, file: BinaryIO) -> None:
        self._file = file
        self.size = os.fstat(file.fileno()).st_size
        self.at = 0
        self.items = 0

    def _cut(self) -> NotWholeGGUF:
        return NotWholeGGUF(f"the file ends inside its GGUF header, at byte {self.size}: it is cut short")

    def skip(self, count: int) -> None:
        if count > self.size - self.at:
            raise self._cut()
        if count:
            self.at += count
            self._file.seek(self.at)

    def take(self, count: int) -> bytes:
        if count > self.size - self.at:
            raise self._cut()
        data = self._file.read(count)
        if len(data) != count:  # shorter now than as it was opened
            raise self._cut()
        self.at += count
        return data

    def walk(self, count: int) -> range:
        """The `count` items to read one by one next, refused if the header's would be more than MAX_ITEMS."""
        self.items += count
        if self.items > MAX_ITEMS:
            raise NotWholeGGUF(f"its header lists more than {MAX_ITEMS} metadata values, strings and tensors, "
                               "far more than a model has")
        return range(count)

    def u32(self) -> int:
        return int(struct.unpack("<I", self.take(4))[0])

    def u64(self) -> int:
        return int(struct.unpack("<Q", self.take(8))[0])


def check_whole(path: Path) -> None:
    """Returns if the GGUF file `path` has all the tensor data its header describes; NotWholeGGUF if it is no GGUF
    llama.cpp reads (magic, version), its header is cut short or is one llama.cpp refuses (a value, tensor type or
    alignment it does not know, a tensor's shape or offset it refuses), or a tensor's data would end past the file's
    end. OSError as the system refuses."""
    with path.open("rb") as file:
        reader = _Reader(file)
        if reader.take(4) != MAGIC:
            raise NotWholeGGUF("it does not start as a GGUF file does")
        version = reader.u32()
        if version not in VERSIONS:  # a version of 0xVV0000 is how llama.cpp tells a big-endian file
            swapped = " (a big-endian GGUF's version, read little-endian)" if version and not version & 0xFFFF else ""
            raise NotWholeGGUF(f"it is GGUF version {version}{swapped}, and llama.cpp reads versions 2 and 3")
        tensors, values = reader.u64(), reader.u64()
        alignment = DEFAULT_ALIGNMENT
        for _ in reader.walk(values):
            alignment = _metadata(reader) or alignment
        end = 0  # where the last tensor's data ends in the data section
        for index in reader.walk(tensors):
            offset, size = _tensor(reader, index)
            expected = _aligned(end, alignment)
            if offset != expected:
                raise NotWholeGGUF(f"tensor {index}'s data is at byte {offset} of the data section, where llama.cpp "
                                   f"expects it at {expected}: right after the data before it")
            end = offset + size
        data_start = _aligned(reader.at, alignment)
        if tensors and data_start + end > reader.size:
            raise NotWholeGGUF(f"tensor {tensors - 1}'s data ends at byte {data_start + end}, past the file's "
                               f"{reader.size} bytes: it is cut short")


def _aligned(at: int, alignment: int) -> int:
    """`at` rounded up to a multiple of `alignment`."""
    return -(-at // alignment) * alignment


def _metadata(reader: _Reader) -> int | None:
    """One metadata key and value read past; `general.alignment`'s value if it is that key."""
    length = reader.u64()
    key = reader.take(length) if length == len(ALIGNMENT_KEY) else reader.skip(length)
    kind = reader.u32()
    if key != ALIGNMENT_KEY:
        _skip_value(reader, kind)
        return None
    alignment = reader.u32() if kind == UINT32 else 0
    if alignment <= 0 or alignment & (alignment - 1):
        raise NotWholeGGUF("its general.alignment is not a uint32 power of two")
    return alignment


def _skip_value(reader: _Reader, kind: int) -> None:
    """A metadata value of type `kind` read past (llama.cpp reads no array of arrays)."""
    count = 1
    if kind == ARRAY:
        kind, count = reader.u32(), reader.u64()
    if kind in VALUE_SIZES:
        reader.skip(count * VALUE_SIZES[kind])
    elif kind == STRING:
        for _ in reader.walk(count):
            reader.skip(reader.u64())
    else:
        raise NotWholeGGUF(f"it has a metadata value of type {kind}, which llama.cpp does not read")


def _tensor(reader: _Reader, index: int) -> tuple[int, int]:
    """Tensor `index`'s info read: its data's offset in the data section and its size in bytes (ggml_nbytes)."""
    reader.skip(reader.u64())  # its name
    dims = reader.u32()
    if dims > MAX_DIMS:
        raise NotWholeGGUF(f"tensor {index} has {dims} dimensions, and ggml at most {MAX_DIMS}")
    shape = [reader.u64() for _ in range(dims)] or [1]
    kind, offset = reader.u32(), reader.u64()
    if kind not in GGML_BLOCKS:
        raise NotWholeGGUF(f"tensor {index} is of ggml type {kind}, which llama.cpp does not know")
    block, block_bytes = GGML_BLOCKS[kind]
    data_bytes = math.prod(shape) // block * block_bytes
    # llama.cpp multiplies the dimensions in order, in an int64: a product past INT64_MAX before a 0 is refused too
    counted = max(*shape, *itertools.accumulate(shape, operator.mul))
    if counted > INT64_MAX or data_bytes > SIZE_MAX:
        raise NotWholeGGUF(f"tensor {index} is larger than ggml counts: more than {INT64_MAX} elements or "
                           f"{SIZE_MAX} bytes")
    if shape[0] % block:
        raise NotWholeGGUF(f"tensor {index}'s rows of {shape[0]} elements are not whole blocks of its ggml type's "
                           f"{block}")
    return offset, data_bytes
