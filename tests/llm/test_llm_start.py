"""`govrag serve` with GOVRAG_ANSWER_BACKEND=llamacpp loads the GGUF as it starts: a file it may not read, one that is
no whole GGUF (govrag's own check of the header, naming what is wrong), or one llama.cpp does not load, is refused in
one line, exit 2 (a path to fix), before uvicorn runs. It was loaded at the first query instead: the server started,
then every query failed with llama.cpp's ValueError, a 500; a file not a GGUF, or cut short, was then refused only as
one llama.cpp does not load.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.llm import smollm2_path
from tests.support.file_permissions import PERMISSION_BITS_BIND
from tests.support.govrag_process import govrag_env, run_govrag, start_refusal
from tests.support.tiny_gguf import tiny_gguf

pytestmark = pytest.mark.llm

SERVE = ("serve", "--port", "0")
NOT_LOADED = ("govrag: llama.cpp does not load the answer model {model} with GOVRAG_LLM_CONTEXT_TOKENS=2048 "
              "(ValueError): point GOVRAG_LLM_MODEL_PATH at a GGUF file it loads, or set another context")
NOT_WHOLE = ("govrag: cannot use the answer model {model}: {wrong} (copy it whole again, or point "
             "GOVRAG_LLM_MODEL_PATH at a whole GGUF file)")
NOT_READ = ("govrag: cannot use the answer model {model}: {reason} on {model} (let this user read it, or point "
            "GOVRAG_LLM_MODEL_PATH at a GGUF file this user may read)")


def _missing(model: Path) -> None:
    pass


def _unreadable(model: Path) -> None:
    model.write_bytes(b"GGUF")
    model.chmod(0)


def _garbled(model: Path) -> None:
    model.write_text("not a model\n", encoding="utf-8")


def _cut(model: Path) -> None:
    """SmolLM2's GGUF cut after its first MiB: inside its metadata (its vocabulary and merges end at 1.7 MB)."""
    with smollm2_path().open("rb") as whole:
        model.write_bytes(whole.read(1024 * 1024))


def _no_model(model: Path) -> None:
    """A whole GGUF that is no model llama.cpp knows (no general.architecture): past govrag's check, refused by it."""
    model.write_bytes(tiny_gguf())


@pytest.mark.parametrize(("spoil", "refusal"), [
    (_missing, NOT_READ.format(model="{model}", reason="No such file or directory")),
    (_unreadable, NOT_READ.format(model="{model}", reason="Permission denied")),
    (_garbled, NOT_WHOLE.format(model="{model}", wrong="it does not start as a GGUF file does")),
    (_cut, NOT_WHOLE.format(model="{model}", wrong="the file ends inside its GGUF header, at byte 1048576: it is cut "
                                                   "short")),
    (_no_model, NOT_LOADED),
], ids=["missing", "unreadable", "garbled", "cut", "no-model"])
def test_an_answer_model_llama_cpp_does_not_load_is_refused_in_one_line(spoil: Callable[[Path], None], refusal: str,
                                                                         tmp_path: Path) -> None:
    model = tmp_path / "model.gguf"
    spoil(model)
    env = govrag_env(data_dir=str(tmp_path / "data"), answer_backend="llamacpp", llm_model_path=str(model))
    result = run_govrag(SERVE, env=env, prefix=PERMISSION_BITS_BIND, timeout=300)  # a serve that started never ends
    assert start_refusal(result) == (2, refusal.format(model=model))
