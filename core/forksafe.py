"""What a forked child (a Celery prefork child, a gunicorn-style worker) must not inherit as it is, renewed there by
this module's one at-fork hook.

A thread of the parent holding a lock as the process forks is not in the child: the lock stays held for ever and the
child hangs on it. Connections, thread pools and file locks are the parent's: a child using one shares the parent's
socket, waits for threads it does not have, or, closing it, closes or unlocks it for the parent. So:
- a lock living as long as the process (a module's, or a process-wide object's) is made by `lock`/`rlock`, or its
  owner is `renewed` (by its own `renew`, which may drop what a thread holding the lock left half changed);
- a process-wide cache of connections, clients or models with threads is `rebuilt_in_child`: the child starts it
  empty and builds its own, and keeps the parent's objects referenced, never closing or finalising them;
- a thread the process runs is `restarted_in_child`.
Everything renewed is renewed before anything is forgotten or restarted. tests/unit/test_forksafe.py forks while
another thread holds each module-level lock, and fails on one that is not renewed here."""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Callable, Iterable, MutableMapping
from typing import Any, TypeVar

T = TypeVar("T")

# Held weakly: an object that is garbage needs no renewal. Iterated in the order registered.
_RENEWED: weakref.WeakKeyDictionary[Any, Callable[[Any], None]] = weakref.WeakKeyDictionary()
_REBUILT: list[MutableMapping[Any, Any]] = []
_RESTARTED: list[Callable[[], None]] = []
_INHERITED: list[object] = []  # the parent's objects a child forgot: referenced for as long as it runs, never closed


def _reinit(primitive: Any) -> None:
    primitive._at_fork_reinit()  # what CPython's threading, logging and concurrent.futures call in a forked child


# `_at_fork_reinit` is CPython's, not a public API: a Python without it is refused as this module is imported (every
# start imports it), never found out in a forked child, where the at-fork hook's error is only printed.
_MISSING = [kind.__name__ for kind in (type(threading.Lock()), type(threading.RLock()), threading.Condition,
                                       threading.Event) if not callable(getattr(kind, "_at_fork_reinit", None))]
if _MISSING:
    raise RuntimeError(f"this Python's {', '.join(_MISSING)} cannot be renewed in a forked child (no _at_fork_reinit)")


def renewed(obj: T, renew: Callable[[T], None] = _reinit) -> T:
    """`obj`, renewed in every forked child by `renew(obj)`; by default a lock, condition or event made free and
    waited on by no one. `obj` is held weakly: `renew` must not refer to it (a class's function, not a bound method)."""
    _RENEWED[obj] = renew
    return obj


def lock() -> threading.Lock:
    """A lock free again in a forked child."""
    return renewed(threading.Lock())


def rlock() -> threading.RLock:
    """A reentrant lock free again in a forked child."""
    return renewed(threading.RLock())


def rebuilt_in_child(cache: MutableMapping[Any, Any]) -> None:
    """Empty the process-wide `cache` in every forked child, which then builds its own entries."""
    _REBUILT.append(cache)


def restarted_in_child(start: Callable[[], None]) -> None:
    """Call `start` in every forked child (threads do not survive a fork), once everything is renewed."""
    _RESTARTED.append(start)


def kept_in_child(objects: Iterable[object]) -> None:
    """In a forked child (from a `renew`): the parent's `objects`, forgotten by their owner, referenced for as long as
    the child runs, never closed nor finalised, however soon their owner is garbage (an event loop closing in the child
    takes its wake-up socket out of the epoll set it shares with the parent's loop, which then sleeps through its
    threads' calls)."""
    _INHERITED.extend(objects)


def is_renewed(obj: object) -> bool:
    """Whether `obj` is renewed in a forked child."""
    try:
        return obj in _RENEWED
    except TypeError:  # not weakly referenceable: never registered
        return False


def _after_fork_in_child() -> None:
    """Every step is taken even when one fails (a library changed under a `renew`): one lock left held hangs only
    what takes it, not everything after it in this list. The first failure is raised at the end, which CPython
    prints as the hook's."""
    failures: list[BaseException] = []

    def step(call: Callable[[], object]) -> None:
        try:
            call()
        except Exception as failure:  # noqa: BLE001 - raised below, once every step was taken
            failures.append(failure)

    for obj, renew in list(_RENEWED.items()):
        step(lambda obj=obj, renew=renew: renew(obj))
    for cache in _REBUILT:
        _INHERITED.extend(cache.values())
        cache.clear()
    for start in _RESTARTED:
        step(start)
    if failures:
        raise failures[0]


os.register_at_fork(after_in_child=_after_fork_in_child)
