"""Processes loading (so creating) the master key file of a fresh data dir at the same moment, as `govrag serve` and
`govrag keys rotate` started together do."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import threading
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier
from pathlib import Path

from core import crypto


def create_all_at_once(path: Path, creators: int) -> list[dict[int, bytes] | str]:
    """What each of `creators` processes got from `load_or_create_master_keyring(path, create=True)`: its keyring, or
    its error as text."""
    context = multiprocessing.get_context("spawn")
    start, publish, outcomes = context.Barrier(creators), context.Barrier(creators), context.Queue()
    processes = [context.Process(target=_create, args=(path, start, publish, outcomes)) for _ in range(creators)]
    for process in processes:
        process.start()
    try:
        return [outcomes.get(timeout=300) for _ in processes]
    finally:
        for process in processes:
            process.join(timeout=60)


def _create(path: Path, start: Barrier, publish: Barrier, outcomes: Queue[dict[int, bytes] | str]) -> None:
    """One creator: starts with the others, and holds before publishing the key it wrote (`os.link`) until every
    creator has written one, so all publish at once. A creator failing earlier lets the others go on."""
    link = os.link

    def link_once_every_creator_has_written(source: str, target: Path) -> None:
        with contextlib.suppress(threading.BrokenBarrierError):
            publish.wait(timeout=120)
        link(source, target)

    os.link = link_once_every_creator_has_written  # type: ignore[assignment]  # this process's own
    start.wait()
    try:
        outcomes.put(crypto.load_or_create_master_keyring(path, create=True))
    except Exception as exc:  # reported, for the test to show
        publish.abort()
        outcomes.put(f"{type(exc).__name__}: {exc}")
