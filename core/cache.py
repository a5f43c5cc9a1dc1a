"""Per-process memoisation: a small thread-safe least-recently-used cache with a size bound, and an answer asked again
only after a while (`Rechecked`)."""

from __future__ import annotations

import os
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any, Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")
_MIN_SWEEP_SECONDS = 0.5  # the sweeper never wakes more often (no busy loop on a clock that stands still)


class BoundedCache(Generic[K, V]):
    """At most `max_items` entries; the least recently used goes first. With `max_age` (seconds by `clock`), an entry
    is served only that long after it was put: older ones are dropped as the cache is used, and by a sweeper thread
    (one per cache and process, started by the first put) when it is not. A `max_age` of 0 keeps nothing."""

    def __init__(self, max_items: int, *, max_age: float | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._items: OrderedDict[K, V] = OrderedDict()
        self._max_items = max_items
        self._lock = threading.Lock()
        self._max_age = max_age
        self._clock = clock
        self._put_at: OrderedDict[K, float] = OrderedDict()  # oldest put first: expiring stops at the first young one
        self._sweeper_pid: int | None = None

    def get(self, key: K) -> V | None:
        """The cached value, or None."""
        with self._lock:
            self._expire_locked()
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key: K, value: V) -> None:
        """Remember `value`, evicting the oldest entries beyond the bound."""
        if self._max_age == 0:
            return
        with self._lock:
            self._expire_locked()
            self._items[key] = value
            self._items.move_to_end(key)
            if self._max_age is not None:
                self._put_at[key] = self._clock()
                self._put_at.move_to_end(key)
                self._start_sweeper_locked()
            while len(self._items) > self._max_items:
                self._put_at.pop(self._items.popitem(last=False)[0], None)

    def pop(self, key: K) -> None:
        """Forget one entry, if present."""
        with self._lock:
            self._items.pop(key, None)
            self._put_at.pop(key, None)

    def discard_where(self, predicate: Callable[[K], bool]) -> None:
        """Forget every entry whose key matches."""
        with self._lock:
            for key in [k for k in self._items if predicate(k)]:
                del self._items[key]
                self._put_at.pop(key, None)

    def clear(self) -> None:
        """Forget everything."""
        with self._lock:
            self._items.clear()
            self._put_at.clear()

    def expire(self) -> float:
        """Forget the entries older than `max_age`; the seconds until the oldest left is, else `max_age` (the
        sweeper's call)."""
        with self._lock:
            self._expire_locked()
            max_age = self._max_age or 0.0
            if not self._put_at:
                return max_age
            return next(iter(self._put_at.values())) + max_age - self._clock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def _expire_locked(self) -> None:
        if self._max_age is None:
            return
        oldest = self._clock() - self._max_age
        while self._put_at and next(iter(self._put_at.values())) <= oldest:
            self._items.pop(self._put_at.popitem(last=False)[0], None)

    def _start_sweeper_locked(self) -> None:
        """A daemon thread expiring entries as they reach `max_age`, so they go even from a cache no one uses; started
        again in a forked child (threads do not survive a fork). It ends once the cache is garbage."""
        if self._sweeper_pid == os.getpid() or self._max_age is None:
            return
        self._sweeper_pid = os.getpid()
        threading.Thread(target=_sweep, args=(weakref.ref(self), self._max_age), name="cache-sweeper",
                         daemon=True).start()


def _sweep(cache_ref: weakref.ref[BoundedCache[Any, Any]], max_age: float) -> None:
    """Expire the referenced cache's entries as they reach `max_age`, until the cache is gone."""
    wait = max_age
    while True:
        time.sleep(wait)
        cache = cache_ref()
        if cache is None:
            return
        wait = max(cache.expire(), _MIN_SWEEP_SECONDS)
        del cache


class Rechecked:
    """What `ask` finds wrong (None: nothing), asked again at most every `every_seconds` (readiness probes come every
    few seconds); a failure to ask raises and is not cached."""

    def __init__(self, ask: Callable[[], str | None], every_seconds: float) -> None:
        self._ask = ask
        self._every = every_seconds
        self._lock = threading.Lock()
        self._checked_at: float | None = None
        self._problem: str | None = None

    def problem(self) -> str | None:
        """The cached answer of `ask`, asked afresh once it is `every_seconds` old."""
        with self._lock:
            now = time.monotonic()
            if self._checked_at is None or now - self._checked_at >= self._every:
                self._problem = self._ask()
                self._checked_at = now
            return self._problem
