"""`govrag serve` stopped as a supervisor stops it (SIGTERM: systemd, docker, Kubernetes) or as Ctrl-C does leaves
no private temporary directory (`ingestion.scratch`, where the in-process worker parses uploaded documents) behind,
and exits as uvicorn has it: by the SIGTERM it stopped on, 0 on a Ctrl-C. uvicorn raises a SIGTERM again once its
shutdown is done, which ended the process with no atexit run: the directory stayed until the next govrag process.
The real command, in its own process, on the embedded default, with a temporary directory of its own."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import httpx
import pytest

from ingestion import scratch
from tests.conftest import PLATFORM_ADMIN
from tests.support.govrag_process import desk_editor, free_port, govrag_env, start_govrag, stop_govrag, wait_serving
from tests.support.polling import wait_until


def _serve(data_dir: Path, temp_dir: Path, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    """`govrag serve` on the embedded default in `data_dir`, TMPDIR `temp_dir`, answering at the URL returned."""
    port = free_port()
    env = {**govrag_env(data_dir=str(data_dir), admins=f'["{PLATFORM_ADMIN}"]'), "TMPDIR": str(temp_dir)}
    process = start_govrag(["serve", "--port", str(port)], log=log, env=env)
    base = f"http://127.0.0.1:{port}"
    wait_serving(process, base, log)
    return process, base


def _ingest_a_document(base: str, data_dir: Path) -> None:
    """An upload, parsed by the in-process worker in its private directory, waited for until it is ready."""
    editor = desk_editor(base, data_dir, PLATFORM_ADMIN)
    accepted = httpx.post(f"{base}/v1/documents", headers=editor, data={"department": "desk"}, timeout=60,
                          files={"file": ("notes.txt", b"The lifts in building 4 were inspected on Monday.")})
    assert accepted.status_code == 202, accepted.text
    job = f"{base}/v1/jobs/{accepted.json()['job_id']}"
    wait_until(lambda: httpx.get(job, headers=editor).json()["status"] in ("ready", "failed"), 300, "the ingestion")
    assert httpx.get(job, headers=editor).json()["status"] == "ready"


@pytest.mark.parametrize(("stop", "exit_status"), [(signal.SIGTERM, -signal.SIGTERM), (signal.SIGINT, 0)],
                         ids=["sigterm", "ctrl-c"])
def test_a_stopped_serve_leaves_no_private_temporary_directory(stop: signal.Signals, exit_status: int,
                                                               tmp_path: Path) -> None:
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # CI runs pytest with SIGINT ignored: the
    try:  # child would inherit it ignored, and a Ctrl-C would not stop it
        data_dir, temp_dir, log = tmp_path / "data", tmp_path / "tmp", tmp_path / "serve.log"
        temp_dir.mkdir()
        process, base = _serve(data_dir, temp_dir, log)
    finally:
        signal.signal(signal.SIGINT, previous)
    try:
        _ingest_a_document(base, data_dir)
        assert len(list(temp_dir.glob(f"{scratch.PREFIX}*"))) == 1  # the serving process's own
        assert stop_govrag(process, stop) == exit_status, log.read_text()[-3000:]
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert list(temp_dir.glob(f"{scratch.PREFIX}*")) == []
