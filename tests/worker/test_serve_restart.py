"""`govrag serve` (embedded broker, in-process worker) stopped cleanly while a document is being ingested: three
ordinary restarts (deploys; Ctrl-C or SIGTERM) must not fail the document as 'the worker died 3 times', and each stop
leaves no private temporary directory (`ingestion.scratch`) behind. The in-process variant is
tests/integration/test_job_dispatch.py::test_a_clean_stop_during_a_run_hands_its_job_back_instead_of_counting_a_crash.
Marked `worker`: `make test` runs them separately."""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

import httpx
import psycopg
import pytest

from bench.common import libpq_dsn
from ingestion import scratch
from tests.conftest import PLATFORM_ADMIN
from tests.support.govrag_process import desk_editor, free_port, govrag_env, start_govrag, stop_govrag, wait_serving
from tests.support.polling import wait_until

pytestmark = pytest.mark.worker
PARAGRAPH = ("Section {n}. The facilities team reviewed the maintenance schedule for building {n}; the lifts, "
             "the heating and the fire doors were inspected and the findings were filed with the site office.")


# How each of the three restarts stops `govrag serve`: Ctrl-C, or SIGTERM (systemctl stop, docker stop, Kubernetes),
# which the process ends by (as uvicorn has it) once its shutdown is done.
STOPS = ((signal.SIGINT, 0), (signal.SIGTERM, -signal.SIGTERM), (signal.SIGINT, 0))


def _serve(data_dir: Path, url: str, port: int, log: Path) -> subprocess.Popen[bytes]:
    """`govrag serve` on the database `url`, its temporary directory (TMPDIR) `data_dir`'s sibling `tmp`."""
    env = {**govrag_env(data_dir=str(data_dir), database_url=url, admins=f'["{PLATFORM_ADMIN}"]'),
           "TMPDIR": str(data_dir.parent / "tmp")}
    proc = start_govrag(["serve", "--host", "127.0.0.1", "--port", str(port)], log=log, env=env)
    wait_serving(proc, f"http://127.0.0.1:{port}", log)
    return proc


def _job(url: str, job_id: str) -> tuple[str, int, int]:
    with psycopg.connect(libpq_dsn(url)) as conn:
        row = conn.execute("SELECT status, attempts, crashed_runs FROM ingestion_jobs WHERE id = %s",
                           (job_id,)).fetchone()
    assert row is not None
    return row[0], row[1], row[2]


def _stop_serve_mid_run(proc: subprocess.Popen[bytes], url: str, job_id: str, document_id: str, run: int,
                        temp_dir: Path) -> None:
    """Once the run has claimed the document (processing, committed), hold the document row so the run is still
    going when the operator stops `govrag serve` (STOPS), as a run of a long document is; then let it go."""
    wait_until(lambda: _job(url, job_id)[:2] == ("processing", run), 120, f"run {run} to start", every=0.05)
    stop, exit_status = STOPS[run - 1]
    with psycopg.connect(libpq_dsn(url)) as holder:
        holder.execute("SELECT id FROM documents WHERE id = %s FOR UPDATE", (document_id,))
        assert stop_govrag(proc, stop) == exit_status  # a clean stop: what Ctrl-C, systemctl stop or a deploy does
        holder.rollback()
    assert list(temp_dir.glob(f"{scratch.PREFIX}*")) == []  # the abandoned run's included


def test_clean_restarts_of_serve_during_a_long_ingestion_do_not_fail_the_document(
        make_pg_database: Callable[[], str], tmp_path: Path) -> None:
    from core import migrate

    url = make_pg_database()
    migrate.upgrade(url)
    data_dir, temp_dir, port, log = tmp_path / "data", tmp_path / "tmp", free_port(), tmp_path / "serve.log"
    temp_dir.mkdir()
    proc = _serve(data_dir, url, port, log)
    base = f"http://127.0.0.1:{port}"
    try:
        editor = desk_editor(base, data_dir, PLATFORM_ADMIN)
        text = "\n\n".join(PARAGRAPH.format(n=n) for n in range(60)).encode()
        accepted = httpx.post(f"{base}/v1/documents", headers=editor, data={"department": "desk"},
                              files={"file": ("maintenance.txt", text)}, timeout=60).json()
        for run in (1, 2, 3):  # three ordinary restarts (deploys) while the document is being ingested
            _stop_serve_mid_run(proc, url, accepted["job_id"], accepted["document_id"], run, temp_dir)
            proc = _serve(data_dir, url, port, log)
        wait_until(lambda: _job(url, accepted["job_id"])[0] not in ("queued", "processing"), 180, "the job to end",
                   every=0.05)
        document = httpx.get(f"{base}/v1/documents/{accepted['document_id']}", headers=editor).json()
    finally:
        stop_govrag(proc)
    assert (document["status"], document["error"]) == ("ready", None), document
    assert _job(url, accepted["job_id"]) == ("ready", 4, 0)  # four runs, none counted as a crash
