"""onnxruntime (unstructured's PDF partitioner imports it; so does the default embedder) keeps no telemetry state: its
device id and event database under ~/.cache/Microsoft/DeveloperTools/.onnxruntime/, its `.ses` file in TMPDIR."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from retrieval import onnx_embedder
from tests.unit.test_parse_chunk import REPORT_PDF

ROOT = Path(__file__).resolve().parents[2]
EMBED = "from retrieval.embeddings import get_embedder; get_embedder('onnx').embed_one('a sentence')"


def _telemetry_left_by(argv: list[str], tmp_path: Path, **env: str) -> list[str]:
    """Run `python argv` with a HOME and a TMPDIR of its own, no telemetry setting of ours; what it left there that
    is onnxruntime's telemetry state."""
    home, temp = tmp_path / "home", tmp_path / "tmp"
    home.mkdir()
    temp.mkdir()
    inherited = {name: value for name, value in os.environ.items()
                 if name not in ("ORT_DISABLE_TELEMETRY", "XDG_CACHE_HOME")}  # onnxruntime's cache: under HOME
    subprocess.run([sys.executable, *argv], cwd=ROOT, check=True, timeout=600,  # noqa: S603
                   env={**inherited, "PYTHONPATH": str(ROOT), "HOME": str(home), "TMPDIR": str(temp), **env})
    left = [path for root in (home, temp) for path in root.rglob("*")]
    return [str(path) for path in left if path.name == ".ses" or ".onnxruntime" in path.parts]


def test_parsing_a_pdf_leaves_no_onnxruntime_telemetry(tmp_path: Path) -> None:
    """A worker process parsing a PDF (unstructured imports onnxruntime with its PDF partitioner)."""
    pdf = tmp_path / "report.pdf"
    pdf.write_bytes(REPORT_PDF)
    assert _telemetry_left_by(["-m", "tests.support.parse_process", str(pdf), "application/pdf"], tmp_path) == []


def test_the_onnx_embedder_leaves_no_onnxruntime_telemetry(tmp_path: Path) -> None:
    """The API's and the worker's default embedder; its exported model where this process keeps it."""
    model = onnx_embedder.ensure_onnx_model()
    assert _telemetry_left_by(["-c", EMBED], tmp_path, GOVRAG_MODEL_CACHE=str(model.parent)) == []
