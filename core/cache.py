"""Per-process memoisation: a small thread-safe least-recently-used cache with a size bound, and an answer asked again
only after a while (`Rechecked`)."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class BoundedCache(Generic[K, V]):
    """At most `max_items` entries; the least recently used goes first."""

    def __init__(self, max_items: int) -> None:
        self._items: OrderedDict[K, V] = OrderedDict()
        self._max_items = max_items
        self._lock = threading.Lock()

    def get(self, key: K) -> V | None:
        """The cached value, or None."""
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key: K, value: V) -> None:
        """Remember `value`, evicting the oldest entries beyond the bound."""
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self._max_items:
                self._items.popitem(last=False)

    def pop(self, key: K) -> None:
        """Forget one entry, if present."""
        with self._lock:
            self._items.pop(key, None)

    def discard_where(self, predicate: Callable[[K], bool]) -> None:
        """Forget every entry whose key matches."""
        with self._lock:
            for key in [k for k in self._items if predicate(k)]:
                del self._items[key]

    def clear(self) -> None:
        """Forget everything."""
        with self._lock:
            self._items.clear()


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
