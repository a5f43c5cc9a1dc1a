"""Micro-batching: concurrent requests that need the same model share one call.

A query needs its question embedded and masked; each is a model call whose fixed cost (a forward pass's setup)
dwarfs one short text. `MicroBatcher` gives every caller a future and runs the model in one background thread
over whatever has been submitted meanwhile: a caller alone is served at once, callers arriving together share
one call. The thread starts on first use (after any fork) and carries no request context, so nothing about a
request leaves it except the result (or the exception) its future returns. Its own log lines (a model loading) say
request id `-`: one call serves several requests, so no one id is its, and a failure reaches each caller through its
future, in the caller's thread (logged there under the caller's id). Run in one caller's context, the call's traced
stage (`core.tracing`) would count again in that request's Server-Timing, its span under that request's.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Generic, TypeVar

from core import forksafe

Item = TypeVar("Item")
Result = TypeVar("Result")


class MicroBatcher(Generic[Item, Result]):
    """Runs `process(items) -> results` (same length, same order) over the items submitted meanwhile."""

    def __init__(self, process: Callable[[list[Item]], Sequence[Result]], *, name: str, max_batch: int = 16) -> None:
        self._process = process
        self._name = name
        self._max_batch = max_batch
        self._pending: queue.SimpleQueue[tuple[Item, Future[Result]]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        forksafe.renewed(self, MicroBatcher._forked)

    def _forked(self) -> None:
        """In a forked child: nothing pending (the parent's callers wait for their own items), no thread serving
        yet, and a lock of its own."""
        self._pending, self._thread, self._start_lock = queue.SimpleQueue(), None, threading.Lock()

    def submit(self, item: Item) -> Future[Result]:
        """Queue one item; its future holds the result, or the exception `process` raised for its batch."""
        future: Future[Result] = Future()
        self._pending.put((item, future))
        self._ensure_thread()
        return future

    def _ensure_thread(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        with self._start_lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._serve, name=self._name, daemon=True)
                self._thread.start()

    def _serve(self) -> None:
        while True:
            self._run(self._next_batch())

    def _next_batch(self) -> list[tuple[Item, Future[Result]]]:
        """The oldest waiting item (blocking until there is one) and whatever else is waiting, up to the cap."""
        batch = [self._pending.get()]
        while len(batch) < self._max_batch:
            try:
                batch.append(self._pending.get_nowait())
            except queue.Empty:
                break
        return batch

    def _run(self, batch: list[tuple[Item, Future[Result]]]) -> None:
        """Settle every future of the batch; if the shared call fails, each item alone (one bad item fails only
        its own caller), and the thread lives on."""
        try:
            results = self._process([item for item, _ in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"{self._name}: {len(results)} results for {len(batch)} items")
        except Exception as exc:
            if len(batch) > 1:
                for one in batch:
                    self._run([one])
            else:
                batch[0][1].set_exception(exc)
            return
        for (_, future), result in zip(batch, results, strict=True):
            future.set_result(result)
