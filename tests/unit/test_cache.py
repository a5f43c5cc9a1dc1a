"""The bounded LRU cache behind the key store (with a max age), sentence vectors and scan scores."""

from __future__ import annotations

import threading

from core.cache import BoundedCache, Rechecked
from tests.support.forking import exit_code_of_child, exit_code_of_child_forked_holding
from tests.support.polling import wait_until


def test_least_recently_used_entry_is_evicted_first() -> None:
    cache: BoundedCache[str, int] = BoundedCache(2)
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a") == 1  # "b" is now the oldest
    cache.put("c", 3)
    assert cache.get("b") is None
    assert (cache.get("a"), cache.get("c")) == (1, 3)


def test_pop_and_discard_where_forget_entries() -> None:
    cache: BoundedCache[tuple[str, str], bytes] = BoundedCache(10)
    for ref in [("department", "hr:v1"), ("department", "hr:v2"), ("document", "d1")]:
        cache.put(ref, b"k")
    cache.pop(("document", "d1"))
    cache.pop(("document", "absent"))
    cache.discard_where(lambda ref: ref[1] == "hr:v1")
    assert cache.get(("document", "d1")) is None
    assert cache.get(("department", "hr:v1")) is None
    assert cache.get(("department", "hr:v2")) == b"k"


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_an_entry_older_than_the_max_age_is_not_served_and_is_dropped() -> None:
    clock = Clock()
    cache: BoundedCache[str, bytes] = BoundedCache(10, max_age=300, clock=clock)
    cache.put("old", b"k1")
    clock.now += 200
    cache.put("young", b"k2")
    assert cache.get("old") == b"k1"  # used: still its age counts from when it was put
    clock.now += 100
    assert (cache.get("old"), cache.get("young")) == (None, b"k2")
    assert len(cache) == 1  # dropped, not only hidden
    cache.put("old", b"k1")  # put again (unwrapped again): young again
    clock.now += 299
    assert (cache.get("old"), len(cache)) == (b"k1", 1)


def test_a_max_age_of_0_keeps_nothing() -> None:
    cache: BoundedCache[str, bytes] = BoundedCache(10, max_age=0, clock=Clock())
    cache.put("a", b"k")
    assert (cache.get("a"), len(cache)) == (None, 0)


def test_a_cache_no_one_uses_drops_its_old_entries() -> None:
    """The expiring thread: a quiet process does not keep a key for ever."""
    clock = Clock()
    cache: BoundedCache[str, bytes] = BoundedCache(10, max_age=0.1, clock=clock)
    cache.put("a", b"k")
    clock.now += 1
    wait_until(lambda: len(cache) == 0, timeout=30, what="the expiring thread to drop the entry")


def test_one_thread_expires_every_cache_of_a_process() -> None:
    clock, threads = Clock(), threading.active_count()
    caches = [BoundedCache[str, bytes](10, max_age=0.1, clock=clock) for _ in range(20)]
    for cache in caches:
        cache.put("a", b"k")
    assert threading.active_count() - threads <= 1  # none if an earlier test started it
    clock.now += 1
    wait_until(lambda: sum(map(len, caches)) == 0, timeout=30, what="the expiring thread to drop every entry")


def test_a_forked_child_drops_the_entries_it_inherited_without_using_the_cache() -> None:
    """Threads do not survive a fork: the child (a Celery prefork child) starts its own expiring thread."""
    clock = Clock()
    cache: BoundedCache[str, bytes] = BoundedCache(10, max_age=0.1, clock=clock)
    cache.put("a", b"k")

    def child_sees_it_dropped() -> bool:  # reads nothing, only watches the cache's size
        clock.now += 1
        wait_until(lambda: len(cache) == 0, timeout=20, what="the child's expiring thread")
        return True

    assert exit_code_of_child(child_sees_it_dropped) == 0
    assert cache.get("a") == b"k"  # the parent's clock did not move


def test_a_child_forked_while_another_thread_holds_a_caches_lock_can_use_the_cache() -> None:
    """A request thread inside the cache as a Celery prefork or gunicorn parent forks: the child's cache works (its
    lock was held by a thread the child does not have), and drops what that thread may have left half changed. (No
    max age: the expiring thread's pass would wait for the lock held here, and the fork for the pass.)"""
    cache: BoundedCache[str, bytes] = BoundedCache(10)
    cache.put("a", b"k")

    def child_uses_the_cache() -> bool:
        cache.put("b", b"k2")
        return (cache.get("a"), cache.get("b"), len(cache)) == (None, b"k2", 1)

    assert exit_code_of_child_forked_holding(cache._lock, child_uses_the_cache) == 0
    assert (cache.get("a"), len(cache)) == (b"k", 1)  # the parent's is untouched


def test_a_child_forked_while_another_thread_asks_a_rechecked_question_can_ask_it() -> None:
    """/readyz's checks (`Rechecked`): a child forked as a thread of the parent was asking asks again."""
    watch: Rechecked[str] = Rechecked(lambda: "problem", every_seconds=0)
    assert exit_code_of_child_forked_holding(watch._lock, lambda: watch.problem() == "problem") == 0
