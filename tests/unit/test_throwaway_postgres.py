"""bench.common.throwaway_postgres, the one way the benchmarks and the tests make a throw-away PostgreSQL database:
it is there inside the block and gone after it, however the block ends (each bench used to carry its own copy, and
bench/query.py left its database behind when its server never started)."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import text

from bench.common import PG_ADMIN_DSN, libpq_dsn, throwaway_postgres
from core.db import get_engine
from tests.support.polling import lines_until

REPOSITORY = Path(__file__).resolve().parents[2]
SLEEPS_IN_ITS_DATABASE = """
import signal, time
signal.signal(signal.SIGINT, signal.default_int_handler)  # as at a terminal, even if pytest was started ignoring it
from bench.common import throwaway_postgres
with throwaway_postgres("govrag_test") as url:
    print(url, "in it", sep="\\n", flush=True)
    time.sleep(600)
"""


def _exists(url: str) -> bool:
    with psycopg.connect(PG_ADMIN_DSN) as admin:
        return admin.execute("SELECT 1 FROM pg_database WHERE datname = %s", (_name(url),)).fetchone() is not None


def _name(url: str) -> str:
    return url.rsplit("/", 1)[1]


def test_the_database_is_there_inside_the_block_and_dropped_after() -> None:
    with throwaway_postgres("govrag_test") as url:
        assert _name(url).startswith("govrag_test_")
        with psycopg.connect(libpq_dsn(url)) as conn:
            assert conn.execute("SELECT current_database()").fetchone() == (_name(url),)
    assert not _exists(url)


def test_the_database_is_dropped_after_an_exception_with_connections_still_open_to_it() -> None:
    with pytest.raises(RuntimeError), throwaway_postgres("govrag_test") as url:
        held = get_engine(url).connect()  # checked out of the app's pool, never returned: dispose() leaves it open
        held.execute(text("SELECT 1"))
        other = psycopg.connect(libpq_dsn(url))  # another process's session, say
        raise RuntimeError("the bench failed midway")
    assert not _exists(url)
    held.invalidate()
    other.close()


def test_a_process_interrupted_by_ctrl_c_leaves_no_database() -> None:
    process = subprocess.Popen([sys.executable, "-c", SLEEPS_IN_ITS_DATABASE], cwd=REPOSITORY,  # noqa: S603
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = lines_until(process, "in it")[0]
        assert _exists(url)
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=60) != 0  # KeyboardInterrupt
    finally:
        process.kill()
        process.wait()
    assert not _exists(url)
