"""A real Celery worker process for the worker tests: settings from GOVRAG_* variables, solo pool (prefork with
GOVRAG_TEST_POOL=prefork, where the hard time limit applies).

GOVRAG_TEST_PARSER_IGNORES_ALARM=1 makes the parser hang on a text containing `IGNORE-THE-ALARM` with SIGALRM
blocked, as a parser stuck in native code would: only the hard time limit can end it. It hangs having written the
text to a temporary file, as unstructured's OCR writes the scan.
"""

from __future__ import annotations

import os

for _name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "DO_NOT_TRACK", "UNSTRUCTURED_DISABLE_NOTICE"):
    os.environ.setdefault(_name, "1")

from core.logs import configure_logging  # noqa: E402
from core.settings import Settings  # noqa: E402
from workers.celery_app import create_celery  # noqa: E402

HANG_MARKER = b"IGNORE-THE-ALARM"


def _parser_ignoring_the_alarm() -> None:
    import signal
    import tempfile
    import time
    from collections.abc import Callable

    from ingestion import parse

    original = parse._partitioner  # noqa: SLF001 - the test seam

    def partitioner(content_type: str) -> Callable[[bytes], list[object]]:
        chosen = original(content_type)

        def run(data: bytes) -> list[object]:
            if HANG_MARKER in data:
                with tempfile.NamedTemporaryFile(delete=False) as copy:
                    copy.write(data)
                signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
                time.sleep(3600)
            return chosen(data)

        return run

    parse._partitioner = partitioner  # type: ignore[assignment]  # noqa: SLF001


def main() -> None:
    """Consume the configured queue until killed."""
    if os.environ.get("GOVRAG_TEST_PARSER_IGNORES_ALARM") == "1":
        _parser_ignoring_the_alarm()
    settings = Settings()
    configure_logging("WARNING")  # as `govrag worker` does: JSON lines, each with its request id
    app = create_celery(settings)
    pool = os.environ.get("GOVRAG_TEST_POOL", "solo")
    app.worker_main(["worker", f"--pool={pool}", "--concurrency=1", "--loglevel=WARNING", "-Q", settings.task_queue,
                     "--without-heartbeat", "--without-mingle", "--without-gossip",
                     f"--hostname=crashtest-{os.getpid()}@localhost"])


if __name__ == "__main__":
    main()
