"""`govrag serve` refuses a start it cannot complete in one line, before uvicorn runs: what, where and the way out, no
traceback, exit 1. Its start ran in uvicorn's lifespan (the schema check and the blob store's opening excepted), where
any failure ended in "Application startup failed" with the whole traceback, exit 3. The real command, in its own
process, on a fresh embedded default. `govrag token`, which uses the dev issuer's key too, says its refusal so as well.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from authz.dev_issuer import KEY_FILE, DevIssuer
from core.errors import EmbeddedStoreHeld
from core.settings import Settings
from retrieval.store import close_vector_store, open_vector_store
from tests.support.file_permissions import PERMISSION_BITS_BIND

ROOT = Path(__file__).resolve().parents[2]
SERVE = ("serve", "--port", "0")


def _govrag(data_dir: Path, argv: Sequence[str], prefix: Sequence[str] = ()) -> subprocess.CompletedProcess[str]:
    """This checkout's `govrag` on `data_dir` (run through `prefix`), in its own process, until it exits."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("GOVRAG_")}
    env["GOVRAG_DATA_DIR"] = str(data_dir)
    return subprocess.run([*prefix, sys.executable, "-m", "api.cli", *argv], cwd=ROOT, env=env,  # noqa: S603
                          capture_output=True, text=True, timeout=600, check=False)


def _refusal(result: subprocess.CompletedProcess[str]) -> str:
    """The line a start was refused with: its last, after the log lines of the steps before; exit 1, no traceback, and
    uvicorn never started."""
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "Started server process" not in result.stderr, result.stderr[-3000:]
    return result.stderr.splitlines()[-1]


def test_a_serve_beside_a_process_holding_the_embedded_store_refuses_in_one_line(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data")
    open_vector_store(settings)  # this process holds it, as a running `govrag serve` would
    try:
        result = _govrag(settings.data_dir, SERVE)
    finally:
        close_vector_store(settings)
    assert _refusal(result) == f"govrag: {EmbeddedStoreHeld(settings.resolved_qdrant_path)}"


def _key_unreadable(key_file: Path) -> None:
    key_file.chmod(0)


def _key_garbled(key_file: Path) -> None:
    key_file.write_text("not a key\n", encoding="utf-8")


@pytest.mark.parametrize(("spoil", "refusal"), [
    (_key_unreadable, "govrag: cannot use the dev issuer's key in {directory} (Permission denied): let the user govrag "
                      "runs as read and write it, or set GOVRAG_DATA_DIR to a data dir it may use"),
    (_key_garbled, "govrag: the dev issuer's key {directory}/private.pem is not an unencrypted RSA private key in PEM: "
                   "remove it and a new one is made (the tokens the old one signed stop verifying)"),
], ids=["unreadable", "garbled"])
@pytest.mark.parametrize("argv", [SERVE, ("token", "--sub", "alice")], ids=["serve", "token"])
def test_a_dev_issuer_key_it_cannot_use_is_refused_in_one_line(spoil: Callable[[Path], None], refusal: str,
                                                               argv: Sequence[str], tmp_path: Path) -> None:
    """A key left by an earlier start that this user may not read (root too: the bits bind in the child), or that
    does not parse; `govrag token`, which uses the same key, ended in a traceback too."""
    directory = Settings(data_dir=tmp_path / "data").dev_issuer_dir
    DevIssuer.load_or_create(directory, "issuer", "audience")
    spoil(directory / KEY_FILE)
    result = _govrag(tmp_path / "data", argv, PERMISSION_BITS_BIND)
    assert _refusal(result) == refusal.format(directory=directory)
