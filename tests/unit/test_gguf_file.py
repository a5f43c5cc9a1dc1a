"""The llamacpp backend reads the GGUF header before llama.cpp memory-maps the file (`retrieval.gguf_file`): a file cut
short, not a GGUF, of a version llama.cpp does not read, or a header it refuses is UnusablePath, said in one line with
what is wrong, and a hostile header's counts and lengths cost no allocation of their size. Tiny GGUF files made here:
no llama.cpp build needed (the refusal comes before llama-cpp-python is imported)."""

from __future__ import annotations

import struct
import tracemalloc
from pathlib import Path

import pytest

from core.errors import UnusablePath
from retrieval import gguf_file
from retrieval.models import LlamaCppGenerator
from tests.support.tiny_gguf import gguf_string, gguf_tensor, tiny_gguf, tiny_gguf_parts

WAY_OUT = "(copy it whole again, or point GOVRAG_LLM_MODEL_PATH at a whole GGUF file)"
U64_MAX = 2**64 - 1


def _refusal(tmp_path: Path, data: bytes) -> str:
    """The line LlamaCppGenerator refuses the GGUF `data` with, written to a file (the file's path as `{model}`)."""
    model = tmp_path / "model.gguf"
    model.write_bytes(data)
    with pytest.raises(UnusablePath) as refused:
        LlamaCppGenerator(model, 512)
    return str(refused.value).replace(str(model), "{model}")


@pytest.mark.parametrize("version", [3, 2])  # the same layout: version 2 made the counts and lengths 64-bit
@pytest.mark.parametrize("alignment", [None, 64, 1])
def test_a_whole_gguf_passes_the_check(alignment: int | None, version: int, tmp_path: Path) -> None:
    model = tmp_path / "model.gguf"
    whole = b"GGUF" + struct.pack("<I", version) + tiny_gguf(alignment)[8:]
    model.write_bytes(whole)
    gguf_file.check_whole(model)
    model.write_bytes(whole + bytes(31))  # the last tensor padded, or anything after the data
    gguf_file.check_whole(model)


@pytest.mark.parametrize("alignment", [None, 64])
def test_every_gguf_cut_short_is_refused_naming_where_it_ends(alignment: int | None, tmp_path: Path) -> None:
    """Each cut of the file, to every length short of whole: inside the header, or past it, where the tensor data
    starts at the header's end rounded up to general.alignment (with 64, past the 32-aligned point)."""
    header, rest = tiny_gguf_parts(alignment)
    whole = header + rest
    for length in range(len(whole)):
        if length < len(header):
            expected = f"the file ends inside its GGUF header, at byte {length}: it is cut short"
        else:
            expected = f"tensor 2's data ends at byte {len(whole)}, past the file's {length} bytes: it is cut short"
        refusal = _refusal(tmp_path, whole[:length])
        assert refusal == f"cannot use the answer model {{model}}: {expected} {WAY_OUT}", length


@pytest.mark.parametrize(("data", "wrong"), [
    (b"PK\x03\x04" + tiny_gguf()[4:], "it does not start as a GGUF file does"),
    (b"GGUF" + struct.pack("<I", 1) + tiny_gguf()[8:], "it is GGUF version 1, and llama.cpp reads versions 2 and 3"),
    (b"GGUF" + struct.pack("<I", 4) + tiny_gguf()[8:], "it is GGUF version 4, and llama.cpp reads versions 2 and 3"),
    (b"GGUF" + struct.pack(">I", 3) + tiny_gguf()[8:], "it is GGUF version 50331648 (a big-endian GGUF's version, read "
                                                       "little-endian), and llama.cpp reads versions 2 and 3"),
    (b"GGUF" + struct.pack("<I", 0) + tiny_gguf()[8:], "it is GGUF version 0, and llama.cpp reads versions 2 and 3"),
    (tiny_gguf(48), "its general.alignment is not a uint32 power of two"),
    (tiny_gguf(0), "its general.alignment is not a uint32 power of two"),
    (tiny_gguf(64).replace(gguf_file.ALIGNMENT_KEY + struct.pack("<I", gguf_file.UINT32), gguf_file.ALIGNMENT_KEY
                       + struct.pack("<I", 5)), "its general.alignment is not a uint32 power of two"),
    (tiny_gguf().replace(b"general.name" + struct.pack("<I", gguf_file.STRING),
                         b"general.name" + struct.pack("<I", 13)),
     "it has a metadata value of type 13, which llama.cpp does not read"),
    (tiny_gguf().replace(struct.pack("<IIQ", gguf_file.ARRAY, gguf_file.STRING, 3),
                     struct.pack("<IIQ", gguf_file.ARRAY, gguf_file.ARRAY, 3)),
     "it has a metadata value of type 9, which llama.cpp does not read"),
    (tiny_gguf().replace(gguf_tensor(b"b.weight", (256, 2), 12, 64), gguf_tensor(b"b.weight", (256, 2), 31, 64)),
     "tensor 1 is of ggml type 31, which llama.cpp does not know"),
    (tiny_gguf().replace(gguf_tensor(b"b.weight", (256, 2), 12, 64), gguf_tensor(b"b.weight", (256, 2), 12, 96)),
     "tensor 1's data is at byte 96 of the data section, where llama.cpp expects it at 64: right after the data "
     "before it"),  # its data, and the next tensor's, still inside the file
    (tiny_gguf().replace(gguf_tensor(b"b.weight", (256, 2), 12, 64), gguf_tensor(b"b.weight", (128, 4), 12, 64)),
     "tensor 1's rows of 128 elements are not whole blocks of its ggml type's 256"),
], ids=["magic", "version-1", "version-4", "big-endian", "version-0", "alignment-48", "alignment-0", "alignment-int32",
        "value-type", "array-of-arrays", "tensor-type", "tensor-offset", "tensor-rows"])
def test_a_file_llama_cpp_does_not_read_is_refused_saying_why(data: bytes, wrong: str, tmp_path: Path) -> None:
    assert _refusal(tmp_path, data) == f"cannot use the answer model {{model}}: {wrong} {WAY_OUT}"


def _hostile(tensors: int = 1, values: int = 0, body: bytes = b"") -> bytes:
    return b"GGUF" + struct.pack("<IQQ", 3, tensors, values) + body


HEADER_CUT = "the file ends inside its GGUF header, at byte {size}: it is cut short"
TOO_LARGE = f"tensor 0 is larger than ggml counts: more than {2**63 - 1} elements or {U64_MAX} bytes"
TOO_MANY = (f"its header lists more than {gguf_file.MAX_ITEMS} metadata values, strings and tensors, far more than a "
            "model has")


@pytest.mark.parametrize(("data", "wrong"), [
    (_hostile(tensors=U64_MAX), TOO_MANY),
    (_hostile(values=U64_MAX), TOO_MANY),
    (_hostile(values=1, body=struct.pack("<Q", U64_MAX)), HEADER_CUT),  # a key of 16 EiB
    (_hostile(values=1, body=gguf_string(b"k") + struct.pack("<IIQ", gguf_file.ARRAY, gguf_file.STRING, U64_MAX)),
     TOO_MANY),
    (_hostile(values=1, body=gguf_string(b"k") + struct.pack("<IIQ", gguf_file.ARRAY, gguf_file.STRING, 2**20)
              + gguf_string(b"") * 100), HEADER_CUT),
    (_hostile(values=2, body=gguf_string(b"k") + struct.pack("<IIQ", gguf_file.ARRAY, gguf_file.STRING, 3)
              + gguf_string(b"a") * 3 + gguf_string(b"l") + struct.pack("<IIQ", gguf_file.ARRAY, gguf_file.STRING,
                                                               gguf_file.MAX_ITEMS - 4)),
     TOO_MANY),  # 2 values, 3 strings and the second array's: one past the budget, refused before its strings are read
    (_hostile(values=1, body=gguf_string(b"k") + struct.pack("<IIQ", gguf_file.ARRAY, 12, U64_MAX)), HEADER_CUT),
    (_hostile(values=1, body=gguf_string(gguf_file.ALIGNMENT_KEY) + struct.pack("<II", gguf_file.UINT32, 2**31)
              + gguf_tensor(b"t", (1,), 0, 0)),
     "tensor 0's data ends at byte 2147483652, past the file's {size} bytes: it is cut short"),
    (_hostile(body=gguf_string(b"t") + struct.pack("<I", 2**32 - 1)),
     "tensor 0 has 4294967295 dimensions, and ggml at most 4"),
    (_hostile(body=gguf_tensor(b"t", (U64_MAX,) * 4, 15, U64_MAX) + bytes(64)), TOO_LARGE),  # Q8_K
    (_hostile(body=gguf_tensor(b"t", (0, 2**63), 0, 0) + bytes(64)), TOO_LARGE),  # no element, a negative int64
    (_hostile(body=gguf_tensor(b"t", (2**32, 2**31), 0, 0) + bytes(64)), TOO_LARGE),  # 2**63 elements
    (_hostile(body=gguf_tensor(b"t", (2**62, 4, 0), 0, 0) + bytes(64)), TOO_LARGE),  # 2**64, then none
    (_hostile(body=gguf_tensor(b"t", (2**62,), 28, 0) + bytes(64)), TOO_LARGE),  # F64: 2**65 bytes
    (_hostile(body=gguf_tensor(b"t", (255, 2**40), 12, 0) + bytes(64)),  # Q4_K: 0 whole blocks, once read as 0 bytes
     "tensor 0's rows of 255 elements are not whole blocks of its ggml type's 256"),
    (_hostile(body=gguf_tensor(b"t", (1,), 0, U64_MAX) + bytes(64)),
     f"tensor 0's data is at byte {U64_MAX} of the data section, where llama.cpp expects it at 0: right after the "
     "data before it"),
], ids=["tensor-count", "metadata-count", "key-length", "string-array-count", "string-array-cut",
        "string-arrays-count", "array-count", "alignment-2GiB", "dimension-count", "dimensions-and-offset",
        "dimension-int64", "elements-int64", "elements-int64-before-0", "bytes-size_t", "rows-of-no-block", "offset"])
def test_a_hostile_header_is_refused_without_allocating_what_it_claims(data: bytes, wrong: str,
                                                                        tmp_path: Path) -> None:
    """Counts and lengths of 2**64 - 1, or the sum of counts past MAX_ITEMS: refused (at the file's end, or at the
    count), having allocated no more than a few kilobytes. A tensor's shape or offset past what ggml counts or
    expects: refused as such, not taken as a size in bytes (nor as none: 255 elements of a 256-element block)."""
    tracemalloc.start()
    try:
        refusal = _refusal(tmp_path, data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert refusal == f"cannot use the answer model {{model}}: {wrong.format(size=len(data))} {WAY_OUT}"
    assert peak < 256 * 1024
