"""`govrag serve` refuses a start it cannot complete in one line, before uvicorn runs: what, where and the way out, no
traceback, exit 1 (2 for a path to fix). Its start ran in uvicorn's lifespan (the schema check and the blob store's
opening excepted), where any failure ended in "Application startup failed" with the whole traceback, exit 3. The real
command, in its own process, on a fresh embedded default. `govrag token`, which uses the dev issuer's key too, says
its refusal so as well.
"""

from __future__ import annotations

import base64
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from authz.dev_issuer import KEY_FILE, DevIssuer
from core import migrate
from core.errors import EmbeddedStoreHeld
from core.settings import Settings
from retrieval.store import close_vector_store, open_vector_store
from tests.support.file_permissions import PERMISSION_BITS_BIND
from tests.support.govrag_process import govrag_env, run_govrag

SERVE = ("serve", "--port", "0")
WAY_OUT = "({fix}, or point {setting} at a folder this user may write)"
READ_AND_WRITE = "let this user read and write it"


def _refusal(result: subprocess.CompletedProcess[str]) -> tuple[int, str]:
    """The exit code and the line a start was refused with (its last, after the log lines of the steps before); no
    traceback, and uvicorn never started."""
    assert "Traceback" not in result.stderr and "Started server process" not in result.stderr, result.stderr[-3000:]
    return result.returncode, result.stderr.splitlines()[-1]


def test_a_serve_beside_a_process_holding_the_embedded_store_refuses_in_one_line(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data")
    open_vector_store(settings)  # this process holds it, as a running `govrag serve` would
    try:
        result = run_govrag(SERVE, env=govrag_env(data_dir=str(settings.data_dir)))
    finally:
        close_vector_store(settings)
    assert _refusal(result) == (1, f"govrag: {EmbeddedStoreHeld(settings.resolved_qdrant_path)}")


def _key_unreadable(key_file: Path) -> None:
    key_file.chmod(0)


def _key_garbled(key_file: Path) -> None:
    key_file.write_text("not a key\n", encoding="utf-8")


@pytest.mark.parametrize(("spoil", "refusal"), [
    (_key_unreadable, (2, "govrag: cannot use the dev issuer's key in {directory}: Permission denied on "
                          "{directory}/private.pem " + WAY_OUT.format(fix=READ_AND_WRITE, setting="GOVRAG_DATA_DIR"))),
    (_key_garbled, (2, "govrag: the dev issuer's key {directory}/private.pem must hold an unencrypted RSA private key "
                       "in PEM: remove it and a new one is made (the tokens the old one signed stop verifying)")),
], ids=["unreadable", "garbled"])
@pytest.mark.parametrize("argv", [SERVE, ("token", "--sub", "alice")], ids=["serve", "token"])
def test_a_dev_issuer_key_it_cannot_use_is_refused_in_one_line(spoil: Callable[[Path], None], refusal: tuple[int, str],
                                                               argv: Sequence[str], tmp_path: Path) -> None:
    """A key left by an earlier start that this user may not read (root too: the bits bind in the child), or that
    does not parse; `govrag token`, which uses the same key, ended in a traceback too."""
    directory = Settings(data_dir=tmp_path / "data").dev_issuer_dir
    DevIssuer.load_or_create(directory, "issuer", "audience")
    spoil(directory / KEY_FILE)
    result = run_govrag(argv, env=govrag_env(data_dir=str(tmp_path / "data")), prefix=PERMISSION_BITS_BIND)
    assert _refusal(result) == (refusal[0], refusal[1].format(directory=directory))



# Production as the settings accept it; the database is a test's.
PRODUCTION = {"env": "production", "dev_issuer": "false", "oidc_jwks_url": "https://idp.example/jwks",
              "master_key": base64.b64encode(b"k" * 32).decode(), "metrics_token": "scrape-token"}


def test_a_production_serve_whose_data_dir_it_may_not_make_is_refused_in_one_line(
        make_pg_database: Callable[[], str], tmp_path: Path) -> None:
    """A data dir missing in a folder this user may not write (the default, `.govrag-data`, in a service's read-only
    working directory): a development start says so as it migrates (test_schema_revision); in production start's
    own mkdir ended in a traceback, exit 3 under uvicorn."""
    database_url = make_pg_database()
    migrate.upgrade(database_url)
    data_dir = tmp_path / "read-only" / "data"
    data_dir.parent.mkdir()
    data_dir.parent.chmod(0o555)
    result = run_govrag(SERVE, env=govrag_env(data_dir=str(data_dir), database_url=database_url, **PRODUCTION),
                        prefix=PERMISSION_BITS_BIND)
    assert _refusal(result) == (2, f"govrag: cannot use the data dir {data_dir}: Permission denied on {data_dir} "
                                   f"{WAY_OUT.format(fix='create it', setting='GOVRAG_DATA_DIR')}")
    assert not data_dir.exists()


def test_a_serve_on_a_data_dir_it_may_not_write_is_refused_in_one_line(make_pg_database: Callable[[], str],
                                                                       tmp_path: Path) -> None:
    """The embedded vector store's folder and lock file are made in the data dir: one this user may not write ended
    in the lock file's traceback (exit 3 under uvicorn). The blob store, in it too, says its own ERROR line and would
    answer 503 until its volume can be written; the vector store cannot be served without its folder. In production,
    where nothing migrates first (a development start on PostgreSQL says the same)."""
    database_url = make_pg_database()
    migrate.upgrade(database_url)
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    data_dir.chmod(0o555)
    store = Settings(data_dir=data_dir).resolved_qdrant_path
    result = run_govrag(SERVE, env=govrag_env(data_dir=str(data_dir), database_url=database_url, **PRODUCTION),
                        prefix=PERMISSION_BITS_BIND)
    assert _refusal(result) == (2, f"govrag: cannot use the embedded vector store in {store}: Permission denied on "
                                   f"{store}.lock {WAY_OUT.format(fix=READ_AND_WRITE, setting='GOVRAG_QDRANT_PATH')}")
    assert list(data_dir.iterdir()) == []
