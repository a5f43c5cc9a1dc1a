"""`govrag worker` stopped as a supervisor stops it (SIGTERM, Celery's warm shutdown) leaves no private temporary
directory (`ingestion.scratch`) of its prefork children behind, and exits 0. Each child made its own as it started;
billiard ends a child with `os._exit`, which runs no atexit: they stayed until the next govrag process. The real
command, in its own process, with a temporary directory of its own. Marked `worker`: `make test` runs them
separately."""

from __future__ import annotations

import signal
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from ingestion import scratch
from tests.conftest import REDIS_URL
from tests.support.govrag_process import govrag_env, start_govrag
from tests.support.polling import wait_until

pytestmark = pytest.mark.worker
CHILDREN = 2


def test_a_worker_stopped_by_sigterm_leaves_no_private_temporary_directory(make_pg_database: Callable[[], str],
                                                                            tmp_path: Path) -> None:
    from core import migrate

    url = make_pg_database()
    migrate.upgrade(url)
    temp_dir, log = tmp_path / "tmp", tmp_path / "worker.log"
    temp_dir.mkdir()
    env = {**govrag_env(data_dir=str(tmp_path / "data"), database_url=url, broker_url=REDIS_URL,
                        qdrant_url="http://127.0.0.1:6333",  # never reached: no job is sent
                        task_queue=f"govrag-stop-{uuid.uuid4().hex[:8]}"), "TMPDIR": str(temp_dir)}
    worker = start_govrag(["worker", "--concurrency", str(CHILDREN)], log=log, env=env)
    try:
        def ready() -> bool:
            assert worker.poll() is None, log.read_text()[-3000:]
            return len(list(temp_dir.glob(f"{scratch.PREFIX}*"))) == CHILDREN and " ready." in log.read_text()

        wait_until(ready, 300, "the worker's children to start")
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(120) == 0, log.read_text()[-3000:]
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
    assert list(temp_dir.glob(f"{scratch.PREFIX}*")) == []
