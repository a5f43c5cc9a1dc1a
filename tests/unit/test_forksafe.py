"""Every lock living as long as the process is renewed in a forked child (core/forksafe.py): a Celery prefork child or
a gunicorn-style worker forked while another thread of the parent held one would otherwise wait on it for ever."""

from __future__ import annotations

import threading
from collections.abc import Callable
from types import FunctionType, ModuleType
from typing import Any

import pytest
from celery.local import Proxy

from core import forksafe, metrics
from tests.support.forking import exit_code_of_child_forked_holding
from tests.support.project_modules import project_modules

LOCK_TYPES = (type(threading.Lock()), type(threading.RLock()), threading._PyRLock,  # type: ignore[attr-defined]
              threading.Condition, threading.Semaphore, threading.Event, threading.Barrier)


def _module_level_locks() -> dict[str, tuple[object, Callable[[], Any]]]:
    """Every lock a module holds, itself or as an attribute of an object it holds: its name → (what must be renewed
    in a child, the lock as read where it is held, in the parent or in a child: an object renewed by its own `renew`
    may replace its lock)."""
    found: dict[str, tuple[object, Callable[[], Any]]] = {}
    seen: set[int] = set()
    for module in project_modules():
        for name, value in vars(module).items():
            # A Celery proxy forwards to the current app, Celery's own (finalised before Celery forks)
            if isinstance(value, (ModuleType, type, FunctionType, Proxy)) or id(value) in seen:
                continue
            seen.add(id(value))
            where = f"{module.__name__}.{name}"
            if isinstance(value, LOCK_TYPES):
                found[where] = (value, lambda module=module, name=name: vars(module)[name])
                continue
            for attribute, held in getattr(value, "__dict__", {}).items():
                if isinstance(held, LOCK_TYPES):
                    found[f"{where}.{attribute}"] = (
                        value if forksafe.is_renewed(value) else held,
                        lambda module=module, name=name, attribute=attribute: getattr(vars(module)[name], attribute))
    return found


LOCKS = _module_level_locks()


def _taken(lock: Any) -> Any:
    """What a thread holds while it uses `lock` (an event's condition, while it is set or waited on)."""
    return lock._cond if isinstance(lock, threading.Event) else lock


def test_every_module_level_lock_is_renewed_in_a_forked_child() -> None:
    """A lock a module makes with `threading` instead of `forksafe.lock()` (or an object holding one, not
    `forksafe.renewed`) is named here: the test fails on a lock added and forgotten."""
    assert LOCKS, "no lock found: the scan is broken"
    assert [name for name, (renewed, _) in LOCKS.items() if not forksafe.is_renewed(renewed)] == []


@pytest.mark.parametrize("name", sorted(LOCKS))
def test_a_child_forked_while_another_thread_holds_a_module_level_lock_takes_it(name: str) -> None:
    """Another thread holds the lock as the process forks: the child takes it, and ends (a child waiting on it for
    ever is killed, and the test fails)."""
    _, lock_now = LOCKS[name]

    def child_takes_it() -> bool:
        with _taken(lock_now()):
            return True

    assert exit_code_of_child_forked_holding(_taken(lock_now()), child_takes_it) == 0


def _value_locks() -> dict[str, tuple[Any, Callable[[], None]]]:
    """Locks prometheus_client keeps below a metric (a labelled child's, its value's, a histogram's buckets'), which
    `core.metrics` reaches by walking the library's objects: a release of it that moves them fails here."""
    child = metrics.QUERIES.labels(decision="answered")
    return {
        "labelled child's value": (child._value._lock, child.inc),
        "histogram bucket": (metrics.QUERY_LATENCY._buckets[0]._lock, lambda: metrics.QUERY_LATENCY.observe(0.0)),
        "histogram sum": (metrics.QUERY_LATENCY._sum._lock, lambda: metrics.QUERY_LATENCY.observe(0.0)),
    }


@pytest.mark.parametrize("name", ["labelled child's value", "histogram bucket", "histogram sum"])
def test_a_child_forked_while_another_thread_counts_counts_too(name: str) -> None:
    """Another thread holds a metric value's lock (counting) as the process forks: the child counts."""
    lock, count = _value_locks()[name]

    def child_counts() -> bool:
        count()
        return True

    assert exit_code_of_child_forked_holding(lock, child_counts) == 0


class _Broken:
    """An object whose renewal fails in a child, as a `renew` reading a library's private attribute would once the
    library moved it."""

    def fail(self) -> None:
        raise AttributeError("moved")


def test_a_renewal_that_fails_in_a_child_leaves_the_others_renewed() -> None:
    """One `renew` raising does not leave the locks registered after it held in the child."""
    broken = forksafe.renewed(_Broken(), _Broken.fail)
    after = forksafe.lock()

    def child_takes_it() -> bool:
        with after:
            return True

    try:
        assert exit_code_of_child_forked_holding(after, child_takes_it) == 0
    finally:
        del broken  # garbage: renewed no more in the forks of later tests
