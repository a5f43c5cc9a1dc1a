"""Every lock living as long as the process is renewed in a forked child (core/forksafe.py): a Celery prefork child or
a gunicorn-style worker forked while another thread of the parent held one would otherwise wait on it for ever."""

from __future__ import annotations

import importlib
import pkgutil
import threading
from collections.abc import Callable
from types import FunctionType, ModuleType
from typing import Any

import pytest
from celery.local import Proxy

from core import forksafe
from tests.support.forking import exit_code_of_child_forked_holding

PACKAGES = ("api", "audit", "authz", "core", "guard", "ingestion", "retrieval", "workers")
LOCK_TYPES = (type(threading.Lock()), type(threading.RLock()), threading._PyRLock,  # type: ignore[attr-defined]
              threading.Condition, threading.Semaphore, threading.Event, threading.Barrier)


def _project_modules() -> list[ModuleType]:
    modules = []
    for name in PACKAGES:
        package = importlib.import_module(name)
        modules.append(package)
        modules += [importlib.import_module(found.name)
                    for found in pkgutil.walk_packages(package.__path__, f"{name}.")]
    return modules


def _module_level_locks() -> dict[str, tuple[object, Callable[[], Any]]]:
    """Every lock a module holds, itself or as an attribute of an object it holds: its name → (what must be renewed
    in a child, the lock as read where it is held, in the parent or in a child: an object renewed by its own `renew`
    may replace its lock)."""
    found: dict[str, tuple[object, Callable[[], Any]]] = {}
    seen: set[int] = set()
    for module in _project_modules():
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
