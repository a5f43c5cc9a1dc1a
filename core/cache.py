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

from core import forksafe

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")
_MIN_EXPIRE_SECONDS = 0.5  # the expiring thread never wakes more often (no busy loop on a clock that stands still)
P = TypeVar("P")


class BoundedCache(Generic[K, V]):
    """At most `max_items` entries; the least recently used goes first. With `max_age` (seconds by `clock`), an entry
    is served only that long after it was put: older ones are dropped as the cache is used, and by the process's one
    expiring thread (`_expire_all`, for every such cache) when it is not. A `max_age` of 0 keeps nothing."""

    def __init__(self, max_items: int, *, max_age: float | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._items: OrderedDict[K, V] = OrderedDict()
        self._max_items = max_items
        self._lock = threading.Lock()
        self._max_age = max_age
        self._clock = clock
        self._put_at: OrderedDict[K, float] = OrderedDict()  # oldest put first: expiring stops at the first young one
        forksafe.renewed(self, BoundedCache._forked)
        if max_age:
            _watch(self)

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
            while len(self._items) > self._max_items:
                self._put_at.pop(self._items.popitem(last=False)[0], None)
        if self._max_age is not None:
            _ensure_expirer()

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
        expiring thread's call)."""
        with self._lock:
            self._expire_locked()
            max_age = self._max_age or 0.0
            if not self._put_at:
                return max_age
            return next(iter(self._put_at.values())) + max_age - self._clock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def _forked(self) -> None:
        """In a forked child: a new lock, and no entry if a thread of the parent held the old one as it forked (its
        change may be half made: an entry put without the time it was put would never expire)."""
        if self._lock.locked():
            self._items, self._put_at = OrderedDict(), OrderedDict()
        self._lock = threading.Lock()

    def _expire_locked(self) -> None:
        if self._max_age is None:
            return
        oldest = self._clock() - self._max_age
        while self._put_at and next(iter(self._put_at.values())) <= oldest:
            self._items.pop(self._put_at.popitem(last=False)[0], None)


# Every cache with a max age in this process, expired by one daemon thread (`_expire_all`), started by the first put
# into one of them and again in a forked child (threads do not survive a fork); it serves the process, not the request
# whose put started it, so it starts without that request's context. A cache leaves the set when it is garbage.
_AGED: weakref.WeakSet[BoundedCache[Any, Any]] = weakref.WeakSet()
_EXPIRER_LOCK = forksafe.lock()
_WAKE = forksafe.renewed(threading.Event())  # a cache added: the pass may have to come sooner
_expirer_pid: int | None = None


def _watch(cache: BoundedCache[Any, Any]) -> None:
    with _EXPIRER_LOCK:
        _AGED.add(cache)
    _WAKE.set()


def _ensure_expirer() -> None:
    """Start the process's expiring thread unless it runs (never called holding a cache's lock)."""
    global _expirer_pid
    if _expirer_pid == os.getpid():
        return
    with _EXPIRER_LOCK:
        if _expirer_pid == os.getpid():
            return
        _expirer_pid = os.getpid()
    threading.Thread(target=_expire_all, name="cache-expirer", daemon=True).start()


def _expire_all() -> None:
    """Expire every aged cache's entries as they reach their age; with none left, wait for one to be added."""
    while True:
        with _EXPIRER_LOCK:
            waits = [cache.expire() for cache in list(_AGED)]
        _WAKE.wait(max(min(waits), _MIN_EXPIRE_SECONDS) if waits else None)
        _WAKE.clear()


def _expire_in_child() -> None:
    if _AGED:
        _ensure_expirer()


forksafe.restarted_in_child(_expire_in_child)


class Rechecked(Generic[P]):
    """What `ask` finds wrong (None: nothing), asked again at most every `every_seconds` (readiness probes come every
    few seconds); a failure to ask raises and is not cached."""

    def __init__(self, ask: Callable[[], P | None], every_seconds: float) -> None:
        self._ask = ask
        self._every = every_seconds
        self._lock = threading.Lock()
        self._checked_at: float | None = None
        self._problem: P | None = None
        forksafe.renewed(self, Rechecked._forked)

    def problem(self) -> P | None:
        """The cached answer of `ask`, asked afresh once it is `every_seconds` old."""
        with self._lock:
            now = time.monotonic()
            if self._checked_at is None or now - self._checked_at >= self._every:
                self._problem = self._ask()
                self._checked_at = now
            return self._problem

    def _forked(self) -> None:
        """In a forked child: a new lock (a thread of the parent may have held the old one, asking: the child asks
        again once its answer is old)."""
        self._lock = threading.Lock()
