"""The bounded LRU cache behind the key store, sentence vectors and scan scores."""

from __future__ import annotations

from core.cache import BoundedCache


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
