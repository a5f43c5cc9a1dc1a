"""A real Celery worker process for the crash test: settings from GOVRAG_* variables, solo pool."""

from __future__ import annotations

import os

for _name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "DO_NOT_TRACK", "UNSTRUCTURED_DISABLE_NOTICE"):
    os.environ.setdefault(_name, "1")

from core.settings import Settings  # noqa: E402
from workers.celery_app import create_celery  # noqa: E402


def main() -> None:
    """Consume the configured queue until killed."""
    settings = Settings()
    app = create_celery(settings)
    app.worker_main(["worker", "--pool=solo", "--concurrency=1", "--loglevel=WARNING", "-Q", settings.task_queue,
                     "--without-heartbeat", "--without-mingle", "--without-gossip",
                     f"--hostname=crashtest-{os.getpid()}@localhost"])


if __name__ == "__main__":
    main()
