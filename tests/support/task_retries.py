"""The Celery task `workers.tasks.ingest_document` is bound to, run in the test's thread at a given retry: what it asks
Celery to retry is noted, and `Scheduled` is what it raises for that."""

from __future__ import annotations

from types import SimpleNamespace


class Scheduled(Exception):
    """What the task's `retry` returned, for it to raise: Celery runs the task again later."""


def task_at_retry(settings: object, retries: int, scheduled: list[dict[str, object]], *,
                  app: object | None = None) -> SimpleNamespace:
    """The Celery task `ingest_document` is bound to, at its `retries`-th retry; each retry it asks for is noted. With
    `app` (a real Celery app), the jobs the task sends go to its broker."""

    def retry(**kwargs: object) -> Exception:
        scheduled.append(kwargs)
        return Scheduled()

    return SimpleNamespace(app=app or SimpleNamespace(govrag_settings=settings),
                           request=SimpleNamespace(retries=retries), retry=retry)
